//! One subscription: the task that feeds a `Subscribe` stream, and the flow control around it.
//!
//! ```text
//!             publish ─▶ apply ─▶ store ─┬─▶ hub ─▶ mailbox (bounded) ─▶ task ─▶ stream ─▶ client
//!                                        │                                 ▲
//!                                        └──────── catch-up reads ─────────┘  (when lagging)
//! ```
//! The task registers with the [`Hub`], works out its first offset, sends `Subscribed`, reads what
//! it must from the store (replay), then follows its mailbox. When the hub marks it lagging (its
//! mailbox overflowed) it reads the store again from its own next offset and re-arms (see
//! [`crate::fanout::hub`] for why that has no gap and no duplicate). So memory per subscription is bounded
//! by its mailbox, and a slow consumer never slows anyone else.
//!
//! On top of that path, per subscription (see docs/FLOW.md):
//! - **policy**: LOSSLESS delivers everything; CONFLATE delivers, of what it finds behind, only the
//!   latest message per channel (with `skipped`); DROP_OLDEST skips what is more than `window`
//!   offsets behind and says so with a `Gap`.
//! - **throttle**: at most one delivery per channel per interval; the latest held message is sent
//!   at the end of the interval (trailing edge), with `skipped`.
//! - **credits**: with `max_unacked`, the task stops sending once that many deliveries wait for an
//!   acknowledgement, and goes on when `Ack` returns some.
//! - **durable consumers**: deliveries not acknowledged within the ack timeout are sent again
//!   (`redelivery`); the acknowledged offset is kept by the broker (see the edge's `Ack`).
//!
//! What the task sends is an [`Outgoing`] item: a delivery carries the message's protobuf encoding,
//! made once and shared by every subscription it matches ([`super::outgoing`]).
//!
//! **Batches.** A subscription that asked for them (`max_batch` above 1) gets the deliveries that
//! are ready at once — a run taken from its mailbox, a page read while catching up — packed into
//! one [`Outgoing::Batch`] of at most `max_batch` deliveries and about [`BATCH_BYTES`]: one
//! stream item, one wake-up of the connection and one gRPC message for the run instead of one
//! per message. The task never waits to fill a batch: what it packed is sent before it waits for
//! anything (its mailbox, a credit, the catch-up budget, the next page), so no delivery is later
//! than it would have been alone. Anything else it sends (a `Gap`, a redelivery) goes after the
//! batch packed so far, so order is kept and a gap ends a batch. Credits and the in-flight
//! accounting count the messages inside.
//!
//! The task ends when the client goes away, when the broker shuts down (with UNAVAILABLE
//! `SHUTTING_DOWN`), when a newer subscription takes over its durable name or its consumer is
//! deleted, or on a store error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::catch_up_budget::Reader;
use super::outgoing::{Delivery, GapReason, Outgoing, Packer, SharedMessage};
use super::registry::{Control, FlowPolicy, Pending, Registered};
use super::throttle::Throttle;
use crate::channel::Pattern;
use crate::error::{BrokerError, Reason};
use crate::fanout::hub::{Hub, MailboxItems};
use crate::message::now_us;
use crate::observability::metrics::{self, DeliveryMetrics};
use crate::observability::trace;
use crate::shutdown::ShutdownSignal;
use crate::state::store::{MessageStore, ReadRange};

/// Messages read from the store per page while catching up.
const CATCH_UP_PAGE: usize = 256;
/// Bytes read per page while catching up, when the catch-up budget has them.
const CATCH_UP_BYTES: usize = 1024 * 1024;
/// Batches visited per page while catching up.
const CATCH_UP_BATCHES: usize = 64;
/// CONFLATE keeps at most this many channels' latest messages at once while catching up; past
/// it, what it holds is delivered early (still the latest so far per channel).
const CONFLATE_MAX_CHANNELS: usize = 10_000;
/// The most deliveries in one batch, whatever the subscriber asked for: with the two-event stream
/// buffer of a batching subscription (`edge/subscribe.rs`), a subscriber that stops reading holds
/// at most 128 deliveries in it, where one without batches holds 64.
pub(crate) const MAX_BATCH: usize = 64;
/// A batch is sent once its messages reach about this many bytes (approximate sizes): far under
/// the 4 MiB a gRPC client decodes by default, and about one largest message (64 KiB by
/// default).
const BATCH_BYTES: usize = 64 * 1024;

