//! Subscribing: [`Start`], [`SubscribeOptions`], [`Backoff`] and the resuming [`Subscription`].
//!
//! A subscription runs in a task of its own that feeds a bounded queue. When the stream breaks for
//! a transient reason (the connection was lost, the broker is unavailable, or it closed the
//! stream), the task calls `Subscribe` again after a randomized, growing delay, starting right
//! after the last message it handed over, so the consumer sees neither a gap nor a duplicate.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use rand::Rng;
use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::{
    start_position, subscribe_event, Earliest, Latest, Message, StartPosition, SubscribeEvent,
    SubscribeRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::Error;

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

/// How a [`Subscription`] buffers and resumes.
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
    /// How many messages the subscription holds for a consumer that has not read them yet
    /// (at least 1). When it is full the subscription stops reading from the broker, which then
    /// holds back (a slow consumer never makes memory grow). Default: 64.
    pub buffer: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            max_reconnect_attempts: None,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            buffer: 64,
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
}

/// Exponential backoff with jitter: the base delay starts at `initial`, doubles after every
/// attempt up to `max`, and each actual delay is drawn uniformly from `[base / 2, base]`, so many
/// clients cut off at once do not come back in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and growing to at most `max` (`max` is raised to `initial`
    /// if it is smaller).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            base: initial,
        }
    }

    /// The base delay for the next attempt (before jitter), which then doubles up to the cap.
    pub fn next_base(&mut self) -> Duration {
        let base = self.base;
        self.base = self.base.saturating_mul(2).min(self.max);
        base
    }

    /// The delay to wait before the next attempt: [`Backoff::next_base`] with jitter, uniformly in
    /// `[base / 2, base]`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next_base();
        let low = base / 2;
        if base <= low {
            return base;
        }
        rand::thread_rng().gen_range(low..=base)
    }

    /// Starts over from the initial delay (after a successful attempt).
    pub fn reset(&mut self) {
        self.base = self.initial;
    }
}

/// A live subscription: a [`Stream`] of the messages matching its pattern, in offset order.
///
/// It resumes by itself across connection loss (see [`Client::subscribe`]) and ends only with a
/// non-transient error (for example `PERMISSION_DENIED`), with the last error once
/// [`SubscribeOptions::max_reconnect_attempts`] is exhausted, or never. Dropping it stops its task
/// and cancels the call.
#[derive(Debug)]
pub struct Subscription {
    messages: mpsc::Receiver<Result<Message, Error>>,
    task: JoinHandle<()>,
    pattern: String,
    next_offset: Option<u64>,
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
}

impl Stream for Subscription {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.messages.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Subscribes to the messages whose channel matches `pattern` (for example `crm.*.updated` or
    /// `telemetry.>`), from `start`, with the default [`SubscribeOptions`] (retry forever).
    ///
    /// This returns once the broker has confirmed the subscription (its `Subscribed` event), so
    /// anything published afterwards will be delivered. The subscription then resumes by itself:
    /// when the stream ends with a transient error (see [`Error::is_transient`]) or the broker
    /// closes it, it subscribes again after a backoff (50 ms doubling to 5 s, with jitter) from
    /// the offset after the last message delivered (or from the confirmed `next_offset` if none
    /// was), and drops any message at or below the last delivered offset, so the consumer sees
    /// neither a gap nor a duplicate.
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
    /// As [`Client::subscribe`]; also [`Error::InvalidArgument`] for an empty pattern.
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
        let mut grpc = self.grpc();
        let opened = open(&mut grpc, &pattern, start).await?;
        let next_offset = opened.next_offset;
        let (sender, messages) = mpsc::channel(options.buffer.max(1));
        let cursor = Cursor::new(start);
        let task = tokio::spawn(run(grpc, pattern.clone(), cursor, opened, sender, options));
        Ok(Subscription {
            messages,
            task,
            pattern,
            next_offset,
        })
    }
}

