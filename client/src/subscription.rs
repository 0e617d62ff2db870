//! Subscribing: [`Start`], [`SubscribeOptions`], the resuming [`Subscription`] and
//! its [`SubscriptionEvent`]s.
//!
//! A subscription runs in a task of its own that feeds a bounded queue. When the stream breaks for
//! a transient reason (the connection was lost, the broker is unavailable, or it closed the
//! stream), the task calls `Subscribe` again after a randomized, growing delay, with the same
//! options, starting right after the last message it handed over, so the consumer sees neither a
//! gap nor a duplicate. Durable and throttled subscriptions resume differently: see
//! [`Client::subscribe`]. A stream the broker ends because its bearer token expired
//! (`UNAUTHENTICATED TOKEN_EXPIRED`) resumes the same way, with a new token from the client's
//! token cache.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::{
    start_position, subscribe_event, AckResponse, Earliest, Gap, Latest, Message, StartPosition,
    SubscribeEvent, SubscribeRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::codec::Streaming;

use crate::auth::TokenCache;
use crate::backoff::Backoff;
use crate::bearer::{AuthChannel, TokenUsed};
use crate::client::Client;
use crate::error::Error;
use crate::flow::{Acker, FlowPolicy, Link};

/// Where a subscription or a history read starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Start {
    /// Only messages published after the subscription is live (not allowed for history).
    #[default]
    Latest,
    /// The oldest message still stored.
    Earliest,
    /// The message at this offset (inclusive), or the next stored one after it.
    Offset(u64),
    /// The first message published at or after this time.
    Time(SystemTime),
}

impl From<Start> for StartPosition {
    fn from(start: Start) -> StartPosition {
        let position = match start {
            Start::Latest => start_position::Position::Latest(Latest {}),
            Start::Earliest => start_position::Position::Earliest(Earliest {}),
            Start::Offset(offset) => start_position::Position::Offset(offset),
            Start::Time(time) => start_position::Position::Time(time.into()),
        };
        StartPosition {
            position: Some(position),
        }
    }
}

/// How a [`Subscription`] buffers and resumes, and the flow control the broker applies to it.
///
/// The flow settings (`policy` through `ack_timeout`) are sent with the first `Subscribe` call
/// and again with every resubscription; `None` leaves the broker's default.
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::{FlowPolicy, SubscribeOptions};
///
/// let options = SubscribeOptions::default()
///     .policy(FlowPolicy::DropOldest)
///     .window(1000)
///     .throttle(Duration::from_millis(250));
/// assert_eq!(options.min_interval, Some(Duration::from_millis(250)));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// How many failed reconnection attempts in a row to make before the subscription ends with
    /// the last error. `None` (the default) retries forever.
    pub max_reconnect_attempts: Option<u32>,
    /// The delay before the first reconnection attempt (before jitter). Default: 50 ms.
    pub initial_backoff: Duration,
    /// The longest delay between attempts (before jitter). Default: 5 s.
    pub max_backoff: Duration,
    /// How many events (messages and gaps) the subscription holds for a consumer that has not read
    /// them yet (at least 1). When it is full the subscription stops reading from the broker,
    /// which then holds back (a slow consumer never makes memory grow). Default: 64.
    pub buffer: usize,
    /// What the broker does when this consumer falls behind. `None` (the default): lossless.
    pub policy: Option<FlowPolicy>,
    /// [`FlowPolicy::DropOldest`]: the most matching messages the consumer may be behind before
    /// the oldest are dropped. `None` (the default): the broker's default.
    pub window: Option<u32>,
    /// Throttle: at most one delivery per channel per this interval, coalesced to the latest
    /// message, which arrives at the end of the interval. Sent in whole milliseconds (rounded
    /// up). `None` (the default): no throttle.
    pub min_interval: Option<Duration>,
    /// Credits: at most this many deliveries not yet acknowledged (see [`Subscription::ack`]).
    /// `None` (the default): no limit, except for durable consumers, which get the broker's
    /// default.
    pub max_unacked: Option<u32>,
    /// Makes the subscription the durable consumer of this name (1 to 64 of `[A-Za-z0-9_-]`),
    /// whose acknowledged offset the broker keeps. `None` (the default): not durable.
    pub durable_name: Option<String>,
    /// Durable consumers: the broker redelivers a delivery not acknowledged within this long.
    /// Sent in whole milliseconds (rounded up). `None` (the default): the broker's default.
    pub ack_timeout: Option<Duration>,
    /// Leave out ephemeral messages (never stored, offset 0; see [`crate::Publish::ephemeral`]).
    /// `false` (the default): they are delivered, except to durable consumers.
    pub exclude_ephemeral: bool,
    /// The most messages the broker may put in one event when several are ready at once (a
    /// subscriber behind, a burst): fewer stream messages and wake-ups per message on both
    /// sides. The broker never waits to fill a batch. The subscription unpacks batches, so it
    /// still yields one message at a time, in order; credits still count messages. 1 (or 0)
    /// asks for one message per event. Default: [`DEFAULT_MAX_BATCH`].
    pub max_batch: u32,
}

