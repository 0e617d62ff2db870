//! Switchboard's public gRPC contract, generated from `proto/switchboard/v1/*.proto`.
//!
//! The `.proto` files are the documentation of record: every message and field is described there.
//! This crate only compiles them (with protox, so no system `protoc` is needed) and exposes:
//! - [`v1`]: messages, the `Broker` client (`v1::broker_client`) and server (`v1::broker_server`);
//! - [`codec`]: how the servers decode requests (a malformed one is INVALID_ARGUMENT);
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection;
//! - [`Reason`] (`reason.rs`): the stable reasons of refusals, shared by the broker and clients
//!   (the same list as the proto enum [`v1::ErrorReason`], for clients in other languages).
#![allow(missing_docs)]

pub mod codec;
mod reason;

pub use reason::{Reason, UnknownReason};

/// Package `switchboard.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("switchboard.v1");
    include!(concat!(env!("OUT_DIR"), "/server/switchboard.v1.rs"));
}

/// Package `switchboard.internal.v1`: node-to-node raft RPC, served only on the cluster listener.
/// Not a public contract.
pub mod internal {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("switchboard.internal.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Switchboard proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));

/// The error domain carried in every `google.rpc.ErrorInfo` the broker returns.
pub const ERROR_DOMAIN: &str = "switchboard";

/// The canonical SCREAMING_SNAKE name of a gRPC status code, as in `google.rpc.Code`
/// (`INVALID_ARGUMENT`, `UNAVAILABLE`, ...): how the broker's logs and the clients print codes.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