/// What the subscription has handed over so far, and so where it resumes.
#[derive(Clone, Debug)]
struct Cursor {
    original: Start,
    last_delivered: Option<u64>,
    next_offset: Option<u64>,
}

impl Cursor {
    fn new(original: Start) -> Cursor {
        Cursor {
            original,
            last_delivered: None,
            next_offset: None,
        }
    }

    /// Records a `Subscribed` confirmation (0 means the broker did not say).
    fn confirmed(&mut self, next_offset: u64) {
        if next_offset > 0 {
            self.next_offset = Some(next_offset);
        }
    }

    /// Whether a message at `offset` is new; if so it counts as delivered.
    fn accept(&mut self, offset: u64) -> bool {
        if self.last_delivered.is_some_and(|last| offset <= last) {
            return false;
        }
        self.last_delivered = Some(offset);
        true
    }

    /// Where to subscribe again: after the last delivered message, else at the confirmed next
    /// offset, else where the subscription first started.
    fn resume_from(&self) -> Start {
        match (self.last_delivered, self.next_offset) {
            (Some(last), _) => Start::Offset(last.saturating_add(1)),
            (None, Some(next)) => Start::Offset(next),
            (None, None) => self.original,
        }
    }
}

/// A `Subscribe` call that has produced its first event.
struct Opened {
    events: Streaming<SubscribeEvent>,
    next_offset: Option<u64>,
    first_message: Option<Message>,
}

/// Calls `Subscribe` and waits for the first event (`Subscribed`, per the contract).
async fn open(
    grpc: &mut BrokerClient<Channel>,
    pattern: &str,
    start: Start,
) -> Result<Opened, Error> {
    let request = SubscribeRequest {
        pattern: pattern.to_owned(),
        start: Some(start.into()),
    };
    let mut events = grpc.subscribe(request).await?.into_inner();
    let (next_offset, first_message) = match events.message().await? {
        Some(SubscribeEvent { event }) => match event {
            Some(subscribe_event::Event::Subscribed(subscribed)) => {
                (Some(subscribed.next_offset).filter(|next| *next > 0), None)
            }
            // Not what the contract promises, but nothing is lost by taking it.
            Some(subscribe_event::Event::Message(message)) => (None, Some(message)),
            None => (None, None),
        },
        None => return Err(closed_by_broker("before confirming the subscription")),
    };
    Ok(Opened {
        events,
        next_offset,
        first_message,
    })
}

fn closed_by_broker(when: &str) -> Error {
    Error::Status {
        code: tonic::Code::Unavailable,
        reason: None,
        message: format!("the broker closed the subscription stream {when}"),
        metadata: Default::default(),
    }
}

