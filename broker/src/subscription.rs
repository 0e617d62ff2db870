//! One subscription: the task that feeds a `Subscribe` stream.
//!
//! It registers with the [`Hub`], works out its first offset from the start position, sends
//! `Subscribed`, reads what it must from the store (replay), then follows its mailbox. Whenever the
//! hub marks it lagging it reads the store again from its own next offset and re-arms (see
//! [`crate::hub`] for why that has no gap and no duplicate). The outgoing stream is a bounded
//! channel: a slow client makes this task wait, never the hub or the publishers.
//!
//! The task ends when the client goes away, when the broker shuts down (with UNAVAILABLE
//! `SHUTTING_DOWN`, so the client resumes elsewhere or later), or on a store error.

use switchboard_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::channel::Pattern;
use crate::edge::convert;
use crate::edge::validate::Start;
use crate::error::BrokerError;
use crate::hub::{Hub, MailboxItems};
use crate::message::{now_us, StoredMessage};
use crate::shutdown::ShutdownSignal;
use crate::store::{MessageStore, ReadRange};

/// Messages read from the store per page while catching up.
const CATCH_UP_PAGE: usize = 256;
/// Bytes read per page while catching up.
const CATCH_UP_BYTES: usize = 1024 * 1024;
/// Batches visited per page while catching up.
const CATCH_UP_BATCHES: usize = 64;

/// The outgoing half of a `Subscribe` stream.
pub type EventSender = mpsc::Sender<Result<pb::SubscribeEvent, Status>>;

/// What the subscription follows and from where.
pub struct SubscriptionSpec {
    /// Channels to deliver.
    pub pattern: Pattern,
    /// Where to begin.
    pub start: Start,
}

/// Why a subscription ended, for logs.
enum End {
    ClientGone,
    ShuttingDown,
    Failed(BrokerError),
}

/// Runs the subscription until it ends. See the module docs.
pub async fn run(
    hub: Hub,
    store: MessageStore,
    spec: SubscriptionSpec,
    out: EventSender,
    mut shutdown: ShutdownSignal,
) {
    let end = tokio::select! {
        end = feed(&hub, &store, &spec, &out) => end,
        _ = shutdown.wait() => End::ShuttingDown,
        _ = out.closed() => End::ClientGone,
    };
    match end {
        End::ClientGone => {}
        End::ShuttingDown => {
            let _ = out.try_send(Err(Status::from(BrokerError::ShuttingDown)));
        }
        End::Failed(e) => {
            tracing::error!(pattern = %spec.pattern, error = %e, "subscription failed");
            let _ = out.try_send(Err(Status::from(e)));
        }
    }
}

struct Feeder<'a> {
    store: &'a MessageStore,
    pattern: &'a Pattern,
    out: &'a EventSender,
    /// The next offset this subscription may deliver; everything before it was delivered or
    /// does not match.
    next: u64,
}

impl Feeder<'_> {
    async fn deliver(&mut self, message: &StoredMessage) -> Result<(), End> {
        if message.offset < self.next {
            return Ok(());
        }
        self.next = message.offset + 1;
        if message.is_expired(now_us()) {
            return Ok(());
        }
        let event = pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Message(convert::message(
                message,
            ))),
        };
        self.out.send(Ok(event)).await.map_err(|_| End::ClientGone)
    }

    /// Delivers matching stored messages from `self.next` through `last`.
    async fn catch_up(&mut self, last: u64) -> Result<(), End> {
        while self.next <= last {
            let page = self
                .store
                .read(&ReadRange {
                    from: self.next,
                    to_offset: last,
                    to_time_us: u64::MAX,
                    pattern: self.pattern,
                    now_us: now_us(),
                    limit: CATCH_UP_PAGE,
                    max_bytes: CATCH_UP_BYTES,
                    max_batches: CATCH_UP_BATCHES,
                })
                .map_err(End::Failed)?;
            for message in &page.messages {
                self.deliver(message).await?;
            }
            self.next = self.next.max(page.next);
            if page.done {
                break;
            }
        }
        self.next = self.next.max(last + 1);
        Ok(())
    }
}

async fn feed(hub: &Hub, store: &MessageStore, spec: &SubscriptionSpec, out: &EventSender) -> End {
    let (registration, last) = hub.register(spec.pattern.clone());
    let next = match first_offset(store, spec.start, last) {
        Ok(next) => next,
        Err(e) => return End::Failed(e),
    };
    let subscribed = pb::SubscribeEvent {
        event: Some(pb::subscribe_event::Event::Subscribed(pb::Subscribed {
            next_offset: next,
        })),
    };
    if out.send(Ok(subscribed)).await.is_err() {
        return End::ClientGone;
    }
    let mut feeder = Feeder {
        store,
        pattern: &spec.pattern,
        out,
        next,
    };
    if let Err(end) = feeder.catch_up(last).await {
        return end;
    }
    loop {
        match registration.mailbox.next().await {
            MailboxItems::Messages(messages) => {
                for message in &messages {
                    if let Err(end) = feeder.deliver(message).await {
                        return end;
                    }
                }
            }
            MailboxItems::Lagging => {
                let last = registration.rearm();
                if let Err(end) = feeder.catch_up(last).await {
                    return end;
                }
            }
        }
    }
}

/// The first offset to deliver, given that offsets up to `last` are already in the store.
fn first_offset(store: &MessageStore, start: Start, last: u64) -> Result<u64, BrokerError> {
    Ok(match start {
        Start::Latest => last + 1,
        Start::Earliest => store
            .first_batch()?
            .map(|b| b.key)
            .unwrap_or(last + 1)
            .min(last + 1),
        Start::Offset(offset) => offset.max(1),
        Start::Time(time_us) => store
            .first_offset_at_or_after(time_us)?
            .unwrap_or(last + 1)
            .min(last + 1),
    })
}
