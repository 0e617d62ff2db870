//! What a subscription task sends down its stream, and how a delivery is encoded once per message
//! rather than once per subscriber.
//!
//! A message that matches a hundred subscriptions used to be converted to its protobuf form and
//! encoded a hundred times: every string and header copied, allocated and freed per subscriber. Now
//! the hub hands every matching subscription the same [`SharedMessage`], whose protobuf encoding is
//! made the first time a subscriber needs it and then shared (a reference-counted [`Bytes`]). What
//! differs per subscriber — `skipped`, `redelivery` and, with tracing on, the `traceparent` header
//! of its own delivery span — is appended after the shared bytes: in protobuf a field that appears
//! again overrides the earlier value (for a map, the later entry of a key wins), so the appended
//! fields mean exactly what setting them on the message would. The stream's codec
//! ([`crate::edge::subscribe_codec`]) writes the shared bytes straight into the HTTP/2 frame.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes};
use prost::encoding::{self, WireType};
use prost::Message as _;
use switchboard_proto::v1 as pb;
use tonic::Status;

use crate::edge::convert;
use crate::message::StoredMessage;
use crate::observability::trace;

/// Field number of `SubscribeEvent.message`.
const EVENT_MESSAGE: u32 = 2;
/// Field numbers of `Message.headers`, `Message.skipped` and `Message.redelivery`.
const MESSAGE_HEADERS: u32 = 11;
const MESSAGE_SKIPPED: u32 = 14;
const MESSAGE_REDELIVERY: u32 = 15;

/// A stored message on its way to subscribers, with its protobuf encoding made at most once.
pub struct SharedMessage {
    stored: Arc<StoredMessage>,
    encoded: OnceLock<Bytes>,
    /// For a message on an entity's state channel: the entity as watchers are sent it, decoded
    /// from the payload by the first watch that needs it rather than by every watch. Boxed, so
    /// the messages no watch reads carry a pointer, not a whole `Entity`.
    entity: OnceLock<Option<Box<pb::Entity>>>,
}

impl SharedMessage {
    /// Wraps a stored message; nothing is encoded until a subscriber needs it.
    pub fn new(stored: Arc<StoredMessage>) -> Arc<SharedMessage> {
        Arc::new(SharedMessage {
            stored,
            encoded: OnceLock::new(),
            entity: OnceLock::new(),
        })
    }

    /// The entity state this message carries, when it is a state document (see
    /// [`crate::state::entity_doc::EntityDoc`]); decoded once, by the first caller, and shared.
    pub fn entity(&self) -> Option<&pb::Entity> {
        self.entity
            .get_or_init(|| {
                convert::entity_from_state_payload(&self.stored.message.payload).map(Box::new)
            })
            .as_deref()
    }

    /// The stored message.
    pub fn stored(&self) -> &Arc<StoredMessage> {
        &self.stored
    }

    /// `Message` as protobuf, without the per-delivery fields; made by the first caller.
    fn encoded(&self) -> &Bytes {
        self.encoded
            .get_or_init(|| Bytes::from(convert::message(&self.stored).encode_to_vec()))
    }
}

impl Deref for SharedMessage {
    type Target = StoredMessage;

    fn deref(&self) -> &StoredMessage {
        &self.stored
    }
}

/// One delivery of a shared message to one subscription.
pub struct Delivery {
    message: Arc<SharedMessage>,
    skipped: u64,
    redelivery: u32,
    /// Headers replacing the stored ones in this delivery (the delivery span's trace context);
    /// empty, and not allocated, unless tracing is on.
    headers: HashMap<String, String>,
}

impl Delivery {
    /// The shared message this delivers.
    pub fn shared(&self) -> &Arc<SharedMessage> {
        &self.message
    }

    /// A delivery of `message` to subscription `subscription`.
    pub fn new(
        message: Arc<SharedMessage>,
        skipped: u64,
        redelivery: u32,
        subscription: u64,
    ) -> Delivery {
        let mut headers = HashMap::new();
        trace::delivered(
            &message.message.headers,
            &mut headers,
            subscription,
            message.offset,
        );
        Delivery {
            message,
            skipped,
            redelivery,
            headers,
        }
    }

    /// Bytes of the per-delivery fields appended after the shared encoding.
    fn extra_len(&self) -> usize {
        let mut len = 0;
        if self.skipped != 0 {
            len += encoding::uint64::encoded_len(MESSAGE_SKIPPED, &self.skipped);
        }
        if self.redelivery != 0 {
            len += encoding::uint32::encoded_len(MESSAGE_REDELIVERY, &self.redelivery);
        }
        len + encoding::hash_map::encoded_len(
            encoding::string::encoded_len,
            encoding::string::encoded_len,
            MESSAGE_HEADERS,
            &self.headers,
        )
    }