/// [`SubscribeOptions::max_batch`]'s default.
pub const DEFAULT_MAX_BATCH: u32 = 64;

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            max_reconnect_attempts: None,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            buffer: 64,
            policy: None,
            window: None,
            min_interval: None,
            max_unacked: None,
            durable_name: None,
            ack_timeout: None,
            exclude_ephemeral: false,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

impl SubscribeOptions {
    /// Sets [`SubscribeOptions::max_reconnect_attempts`].
    pub fn max_reconnect_attempts(mut self, attempts: Option<u32>) -> Self {
        self.max_reconnect_attempts = attempts;
        self
    }

    /// Sets [`SubscribeOptions::initial_backoff`] and [`SubscribeOptions::max_backoff`].
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Sets [`SubscribeOptions::buffer`].
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = messages;
        self
    }

    /// Sets [`SubscribeOptions::policy`].
    pub fn policy(mut self, policy: FlowPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sets [`SubscribeOptions::window`] ([`FlowPolicy::DropOldest`]); 0 means the broker's
    /// default.
    pub fn window(mut self, messages: u32) -> Self {
        self.window = Some(messages).filter(|messages| *messages > 0);
        self
    }

    /// Sets [`SubscribeOptions::min_interval`]: at most one delivery per channel per `interval`,
    /// the latest. [`Duration::ZERO`] turns the throttle off.
    pub fn throttle(mut self, interval: Duration) -> Self {
        self.min_interval = Some(interval).filter(|interval| !interval.is_zero());
        self
    }

    /// Sets [`SubscribeOptions::max_unacked`]: the broker sends at most `credits` deliveries
    /// ahead of the acknowledgements. 0 means no limit (the broker's default for a durable
    /// consumer).
    pub fn max_unacked(mut self, credits: u32) -> Self {
        self.max_unacked = Some(credits).filter(|credits| *credits > 0);
        self
    }

    /// Sets [`SubscribeOptions::exclude_ephemeral`].
    pub fn exclude_ephemeral(mut self, exclude: bool) -> Self {
        self.exclude_ephemeral = exclude;
        self
    }

    /// Sets [`SubscribeOptions::max_batch`]: at most this many messages per event from the broker
    /// (1 or 0: one per event).
    pub fn max_batch(mut self, messages: u32) -> Self {
        self.max_batch = messages;
        self
    }

    /// Sets [`SubscribeOptions::durable_name`]: the subscription is the durable consumer `name`.
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable_name = Some(name.into());
        self
    }

    /// Sets [`SubscribeOptions::ack_timeout`] (durable consumers).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout).filter(|timeout| !timeout.is_zero());
        self
    }

    /// The `Subscribe` request these options send for `pattern` from `start`.
    ///
    /// ```
    /// use switchboard_client::{Start, SubscribeOptions};
    ///
    /// let request = SubscribeOptions::default()
    ///     .durable("billing")
    ///     .max_unacked(10)
    ///     .to_request("orders.>", Start::Earliest);
    /// assert_eq!((request.durable_name.as_str(), request.max_unacked), ("billing", 10));
    /// ```
    pub fn to_request(&self, pattern: impl Into<String>, start: Start) -> SubscribeRequest {
        SubscribeRequest {
            pattern: pattern.into(),
            start: Some(start.into()),
            policy: self.policy.map_or(0, |policy| {
                switchboard_proto::v1::FlowPolicy::from(policy) as i32
            }),
            window: self.window.unwrap_or(0),
            min_interval_ms: self.min_interval.map_or(0, whole_millis),
            max_unacked: self.max_unacked.unwrap_or(0),
            durable_name: self.durable_name.clone().unwrap_or_default(),
            ack_timeout_ms: self.ack_timeout.map_or(0, whole_millis),
            exclude_ephemeral: self.exclude_ephemeral,
            max_batch: self.max_batch,
        }
    }
}

/// `duration` in milliseconds, rounded up (so a non-zero duration never becomes 0, "off") and
/// capped at `u32::MAX`.
fn whole_millis(duration: Duration) -> u32 {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    u32::try_from(millis).unwrap_or(u32::MAX)
}

/// One event of a [`Subscription`], as [`Subscription::events`] and
/// [`Subscription::next_event`] yield them.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
// Nearly every event is a message: boxing it would cost an allocation each to save memory only
// on the rare gap.
#[allow(clippy::large_enum_variant)]
pub enum SubscriptionEvent {
    /// A message matching the pattern.
    Message(Message),
    /// Matching messages that will not be delivered: skipped by [`FlowPolicy::DropOldest`]
    /// (reason `DROPPED`), or removed by retention or TTL before this consumer read them (reason
    /// `RETENTION`). See [`Gap::reason`] and [`GapReason`](crate::GapReason).
    Gap(Gap),
}

