//! The hub: on every node, after apply, matches new messages against local subscriptions and puts
//! each into the matching subscriptions' mailboxes.
//!
//! A mailbox is bounded. When one is full the hub does not wait and does not grow it: it marks the
//! subscription *lagging* and stops feeding it. The subscription's task then reads what it missed
//! from the store, starting at its own next offset, and re-arms itself with [`Hub::rearm`]. Re-arming
//! happens under the hub's lock and returns the last offset dispatched so far (`L`): every message
//! up to `L` is in the store, every later one will be in the mailbox — so the switch from store to
//! memory has no gap and no duplicate. A slow consumer therefore never slows a publisher, another
//! consumer, or the broker's memory.
//!
//! Mailboxes are also bounded together: the bytes queued in all of them are counted against
//! `subscriptions.max_buffered_bytes`. When a dispatch leaves the sum over it, the hub switches the
//! subscriptions with the most bytes queued (the furthest behind) to the store the same way, until
//! the sum is back under three quarters of the bound, so thousands of consumers that never read
//! cost at most that bound here, however many there are (issue 20).
//!
//! Matching uses a segment trie ([`SubscriptionTrie`]), so its cost follows the channel's depth and
//! the number of matches, not the number of subscriptions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::channel::{Pattern, SubscriptionTrie};
use crate::fanout::outgoing::SharedMessage;
use crate::message::StoredMessage;
use crate::state::Announce;

/// Identifies a subscription within this node's hub.
pub(crate) type SubscriptionId = u64;

/// A subscription task takes at most this many messages from its mailbox at once, so what it
/// holds while it waits for its client stays small; the rest stay queued and counted.
const TAKE_AT_MOST: usize = 256;

/// The bounds on mailboxes: each one's, and all of theirs together.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailboxLimits {
    /// Messages one mailbox may hold.
    pub depth: usize,
    /// Bytes one mailbox may hold.
    pub bytes: usize,
    /// Bytes all mailboxes may hold together.
    pub total_bytes: usize,
}

/// Bytes queued in every mailbox of a hub.
#[derive(Default)]
struct QueuedBytes(AtomicUsize);

impl QueuedBytes {
    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn remove(&self, bytes: usize) {
        self.0.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A subscription's bounded queue of live messages: bounded in messages and in bytes.
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    ready: Notify,
    capacity: usize,
    capacity_bytes: usize,
    /// The hub's sum over all mailboxes, kept up to date with this one's `bytes`.
    queued: Arc<QueuedBytes>,
}

#[derive(Default)]
struct MailboxState {
    queue: VecDeque<Arc<SharedMessage>>,
    /// Bytes of the queued messages (their approximate size).
    bytes: usize,
    /// The most bytes ever queued.
    peak_bytes: usize,
    /// The hub dropped messages for this subscription; it must read the store before going on.
    lagging: bool,
    /// Times the subscription was switched to the store.
    slow_switches: u64,
}

/// A mailbox's accounting, for `ListSubscriptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MailboxStats {
    /// Messages queued now.
    pub messages: usize,
    /// Bytes queued now.
    pub bytes: usize,
    /// The most bytes ever queued.
    pub peak_bytes: usize,
    /// The bound on queued bytes.
    pub capacity_bytes: usize,
    /// Whether the subscription is being served from the store.
    pub lagging: bool,
    /// Times it was switched to the store.
    pub slow_switches: u64,
}

/// What a subscription finds in its mailbox.
pub(crate) enum MailboxItems {
    /// Live messages, in offset order.
    Messages(Vec<Arc<SharedMessage>>),
    /// Messages were dropped: read the store from the next offset, then [`Hub::rearm`].
    Lagging,
}

