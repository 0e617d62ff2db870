//! Deliveries on the wire: a subscription's [`Outgoing`] items as encoded `SubscribeEvent`s.
//!
//! A delivery's message is encoded once and shared by every subscriber it matched
//! ([`SharedMessage::wire`]); what differs per delivery — `skipped`, `redelivery` and, with tracing
//! on, the `traceparent` header of its own delivery span — is appended after the shared bytes: in
//! protobuf a field that appears again overrides the earlier value (for a map, the later entry of
//! a key wins), so the appended fields mean exactly what setting them on the message would. The
//! stream's codec ([`super::subscribe_codec`]) writes these bytes straight into the HTTP/2 frame.
//!
//! A batch (`SubscribeEvent.batch`, a `MessageBatch`) is framed from the same shared bytes: a
//! repeated message field on the wire is each element as its own (tag, length, bytes), so the
//! batch is the concatenation of its deliveries written as `MessageBatch.messages` instead of
//! `SubscribeEvent.message`, under one (tag, length) of its own. Nothing is encoded again.

use bytes::{BufMut, Bytes};
use prost::encoding::{self, WireType};
use prost::Message as _;
use switchboard_proto::v1 as pb;
use tonic::Status;

use super::convert;
use crate::fanout::outgoing::{Delivery, GapReason, Outgoing, SharedMessage};

/// Field number of `SubscribeEvent.message`.
const EVENT_MESSAGE: u32 = 2;
/// Field number of `SubscribeEvent.batch`.
const EVENT_BATCH: u32 = 4;
/// Field number of `MessageBatch.messages`.
const BATCH_MESSAGES: u32 = 1;
/// Field numbers of `Message.headers`, `Message.skipped` and `Message.redelivery`.
const MESSAGE_HEADERS: u32 = 11;
const MESSAGE_SKIPPED: u32 = 14;
const MESSAGE_REDELIVERY: u32 = 15;

/// `Message` as protobuf, without the per-delivery fields; made by the first delivery of the
/// message and shared.
fn message_wire(shared: &SharedMessage) -> &Bytes {
    shared.wire(|stored| Bytes::from(convert::message(stored).encode_to_vec()))
}

/// A state message as entity watches use it (see [`crate::state::entity_doc::EntityDoc`]): the
/// entity, and the `EntityEvent` announcing it as a change, encoded. Made once, by the first
/// watch that needs it, and shared by every watch, which writes the encoded event straight into
/// its stream ([`super::entities`]).
pub(crate) struct EntityChange {
    /// The entity the message carries.
    pub entity: pb::Entity,
    /// `EntityEvent { change: entity }` as protobuf.
    pub event: Bytes,
}

/// The [`EntityChange`] of a state message (`None`: the message carries no entity).
pub(crate) fn entity_change(shared: &SharedMessage) -> Option<&EntityChange> {
    shared.decoded(|stored| {
        let entity = convert::entity_from_state_payload(&stored.message.payload)?;
        let event = pb::EntityEvent {
            event: Some(pb::entity_event::Event::Change(entity.clone())),
        };
        Some(EntityChange {
            entity,
            event: Bytes::from(event.encode_to_vec()),
        })
    })
}

/// Bytes of the per-delivery fields appended after the shared encoding.
fn extra_len(delivery: &Delivery) -> usize {
    let mut len = 0;
    if delivery.skipped() != 0 {
        len += encoding::uint64::encoded_len(MESSAGE_SKIPPED, &delivery.skipped());
    }
    if delivery.redelivery() != 0 {
        len += encoding::uint32::encoded_len(MESSAGE_REDELIVERY, &delivery.redelivery());
    }
    len + encoding::hash_map::encoded_len(
        encoding::string::encoded_len,
        encoding::string::encoded_len,
        MESSAGE_HEADERS,
        delivery.headers(),
    )
}

/// Bytes of a delivery's `Message` (shared bytes plus its own fields), made if need be.
fn message_len(delivery: &Delivery) -> usize {
    message_wire(delivery.shared()).len() + extra_len(delivery)
}

