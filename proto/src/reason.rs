//! The stable reasons of Switchboard's refusals: what the broker sends as
//! `google.rpc.ErrorInfo.reason` (domain [`ERROR_DOMAIN`](crate::ERROR_DOMAIN)) and in a
//! publish stream's `Refusal.reason`, and what clients switch on.
//!
//! They live here, beside the `.proto` files, because they are part of the contract: the broker
//! sends them and the client reads them, and neither owns them. A reason is never renamed, and
//! never reused for another meaning; `docs/ERRORS.md` says when each is sent and with which code
//! (a test checks that every reason here is in it).
//!
//! One list below generates the enum and both directions of the mapping ([`Reason::as_str`] and
//! [`Reason::from_wire`]), so the two cannot drift. The enum is `#[non_exhaustive]`: a newer broker
//! may send a reason an older client does not know; `from_wire` answers `None` for it, and the
//! client keeps the string.
//!
//! The same reasons are the proto enum `switchboard.v1.ErrorReason` (`switchboard/v1/reason.proto`),
//! for clients in other languages: value `ERROR_REASON_<wire string>`. The wire form stays the
//! string. A test checks that the enum and this list name the same reasons.

use std::fmt;
use std::str::FromStr;

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $wire:literal, )*) => {
        /// A stable, machine-readable reason, sent as `google.rpc.ErrorInfo.reason`; see the
        /// [module documentation](self) and `docs/ERRORS.md`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $( $(#[$doc])* $variant, )*
        }

        impl Reason {
            /// Every reason, in the order of the list.
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];

            /// The reason as sent on the wire, for example `"CHANNEL_INVALID"`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Reason::$variant => $wire, )*
                }
            }

            /// The reason a wire string names, or `None` for one this version does not know (a
            /// newer broker's, or not a Switchboard reason at all).
            pub fn from_wire(wire: &str) -> Option<Reason> {
                match wire {
                    $( $wire => Some(Reason::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // The request is malformed (INVALID_ARGUMENT).
    /// A channel that breaks the grammar.
    ChannelInvalid => "CHANNEL_INVALID",
    /// A channel starting with `$`, reserved for the broker.
    ChannelReserved => "CHANNEL_RESERVED",
    /// A pattern that breaks the grammar.
    PatternInvalid => "PATTERN_INVALID",
    /// A payload above the broker's limit.
    PayloadTooLarge => "PAYLOAD_TOO_LARGE",
    /// A JSON content type whose payload does not parse.
    PayloadNotJson => "PAYLOAD_NOT_JSON",
    /// A content type that is not a media type.
    ContentTypeInvalid => "CONTENT_TYPE_INVALID",
    /// A schema version that is not semver.
    SchemaVersionInvalid => "SCHEMA_VERSION_INVALID",
    /// A correlation id that is not a UUID.
    CorrelationIdInvalid => "CORRELATION_ID_INVALID",
    /// A causation id that is too long.
    CausationIdInvalid => "CAUSATION_ID_INVALID",
    /// An idempotency key that is too long.
    IdempotencyKeyInvalid => "IDEMPOTENCY_KEY_INVALID",
    /// Too many headers, too large, or a bad name.
    HeadersInvalid => "HEADERS_INVALID",
    /// A TTL (or a token lifetime) out of range.
    TtlInvalid => "TTL_INVALID",
    /// A start position that is malformed or not allowed.
    StartInvalid => "START_INVALID",
    /// A history range end that is malformed.
    RangeInvalid => "RANGE_INVALID",
    /// An entity type or id that is missing or malformed.
    EntityKeyInvalid => "ENTITY_KEY_INVALID",
    /// Entity fields that are not a non-empty JSON object, or too large.
    EntityFieldsInvalid => "ENTITY_FIELDS_INVALID",
    /// A missing or malformed write stamp.
    WriteStampInvalid => "WRITE_STAMP_INVALID",
    /// A gRPC request that is not one valid protobuf message of the method's request type.
    MalformedRequest => "MALFORMED_REQUEST",
    /// Request metadata (HTTP/2 headers) above the broker's limit.
    MetadataTooLarge => "METADATA_TOO_LARGE",
    // Loops and entity writes.
    /// The publish would continue a loop (FAILED_PRECONDITION).
    LoopDetected => "LOOP_DETECTED",
    /// No field of the entity write wins (FAILED_PRECONDITION; `current_version` metadata).
    StaleUpdate => "STALE_UPDATE",
    /// The entity is not at the expected version (ABORTED; `current_version` metadata).
    VersionConflict => "VERSION_CONFLICT",
    /// The write's timestamp is too far ahead of the broker's clock (FAILED_PRECONDITION).
    ClockSkew => "CLOCK_SKEW",
    /// The entity was never written (NOT_FOUND).
    EntityNotFound => "ENTITY_NOT_FOUND",
    /// The browser gateway has no such path (NOT_FOUND).
    EndpointNotFound => "ENDPOINT_NOT_FOUND",
    /// A browser gateway path asked with a method it does not take (UNIMPLEMENTED; HTTP 405).
    MethodNotAllowed => "METHOD_NOT_ALLOWED",
    /// A browser gateway request body that is not the JSON its endpoint takes.
    BodyMalformed => "BODY_MALFORMED",
    /// A browser gateway request body naming a field its endpoint does not take.
    UnknownField => "UNKNOWN_FIELD",
    /// A browser gateway batch with more messages than `gateway.max_batch`.
    BatchTooLarge => "BATCH_TOO_LARGE",
    // Subscriptions and durable consumers.
    /// Too many subscriptions on the connection or the node (RESOURCE_EXHAUSTED).
    SubscriptionLimit => "SUBSCRIPTION_LIMIT",
    /// An ack for a subscription that is not live on this node (NOT_FOUND).
    SubscriptionNotFound => "SUBSCRIPTION_NOT_FOUND",
    /// A bad durable consumer name, or a consumer reopened with another pattern.
    ConsumerInvalid => "CONSUMER_INVALID",
    /// An unknown durable consumer (NOT_FOUND).
    ConsumerNotFound => "CONSUMER_NOT_FOUND",
    /// A durable subscription taken over by a newer one, or whose consumer was deleted.
    ConsumerTakenOver => "CONSUMER_TAKEN_OVER",
    /// A durable consumer another principal created (PERMISSION_DENIED).
    ConsumerNotOwned => "CONSUMER_NOT_OWNED",
    /// An unknown flow policy.
    PolicyInvalid => "POLICY_INVALID",
    /// A subscription's start offset is beyond the next offset (OUT_OF_RANGE; `next_offset`
    /// metadata).
    StartBeyondEnd => "START_BEYOND_END",
    // The cluster (UNAVAILABLE unless said otherwise).
    /// No leader can accept the write now; `leader_id` metadata when known.
    NotLeader => "NOT_LEADER",
    /// A node knew no leader in time.
    NoLeader => "NO_LEADER",
    /// The leader did not answer a forwarded request.
    LeaderUnreachable => "LEADER_UNREACHABLE",
    /// No majority confirmed the write in time; it may still commit.
    NoQuorum => "NO_QUORUM",
    /// A membership change that is malformed or cannot be made.
    MembershipInvalid => "MEMBERSHIP_INVALID",
    /// The broker is stopping.
    ShuttingDown => "SHUTTING_DOWN",
    // The node's own failures.
    /// The embedded store failed (INTERNAL).
    StorageFailure => "STORAGE_FAILURE",
    /// The broker's disk is nearly full: writes are refused until there is room
    /// (RESOURCE_EXHAUSTED).
    StorageFull => "STORAGE_FULL",
    /// A stored record failed its checksum (DATA_LOSS).
    DataCorrupt => "DATA_CORRUPT",
    /// The replicated log failed for a reason other than leadership (INTERNAL).
    ConsensusFailure => "CONSENSUS_FAILURE",
    // Authentication (UNAUTHENTICATED).
    /// The call carries no token.
    TokenMissing => "TOKEN_MISSING",
    /// The token is not a well-formed bearer JWT.
    TokenMalformed => "TOKEN_MALFORMED",
    /// The token's algorithm is that of no configured key.
    TokenAlgorithmUnsupported => "TOKEN_ALGORITHM_UNSUPPORTED",
    /// The token's `kid` names no configured key.
    TokenKeyUnknown => "TOKEN_KEY_UNKNOWN",
    /// The token's signature does not verify.
    TokenInvalid => "TOKEN_INVALID",
    /// The token has expired, at the call or later (a stream ends with it): refresh and resume.
    TokenExpired => "TOKEN_EXPIRED",
    /// The token's `nbf` is still to come.
    TokenNotYetValid => "TOKEN_NOT_YET_VALID",
    /// The token's issuer is not accepted.
    IssuerMismatch => "ISSUER_MISMATCH",
    /// The token's audience is not accepted.
    AudienceMismatch => "AUDIENCE_MISMATCH",
    /// The token is signed but its claims are not acceptable.
    TokenClaimsInvalid => "TOKEN_CLAIMS_INVALID",
    /// The token endpoint does not know the client, or its secret is wrong.
    InvalidClient => "INVALID_CLIENT",
    // Authorization (PERMISSION_DENIED).
    /// No `publish` grant matches the channel.
    PublishDenied => "PUBLISH_DENIED",
    /// The `subscribe` grants do not cover the pattern.
    SubscribeDenied => "SUBSCRIBE_DENIED",
    /// The entity type is outside the `entities.read` grant.
    EntityReadDenied => "ENTITY_READ_DENIED",
    /// The entity type is outside the `entities.update` grant.
    EntityUpdateDenied => "ENTITY_UPDATE_DENIED",
    /// A membership change without the `admin` grant.
    AdminDenied => "ADMIN_DENIED",
    /// A browser origin that is not on the allow-list.
    OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
    /// A token requested with a scope wider than the client's.
    ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
    /// A token requested for another subject by a client not allowed to.
    OnBehalfNotAllowed => "ON_BEHALF_NOT_ALLOWED",
    // The token endpoint's requests (INVALID_ARGUMENT) and state (UNIMPLEMENTED).
    /// A requested scope that does not parse.
    ScopeInvalid => "SCOPE_INVALID",
    /// A requested subject that is too long or has control characters.
    SubjectInvalid => "SUBJECT_INVALID",
    /// The broker issues no tokens.
    TokenEndpointOff => "TOKEN_ENDPOINT_OFF",
    // Limits (RESOURCE_EXHAUSTED).
    /// The caller or its connection spent its rate budget; `retry_after_ms` metadata.
    RateLimited => "RATE_LIMITED",
    /// Too many token requests at once.
    CredentialChecksBusy => "CREDENTIAL_CHECKS_BUSY",
    // INTERNAL.
    /// The token endpoint's own configuration is broken.
    CredentialsMisconfigured => "CREDENTIALS_MISCONFIGURED",
    // Payload schemas (docs/SCHEMAS.md).
    /// The payload does not match the schema that applies (INVALID_ARGUMENT); the metadata names
    /// the schema and the first failures.
    SchemaMismatch => "SCHEMA_MISMATCH",
    /// No registered version of the channel's schema has the message's major version, or none is
    /// at or below it (INVALID_ARGUMENT, under `enforce`).
    SchemaVersionUnknown => "SCHEMA_VERSION_UNKNOWN",
    /// A schema registration that cannot be used: not a JSON Schema, too large, a bad pattern,
    /// version or policy (INVALID_ARGUMENT).
    SchemaInvalid => "SCHEMA_INVALID",
    /// A registration asked to be compatible, and retained messages fail it
    /// (FAILED_PRECONDITION).
    SchemaIncompatible => "SCHEMA_INCOMPATIBLE",
    /// No schema is registered for that pattern and version (NOT_FOUND).
    SchemaNotFound => "SCHEMA_NOT_FOUND",
    /// The caller may not change the schema registry (PERMISSION_DENIED).
    SchemaDenied => "SCHEMA_DENIED",
    /// The registry holds `schemas.max_registrations` already (RESOURCE_EXHAUSTED).
    SchemaLimit => "SCHEMA_LIMIT",
    // KPI views (docs/KPIS.md).
    /// A view definition that cannot be used: not a definition, or a value out of bounds
    /// (INVALID_ARGUMENT); the message names the field.
    ViewInvalid => "VIEW_INVALID",
    /// The broker holds as many views as it may (`kpis.max_views`) (RESOURCE_EXHAUSTED).
    ViewLimit => "VIEW_LIMIT",
    /// No view has that name (NOT_FOUND).
    ViewNotFound => "VIEW_NOT_FOUND",
    /// The caller's grant names no `kpi` pattern matching the view (PERMISSION_DENIED).
    KpiDenied => "KPI_DENIED",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A wire string that names no reason this version knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReason(pub String);

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown reason {:?}", self.0)
    }
}

impl std::error::Error for UnknownReason {}

impl FromStr for Reason {
    type Err = UnknownReason;

    /// [`Reason::from_wire`], as an error for an unknown string.
    fn from_str(wire: &str) -> Result<Self, Self::Err> {
        Reason::from_wire(wire).ok_or_else(|| UnknownReason(wire.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_reason_round_trips_and_wire_strings_are_unique() {
        let mut seen = HashSet::new();
        for &reason in Reason::ALL {
            let wire = reason.as_str();
            assert!(seen.insert(wire), "{wire} is used twice");
            assert_eq!(Reason::from_wire(wire), Some(reason));
            assert_eq!(wire.parse::<Reason>(), Ok(reason));
            assert_eq!(reason.to_string(), wire);
            assert!(
                wire.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{wire} is not SCREAMING_SNAKE"
            );
        }
    }

    #[test]
    fn unknown_strings_are_not_reasons() {
        assert_eq!(Reason::from_wire("SOMETHING_NEW"), None);
        assert_eq!(Reason::from_wire("channel_invalid"), None);
        assert_eq!(Reason::from_wire(""), None);
        assert_eq!(
            "SOMETHING_NEW".parse::<Reason>(),
            Err(UnknownReason("SOMETHING_NEW".to_owned()))
        );
    }

    /// Clients in other languages switch on the proto enum `ErrorReason`: it must name every reason
    /// here as `ERROR_REASON_<wire>`, and nothing else, so the two lists cannot drift. Read from the
    /// compiled descriptors, so a value added to the `.proto` alone is caught too.
    #[test]
    fn the_proto_error_reason_enum_names_the_same_reasons() {
        use prost::Message as _;

        const PREFIX: &str = "ERROR_REASON_";
        let descriptors = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the build wrote a valid descriptor set");
        let enums: Vec<_> = descriptors
            .file
            .iter()
            .filter(|file| file.package() == "switchboard.v1")
            .flat_map(|file| &file.enum_type)
            .filter(|e| e.name() == "ErrorReason")
            .collect();
        assert_eq!(
            enums.len(),
            1,
            "one top-level ErrorReason in switchboard.v1"
        );
        let mut in_proto = HashSet::new();
        for value in &enums[0].value {
            if value.number() == 0 {
                assert_eq!(value.name(), "ERROR_REASON_UNSPECIFIED");
                continue;
            }
            let wire = value
                .name()
                .strip_prefix(PREFIX)
                .unwrap_or_else(|| panic!("{} lacks the {PREFIX} prefix", value.name()));
            assert!(
                Reason::from_wire(wire).is_some(),
                "reason.proto names {wire}, which is no Reason in reason.rs"
            );
            assert!(in_proto.insert(wire), "reason.proto names {wire} twice");
        }
        for &reason in Reason::ALL {
            assert!(
                in_proto.contains(reason.as_str()),
                "{reason} is missing from ErrorReason in reason.proto"
            );
            // And the generated Rust type agrees with the descriptors.
            let name = format!("{PREFIX}{reason}");
            assert!(crate::v1::ErrorReason::from_str_name(&name).is_some());
        }
    }

    /// `docs/ERRORS.md` is where users look a reason up: each one must be in its table, and the
    /// table must name no reason the enum lacks.
    #[test]
    fn every_reason_is_documented_in_errors_md() {
        const ERRORS_MD: &str = include_str!("../../docs/ERRORS.md");
        let documented: HashSet<&str> = ERRORS_MD
            .lines()
            .filter(|line| line.starts_with('|'))
            .filter_map(|line| line.split('|').nth(2))
            .map(|cell| cell.trim().trim_matches('`'))
            .filter(|cell| {
                !cell.is_empty() && cell.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            })
            .collect();
        for &reason in Reason::ALL {
            assert!(
                documented.contains(reason.as_str()),
                "{reason} is not in the table of docs/ERRORS.md"
            );
        }
        for wire in &documented {
            assert!(
                Reason::from_wire(wire).is_some(),
                "docs/ERRORS.md names {wire}, which is no Reason"
            );
        }
    }
}
