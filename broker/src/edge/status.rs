//! The one mapping from [`BrokerError`] to what a client sees: a gRPC status whose details carry a
//! `google.rpc.ErrorInfo` (domain `switchboard`, the stable reason), or, inside a `PublishStream`,
//! a [`Refusal`] with the same code and reason.

use std::collections::HashMap;

use switchboard_proto::v1::Refusal;
use switchboard_proto::ERROR_DOMAIN;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::BrokerError;

/// The gRPC code for an error.
pub fn code(error: &BrokerError) -> Code {
    match error {
        BrokerError::Invalid { .. } => Code::InvalidArgument,
        BrokerError::LoopDetected { .. }
        | BrokerError::StaleUpdate { .. }
        | BrokerError::ClockSkew { .. } => Code::FailedPrecondition,
        BrokerError::VersionConflict { .. } => Code::Aborted,
        BrokerError::EntityNotFound { .. } | BrokerError::NotFound { .. } => Code::NotFound,
        BrokerError::Exhausted { .. } => Code::ResourceExhausted,
        BrokerError::Precondition { .. } => Code::FailedPrecondition,
        BrokerError::NotLeader { .. } | BrokerError::ShuttingDown => Code::Unavailable,
        BrokerError::Storage(_) | BrokerError::Consensus(_) => Code::Internal,
        BrokerError::Corrupt(_) => Code::DataLoss,
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
        BrokerError::StaleUpdate { current_version }
        | BrokerError::VersionConflict {
            current_version, ..
        }
        | BrokerError::ClockSkew {
            current_version, ..
        } => {
            metadata.insert("current_version".to_owned(), current_version.to_string());
        }
        _ => {}
    }
    metadata
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Status {
        let details =
            ErrorDetails::with_error_info(error.reason().as_str(), ERROR_DOMAIN, metadata(&error));
        Status::with_error_details(code(&error), error.to_string(), details)
    }
}

/// The refusal of one message in a `PublishStream`.
pub fn refusal(error: &BrokerError) -> Refusal {
    Refusal {
        code: code(error) as i32,
        reason: error.reason().as_str().to_owned(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

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
    fn refusal_matches_status() {
        let refusal = refusal(&BrokerError::invalid(Reason::PayloadTooLarge, "too big"));
        assert_eq!(refusal.code, Code::InvalidArgument as i32);
        assert_eq!(refusal.reason, "PAYLOAD_TOO_LARGE");
    }
}
