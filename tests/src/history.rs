//! A history checker for fault tests: what was acknowledged, what each subscriber received, and
//! what each node stores, checked against the promises at the end.
//!
//! Record as the test runs — every acknowledged publish ([`History::acked`]), every delivery per
//! subscriber ([`History::delivered`]), and at the end each node's digest of its whole log
//! ([`History::node_digest`], from [`digest`]) — then [`History::check`] lists every
//! [`Anomaly`]:
//! - every acknowledged message was delivered to every surviving subscriber, exactly once;
//! - each subscriber saw strictly increasing offsets;
//! - no offset ever named two different messages (across acks, deliveries and subscribers);
//! - every node holds the same log (equal digests).
//!
//! A subscriber may also receive messages whose ack was lost (a publish in flight when a node
//! died can commit without its ack reaching the client): that is allowed, as long as it is
//! consistent with everything else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A message's identity as the test chose it (e.g. `"p3-117"`, carried in the payload).
pub type MessageId = String;

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// The same offset named two different messages.
    OffsetReused {
        /// The offset.
        offset: u64,
        /// The messages it named, and where each was seen.
        seen: Vec<(MessageId, String)>,
    },
    /// An acknowledged message never reached a surviving subscriber.
    Lost {
        /// The subscriber.
        subscriber: String,
        /// The message's offset.
        offset: u64,
        /// The message.
        id: MessageId,
    },
    /// A subscriber received an offset more than once.
    Duplicate {
        /// The subscriber.
        subscriber: String,
        /// The offset received again.
        offset: u64,
    },
    /// A subscriber received an offset after a higher one.
    OutOfOrder {
        /// The subscriber.
        subscriber: String,
        /// The offset before.
        previous: u64,
        /// The offset that came after it.
        next: u64,
    },
    /// The nodes do not store the same log.
    NodesDisagree {
        /// Each node's digest.
        digests: BTreeMap<String, String>,
    },
    /// A subscriber said to survive recorded nothing at all under that name.
    UnknownSubscriber {
        /// Its name.
        subscriber: String,
    },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::OffsetReused { offset, seen } => {
                write!(f, "offset {offset} names more than one message: {seen:?}")
            }
            Anomaly::Lost {
                subscriber,
                offset,
                id,
            } => write!(
                f,
                "acknowledged {id} (offset {offset}) never reached {subscriber}"
            ),
            Anomaly::Duplicate { subscriber, offset } => {
                write!(f, "{subscriber} received offset {offset} more than once")
            }
            Anomaly::OutOfOrder {
                subscriber,
                previous,
                next,
            } => write!(f, "{subscriber} received offset {next} after {previous}"),
            Anomaly::NodesDisagree { digests } => write!(f, "nodes disagree: {digests:?}"),
            Anomaly::UnknownSubscriber { subscriber } => {
                write!(f, "no deliveries recorded for subscriber {subscriber}")
            }
        }
    }
}

