//! The per-channel throttle: at most one delivery per channel per interval. A message arriving
//! inside the interval is held, replacing any held before it (counted as skipped), and the held
//! message is sent when the interval ends — the trailing edge — so a throttled consumer always
//! ends on the latest value.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outgoing::SharedMessage;

struct ChannelState {
    last_sent: Instant,
    held: Option<(Arc<SharedMessage>, u64)>,
}

/// Throttle state of one subscription. Memory follows the number of channels seen within the
/// last interval: idle channels are forgotten.
pub(super) struct Throttle {
    interval: Duration,
    channels: HashMap<String, ChannelState>,
}

impl Throttle {
    /// A throttle of `interval` per channel.
    pub(super) fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            channels: HashMap::new(),
        }
    }

    /// Takes `message` (which replaces `skipped` earlier ones); returns it with its skipped count
    /// when it may be sent now, or holds it.
    pub(super) fn offer(
        &mut self,
        message: &Arc<SharedMessage>,
        skipped: u64,
        now: Instant,
    ) -> Option<(Arc<SharedMessage>, u64)> {
        let interval = self.interval;
        match self.channels.get_mut(&message.message.channel) {
            Some(state) if now < state.last_sent + interval => {
                let skipped = match state.held.take() {
                    Some((_, held_skipped)) => held_skipped + 1 + skipped,
                    None => skipped,
                };
                state.held = Some((Arc::clone(message), skipped));
                None
            }
            Some(state) => {
                state.last_sent = now;
                Some((Arc::clone(message), skipped))
            }
            None => {
                self.channels.insert(
                    message.message.channel.clone(),
                    ChannelState {
                        last_sent: now,
                        held: None,
                    },
                );
                Some((Arc::clone(message), skipped))
            }
        }
    }

    /// When the next held message is due.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.channels
            .values()
            .filter(|s| s.held.is_some())
            .map(|s| s.last_sent + self.interval)
            .min()
    }

    /// The held messages whose interval has ended, in offset order; forgets idle channels.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(Arc<SharedMessage>, u64)> {
        let interval = self.interval;
        let mut due = Vec::new();
        self.channels.retain(|_, state| {
            if now >= state.last_sent + interval {
                match state.held.take() {
                    Some(held) => {
                        state.last_sent = now;
                        due.push(held);
                        true
                    }
                    None => false,
                }
            } else {
                true
            }
        });
        due.sort_by_key(|(m, _)| m.offset);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64, channel: &str) -> Arc<SharedMessage> {
        SharedMessage::new(Arc::new(crate::message::StoredMessage {
            offset,
            publish_time_us: 0,
            message: crate::message::NewMessage::on_channel(channel, bytes::Bytes::new()),
            chain: Vec::new(),
        }))
    }

    #[test]
    fn holds_inside_the_interval_and_sends_the_latest_on_the_trailing_edge() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(Duration::from_millis(100));
        assert_eq!(
            throttle
                .offer(&msg(1, "a.b"), 0, t0)
                .map(|(m, s)| (m.offset, s)),
            Some((1, 0))
        );
        assert!(throttle
            .offer(&msg(2, "a.b"), 0, t0 + Duration::from_millis(10))
            .is_none());
        assert!(throttle
            .offer(&msg(3, "a.b"), 0, t0 + Duration::from_millis(20))
            .is_none());
        // Another channel is throttled on its own.
        assert!(throttle
            .offer(&msg(4, "a.c"), 0, t0 + Duration::from_millis(30))
            .is_some());
        assert_eq!(throttle.deadline(), Some(t0 + Duration::from_millis(100)));
        assert!(throttle.take_due(t0 + Duration::from_millis(99)).is_empty());
        let due = throttle.take_due(t0 + Duration::from_millis(100));
        assert_eq!(
            due.iter().map(|(m, s)| (m.offset, *s)).collect::<Vec<_>>(),
            vec![(3, 1)]
        );
        assert_eq!(throttle.deadline(), None);
    }
}
