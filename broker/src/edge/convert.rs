//! Conversions between the protobuf types of `switchboard.v1` and the broker's own types.

use prost_types::Timestamp;
use switchboard_proto::v1 as pb;

use crate::message::StoredMessage;

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
    }
}

/// An entity document (as stored on its state channel) as sent to clients.
pub fn entity(doc: &crate::apply::EntityDoc) -> pb::Entity {
    pb::Entity {
        key: Some(pb::EntityKey {
            r#type: doc.entity_type.clone(),
            id: doc.id.clone(),
        }),
        fields: bytes::Bytes::from(doc.fields.to_string()),
        version: doc.version,
        etag: doc.etag.clone(),
        deleted: doc.deleted,
        updated_at: Some(timestamp(doc.updated_at_us)),
        last_stamp: doc.last_stamp.as_ref().map(|s| pb::WriteStamp {
            timestamp_ms: s.timestamp_ms,
            version: s.version,
            writer: s.writer.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
