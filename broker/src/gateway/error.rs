//! Errors as JSON: `{"code", "reason", "message", "metadata"}`, where `code` is the gRPC code's
//! name and `reason` the stable reason of the status's `ErrorInfo`, and the HTTP status comes
//! from [`crate::edge::status::http_status`]. Every error reaches here as the gRPC [`Status`] the
//! one mapping in `edge/status.rs` made, so both protocols answer alike.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use switchboard_proto::code_name;
use tonic::Status;
use tonic_types::StatusExt;

use crate::edge::status::http_status;
use crate::error::BrokerError;

/// A refusal on its way to an HTTP client.
#[derive(Debug)]
pub(super) struct HttpError(pub Status);

impl From<Status> for HttpError {
    fn from(status: Status) -> Self {
        HttpError(status)
    }
}

impl From<BrokerError> for HttpError {
    fn from(error: BrokerError) -> Self {
        HttpError(Status::from(error))
    }
}

impl HttpError {
    /// The JSON body and HTTP status; also the shape of a refused message in a batch.
    pub(super) fn parts(&self) -> (u16, serde_json::Value, Option<u64>) {
        let info = self.0.get_details_error_info();
        let reason = info.as_ref().map(|i| i.reason.clone()).unwrap_or_default();
        let metadata = info.map(|i| i.metadata).unwrap_or_default();
        let retry_after_ms = metadata
            .get("retry_after_ms")
            .and_then(|ms| ms.parse::<u64>().ok());
        let http = http_status(self.0.code(), &reason);
        let body = serde_json::json!({
            "code": code_name(self.0.code()),
            "reason": reason,
            "message": self.0.message(),
            "metadata": metadata,
        });
        (http, body, retry_after_ms)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (http, body, retry_after_ms) = self.parts();
        let status = StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = super::json::response(status, &body);
        if let Some(ms) = retry_after_ms {
            // Retry-After counts whole seconds; rounding up never invites an early retry.
            let seconds = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
