//! The client's error type, and how broker statuses map onto it.

use std::collections::{BTreeMap, HashMap};

use switchboard_proto::v1::Refusal;
use switchboard_proto::{code_name, Reason};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong when talking to a Switchboard broker.
///
/// Broker refusals keep the gRPC code and the machine-readable reason from the
/// `google.rpc.ErrorInfo` the broker attaches, so callers can branch on them with
/// [`Error::code`] and [`Error::reason`] (a typed [`Reason`]; [`Error::reason_str`] keeps a reason
/// this client version does not know). A publish error can also be sorted by what the caller
/// should do with [`Error::publish_kind`]. The `Display` form of a status is
/// `"{CODE} {REASON}: {message}"`, for example
/// `INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty`.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made to the broker at `url`.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL that could not be reached.
        url: String,
        /// Why, with the whole chain of causes (for example `connection refused`).
        message: String,
    },
    /// The broker (or the transport underneath) answered a call with a gRPC status.
    #[error("{}", status_line(.code, .reason, .message))]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The `google.rpc.ErrorInfo` reason as sent, for example `CHANNEL_INVALID`, when the
        /// status carried one. Kept as a string so that a reason from a newer broker survives;
        /// [`Error::reason`] gives the typed [`Reason`].
        reason: Option<String>,
        /// The human-readable message of the status.
        message: String,
        /// The `google.rpc.ErrorInfo` metadata (for example a leader hint), empty when absent.
        metadata: BTreeMap<String, String>,
    },
    /// The broker refused one message of a publish stream (the stream itself goes on).
    #[error("{}", refusal_line(.0))]
    Refused(Refusal),
    /// The caller passed something the client rejects before sending anything.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A [`Publisher`](crate::Publisher) was used after its stream ended; read the acks stream to
    /// learn why it ended.
    #[error("the publish stream is closed")]
    Closed,
    /// The client's circuit breaker for this broker is open after repeated failures of the
    /// endpoint: the call was failed at once, without being sent (see
    /// [`CircuitPolicy`](crate::CircuitPolicy)). Nothing was stored.
    #[error(
        "the circuit to {url} is open after repeated failures: failing fast (a probe is let \
         through in {})",
        humantime::format_duration(*.retry_in)
    )]
    CircuitOpen {
        /// The broker endpoint.
        url: String,
        /// How long until the circuit lets a probe through (zero when a probe is out already).
        retry_in: std::time::Duration,
    },
    /// No reply to a [`Client::request`](crate::Client::request) came within its timeout: no
    /// responder was subscribed, the request or its reply was dropped (ephemeral messages are
    /// delivered at most once), or the responder was slower.
    #[error(
        "no reply to a request on {channel} within {}",
        humantime::format_duration(*.timeout)
    )]
    NoReply {
        /// The request's channel.
        channel: String,
        /// How long the request waited.
        timeout: std::time::Duration,
    },
    /// An [`Outbox`](crate::Outbox) is full (by count or by bytes): the message was not queued.
    #[error(
        "the outbox is full ({messages} messages, {bytes} bytes queued; limits {max_messages} \
         messages, {max_bytes} bytes)"
    )]
    OutboxFull {
        /// Messages queued when this one was refused.
        messages: usize,
        /// Their bytes.
        bytes: usize,
        /// The outbox's bound on messages.
        max_messages: usize,
        /// The outbox's bound on bytes.
        max_bytes: usize,
    },
    /// An on-disk outbox ([`Client::outbox_on_disk`](crate::Client::outbox_on_disk)) could not
    /// read or write its file: for a publish, the message was not queued.
    #[error("the outbox file {path}: {message}")]
    OutboxStorage {
        /// The file.
        path: String,
        /// What failed, and the operating system's error.
        message: String,
    },
}

