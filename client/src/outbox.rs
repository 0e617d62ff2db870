//! [`Outbox`]: a bounded, in-memory queue of messages that a task of its own publishes in order,
//! retrying each until the broker takes it, so that what a service publishes while the broker is
//! down (restarting, electing a leader, behind an open circuit) is sent once it is back.
//!
//! Why one queue for everything, and not only for what failed: a message queued during an outage
//! must not be overtaken by one published after the broker came back, so once anything waits,
//! everything waits behind it; with nothing waiting the queue is empty and a message goes straight
//! out. The queue is bounded by count and by bytes: when it is full, [`Outbox::publish`] fails
//! with [`Error::OutboxFull`] and the caller decides (drop, sample, back off) — memory never grows
//! without bound.
//!
//! What it promises: the messages of one outbox are stored in the order they were queued, each
//! once (every message carries an idempotency key, the caller's or a generated UUID, and a message
//! is resent with the same key until the broker answers: a resend of one that was stored is
//! answered `duplicate`), provided the broker comes back within its `loops.dedup_window` (2
//! minutes by default) of a send whose fate was unknown. A message the broker refuses for good
//! (invalid, denied, ...) is dropped from the queue, its receipt gets the refusal, and the next
//! goes on. What it does not: survive the process (it is memory; but see
//! [`Client::outbox_on_disk`], whose queue is also kept in a file and replayed when it is opened
//! again), or outlive its [`Outbox`] handles (dropping the last one stops the task; receipts still
//! waiting get [`Error::Closed`]).

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message as _;
use switchboard_proto::v1::{PublishAck, PublishRequest};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, Jitter};
use crate::client::Client;
use crate::error::Error;
use crate::outbox_file::Journal;
use crate::retry::{new_idempotency_key, retry_after};
use crate::trace;

/// The bounds of an [`Outbox`] and the pace of its resends.
///
/// ```
/// use switchboard_client::OutboxOptions;
///
/// let options = OutboxOptions::default().max_messages(1000).max_bytes(1 << 20);
/// assert_eq!((options.max_messages, options.max_bytes), (1000, 1 << 20));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxOptions {
    /// The most messages queued at once (at least 1). Default: 10 000.
    pub max_messages: usize,
    /// The most bytes queued at once, counted as the encoded size of each request. Default:
    /// 16 MiB.
    pub max_bytes: usize,
    /// The delay before the first resend of a message (before jitter). Default: 50 ms.
    pub initial_backoff: Duration,
    /// The longest delay between resends (before jitter). Default: 2 s.
    pub max_backoff: Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            max_messages: 10_000,
            max_bytes: 16 * 1024 * 1024,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl OutboxOptions {
    /// Sets [`OutboxOptions::max_messages`].
    pub fn max_messages(mut self, messages: usize) -> Self {
        self.max_messages = messages.max(1);
        self
    }

    /// Sets [`OutboxOptions::max_bytes`].
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Sets [`OutboxOptions::initial_backoff`] and [`OutboxOptions::max_backoff`].
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }
}

/// A bounded, in-memory queue in front of [`Client::publish`]: messages are queued at once and
/// published in order by a task of its own, each retried (same idempotency key) until the broker
/// takes or refuses it. See [`Client::outbox`].
///
/// Clones share the queue and the task; the task stops when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
    _flusher: Arc<Flusher>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the flusher when a message is queued.
    queued: Notify,
    /// The number of messages queued, for [`Outbox::flushed`].
    length: watch::Sender<usize>,
    options: OutboxOptions,
}

#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The file behind an on-disk outbox, in the queue's order (it is written under the same
    /// lock); `None` in memory.
    journal: Option<Journal>,
}

#[derive(Debug)]
struct Entry {
    request: PublishRequest,
    bytes: usize,
    receipt: oneshot::Sender<Result<PublishAck, Error>>,
}

/// Aborts the flushing task when the last [`Outbox`] goes.
#[derive(Debug)]
struct Flusher(JoinHandle<()>);

impl Drop for Flusher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`Outbox::publish`] returns for a queued message: its idempotency key at once, and, as a
/// future, the broker's ack once it is stored (or the refusal that dropped it). Dropping it does
/// not unqueue the message.
#[derive(Debug)]
pub struct OutboxReceipt {
    idempotency_key: String,
    ack: oneshot::Receiver<Result<PublishAck, Error>>,
}

