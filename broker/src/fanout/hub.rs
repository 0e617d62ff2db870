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
//! Ephemeral messages (never stored, [`crate::fanout::ephemeral`]) go into a small queue of their
//! own in each mailbox that takes them: a full one drops its oldest, and a lagging subscription
//! does not read them back (there is nothing to read back).
//!
//! A subscription whose mailbox is empty while its task waits on it has handled every message the
//! hub dispatched, including the offsets between them that did not match its pattern; the
//! mailbox's [`MailboxStats::caught_up_through`] says so, and the subscription's lag is then 0
//! however busy other channels are.
//!
//! Matching uses a segment trie ([`SubscriptionTrie`]), so its cost follows the channel's depth and
//! the number of matches, not the number of subscriptions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::channel::{Pattern, SubscriptionTrie};
use crate::fanout::catch_up_budget::CatchUpBudget;
use crate::fanout::outgoing::SharedMessage;
use crate::message::StoredMessage;
use crate::state::Announce;

/// Identifies a subscription within this node's hub.
pub(crate) type SubscriptionId = u64;

/// Ephemeral messages a mailbox holds at most; past it the oldest is dropped.
const EPHEMERAL_QUEUE: usize = 256;

/// A subscription's bounded queue of live messages: bounded in messages and in bytes.
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    ready: Notify,
    capacity: usize,
    capacity_bytes: usize,
    /// Whether this subscription takes ephemeral messages.
    takes_ephemeral: bool,
    /// The hub's last dispatched offset, shared by every mailbox (see [`Hub::dispatched`]).
    dispatched: Arc<AtomicU64>,
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
    /// Ephemeral messages waiting, oldest first (at most [`EPHEMERAL_QUEUE`]).
    ephemeral: VecDeque<Arc<SharedMessage>>,
    /// Ephemeral messages were taken last: when both kinds wait, stored ones go next, so a
    /// steady stream of ephemeral messages cannot hold stored ones back until they overflow.
    stored_next: bool,
    /// The task waits on the mailbox having handled everything it took from it (false until
    /// it first waits: before that it reads the store).
    idle: bool,
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
    /// When the mailbox is empty and its task waits on it: the hub's last dispatched offset,
    /// every offset up to which the subscription has handled (delivered, or passed over as not
    /// matching). `None` while it has messages to take, reads the store, or is busy sending.
    pub caught_up_through: Option<u64>,
}

/// What a subscription finds in its mailbox.
pub(crate) enum MailboxItems {
    /// Live messages, in offset order.
    Messages(Vec<Arc<SharedMessage>>),
    /// Messages were dropped: read the store from the next offset, then [`Hub::rearm`].
    Lagging,
    /// Ephemeral messages, in the order they came; they have no offset.
    Ephemeral(Vec<Arc<SharedMessage>>),
}