impl Error {
    /// The gRPC code of this error.
    ///
    /// Client-side errors map onto the nearest code: [`Error::Connect`], [`Error::Closed`] and
    /// [`Error::CircuitOpen`] are `UNAVAILABLE`, [`Error::OutboxFull`] is `RESOURCE_EXHAUSTED`,
    /// [`Error::NoReply`] is `DEADLINE_EXCEEDED`, [`Error::InvalidArgument`] is `INVALID_ARGUMENT`,
    /// [`Error::OutboxStorage`] is `INTERNAL`.
    pub fn code(&self) -> Code {
        match self {
            Error::Connect { .. } | Error::Closed | Error::CircuitOpen { .. } => Code::Unavailable,
            Error::OutboxFull { .. } => Code::ResourceExhausted,
            Error::OutboxStorage { .. } => Code::Internal,
            Error::NoReply { .. } => Code::DeadlineExceeded,
            Error::Status { code, .. } => *code,
            Error::Refused(refusal) => Code::from_i32(refusal.code),
            Error::InvalidArgument(_) => Code::InvalidArgument,
        }
    }

    /// The broker's machine-readable reason (`google.rpc.ErrorInfo.reason`), for example
    /// [`Reason::ChannelInvalid`], when there is one this client version knows. `docs/ERRORS.md`
    /// says when each is sent.
    ///
    /// A newer broker may send a reason this version does not know: then this is `None` and
    /// [`Error::reason_str`] still has it.
    ///
    /// # Examples
    /// ```
    /// use switchboard_client::{Error, Reason};
    ///
    /// fn should_reread(error: &Error) -> bool {
    ///     error.reason() == Some(Reason::VersionConflict)
    /// }
    /// # assert!(!should_reread(&Error::Closed));
    /// ```
    pub fn reason(&self) -> Option<Reason> {
        self.reason_str().and_then(Reason::from_wire)
    }

    /// The reason exactly as the broker sent it, known to this client version or not (for logs,
    /// or for a reason newer than this client). `None` when the error carries no reason.
    pub fn reason_str(&self) -> Option<&str> {
        match self {
            Error::Status { reason, .. } => reason.as_deref(),
            Error::Refused(refusal) if !refusal.reason.is_empty() => Some(&refusal.reason),
            _ => None,
        }
    }

    /// One entry of the `google.rpc.ErrorInfo` metadata the broker attached to this error, for
    /// example `leader_id` with `UNAVAILABLE NOT_LEADER`, `current_version` with an entity
    /// refusal, or `instance_path` with `SCHEMA_MISMATCH` (a publish stream's refusal carries the
    /// same entries). `None` when absent, and always for errors raised by the client itself.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        match self {
            Error::Status { metadata, .. } => metadata.get(key).map(String::as_str),
            Error::Refused(refusal) => refusal.metadata.get(key).map(String::as_str),
            _ => None,
        }
    }

    /// The entity's current version, from the `current_version` metadata that the broker attaches
    /// to entity refusals (`ABORTED VERSION_CONFLICT`, `FAILED_PRECONDITION STALE_UPDATE`, ...):
    /// what to pass to [`EntityUpdate::expect_version`](crate::EntityUpdate::expect_version) on a
    /// retry. `None` when absent or not a number.
    pub fn current_version(&self) -> Option<u64> {
        self.metadata("current_version")?.parse().ok()
    }

    /// Whether the broker refused the call's bearer token as expired (`UNAUTHENTICATED
    /// TOKEN_EXPIRED`), as it ends a stream whose token expires: a new token makes the same call
    /// work again. A [`Subscription`](crate::Subscription) does that by itself.
    pub fn is_token_expired(&self) -> bool {
        self.code() == Code::Unauthenticated && self.reason() == Some(Reason::TokenExpired)
    }

    /// This error as a gRPC status, with its reason and metadata in a `google.rpc.ErrorInfo`:
    /// how an error of the token provider reaches the call that needed the token.
    pub(crate) fn to_status(&self) -> tonic::Status {
        match self {
            Error::Status {
                code,
                reason: Some(reason),
                message,
                metadata,
            } => tonic::Status::with_error_details(
                *code,
                message.clone(),
                ErrorDetails::with_error_info(
                    reason.clone(),
                    switchboard_proto::ERROR_DOMAIN,
                    metadata
                        .iter()
                        .map(|(key, value)| (key.clone(), value.clone()))
                        .collect::<HashMap<_, _>>(),
                ),
            ),
            Error::Status { code, message, .. } => tonic::Status::new(*code, message.clone()),
            other => tonic::Status::new(other.code(), other.to_string()),
        }
    }

    /// Whether retrying the same call later may succeed: the connection was lost, the broker is
    /// unavailable or overloaded, or the stream broke for a reason that is not the request's fault.
    ///
    /// `UNAVAILABLE`, `UNKNOWN`, `INTERNAL`, `CANCELLED`, `DEADLINE_EXCEEDED`, `ABORTED` and
    /// `RESOURCE_EXHAUSTED` are transient (a broken HTTP/2 stream surfaces as `UNKNOWN`, `INTERNAL`
    /// or `CANCELLED`); every other code (`INVALID_ARGUMENT`, `PERMISSION_DENIED`,
    /// `UNAUTHENTICATED`, `NOT_FOUND`, `FAILED_PRECONDITION`, ...) is not. The exception is an
    /// entity's `ABORTED VERSION_CONFLICT`: the same compare-and-set fails again, so it is not
    /// transient (read the entity, or use [`Error::current_version`], and decide anew). A refusal,
    /// a client-side invalid argument and a closed publisher are never transient; an open
    /// circuit, a full outbox and a request with no reply are (later, the call may go through).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::CircuitOpen { .. }
            | Error::OutboxFull { .. }
            | Error::NoReply { .. } => true,
            Error::Status { code, .. } => {
                is_transient_code(*code) && self.reason() != Some(Reason::VersionConflict)
            }
            Error::Refused(_)
            | Error::InvalidArgument(_)
            | Error::Closed
            | Error::OutboxStorage { .. } => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let (reason, metadata) = match status.get_error_details().error_info() {
            Some(info) => (
                Some(info.reason.clone()).filter(|reason| !reason.is_empty()),
                info.metadata
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
            None => (None, BTreeMap::new()),
        };
        Error::Status {
            code: status.code(),
            reason,
            message: status.message().to_owned(),
            metadata,
        }
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::Refused(refusal)
    }
}