/// A live subscription: a [`Stream`] of the messages matching its pattern.
///
/// It resumes by itself across connection loss (see [`Client::subscribe`]) and ends only with a
/// non-transient error (for example `PERMISSION_DENIED`, or `FAILED_PRECONDITION
/// CONSUMER_TAKEN_OVER` when another subscription takes over its durable name), with the last
/// error once [`SubscribeOptions::max_reconnect_attempts`] is exhausted, or never. Dropping it
/// stops its task and cancels the call.
///
/// As a `Stream` it yields messages only, and skips [`Gap`]s (logging them as warnings): a
/// consumer with [`FlowPolicy::DropOldest`], or one that may fall behind retention, reads
/// [`Subscription::events`] (or [`Subscription::next_event`]) instead, which yields both. Both
/// read the same queue, so each event is seen once, by whichever reads it.
///
/// Deliveries are acknowledged with [`Subscription::ack`], or from elsewhere with the handle
/// that [`Subscription::acker`] returns.
#[derive(Debug)]
pub struct Subscription {
    queue: mpsc::Receiver<Result<SubscriptionEvent, Error>>,
    task: JoinHandle<()>,
    pattern: String,
    next_offset: Option<u64>,
    acked_offset: Option<u64>,
    acker: Acker,
    link: Arc<watch::Sender<Link>>,
}

impl Subscription {
    /// The pattern this subscription follows.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The `next_offset` the broker confirmed when the subscription went live: every matching
    /// message at this offset or a later one will be delivered. `None` if the broker did not say.
    pub fn next_offset(&self) -> Option<u64> {
        self.next_offset
    }

    /// Durable consumers: the acknowledged offset the subscription resumed after when it went
    /// live (`None` when 0: nothing acknowledged yet, or not durable).
    pub fn acked_offset(&self) -> Option<u64> {
        self.acked_offset
    }

    /// The subscription's current id on the broker node (from its latest `Subscribed` event), as
    /// listed by [`Client::list_subscriptions`]. It changes when the subscription resumes after a
    /// lost connection, and is `None` while it is resuming, after it ended, or when the broker
    /// gave none.
    pub fn id(&self) -> Option<u64> {
        self.acker.subscription_id()
    }

    /// A cheap, clonable handle that acknowledges this subscription's deliveries while the
    /// subscription itself is being read (for example from the tasks that handle them).
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Acknowledges the delivery at `offset` with the current subscription id; see
    /// [`Acker::ack_many`].
    ///
    /// # Errors
    /// As [`Acker::ack_many`].
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, Start, SubscribeOptions, SubscriptionEvent};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let options = SubscribeOptions::default().durable("billing");
    /// let mut subscription = client.subscribe_with("orders.>", Start::Earliest, options).await?;
    /// while let Some(event) = subscription.next_event().await {
    ///     if let SubscriptionEvent::Message(message) = event? {
    ///         // ... handle the message, then:
    ///         let answer = subscription.ack(message.offset).await?;
    ///         println!("acknowledged up to {}", answer.acked_offset);
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ack(&self, offset: u64) -> Result<AckResponse, Error> {
        self.acker.ack(offset).await
    }

    /// Acknowledges the deliveries at `offsets` with the current subscription id; see
    /// [`Acker::ack_many`].
    ///
    /// # Errors
    /// As [`Acker::ack_many`].
    pub async fn ack_many(&self, offsets: &[u64]) -> Result<AckResponse, Error> {
        self.acker.ack_many(offsets).await
    }

    /// The next event, message or gap: `None` once the subscription has ended (after its last
    /// error).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, FlowPolicy, Start, SubscribeOptions, SubscriptionEvent};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let options = SubscribeOptions::default().policy(FlowPolicy::DropOldest).window(1000);
    /// let mut subscription = client.subscribe_with("telemetry.>", Start::Latest, options).await?;
    /// while let Some(event) = subscription.next_event().await {
    ///     match event? {
    ///         SubscriptionEvent::Message(message) => println!("{}", message.offset),
    ///         SubscriptionEvent::Gap(gap) => {
    ///             println!("skipped {} messages in {}..={}", gap.count, gap.from_offset, gap.to_offset)
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn next_event(&mut self) -> Option<Result<SubscriptionEvent, Error>> {
        self.queue.recv().await
    }

    /// The subscription as a [`Stream`] of every event, messages and [`Gap`]s (borrowing it, so
    /// its other methods can be used again once the stream is dropped).
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{Client, Start, SubscriptionEvent};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let mut subscription = client.subscribe("crm.>", Start::Earliest).await?;
    /// let acker = subscription.acker();
    /// let mut events = subscription.events();
    /// while let Some(event) = events.next().await {
    ///     if let SubscriptionEvent::Message(message) = event? {
    ///         acker.ack(message.offset).await?;
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn events(&mut self) -> Events<'_> {
        Events { subscription: self }
    }
}

impl Stream for Subscription {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(self.queue.poll_recv(cx)) {
                Some(Ok(SubscriptionEvent::Message(message))) => {
                    return Poll::Ready(Some(Ok(message)))
                }
                Some(Ok(SubscriptionEvent::Gap(gap))) => {
                    tracing::warn!(
                        pattern = %self.pattern,
                        from_offset = gap.from_offset,
                        to_offset = gap.to_offset,
                        count = gap.count,
                        reason = gap.reason().as_str_name(),
                        "messages skipped (read Subscription::events to see gaps)"
                    );
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.link.send_replace(Link::Ended);
        self.task.abort();
    }
}

/// Every event of a [`Subscription`], messages and gaps: the [`Stream`] that
/// [`Subscription::events`] returns.
#[derive(Debug)]
pub struct Events<'a> {
    subscription: &'a mut Subscription,
}