impl Mailbox {
    /// The mailbox's accounting now.
    pub(crate) fn stats(&self) -> MailboxStats {
        let state = self.lock();
        MailboxStats {
            messages: state.queue.len(),
            bytes: state.bytes,
            peak_bytes: state.peak_bytes,
            capacity_bytes: self.capacity_bytes,
            lagging: state.lagging,
            slow_switches: state.slow_switches,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is something: queued messages (the oldest, at most [`TAKE_AT_MOST`]), or
    /// the lagging mark.
    pub(crate) async fn next(&self) -> MailboxItems {
        loop {
            {
                let mut state = self.lock();
                if !state.queue.is_empty() {
                    let take = state.queue.len().min(TAKE_AT_MOST);
                    let taken: Vec<_> = state.queue.drain(..take).collect();
                    let bytes: usize = taken.iter().map(|m| m.message.approximate_size()).sum();
                    state.bytes -= bytes;
                    self.queued.remove(bytes);
                    if !state.queue.is_empty() {
                        // Keep the permit so the rest is taken without waiting for a push.
                        self.ready.notify_one();
                    }
                    return MailboxItems::Messages(taken);
                }
                if state.lagging {
                    return MailboxItems::Lagging;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push between the check above
            // and this await is not lost.
            self.ready.notified().await;
        }
    }

    /// Queues `message` unless the mailbox is full; returns false (and marks lagging) if it is.
    fn offer(&self, message: &Arc<SharedMessage>) -> bool {
        let mut state = self.lock();
        if state.lagging {
            return false;
        }
        let size = message.message.approximate_size();
        if state.queue.len() >= self.capacity || state.bytes + size > self.capacity_bytes {
            self.switch_to_store(state);
            return false;
        }
        state.bytes += size;
        state.peak_bytes = state.peak_bytes.max(state.bytes);
        state.queue.push_back(Arc::clone(message));
        drop(state);
        self.queued.add(size);
        self.ready.notify_one();
        true
    }

    /// Empties the queue (its bytes are returned to the hub's sum) and marks the subscription
    /// lagging, so its task reads the store from its own position.
    fn switch_to_store(&self, mut state: MutexGuard<'_, MailboxState>) {
        self.empty(&mut state);
        state.lagging = true;
        state.slow_switches += 1;
        drop(state);
        crate::observability::metrics::slow_consumer_switch();
        self.ready.notify_one();
    }

    /// Empties the queue, returning its bytes to the hub's sum.
    fn empty(&self, state: &mut MailboxState) {
        state.queue.clear();
        self.queued.remove(state.bytes);
        state.bytes = 0;
    }
}

struct Entry {
    pattern: Pattern,
    mailbox: Arc<Mailbox>,
}

struct HubState {
    trie: SubscriptionTrie<SubscriptionId>,
    subscriptions: HashMap<SubscriptionId, Entry>,
    next_id: SubscriptionId,
    /// The highest offset dispatched (or, at start, already in the store).
    last_dispatched: u64,
    /// Reused between dispatches to collect matches without allocating.
    matched: Vec<SubscriptionId>,
}

/// The hub; cheap to clone.
#[derive(Clone)]
pub(crate) struct Hub {
    state: Arc<Mutex<HubState>>,
    limits: MailboxLimits,
    queued: Arc<QueuedBytes>,
}

/// A live registration; dropping it removes the subscription from the hub.
pub(crate) struct Registration {
    hub: Hub,
    id: SubscriptionId,
    /// Where the hub puts this subscription's messages.
    pub mailbox: Arc<Mailbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        if let Some(entry) = state.subscriptions.remove(&self.id) {
            state.trie.remove(&entry.pattern, &self.id);
        }
        drop(state);
        // What it still held is no longer queued for anyone.
        self.mailbox.empty(&mut self.mailbox.lock());
    }
}

impl Registration {
    /// Clears the lagging mark; returns the last offset dispatched. See the module docs.
    pub(crate) fn rearm(&self) -> u64 {
        self.hub.rearm(&self.mailbox)
    }
}

impl Hub {
    /// A hub whose store already holds offsets up to `last_offset`, with mailboxes bounded by
    /// `limits`.
    pub(crate) fn new(last_offset: u64, limits: MailboxLimits) -> Hub {
        Hub {
            state: Arc::new(Mutex::new(HubState {
                trie: SubscriptionTrie::new(),
                subscriptions: HashMap::new(),
                next_id: 1,
                last_dispatched: last_offset,
                matched: Vec::new(),
            })),
            limits,
            queued: Arc::default(),
        }
    }

    /// Bytes queued in all mailboxes now.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a subscription; returns it with the last offset dispatched so far. Messages after
    /// that offset will arrive in its mailbox; earlier ones are in the store.
    pub(crate) fn register(&self, pattern: Pattern) -> (Registration, u64) {
        let mailbox = Arc::new(Mailbox {
            state: Mutex::new(MailboxState::default()),
            ready: Notify::new(),
            capacity: self.limits.depth,
            capacity_bytes: self.limits.bytes,
            queued: Arc::clone(&self.queued),
        });
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.trie.insert(&pattern, id);
        state.subscriptions.insert(
            id,
            Entry {
                pattern,
                mailbox: Arc::clone(&mailbox),
            },
        );
        let last = state.last_dispatched;
        drop(state);
        (
            Registration {
                hub: self.clone(),
                id,
                mailbox,
            },
            last,
        )
    }

    fn rearm(&self, mailbox: &Mailbox) -> u64 {
        let state = self.lock();
        let mut mb = mailbox.lock();
        mb.lagging = false;
        mailbox.empty(&mut mb);
        state.last_dispatched
    }

    /// Number of live subscriptions on this node.
    #[cfg(test)]
    pub(crate) fn subscription_count(&self) -> usize {
        self.lock().subscriptions.len()
    }

    /// Offers freshly applied messages (in offset order) to every matching subscription. Every
    /// subscription a message matches gets the same [`SharedMessage`], so it is encoded once.
    pub(crate) fn dispatch(&self, messages: &[Arc<StoredMessage>]) {
        let mut guard = self.lock();
        let state = &mut *guard;
        for message in messages {
            state.matched.clear();
            let matched = &mut state.matched;
            state
                .trie
                .for_each_match(&message.message.channel, |id| matched.push(*id));
            if !state.matched.is_empty() {
                let shared = SharedMessage::new(Arc::clone(message));
                for id in &state.matched {
                    if let Some(entry) = state.subscriptions.get(id) {
                        entry.mailbox.offer(&shared);
                    }
                }
            }
            state.last_dispatched = message.offset;
        }
        if self.queued.get() > self.limits.total_bytes {
            self.shed(state);
        }
    }

    /// Switches the subscriptions with the most bytes queued to the store until the mailboxes
    /// together hold at most three quarters of their bound (the room left keeps this from running
    /// on every dispatch while consumers stay stalled).
    fn shed(&self, state: &HubState) {
        let mut queued: Vec<(usize, &Arc<Mailbox>)> = state
            .subscriptions
            .values()
            .map(|entry| (entry.mailbox.lock().bytes, &entry.mailbox))
            .filter(|(bytes, _)| *bytes > 0)
            .collect();
        queued.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let target = self.limits.total_bytes / 4 * 3;
        let mut switched = 0u64;
        for (_, mailbox) in queued {
            if self.queued.get() <= target {
                break;
            }
            let mb = mailbox.lock();
            if !mb.lagging {
                mailbox.switch_to_store(mb);
                switched += 1;
            }
        }
        crate::observability::metrics::buffer_budget_switches(switched);
    }

    /// The store was replaced (a snapshot was installed): every subscription re-reads it.
    pub(crate) fn reset(&self, last_offset: u64) {
        let mut state = self.lock();
        state.last_dispatched = last_offset;
        for entry in state.subscriptions.values() {
            let mut mb = entry.mailbox.lock();
            entry.mailbox.empty(&mut mb);
            mb.lagging = true;
            drop(mb);
            entry.mailbox.ready.notify_one();
        }
    }
}

/// The state announces applied messages to the hub.
impl Announce for Hub {
    fn applied(&self, messages: &[Arc<StoredMessage>]) {
        self.dispatch(messages);
    }

    fn reset(&self, last_offset: u64) {
        Hub::reset(self, last_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelLimits;
    use crate::message::NewMessage;

    fn msg(offset: u64, channel: &str) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            offset,
            publish_time_us: 1,
            message: NewMessage::on_channel(channel, bytes::Bytes::new()),
            chain: Vec::new(),
        })
    }

    fn pattern(p: &str) -> Pattern {
        Pattern::parse(p, &ChannelLimits::default()).unwrap()
    }

    fn limits(depth: usize, bytes: usize, total_bytes: usize) -> MailboxLimits {
        MailboxLimits {
            depth,
            bytes,
            total_bytes,
        }
    }

    fn is_lagging(registration: &Registration) -> bool {
        registration.mailbox.stats().lagging
    }

    #[tokio::test]
    async fn delivers_matching_messages_only() {
        let hub = Hub::new(0, limits(8, 1 << 20, usize::MAX));
        let (reg, last) = hub.register(pattern("a.*"));
        assert_eq!(last, 0);
        hub.dispatch(&[msg(1, "a.b"), msg(2, "c.d"), msg(3, "a.c")]);
        match reg.mailbox.next().await {
            MailboxItems::Messages(m) => {
                assert_eq!(m.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 3])
            }
            MailboxItems::Lagging => panic!("not lagging"),
        }
        assert_eq!(hub.subscription_count(), 1);
        drop(reg);
        assert_eq!(hub.subscription_count(), 0);
    }

    #[tokio::test]
    async fn overflow_marks_lagging_and_rearm_returns_the_last_offset() {
        let hub = Hub::new(10, limits(2, 1 << 20, usize::MAX));
        let (reg, last) = hub.register(pattern(">"));
        assert_eq!(last, 10);
        hub.dispatch(&[
            msg(11, "a.b"),
            msg(12, "a.b"),
            msg(13, "a.b"),
            msg(14, "a.b"),
        ]);
        assert!(matches!(reg.mailbox.next().await, MailboxItems::Lagging));
        assert_eq!(reg.rearm(), 14);
        hub.dispatch(&[msg(15, "a.b")]);
        match reg.mailbox.next().await {
            MailboxItems::Messages(m) => assert_eq!(m[0].offset, 15),
            MailboxItems::Lagging => panic!("re-armed"),
        }
    }

    #[tokio::test]
    async fn over_the_total_bound_the_furthest_behind_are_switched_to_the_store() {
        let size = msg(1, "a.b").message.approximate_size();
        // Each mailbox alone could hold 100 messages; together they may hold 10.
        let hub = Hub::new(0, limits(100, 100 * size, 10 * size));
        let (behind, _) = hub.register(pattern("a.*"));
        let (also_behind, _) = hub.register(pattern("a.*"));
        let (keeping_up, _) = hub.register(pattern("a.*"));
        // Four messages for all three: 12 queued, over the bound of 10.
        hub.dispatch(&[msg(1, "a.b"), msg(2, "a.b")]);
        assert!(
            matches!(keeping_up.mailbox.next().await, MailboxItems::Messages(m) if m.len() == 2)
        );
        assert_eq!(hub.queued_bytes(), 4 * size);
        hub.dispatch(&[msg(3, "a.b"), msg(4, "a.b"), msg(5, "a.b"), msg(6, "a.b")]);
        // 6 + 6 + 4 = 16 > 10: the two holding 6 are switched; 4 (under 3/4 of 10) remain.
        assert!(is_lagging(&behind));
        assert!(is_lagging(&also_behind));
        assert!(!is_lagging(&keeping_up));
        assert_eq!(hub.queued_bytes(), 4 * size);
        assert!(matches!(behind.mailbox.next().await, MailboxItems::Lagging));
        // A switched subscription catches up from the store and is fed from memory again.
        assert_eq!(behind.rearm(), 6);
        hub.dispatch(&[msg(7, "a.b")]);
        assert!(
            matches!(behind.mailbox.next().await, MailboxItems::Messages(m) if m[0].offset == 7)
        );
        // Memory goes back when subscriptions go.
        drop(keeping_up);
        drop(also_behind);
        drop(behind);
        assert_eq!(hub.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_task_takes_a_bounded_part_of_its_mailbox_and_the_rest_stays_counted() {
        let size = msg(1, "a.b").message.approximate_size();
        let hub = Hub::new(0, limits(1000, 1000 * size, usize::MAX));
        let (reg, _) = hub.register(pattern(">"));
        let batch: Vec<_> = (1..=300).map(|o| msg(o, "a.b")).collect();
        hub.dispatch(&batch);
        let MailboxItems::Messages(first) = reg.mailbox.next().await else {
            panic!("not lagging")
        };
        assert_eq!(first.len(), TAKE_AT_MOST);
        assert_eq!(hub.queued_bytes(), (300 - TAKE_AT_MOST) * size);
        let MailboxItems::Messages(rest) = reg.mailbox.next().await else {
            panic!("not lagging")
        };
        assert_eq!(
            rest.first().map(|m| m.offset),
            Some(TAKE_AT_MOST as u64 + 1)
        );
        assert_eq!(hub.queued_bytes(), 0);
    }
}
