//! The broker's error type and the stable reasons sent to clients.
//!
//! Every refusal a client can see is a [`BrokerError`]; [`BrokerError::code`] is its gRPC code and
//! [`BrokerError::reason`] its reason, each one table; `edge::status` builds from them the gRPC
//! status carrying a `google.rpc.ErrorInfo` whose `reason` is a [`Reason`] string. Reason
//! strings are part of the public contract: they are never renamed or reused for another meaning,
//! and [`Reason`] is defined with the contract, in `switchboard_proto` (`proto/src/reason.rs`),
//! so the broker and the client share one list.

use crate::security::credentials::CredentialError;
use crate::security::permissions::PermissionDenied;
use crate::security::ratelimit::RetryAfter;
use crate::security::token::TokenError;

/// The stable reasons live in the contract crate, where the client reads them too; this
/// re-export keeps `crate::error::Reason` the broker's one path to them.
pub(crate) use switchboard_proto::Reason;

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
    /// What the request asks is not offered (a gateway path asked with another method).
    /// UNIMPLEMENTED.
    #[error("{message}")]
    Unsupported {
        /// Which.
        reason: Reason,
        /// What was asked.
        message: String,
    },
    /// This node cannot accept writes now: there is no leader, or it is another node. UNAVAILABLE.
    #[error("no leader is available to accept writes{}", leader_hint(.leader))]
    NotLeader {
        /// The leader's id, when known.
        leader: Option<u64>,
    },
    /// The call carries no acceptable token. UNAUTHENTICATED.
    #[error("{0}")]
    Unauthenticated(TokenError),
    /// The caller may not do this. PERMISSION_DENIED (a publish to a `$` channel: INVALID_ARGUMENT
    /// `CHANNEL_RESERVED`, as the validator answers it).
    #[error("{0}")]
    Denied(PermissionDenied),
    /// A browser call from an origin not on the allow-list. PERMISSION_DENIED.
    #[error("calls from origin {origin:?} are not allowed (see origins.allow)")]
    OriginNotAllowed {
        /// The `Origin` header, cut to a readable length.
        origin: String,
    },
    /// The token endpoint refused a client or its request: UNAUTHENTICATED `INVALID_CLIENT`,
    /// PERMISSION_DENIED for a scope or subject beyond the client's, INVALID_ARGUMENT for a
    /// malformed request, INTERNAL for a misconfiguration.
    #[error("{0}")]
    Credential(CredentialError),
    /// The token endpoint is off: no clients are configured. UNIMPLEMENTED.
    #[error("this broker issues no tokens: no clients are configured in auth.token_endpoint")]
    TokenEndpointOff,
    /// The caller or its connection spent its rate budget. RESOURCE_EXHAUSTED, with the wait in
    /// `retry_after_ms` and a `google.rpc.RetryInfo`.
    #[error("{0}")]
    RateLimited(RetryAfter),
    /// A follower could not hand the request to the leader: none was elected in time
    /// ([`Reason::NoLeader`]), or it did not answer ([`Reason::LeaderUnreachable`]; a forwarded
    /// write's fate is then unknown, so retry with the same idempotency key). UNAVAILABLE, with the
    /// leader's public address as a hint when known.
    #[error("{message}")]
    LeaderUnavailable {
        /// [`Reason::NoLeader`] or [`Reason::LeaderUnreachable`].
        reason: Reason,
        /// What happened.
        message: String,
        /// The leader's id, when known.
        leader: Option<u64>,
        /// The leader's public address (`host:port`), when known.
        leader_address: Option<String>,
    },
    /// This node leads but a majority did not confirm the write in time (it is cut off from
    /// them, or they are down). UNAVAILABLE. The write may still be committed later if the
    /// majority comes back to this leader: retry with the same idempotency key.
    #[error("no majority of the cluster confirmed the write within {waited_ms} ms; it may still be committed")]
    NoQuorum {
        /// How long it waited.
        waited_ms: u64,
    },
    /// The broker is stopping. UNAVAILABLE; retry against another node or after restart.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A subscription's start offset is beyond the next offset: no such message exists.
    /// OUT_OF_RANGE, with `next_offset` in the metadata.
    #[error(
        "start offset {start} is beyond the end of the log: the next offset is {next_offset}; \
         start there (or earlier) to wait for new messages"
    )]
    StartBeyondEnd {
        /// The start asked for.
        start: u64,
        /// The offset the next published message gets, on the node that answered.
        next_offset: u64,
    },
    /// The payload does not match the schema registered for its channel, or its schema version
    /// is unknown there, under `enforce` (docs/SCHEMAS.md). INVALID_ARGUMENT, with the schema and
    /// the first failures in the metadata.
    #[error("{0}")]
    Schema(Box<crate::schema::Mismatch>),
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
            | BrokerError::NotFound { reason, .. }
            | BrokerError::Unsupported { reason, .. } => *reason,
            BrokerError::NotLeader { .. } => Reason::NotLeader,
            BrokerError::LeaderUnavailable { reason, .. } => *reason,
            BrokerError::NoQuorum { .. } => Reason::NoQuorum,
            BrokerError::ShuttingDown => Reason::ShuttingDown,
            BrokerError::StartBeyondEnd { .. } => Reason::StartBeyondEnd,
            BrokerError::Schema(mismatch) => mismatch.reason(),
            BrokerError::Storage(_) => Reason::StorageFailure,
            BrokerError::Corrupt(_) => Reason::DataCorrupt,
            BrokerError::Consensus(_) => Reason::ConsensusFailure,
            BrokerError::Unauthenticated(e) => token_reason(e),
            BrokerError::Denied(e) => denied_reason(e),
            BrokerError::OriginNotAllowed { .. } => Reason::OriginNotAllowed,
            BrokerError::Credential(e) => e.reason(),
            BrokerError::TokenEndpointOff => Reason::TokenEndpointOff,
            BrokerError::RateLimited(_) => Reason::RateLimited,
        }
    }
}