/// Where a subscription or read starts (the edge validates and builds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// After everything already published.
    Latest,
    /// The oldest stored message.
    Earliest,
    /// This offset, inclusive.
    Offset(u64),
    /// The first message published at or after this time, µs since the epoch.
    Time(u64),
}

/// The outgoing half of a `Subscribe` stream.
pub(crate) type EventSender = mpsc::Sender<Result<Outgoing, BrokerError>>;

/// What the subscription follows, from where, and how.
pub(crate) struct SubscriptionSpec {
    /// Channels to deliver.
    pub pattern: Pattern,
    /// Where to begin.
    pub start: Start,
    /// DROP_OLDEST: how many offsets behind the consumer may be before the oldest are skipped.
    pub window: u64,
    /// Throttle interval per channel.
    pub min_interval: Option<Duration>,
    /// Durable consumers: redeliver after this long without an acknowledgement.
    pub ack_timeout: Option<Duration>,
    /// Whether ephemeral messages are delivered too ([`crate::fanout::ephemeral`]).
    pub ephemeral: bool,
    /// The most deliveries packed into one [`Outgoing::Batch`]; 1 sends every delivery on its
    /// own (a client that did not ask for batches, an entity watch).
    pub max_batch: usize,
}

/// Why a subscription ended, for logs.
enum End {
    ClientGone,
    ShuttingDown,
    Stopped,
    Failed(BrokerError),
}

/// Runs the subscription until it ends. See the module docs.
pub(crate) async fn run(
    hub: Hub,
    store: MessageStore,
    registered: Registered,
    spec: SubscriptionSpec,
    out: EventSender,
    mut shutdown: ShutdownSignal,
) {
    let control = Arc::clone(&registered.control);
    let end = tokio::select! {
        end = feed(&hub, &store, &control, &spec, &out) => end,
        _ = shutdown.wait() => End::ShuttingDown,
        _ = out.closed() => End::ClientGone,
    };
    match end {
        End::ClientGone => {}
        End::ShuttingDown => {
            let _ = out.try_send(Err(BrokerError::ShuttingDown));
        }
        End::Stopped => {
            let name = control.durable.clone().unwrap_or_default();
            let _ = out.try_send(Err(BrokerError::Precondition {
                reason: Reason::ConsumerTakenOver,
                message: format!(
                    "durable consumer {name:?} was taken over by a newer subscription or deleted"
                ),
            }));
        }
        End::Failed(e) => {
            tracing::error!(pattern = %spec.pattern, error = %e, "subscription failed");
            let _ = out.try_send(Err(e));
        }
    }
    drop(registered);
}

struct Feeder<'a> {
    store: &'a MessageStore,
    control: &'a Control,
    spec: &'a SubscriptionSpec,
    out: &'a EventSender,
    /// This subscription's account for what it reads from the store.
    catch_up: Reader,
    /// The next offset this subscription may deliver; everything before it was handled.
    next: u64,
    throttle: Option<Throttle>,
    /// Looked up once, not per delivery; tallied by this task and flushed after each step.
    metrics: DeliveryMetrics,
    /// The first offset given after the subscription registered with the hub: messages from
    /// here on were published while it was open, so their latency is the live path's (read from
    /// memory, or from the store after falling behind); earlier ones are a replay of history and
    /// go only into the histogram that includes replays.
    live_from: u64,
    /// Deliveries packed and not sent yet (see "Batches" in the module docs); sent by
    /// [`Feeder::flush`] before the task waits for anything.
    packer: Packer,
}

