//! The one mapping from [`BrokerError`] to what a client sees: a gRPC status whose details carry a
//! `google.rpc.ErrorInfo` (domain `switchboard`, the stable reason), or, inside a `PublishStream`,
//! a [`Refusal`] with the same code and reason. The code is [`BrokerError::code`], the table the
//! audit log names too.

use std::collections::HashMap;

use switchboard_proto::v1::Refusal;
use switchboard_proto::ERROR_DOMAIN;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{BrokerError, Reason};
use crate::security::caller::Ungated;

/// Response metadata naming the leader's public address (`host:port`) on UNAVAILABLE answers.
pub(crate) const LEADER_HINT_HEADER: &str = "x-switchboard-leader";

/// The HTTP status the gateway answers with for a gRPC `code` (and its `reason`), so a browser
/// sees the classification a gRPC client does. A failed compare-and-set is `412 Precondition
/// Failed`, the answer HTTP defines for a stale `If-Match`; a request too large is `413 Content
/// Too Large`.
pub(crate) fn http_status(code: Code, reason: &str) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Aborted if reason == Reason::VersionConflict.as_str() => 412,
        Code::InvalidArgument if reason == Reason::PayloadTooLarge.as_str() => 413,
        Code::Unimplemented if reason == Reason::MethodNotAllowed.as_str() => 405,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

fn metadata(error: &BrokerError) -> HashMap<String, String> {
    let mut metadata = HashMap::new();
    match error {
        BrokerError::NotLeader {
            leader: Some(leader),
        } => {
            metadata.insert("leader_id".to_owned(), leader.to_string());
        }
        BrokerError::LeaderUnavailable {
            leader,
            leader_address,
            ..
        } => {
            if let Some(leader) = leader {
                metadata.insert("leader_id".to_owned(), leader.to_string());
            }
            if let Some(address) = leader_address {
                metadata.insert("leader_address".to_owned(), address.clone());
            }
        }
        BrokerError::StaleUpdate { current_version }
        | BrokerError::VersionConflict {
            current_version, ..
        }
        | BrokerError::ClockSkew {
            current_version, ..
        } => {
            metadata.insert("current_version".to_owned(), current_version.to_string());
        }
        BrokerError::RateLimited(wait) => {
            metadata.insert("retry_after_ms".to_owned(), wait.millis().to_string());
        }
        BrokerError::StartBeyondEnd { next_offset, .. } => {
            metadata.insert("next_offset".to_owned(), next_offset.to_string());
        }
        BrokerError::Schema(mismatch) => {
            metadata.insert("schema_pattern".to_owned(), mismatch.pattern.clone());
            metadata.insert(
                "schema_version".to_owned(),
                mismatch.schema_version().to_owned(),
            );
            metadata.insert(
                "message_schema_version".to_owned(),
                mismatch.message_version.clone(),
            );
            if let Some(first) = mismatch.failures().first() {
                metadata.insert("instance_path".to_owned(), first.instance_path.clone());
                metadata.insert("keyword".to_owned(), first.keyword.clone());
            }
            if !mismatch.failures().is_empty() {
                // All of them (a few, bounded) as one JSON array: metadata values are strings.
                let failures = serde_json::to_string(mismatch.failures()).unwrap_or_default();
                metadata.insert("failures".to_owned(), failures);
            }
        }
        _ => {}
    }
    metadata
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Status {
        let mut details =
            ErrorDetails::with_error_info(error.reason().as_str(), ERROR_DOMAIN, metadata(&error));
        if let BrokerError::RateLimited(wait) = &error {
            // The standard retry hint, for clients that know google.rpc.RetryInfo.
            details.set_retry_info(Some(wait.0));
        }
        let mut status = Status::with_error_details(error.code(), error.to_string(), details);
        // The hint also travels as plain gRPC metadata, for clients that do not decode details.
        if let BrokerError::LeaderUnavailable {
            leader_address: Some(address),
            ..
        } = &error
        {
            if let Ok(value) = address.parse() {
                status.metadata_mut().insert(LEADER_HINT_HEADER, value);
            }
        }
        status
    }
}

/// A handler found no caller: the call bypassed the gate, a wiring mistake (INTERNAL).
impl From<Ungated> for Status {
    fn from(error: Ungated) -> Status {
        Status::internal(error.to_string())
    }
}

/// The refusal of one message in a `PublishStream`.
pub(crate) fn refusal(error: &BrokerError) -> Refusal {
    Refusal {
        code: error.code() as i32,
        reason: error.reason().as_str().to_owned(),
        message: error.to_string(),
        metadata: metadata(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_follows_the_grpc_code() {
        let cases = [
            (BrokerError::invalid(Reason::ChannelInvalid, "x"), 400),
            (BrokerError::ShuttingDown, 503),
            (
                BrokerError::VersionConflict {
                    current_version: 4,
                    expected_version: 3,
                },
                412,
            ),
        ];
        for (error, http) in cases {
            assert_eq!(
                http_status(error.code(), error.reason().as_str()),
                http,
                "{error:?}"
            );
        }
        assert_eq!(http_status(Code::Aborted, "SOMETHING_ELSE"), 409);
        assert_eq!(
            http_status(Code::InvalidArgument, Reason::PayloadTooLarge.as_str()),
            413
        );
        assert_eq!(http_status(Code::ResourceExhausted, "RATE_LIMITED"), 429);
    }

    #[test]
    fn status_carries_code_reason_and_domain() {
        let status = Status::from(BrokerError::invalid(
            Reason::ChannelInvalid,
            "segment 2 is empty",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "segment 2 is empty");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "CHANNEL_INVALID");
        assert_eq!(info.domain, "switchboard");

        let status = Status::from(BrokerError::NotLeader { leader: Some(3) });
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "NOT_LEADER");
        assert_eq!(
            info.metadata.get("leader_id").map(String::as_str),
            Some("3")
        );
    }

    #[test]
    fn leader_unavailable_carries_the_hint() {
        let status = Status::from(BrokerError::LeaderUnavailable {
            reason: Reason::LeaderUnreachable,
            message: "leader 2 did not answer".into(),
            leader: Some(2),
            leader_address: Some("10.0.0.2:7400".into()),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "LEADER_UNREACHABLE");
        assert_eq!(
            info.metadata.get("leader_address").map(String::as_str),
            Some("10.0.0.2:7400")
        );
        assert_eq!(
            status
                .metadata()
                .get(LEADER_HINT_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("10.0.0.2:7400")
        );
        let status = Status::from(BrokerError::LeaderUnavailable {
            reason: Reason::NoLeader,
            message: "no leader".into(),
            leader: None,
            leader_address: None,
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.get_details_error_info().unwrap().reason, "NO_LEADER");
        assert!(status.metadata().get(LEADER_HINT_HEADER).is_none());
    }

    #[test]
    fn refusal_matches_status() {
        let refusal = refusal(&BrokerError::invalid(Reason::PayloadTooLarge, "too big"));
        assert_eq!(refusal.code, Code::InvalidArgument as i32);
        assert_eq!(refusal.reason, "PAYLOAD_TOO_LARGE");
    }
}
