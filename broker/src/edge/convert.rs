//! Conversions between the protobuf types of `switchboard.v1` and the broker's own types.

use prost_types::Timestamp;
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard_proto::v1 as pb;

use crate::entity::{EntityState, Stamp};
use crate::error::{BrokerError, Reason};
use crate::fanout::registry::FlowPolicy;
use crate::message::{Owner, StoredMessage};

/// Who wrote a registration, as the answers show it: `issuer subject`, the subject alone when
/// the token had no issuer, empty when nobody authenticated did.
pub(crate) fn owner_text(owner: Option<&Owner>) -> String {
    owner.map_or(String::new(), |o| {
        if o.issuer.is_empty() {
            o.subject.clone()
        } else {
            format!("{} {}", o.issuer, o.subject)
        }
    })
}

/// µs since the epoch → protobuf timestamp.
pub fn timestamp(us: u64) -> Timestamp {
    Timestamp {
        seconds: (us / 1_000_000) as i64,
        nanos: ((us % 1_000_000) * 1_000) as i32,
    }
}

/// Protobuf timestamp → µs since the epoch; `None` when it is before the epoch or malformed.
pub fn micros(ts: &Timestamp) -> Option<u64> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    (ts.seconds as u64)
        .checked_mul(1_000_000)?
        .checked_add(ts.nanos as u64 / 1_000)
}

/// A stored message as sent to subscribers and History readers.
pub fn message(stored: &StoredMessage) -> pb::Message {
    let m = &stored.message;
    pb::Message {
        offset: stored.offset,
        channel: m.channel.clone(),
        publish_time: Some(timestamp(stored.publish_time_us)),
        payload: m.payload.clone(),
        content_type: m.content_type.clone(),
        schema_version: m.schema_version.clone(),
        correlation_id: m.correlation_id.clone(),
        causation_id: m.causation_id.clone(),
        idempotency_key: m.idempotency_key.clone(),
        ttl_ms: m.ttl_ms,
        headers: m
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        expires_at: stored.expires_at_us().map(timestamp),
        hops: m.hops,
        skipped: 0,
        redelivery: 0,
        // Offsets start at 1: 0 is a message that was never stored.
        ephemeral: stored.offset == 0,
    }
}

/// An entity's state as sent to clients. The fields are the state's canonical JSON text, which
/// is exactly what the state document carries.
pub fn entity_state(entity_type: &str, id: &str, state: &EntityState) -> pb::Entity {
    pb::Entity {
        key: Some(pb::EntityKey {
            r#type: entity_type.to_owned(),
            id: id.to_owned(),
        }),
        fields: bytes::Bytes::from(state.fields_json()),
        version: state.version,
        etag: state.etag(),
        deleted: state.is_deleted(),
        updated_at: Some(timestamp(state.updated_at_us)),
        last_stamp: state.last_stamp.as_ref().map(write_stamp),
    }
}

fn write_stamp(s: &Stamp) -> pb::WriteStamp {
    pb::WriteStamp {
        timestamp_ms: s.timestamp_ms,
        version: s.version,
        writer: s.writer.clone(),
    }
}

/// The parts of a state document a watcher is sent, read without building a JSON tree of the
/// fields: they are taken as the text they are in the document (compact, canonical JSON).
#[derive(Deserialize)]
struct StateDocument<'a> {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
    version: u64,
    etag: String,
    deleted: bool,
    updated_at_us: u64,
    last_stamp: Option<Stamp>,
    #[serde(borrow)]
    fields: &'a RawValue,
}

/// The entity a state document (the payload of a message on an entity's state channel) holds;
/// `None` when the payload is not one.
pub fn entity_from_state_payload(payload: &[u8]) -> Option<pb::Entity> {
    let doc: StateDocument<'_> = serde_json::from_slice(payload).ok()?;
    Some(pb::Entity {
        key: Some(pb::EntityKey {
            r#type: doc.entity_type,
            id: doc.id,
        }),
        fields: bytes::Bytes::copy_from_slice(doc.fields.get().as_bytes()),
        version: doc.version,
        etag: doc.etag,
        deleted: doc.deleted,
        updated_at: Some(timestamp(doc.updated_at_us)),
        last_stamp: doc.last_stamp.as_ref().map(write_stamp),
    })
}

/// A request's flow policy number → the registry's policy (unspecified is lossless).
pub(crate) fn policy(value: i32) -> Result<FlowPolicy, BrokerError> {
    match pb::FlowPolicy::try_from(value) {
        Ok(pb::FlowPolicy::Unspecified | pb::FlowPolicy::Lossless) => Ok(FlowPolicy::Lossless),
        Ok(pb::FlowPolicy::Conflate) => Ok(FlowPolicy::Conflate),
        Ok(pb::FlowPolicy::DropOldest) => Ok(FlowPolicy::DropOldest),
        Err(_) => Err(BrokerError::invalid(
            Reason::PolicyInvalid,
            format!("unknown flow policy {value}"),
        )),
    }
}

/// The registry's flow policy → its protobuf number.
pub(crate) fn policy_number(policy: FlowPolicy) -> i32 {
    match policy {
        FlowPolicy::Lossless => pb::FlowPolicy::Lossless as i32,
        FlowPolicy::Conflate => pb::FlowPolicy::Conflate as i32,
        FlowPolicy::DropOldest => pb::FlowPolicy::DropOldest as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_change_is_the_entity_as_read_from_the_state() {
        use crate::entity::Change;
        let mut state = EntityState::default();
        let stamp = Stamp {
            timestamp_ms: 5,
            version: 1,
            writer: "crm".into(),
        };
        let fields = [
            ("name", r#""Ada \"A\"""#),
            ("n", "1.5"),
            ("o", r#"{"a":[1]}"#),
        ];
        state.merge(
            &Change::Update(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            &stamp,
        );
        state.accept(&stamp, 1_764_000_000_000_001);
        let payload = crate::state::entity_doc::EntityDoc::encode("contact", "c1", &state).unwrap();
        let watched = entity_from_state_payload(payload.as_bytes()).unwrap();
        assert_eq!(watched, entity_state("contact", "c1", &state));
        assert_eq!(
            watched.fields.as_ref(),
            br#"{"n":1.5,"name":"Ada \"A\"","o":{"a":[1]}}"#
        );
        assert_eq!(entity_from_state_payload(b"{\"not\":\"a state\"}"), None);
    }

    #[test]
    fn timestamps_round_trip_and_refuse_nonsense() {
        for us in [0, 1, 999_999, 1_700_000_000_123_456] {
            assert_eq!(micros(&timestamp(us)), Some(us));
        }
        assert_eq!(
            micros(&Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert_eq!(
            micros(&Timestamp {
                seconds: 1,
                nanos: -5
            }),
            None
        );
        assert_eq!(
            micros(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            None
        );
    }
}
