//! `sb`'s output: one JSON object per line, for acks, deliveries and broker info.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use switchboard_client::{InfoResponse, Message, PublishAck};

/// A protobuf timestamp as RFC 3339 in UTC with milliseconds (`2024-05-01T12:00:00.250Z`);
/// `None` when it is out of range.
pub fn format_timestamp(timestamp: &prost_types::Timestamp) -> Option<String> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::<Utc>::from_timestamp(timestamp.seconds, nanos)
        .map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn format_optional(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    timestamp.and_then(format_timestamp)
}

#[derive(Serialize)]
struct AckLine<'a> {
    offset: u64,
    publish_time: Option<String>,
    correlation_id: &'a str,
}

/// `{"offset":N,"publish_time":"...","correlation_id":"..."}`.
pub fn ack_line(ack: &PublishAck) -> serde_json::Result<String> {
    serde_json::to_string(&AckLine {
        offset: ack.offset,
        publish_time: format_optional(ack.publish_time.as_ref()),
        correlation_id: &ack.correlation_id,
    })
}

#[derive(Serialize)]
struct DeliveryLine<'a> {
    offset: u64,
    channel: &'a str,
    publish_time: Option<String>,
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    causation_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    idempotency_key: &'a str,
    content_type: &'a str,
    schema_version: &'a str,
    ttl_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    headers: BTreeMap<&'a str, &'a str>,
    payload: Cow<'a, str>,
    payload_encoding: &'static str,
}

/// One delivered (or stored) message as a JSON line. The payload is a JSON string with
/// `"payload_encoding":"utf8"` when it is valid UTF-8, else standard base64 with
/// `"payload_encoding":"base64"`. Headers are sorted by name; `causation_id`,
/// `idempotency_key` and `expires_at` are left out when empty.
pub fn message_line(message: &Message) -> serde_json::Result<String> {
    let (payload, payload_encoding) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (Cow::Borrowed(text), "utf8"),
        Err(_) => (
            Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            "base64",
        ),
    };
    serde_json::to_string(&DeliveryLine {
        offset: message.offset,
        channel: &message.channel,
        publish_time: format_optional(message.publish_time.as_ref()),
        correlation_id: &message.correlation_id,
        causation_id: &message.causation_id,
        idempotency_key: &message.idempotency_key,
        content_type: &message.content_type,
        schema_version: &message.schema_version,
        ttl_ms: message.ttl_ms,
        expires_at: format_optional(message.expires_at.as_ref()),
        headers: message
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect(),
        payload,
        payload_encoding,
    })
}

#[derive(Serialize)]
struct InfoLine<'a> {
    version: &'a str,
    node_id: u64,
    last_offset: u64,
    first_offset: u64,
    stored_bytes: u64,
    disk_bytes: u64,
    leader_id: u64,
    term: u64,
    applied_index: u64,
}

