//! The message as the broker's own code sees it: what a publisher sent ([`NewMessage`]), what the
//! log carries ([`Command`]), and what the store keeps and subscribers receive ([`StoredMessage`]).
//!
//! These types are serialized into the replicated log, so every field order and type here is part
//! of the on-disk format. Headers are a `BTreeMap` so that the encoding of a message is the same on
//! every node.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A validated message, as accepted at the edge and before the log assigns it an offset. Defaults
/// (content type, schema version, correlation id) are already filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Channel, valid per [`crate::channel::validate_channel`].
    pub channel: String,
    /// Body; one reference-counted copy from the gRPC decoder to the store.
    pub payload: Bytes,
    /// Media type, for example `application/json`.
    pub content_type: String,
    /// Semver of the payload's schema.
    pub schema_version: String,
    /// UUID grouping a conversation's messages.
    pub correlation_id: String,
    /// What caused this message; empty when nothing did.
    pub causation_id: String,
    /// Publisher's key for retries; empty when unset.
    pub idempotency_key: String,
    /// Time to live in ms; 0 means until retention removes it.
    pub ttl_ms: u64,
    /// Free-form headers (W3C trace context travels here).
    pub headers: BTreeMap<String, String>,
}

impl NewMessage {
    /// Bytes this message takes in a batch, for batch sizing: payload, strings and headers.
    pub fn approximate_size(&self) -> usize {
        self.channel.len()
            + self.payload.len()
            + self.content_type.len()
            + self.schema_version.len()
            + self.correlation_id.len()
            + self.causation_id.len()
            + self.idempotency_key.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 64
    }
}

/// A message in the store: what was published plus what the log assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Position in the log; strictly increasing, starting at 1.
    pub offset: u64,
    /// Publish time stamped by the leader, in microseconds since the Unix epoch.
    pub publish_time_us: u64,
    /// What the publisher sent.
    pub message: NewMessage,
}

impl StoredMessage {
    /// When the message expires, in µs since the epoch; `None` when it has no TTL.
    pub fn expires_at_us(&self) -> Option<u64> {
        (self.message.ttl_ms != 0).then(|| {
            self.publish_time_us
                .saturating_add(self.message.ttl_ms.saturating_mul(1000))
        })
    }

    /// Whether the message has expired at `now_us`: an expired message is never delivered.
    pub fn is_expired(&self, now_us: u64) -> bool {
        self.expires_at_us().is_some_and(|at| at <= now_us)
    }
}

/// Messages just applied, in offset order, shared by every subscriber that receives them.
pub type AppliedMessages = Arc<[Arc<StoredMessage>]>;

/// A command in the replicated log. Apply uses nothing but the command itself, so every replica
/// reaches the same state from the same log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A group-committed batch of messages.
    Publish {
        /// The leader's clock when it proposed the batch, µs since the epoch.
        stamped_at_us: u64,
        /// The messages, in the order they will get offsets.
        messages: Vec<NewMessage>,
    },
    /// Removes expired messages and applies retention limits, as of the leader's clock. The limits
    /// travel in the command so every replica removes exactly the same messages.
    Sweep {
        /// The leader's clock, µs since the epoch.
        now_us: u64,
        /// Messages published before `now_us - max_age_us` are removed.
        max_age_us: u64,
        /// The oldest messages are removed while stored bytes exceed this.
        max_bytes: u64,
    },
}

/// What applying a [`Command`] produced, returned to whoever proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The batch's messages got offsets `first_offset..first_offset + count`, all with one publish
    /// time.
    Published {
        /// Offset of the batch's first message.
        first_offset: u64,
        /// The publish time given to every message of the batch, µs since the epoch.
        publish_time_us: u64,
    },
    /// A sweep removed this many messages.
    Swept {
        /// Messages removed.
        removed: u64,
    },
    /// An entry with no command (a raft blank or membership entry).
    Nothing,
}

/// Microseconds since the Unix epoch by this node's clock. Only the edge, the proposer and readers
/// use it; apply never does (it uses the time stamped into the entry).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
