//! The Switchboard broker.
//!
//! # Layout: the path a message takes, one file per step
//! ```text
//! client ─gRPC─▶ edge ─▶ proposer ─▶ raft (log) ─▶ apply ─▶ store ─▶ hub ─▶ subscription ─▶ client
//! ```
//! - [`edge`]: the public gRPC service; validation, conversions, the one error→status mapping.
//! - [`gateway`]: the same services for browsers: HTTP/JSON, Server-Sent Events, CORS.
//! - [`proposer`]: group commit — concurrent publishes become one log entry.
//! - [`raft`]: openraft: the durable log in segment files ([`raft::log_store`],
//!   [`raft::segment`]), the state machine in sled ([`raft::state_machine`]), the real fdatasync
//!   sled lacks ([`raft::sync`]).
//! - [`apply`]: the deterministic decision of what a committed command does.
//! - [`store`]: the on-disk layout of messages and their indexes, and reads.
//! - [`hub`]: per-node fan-out to subscriptions, with bounded mailboxes.
//! - [`subscription`]: one subscriber's task — replay from the store, then live, catching up
//!   from the store whenever it falls behind.
//! - [`retention`]: TTL expiry and retention limits, swept through the log.
//! - [`checksum`]: the checksum sealed into every stored value, checked on every read.
//! - [`cluster`]: raft between nodes — forwarding to the leader, read index, membership admin.
//! - [`security`]: the pure security decisions (tokens, permissions, origins, rate limits, client
//!   credentials); [`edge::auth`] is the gate that applies them to every call.
//! - [`transport`]: TLS for the public and raft listeners, and the bound on open connections.
//! - [`observability`]: metrics, health, the operator console, traces, the audit log.
//! - [`channel`]: channel and pattern grammar, and the segment trie used for matching.
//! - [`message`]: the message types, and the commands the log carries.
//! - [`config`], [`error`], [`shutdown`], [`server`]: settings, errors, stopping, wiring.
#![warn(missing_docs)]

pub mod channel;
pub mod checksum;
pub mod cluster;
pub mod config;
pub mod edge;
pub mod entity;
pub mod error;
pub mod fanout;
pub mod gateway;
pub mod message;
pub mod observability;
pub mod raft;
pub mod security;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod transport;
pub mod write;