impl Stream for Events<'_> {
    type Item = Result<SubscriptionEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.subscription.queue.poll_recv(cx)
    }
}

impl Client {
    /// Subscribes to the messages whose channel matches `pattern` (for example `crm.*.updated` or
    /// `telemetry.>`), from `start`, with the default [`SubscribeOptions`] (lossless, retry
    /// forever).
    ///
    /// This returns once the broker has confirmed the subscription (its `Subscribed` event), so
    /// anything published afterwards will be delivered. The subscription then resumes by itself:
    /// when the stream ends with a transient error (see [`Error::is_transient`]) or the broker
    /// closes it, it subscribes again, with the same options, after a backoff (50 ms doubling to
    /// 5 s, with jitter) from the offset after the last message delivered (or from the confirmed
    /// `next_offset` if none was), and drops any message at or below the last delivered offset,
    /// so the consumer sees neither a gap nor a duplicate. A [`Gap`] counts as delivered up to
    /// its `to_offset`. A stream the broker ends because its bearer token expired
    /// (`UNAUTHENTICATED TOKEN_EXPIRED`, see [`Error::is_token_expired`]) resumes the same way,
    /// with a new token from the client's credentials; when a new token is refused as expired
    /// twice in a row (a fixed token), the subscription ends with that error.
    ///
    /// Two kinds of subscriptions resume differently, and do not drop what looks like a
    /// duplicate:
    /// - a **durable** consumer ([`SubscribeOptions::durable`]) subscribes again with the same
    ///   name, and the broker resumes it after its acknowledged offset (whatever the start): what
    ///   was delivered but not acknowledged comes again, as do redeliveries (a non-zero
    ///   [`Message::redelivery`]) at any time. Acknowledge what you handled
    ///   ([`Subscription::ack`]) and expect to see a message more than once;
    /// - a **throttled** subscription ([`SubscribeOptions::throttle`]) receives coalesced,
    ///   trailing-edge deliveries that may overtake earlier messages of other channels, so
    ///   offsets do not increase across channels and "the last offset delivered" is no safe
    ///   resume point. It resumes from the highest offset delivered more than twice the interval
    ///   plus one second before the break (or the confirmed `next_offset`), so a channel's latest
    ///   message held by the broker's throttle when the connection broke is not lost; the price
    ///   is that after a reconnect the latest message of some channels may be delivered again. A
    ///   message held longer than that (a broker serving a lagging consumer from its store) may
    ///   still be missed until its channel publishes again.
    ///
    /// Otherwise any message at or below the last delivered offset is dropped, unless it is a
    /// redelivery.
    ///
    /// # Errors
    /// Any error of the first `Subscribe` call, transient or not (for example
    /// `INVALID_ARGUMENT PATTERN_INVALID`, or `UNAVAILABLE` when the broker is unreachable); only
    /// a subscription that went live resumes. Later errors arrive as an `Err` item that ends the
    /// stream.
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{Client, Start};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let mut subscription = client.subscribe("crm.*.updated", Start::Earliest).await?;
    /// while let Some(message) = subscription.next().await {
    ///     let message = message?;
    ///     println!("{} {} {:?}", message.offset, message.channel, message.payload);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        pattern: impl Into<String>,
        start: Start,
    ) -> Result<Subscription, Error> {
        self.subscribe_with(pattern, start, SubscribeOptions::default())
            .await
    }

    /// [`Client::subscribe`] with explicit [`SubscribeOptions`].
    ///
    /// # Errors
    /// As [`Client::subscribe`]; also [`Error::InvalidArgument`] for an empty pattern or an
    /// empty durable name.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use switchboard_client::{Client, FlowPolicy, Start, SubscribeOptions};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// // A dashboard: the latest value of each widget, at most 4 times a second.
    /// let options = SubscribeOptions::default()
    ///     .policy(FlowPolicy::Conflate)
    ///     .throttle(Duration::from_millis(250));
    /// let subscription = client.subscribe_with("telemetry.>", Start::Latest, options).await?;
    /// println!("live as subscription {:?}", subscription.id());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe_with(
        &self,
        pattern: impl Into<String>,
        start: Start,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let pattern = pattern.into();
        if pattern.is_empty() {
            return Err(Error::InvalidArgument(
                "the subscription pattern is empty".to_owned(),
            ));
        }
        if options.durable_name.as_deref() == Some("") {
            return Err(Error::InvalidArgument(
                "the durable consumer name is empty".to_owned(),
            ));
        }
        let mut grpc = self.grpc();
        let tokens = self.tokens();
        let opened = match open(&mut grpc, tokens.as_deref(), &options, &pattern, start).await {
            // The broker found our token expired before we did (its clock runs ahead): the
            // refusal dropped that token, so a second try carries a new one.
            Err(error) if error.is_token_expired() && tokens.is_some() => {
                open(&mut grpc, tokens.as_deref(), &options, &pattern, start).await?
            }
            opened => opened?,
        };
        let next_offset = opened.next_offset;
        let acked_offset = opened.acked_offset;
        let (link, link_receiver) = watch::channel(Link::Live(opened.subscription_id));
        let link = Arc::new(link);
        let acker = Acker::new(grpc.clone(), link_receiver)
            .described(&pattern, options.durable_name.as_deref());
        let (sender, queue) = mpsc::channel(options.buffer.max(1));
        let cursor = Cursor::new(start, &options);
        let task = tokio::spawn(run(
            grpc,
            tokens,
            pattern.clone(),
            cursor,
            opened,
            Outlet {
                sender,
                link: Arc::clone(&link),
            },
            options,
        ));
        Ok(Subscription {
            queue,
            task,
            pattern,
            next_offset,
            acked_offset,
            acker,
            link,
        })
    }
}