// The token and permission building blocks name their reasons as strings; these give each its
// `Reason`, and a test checks that the two spellings agree. A `CredentialError` names its own
// `Reason` (`security::credentials`), so that mapping has one table, there.

fn token_reason(e: &TokenError) -> Reason {
    match e {
        TokenError::Missing => Reason::TokenMissing,
        TokenError::Malformed(_) => Reason::TokenMalformed,
        TokenError::AlgorithmUnsupported(_) => Reason::TokenAlgorithmUnsupported,
        TokenError::KeyUnknown(_) => Reason::TokenKeyUnknown,
        TokenError::Invalid => Reason::TokenInvalid,
        TokenError::Expired { .. } => Reason::TokenExpired,
        TokenError::NotYetValid { .. } => Reason::TokenNotYetValid,
        TokenError::IssuerMismatch(_) => Reason::IssuerMismatch,
        TokenError::AudienceMismatch(_) => Reason::AudienceMismatch,
        TokenError::ClaimsInvalid(_) => Reason::TokenClaimsInvalid,
    }
}

fn denied_reason(e: &PermissionDenied) -> Reason {
    match e {
        PermissionDenied::ReservedChannel { .. } => Reason::ChannelReserved,
        PermissionDenied::Publish { .. } => Reason::PublishDenied,
        PermissionDenied::Subscribe { .. } => Reason::SubscribeDenied,
        PermissionDenied::EntityRead { .. } | PermissionDenied::EntityStateRead { .. } => {
            Reason::EntityReadDenied
        }
        PermissionDenied::EntityUpdate { .. } => Reason::EntityUpdateDenied,
        PermissionDenied::Admin => Reason::AdminDenied,
        PermissionDenied::Schema => Reason::SchemaDenied,
        PermissionDenied::ConsumerNotOwned { .. } => Reason::ConsumerNotOwned,
        PermissionDenied::Kpi { .. } => Reason::KpiDenied,
    }
}