impl OutboxReceipt {
    /// The idempotency key the message is sent with (the caller's, or a generated UUID).
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }
}

impl Future for OutboxReceipt {
    type Output = Result<PublishAck, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.ack)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(Error::Closed)))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Outbox {
    /// Queues `message`, at once: it carries the trace context current now (unless it has a
    /// `traceparent` of its own) and an idempotency key (its own, or a new UUID). Await the
    /// receipt for the ack, or drop it.
    ///
    /// # Errors
    /// [`Error::OutboxFull`] when queueing it would pass [`OutboxOptions::max_messages`] or
    /// [`OutboxOptions::max_bytes`]; [`Error::OutboxStorage`] when an on-disk outbox cannot write
    /// it to its file. Either way nothing is queued.
    ///
    /// An on-disk outbox writes the message to its file and waits for `fdatasync` before this
    /// returns (a blocking call, of the order of a millisecond on a local disk; more on a slow
    /// one): a message it says is queued survives the process.
    pub fn publish(&self, message: impl Into<PublishRequest>) -> Result<OutboxReceipt, Error> {
        let mut request = message.into();
        trace::inject_headers(&trace::current_context(), &mut request.headers);
        if request.idempotency_key.is_empty() && !request.ephemeral {
            request.idempotency_key = new_idempotency_key();
        }
        let bytes = request.encoded_len();
        let idempotency_key = request.idempotency_key.clone();
        let (sender, ack) = oneshot::channel();
        let options = &self.shared.options;
        {
            let mut queue = self.shared.lock();
            if queue.entries.len() >= options.max_messages
                || queue.bytes.saturating_add(bytes) > options.max_bytes
            {
                return Err(Error::OutboxFull {
                    messages: queue.entries.len(),
                    bytes: queue.bytes,
                    max_messages: options.max_messages,
                    max_bytes: options.max_bytes,
                });
            }
            if let Some(journal) = &mut queue.journal {
                journal.append_queued(&request)?;
            }
            queue.bytes += bytes;
            queue.entries.push_back(Entry {
                request,
                bytes,
                receipt: sender,
            });
            self.shared.length.send_replace(queue.entries.len());
        }
        self.shared.queued.notify_one();
        Ok(OutboxReceipt {
            idempotency_key,
            ack,
        })
    }

    /// How many messages are queued (the one being sent included).
    pub fn len(&self) -> usize {
        self.shared.lock().entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes are queued (encoded requests).
    pub fn bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Waits until the queue is empty: everything queued so far was stored or refused.
    pub async fn flushed(&self) {
        let mut length = self.shared.length.subscribe();
        // The sender lives in `self.shared`, so the channel cannot close while we wait.
        let _ = length.wait_for(|queued| *queued == 0).await;
    }
}

impl Client {
    /// An [`Outbox`] in front of this client's publishes: a bounded queue, published in order by
    /// a task of its own that retries every message (with its idempotency key, with backoff and
    /// full jitter, through the client's circuit breaker if it has one) until the broker stores
    /// or refuses it. See `docs/CLIENT-RESILIENCE.md`.
    ///
    /// # Panics
    /// When called outside a Tokio runtime (it spawns a task).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, OutboxOptions, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let outbox = client.outbox(OutboxOptions::default().max_messages(1000));
    /// // Returns at once, even while the broker is down; fails only when the outbox is full.
    /// let receipt = outbox.publish(Publish::new("telemetry.widget.click", r#"{"x":1}"#))?;
    /// println!("queued as {}", receipt.idempotency_key());
    /// let ack = receipt.await?;
    /// println!("stored at offset {}", ack.offset);
    /// # Ok(())
    /// # }
    /// ```
    pub fn outbox(&self, options: OutboxOptions) -> Outbox {
        self.start_outbox(Queue::default(), options)
    }

    /// An [`Outbox`] whose queue is also kept in the file at `path`, which it owns: every
    /// message is appended to it and synced (`fdatasync`) before [`Outbox::publish`] returns, and
    /// the file is truncated when everything in it was answered. Opening it again (after a crash
    /// or a restart of the process) replays it: the messages not yet answered are queued first, in
    /// order, and sent again with their idempotency keys, so each is stored once (within the
    /// broker's `loops.dedup_window` of its first send). A damaged record at the end of the file
    /// (a write torn by a crash) is detected by its checksum and dropped with a warning. Bounded
    /// like [`Client::outbox`]; the replayed messages count toward the bounds (they are all
    /// queued even when they pass them). See `docs/CLIENT-RESILIENCE.md`.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the file cannot be read or written, or another outbox (in
    /// this process or another) has it open.
    ///
    /// # Panics
    /// When called outside a Tokio runtime (it spawns a task).
    ///
    /// # Example
    /// ```no_run
    /// use switchboard_client::{Client, OutboxOptions, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let outbox = client.outbox_on_disk("/var/lib/panel/outbox.log", OutboxOptions::default())?;
    /// println!("{} messages from the last run to send", outbox.len());
    /// outbox.publish(Publish::new("telemetry.widget.click", r#"{"x":1}"#))?; // on disk now
    /// # Ok(())
    /// # }
    /// ```
    pub fn outbox_on_disk(
        &self,
        path: impl AsRef<Path>,
        options: OutboxOptions,
    ) -> Result<Outbox, Error> {
        let path = path.as_ref();
        let replayed = Journal::open(path)?;
        let mut queue = Queue::default();
        for request in replayed.pending {
            let bytes = request.encoded_len();
            // Nobody waits on a replayed message's receipt: `Outbox::flushed` tells when it went.
            let (receipt, _) = oneshot::channel();
            queue.bytes += bytes;
            queue.entries.push_back(Entry {
                request,
                bytes,
                receipt,
            });
        }
        if !queue.entries.is_empty() || replayed.dropped_bytes > 0 {
            tracing::info!(
                path = %path.display(),
                messages = queue.entries.len(),
                dropped_bytes = replayed.dropped_bytes,
                "outbox file replayed: sending again what was not answered"
            );
        }
        queue.journal = Some(replayed.journal);
        Ok(self.start_outbox(queue, options))
    }

    fn start_outbox(&self, queue: Queue, options: OutboxOptions) -> Outbox {
        let length = queue.entries.len();
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            queued: Notify::new(),
            length: watch::Sender::new(length),
            options,
        });
        let task = tokio::spawn(flush(self.clone(), Arc::clone(&shared)));
        Outbox {
            shared,
            _flusher: Arc::new(Flusher(task)),
        }
    }
}

