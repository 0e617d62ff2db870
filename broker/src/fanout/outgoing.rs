//! What a subscription task sends down its stream: [`Outgoing`] items, in the broker's own terms.
//! The edge puts them on the wire ([`crate::edge::delivery`]).
//!
//! A message that matches a hundred subscriptions must not be converted and encoded a hundred
//! times: the hub hands every matching subscription the same [`SharedMessage`], which keeps the
//! message's wire form once the first subscriber that sends it has made it ([`SharedMessage::wire`]),
//! and, for a state message, the entity decoded from it once for every watch
//! ([`SharedMessage::decoded`]). What differs per subscriber — `skipped`, `redelivery` and, with
//! tracing on, the trace context of its own delivery span — is in the [`Delivery`].

use std::any::Any;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::catch_up_budget::Charge;
use crate::message::StoredMessage;
use crate::observability::trace;

/// A stored message on its way to subscribers, with its wire form made at most once.
pub struct SharedMessage {
    stored: Arc<StoredMessage>,
    wire: OnceLock<Bytes>,
    /// One form decoded from the message for every reader (an entity watch's entity), made by
    /// the first reader; boxed, so the messages no one decodes carry a pointer.
    decoded: OnceLock<Option<Box<dyn Any + Send + Sync>>>,
    /// A message read from the store for one subscription is charged to the catch-up budget
    /// while it is held ([`super::catch_up_budget`]); a live one, shared by all, is not.
    _charge: Option<Charge>,
    /// When a live message was handed to the hub (just applied); `None` for one read from the
    /// store. The `fanout` stage of `switchboard_publish_stage_seconds` starts here.
    announced: Option<std::time::Instant>,
}

impl SharedMessage {
    /// Wraps a stored message; nothing is encoded until a subscriber needs it.
    pub fn new(stored: Arc<StoredMessage>) -> Arc<SharedMessage> {
        Arc::new(SharedMessage {
            stored,
            wire: OnceLock::new(),
            decoded: OnceLock::new(),
            _charge: None,
            announced: Some(std::time::Instant::now()),
        })
    }

    /// Wraps a message read from the store for one subscription, holding `charge` as long as
    /// the message is held.
    pub(crate) fn charged(stored: Arc<StoredMessage>, charge: Charge) -> Arc<SharedMessage> {
        Arc::new(SharedMessage {
            stored,
            wire: OnceLock::new(),
            decoded: OnceLock::new(),
            _charge: Some(charge),
            announced: None,
        })
    }

    /// How long ago a live message was handed to the hub; `None` for one read from the store.
    pub(crate) fn since_announced(&self) -> Option<std::time::Duration> {
        self.announced.map(|at| at.elapsed())
    }

    /// The stored message.
    pub fn stored(&self) -> &Arc<StoredMessage> {
        &self.stored
    }

    /// The message's wire form: made by `encode` for the first caller, then shared by every
    /// subscription the message matched.
    pub(crate) fn wire(&self, encode: impl FnOnce(&StoredMessage) -> Bytes) -> &Bytes {
        self.wire.get_or_init(|| encode(&self.stored))
    }