impl Mailbox {
    /// The mailbox's accounting now.
    pub(crate) fn stats(&self) -> MailboxStats {
        // Read before the lock: the hub publishes an offset only after offering every message up
        // to it, so a mailbox found idle and empty afterwards has handled all of them.
        let dispatched = self.dispatched.load(Ordering::Acquire);
        let state = self.lock();
        let caught_up = state.idle && state.queue.is_empty() && !state.lagging;
        MailboxStats {
            caught_up_through: caught_up.then_some(dispatched),
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

    /// Waits until there is something: queued messages (all of them are taken), or the lagging mark.
    pub(crate) async fn next(&self) -> MailboxItems {
        loop {
            {
                let mut state = self.lock();
                // An ephemeral message is worth something only now, so it goes first — but
                // in turns with stored ones when both wait.
                let stored_waits = !state.queue.is_empty();
                let stored_turn = state.stored_next && stored_waits;
                state.idle = false;
                if !state.ephemeral.is_empty() && !stored_turn {
                    state.stored_next = true;
                    return MailboxItems::Ephemeral(state.ephemeral.drain(..).collect());
                }
                state.stored_next = false;
                if stored_waits {
                    state.bytes = 0;
                    return MailboxItems::Messages(state.queue.drain(..).collect());
                }
                if state.lagging {
                    return MailboxItems::Lagging;
                }
                // Called again, so whatever it took before is handled.
                state.idle = true;
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
            state.queue.clear();
            state.bytes = 0;
            state.lagging = true;
            state.slow_switches += 1;
            drop(state);
            crate::observability::metrics::slow_consumer_switch();
            self.ready.notify_one();
            return false;
        }
        state.bytes += size;
        state.peak_bytes = state.peak_bytes.max(state.bytes);
        state.queue.push_back(Arc::clone(message));
        drop(state);
        self.ready.notify_one();
        true
    }
}

impl Mailbox {
    /// Queues an ephemeral message if this subscription takes them, dropping the oldest one
    /// waiting when the queue is full; returns whether it was queued.
    fn offer_ephemeral(&self, message: &Arc<SharedMessage>) -> bool {
        if !self.takes_ephemeral {
            return false;
        }
        let mut state = self.lock();
        if state.ephemeral.len() >= EPHEMERAL_QUEUE {
            state.ephemeral.pop_front();
            crate::observability::metrics::ephemeral("dropped", 1);
        }
        state.ephemeral.push_back(Arc::clone(message));
        drop(state);
        self.ready.notify_one();
        true
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
    /// The same, readable without the hub's lock by the mailboxes (for their lag): written after
    /// the messages up to it were offered.
    dispatched: Arc<AtomicU64>,
    /// Reused between dispatches to collect matches without allocating.
    matched: Vec<SubscriptionId>,
}

/// The hub; cheap to clone.
#[derive(Clone)]
pub(crate) struct Hub {
    state: Arc<Mutex<HubState>>,
    mailbox_capacity: usize,
    mailbox_capacity_bytes: usize,
    catch_up: Arc<CatchUpBudget>,
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
    }
}

impl Registration {
    /// Clears the lagging mark; returns the last offset dispatched. See the module docs.
    pub(crate) fn rearm(&self) -> u64 {
        self.hub.rearm(&self.mailbox)
    }
}

impl Hub {
    /// A hub whose store already holds offsets up to `last_offset`; each mailbox holds at most
    /// `mailbox_capacity` messages and `mailbox_capacity_bytes` bytes, and what its subscriptions
    /// read from the store is bounded by `catch_up`.
    pub(crate) fn new(
        last_offset: u64,
        mailbox_capacity: usize,
        mailbox_capacity_bytes: usize,
        catch_up: Arc<CatchUpBudget>,
    ) -> Hub {
        Hub {
            state: Arc::new(Mutex::new(HubState {
                trie: SubscriptionTrie::new(),
                subscriptions: HashMap::new(),
                next_id: 1,
                last_dispatched: last_offset,
                dispatched: Arc::new(AtomicU64::new(last_offset)),
                matched: Vec::new(),
            })),
            mailbox_capacity,
            mailbox_capacity_bytes,
            catch_up,
        }
    }

    /// The budget for what this hub's subscriptions read from the store.
    pub(crate) fn catch_up_budget(&self) -> &Arc<CatchUpBudget> {
        &self.catch_up
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a subscription, which takes ephemeral messages if `ephemeral`; returns it with the
    /// last offset dispatched so far. Messages after that offset will arrive in its mailbox;
    /// earlier ones are in the store.
    pub(crate) fn register(&self, pattern: Pattern, ephemeral: bool) -> (Registration, u64) {
        let mut state = self.lock();
        let mailbox = Arc::new(Mailbox {
            state: Mutex::new(MailboxState::default()),
            ready: Notify::new(),
            capacity: self.mailbox_capacity,
            capacity_bytes: self.mailbox_capacity_bytes,
            takes_ephemeral: ephemeral,
            dispatched: Arc::clone(&state.dispatched),
        });
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
        mb.queue.clear();
        mb.bytes = 0;
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
        state
            .dispatched
            .store(state.last_dispatched, Ordering::Release);
    }

    /// Offers an ephemeral message (offset 0, never stored) to every matching subscription that
    /// takes them; returns to how many.
    pub(crate) fn dispatch_ephemeral(&self, message: &Arc<StoredMessage>) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.matched.clear();
        let matched = &mut state.matched;
        state
            .trie
            .for_each_match(&message.message.channel, |id| matched.push(*id));
        if state.matched.is_empty() {
            return 0;
        }
        let shared = SharedMessage::new(Arc::clone(message));
        state
            .matched
            .iter()
            .filter_map(|id| state.subscriptions.get(id))
            .filter(|entry| entry.mailbox.offer_ephemeral(&shared))
            .count()
    }

    /// The store was replaced (a snapshot was installed): every subscription re-reads it.
    pub(crate) fn reset(&self, last_offset: u64) {
        let mut state = self.lock();
        state.last_dispatched = last_offset;
        for entry in state.subscriptions.values() {
            let mut mb = entry.mailbox.lock();
            mb.queue.clear();
            mb.bytes = 0;
            mb.lagging = true;
            drop(mb);
            entry.mailbox.ready.notify_one();
        }
        // After the lagging marks: no mailbox reads as caught up through the new offset before
        // it has read the new store.
        state.dispatched.store(last_offset, Ordering::Release);
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

    #[tokio::test]
    async fn delivers_matching_messages_only() {
        let hub = Hub::new(0, 8, 1 << 20, CatchUpBudget::new(1 << 20));
        let (reg, last) = hub.register(pattern("a.*"), true);
        assert_eq!(last, 0);
        hub.dispatch(&[msg(1, "a.b"), msg(2, "c.d"), msg(3, "a.c")]);
        match reg.mailbox.next().await {
            MailboxItems::Messages(m) => {
                assert_eq!(m.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 3])
            }
            MailboxItems::Lagging | MailboxItems::Ephemeral(_) => panic!("not lagging"),
        }
        assert_eq!(hub.subscription_count(), 1);
        drop(reg);
        assert_eq!(hub.subscription_count(), 0);
    }

    #[tokio::test]
    async fn overflow_marks_lagging_and_rearm_returns_the_last_offset() {
        let hub = Hub::new(10, 2, 1 << 20, CatchUpBudget::new(1 << 20));
        let (reg, last) = hub.register(pattern(">"), true);
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
            MailboxItems::Lagging | MailboxItems::Ephemeral(_) => panic!("re-armed"),
        }
    }

    #[test]
    fn a_subscription_waiting_on_an_empty_mailbox_has_passed_every_offset_dispatched() {
        use futures::FutureExt;
        let hub = Hub::new(0, 8, 1 << 20, CatchUpBudget::new(1 << 20));
        let (reg, _) = hub.register(pattern("a.*"), false);
        let caught_up = || reg.mailbox.stats().caught_up_through;
        assert_eq!(
            caught_up(),
            None,
            "its task has not waited on the mailbox yet"
        );
        assert!(
            reg.mailbox.next().now_or_never().is_none(),
            "nothing to take"
        );
        hub.dispatch(&[msg(1, "c.d"), msg(2, "c.d")]);
        assert_eq!(
            caught_up(),
            Some(2),
            "other channels' offsets are passed over"
        );
        hub.dispatch(&[msg(3, "a.b"), msg(4, "c.d")]);
        assert_eq!(caught_up(), None, "a message of its own waits");
        let taken = reg.mailbox.next().now_or_never();
        assert!(matches!(taken, Some(MailboxItems::Messages(m)) if m[0].offset == 3));
        assert_eq!(caught_up(), None, "taken, and not yet handled");
        assert!(reg.mailbox.next().now_or_never().is_none());
        assert_eq!(caught_up(), Some(4), "handled, and waiting again");
        hub.reset(9);
        assert_eq!(caught_up(), None, "a new store must be read first");
    }

    #[tokio::test]
    async fn ephemeral_messages_go_first_to_the_subscriptions_that_take_them_and_drop_the_oldest() {
        let hub = Hub::new(0, 8, 1 << 20, CatchUpBudget::new(1 << 20));
        let (takes, _) = hub.register(pattern("a.>"), true);
        let (refuses, _) = hub.register(pattern("a.>"), false);
        hub.dispatch(&[msg(1, "a.b")]);
        for _ in 0..EPHEMERAL_QUEUE + 2 {
            assert_eq!(hub.dispatch_ephemeral(&msg(0, "a.b")), 1);
        }
        assert_eq!(hub.dispatch_ephemeral(&msg(0, "b.c")), 0);
        match takes.mailbox.next().await {
            MailboxItems::Ephemeral(m) => assert_eq!(m.len(), EPHEMERAL_QUEUE),
            _ => panic!("ephemeral messages come first"),
        }
        assert!(
            matches!(takes.mailbox.next().await, MailboxItems::Messages(m) if m[0].offset == 1)
        );
        assert!(matches!(refuses.mailbox.next().await, MailboxItems::Messages(m) if m.len() == 1));
        // Both kinds waiting: they take turns, so stored messages are not held back.
        hub.dispatch(&[msg(2, "a.b")]);
        hub.dispatch_ephemeral(&msg(0, "a.b"));
        assert!(matches!(
            takes.mailbox.next().await,
            MailboxItems::Ephemeral(_)
        ));
        hub.dispatch_ephemeral(&msg(0, "a.b"));
        assert!(
            matches!(takes.mailbox.next().await, MailboxItems::Messages(m) if m[0].offset == 2)
        );
        assert!(matches!(
            takes.mailbox.next().await,
            MailboxItems::Ephemeral(_)
        ));
    }
}
