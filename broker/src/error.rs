//! The broker's error type and the stable reasons sent to clients.
//!
//! Every refusal a client can see is a [`BrokerError`]; `edge::status` maps it, in one place, to a
//! gRPC status carrying a `google.rpc.ErrorInfo` whose `reason` is a [`Reason`] string. Reason
//! strings are part of the public contract: they are never renamed or reused for another meaning.

use std::fmt;

/// A stable, machine-readable reason, sent as `google.rpc.ErrorInfo.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Reason {
    ChannelInvalid,
    ChannelReserved,
    PatternInvalid,
    PayloadTooLarge,
    PayloadNotJson,
    ContentTypeInvalid,
    SchemaVersionInvalid,
    CorrelationIdInvalid,
    CausationIdInvalid,
    IdempotencyKeyInvalid,
    HeadersInvalid,
    TtlInvalid,
    StartInvalid,
    RangeInvalid,
    NotLeader,
    ShuttingDown,
    StorageFailure,
    ConsensusFailure,
}

impl Reason {
    /// The reason as sent on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::ChannelInvalid => "CHANNEL_INVALID",
            Reason::ChannelReserved => "CHANNEL_RESERVED",
            Reason::PatternInvalid => "PATTERN_INVALID",
            Reason::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Reason::PayloadNotJson => "PAYLOAD_NOT_JSON",
            Reason::ContentTypeInvalid => "CONTENT_TYPE_INVALID",
            Reason::SchemaVersionInvalid => "SCHEMA_VERSION_INVALID",
            Reason::CorrelationIdInvalid => "CORRELATION_ID_INVALID",
            Reason::CausationIdInvalid => "CAUSATION_ID_INVALID",
            Reason::IdempotencyKeyInvalid => "IDEMPOTENCY_KEY_INVALID",
            Reason::HeadersInvalid => "HEADERS_INVALID",
            Reason::TtlInvalid => "TTL_INVALID",
            Reason::StartInvalid => "START_INVALID",
            Reason::RangeInvalid => "RANGE_INVALID",
            Reason::NotLeader => "NOT_LEADER",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::StorageFailure => "STORAGE_FAILURE",
            Reason::ConsensusFailure => "CONSENSUS_FAILURE",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong on a client's behalf.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed; nothing was written. INVALID_ARGUMENT.
    #[error("{message}")]
    Invalid {
        /// Which rule was broken.
        reason: Reason,
        /// What was wrong, precisely enough to fix it.
        message: String,
    },
    /// This node cannot accept writes now: there is no leader, or it is another node. UNAVAILABLE.
    #[error("no leader is available to accept writes{}", leader_hint(.leader))]
    NotLeader {
        /// The leader's id, when known.
        leader: Option<u64>,
    },
    /// The broker is stopping. UNAVAILABLE; retry against another node or after restart.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The embedded store failed. INTERNAL.
    #[error("storage failure: {0}")]
    Storage(String),
    /// Consensus failed in a way that is not "no leader". INTERNAL.
    #[error("consensus failure: {0}")]
    Consensus(String),
}

fn leader_hint(leader: &Option<u64>) -> String {
    match leader {
        Some(id) => format!(" (leader is node {id})"),
        None => String::new(),
    }
}

impl BrokerError {
    /// Shorthand for an INVALID_ARGUMENT refusal.
    pub fn invalid(reason: Reason, message: impl Into<String>) -> Self {
        BrokerError::Invalid {
            reason,
            message: message.into(),
        }
    }

    /// The stable reason for this error.
    pub fn reason(&self) -> Reason {
        match self {
            BrokerError::Invalid { reason, .. } => *reason,
            BrokerError::NotLeader { .. } => Reason::NotLeader,
            BrokerError::ShuttingDown => Reason::ShuttingDown,
            BrokerError::Storage(_) => Reason::StorageFailure,
            BrokerError::Consensus(_) => Reason::ConsensusFailure,
        }
    }
}

/// Errors from the embedded store.
impl From<sled::Error> for BrokerError {
    fn from(e: sled::Error) -> Self {
        BrokerError::Storage(e.to_string())
    }
}