impl Feeder<'_> {
    /// This subscription as its delivery spans describe it.
    fn subscriber(&self) -> trace::Subscriber<'_> {
        trace::Subscriber {
            id: self.control.id,
            pattern: &self.control.pattern,
            durable: self.control.durable.as_deref(),
        }
    }

    /// Messages read from the store, ready to deliver like live ones, each charged to the
    /// catch-up budget while it is held.
    fn shared(&self, messages: Vec<crate::message::StoredMessage>) -> Vec<Arc<SharedMessage>> {
        messages
            .into_iter()
            .map(|m| {
                let charge = self.catch_up.charge(m.message.approximate_size());
                SharedMessage::charged(Arc::new(m), charge)
            })
            .collect()
    }

    /// Sends an item after the deliveries packed so far.
    async fn send_outgoing(&mut self, outgoing: Outgoing) -> Result<(), End> {
        self.flush().await?;
        self.send_now(outgoing).await
    }

    async fn send_now(&self, outgoing: Outgoing) -> Result<(), End> {
        self.out
            .send(Ok(outgoing))
            .await
            .map_err(|_| End::ClientGone)
    }

    /// Packs a delivery into the batch being built, sending the batch once it is full. Without
    /// batches (`max_batch` 1) the delivery goes at once.
    async fn send_delivery(&mut self, delivery: Delivery) -> Result<(), End> {
        match self.packer.push(delivery) {
            Some(outgoing) => self.send_now(outgoing).await,
            None => Ok(()),
        }
    }

    /// Sends the deliveries packed so far: one alone as a plain delivery, more as a batch.
    async fn flush(&mut self) -> Result<(), End> {
        match self.packer.take() {
            Some(outgoing) => self.send_now(outgoing).await,
            None => Ok(()),
        }
    }

    /// Waits until a delivery may be sent (credits), redelivering what timed out meanwhile.
    async fn wait_for_credit(&mut self) -> Result<(), End> {
        if self.control.has_credit() {
            return Ok(());
        }
        // What is packed goes out before waiting: the acknowledgements that would return the
        // credits can only come for messages the client has.
        self.flush().await?;
        self.control.flight().waiting_for_credit = true;
        let waited = self.wait_for_credit_inner().await;
        self.control.flight().waiting_for_credit = false;
        waited
    }

    async fn wait_for_credit_inner(&mut self) -> Result<(), End> {
        while !self.control.has_credit() {
            let deadline = self.redelivery_deadline();
            tokio::select! {
                _ = self.control.acked.notified() => {}
                _ = self.control.cancel.notified() => return Err(End::Stopped),
                _ = sleep_until(deadline) => self.redeliver_due().await?,
            }
            if self.control.is_stopped() {
                return Err(End::Stopped);
            }
        }
        Ok(())
    }

    /// Sends one message now, recording it as pending when acknowledgements are tracked.
    async fn send_message(
        &mut self,
        message: &Arc<SharedMessage>,
        skipped: u64,
    ) -> Result<(), End> {
        self.wait_for_credit().await?;
        // It may have expired while it waited for a credit (or in the throttle): an expired
        // message is never delivered (issue 20).
        if message.is_expired_now() {
            return Ok(());
        }
        {
            let mut flight = self.control.flight();
            flight.delivered += 1;
            flight.last_sent = flight.last_sent.max(message.offset);
            if self.control.tracks_pending() {
                flight.pending.insert(
                    message.offset,
                    Pending {
                        sent_at: Instant::now(),
                        deliveries: 1,
                    },
                );
            }
        }
        self.metrics
            .delivered(message.publish_time_us, message.offset >= self.live_from);
        if let Some(waited) = message.since_announced() {
            self.metrics.fanout(waited);
        }
        if skipped > 0 {
            metrics::conflated(skipped);
        }
        let delivery = Delivery::to(Arc::clone(message), skipped, 0, &self.subscriber());
        self.send_delivery(delivery).await
    }

    /// Sends ephemeral messages if the stream has room for them, now: they wait for no credit,
    /// throttle or slow client, and one the stream cannot take is dropped (at most once).
    fn deliver_ephemeral(&self, messages: Vec<Arc<SharedMessage>>) -> Result<(), End> {
        for message in messages {
            let delivery = Delivery::to(message, 0, 0, &self.subscriber());
            match self.out.try_send(Ok(Outgoing::Delivery(delivery))) {
                Ok(()) => metrics::ephemeral("delivered", 1),
                Err(mpsc::error::TrySendError::Full(_)) => metrics::ephemeral("dropped", 1),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::ClientGone),
            }
        }
        Ok(())
    }

    /// Takes a message in offset order: sends it, or holds it for the throttle.
    async fn deliver(&mut self, message: &Arc<SharedMessage>, skipped: u64) -> Result<(), End> {
        if message.offset < self.next {
            return Ok(());
        }
        self.next = message.offset + 1;
        self.control.flight().next_offset = self.next;
        if message.is_expired_now() {
            return Ok(());
        }
        match &mut self.throttle {
            Some(throttle) => match throttle.offer(message, skipped, Instant::now()) {
                Some((now, skipped)) => self.send_message(&now, skipped).await,
                None => Ok(()),
            },
            None => self.send_message(message, skipped).await,
        }
    }

    /// Delivers a run of messages under the subscription's policy.
    async fn deliver_all(&mut self, messages: Vec<Arc<SharedMessage>>) -> Result<(), End> {
        if self.control.policy == FlowPolicy::Conflate && messages.len() > 1 {
            for (message, skipped) in conflate(messages) {
                self.deliver(&message, skipped).await?;
            }
            return Ok(());
        }
        for message in &messages {
            self.deliver(message, 0).await?;
        }
        Ok(())
    }

    /// Reads the next page of messages to deliver, as large as the catch-up budget allows.
    async fn read_page(
        &mut self,
        from: u64,
        last: u64,
    ) -> Result<crate::state::store::ReadPage, End> {
        // The budget may make the task wait; what is packed (and charged to it) goes first.
        self.flush().await?;
        let max_bytes = self.catch_up.page_bytes(CATCH_UP_BYTES).await;
        self.read(from, last, max_bytes)
    }

    fn read(
        &self,
        from: u64,
        last: u64,
        max_bytes: usize,
    ) -> Result<crate::state::store::ReadPage, End> {
        self.store
            .read(&ReadRange {
                from,
                to_offset: last,
                to_time_us: u64::MAX,
                pattern: &self.spec.pattern,
                now_us: now_us(),
                limit: CATCH_UP_PAGE,
                max_bytes,
                max_batches: CATCH_UP_BATCHES,
            })
            .map_err(End::Failed)
    }

    /// Tells a subscription that starts at an offset (asked for, or a durable consumer's resume
    /// point) whose message retention or TTL removed (or that has expired) so, with one
    /// `RETENTION` gap from there to just before the first message still stored: it asked for a
    /// position the log no longer holds, and cannot tell the removed messages from messages that
    /// did not match (count 0: they can no longer be counted). Messages that expire later on
    /// are skipped without a gap, like any expired message: their TTL said they could go
    /// (docs/FLOW.md).
    async fn announce_removed_start(&mut self, last: u64) -> Result<(), End> {
        if self.next > last {
            return Ok(());
        }
        let present = self
            .store
            .first_present_offset(self.next, last, now_us())
            .map_err(End::Failed)?;
        let resume = present.unwrap_or(last + 1);
        if resume > self.next {
            metrics::gap("retention", 0);
            self.send_outgoing(gap(self.next, resume - 1, 0, GapReason::Retention))
                .await?;
            self.next = resume;
            self.control.flight().next_offset = resume;
        }
        Ok(())
    }

    /// Brings the subscription from `self.next` through `last` from the store.
    async fn catch_up(&mut self, last: u64) -> Result<(), End> {
        if self.next > last {
            return Ok(());
        }
        // Messages removed by retention or TTL before this consumer read them: say so.
        if let Some(first) = self
            .store
            .first_batch()
            .map_err(End::Failed)?
            .map(|b| b.key)
        {
            if self.next < first && first <= last + 1 {
                metrics::gap("retention", 0);
                let gap = gap(self.next, first - 1, 0, GapReason::Retention);
                self.send_outgoing(gap).await?;
                self.next = first;
            }
        }
        if self.control.policy == FlowPolicy::DropOldest && last + 1 - self.next > self.spec.window
        {
            let keep_from = last + 1 - self.spec.window;
            let count = self.count_matching(self.next, keep_from - 1)?;
            metrics::gap("dropped", count);
            self.send_outgoing(gap(self.next, keep_from - 1, count, GapReason::Dropped))
                .await?;
            self.next = keep_from;
        }
        let conflating = self.control.policy == FlowPolicy::Conflate;
        let mut held: HashMap<String, (Arc<SharedMessage>, u64)> = HashMap::new();
        // Pages are read from `from`; `self.next` only moves as messages are delivered, so held
        // (conflated) messages are still ahead of it when they are flushed.
        let mut from = self.next;
        while from <= last {
            let page = self.read_page(from, last).await?;
            if conflating {
                for message in self.shared(page.messages) {
                    let channel = message.message.channel.clone();
                    let skipped = held.remove(&channel).map(|(_, s)| s + 1).unwrap_or(0);
                    held.insert(channel, (message, skipped));
                }
                if held.len() >= CONFLATE_MAX_CHANNELS {
                    self.flush_conflated(&mut held).await?;
                }
            } else {
                for message in &self.shared(page.messages) {
                    self.deliver(message, 0).await?;
                }
            }
            if page.done || page.next <= from {
                break;
            }
            from = page.next;
        }
        self.flush_conflated(&mut held).await?;
        self.flush().await?;
        self.next = self.next.max(last + 1);
        self.control.flight().next_offset = self.next;
        Ok(())
    }

    async fn flush_conflated(
        &mut self,
        held: &mut HashMap<String, (Arc<SharedMessage>, u64)>,
    ) -> Result<(), End> {
        let mut latest: Vec<(Arc<SharedMessage>, u64)> = held.drain().map(|(_, v)| v).collect();
        latest.sort_by_key(|(m, _)| m.offset);
        for (message, skipped) in latest {
            self.deliver(&message, skipped).await?;
        }
        Ok(())
    }

    /// Matching, unexpired messages in `from..=to`, counted without keeping them.
    fn count_matching(&self, from: u64, to: u64) -> Result<u64, End> {
        let mut count = 0u64;
        let mut next = from;
        while next <= to {
            // Counted and dropped at once: not charged to the budget.
            let page = self.read(next, to, CATCH_UP_BYTES)?;
            count += page.messages.len() as u64;
            next = page.next.max(next + 1);
            if page.done {
                break;
            }
        }
        Ok(count)
    }

    fn redelivery_deadline(&self) -> Option<Instant> {
        let timeout = self.spec.ack_timeout?;
        let flight = self.control.flight();
        flight.pending.values().map(|p| p.sent_at + timeout).min()
    }

    /// Sends again every pending delivery whose ack timeout has passed.
    async fn redeliver_due(&mut self) -> Result<(), End> {
        let Some(timeout) = self.spec.ack_timeout else {
            return Ok(());
        };
        let now = Instant::now();
        let due: Vec<(u64, u32)> = self
            .control
            .flight()
            .pending
            .iter()
            .filter(|(_, p)| p.sent_at + timeout <= now)
            .map(|(offset, p)| (*offset, p.deliveries))
            .collect();
        for (offset, deliveries) in due {
            match self.store.message(offset).map_err(End::Failed)? {
                Some(message) if !message.is_expired_now() => {
                    {
                        let mut flight = self.control.flight();
                        if let Some(p) = flight.pending.get_mut(&offset) {
                            p.sent_at = Instant::now();
                            p.deliveries += 1;
                        }
                        flight.unsaved_redeliveries += 1;
                    }
                    metrics::redelivery();
                    let charge = self.catch_up.charge(message.message.approximate_size());
                    let message = SharedMessage::charged(Arc::new(message), charge);
                    let delivery = Delivery::to(message, 0, deliveries, &self.subscriber());
                    self.send_outgoing(Outgoing::Delivery(delivery)).await?;
                }
                // Gone (expired or removed): nothing left to redeliver.
                _ => {
                    self.control.ack(&[offset]);
                }
            }
        }
        Ok(())
    }

    async fn flush_throttled(&mut self) -> Result<(), End> {
        let due = match &mut self.throttle {
            Some(throttle) => throttle.take_due(Instant::now()),
            None => return Ok(()),
        };
        for (message, skipped) in due {
            self.send_message(&message, skipped).await?;
        }
        Ok(())
    }
}

