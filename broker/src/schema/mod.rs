//! Payload schemas at the ingestion boundary (docs/SCHEMAS.md).
//!
//! A JSON Schema document is registered for a channel pattern and a semver version, with a
//! policy (`enforce`, `warn`, `off`). Registrations are writes like any other: they go through the
//! log ([`crate::message::SchemaWrite`]), apply stores them in the state store (so they are in
//! snapshots and on every replica), and each node compiles them once into its [`SchemaRegistry`].
//!
//! A publish is checked at the edge, before it is proposed and outside the apply path, against
//! the one registration that applies ([`SchemaRegistry::check`]):
//! - of the registered patterns matching its channel, the most specific
//!   ([`crate::channel::Pattern::specificity`]);
//! - of that pattern's versions, the highest with the message's major version and at or below the
//!   message's version (semver precedence). None such: the version is unknown.
//!
//! A mismatch under `enforce` refuses the message (`SCHEMA_MISMATCH` or `SCHEMA_VERSION_UNKNOWN`,
//! nothing written); under `warn` it is stored. Either way it is drift: counted in
//! `switchboard_schema_drift_total` and announced on [`drift::DRIFT_CHANNEL`] ([`drift`]).
//!
//! - [`registry`]: the compiled registry and the rules above.
//! - [`drift`]: the drift metric and the rate-limited announcements.
//! - [`compat`]: a new version checked against the retained messages it would apply to.

pub(crate) mod compat;
pub(crate) mod drift;
pub(crate) mod registry;

use crate::error::{BrokerError, Reason};
use crate::message::SchemaPolicy;

pub(crate) use registry::SchemaRegistry;

/// Most failures a refusal, a drift event or a compatibility report names: enough to fix the
/// payload, bounded so a badly wrong one cannot make a huge answer.
pub(crate) const MAX_FAILURES: usize = 5;

/// Longest failure message kept, in bytes: a failure may quote the instance.
const MAX_FAILURE_MESSAGE: usize = 200;

impl SchemaPolicy {
    /// The policy's name in the API, the CLI and the docs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SchemaPolicy::Enforce => "enforce",
            SchemaPolicy::Warn => "warn",
            SchemaPolicy::Off => "off",
        }
    }
}

/// Why a payload failed a schema: where in the payload, which keyword, and what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    /// JSON pointer to the failing part of the payload (`""`: the whole payload).
    pub instance_path: String,
    /// The failing JSON Schema keyword (`required`, `type`, …), or `contentType` / `json` when the
    /// payload is not a JSON document at all.
    pub keyword: String,
    /// What failed, readable, cut to a bounded length.
    pub message: String,
}

impl Failure {
    fn new(instance_path: impl Into<String>, keyword: &str, message: String) -> Failure {
        Failure {
            instance_path: instance_path.into(),
            keyword: keyword.to_owned(),
            message: crate::error::shorten_to(&message, MAX_FAILURE_MESSAGE),
        }
    }
}

/// What a message's schema check found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MismatchKind {
    /// The payload fails the schema selected for it.
    Payload {
        /// The selected schema's version.
        schema_version: String,
        /// The first failures, at most [`MAX_FAILURES`].
        failures: Vec<Failure>,
    },
    /// No registered version of the pattern has the message's major at or below its version.
    VersionUnknown {
        /// The versions the pattern has, lowest first.
        registered: Vec<String>,
    },
}

/// A message that does not match the schema registered for its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The message's channel.
    pub channel: String,
    /// The registered pattern that applies.
    pub pattern: String,
    /// The message's `schema_version`.
    pub message_version: String,
    /// The policy in force: `Enforce` (refused) or `Warn` (stored).
    pub policy: SchemaPolicy,
    /// What is wrong.
    pub kind: MismatchKind,
}

impl Mismatch {
    /// The stable reason of the refusal (or of the drift, when only warned).
    pub(crate) fn reason(&self) -> Reason {
        match self.kind {
            MismatchKind::Payload { .. } => Reason::SchemaMismatch,
            MismatchKind::VersionUnknown { .. } => Reason::SchemaVersionUnknown,
        }
    }

    /// The selected schema's version, or `unknown`.
    pub(crate) fn schema_version(&self) -> &str {
        match &self.kind {
            MismatchKind::Payload { schema_version, .. } => schema_version,
            MismatchKind::VersionUnknown { .. } => "unknown",
        }
    }

    /// The failures (none for an unknown version).
    pub(crate) fn failures(&self) -> &[Failure] {
        match &self.kind {
            MismatchKind::Payload { failures, .. } => failures,
            MismatchKind::VersionUnknown { .. } => &[],
        }
    }

    /// The keyword the metric counts: the first failure's, or `version`.
    pub(crate) fn keyword(&self) -> &str {
        match &self.kind {
            MismatchKind::Payload { failures, .. } => failures
                .first()
                .map_or("unknown", |failure| failure.keyword.as_str()),
            MismatchKind::VersionUnknown { .. } => "version",
        }
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            MismatchKind::Payload {
                schema_version,
                failures,
            } => {
                write!(
                    f,
                    "the payload does not match schema {:?} version {schema_version}",
                    self.pattern
                )?;
                for (i, failure) in failures.iter().enumerate() {
                    let path = if failure.instance_path.is_empty() {
                        "the payload"
                    } else {
                        &failure.instance_path
                    };
                    let sep = if i == 0 { ": " } else { "; " };
                    write!(
                        f,
                        "{sep}at {path}: {} ({})",
                        failure.message, failure.keyword
                    )?;
                }
                Ok(())
            }
            MismatchKind::VersionUnknown { registered } => write!(
                f,
                "schema version {} is unknown on {:?}: its registered versions are {}; a message \
                 uses the highest one with its major version at or below its own",
                self.message_version,
                self.pattern,
                registered.join(", ")
            ),
        }
    }
}

/// A registration's pattern, version and policy, checked: a pattern that can match a channel, a
/// semver version, a known policy name.
///
/// # Errors
/// `SCHEMA_INVALID` naming what is wrong.
pub(crate) fn parse_policy(policy: &str) -> Result<SchemaPolicy, BrokerError> {
    match policy {
        "" | "enforce" => Ok(SchemaPolicy::Enforce),
        "warn" => Ok(SchemaPolicy::Warn),
        "off" => Ok(SchemaPolicy::Off),
        other => Err(BrokerError::invalid(
            Reason::SchemaInvalid,
            format!(
                "policy {:?} is not one of enforce, warn, off",
                crate::error::shorten(other)
            ),
        )),
    }
}