impl From<crate::message::Refusal> for BrokerError {
    fn from(refusal: crate::message::Refusal) -> Self {
        use crate::message::Refusal;
        match refusal {
            Refusal::Loop { detail } => BrokerError::LoopDetected { detail },
            Refusal::ViewInvalid { detail } => BrokerError::Invalid {
                reason: Reason::ViewInvalid,
                message: detail,
            },
            Refusal::ViewLimit { max_views } => BrokerError::Exhausted {
                reason: Reason::ViewLimit,
                message: format!(
                    "the broker holds {max_views} KPI views, as many as it may (kpis.max_views)"
                ),
            },
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

impl BrokerError {
    /// The gRPC code a client sees for this error: the one table, used by the edge for statuses
    /// and stream refusals and by the audit log.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            BrokerError::Invalid { .. } | BrokerError::Schema(_) => Code::InvalidArgument,
            BrokerError::LoopDetected { .. }
            | BrokerError::StaleUpdate { .. }
            | BrokerError::ClockSkew { .. } => Code::FailedPrecondition,
            BrokerError::VersionConflict { .. } => Code::Aborted,
            BrokerError::EntityNotFound { .. } | BrokerError::NotFound { .. } => Code::NotFound,
            BrokerError::Exhausted { .. } => Code::ResourceExhausted,
            BrokerError::Precondition { .. } => Code::FailedPrecondition,
            BrokerError::Unsupported { .. } => Code::Unimplemented,
            BrokerError::NotLeader { .. }
            | BrokerError::LeaderUnavailable { .. }
            | BrokerError::NoQuorum { .. }
            | BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::Storage(_) | BrokerError::Consensus(_) => Code::Internal,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::Denied(PermissionDenied::ReservedChannel { .. }) => Code::InvalidArgument,
            BrokerError::Denied(_) | BrokerError::OriginNotAllowed { .. } => Code::PermissionDenied,
            BrokerError::Credential(e) => match e {
                CredentialError::InvalidClient => Code::Unauthenticated,
                CredentialError::ScopeNotAllowed | CredentialError::OnBehalfNotAllowed(_) => {
                    Code::PermissionDenied
                }
                CredentialError::InvalidScope(_)
                | CredentialError::InvalidSubject
                | CredentialError::InvalidTtl(_) => Code::InvalidArgument,
                _ => Code::Internal,
            },
            BrokerError::TokenEndpointOff => Code::Unimplemented,
            BrokerError::RateLimited(_) => Code::ResourceExhausted,
            BrokerError::Corrupt(_) => Code::DataLoss,
            BrokerError::StartBeyondEnd { .. } => Code::OutOfRange,
        }
    }
}

/// Echoed client strings are cut to this many bytes, so an error message or an audit line stays
/// small whatever was sent.
const MAX_ECHO: usize = 100;

/// A client string as quoted in an error or an audit line: at most [`MAX_ECHO`] bytes, cut on a
/// char boundary (and then ending in `…`).
pub(crate) fn shorten(s: &str) -> String {
    shorten_to(s, MAX_ECHO)
}

/// `s` cut to at most `max` bytes (at a character boundary), marked with `…` when cut.
pub(crate) fn shorten_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn echoed_strings_are_cut_at_a_character_boundary() {
        assert_eq!(shorten("crm.contact"), "crm.contact");
        let cut = shorten(&"é".repeat(80)); // 160 bytes
        assert!(cut.ends_with('…'));
        assert_eq!(cut.len(), 100 + '…'.len_utf8());
    }

    /// The security modules spell their reasons themselves; the edge's `Reason` must agree.
    #[test]
    fn security_reasons_agree_with_the_building_blocks() {
        let tokens = [
            TokenError::Missing,
            TokenError::Malformed(String::new()),
            TokenError::AlgorithmUnsupported(String::new()),
            TokenError::KeyUnknown(String::new()),
            TokenError::Invalid,
            TokenError::Expired { exp: 1 },
            TokenError::NotYetValid { nbf: 1 },
            TokenError::IssuerMismatch(String::new()),
            TokenError::AudienceMismatch(String::new()),
            TokenError::ClaimsInvalid(String::new()),
        ];
        for e in tokens {
            assert_eq!(token_reason(&e).as_str(), e.reason(), "{e:?}");
        }
        let channel = String::from("a");
        let denials = [
            PermissionDenied::ReservedChannel {
                channel: channel.clone(),
            },
            PermissionDenied::Publish {
                channel: channel.clone(),
            },
            PermissionDenied::Subscribe {
                pattern: channel.clone(),
            },
            PermissionDenied::EntityRead {
                entity_type: channel.clone(),
            },
            PermissionDenied::EntityStateRead {
                pattern: channel.clone(),
            },
            PermissionDenied::EntityUpdate {
                entity_type: channel.clone(),
            },
            PermissionDenied::Admin,
            PermissionDenied::Kpi {
                view: channel.clone(),
            },
            PermissionDenied::ConsumerNotOwned { name: channel },
        ];
        for e in denials {
            assert_eq!(denied_reason(&e).as_str(), e.reason(), "{e:?}");
        }
        let limited = RetryAfter(Duration::from_millis(5));
        assert_eq!(
            BrokerError::RateLimited(limited).reason().as_str(),
            limited.reason()
        );
    }
}