/// Every field of the broker's `InfoResponse`, as one JSON object.
pub fn info_line(info: &InfoResponse) -> serde_json::Result<String> {
    serde_json::to_string(&InfoLine {
        version: &info.version,
        node_id: info.node_id,
        last_offset: info.last_offset,
        first_offset: info.first_offset,
        stored_bytes: info.stored_bytes,
        disk_bytes: info.disk_bytes,
        leader_id: info.leader_id,
        term: info.term,
        applied_index: info.applied_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::{json, Value};

    fn timestamp(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    fn parse(line: &str) -> Value {
        assert!(!line.contains('\n'), "one line: {line}");
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        assert_eq!(
            format_timestamp(&prost_types::Timestamp {
                seconds: 1_714_564_800,
                nanos: 250_999_999
            })
            .as_deref(),
            Some("2024-05-01T12:00:00.250Z")
        );
        assert_eq!(
            format_timestamp(&prost_types::Timestamp {
                seconds: 0,
                nanos: 0
            })
            .as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert_eq!(
            format_timestamp(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }

    #[test]
    fn ack_line_keeps_field_order() {
        let line = ack_line(&PublishAck {
            offset: 12,
            publish_time: timestamp(1_714_564_800, 5_000_000),
            correlation_id: "3f2b9a1e-0000-4000-8000-000000000000".to_owned(),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"offset":12,"publish_time":"2024-05-01T12:00:00.005Z","correlation_id":"3f2b9a1e-0000-4000-8000-000000000000"}"#
        );
    }

    fn message(payload: &'static [u8]) -> Message {
        Message {
            offset: 7,
            channel: "crm.contact.updated".to_owned(),
            publish_time: timestamp(1_714_564_800, 0),
            payload: Bytes::from_static(payload),
            content_type: "application/json".to_owned(),
            schema_version: "1.0.0".to_owned(),
            correlation_id: "c-1".to_owned(),
            causation_id: String::new(),
            idempotency_key: String::new(),
            ttl_ms: 0,
            headers: [
                ("tracestate".to_owned(), "x=1".to_owned()),
                ("traceparent".to_owned(), "00-a-b-01".to_owned()),
            ]
            .into_iter()
            .collect(),
            expires_at: None,
        }
    }

    #[test]
    fn utf8_delivery_line() {
        let line = message_line(&message(br#"{"id":42}"#)).unwrap();
        assert_eq!(
            parse(&line),
            json!({
                "offset": 7,
                "channel": "crm.contact.updated",
                "publish_time": "2024-05-01T12:00:00.000Z",
                "correlation_id": "c-1",
                "content_type": "application/json",
                "schema_version": "1.0.0",
                "ttl_ms": 0,
                "headers": {"traceparent": "00-a-b-01", "tracestate": "x=1"},
                "payload": "{\"id\":42}",
                "payload_encoding": "utf8",
            })
        );
        assert!(line.starts_with(r#"{"offset":7,"channel":"crm.contact.updated","#));
        assert!(line.ends_with(r#""payload":"{\"id\":42}","payload_encoding":"utf8"}"#));
    }

    #[test]
    fn base64_delivery_line_with_optional_fields() {
        let mut binary = message(&[0xff, 0x00, 0xfe]);
        binary.causation_id = "cause".to_owned();
        binary.idempotency_key = "key".to_owned();
        binary.content_type = "application/octet-stream".to_owned();
        binary.ttl_ms = 30_000;
        binary.expires_at = timestamp(1_714_564_830, 0);
        let value = parse(&message_line(&binary).unwrap());
        assert_eq!(value["payload"], "/wD+");
        assert_eq!(value["payload_encoding"], "base64");
        assert_eq!(value["causation_id"], "cause");
        assert_eq!(value["idempotency_key"], "key");
        assert_eq!(value["ttl_ms"], 30_000);
        assert_eq!(value["expires_at"], "2024-05-01T12:00:30.000Z");
    }

    #[test]
    fn empty_optional_fields_are_left_out() {
        let value = parse(&message_line(&message(b"")).unwrap());
        let object = value.as_object().unwrap();
        for absent in ["causation_id", "idempotency_key", "expires_at"] {
            assert!(!object.contains_key(absent), "{absent}");
        }
        assert_eq!(value["payload"], "");
        assert_eq!(value["payload_encoding"], "utf8");
    }

    #[test]
    fn info_line_has_every_field() {
        let value = parse(
            &info_line(&InfoResponse {
                version: "0.1.0".to_owned(),
                node_id: 1,
                last_offset: 10,
                first_offset: 2,
                stored_bytes: 100,
                disk_bytes: 4096,
                leader_id: 1,
                term: 3,
                applied_index: 11,
            })
            .unwrap(),
        );
        assert_eq!(
            value,
            json!({
                "version": "0.1.0", "node_id": 1, "last_offset": 10, "first_offset": 2,
                "stored_bytes": 100, "disk_bytes": 4096, "leader_id": 1, "term": 3,
                "applied_index": 11,
            })
        );
    }
}