/// How long after a throttled delivery is received, beyond twice the throttle interval, it is
/// taken as settled (see [`Settling`]).
const THROTTLE_SETTLE_MARGIN: Duration = Duration::from_secs(1);

/// The most recent throttled deliveries [`Settling`] remembers; older ones settle early.
const THROTTLE_RECENT_MAX: usize = 65_536;

/// What the subscription has handed over so far, and so where it resumes.
#[derive(Clone, Debug)]
struct Cursor {
    original: Start,
    /// The highest offset handed over (a message, or the end of a gap).
    last_delivered: Option<u64>,
    /// The latest confirmed `next_offset`.
    next_offset: Option<u64>,
    /// Whether a message at or below `last_delivered` is a duplicate to drop: only when
    /// deliveries come in offset order and only once (not durable, not throttled).
    dedup: bool,
    /// Throttled subscriptions: where they may safely resume.
    settling: Option<Settling>,
}

/// A throttled subscription's resume point. The broker holds a channel's latest message until the
/// end of that channel's interval while other channels' messages go by, so deliveries come out of
/// offset order; but a message still held when the connection breaks was published less than one
/// interval before, so every delivery received more than `window` (twice the interval, plus a
/// margin for the broker's own delay) before the break was of a message older than anything still
/// held. The highest such offset is `settled`.
#[derive(Clone, Debug)]
struct Settling {
    window: Duration,
    /// Deliveries not settled yet: when received, and their offset.
    recent: VecDeque<(Instant, u64)>,
    settled: Option<u64>,
}

impl Settling {
    fn new(interval: Duration) -> Settling {
        Settling {
            window: interval
                .saturating_mul(2)
                .saturating_add(THROTTLE_SETTLE_MARGIN),
            recent: VecDeque::new(),
            settled: None,
        }
    }

    fn record(&mut self, now: Instant, offset: u64) {
        self.recent.push_back((now, offset));
        if self.recent.len() > THROTTLE_RECENT_MAX {
            if let Some((_, oldest)) = self.recent.pop_front() {
                self.settle_offset(oldest);
            }
        }
    }

    /// Settles every delivery received more than `window` before `now`.
    fn settle(&mut self, now: Instant) {
        while let Some(&(received, offset)) = self.recent.front() {
            if now.saturating_duration_since(received) <= self.window {
                break;
            }
            self.recent.pop_front();
            self.settle_offset(offset);
        }
    }

    fn settle_offset(&mut self, offset: u64) {
        self.settled = Some(self.settled.map_or(offset, |settled| settled.max(offset)));
    }
}

impl Cursor {
    fn new(original: Start, options: &SubscribeOptions) -> Cursor {
        Cursor {
            original,
            last_delivered: None,
            next_offset: None,
            dedup: options.durable_name.is_none() && options.min_interval.is_none(),
            settling: options.min_interval.map(Settling::new),
        }
    }

    /// Records a `Subscribed` confirmation (0 means the broker did not say).
    fn confirmed(&mut self, next_offset: u64) {
        if next_offset > 0 {
            self.next_offset = Some(next_offset);
        }
    }

    /// Whether a message at `offset` (delivered `redelivery` times before), received at `now`,
    /// is to be handed over; if so it counts as delivered.
    fn accept(&mut self, offset: u64, redelivery: u32, now: Instant) -> bool {
        if self.dedup && redelivery == 0 && self.last_delivered.is_some_and(|last| offset <= last) {
            return false;
        }
        self.handed_over(offset, now);
        true
    }

    /// Whether a gap is to be handed over (not when it is wholly behind what was handed over
    /// already); if so it counts as delivered up to its end.
    fn accept_gap(&mut self, gap: &Gap, now: Instant) -> bool {
        if self.dedup
            && self
                .last_delivered
                .is_some_and(|last| gap.to_offset <= last)
        {
            return false;
        }
        self.handed_over(gap.to_offset, now);
        true
    }

    fn handed_over(&mut self, offset: u64, now: Instant) {
        self.last_delivered = Some(self.last_delivered.map_or(offset, |last| last.max(offset)));
        if let Some(settling) = &mut self.settling {
            settling.record(now, offset);
        }
    }

    /// Where to subscribe again at `now`: after the last message handed over (for a throttled
    /// subscription, the last settled one), but never before the confirmed next offset; else
    /// where the subscription first started.
    fn resume_from(&mut self, now: Instant) -> Start {
        let last = match &mut self.settling {
            Some(settling) => {
                settling.settle(now);
                settling.settled
            }
            None => self.last_delivered,
        };
        match (last.map(|last| last.saturating_add(1)), self.next_offset) {
            (Some(after), Some(next)) => Start::Offset(after.max(next)),
            (Some(offset), None) | (None, Some(offset)) => Start::Offset(offset),
            (None, None) => self.original,
        }
    }
}