    /// A form of the message decoded once for every reader by `decode` (`None`: the message has
    /// none). There is one such form per message: a reader asking for another type gets `None`.
    pub(crate) fn decoded<T: Any + Send + Sync>(
        &self,
        decode: impl FnOnce(&StoredMessage) -> Option<T>,
    ) -> Option<&T> {
        self.decoded
            .get_or_init(|| {
                decode(&self.stored).map(|value| Box::new(value) as Box<dyn Any + Send + Sync>)
            })
            .as_deref()
            .and_then(|value| value.downcast_ref())
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
    /// A delivery of `message` to the subscription with id `subscription` (its span, when
    /// tracing is on, names no pattern: for benchmarks and tests).
    pub fn new(
        message: Arc<SharedMessage>,
        skipped: u64,
        redelivery: u32,
        subscription: u64,
    ) -> Delivery {
        let subscriber = trace::Subscriber {
            id: subscription,
            pattern: "",
            durable: None,
        };
        Delivery::to(message, skipped, redelivery, &subscriber)
    }

    /// A delivery of `message` to `subscriber`.
    pub(crate) fn to(
        message: Arc<SharedMessage>,
        skipped: u64,
        redelivery: u32,
        subscriber: &trace::Subscriber<'_>,
    ) -> Delivery {
        let mut headers = HashMap::new();
        trace::delivered(
            &message.message.headers,
            &mut headers,
            subscriber,
            &message.message.channel,
            message.offset,
        );
        Delivery {
            message,
            skipped,
            redelivery,
            headers,
        }
    }

    /// The shared message this delivers.
    pub fn shared(&self) -> &Arc<SharedMessage> {
        &self.message
    }

    /// Earlier messages of the channel this one replaces (conflation, throttling).
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// How many times this message was delivered to this consumer before (0 the first time).
    pub(crate) fn redelivery(&self) -> u32 {
        self.redelivery
    }

    /// Headers that replace the stored ones in this delivery.
    pub(crate) fn headers(&self) -> &HashMap<String, String> {
        &self.headers
    }

    /// Sets a header of this delivery only.
    #[cfg(test)]
    pub(crate) fn set_header(&mut self, name: &str, value: &str) {
        self.headers.insert(name.to_owned(), value.to_owned());
    }
}

/// Packs deliveries into batches for one subscription (see "Batches" in
/// [`super::subscription`]): deliveries go in with [`Packer::push`], which hands back a batch once
/// it holds `max_batch` deliveries or about `max_bytes` of messages; [`Packer::take`] hands back
/// what is packed (before the task waits for anything). A lone delivery comes back as a plain
/// [`Outgoing::Delivery`], so a batch always holds two or more.
pub(crate) struct Packer {
    max_batch: usize,
    max_bytes: usize,
    batch: Vec<Delivery>,
    bytes: usize,
}

impl Packer {
    /// A packer for batches of at most `max_batch` deliveries (1: every delivery on its own) and
    /// about `max_bytes` (the delivery that reaches it is the last in).
    pub(crate) fn new(max_batch: usize, max_bytes: usize) -> Packer {
        Packer {
            max_batch: max_batch.max(1),
            max_bytes,
            batch: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a delivery; returns what must be sent now: the delivery itself without batches, the
    /// batch once it is full, else nothing.
    pub(crate) fn push(&mut self, delivery: Delivery) -> Option<Outgoing> {
        if self.max_batch == 1 {
            return Some(Outgoing::Delivery(delivery));
        }
        self.bytes += delivery.message.message.approximate_size();
        self.batch.push(delivery);
        if self.batch.len() >= self.max_batch || self.bytes >= self.max_bytes {
            return self.take();
        }
        None
    }

    /// Everything packed so far, as one item (`None` when nothing is).
    pub(crate) fn take(&mut self) -> Option<Outgoing> {
        self.bytes = 0;
        match self.batch.len() {
            0 => None,
            1 => self.batch.pop().map(Outgoing::Delivery),
            n => Some(Outgoing::Batch(std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(n),
            ))),
        }
    }
}

/// Why a range of offsets was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// The consumer was further behind than its window (drop-oldest).
    Dropped,
    /// Retention or TTL removed the messages before the consumer read them.
    Retention,
}

/// One item of a subscription's stream (a `Subscribe` stream, or the subscription behind an
/// entity watch).
pub enum Outgoing {
    /// The subscription is registered: every matching message from `next_offset` on follows.
    Subscribed {
        /// The lowest offset this subscription can still deliver.
        next_offset: u64,
        /// The subscription's id on this node.
        subscription_id: u64,
        /// For a durable consumer, the acknowledged offset it resumes after.
        acked_offset: u64,
    },
    /// Offsets `from_offset..=to_offset` were skipped; `count` matching messages were in them
    /// (0 when they were removed before they could be counted).
    Gap {
        /// First skipped offset.
        from_offset: u64,
        /// Last skipped offset.
        to_offset: u64,
        /// Matching messages skipped.
        count: u64,
        /// Why.
        reason: GapReason,
    },
    /// A message delivery.
    Delivery(Delivery),
    /// Two or more deliveries that were ready at once, sent as one event (`SubscribeEvent.batch`)
    /// to a subscription that asked for batches; in delivery order. See
    /// [`super::subscription`] for how they are packed.
    Batch(Vec<Delivery>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NewMessage;

    /// A delivery of a message at `offset` whose payload is `payload` bytes long.
    fn delivery(offset: u64, payload: usize) -> Delivery {
        let stored = StoredMessage {
            offset,
            publish_time_us: 1,
            message: NewMessage::on_channel("a.b", Bytes::from(vec![b'x'; payload])),
            chain: Vec::new(),
        };
        Delivery::new(SharedMessage::new(Arc::new(stored)), 0, 0, 1)
    }

    /// The offsets an item carries, and whether it was a batch.
    fn offsets(item: &Outgoing) -> (bool, Vec<u64>) {
        match item {
            Outgoing::Delivery(d) => (false, vec![d.shared().offset]),
            Outgoing::Batch(ds) => (true, ds.iter().map(|d| d.shared().offset).collect()),
            _ => panic!("not a delivery"),
        }
    }

    #[test]
    fn without_batches_every_delivery_goes_at_once() {
        for max_batch in [0, 1] {
            let mut packer = Packer::new(max_batch, 1 << 20);
            for offset in 1..=3 {
                let item = packer.push(delivery(offset, 10)).expect("sent at once");
                assert_eq!(offsets(&item), (false, vec![offset]));
            }
            assert!(packer.take().is_none());
        }
    }

    #[test]
    fn batches_fill_to_max_batch_in_order_and_the_rest_is_taken() {
        let mut packer = Packer::new(3, 1 << 20);
        let mut sent = Vec::new();
        for offset in 1..=8 {
            if let Some(item) = packer.push(delivery(offset, 10)) {
                sent.push(offsets(&item));
            }
        }
        assert_eq!(sent, [(true, vec![1, 2, 3]), (true, vec![4, 5, 6])]);
        assert_eq!(offsets(&packer.take().unwrap()), (true, vec![7, 8]));
        assert!(packer.take().is_none(), "nothing left");
    }

    #[test]
    fn a_lone_packed_delivery_is_taken_as_a_plain_delivery() {
        let mut packer = Packer::new(100, 1 << 20);
        assert!(packer.push(delivery(5, 10)).is_none());
        assert_eq!(offsets(&packer.take().unwrap()), (false, vec![5]));
    }

    #[test]
    fn the_byte_bound_ends_a_batch_with_the_delivery_that_reaches_it() {
        let mut packer = Packer::new(100, 1000);
        assert!(packer.push(delivery(1, 400)).is_none());
        assert!(packer.push(delivery(2, 400)).is_none());
        let full = packer.push(delivery(3, 400)).expect("past 1000 bytes");
        assert_eq!(offsets(&full), (true, vec![1, 2, 3]));
        // The count starts again after a batch is sent, and after a take.
        assert!(packer.push(delivery(4, 400)).is_none());
        assert_eq!(offsets(&packer.take().unwrap()), (false, vec![4]));
        assert!(packer.push(delivery(5, 900)).is_none());
        assert!(packer.push(delivery(6, 100)).is_some());
        // One message larger than the bound goes alone.
        let alone = packer
            .push(delivery(7, 5000))
            .expect("past the bound by itself");
        assert_eq!(offsets(&alone), (false, vec![7]));
    }
}
