//! Validation at the edge: every rule a request must pass before anything is written, each refusal
//! an INVALID_ARGUMENT with its own stable reason. A request that passes becomes a [`NewMessage`]
//! with its defaults filled in (content type, schema version, a generated correlation id).

use std::collections::BTreeMap;

use switchboard_proto::v1 as pb;
use switchboard_proto::v1::start_position::Position;

use crate::channel::{self, ChannelLimits, Pattern};
use crate::config::Limits;
use crate::error::{shorten, BrokerError, Reason};
use crate::message::NewMessage;

/// Content type used when a publisher sends none.
pub(crate) const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// Schema version used when a publisher sends none.
pub(crate) const DEFAULT_SCHEMA_VERSION: &str = "1.0.0";
/// Longest accepted content type.
const MAX_CONTENT_TYPE_LEN: usize = 128;
/// Longest accepted header name.
const MAX_HEADER_NAME_LEN: usize = 128;

pub(crate) use crate::fanout::subscription::Start;

/// Applies the configured limits to requests.
#[derive(Debug, Clone)]
pub(crate) struct Validator {
    limits: Limits,
    channel_limits: ChannelLimits,
}

fn invalid(reason: Reason, message: impl Into<String>) -> BrokerError {
    BrokerError::invalid(reason, message)
}

/// Whether a media type is JSON: `application/json` or any `+json` suffix, parameters ignored.
pub(crate) fn is_json(content_type: &str) -> bool {
    // Without allocating: apply asks this of every message a KPI view reads.
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let suffix = essence
        .len()
        .checked_sub(5)
        .and_then(|at| essence.get(at..));
    essence.eq_ignore_ascii_case("application/json")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

/// The deepest nesting of arrays and objects a JSON text may have, wherever it enters (a message
/// payload, entity fields): well below serde_json's own limit (128), so a checked value still
/// parses inside the documents that embed it (a gateway body, an entity's state document).
pub(crate) const MAX_JSON_DEPTH: usize = 64;

/// Checks that `bytes` are one JSON text as every consumer can read it: UTF-8 throughout
/// (RFC 8259 §8.1), arrays and objects nested at most [`MAX_JSON_DEPTH`] deep, and every number
/// within a double's range (`1e400` is refused; a large integer is read as a double, as in
/// JavaScript). The one JSON check of every route: publishes over gRPC and through the gateway,
/// entity fields over both. Walks the text without building it.
///
/// # Errors
/// What is wrong, and where.
pub(crate) fn check_json(bytes: &[u8]) -> Result<(), serde_json::Error> {
    use serde::de::DeserializeSeed as _;

    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    JsonCheck { depth: 0 }.deserialize(&mut deserializer)?;
    deserializer.end()
}

/// One value of a JSON text being checked, `depth` arrays and objects down.
#[derive(Clone, Copy)]
struct JsonCheck {
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonCheck {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        // `deserialize_any` makes serde_json read every string as UTF-8 and every number's
        // value; skipping (`IgnoredAny`) checks neither.
        deserializer.deserialize_any(self)
    }
}

impl JsonCheck {
    fn inner<E: serde::de::Error>(self) -> Result<JsonCheck, E> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(E::custom(format_args!(
                "arrays and objects nested deeper than {MAX_JSON_DEPTH}"
            )));
        }
        Ok(JsonCheck {
            depth: self.depth + 1,
        })
    }
}

impl<'de> serde::de::Visitor<'de> for JsonCheck {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        // Keys are strings, read (and so checked) like values.
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

impl Validator {
    /// A validator for these limits.
    pub(crate) fn new(limits: Limits) -> Validator {
        let channel_limits = ChannelLimits {
            max_len: limits.max_channel_len,
            max_depth: limits.max_channel_depth,
        };
        Validator {
            limits,
            channel_limits,
        }
    }

