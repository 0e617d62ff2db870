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
    EntityKeyInvalid,
    EntityFieldsInvalid,
    WriteStampInvalid,
    LoopDetected,
    StaleUpdate,
    VersionConflict,
    ClockSkew,
    EntityNotFound,
    SubscriptionLimit,
    SubscriptionNotFound,
    ConsumerInvalid,
    ConsumerNotFound,
    ConsumerTakenOver,
    PolicyInvalid,
    NotLeader,
    ShuttingDown,
    StorageFailure,
    DataCorrupt,
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
            Reason::EntityKeyInvalid => "ENTITY_KEY_INVALID",
            Reason::EntityFieldsInvalid => "ENTITY_FIELDS_INVALID",
            Reason::WriteStampInvalid => "WRITE_STAMP_INVALID",
            Reason::LoopDetected => "LOOP_DETECTED",
            Reason::StaleUpdate => "STALE_UPDATE",
            Reason::VersionConflict => "VERSION_CONFLICT",
            Reason::ClockSkew => "CLOCK_SKEW",
            Reason::EntityNotFound => "ENTITY_NOT_FOUND",
            Reason::SubscriptionLimit => "SUBSCRIPTION_LIMIT",
            Reason::SubscriptionNotFound => "SUBSCRIPTION_NOT_FOUND",
            Reason::ConsumerInvalid => "CONSUMER_INVALID",
            Reason::ConsumerNotFound => "CONSUMER_NOT_FOUND",
            Reason::ConsumerTakenOver => "CONSUMER_TAKEN_OVER",
            Reason::PolicyInvalid => "POLICY_INVALID",
            Reason::NotLeader => "NOT_LEADER",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::StorageFailure => "STORAGE_FAILURE",
            Reason::DataCorrupt => "DATA_CORRUPT",
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
    /// The publish would continue a loop. FAILED_PRECONDITION.
    #[error("publish loop detected: {detail}")]
    LoopDetected {
        /// What was found.
        detail: String,
    },
    /// No field of the entity write won. FAILED_PRECONDITION.
    #[error("stale update: no field's stamp is newer than the entity's (current version {current_version})")]
    StaleUpdate {
        /// The entity's version.
        current_version: u64,
    },
    /// Compare-and-set failed. ABORTED.
    #[error(
        "version conflict: expected version {expected_version}, the entity is at {current_version}"
    )]
    VersionConflict {
        /// The entity's version.
        current_version: u64,
        /// What the writer expected.
        expected_version: u64,
    },
    /// The write's timestamp is too far ahead of the broker's clock. FAILED_PRECONDITION.
    #[error("the write's timestamp is {ahead_ms} ms ahead of the broker's clock; at most {max_skew_ms} ms is allowed (current version {current_version})")]
    ClockSkew {
        /// The entity's version.
        current_version: u64,
        /// How far ahead.
        ahead_ms: u64,
        /// The limit.
        max_skew_ms: u64,
    },
    /// The entity was never written. NOT_FOUND.
    #[error("entity {entity_type}.{id} does not exist")]
    EntityNotFound {
        /// Its type.
        entity_type: String,
        /// Its id.
        id: String,
    },
    /// A limit was reached. RESOURCE_EXHAUSTED.
    #[error("{message}")]
    Exhausted {
        /// Which limit.
        reason: Reason,
        /// What was reached.
        message: String,
    },
    /// The request does not fit the current state. FAILED_PRECONDITION.
    #[error("{message}")]
    Precondition {
        /// Which condition.
        reason: Reason,
        /// What is wrong.
        message: String,
    },
    /// What the request names does not exist. NOT_FOUND.
    #[error("{message}")]
    NotFound {
        /// What is missing.
        reason: Reason,
        /// What was asked for.
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
    /// A stored record failed its checksum or could not be decoded: this node's files are
    /// damaged, and the record is not served. DATA_LOSS.
    #[error("damaged stored data: {0}")]
    Corrupt(String),
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
            BrokerError::LoopDetected { .. } => Reason::LoopDetected,
            BrokerError::StaleUpdate { .. } => Reason::StaleUpdate,
            BrokerError::VersionConflict { .. } => Reason::VersionConflict,
            BrokerError::ClockSkew { .. } => Reason::ClockSkew,
            BrokerError::EntityNotFound { .. } => Reason::EntityNotFound,
            BrokerError::Exhausted { reason, .. }
            | BrokerError::Precondition { reason, .. }
            | BrokerError::NotFound { reason, .. } => *reason,
            BrokerError::NotLeader { .. } => Reason::NotLeader,
            BrokerError::ShuttingDown => Reason::ShuttingDown,
            BrokerError::Storage(_) => Reason::StorageFailure,
            BrokerError::Corrupt(_) => Reason::DataCorrupt,
            BrokerError::Consensus(_) => Reason::ConsensusFailure,
        }
    }
}

impl From<crate::message::Refusal> for BrokerError {
    fn from(refusal: crate::message::Refusal) -> Self {
        use crate::message::Refusal;
        match refusal {
            Refusal::Loop { detail } => BrokerError::LoopDetected { detail },
            Refusal::Stale { current_version } => BrokerError::StaleUpdate { current_version },
            Refusal::VersionConflict {
                current_version,
                expected_version,
            } => BrokerError::VersionConflict {
                current_version,
                expected_version,
            },
            Refusal::ClockSkew {
                current_version,
                ahead_ms,
                max_skew_ms,
            } => BrokerError::ClockSkew {
                current_version,
                ahead_ms,
                max_skew_ms,
            },
        }
    }
}

/// Errors from the embedded store.
impl From<sled::Error> for BrokerError {
    fn from(e: sled::Error) -> Self {
        BrokerError::Storage(e.to_string())
    }
}