    /// Writes the delivery as an encoded `SubscribeEvent`.
    fn encode(&self, buf: &mut impl BufMut) {
        let shared = self.message.encoded();
        encoding::encode_key(EVENT_MESSAGE, WireType::LengthDelimited, buf);
        encoding::encode_varint((shared.len() + self.extra_len()) as u64, buf);
        buf.put_slice(shared);
        if self.skipped != 0 {
            encoding::uint64::encode(MESSAGE_SKIPPED, &self.skipped, buf);
        }
        if self.redelivery != 0 {
            encoding::uint32::encode(MESSAGE_REDELIVERY, &self.redelivery, buf);
        }
        encoding::hash_map::encode(
            encoding::string::encode,
            encoding::string::encoded_len,
            encoding::string::encode,
            encoding::string::encoded_len,
            MESSAGE_HEADERS,
            &self.headers,
            buf,
        );
    }

    /// The delivery as a protobuf event (what a client decodes from [`Delivery::encode`]).
    fn into_event(self) -> pb::SubscribeEvent {
        let mut m = convert::message(&self.message.stored);
        m.skipped = self.skipped;
        m.redelivery = self.redelivery;
        m.headers.extend(self.headers);
        pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Message(m)),
        }
    }
}

/// One item of a `Subscribe` stream (and of the subscription behind an entity watch).
pub enum Outgoing {
    /// Anything but a message delivery (`Subscribed`, `Gap`): rare, so boxed to keep the
    /// stream's queue slots small.
    Event(Box<pb::SubscribeEvent>),
    /// A message delivery, encoded from its shared bytes.
    Delivery(Delivery),
}

impl Outgoing {
    /// An event that is not a delivery.
    pub fn event(event: pb::SubscribeEvent) -> Outgoing {
        Outgoing::Event(Box::new(event))
    }

    /// The item as a protobuf event, for code that reads events rather than sending them.
    pub fn into_event(self) -> pb::SubscribeEvent {
        match self {
            Outgoing::Event(event) => *event,
            Outgoing::Delivery(delivery) => delivery.into_event(),
        }
    }

    /// Writes the item as an encoded `SubscribeEvent`.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), Status> {
        match self {
            Outgoing::Event(event) => event
                .encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode an event: {e}"))),
            Outgoing::Delivery(delivery) => {
                delivery.encode(buf);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::message::NewMessage;

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
        outgoing.encode(&mut buf).unwrap();
        pb::SubscribeEvent::decode(buf.as_slice()).unwrap()
    }

    #[test]
    fn a_shared_delivery_decodes_as_the_event_built_field_by_field() {
        let shared = SharedMessage::new(stored());
        for (skipped, redelivery) in [(0, 0), (3, 0), (0, 2), (7, 1)] {
            let delivery = Delivery::new(Arc::clone(&shared), skipped, redelivery, 9);
            let outgoing = Outgoing::Delivery(delivery);
            let on_the_wire = decoded(&outgoing);
            let expected = outgoing.into_event();
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
    fn a_per_delivery_header_replaces_the_stored_one_on_the_wire() {
        let shared = SharedMessage::new(stored());
        let mut delivery = Delivery::new(shared, 0, 0, 9);
        delivery
            .headers
            .insert("traceparent".to_owned(), "delivery-span".to_owned());
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
        first.encode(&mut a).unwrap();
        second.encode(&mut b).unwrap();
        assert_eq!(a, b);
        // Both deliveries wrote the very same buffer: it was made once.
        let once = shared.encoded().as_ptr();
        assert_eq!(shared.encoded().as_ptr(), once);
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
        let first = shared.entity().unwrap();
        assert_eq!(first, &convert::entity_state("contact", "7", &state));
        assert!(
            std::ptr::eq(first, shared.entity().unwrap()),
            "decoded once"
        );
        // A message that is not a state document has no entity.
        assert_eq!(SharedMessage::new(stored()).entity(), None);
    }

    #[test]
    fn other_events_encode_as_prost_does() {
        let event = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Subscribed(pb::Subscribed {
                next_offset: 5,
                subscription_id: 1,
                acked_offset: 4,
            })),
        };
        assert_eq!(decoded(&Outgoing::Event(Box::new(event.clone()))), event);
    }
}