/// A `Subscribe` call that has produced its first event.
struct Opened {
    events: Streaming<SubscribeEvent>,
    next_offset: Option<u64>,
    /// 0 when the broker gave none.
    subscription_id: u64,
    acked_offset: Option<u64>,
    /// A first event that was not `Subscribed` (not what the contract promises, but nothing is
    /// lost by taking it).
    first_event: Option<subscribe_event::Event>,
    /// The bearer token the call was made with, if any.
    token: Option<Arc<str>>,
}

/// Calls `Subscribe` and waits for the first event (`Subscribed`, per the contract). A refusal
/// for an expired token drops that token from `tokens`, so the next try fetches another.
async fn open(
    grpc: &mut BrokerClient<AuthChannel>,
    tokens: Option<&TokenCache>,
    options: &SubscribeOptions,
    pattern: &str,
    start: Start,
) -> Result<Opened, Error> {
    let response = grpc.subscribe(options.to_request(pattern, start)).await?;
    let token = response
        .extensions()
        .get::<TokenUsed>()
        .map(|used| Arc::clone(&used.0));
    let mut events = response.into_inner();
    let first = events.message().await.map_err(Error::from);
    if let (Err(error), Some(tokens), Some(token)) = (&first, tokens, &token) {
        if error.is_token_expired() {
            tokens.refused(token);
        }
    }
    let mut opened = match first? {
        Some(SubscribeEvent { event }) => Opened {
            events,
            next_offset: None,
            subscription_id: 0,
            acked_offset: None,
            first_event: event,
            token,
        },
        None => return Err(closed_by_broker("before confirming the subscription")),
    };
    if let Some(subscribe_event::Event::Subscribed(subscribed)) = opened.first_event {
        opened.next_offset = Some(subscribed.next_offset).filter(|next| *next > 0);
        opened.subscription_id = subscribed.subscription_id;
        opened.acked_offset = Some(subscribed.acked_offset).filter(|acked| *acked > 0);
        opened.first_event = None;
    }
    Ok(opened)
}

fn closed_by_broker(when: &str) -> Error {
    Error::Status {
        code: tonic::Code::Unavailable,
        reason: None,
        message: format!("the broker closed the subscription stream {when}"),
        metadata: Default::default(),
    }
}

/// Where the subscription's task hands events over, and tells its [`Acker`]s where it stands
/// (ended once the task returns or is aborted, which drops it).
struct Outlet {
    sender: mpsc::Sender<Result<SubscriptionEvent, Error>>,
    link: Arc<watch::Sender<Link>>,
}

impl Drop for Outlet {
    fn drop(&mut self) {
        self.link.send_replace(Link::Ended);
    }
}