/// The outbox's task: sends the message at the front until the broker answers for it, then the
/// next.
async fn flush(client: Client, shared: Arc<Shared>) {
    let options = &shared.options;
    let mut backoff =
        Backoff::new(options.initial_backoff, options.max_backoff).jitter(Jitter::Full);
    // The trace context travels in each message's headers, injected when it was queued.
    let no_context = opentelemetry::Context::new();
    loop {
        let front = shared
            .lock()
            .entries
            .front()
            .map(|entry| entry.request.clone());
        let Some(request) = front else {
            shared.queued.notified().await;
            continue;
        };
        let ephemeral = request.ephemeral;
        let outcome = client.publish_once(request, &no_context).await;
        let wait = match &outcome {
            Ok(_) => None,
            Err(_) if ephemeral => None,
            Err(Error::CircuitOpen { retry_in, .. }) => Some(*retry_in),
            Err(error) => retry_after(error),
        };
        if let Some(least) = wait {
            let delay = backoff.next_delay().max(least);
            if let Err(error) = &outcome {
                tracing::debug!(
                    %error,
                    delay_ms = delay.as_millis() as u64,
                    "outbox: the broker did not take the message, sending it again"
                );
            }
            tokio::time::sleep(delay).await;
            continue;
        }
        backoff.reset();
        let entry = {
            let mut queue = shared.lock();
            let entry = queue.entries.pop_front();
            if let Some(entry) = &entry {
                queue.bytes -= entry.bytes;
                if let Some(journal) = &mut queue.journal {
                    journal.mark_done();
                }
            }
            shared.length.send_replace(queue.entries.len());
            entry
        };
        let Some(entry) = entry else { continue };
        if let Err(error) = &outcome {
            tracing::warn!(
                channel = %entry.request.channel,
                idempotency_key = %entry.request.idempotency_key,
                %error,
                "outbox: the broker refused a message; dropped from the queue"
            );
        }
        let _ = entry.receipt.send(outcome);
    }
}
