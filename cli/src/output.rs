//! `sb`'s output: one JSON object per line, for acks, deliveries and gaps, broker info, live
//! subscriptions, durable consumers and entities.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use switchboard_client::{
    ClusterStatus, ConsumerInfo, Entity, EntityEvent, EntityExt as _, EntityRead, FlowPolicy, Gap,
    GapReason, InfoResponse, Message, PublishAck, SubscriptionInfo,
};

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

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

/// A `FlowPolicy` field as text: `lossless` (also for `UNSPECIFIED`), `conflate`,
/// `drop-oldest`, or `unknown(N)` for a value this client does not know.
fn policy_text(value: i32) -> Cow<'static, str> {
    match FlowPolicy::from_proto(value) {
        Some(policy) => Cow::Borrowed(policy.name()),
        None => Cow::Owned(format!("unknown({value})")),
    }
}

#[derive(Serialize)]
struct AckLine<'a> {
    offset: u64,
    publish_time: Option<String>,
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    duplicate: bool,
}

/// `{"offset":N,"publish_time":"...","correlation_id":"..."}`, with `"duplicate":true` at the end
/// only when the broker answered that the publish was a retry of a stored message.
pub fn ack_line(ack: &PublishAck) -> serde_json::Result<String> {
    serde_json::to_string(&AckLine {
        offset: ack.offset,
        publish_time: format_optional(ack.publish_time.as_ref()),
        correlation_id: &ack.correlation_id,
        duplicate: ack.duplicate,
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
    #[serde(skip_serializing_if = "is_zero")]
    hops: u32,
    #[serde(skip_serializing_if = "is_zero_u64")]
    skipped: u64,
    #[serde(skip_serializing_if = "is_zero")]
    redelivery: u32,
    content_type: &'a str,
    schema_version: &'a str,
    ttl_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    headers: BTreeMap<&'a str, &'a str>,
    payload: Payload<'a>,
    payload_encoding: &'static str,
}

/// A payload in a JSON line: the JSON document itself, or a string.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload<'a> {
    Json(Box<RawValue>),
    Text(Cow<'a, str>),
}

/// Whether a content type says JSON: `application/json` (with parameters or not), a `+json`
/// suffix such as `application/cloudevents+json`, or none (the broker's default is JSON).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.is_empty() || essence == "application/json" || essence.ends_with("+json")
}

/// One delivered (or stored) message as a JSON line. A payload whose content type is JSON and
/// which parses as JSON is the document itself, on one line, with `"payload_encoding":"json"`
/// (its numbers and strings as sent, whitespace between tokens left out); any other payload is a
/// JSON string with `"payload_encoding":"utf8"` when it is valid UTF-8, else standard base64 with
/// `"payload_encoding":"base64"`. Headers are sorted by name; `causation_id`, `idempotency_key`,
/// `hops`, `skipped`, `redelivery` and `expires_at` are left out when empty (or 0).
pub fn message_line(message: &Message) -> serde_json::Result<String> {
    let json = (is_json_content_type(&message.content_type)
        && crate::json_text::is_json(&message.payload))
    .then(|| std::str::from_utf8(&message.payload).ok())
    .flatten()
    .map(|text| RawValue::from_string(crate::json_text::compact(text)))
    .transpose()?;
    let (payload, payload_encoding) = match (json, std::str::from_utf8(&message.payload)) {
        (Some(document), _) => (Payload::Json(document), "json"),
        (None, Ok(text)) => (Payload::Text(Cow::Borrowed(text)), "utf8"),
        (None, Err(_)) => (
            Payload::Text(Cow::Owned(
                base64::engine::general_purpose::STANDARD.encode(&message.payload),
            )),
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
        hops: message.hops,
        skipped: message.skipped,
        redelivery: message.redelivery,
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
struct GapFields {
    from_offset: u64,
    to_offset: u64,
    count: u64,
    reason: &'static str,
}

#[derive(Serialize)]
struct GapLine {
    gap: GapFields,
}

/// A gap event of a subscription:
/// `{"gap":{"from_offset":N,"to_offset":N,"count":N,"reason":"dropped"|"retention"}}` (reason
/// `unspecified` for a value this client does not know).
pub fn gap_line(gap: &Gap) -> serde_json::Result<String> {
    let reason = match GapReason::try_from(gap.reason) {
        Ok(GapReason::Dropped) => "dropped",
        Ok(GapReason::Retention) => "retention",
        Ok(GapReason::Unspecified) | Err(_) => "unspecified",
    };
    serde_json::to_string(&GapLine {
        gap: GapFields {
            from_offset: gap.from_offset,
            to_offset: gap.to_offset,
            count: gap.count,
            reason,
        },
    })
}

#[derive(Serialize)]
struct SubscriptionLine<'a> {
    subscription_id: u64,
    pattern: &'a str,
    policy: Cow<'static, str>,
    durable_name: &'a str,
    next_offset: u64,
    lagging: bool,
    buffered_messages: u64,
    buffered_bytes: u64,
    peak_buffered_bytes: u64,
    buffered_bytes_limit: u64,
    pending: u64,
    delivered: u64,
    slow_switches: u64,
    waiting_for_credit: bool,
}

/// Every field of a live subscription's `SubscriptionInfo`, as one JSON object, with the policy
/// as text (`lossless`, `conflate`, `drop-oldest`) and `durable_name` empty when not durable.
pub fn subscription_line(info: &SubscriptionInfo) -> serde_json::Result<String> {
    serde_json::to_string(&SubscriptionLine {
        subscription_id: info.subscription_id,
        pattern: &info.pattern,
        policy: policy_text(info.policy),
        durable_name: &info.durable_name,
        next_offset: info.next_offset,
        lagging: info.lagging,
        buffered_messages: info.buffered_messages,
        buffered_bytes: info.buffered_bytes,
        peak_buffered_bytes: info.peak_buffered_bytes,
        buffered_bytes_limit: info.buffered_bytes_limit,
        pending: info.pending,
        delivered: info.delivered,
        slow_switches: info.slow_switches,
        waiting_for_credit: info.waiting_for_credit,
    })
}

#[derive(Serialize)]
struct ConsumerLine<'a> {
    name: &'a str,
    pattern: &'a str,
    policy: Cow<'static, str>,
    acked_offset: u64,
    pending: u64,
    redeliveries: u64,
    connected: bool,
    created_at: Option<String>,
}

/// A durable consumer as one JSON object: name, pattern, policy (as text), acked_offset,
/// pending, redeliveries, connected and created_at (RFC 3339, UTC, millis).
pub fn consumer_line(consumer: &ConsumerInfo) -> serde_json::Result<String> {
    serde_json::to_string(&ConsumerLine {
        name: &consumer.name,
        pattern: &consumer.pattern,
        policy: policy_text(consumer.policy),
        acked_offset: consumer.acked_offset,
        pending: consumer.pending,
        redeliveries: consumer.redeliveries,
        connected: consumer.connected,
        created_at: format_optional(consumer.created_at.as_ref()),
    })
}

#[derive(Serialize)]
struct DeletedLine<'a> {
    deleted: &'a str,
}

/// The answer of `sb consumer delete`: `{"deleted":"NAME"}`.
pub fn deleted_line(name: &str) -> serde_json::Result<String> {
    serde_json::to_string(&DeletedLine { deleted: name })
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
    loops_detected: u64,
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
        loops_detected: info.loops_detected,
    })
}