    /// Checks a publish and fills in its defaults.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming the first rule broken.
    pub(crate) fn publish(&self, request: pb::PublishRequest) -> Result<NewMessage, BrokerError> {
        let l = &self.limits;
        channel::validate_channel(&request.channel, &self.channel_limits).map_err(|e| {
            invalid(
                Reason::ChannelInvalid,
                format!("channel {:?}: {e}", shorten(&request.channel)),
            )
        })?;
        if channel::is_reserved(&request.channel) {
            return Err(invalid(
                Reason::ChannelReserved,
                format!(
                    "channel {:?} is reserved for the broker (channels starting with '$')",
                    request.channel
                ),
            ));
        }
        if request.payload.len() > l.max_payload_bytes {
            return Err(invalid(
                Reason::PayloadTooLarge,
                format!(
                    "payload is {} bytes; the limit is {}",
                    request.payload.len(),
                    l.max_payload_bytes
                ),
            ));
        }

        let content_type = if request.content_type.is_empty() {
            DEFAULT_CONTENT_TYPE.to_owned()
        } else {
            request.content_type
        };
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let valid_type = content_type.len() <= MAX_CONTENT_TYPE_LEN
            && content_type.is_ascii()
            && !content_type.chars().any(|c| c.is_ascii_control())
            && essence
                .split_once('/')
                .is_some_and(|(t, s)| is_token(t) && is_token(s));
        if !valid_type {
            return Err(invalid(
                Reason::ContentTypeInvalid,
                format!("content type {:?} is not a media type like \"application/json\" (at most {MAX_CONTENT_TYPE_LEN} bytes)", shorten(&content_type)),
            ));
        }
        if is_json(&content_type) {
            if let Err(e) = check_json(&request.payload) {
                return Err(invalid(
                    Reason::PayloadNotJson,
                    format!("content type is {content_type} but the payload is not JSON: {e}"),
                ));
            }
        }

        let schema_version = if request.schema_version.is_empty() {
            DEFAULT_SCHEMA_VERSION.to_owned()
        } else {
            request.schema_version
        };
        if schema_version.len() > 64 || semver::Version::parse(&schema_version).is_err() {
            return Err(invalid(
                Reason::SchemaVersionInvalid,
                format!(
                    "schema version {:?} is not semver like \"1.2.0\"",
                    shorten(&schema_version)
                ),
            ));
        }

        let correlation_id = if request.correlation_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            match uuid::Uuid::try_parse(&request.correlation_id) {
                Ok(id) => id.hyphenated().to_string(),
                Err(_) => {
                    return Err(invalid(
                        Reason::CorrelationIdInvalid,
                        format!(
                            "correlation id {:?} is not a UUID",
                            shorten(&request.correlation_id)
                        ),
                    ))
                }
            }
        };
        if request.causation_id.len() > l.max_key_len {
            return Err(invalid(
                Reason::CausationIdInvalid,
                format!(
                    "causation id is {} bytes; the limit is {}",
                    request.causation_id.len(),
                    l.max_key_len
                ),
            ));
        }
        if request.idempotency_key.len() > l.max_key_len {
            return Err(invalid(
                Reason::IdempotencyKeyInvalid,
                format!(
                    "idempotency key is {} bytes; the limit is {}",
                    request.idempotency_key.len(),
                    l.max_key_len
                ),
            ));
        }
        let max_ttl_ms = u64::try_from(l.max_ttl.as_millis()).unwrap_or(u64::MAX);
        if request.ttl_ms > max_ttl_ms {
            return Err(invalid(
                Reason::TtlInvalid,
                format!(
                    "ttl_ms {} exceeds the limit of {max_ttl_ms} ms",
                    request.ttl_ms
                ),
            ));
        }

        if request.headers.len() > l.max_headers {
            return Err(invalid(
                Reason::HeadersInvalid,
                format!(
                    "{} headers; the limit is {}",
                    request.headers.len(),
                    l.max_headers
                ),
            ));
        }
        let header_bytes: usize = request.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if header_bytes > l.max_header_bytes {
            return Err(invalid(
                Reason::HeadersInvalid,
                format!(
                    "headers take {header_bytes} bytes; the limit is {}",
                    l.max_header_bytes
                ),
            ));
        }
        for name in request.headers.keys() {
            let ok = !name.is_empty()
                && name.len() <= MAX_HEADER_NAME_LEN
                && name.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(invalid(
                    Reason::HeadersInvalid,
                    format!("header name {:?} must be 1 to {MAX_HEADER_NAME_LEN} printable ASCII characters without spaces", shorten(name)),
                ));
            }
        }
        let headers: BTreeMap<String, String> = request.headers.into_iter().collect();

