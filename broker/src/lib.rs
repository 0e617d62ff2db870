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
//! Beside the path: [`cluster`] (raft between nodes, forwarding, membership admin), [`schema`]
//! (payload schemas: the registry the edge checks publishes against, drift), [`security`]
//! (tokens, permissions, origins, rate limits, client credentials), [`transport`] (TLS, the
//! connection bounds, what connections hold for clients that stop reading), [`observability`] (metrics, health, console, traces, audit log).
//! Shared types: [`message`] (messages and the commands the log carries), [`channel`] (grammar and
//! the matching trie), [`entity`] (the field-level merge), [`checksum`] (sealed into every stored
//! value). And [`config`], [`error`], [`shutdown`], [`server`]: settings, errors, stopping, wiring.
#![warn(missing_docs)]
// Everything inside is `pub(crate)` unless the binary or the benches reach it through the
// re-exports below: the dead-code lint then finds what nothing uses.
#![warn(unreachable_pub)]

pub(crate) mod channel;
pub(crate) mod checksum;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod edge;
pub(crate) mod entity;
pub(crate) mod error;
pub(crate) mod fanout;
pub(crate) mod gateway;
pub(crate) mod kpi;
pub(crate) mod message;
pub(crate) mod observability;
pub(crate) mod raft;
pub(crate) mod schema;
pub(crate) mod security;
pub mod server;
pub mod shutdown;
pub(crate) mod state;
pub(crate) mod transport;
pub(crate) mod write;

/// What the `switchboard` binary uses besides [`config`], [`server`] and [`shutdown`].
pub mod run {
    pub use crate::observability::probe::probe;
    pub use crate::observability::trace::{install_subscriber, Export};
    pub use crate::security::credentials::{generate_client_secret, hash_client_secret};
    pub use crate::transport::raise_open_file_limit;
}

/// What the micro-benchmarks in `benches/` measure. Not an API: it changes with the code.
#[doc(hidden)]
pub mod bench_api {
    pub use crate::channel::{ChannelLimits, Pattern, SubscriptionTrie};
    pub use crate::checksum::encode as checksum_encode;
    pub use crate::edge::convert;
    pub use crate::edge::delivery::encode as encode_outgoing;
    pub use crate::entity::{Change, EntityState, Stamp};
    pub use crate::fanout::outgoing::{Delivery, Outgoing, SharedMessage};
    pub use crate::message::{Command, Item, NewMessage, Rules, StoredMessage};
    pub use crate::state::entity_doc::EntityDoc;
    pub use crate::state::store::{MessageStore, WriteBatch};
}
