//! `POST /v1/publish` (one message) and `POST /v1/publish/batch` (an array, each message acked or
//! refused on its own, in order). Bodies are JSON whatever their content type, so
//! `navigator.sendBeacon` can post telemetry as a page unloads.

use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_server::Broker as BrokerRpc;

use super::error::HttpError;
use super::{grpc_request, json, read_body, Gateway};
use crate::error::{BrokerError, Reason};

/// One message as JSON. The payload is any JSON value, stored as `application/json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    /// Required: a message without one is more likely a mistake than an intended `null`. Kept
    /// as sent, so it is stored byte for byte and checked as a gRPC publish's payload is.
    payload: Box<RawValue>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    ttl_ms: u64,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    correlation_id: String,
    #[serde(default)]
    causation_id: String,
    #[serde(default)]
    schema_version: String,
    /// Delivered at once to live subscribers and never stored (docs/FLOW.md).
    #[serde(default)]
    ephemeral: bool,
}

impl PublishBody {
    fn into_request(self) -> pb::PublishRequest {
        let payload: Box<str> = self.payload.into();
        pb::PublishRequest {
            channel: self.channel,
            payload: String::from(payload).into_bytes().into(),
            content_type: "application/json".into(),
            schema_version: self.schema_version,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            idempotency_key: self.idempotency_key,
            ttl_ms: self.ttl_ms,
            headers: self.headers,
            hops: 0,
            ephemeral: self.ephemeral,
        }
    }
}

/// `POST /v1/publish`: the ack once the message is durable, or the refusal.
pub(super) async fn single(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let body = read_body(&gateway, &parts.headers, body).await?;
    let message = json::parse::<PublishBody>(&body)?.into_request();
    let ack = gateway
        .inner
        .broker
        .publish(grpc_request(&parts.headers, caller, message))
        .await?
        .into_inner();
    Ok(json::response(StatusCode::OK, &json::ack(&ack)))
}

/// `POST /v1/publish/batch`: an array of messages in, an array of `{"ack": ...}` or
/// `{"error": ...}` out, in the same order. The messages are queued in order (so their offsets
/// follow it) and committed together; each spends one unit of the caller's rate budget.
pub(super) async fn batch(
    State(gateway): State<Gateway>,
    request: Request,
) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let caller = gateway.caller(&parts, None)?;
    let body = read_body(&gateway, &parts.headers, body).await?;
    // Each message is kept as text until it is read on its own, so its payload stays as sent.
    let items: Vec<Box<RawValue>> = json::parse(&body)?;
    let max = gateway.inner.max_batch;
    if items.len() > max {
        return Err(BrokerError::invalid(
            Reason::BatchTooLarge,
            format!(
                "a batch holds at most {max} messages (gateway.max_batch), got {}",
                items.len()
            ),
        )
        .into());
    }
    let mut pending = Vec::with_capacity(items.len());
    for item in items {
        let message = serde_json::from_str::<PublishBody>(item.get())
            .map(PublishBody::into_request)
            .map_err(|e| json::body_error("the message", &e));
        pending.push(match message {
            Ok(message) => gateway.inner.broker.queue_publish(message, &caller).await,
            Err(e) => Box::pin(futures::future::ready(Err(e))),
        });
    }
    let results = futures::future::join_all(pending).await;
    let answers: Vec<Value> = results
        .into_iter()
        .map(|result| match result {
            Ok(ack) => serde_json::json!({ "ack": json::ack(&ack) }),
            Err(e) => serde_json::json!({ "error": HttpError::from(e).parts().1 }),
        })
        .collect();
    Ok(json::response(StatusCode::OK, &Value::Array(answers)))
}