/// The subscription's task: pumps events into the outlet, and resumes after transient failures
/// and after the broker ended the stream because its token expired.
async fn run(
    mut grpc: BrokerClient<AuthChannel>,
    tokens: Option<Arc<TokenCache>>,
    pattern: String,
    mut cursor: Cursor,
    mut opened: Opened,
    outlet: Outlet,
    options: SubscribeOptions,
) {
    let mut backoff = Backoff::new(options.initial_backoff, options.max_backoff);
    loop {
        let token = opened.token.clone();
        let Some(failure) = pump(&mut cursor, opened, &outlet).await else {
            return; // The subscription was dropped.
        };
        outlet.link.send_replace(Link::Resuming);
        // An expired token is dropped from the cache, so the resubscription carries a new one.
        let token_expired = match (&tokens, &token) {
            (Some(tokens), Some(token)) if failure.is_token_expired() => {
                tokens.refused(token);
                true
            }
            _ => false,
        };
        if !failure.is_transient() && !token_expired {
            let _ = outlet.sender.send(Err(failure)).await;
            return;
        }
        // A resubscription refused for an expired token is tried once more (the refusal dropped
        // that token, so the next attempt fetches another: this covers a broker clock ahead of
        // ours); a second such refusal means new tokens do not help, and ends the subscription.
        let mut token_retry_left = tokens.is_some();
        tracing::warn!(
            %pattern,
            error = %failure,
            resume_from = ?cursor.resume_from(Instant::now()),
            "subscription interrupted, resuming"
        );
        let mut last_error = failure;
        let mut attempts: u32 = 0;
        opened = loop {
            if options
                .max_reconnect_attempts
                .is_some_and(|max| attempts >= max)
            {
                let _ = outlet.sender.send(Err(last_error)).await;
                return;
            }
            attempts = attempts.saturating_add(1);
            let delay = backoff.next_delay();
            tokio::select! {
                _ = outlet.sender.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let start = cursor.resume_from(Instant::now());
            let attempt = tokio::select! {
                _ = outlet.sender.closed() => return,
                attempt = open(&mut grpc, tokens.as_deref(), &options, &pattern, start) => attempt,
            };
            match attempt {
                Ok(opened) => {
                    tracing::info!(
                        %pattern,
                        ?start,
                        attempts,
                        subscription_id = opened.subscription_id,
                        "subscription resumed"
                    );
                    backoff.reset();
                    break opened;
                }
                Err(error) if error.is_transient() => {
                    tracing::debug!(%pattern, %error, attempts, "resubscribe attempt failed");
                    last_error = error;
                }
                Err(error) if error.is_token_expired() && token_retry_left => {
                    tracing::debug!(%pattern, %error, attempts, "resubscribe with a new token");
                    token_retry_left = false;
                    last_error = error;
                }
                Err(error) => {
                    let _ = outlet.sender.send(Err(error)).await;
                    return;
                }
            }
        };
    }
}

/// Hands the events of one `Subscribe` call over until it fails; returns why, or `None` when the
/// subscription was dropped.
async fn pump(cursor: &mut Cursor, opened: Opened, outlet: &Outlet) -> Option<Error> {
    let Opened {
        mut events,
        next_offset,
        subscription_id,
        acked_offset: _,
        first_event,
        token: _,
    } = opened;
    if let Some(next_offset) = next_offset {
        cursor.confirmed(next_offset);
    }
    outlet.link.send_replace(Link::Live(subscription_id));
    if let Some(event) = first_event {
        hand_over(cursor, event, outlet).await?;
    }
    loop {
        let event = tokio::select! {
            _ = outlet.sender.closed() => return None,
            event = events.message() => event,
        };
        match event {
            // Unpacked here: the consumer sees each message as if it had come alone.
            Ok(Some(SubscribeEvent {
                event: Some(subscribe_event::Event::Batch(batch)),
            })) => {
                for message in batch.messages {
                    hand_over(cursor, subscribe_event::Event::Message(message), outlet).await?;
                }
            }
            Ok(Some(SubscribeEvent { event: Some(event) })) => {
                hand_over(cursor, event, outlet).await?;
            }
            Ok(Some(SubscribeEvent { event: None })) => {}
            Ok(None) => return Some(closed_by_broker("unexpectedly")),
            Err(status) => return Some(status.into()),
        }
    }
}

/// Hands one event over unless it was handed over already; `None` when the subscription was
/// dropped.
async fn hand_over(
    cursor: &mut Cursor,
    event: subscribe_event::Event,
    outlet: &Outlet,
) -> Option<()> {
    let event = match event {
        subscribe_event::Event::Message(message) => {
            // An ephemeral message has no offset: it moves no resume point and is never a
            // duplicate of a stored one.
            if !message.ephemeral
                && !cursor.accept(message.offset, message.redelivery, Instant::now())
            {
                tracing::debug!(
                    offset = message.offset,
                    "dropping a message delivered already"
                );
                return Some(());
            }
            SubscriptionEvent::Message(message)
        }
        subscribe_event::Event::Gap(gap) => {
            if !cursor.accept_gap(&gap, Instant::now()) {
                tracing::debug!(?gap, "dropping a gap announced already");
                return Some(());
            }
            SubscriptionEvent::Gap(gap)
        }
        // `pump` unpacks batches; one arriving here (as the first event, against the contract)
        // is unpacked too, its messages taken one by one.
        subscribe_event::Event::Batch(batch) => {
            for message in batch.messages {
                Box::pin(hand_over(
                    cursor,
                    subscribe_event::Event::Message(message),
                    outlet,
                ))
                .await?;
            }
            return Some(());
        }
        subscribe_event::Event::Subscribed(subscribed) => {
            cursor.confirmed(subscribed.next_offset);
            if subscribed.subscription_id > 0 {
                outlet
                    .link
                    .send_replace(Link::Live(subscribed.subscription_id));
            }
            return Some(());
        }
    };
    outlet.sender.send(Ok(event)).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    #[test]
    fn cursor_resumes_from_the_original_start_until_confirmed() {
        let now = Instant::now();
        let mut cursor = Cursor::new(Start::Earliest, &plain());
        assert_eq!(cursor.resume_from(now), Start::Earliest);

        let mut cursor = Cursor::new(Start::Latest, &plain());
        cursor.confirmed(0);
        assert_eq!(cursor.resume_from(now), Start::Latest);
        cursor.confirmed(17);
        assert_eq!(cursor.resume_from(now), Start::Offset(17));
    }

    #[test]
    fn cursor_resumes_after_the_last_delivered_message() {
        let now = Instant::now();
        let mut cursor = Cursor::new(Start::Latest, &plain());
        cursor.confirmed(10);
        assert!(cursor.accept(12, 0, now));
        assert_eq!(cursor.resume_from(now), Start::Offset(13));
        // A later confirmation does not move the cursor back.
        cursor.confirmed(11);
        assert_eq!(cursor.resume_from(now), Start::Offset(13));
        // Nor does one past it (messages removed meanwhile) leave it behind.
        cursor.confirmed(20);
        assert_eq!(cursor.resume_from(now), Start::Offset(20));
    }

    #[test]
    fn cursor_drops_duplicates_and_older_messages() {
        let now = Instant::now();
        let mut cursor = Cursor::new(Start::Earliest, &plain());
        assert!(cursor.accept(5, 0, now));
        assert!(!cursor.accept(5, 0, now));
        assert!(!cursor.accept(3, 0, now));
        assert!(cursor.accept(6, 0, now));
        assert_eq!(cursor.resume_from(now), Start::Offset(7));
        // A redelivery is never a duplicate, and does not move the cursor back.
        assert!(cursor.accept(4, 1, now));
        assert_eq!(cursor.resume_from(now), Start::Offset(7));
    }

    #[test]
    fn cursor_counts_gaps_as_delivered() {
        let now = Instant::now();
        let mut cursor = Cursor::new(Start::Earliest, &plain());
        assert!(cursor.accept(5, 0, now));
        let gap = Gap {
            from_offset: 6,
            to_offset: 20,
            count: 9,
            reason: 1,
        };
        assert!(cursor.accept_gap(&gap, now));
        assert_eq!(cursor.resume_from(now), Start::Offset(21));
        assert!(!cursor.accept_gap(&gap, now));
        assert!(!cursor.accept(12, 0, now));
        assert!(cursor.accept(21, 0, now));
    }

    #[test]
    fn durable_cursors_keep_what_looks_like_a_duplicate() {
        let now = Instant::now();
        let mut cursor = Cursor::new(Start::Earliest, &plain().durable("billing"));
        assert!(cursor.accept(5, 0, now));
        assert!(cursor.accept(5, 0, now));
        assert!(cursor.accept(3, 0, now));
        assert_eq!(cursor.resume_from(now), Start::Offset(6));
    }

    #[test]
    fn throttled_cursors_resume_from_what_has_settled() {
        let interval = Duration::from_millis(100);
        // Settled: received more than 2 × 100 ms + 1 s before.
        let window = Duration::from_millis(1200);
        let t0 = Instant::now();
        let mut cursor = Cursor::new(Start::Latest, &plain().throttle(interval));
        cursor.confirmed(10);
        assert!(cursor.accept(12, 0, t0));
        assert!(cursor.accept(15, 0, t0 + Duration::from_millis(50)));
        // Out of offset order (a trailing-edge delivery): kept.
        assert!(cursor.accept(11, 0, t0 + Duration::from_millis(100)));
        // Nothing settled yet: from the confirmed offset.
        assert_eq!(cursor.resume_from(t0 + window), Start::Offset(10));
        // The first two settled.
        assert_eq!(
            cursor.resume_from(t0 + window + Duration::from_millis(60)),
            Start::Offset(16)
        );
        // A later confirmation past it wins.
        cursor.confirmed(30);
        assert_eq!(cursor.resume_from(t0 + window * 3), Start::Offset(30));
    }

    #[test]
    fn options_become_a_request() {
        use switchboard_proto::v1::FlowPolicy as Proto;
        let request = plain().to_request("a.>", Start::Offset(3));
        assert_eq!(request.pattern, "a.>");
        assert_eq!(
            request.start.and_then(|start| start.position),
            Some(start_position::Position::Offset(3))
        );
        assert_eq!(
            (
                request.policy,
                request.window,
                request.min_interval_ms,
                request.max_unacked,
                request.durable_name.as_str(),
                request.ack_timeout_ms
            ),
            (0, 0, 0, 0, "", 0)
        );
        // Batches are asked for unless turned off.
        assert_eq!(request.max_batch, DEFAULT_MAX_BATCH);
        assert_eq!(
            plain()
                .max_batch(1)
                .to_request("a", Start::Latest)
                .max_batch,
            1
        );

        let request = plain()
            .policy(FlowPolicy::DropOldest)
            .window(500)
            .throttle(Duration::from_micros(1500))
            .max_unacked(8)
            .durable("billing")
            .ack_timeout(Duration::from_secs(30))
            .to_request("a.>", Start::Latest);
        assert_eq!(request.policy, Proto::DropOldest as i32);
        assert_eq!(request.window, 500);
        assert_eq!(request.min_interval_ms, 2);
        assert_eq!(request.max_unacked, 8);
        assert_eq!(request.durable_name, "billing");
        assert_eq!(request.ack_timeout_ms, 30_000);

        let off = plain()
            .throttle(Duration::ZERO)
            .window(0)
            .max_unacked(0)
            .ack_timeout(Duration::ZERO);
        assert_eq!(
            (
                off.min_interval,
                off.window,
                off.max_unacked,
                off.ack_timeout
            ),
            (None, None, None, None)
        );
    }

    #[test]
    fn durations_are_whole_milliseconds_rounded_up() {
        assert_eq!(whole_millis(Duration::ZERO), 0);
        assert_eq!(whole_millis(Duration::from_nanos(1)), 1);
        assert_eq!(whole_millis(Duration::from_millis(250)), 250);
        assert_eq!(whole_millis(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn start_converts_to_a_position() {
        use start_position::Position;
        let position = |start: Start| StartPosition::from(start).position;
        assert_eq!(position(Start::Latest), Some(Position::Latest(Latest {})));
        assert_eq!(
            position(Start::Earliest),
            Some(Position::Earliest(Earliest {}))
        );
        assert_eq!(position(Start::Offset(7)), Some(Position::Offset(7)));
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        match position(Start::Time(time)) {
            Some(Position::Time(timestamp)) => {
                assert_eq!((timestamp.seconds, timestamp.nanos), (1, 500_000_000))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