/// Bytes of a delivery written as field `tag`.
fn field_len(tag: u32, delivery: &Delivery) -> usize {
    let len = message_len(delivery);
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

/// Writes a delivery's `Message` as field `tag`: `SubscribeEvent.message`, or one element of
/// `MessageBatch.messages`.
fn encode_delivery(tag: u32, delivery: &Delivery, buf: &mut impl BufMut) {
    let shared = message_wire(delivery.shared());
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint((shared.len() + extra_len(delivery)) as u64, buf);
    buf.put_slice(shared);
    if delivery.skipped() != 0 {
        encoding::uint64::encode(MESSAGE_SKIPPED, &delivery.skipped(), buf);
    }
    if delivery.redelivery() != 0 {
        encoding::uint32::encode(MESSAGE_REDELIVERY, &delivery.redelivery(), buf);
    }
    encoding::hash_map::encode(
        encoding::string::encode,
        encoding::string::encoded_len,
        encoding::string::encode,
        encoding::string::encoded_len,
        MESSAGE_HEADERS,
        delivery.headers(),
        buf,
    );
}

/// Writes deliveries as an encoded `SubscribeEvent` whose `batch` holds them all, in order.
fn encode_batch(deliveries: &[Delivery], buf: &mut impl BufMut) {
    let len: usize = deliveries
        .iter()
        .map(|delivery| field_len(BATCH_MESSAGES, delivery))
        .sum();
    encoding::encode_key(EVENT_BATCH, WireType::LengthDelimited, buf);
    encoding::encode_varint(len as u64, buf);
    for delivery in deliveries {
        encode_delivery(BATCH_MESSAGES, delivery, buf);
    }
}

/// Writes an item as an encoded `SubscribeEvent`: deliveries from their shared bytes, anything
/// else (rare) through prost.
///
/// # Errors
/// INTERNAL if prost cannot encode an event (only a full buffer could cause it).
pub fn encode(item: &Outgoing, buf: &mut impl BufMut) -> Result<(), Status> {
    match item {
        Outgoing::Delivery(delivery) => {
            encode_delivery(EVENT_MESSAGE, delivery, buf);
            Ok(())
        }
        Outgoing::Batch(deliveries) => {
            encode_batch(deliveries, buf);
            Ok(())
        }
        Outgoing::Subscribed { .. } | Outgoing::Gap { .. } => event(item)
            .encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode an event: {e}"))),
    }
}

/// The item as a protobuf event (what a client decodes from [`encode`]), for code that reads
/// events rather than sending them.
pub(crate) fn into_event(item: Outgoing) -> pb::SubscribeEvent {
    event(&item)
}

fn event(item: &Outgoing) -> pb::SubscribeEvent {
    use pb::subscribe_event::Event;
    let event = match item {
        Outgoing::Subscribed {
            next_offset,
            subscription_id,
            acked_offset,
        } => Event::Subscribed(pb::Subscribed {
            next_offset: *next_offset,
            subscription_id: *subscription_id,
            acked_offset: *acked_offset,
        }),
        Outgoing::Gap {
            from_offset,
            to_offset,
            count,
            reason,
        } => Event::Gap(pb::Gap {
            from_offset: *from_offset,
            to_offset: *to_offset,
            count: *count,
            reason: match reason {
                GapReason::Dropped => pb::gap::Reason::Dropped,
                GapReason::Retention => pb::gap::Reason::Retention,
            } as i32,
        }),
        Outgoing::Delivery(delivery) => Event::Message(message(delivery)),
        Outgoing::Batch(deliveries) => Event::Batch(pb::MessageBatch {
            messages: deliveries.iter().map(message).collect(),
        }),
    };
    pb::SubscribeEvent { event: Some(event) }
}

/// A delivery's `Message` built field by field.
fn message(delivery: &Delivery) -> pb::Message {
    let mut m = convert::message(delivery.shared().stored());
    m.skipped = delivery.skipped();
    m.redelivery = delivery.redelivery();
    m.headers.extend(
        delivery
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    m
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::fanout::outgoing::{Delivery, SharedMessage};
    use crate::message::{NewMessage, StoredMessage};

    fn stored() -> Arc<StoredMessage> {
        let mut headers = BTreeMap::new();
        headers.insert("traceparent".to_owned(), "stored".to_owned());
        headers.insert("tenant".to_owned(), "t1".to_owned());
        Arc::new(StoredMessage {
            offset: 42,
            publish_time_us: 1_764_000_000_123_456,
            message: NewMessage {
                channel: "crm.contact.updated".into(),
                payload: Bytes::from_static(b"{\"id\":1}"),
                content_type: "application/json".into(),
                schema_version: "1.2.3".into(),
                correlation_id: "c0ffee".into(),
                causation_id: "cause".into(),
                idempotency_key: "key".into(),
                ttl_ms: 5_000,
                headers,
                hops: 2,
            },
            chain: vec!["a.b".into()],
        })
    }

    fn decoded(outgoing: &Outgoing) -> pb::SubscribeEvent {
        let mut buf = Vec::new();
        encode(outgoing, &mut buf).unwrap();
        pb::SubscribeEvent::decode(buf.as_slice()).unwrap()
    }

    #[test]
    fn a_shared_delivery_decodes_as_the_event_built_field_by_field() {
        let shared = SharedMessage::new(stored());
        for (skipped, redelivery) in [(0, 0), (3, 0), (0, 2), (7, 1)] {
            let delivery = Delivery::new(Arc::clone(&shared), skipped, redelivery, 9);
            let outgoing = Outgoing::Delivery(delivery);
            let on_the_wire = decoded(&outgoing);
            let expected = into_event(outgoing);
            assert_eq!(
                on_the_wire, expected,
                "skipped {skipped}, redelivery {redelivery}"
            );
            let Some(pb::subscribe_event::Event::Message(m)) = expected.event else {
                panic!("not a message");
            };
            assert_eq!(
                (m.offset, m.skipped, m.redelivery),
                (42, skipped, redelivery)
            );
            assert_eq!(m.payload.as_ref(), b"{\"id\":1}");
        }
    }

    #[test]
    fn a_batch_framed_from_shared_bytes_decodes_as_the_batch_built_field_by_field() {
        let first = SharedMessage::new(stored());
        let mut second = (*stored()).clone();
        second.offset = 43;
        second.message.payload = Bytes::from(vec![b'x'; 300]);
        let second = SharedMessage::new(Arc::new(second));
        let mut traced = Delivery::new(Arc::clone(&second), 0, 0, 9);
        traced.set_header("traceparent", "delivery-span");
        let batch = Outgoing::Batch(vec![
            Delivery::new(Arc::clone(&first), 3, 0, 9),
            traced,
            Delivery::new(Arc::clone(&first), 0, 2, 9),
        ]);
        let on_the_wire = decoded(&batch);
        let expected = into_event(batch);
        assert_eq!(on_the_wire, expected);
        let Some(pb::subscribe_event::Event::Batch(batch)) = expected.event else {
            panic!("not a batch");
        };
        let seen: Vec<_> = batch
            .messages
            .iter()
            .map(|m| {
                (
                    m.offset,
                    m.skipped,
                    m.redelivery,
                    m.headers["traceparent"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (42, 3, 0, "stored"),
                (43, 0, 0, "delivery-span"),
                (42, 0, 2, "stored")
            ]
        );
        assert_eq!(batch.messages[1].payload.len(), 300);
    }

    #[test]
    fn a_per_delivery_header_replaces_the_stored_one_on_the_wire() {
        let shared = SharedMessage::new(stored());
        let mut delivery = Delivery::new(shared, 0, 0, 9);
        delivery.set_header("traceparent", "delivery-span");
        let event = decoded(&Outgoing::Delivery(delivery));
        let Some(pb::subscribe_event::Event::Message(m)) = event.event else {
            panic!("not a message");
        };
        assert_eq!(m.headers["traceparent"], "delivery-span");
        assert_eq!(m.headers["tenant"], "t1");
        assert_eq!(m.headers.len(), 2);
    }

    #[test]
    fn the_message_is_encoded_once_for_every_subscriber() {
        let shared = SharedMessage::new(stored());
        let first = Outgoing::Delivery(Delivery::new(Arc::clone(&shared), 0, 0, 1));
        let second = Outgoing::Delivery(Delivery::new(Arc::clone(&shared), 0, 0, 2));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&first, &mut a).unwrap();
        encode(&second, &mut b).unwrap();
        assert_eq!(a, b);
        // Both deliveries wrote the very same buffer: it was made once.
        let once = message_wire(&shared).as_ptr();
        assert_eq!(message_wire(&shared).as_ptr(), once);
    }

    #[test]
    fn a_state_change_is_decoded_once_for_every_watch() {
        let mut state = crate::entity::EntityState::default();
        let stamp = crate::entity::Stamp {
            timestamp_ms: 1,
            version: 0,
            writer: "w".into(),
        };
        let mut values = BTreeMap::new();
        values.insert("name".to_owned(), "\"Ada\"".to_owned());
        state.merge(&crate::entity::Change::Update(values), &stamp);
        state.accept(&stamp, 5);
        let mut message = (*stored()).clone();
        message.message.channel = "$state.contact.7".into();
        message.message.payload = Bytes::from(
            crate::state::entity_doc::EntityDoc::encode("contact", "7", &state).unwrap(),
        );
        let shared = SharedMessage::new(Arc::new(message));
        let first = entity_change(&shared).unwrap();
        let entity = convert::entity_state("contact", "7", &state);
        assert_eq!(first.entity, entity);
        // The change event is the one prost would encode from the entity.
        let event = pb::EntityEvent {
            event: Some(pb::entity_event::Event::Change(entity)),
        };
        assert_eq!(first.event, event.encode_to_vec());
        assert!(
            std::ptr::eq(first, entity_change(&shared).unwrap()),
            "decoded and encoded once"
        );
        // A message that is not a state document has no entity.
        assert!(entity_change(&SharedMessage::new(stored())).is_none());
    }

    #[test]
    fn other_events_encode_as_prost_does() {
        let subscribed = Outgoing::Subscribed {
            next_offset: 5,
            subscription_id: 1,
            acked_offset: 4,
        };
        let event = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Subscribed(pb::Subscribed {
                next_offset: 5,
                subscription_id: 1,
                acked_offset: 4,
            })),
        };
        assert_eq!(decoded(&subscribed), event);
        let gap = Outgoing::Gap {
            from_offset: 3,
            to_offset: 9,
            count: 2,
            reason: GapReason::Retention,
        };
        let event = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Gap(pb::Gap {
                from_offset: 3,
                to_offset: 9,
                count: 2,
                reason: pb::gap::Reason::Retention as i32,
            })),
        };
        assert_eq!(decoded(&gap), event);
    }
}