pub(crate) fn is_transient_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// `"{CODE} {REASON}: {message}"`, leaving out the reason (and its space) when there is none, and
/// the `": {message}"` part when the message is empty.
fn format_status(code: Code, reason: Option<&str>, message: &str) -> String {
    let mut line = code_name(code).to_owned();
    if let Some(reason) = reason.filter(|reason| !reason.is_empty()) {
        line.push(' ');
        line.push_str(reason);
    }
    if !message.is_empty() {
        line.push_str(": ");
        line.push_str(message);
    }
    line
}

fn status_line(code: &Code, reason: &Option<String>, message: &str) -> String {
    format_status(*code, reason.as_deref(), message)
}

fn refusal_line(refusal: &Refusal) -> String {
    format_status(
        Code::from_i32(refusal.code),
        Some(&refusal.reason),
        &refusal.message,
    )
}

/// Joins an error and its chain of sources with `": "`, skipping a cause whose text repeats the
/// previous one.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        if parts.last() != Some(&text) && !text.is_empty() {
            parts.push(text);
        }
        next = current.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_reason(code: Code, reason: &str, message: &str) -> tonic::Status {
        let mut metadata = HashMap::new();
        metadata.insert("leader".to_owned(), "2".to_owned());
        tonic::Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(reason, switchboard_proto::ERROR_DOMAIN, metadata),
        )
    }

    #[test]
    fn display_of_a_status_with_error_info() {
        let error = Error::from(status_with_reason(
            Code::InvalidArgument,
            "CHANNEL_INVALID",
            "channel segment 2 is empty",
        ));
        assert_eq!(
            error.to_string(),
            "INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty"
        );
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(error.reason(), Some(Reason::ChannelInvalid));
        assert_eq!(error.reason_str(), Some("CHANNEL_INVALID"));
        assert!(!error.is_transient());
        match &error {
            Error::Status { metadata, .. } => {
                assert_eq!(metadata.get("leader").map(String::as_str), Some("2"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn current_version_comes_from_the_metadata() {
        let mut metadata = HashMap::new();
        metadata.insert("current_version".to_owned(), "7".to_owned());
        let error = Error::from(tonic::Status::with_error_details(
            Code::Aborted,
            "expected version 3, the entity is at 7",
            ErrorDetails::with_error_info(
                "VERSION_CONFLICT",
                switchboard_proto::ERROR_DOMAIN,
                metadata,
            ),
        ));
        assert_eq!(
            error.to_string(),
            "ABORTED VERSION_CONFLICT: expected version 3, the entity is at 7"
        );
        assert_eq!(error.current_version(), Some(7));
        assert!(!error.is_transient());
        assert_eq!(error.metadata("current_version"), Some("7"));
        assert_eq!(error.metadata("leader_id"), None);

        let other = Error::from(status_with_reason(Code::Unavailable, "NOT_LEADER", "x"));
        assert_eq!(other.current_version(), None);
        assert_eq!(other.metadata("leader"), Some("2"));
        assert_eq!(Error::Closed.metadata("leader"), None);
    }

    #[test]
    fn display_of_a_status_without_error_info() {
        let error = Error::from(tonic::Status::unavailable("no leader"));
        assert_eq!(error.to_string(), "UNAVAILABLE: no leader");
        assert_eq!(error.reason(), None);
        assert_eq!(error.reason_str(), None);
        assert!(error.is_transient());

        let empty = Error::from(tonic::Status::new(Code::PermissionDenied, ""));
        assert_eq!(empty.to_string(), "PERMISSION_DENIED");
    }

    #[test]
    fn display_of_a_refusal() {
        let error = Error::from(Refusal {
            code: 9,
            reason: "LOOP_DETECTED".to_owned(),
            message: "channel a.b already in the causation chain".to_owned(),
            metadata: Default::default(),
        });
        assert_eq!(
            error.to_string(),
            "FAILED_PRECONDITION LOOP_DETECTED: channel a.b already in the causation chain"
        );
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert_eq!(error.reason(), Some(Reason::LoopDetected));
    }

    #[test]
    fn a_reason_unknown_to_this_version_is_kept_as_sent() {
        let error = Error::from(status_with_reason(
            Code::FailedPrecondition,
            "SOMETHING_NEWER",
            "a newer broker's refusal",
        ));
        assert_eq!(error.reason(), None);
        assert_eq!(error.reason_str(), Some("SOMETHING_NEWER"));
        assert_eq!(
            error.to_string(),
            "FAILED_PRECONDITION SOMETHING_NEWER: a newer broker's refusal"
        );
        // An empty refusal reason is no reason.
        let refused = Error::from(Refusal {
            code: 3,
            reason: String::new(),
            message: "x".to_owned(),
            metadata: Default::default(),
        });
        assert_eq!((refused.reason(), refused.reason_str()), (None, None));
    }

    #[test]
    fn code_names_are_screaming_snake() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::from_i32(14)), "UNAVAILABLE");
    }

    #[test]
    fn transient_codes() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(is_transient_code(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            assert!(!is_transient_code(code), "{code:?}");
        }
    }

    #[test]
    fn an_expired_token_is_recognised_and_statuses_round_trip() {
        let expired = Error::from(status_with_reason(
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
            "the token expired at 12:00:00",
        ));
        assert!(expired.is_token_expired());
        assert!(!expired.is_transient());
        let again = Error::from(expired.to_status());
        assert_eq!(again.to_string(), expired.to_string());
        assert_eq!(again.metadata("leader"), Some("2"));

        let invalid = Error::from(status_with_reason(
            Code::Unauthenticated,
            "TOKEN_INVALID",
            "",
        ));
        assert!(!invalid.is_token_expired());
        let denied = Error::from(status_with_reason(
            Code::PermissionDenied,
            "TOKEN_EXPIRED",
            "",
        ));
        assert!(!denied.is_token_expired());

        let connect = Error::Connect {
            url: "https://b:1".to_owned(),
            message: "connection refused".to_owned(),
        };
        let status = connect.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(Error::from(status).is_transient());
    }

    #[test]
    fn connect_error_names_the_url() {
        let error = Error::Connect {
            url: "http://127.0.0.1:1".to_owned(),
            message: "connection refused".to_owned(),
        };
        assert_eq!(
            error.to_string(),
            "cannot connect to http://127.0.0.1:1: connection refused"
        );
        assert_eq!(error.code(), Code::Unavailable);
    }
}