/// Everything a fault test observed.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Acknowledged publishes in the order their acks arrived.
    acks: Vec<(u64, MessageId)>,
    /// Deliveries per subscriber, in arrival order.
    deliveries: BTreeMap<String, Vec<(u64, MessageId)>>,
    /// Each node's digest of its stored log.
    digests: BTreeMap<String, String>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records the ack of `id` at `offset`.
    pub fn acked(&mut self, offset: u64, id: impl Into<MessageId>) {
        self.acks.push((offset, id.into()));
    }

    /// Records that `subscriber` received `id` at `offset`.
    pub fn delivered(&mut self, subscriber: &str, offset: u64, id: impl Into<MessageId>) {
        self.deliveries
            .entry(subscriber.to_owned())
            .or_default()
            .push((offset, id.into()));
    }

    /// Registers `subscriber` (so one that received nothing is still checked).
    pub fn subscriber(&mut self, subscriber: &str) {
        self.deliveries.entry(subscriber.to_owned()).or_default();
    }

    /// Records `node`'s digest of its whole stored log (see [`digest`]).
    pub fn node_digest(&mut self, node: &str, digest: impl Into<String>) {
        self.digests.insert(node.to_owned(), digest.into());
    }

    /// Number of acknowledged publishes recorded.
    pub fn ack_count(&self) -> usize {
        self.acks.len()
    }

    /// The acknowledged offsets not (yet) delivered to `subscriber`: what a test waits on.
    pub fn undelivered(&self, subscriber: &str) -> usize {
        let received: BTreeSet<u64> = self
            .deliveries
            .get(subscriber)
            .map(|d| d.iter().map(|(o, _)| *o).collect())
            .unwrap_or_default();
        self.acks
            .iter()
            .filter(|(o, _)| !received.contains(o))
            .count()
    }

    /// Checks every promise; `surviving` are the subscribers that must have received every
    /// acknowledged message (those on nodes that were never killed, or that resumed).
    ///
    /// # Errors
    /// Every anomaly found, in a stable order.
    pub fn check(&self, surviving: &[&str]) -> Result<(), Vec<Anomaly>> {
        let mut anomalies = Vec::new();

        // One name per offset, wherever it was seen.
        let mut names: BTreeMap<u64, Vec<(MessageId, String)>> = BTreeMap::new();
        let mut note = |offset: u64, id: &MessageId, whence: String| {
            let seen = names.entry(offset).or_default();
            if !seen.iter().any(|(known, _)| known == id) {
                seen.push((id.clone(), whence));
            }
        };
        for (offset, id) in &self.acks {
            note(*offset, id, "ack".into());
        }
        for (subscriber, deliveries) in &self.deliveries {
            for (offset, id) in deliveries {
                note(*offset, id, subscriber.clone());
            }
        }
        for (offset, seen) in names {
            if seen.len() > 1 {
                anomalies.push(Anomaly::OffsetReused { offset, seen });
            }
        }

        // Order and duplicates per subscriber.
        for (subscriber, deliveries) in &self.deliveries {
            let mut seen = BTreeSet::new();
            let mut previous: Option<u64> = None;
            for (offset, _) in deliveries {
                if !seen.insert(*offset) {
                    anomalies.push(Anomaly::Duplicate {
                        subscriber: subscriber.clone(),
                        offset: *offset,
                    });
                } else if let Some(previous) = previous.filter(|p| p > offset) {
                    anomalies.push(Anomaly::OutOfOrder {
                        subscriber: subscriber.clone(),
                        previous,
                        next: *offset,
                    });
                }
                previous = Some(previous.map_or(*offset, |p| p.max(*offset)));
            }
        }

        // Every ack reached every surviving subscriber.
        for subscriber in surviving {
            let Some(deliveries) = self.deliveries.get(*subscriber) else {
                anomalies.push(Anomaly::UnknownSubscriber {
                    subscriber: (*subscriber).to_owned(),
                });
                continue;
            };
            let received: BTreeSet<u64> = deliveries.iter().map(|(o, _)| *o).collect();
            for (offset, id) in &self.acks {
                if !received.contains(offset) {
                    anomalies.push(Anomaly::Lost {
                        subscriber: (*subscriber).to_owned(),
                        offset: *offset,
                        id: id.clone(),
                    });
                }
            }
        }

        let distinct: BTreeSet<&String> = self.digests.values().collect();
        if distinct.len() > 1 {
            anomalies.push(Anomaly::NodesDisagree {
                digests: self.digests.clone(),
            });
        }

        if anomalies.is_empty() {
            Ok(())
        } else {
            Err(anomalies)
        }
    }
}

