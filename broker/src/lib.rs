//! The Switchboard broker.
//!
//! # Layout: the path a message takes, one folder per step
//! ```text
//! client ─gRPC─▶ edge ─▶ write ─▶ raft ─▶ state ─▶ fanout ─▶ client
//! ```
//! 1. [`edge`]: the public gRPC services — validation, conversions to and from the wire, grants,
//!    the one error→status mapping. [`gateway`]: the same services for browsers (HTTP/JSON,
//!    Server-Sent Events, CORS).
//! 2. [`write`](mod@write): the write path — group commit ([`proposer`](write::proposer)) and the leader's sweep timer
//!    ([`write::sweeper`]).
//! 3. [`raft`]: the replicated log — openraft over segment files, and the adapter that hands
//!    committed entries to the state it is given ([`raft::AppliedState`]).
//! 4. [`state`]: what the log amounts to — the deterministic apply, one module per rule (dedup,
//!    loops, TTL, entity documents), the sled store and its batch files, the real fdatasync.
//! 5. [`fanout`]: applied messages to this node's subscribers — the hub, subscriptions that replay
//!    and then follow live, and the once-per-message encoding of deliveries.
//!
//! Imports point along this path (or down to the shared types), never back: raft knows nothing
//! of the state or the hub; the state announces applied messages through [`state::Announce`],
//! which the hub implements; [`server`] wires them.
//!
//! Beside the path: [`cluster`] (raft between nodes, forwarding, membership admin), [`security`]
//! (tokens, permissions, origins, rate limits, client credentials), [`transport`] (TLS, the
//! connection bound), [`observability`] (metrics, health, console, traces, audit log).
//! Shared types: [`message`] (messages and the commands the log carries), [`channel`] (grammar and
//! the matching trie), [`entity`] (the field-level merge), [`checksum`] (sealed into every stored
//! value). And [`config`], [`error`], [`shutdown`], [`server`]: settings, errors, stopping, wiring.
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