#[derive(Serialize)]
struct ClusterNodeLine<'a> {
    id: u64,
    role: &'a str,
    raft_address: &'a str,
    public_address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    matched_index: Option<u64>,
}

#[derive(Serialize)]
struct ClusterLine<'a> {
    leader_id: u64,
    term: u64,
    applied_index: u64,
    nodes: Vec<ClusterNodeLine<'a>>,
}

/// The role as `sb` names it: a raft learner is a read replica (docs/CLUSTER.md).
fn role_name(wire: &str) -> &str {
    match wire {
        "learner" => "replica",
        other => other,
    }
}

/// `sb cluster ...`: the cluster as the leader sees it.
pub fn cluster_line(status: &ClusterStatus) -> serde_json::Result<String> {
    serde_json::to_string(&ClusterLine {
        leader_id: status.leader_id,
        term: status.term,
        applied_index: status.applied_index,
        nodes: status
            .nodes
            .iter()
            .map(|n| ClusterNodeLine {
                id: n.id,
                role: role_name(&n.role),
                raft_address: &n.raft_address,
                public_address: &n.public_address,
                matched_index: n.matched_index,
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct StampLine<'a> {
    timestamp_ms: u64,
    version: u64,
    writer: &'a str,
}

#[derive(Serialize)]
struct EntityLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'static str>,
    #[serde(rename = "type")]
    entity_type: &'a str,
    id: &'a str,
    version: u64,
    etag: &'a str,
    deleted: bool,
    updated_at: Option<String>,
    fields: serde_json::Value,
    last_stamp: Option<StampLine<'a>>,
}

fn entity_object(event: Option<&'static str>, entity: &Entity) -> serde_json::Result<String> {
    let fields = entity
        .fields_json()
        .map_err(|error| <serde_json::Error as serde::ser::Error>::custom(error.to_string()))?;
    serde_json::to_string(&EntityLine {
        event,
        entity_type: entity.entity_type(),
        id: entity.entity_id(),
        version: entity.version,
        etag: &entity.etag,
        deleted: entity.deleted,
        updated_at: format_optional(entity.updated_at.as_ref()),
        fields,
        last_stamp: entity.last_stamp.as_ref().map(|stamp| StampLine {
            timestamp_ms: stamp.timestamp_ms,
            version: stamp.version,
            writer: &stamp.writer,
        }),
    })
}

/// An entity as one JSON object: `{"type","id","version","etag","deleted","updated_at","fields",
/// "last_stamp":{"timestamp_ms","version","writer"}}`, with `fields` the JSON object itself and
/// `updated_at` in RFC 3339, UTC, millis.
///
/// # Errors
/// When the entity's fields are not valid JSON.
pub fn entity_line(entity: &Entity) -> serde_json::Result<String> {
    entity_object(None, entity)
}

/// The answer of `sb entity get`: the entity, or `{"not_modified":true}`.
///
/// # Errors
/// As [`entity_line`].
pub fn entity_read_line(read: &EntityRead) -> serde_json::Result<String> {
    match read {
        EntityRead::Modified(entity) => entity_line(entity),
        EntityRead::NotModified => Ok(r#"{"not_modified":true}"#.to_owned()),
    }
}

#[derive(Serialize)]
struct SnapshotCompleteLine {
    event: &'static str,
    entities: u64,
}

/// One event of `sb entity watch`: `{"event":"snapshot",...}` or `{"event":"change",...}` with
/// the entity's fields as in [`entity_line`], or `{"event":"snapshot_complete","entities":N}`.
///
/// # Errors
/// As [`entity_line`].
pub fn entity_event_line(event: &EntityEvent) -> serde_json::Result<String> {
    match event {
        EntityEvent::Snapshot(entity) => entity_object(Some("snapshot"), entity),
        EntityEvent::Change(entity) => entity_object(Some("change"), entity),
        EntityEvent::SnapshotComplete(entities) => serde_json::to_string(&SnapshotCompleteLine {
            event: "snapshot_complete",
            entities: *entities,
        }),
    }
}

/// A schema policy as text: `enforce` (also for unset), `warn`, `off`.
fn schema_policy_text(value: i32) -> &'static str {
    use switchboard_client::proto::SchemaPolicy;
    match SchemaPolicy::try_from(value) {
        Ok(SchemaPolicy::Warn) => "warn",
        Ok(SchemaPolicy::Off) => "off",
        _ => "enforce",
    }
}

/// A registration as JSON: its document as the JSON it is (stored as sent, checked as JSON).
fn schema_value(schema: &switchboard_client::proto::Schema) -> serde_json::Value {
    let mut value = serde_json::json!({
        "pattern": schema.pattern,
        "version": schema.version,
        "policy": schema_policy_text(schema.policy),
        "registered_at": format_optional(schema.registered_at.as_ref()),
    });
    if !schema.registered_by.is_empty() {
        value["registered_by"] = schema.registered_by.clone().into();
    }
    if !schema.document.is_empty() {
        value["document"] = serde_json::from_str(&schema.document)
            .unwrap_or_else(|_| serde_json::Value::String(schema.document.clone()));
    }
    value
}

fn failures_value(failures: &[switchboard_client::proto::SchemaFailure]) -> serde_json::Value {
    failures
        .iter()
        .map(|f| {
            serde_json::json!({
                "instance_path": f.instance_path,
                "keyword": f.keyword,
                "message": f.message,
            })
        })
        .collect()
}

/// `sb schema get` and `list`: one registration.
pub fn schema_line(schema: &switchboard_client::proto::Schema) -> serde_json::Result<String> {
    serde_json::to_string(&schema_value(schema))
}

/// `sb schema put`: the registration, whether it replaced one, and the compatibility report.
pub fn schema_put_line(
    answer: &switchboard_client::proto::PutSchemaResponse,
) -> serde_json::Result<String> {
    let mut value = answer.schema.as_ref().map(schema_value).unwrap_or_default();
    value["replaced"] = answer.replaced.into();
    if let Some(report) = &answer.compatibility {
        value["compatibility"] = serde_json::json!({
            "checked": report.checked,
            "failing": report.failing,
            "truncated": report.truncated,
            "examples": report.examples.iter().map(|m| serde_json::json!({
                "offset": m.offset,
                "channel": m.channel,
                "schema_version": m.schema_version,
                "failures": failures_value(&m.failures),
            })).collect::<Vec<_>>(),
        });
    }
    serde_json::to_string(&value)
}

/// `sb schema check`: whether a publish would pass, and what it would meet.
pub fn schema_check_line(
    answer: &switchboard_client::proto::CheckSchemaResponse,
) -> serde_json::Result<String> {
    let mut value = serde_json::json!({ "valid": answer.valid });
    if !answer.pattern.is_empty() {
        value["pattern"] = answer.pattern.clone().into();
        value["policy"] = schema_policy_text(answer.policy).into();
    }
    if !answer.schema_version.is_empty() {
        value["schema_version"] = answer.schema_version.clone().into();
    }
    if !answer.reason.is_empty() {
        value["reason"] = answer.reason.clone().into();
        value["failures"] = failures_value(&answer.failures);
    }
    serde_json::to_string(&value)
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
            duplicate: false,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"offset":12,"publish_time":"2024-05-01T12:00:00.005Z","correlation_id":"3f2b9a1e-0000-4000-8000-000000000000"}"#
        );
    }

    #[test]
    fn ack_line_says_duplicate_only_when_it_is() {
        let line = ack_line(&PublishAck {
            offset: 12,
            publish_time: timestamp(1_714_564_800, 0),
            correlation_id: "c".to_owned(),
            duplicate: true,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"offset":12,"publish_time":"2024-05-01T12:00:00.000Z","correlation_id":"c","duplicate":true}"#
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
            hops: 0,
            skipped: 0,
            redelivery: 0,
            ephemeral: false,
        }
    }

    #[test]
    fn json_delivery_line() {
        let line = message_line(&message(b"{\n  \"id\": 42,\n  \"tags\": [\"a\"]\n}\n")).unwrap();
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
                "payload": {"id": 42, "tags": ["a"]},
                "payload_encoding": "json",
            })
        );
        assert!(line.starts_with(r#"{"offset":7,"channel":"crm.contact.updated","#));
        assert!(
            line.ends_with(r#""payload":{"id":42,"tags":["a"]},"payload_encoding":"json"}"#),
            "{line}"
        );
        // A number past what a double holds exactly stays as it was sent.
        let line = message_line(&message(br#"{"big":123456789012345678901}"#)).unwrap();
        assert!(
            line.contains(r#""payload":{"big":123456789012345678901},"#),
            "{line}"
        );
    }

    #[test]
    fn utf8_delivery_lines_for_text_and_for_json_that_is_not() {
        let mut text = message(br#"{"id":42}"#);
        text.content_type = "text/plain".to_owned();
        let line = message_line(&text).unwrap();
        assert!(
            line.ends_with(r#""payload":"{\"id\":42}","payload_encoding":"utf8"}"#),
            "{line}"
        );
        // Said to be JSON, but it does not parse (a broker with the check off): a string.
        let value = parse(&message_line(&message(b"{oops")).unwrap());
        assert_eq!(value["payload"], "{oops");
        assert_eq!(value["payload_encoding"], "utf8");
        // A JSON string payload is a JSON string, told apart by its encoding.
        let value = parse(&message_line(&message(br#""hi""#)).unwrap());
        assert_eq!(
            (value["payload"].clone(), value["payload_encoding"].clone()),
            (json!("hi"), json!("json"))
        );
    }

    #[test]
    fn json_content_types() {
        for json in [
            "",
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/cloudevents+json",
        ] {
            assert!(is_json_content_type(json), "{json}");
        }
        for other in [
            "text/plain",
            "application/octet-stream",
            "application/jsonl",
        ] {
            assert!(!is_json_content_type(other), "{other}");
        }
    }

    #[test]
    fn base64_delivery_line_with_optional_fields() {
        let mut binary = message(&[0xff, 0x00, 0xfe]);
        binary.causation_id = "cause".to_owned();
        binary.idempotency_key = "key".to_owned();
        binary.content_type = "application/octet-stream".to_owned();
        binary.ttl_ms = 30_000;
        binary.hops = 3;
        binary.expires_at = timestamp(1_714_564_830, 0);
        let value = parse(&message_line(&binary).unwrap());
        assert_eq!(value["payload"], "/wD+");
        assert_eq!(value["payload_encoding"], "base64");
        assert_eq!(value["causation_id"], "cause");
        assert_eq!(value["idempotency_key"], "key");
        assert_eq!(value["ttl_ms"], 30_000);
        assert_eq!(value["hops"], 3);
        assert_eq!(value["expires_at"], "2024-05-01T12:00:30.000Z");
    }

    #[test]
    fn empty_optional_fields_are_left_out() {
        let value = parse(&message_line(&message(b"")).unwrap());
        let object = value.as_object().unwrap();
        for absent in [
            "causation_id",
            "idempotency_key",
            "hops",
            "skipped",
            "redelivery",
            "expires_at",
        ] {
            assert!(!object.contains_key(absent), "{absent}");
        }
        assert_eq!(value["payload"], "");
        assert_eq!(value["payload_encoding"], "utf8");
    }

    #[test]
    fn flow_fields_of_a_delivery() {
        let mut conflated = message(b"{}");
        conflated.skipped = 4;
        conflated.redelivery = 2;
        let line = message_line(&conflated).unwrap();
        assert!(
            line.contains(r#""skipped":4,"redelivery":2,"content_type""#),
            "{line}"
        );
    }

    #[test]
    fn gap_lines() {
        let gap = Gap {
            from_offset: 10,
            to_offset: 19,
            count: 7,
            reason: GapReason::Dropped as i32,
        };
        assert_eq!(
            gap_line(&gap).unwrap(),
            r#"{"gap":{"from_offset":10,"to_offset":19,"count":7,"reason":"dropped"}}"#
        );
        let retention = Gap {
            reason: GapReason::Retention as i32,
            count: 0,
            ..gap
        };
        assert_eq!(
            parse(&gap_line(&retention).unwrap())["gap"]["reason"],
            "retention"
        );
        let unknown = Gap { reason: 9, ..gap };
        assert_eq!(
            parse(&gap_line(&unknown).unwrap())["gap"]["reason"],
            "unspecified"
        );
    }

    #[test]
    fn subscription_line_has_every_field() {
        let value = parse(
            &subscription_line(&SubscriptionInfo {
                subscription_id: 3,
                pattern: "a.>".to_owned(),
                policy: switchboard_client::proto::FlowPolicy::DropOldest as i32,
                durable_name: String::new(),
                next_offset: 11,
                lagging: true,
                buffered_messages: 2,
                buffered_bytes: 300,
                peak_buffered_bytes: 900,
                buffered_bytes_limit: 4096,
                pending: 1,
                delivered: 10,
                slow_switches: 1,
                waiting_for_credit: true,
            })
            .unwrap(),
        );
        assert_eq!(
            value,
            json!({
                "subscription_id": 3, "pattern": "a.>", "policy": "drop-oldest",
                "durable_name": "", "next_offset": 11, "lagging": true, "buffered_messages": 2,
                "buffered_bytes": 300, "peak_buffered_bytes": 900, "buffered_bytes_limit": 4096,
                "pending": 1, "delivered": 10, "slow_switches": 1,
                "waiting_for_credit": true,
            })
        );
    }

    #[test]
    fn consumer_lines() {
        let consumer = ConsumerInfo {
            name: "billing".to_owned(),
            pattern: "orders.>".to_owned(),
            policy: 0,
            acked_offset: 41,
            pending: 2,
            redeliveries: 5,
            connected: true,
            created_at: timestamp(1_714_564_800, 250_000_000),
        };
        assert_eq!(
            consumer_line(&consumer).unwrap(),
            concat!(
                r#"{"name":"billing","pattern":"orders.>","policy":"lossless","acked_offset":41,"#,
                r#""pending":2,"redeliveries":5,"connected":true,"#,
                r#""created_at":"2024-05-01T12:00:00.250Z"}"#
            )
        );
        let odd = ConsumerInfo {
            policy: 42,
            created_at: None,
            ..consumer
        };
        let value = parse(&consumer_line(&odd).unwrap());
        assert_eq!(value["policy"], "unknown(42)");
        assert_eq!(value["created_at"], Value::Null);
        assert_eq!(deleted_line("billing").unwrap(), r#"{"deleted":"billing"}"#);
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
                loops_detected: 2,
            })
            .unwrap(),
        );
        assert_eq!(
            value,
            json!({
                "version": "0.1.0", "node_id": 1, "last_offset": 10, "first_offset": 2,
                "stored_bytes": 100, "disk_bytes": 4096, "leader_id": 1, "term": 3,
                "applied_index": 11, "loops_detected": 2,
            })
        );
    }

    fn entity() -> Entity {
        Entity {
            key: Some(switchboard_client::EntityKey {
                r#type: "contact".to_owned(),
                id: "42".to_owned(),
            }),
            fields: Bytes::from_static(br#"{"name":"Ada","tags":["a"]}"#),
            version: 3,
            etag: "\"3-abc\"".to_owned(),
            deleted: false,
            updated_at: timestamp(1_714_564_800, 250_000_000),
            last_stamp: Some(switchboard_client::WriteStamp {
                timestamp_ms: 1_714_564_800_100,
                version: 2,
                writer: "panel-7".to_owned(),
            }),
        }
    }

    #[test]
    fn entity_line_has_every_field_with_fields_as_json() {
        let line = entity_line(&entity()).unwrap();
        assert!(line.starts_with(r#"{"type":"contact","id":"42","version":3,"#));
        assert_eq!(
            parse(&line),
            json!({
                "type": "contact",
                "id": "42",
                "version": 3,
                "etag": "\"3-abc\"",
                "deleted": false,
                "updated_at": "2024-05-01T12:00:00.250Z",
                "fields": {"name": "Ada", "tags": ["a"]},
                "last_stamp": {"timestamp_ms": 1_714_564_800_100_u64, "version": 2, "writer": "panel-7"},
            })
        );

        let mut deleted = entity();
        deleted.fields = Bytes::new();
        deleted.deleted = true;
        let value = parse(&entity_line(&deleted).unwrap());
        assert_eq!(
            (value["fields"].clone(), value["deleted"].clone()),
            (json!({}), json!(true))
        );

        let mut broken = entity();
        broken.fields = Bytes::from_static(b"{");
        assert!(entity_line(&broken).is_err());
    }

    #[test]
    fn entity_reads_and_events() {
        assert_eq!(
            entity_read_line(&EntityRead::NotModified).unwrap(),
            r#"{"not_modified":true}"#
        );
        assert_eq!(
            parse(&entity_read_line(&EntityRead::Modified(entity())).unwrap())["version"],
            3
        );
        let snapshot = entity_event_line(&EntityEvent::Snapshot(entity())).unwrap();
        assert!(snapshot.starts_with(r#"{"event":"snapshot","type":"contact","id":"42","#));
        let change = parse(&entity_event_line(&EntityEvent::Change(entity())).unwrap());
        assert_eq!(change["event"], "change");
        assert_eq!(change["fields"]["name"], "Ada");
        assert_eq!(
            entity_event_line(&EntityEvent::SnapshotComplete(2)).unwrap(),
            r#"{"event":"snapshot_complete","entities":2}"#
        );
    }
}