/// The subscription's task: pumps events into `sender`, and resumes after transient failures.
async fn run(
    mut grpc: BrokerClient<Channel>,
    pattern: String,
    mut cursor: Cursor,
    mut opened: Opened,
    sender: mpsc::Sender<Result<Message, Error>>,
    options: SubscribeOptions,
) {
    let mut backoff = Backoff::new(options.initial_backoff, options.max_backoff);
    loop {
        let Some(failure) = pump(&mut cursor, opened, &sender).await else {
            return; // The subscription was dropped.
        };
        if !failure.is_transient() {
            let _ = sender.send(Err(failure)).await;
            return;
        }
        tracing::warn!(
            %pattern,
            error = %failure,
            resume_from = ?cursor.resume_from(),
            "subscription interrupted, resuming"
        );
        let mut last_error = failure;
        let mut attempts: u32 = 0;
        opened = loop {
            if options
                .max_reconnect_attempts
                .is_some_and(|max| attempts >= max)
            {
                let _ = sender.send(Err(last_error)).await;
                return;
            }
            attempts = attempts.saturating_add(1);
            let delay = backoff.next_delay();
            tokio::select! {
                _ = sender.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let start = cursor.resume_from();
            let attempt = tokio::select! {
                _ = sender.closed() => return,
                attempt = open(&mut grpc, &pattern, start) => attempt,
            };
            match attempt {
                Ok(opened) => {
                    tracing::info!(%pattern, ?start, attempts, "subscription resumed");
                    backoff.reset();
                    break opened;
                }
                Err(error) if error.is_transient() => {
                    tracing::debug!(%pattern, %error, attempts, "resubscribe attempt failed");
                    last_error = error;
                }
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
        };
    }
}

/// Hands the events of one `Subscribe` call over until it fails; returns why, or `None` when the
/// subscription was dropped.
async fn pump(
    cursor: &mut Cursor,
    opened: Opened,
    sender: &mpsc::Sender<Result<Message, Error>>,
) -> Option<Error> {
    let Opened {
        mut events,
        next_offset,
        first_message,
    } = opened;
    if let Some(next_offset) = next_offset {
        cursor.confirmed(next_offset);
    }
    if let Some(message) = first_message {
        deliver(cursor, message, sender).await?;
    }
    loop {
        let event = tokio::select! {
            _ = sender.closed() => return None,
            event = events.message() => event,
        };
        match event {
            Ok(Some(SubscribeEvent { event })) => match event {
                Some(subscribe_event::Event::Message(message)) => {
                    deliver(cursor, message, sender).await?;
                }
                Some(subscribe_event::Event::Subscribed(subscribed)) => {
                    cursor.confirmed(subscribed.next_offset);
                }
                None => {}
            },
            Ok(None) => return Some(closed_by_broker("unexpectedly")),
            Err(status) => return Some(status.into()),
        }
    }
}

/// Sends `message` on unless it was already delivered; `None` when the subscription was dropped.
async fn deliver(
    cursor: &mut Cursor,
    message: Message,
    sender: &mpsc::Sender<Result<Message, Error>>,
) -> Option<()> {
    if !cursor.accept(message.offset) {
        tracing::debug!(
            offset = message.offset,
            "dropping a message delivered already"
        );
        return Some(());
    }
    sender.send(Ok(message)).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let bases: Vec<u128> = (0..10).map(|_| backoff.next_base().as_millis()).collect();
        assert_eq!(
            bases,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        backoff.reset();
        assert_eq!(backoff.next_base(), Duration::from_millis(50));
    }

    #[test]
    fn backoff_jitter_stays_within_half_to_full_base() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut base = Duration::from_millis(50);
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2 && delay <= base, "{delay:?} vs {base:?}");
            base = (base * 2).min(Duration::from_secs(5));
        }
    }

    #[test]
    fn backoff_cap_below_initial_is_raised() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(backoff.next_base(), Duration::from_secs(1));
        assert_eq!(backoff.next_base(), Duration::from_secs(1));
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.next_delay(), Duration::ZERO);
    }

    #[test]
    fn cursor_resumes_from_the_original_start_until_confirmed() {
        let cursor = Cursor::new(Start::Earliest);
        assert_eq!(cursor.resume_from(), Start::Earliest);

        let mut cursor = Cursor::new(Start::Latest);
        cursor.confirmed(0);
        assert_eq!(cursor.resume_from(), Start::Latest);
        cursor.confirmed(17);
        assert_eq!(cursor.resume_from(), Start::Offset(17));
    }

    #[test]
    fn cursor_resumes_after_the_last_delivered_message() {
        let mut cursor = Cursor::new(Start::Latest);
        cursor.confirmed(10);
        assert!(cursor.accept(12));
        assert_eq!(cursor.resume_from(), Start::Offset(13));
        // A later confirmation does not move the cursor back.
        cursor.confirmed(11);
        assert_eq!(cursor.resume_from(), Start::Offset(13));
    }

    #[test]
    fn cursor_drops_duplicates_and_older_messages() {
        let mut cursor = Cursor::new(Start::Earliest);
        assert!(cursor.accept(5));
        assert!(!cursor.accept(5));
        assert!(!cursor.accept(3));
        assert!(cursor.accept(6));
        assert_eq!(cursor.resume_from(), Start::Offset(7));
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