fn policy_name(policy: FlowPolicy) -> &'static str {
    match policy {
        FlowPolicy::Lossless => "lossless",
        FlowPolicy::Conflate => "conflate",
        FlowPolicy::DropOldest => "drop_oldest",
    }
}

fn gap(from_offset: u64, to_offset: u64, count: u64, reason: GapReason) -> Outgoing {
    Outgoing::Gap {
        from_offset,
        to_offset,
        count,
        reason,
    }
}

/// The latest message of each channel, in offset order, with how many earlier ones it replaces.
fn conflate(messages: Vec<Arc<SharedMessage>>) -> Vec<(Arc<SharedMessage>, u64)> {
    let mut latest: HashMap<String, (Arc<SharedMessage>, u64)> = HashMap::new();
    for message in messages {
        let channel = message.message.channel.clone();
        let skipped = latest.remove(&channel).map(|(_, s)| s + 1).unwrap_or(0);
        latest.insert(channel, (message, skipped));
    }
    let mut out: Vec<_> = latest.into_values().collect();
    out.sort_by_key(|(m, _)| m.offset);
    out
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn feed(
    hub: &Hub,
    store: &MessageStore,
    control: &Control,
    spec: &SubscriptionSpec,
    out: &EventSender,
) -> End {
    let (registration, last) = hub.register(spec.pattern.clone(), spec.ephemeral);
    control.set_mailbox(Arc::clone(&registration.mailbox));
    let next = match first_offset(store, spec.start, last) {
        Ok(next) => next,
        Err(e) => return End::Failed(e),
    };
    let acked_offset = control.flight().acked_floor;
    let subscribed = Outgoing::Subscribed {
        next_offset: next,
        subscription_id: control.id,
        acked_offset,
    };
    if out.send(Ok(subscribed)).await.is_err() {
        return End::ClientGone;
    }
    let mut feeder = Feeder {
        store,
        control,
        spec,
        out,
        catch_up: hub.catch_up_budget().reader(),
        next,
        throttle: spec.min_interval.map(Throttle::new),
        metrics: DeliveryMetrics::new(policy_name(control.policy)),
        live_from: last + 1,
        packer: Packer::new(spec.max_batch, BATCH_BYTES),
    };
    if let Start::Offset(_) = spec.start {
        if let Err(end) = feeder.announce_removed_start(last).await {
            return end;
        }
    }
    if let Err(end) = feeder.catch_up(last).await {
        return end;
    }
    feeder.metrics.flush();
    loop {
        let throttle_deadline = feeder.throttle.as_ref().and_then(Throttle::deadline);
        let redelivery_deadline = feeder.redelivery_deadline();
        let step = tokio::select! {
            items = registration.mailbox.next() => match items {
                MailboxItems::Messages(messages) => feeder.deliver_all(messages).await,
                MailboxItems::Lagging => {
                    let last = registration.rearm();
                    feeder.catch_up(last).await
                }
                MailboxItems::Ephemeral(messages) => feeder.deliver_ephemeral(messages),
            },
            _ = sleep_until(throttle_deadline) => feeder.flush_throttled().await,
            _ = sleep_until(redelivery_deadline) => feeder.redeliver_due().await,
            _ = control.cancel.notified() => Err(End::Stopped),
        };
        // The step took everything that was ready; what it packed goes before the task waits.
        let step = match step {
            Ok(()) => feeder.flush().await,
            Err(end) => Err(end),
        };
        feeder.metrics.flush();
        if let Err(end) = step {
            return end;
        }
        if control.is_stopped() {
            return End::Stopped;
        }
    }
}

/// The first offset to deliver, given that offsets up to `last` are already in the store. Also
/// where a new durable consumer starts.
///
/// `earliest` and a time name the first message still there (not one retention or TTL removed,
/// nor an expired one), so they never start on a removed position; an offset is taken as given,
/// and [`Feeder::announce_removed_start`] tells the subscriber if its message is gone.
pub(crate) fn first_offset(
    store: &MessageStore,
    start: Start,
    last: u64,
) -> Result<u64, BrokerError> {
    let present_from = |from: u64| -> Result<u64, BrokerError> {
        Ok(store
            .first_present_offset(from, last, now_us())?
            .unwrap_or(last + 1))
    };
    Ok(match start {
        Start::Latest => last + 1,
        Start::Earliest => present_from(1)?,
        Start::Offset(offset) => offset.max(1),
        Start::Time(time_us) => match store.first_offset_at_or_after(time_us)? {
            Some(offset) => present_from(offset)?,
            None => last + 1,
        },
    })
}