        Ok(NewMessage {
            channel: request.channel,
            payload: request.payload,
            content_type,
            schema_version,
            correlation_id,
            causation_id: request.causation_id,
            idempotency_key: request.idempotency_key,
            ttl_ms: request.ttl_ms,
            headers,
            hops: request.hops,
        })
    }

    /// Parses a subscription, history or watch pattern: one that breaks the grammar, or that
    /// no channel can ever match (one segment other than `>`), is refused.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] with reason `PATTERN_INVALID`.
    pub(crate) fn pattern(&self, pattern: &str) -> Result<Pattern, BrokerError> {
        let parsed = Pattern::parse(pattern, &self.channel_limits).map_err(|e| {
            invalid(
                Reason::PatternInvalid,
                format!("pattern {:?}: {e}", shorten(pattern)),
            )
        })?;
        if !parsed.can_match() {
            return Err(invalid(
                Reason::PatternInvalid,
                format!(
                    "pattern {:?} has one segment and channels have at least two, so it would \
                     match nothing; use `{}.>` for every channel under it, or `>` for all",
                    shorten(pattern),
                    shorten(pattern)
                ),
            ));
        }
        Ok(parsed)
    }

    /// Reads a start position; unset means `default`.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] with reason `START_INVALID` for a malformed time, or `latest` where
    /// it makes no sense (`allow_latest` false).
    pub(crate) fn start(
        &self,
        start: Option<pb::StartPosition>,
        default: Start,
        allow_latest: bool,
    ) -> Result<Start, BrokerError> {
        let start = match start.and_then(|s| s.position) {
            None => default,
            Some(Position::Latest(_)) => Start::Latest,
            Some(Position::Earliest(_)) => Start::Earliest,
            Some(Position::Offset(offset)) => Start::Offset(offset),
            Some(Position::Time(ts)) => {
                Start::Time(super::convert::micros(&ts).ok_or_else(|| {
                    invalid(
                        Reason::StartInvalid,
                        format!("start time {ts:?} is not a valid time after 1970"),
                    )
                })?)
            }
        };
        if start == Start::Latest && !allow_latest {
            return Err(invalid(
                Reason::StartInvalid,
                "history reads what is stored; start from earliest, an offset or a time, not latest",
            ));
        }
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn json_media_types_are_known_by_their_essence_in_any_case() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ",
            "application/vnd.switchboard+json",
            "application/cloudevents+JSON;x=1",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "",
            "text/plain",
            "json",
            "+jso",
            "application/jsonx",
            "é+json€",
            "€",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }

    #[test]
    fn json_is_utf8_bounded_in_depth_and_in_range() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let good = [
            "null".to_owned(),
            r#"{"a":[1,-2,3.5,"\u00e9",true,null,{}],"é":"ü"}"#.to_owned(),
            "123456789012345678901234567890".to_owned(),
            nested(MAX_JSON_DEPTH),
            format!("{{\"a\":{}}}", nested(MAX_JSON_DEPTH - 1)),
        ];
        for text in &good {
            assert!(check_json(text.as_bytes()).is_ok(), "{text}");
        }
        let bad: Vec<Vec<u8>> = vec![
            b"{\"s\":\"\xff\"}".to_vec(),
            b"{\"\xff\":1}".to_vec(),
            nested(MAX_JSON_DEPTH + 1).into_bytes(),
            format!("{{\"a\":{}}}", nested(MAX_JSON_DEPTH)).into_bytes(),
            b"1e400".to_vec(),
            b"[-1e400]".to_vec(),
            b"{} {}".to_vec(),
            b"".to_vec(),
            b"{\"a\":}".to_vec(),
        ];
        for bytes in &bad {
            assert!(
                check_json(bytes).is_err(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    fn validator() -> Validator {
        Validator::new(Config::defaults().unwrap().limits)
    }

    fn request(channel: &str, payload: &'static [u8]) -> pb::PublishRequest {
        pb::PublishRequest {
            channel: channel.into(),
            payload: bytes::Bytes::from_static(payload),
            ..Default::default()
        }
    }

    fn reason_of(r: Result<NewMessage, BrokerError>) -> Reason {
        r.unwrap_err().reason()
    }

    #[test]
    fn accepts_a_minimal_message_and_fills_defaults() {
        let m = validator()
            .publish(request("crm.contact.updated", b"{\"a\":1}"))
            .unwrap();
        assert_eq!(m.content_type, "application/json");
        assert_eq!(m.schema_version, "1.0.0");
        assert!(uuid::Uuid::parse_str(&m.correlation_id).is_ok());
    }

    #[test]
    fn refuses_each_rule_with_its_reason() {
        let v = validator();
        assert_eq!(
            reason_of(v.publish(request("crm", b"{}"))),
            Reason::ChannelInvalid
        );
        assert_eq!(
            reason_of(v.publish(request("crm..x", b"{}"))),
            Reason::ChannelInvalid
        );
        assert_eq!(
            reason_of(v.publish(request("crm.*", b"{}"))),
            Reason::ChannelInvalid
        );
        assert_eq!(
            reason_of(v.publish(request("$state.x", b"{}"))),
            Reason::ChannelReserved
        );
        assert_eq!(
            reason_of(v.publish(request("a.b", b"{not json"))),
            Reason::PayloadNotJson
        );
        assert_eq!(
            reason_of(v.publish(request("a.b", b""))),
            Reason::PayloadNotJson
        );

        let big = pb::PublishRequest {
            channel: "a.b".into(),
            payload: bytes::Bytes::from(vec![b' '; 65_537]),
            ..Default::default()
        };
        assert_eq!(reason_of(v.publish(big)), Reason::PayloadTooLarge);

        let mut r = request("a.b", b"\xff");
        r.content_type = "application/octet-stream".into();
        assert!(
            v.publish(r.clone()).is_ok(),
            "non-JSON types are not parsed"
        );
        r.content_type = "not a type".into();
        assert_eq!(reason_of(v.publish(r)), Reason::ContentTypeInvalid);

        let mut r = request("a.b", b"{}");
        r.content_type = "application/vnd.crm+json; charset=utf-8".into();
        assert!(v.publish(r.clone()).is_ok());
        r.payload = bytes::Bytes::from_static(b"nope");
        assert_eq!(reason_of(v.publish(r)), Reason::PayloadNotJson);

        let mut r = request("a.b", b"{}");
        r.schema_version = "1.0".into();
        assert_eq!(reason_of(v.publish(r)), Reason::SchemaVersionInvalid);

        let mut r = request("a.b", b"{}");
        r.correlation_id = "abc".into();
        assert_eq!(reason_of(v.publish(r)), Reason::CorrelationIdInvalid);

        let mut r = request("a.b", b"{}");
        r.idempotency_key = "k".repeat(257);
        assert_eq!(reason_of(v.publish(r)), Reason::IdempotencyKeyInvalid);

        let mut r = request("a.b", b"{}");
        r.causation_id = "k".repeat(257);
        assert_eq!(reason_of(v.publish(r)), Reason::CausationIdInvalid);

        let mut r = request("a.b", b"{}");
        r.ttl_ms = u64::MAX;
        assert_eq!(reason_of(v.publish(r)), Reason::TtlInvalid);

        let mut r = request("a.b", b"{}");
        r.headers.insert("bad name".into(), "v".into());
        assert_eq!(reason_of(v.publish(r)), Reason::HeadersInvalid);

        let mut r = request("a.b", b"{}");
        r.headers.insert("big".into(), "v".repeat(9000));
        assert_eq!(reason_of(v.publish(r)), Reason::HeadersInvalid);
    }

    #[test]
    fn patterns_and_starts() {
        let v = validator();
        assert!(v.pattern("crm.*.updated").is_ok());
        assert!(v.pattern(">").is_ok());
        // One segment matches no channel (channels have two or more); `>` is every channel.
        for never in ["orders", "*", "$state"] {
            assert_eq!(
                v.pattern(never).unwrap_err().reason(),
                Reason::PatternInvalid,
                "{never}"
            );
        }
        assert_eq!(
            v.pattern("a.>.b").unwrap_err().reason(),
            Reason::PatternInvalid
        );
        assert_eq!(v.start(None, Start::Latest, true).unwrap(), Start::Latest);
        let latest = pb::StartPosition {
            position: Some(Position::Latest(pb::Latest {})),
        };
        assert_eq!(
            v.start(Some(latest), Start::Earliest, false)
                .unwrap_err()
                .reason(),
            Reason::StartInvalid
        );
        let bad_time = pb::StartPosition {
            position: Some(Position::Time(prost_types::Timestamp {
                seconds: -5,
                nanos: 0,
            })),
        };
        assert_eq!(
            v.start(Some(bad_time), Start::Latest, true)
                .unwrap_err()
                .reason(),
            Reason::StartInvalid
        );
    }
}
