//! JSON in and out: request bodies parsed whatever their content type (`navigator.sendBeacon`
//! sends `text/plain`), and the JSON shapes of acks, messages and entities.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use switchboard_proto::v1 as pb;

use crate::error::{BrokerError, Reason};

/// A JSON response.
pub(super) fn response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Parses a request body as JSON, whatever its declared type.
///
/// # Errors
/// [`body_error`].
pub(super) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BrokerError> {
    serde_json::from_slice(bytes).map_err(|e| body_error("the request body", &e))
}

/// The refusal of a body (or of one message of a batch, `what`) that does not deserialize:
/// `UNKNOWN_FIELD` for a field the endpoint does not take, `BODY_MALFORMED` for anything else.
pub(super) fn body_error(what: &str, e: &serde_json::Error) -> BrokerError {
    // serde's derive reports a field outside the struct (`deny_unknown_fields`) with this
    // wording, fixed by `serde::de::Error::unknown_field`.
    let message = e.to_string();
    let reason = if message.starts_with("unknown field") {
        Reason::UnknownField
    } else {
        Reason::BodyMalformed
    };
    BrokerError::invalid(
        reason,
        format!("{what} is not what the endpoint takes (docs/GATEWAY.md): {message}"),
    )
}

pub(super) fn time(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A publish ack.
pub(super) fn ack(ack: &pb::PublishAck) -> Value {
    json!({
        "offset": ack.offset,
        "publish_time": time(ack.publish_time.as_ref()),
        "correlation_id": ack.correlation_id,
        "duplicate": ack.duplicate,
    })
}

/// Whether a delivered message's payload is JSON (no content type: the default, JSON).
fn is_json(content_type: &str) -> bool {
    content_type.trim().is_empty() || crate::edge::validate::is_json(content_type)
}

/// A delivered message. A JSON payload is inlined as `payload`; any other is `payload_base64`.
pub(super) fn message(message: &pb::Message) -> Value {
    let mut out = Map::new();
    out.insert("offset".into(), json!(message.offset));
    out.insert("channel".into(), json!(message.channel));
    out.insert("publish_time".into(), time(message.publish_time.as_ref()));
    match serde_json::from_slice::<Value>(&message.payload) {
        Ok(payload) if is_json(&message.content_type) => {
            out.insert("payload".into(), payload);
        }
        _ => {
            use base64::Engine as _;
            out.insert(
                "payload_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            );
        }
    }
    out.insert("content_type".into(), json!(message.content_type));
    out.insert("schema_version".into(), json!(message.schema_version));
    out.insert("correlation_id".into(), json!(message.correlation_id));
    out.insert("causation_id".into(), json!(message.causation_id));
    out.insert("headers".into(), json!(message.headers));
    if message.redelivery > 0 {
        out.insert("redelivery".into(), json!(message.redelivery));
    }
    if message.ephemeral {
        out.insert("ephemeral".into(), json!(true));
    }
    Value::Object(out)
}

/// An entity: its key, merged fields, version and ETag.
pub(super) fn entity(entity: &pb::Entity) -> Value {
    let key = entity.key.clone().unwrap_or_default();
    let fields = serde_json::from_slice::<Value>(&entity.fields).unwrap_or(Value::Null);
    json!({
        "type": key.r#type,
        "id": key.id,
        "fields": fields,
        "version": entity.version,
        "etag": entity.etag,
        "deleted": entity.deleted,
        "updated_at": time(entity.updated_at.as_ref()),
        "last_stamp": entity.last_stamp.as_ref().map(|s| json!({
            "timestamp_ms": s.timestamp_ms,
            "version": s.version,
            "writer": s.writer,
        })),
    })
}