/// A digest of a node's stored log: FNV-1a (64 bit) over each message's offset, channel and
/// payload, in offset order, with the count. Equal logs give equal digests; it guards against
/// accidents, not forgery.
pub fn digest<'a>(messages: impl IntoIterator<Item = (u64, &'a str, &'a [u8])>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut count: u64 = 0;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (offset, channel, payload) in messages {
        eat(&offset.to_le_bytes());
        eat(&(channel.len() as u64).to_le_bytes());
        eat(channel.as_bytes());
        eat(&(payload.len() as u64).to_le_bytes());
        eat(payload);
        count += 1;
    }
    format!("{count}:{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three acked messages, delivered in order to two subscribers; nodes agree.
    fn good() -> History {
        let mut h = History::new();
        for (o, id) in [(1, "a"), (2, "b"), (3, "c")] {
            h.acked(o, id);
            h.delivered("s1", o, id);
            h.delivered("s2", o, id);
        }
        h.node_digest("sb1", "3:x");
        h.node_digest("sb2", "3:x");
        h
    }

    #[test]
    fn a_clean_history_passes() {
        good().check(&["s1", "s2"]).unwrap();
    }

    #[test]
    fn an_unacknowledged_extra_delivery_is_allowed() {
        let mut h = good();
        // Committed, but the ack was lost with the node that sent it.
        h.delivered("s1", 4, "d");
        h.delivered("s2", 4, "d");
        h.check(&["s1", "s2"]).unwrap();
    }

    #[test]
    fn a_lost_ack_is_reported_for_the_subscriber_that_missed_it() {
        let mut h = good();
        h.acked(4, "d");
        h.delivered("s1", 4, "d");
        assert_eq!(
            h.check(&["s1", "s2"]).unwrap_err(),
            vec![Anomaly::Lost {
                subscriber: "s2".into(),
                offset: 4,
                id: "d".into()
            }]
        );
        // A subscriber not counted as surviving is not owed it.
        h.check(&["s1"]).unwrap();
    }

    #[test]
    fn duplicates_and_reordering_are_reported() {
        let mut h = good();
        h.delivered("s1", 2, "b");
        h.delivered("s2", 1, "a");
        let anomalies = h.check(&["s1", "s2"]).unwrap_err();
        assert!(anomalies.contains(&Anomaly::Duplicate {
            subscriber: "s1".into(),
            offset: 2
        }));
        assert!(anomalies.contains(&Anomaly::Duplicate {
            subscriber: "s2".into(),
            offset: 1
        }));
        let mut h = History::new();
        h.acked(1, "a");
        h.acked(2, "b");
        h.delivered("s1", 2, "b");
        h.delivered("s1", 1, "a");
        assert_eq!(
            h.check(&["s1"]).unwrap_err(),
            vec![Anomaly::OutOfOrder {
                subscriber: "s1".into(),
                previous: 2,
                next: 1
            }]
        );
    }

    #[test]
    fn an_offset_naming_two_messages_is_reported() {
        // Two acks for one offset (a failover that reused it).
        let mut h = good();
        h.acked(3, "z");
        let anomalies = h.check(&["s1"]).unwrap_err();
        assert!(
            matches!(&anomalies[0], Anomaly::OffsetReused { offset: 3, seen } if seen.len() == 2)
        );
        // A subscriber that saw another message at an acked offset.
        let mut h = History::new();
        h.acked(1, "a");
        h.delivered("s1", 1, "q");
        assert!(matches!(
            &h.check(&[]).unwrap_err()[0],
            Anomaly::OffsetReused { offset: 1, .. }
        ));
    }

    #[test]
    fn disagreeing_nodes_and_silent_subscribers_are_reported() {
        let mut h = good();
        h.node_digest("sb3", "2:y");
        assert!(matches!(
            &h.check(&["s1", "s2"]).unwrap_err()[..],
            [Anomaly::NodesDisagree { .. }]
        ));
        assert_eq!(
            good().check(&["s3"]).unwrap_err(),
            vec![Anomaly::UnknownSubscriber {
                subscriber: "s3".into()
            }]
        );
    }

    #[test]
    fn the_digest_depends_on_every_field_and_the_order() {
        let base = digest([(1, "a.b", &b"x"[..]), (2, "a.b", b"y")]);
        assert_eq!(base, digest([(1, "a.b", &b"x"[..]), (2, "a.b", b"y")]));
        for other in [
            digest([(1, "a.b", &b"x"[..]), (3, "a.b", b"y")]),
            digest([(1, "a.c", &b"x"[..]), (2, "a.b", b"y")]),
            digest([(1, "a.b", &b"x"[..]), (2, "a.b", b"z")]),
            digest([(2, "a.b", &b"y"[..]), (1, "a.b", b"x")]),
            digest([(1, "a.b", &b"x"[..])]),
        ] {
            assert_ne!(base, other);
        }
    }
}
