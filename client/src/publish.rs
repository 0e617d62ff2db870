//! Publishing: the [`Publish`] builder, [`Client::publish`], [`Client::publish_stream`], the
//! [`Publisher`] handle, and [`PublishErrorKind`], what a failed publish asks of the caller.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use switchboard_proto::v1::{
    publish_stream_ack, Message, PublishAck, PublishRequest, PublishStreamAck,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tracing::{Instrument, Span};

use crate::client::Client;
use crate::error::Error;
use crate::retry::{new_idempotency_key, next_wait, RetryPolicy};
use crate::trace;

/// One message to publish, built step by step and turned into a [`PublishRequest`].
///
/// Only the channel and the payload are required; the broker fills in the defaults (content type
/// `application/json`, schema version `1.0.0`, a random correlation id, no TTL).
///
/// A message published while handling a delivery should say so with [`Publish::caused_by`], which
/// carries the conversation's correlation id and the causal chain (see there).
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::Publish;
///
/// let message = Publish::new("crm.contact.updated", r#"{"id":42}"#)
///     .schema_version("1.2.0")
///     .ttl(Duration::from_secs(30))
///     .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
/// assert_eq!(message.channel(), "crm.contact.updated");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Publish {
    request: PublishRequest,
}

impl Publish {
    /// A message with this channel (for example `crm.contact.updated`) and payload.
    pub fn new(channel: impl Into<String>, payload: impl Into<Bytes>) -> Publish {
        Publish {
            request: PublishRequest {
                channel: channel.into(),
                payload: payload.into(),
                ..PublishRequest::default()
            },
        }
    }

    /// Sets the payload's media type. Unset means `application/json`, in which case the payload
    /// must be valid JSON.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Publish {
        self.request.content_type = content_type.into();
        self
    }

    /// Sets the semver version of the payload's schema (`1.2.0`). Unset means `1.0.0`.
    pub fn schema_version(mut self, schema_version: impl Into<String>) -> Publish {
        self.request.schema_version = schema_version.into();
        self
    }

    /// Sets the correlation id (a UUID). Unset means the broker generates one and returns it in
    /// the ack.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Publish {
        self.request.correlation_id = correlation_id.into();
        self
    }

    /// Sets the id of the message that caused this one (at most 256 bytes). When it is the decimal
    /// offset of a stored message the broker follows the causal chain through it; prefer
    /// [`Publish::caused_by`], which sets it (with the correlation id and the hop count) from the
    /// delivered message itself.
    pub fn causation_id(mut self, causation_id: impl Into<String>) -> Publish {
        self.request.causation_id = causation_id.into();
        self
    }

    /// Marks this message as a reaction to `cause`, a message delivered by a subscription (or read
    /// from history): it sets
    /// - the correlation id to the cause's, so the whole conversation shares one (left unset when
    ///   the cause has none);
    /// - the causation id to the cause's offset, as a decimal string;
    /// - the hop count to the cause's `hops` + 1 (saturating).
    ///
    /// This is how the broker detects publish loops: it follows the chain of causation ids back
    /// through the stored messages (those published within its `loops.window`, 5 minutes by
    /// default), and refuses a publish whose chain re-enters a channel already in it
    /// (A → B → A), or whose hop count exceeds its limit (`loops.max_hops`, 16 by default), with
    /// `FAILED_PRECONDITION LOOP_DETECTED`; a long chain through distinct channels is accepted.
    /// A service that republishes what it receives without `caused_by` cannot be protected that
    /// way.
    ///
    /// Call it before [`Publish::correlation_id`], [`Publish::causation_id`] or [`Publish::hops`]
    /// to override one of the three.
    ///
    /// ```
    /// use switchboard_client::proto::PublishRequest;
    /// use switchboard_client::{Message, Publish};
    ///
    /// // A message as a subscription delivers it.
    /// let delivered = Message {
    ///     offset: 41,
    ///     channel: "crm.contact.updated".to_owned(),
    ///     correlation_id: "6f1c2a3e-8d4b-4a5e-9f00-0123456789ab".to_owned(),
    ///     hops: 2,
    ///     ..Message::default()
    /// };
    /// let reaction = Publish::new("crm.contact.enriched", r#"{"id":42}"#).caused_by(&delivered);
    /// let request = PublishRequest::from(reaction);
    /// assert_eq!(request.correlation_id, delivered.correlation_id);
    /// assert_eq!(request.causation_id, "41");
    /// assert_eq!(request.hops, 3);
    /// ```
    pub fn caused_by(mut self, cause: &Message) -> Publish {
        if !cause.correlation_id.is_empty() {
            self.request.correlation_id = cause.correlation_id.clone();
        }
        self.request.causation_id = cause.offset.to_string();
        self.request.hops = cause.hops.saturating_add(1);
        self
    }

    /// Sets how many messages precede this one in its causal chain: 0 (the default) for a message
    /// nobody caused. [`Publish::caused_by`] counts it for you; the broker refuses a publish above
    /// its limit (`loops.max_hops`, 16 by default) with `FAILED_PRECONDITION LOOP_DETECTED`.
    pub fn hops(mut self, hops: u32) -> Publish {
        self.request.hops = hops;
        self
    }

    /// Sets the key that identifies this logical message across retries (at most 256 bytes).
    pub fn idempotency_key(mut self, idempotency_key: impl Into<String>) -> Publish {
        self.request.idempotency_key = idempotency_key.into();
        self
    }

    /// Sets the time to live, counted from the publish time. It is sent in whole milliseconds,
    /// rounded up, so a non-zero TTL never becomes 0 (which would mean "no TTL");
    /// `Duration::ZERO` means no TTL.
    pub fn ttl(mut self, ttl: Duration) -> Publish {
        self.request.ttl_ms = ttl_millis(ttl);
        self
    }

    /// Makes the message ephemeral: delivered at once to the live subscribers that match on every
    /// node and never stored — no offset (the ack's is 0), no history, no replay, at most once.
    /// For typing indicators, cursor positions, presence. TTL and idempotency key are ignored.
    pub fn ephemeral(mut self) -> Publish {
        self.request.ephemeral = true;
        self
    }

    /// Adds a header (a later value for the same name replaces an earlier one). W3C trace context
    /// (`traceparent`, `tracestate`) travels here: a `traceparent` set explicitly is sent as is,
    /// instead of the caller's current context (see [`Publish::trace_context`]).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Publish {
        self.request.headers.insert(name.into(), value.into());
        self
    }

    /// Adds every header of `headers`, as [`Publish::header`] does for one.
    pub fn headers<K, V>(mut self, headers: impl IntoIterator<Item = (K, V)>) -> Publish
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.request.headers.extend(
            headers
                .into_iter()
                .map(|(name, value)| (name.into(), value.into())),
        );
        self
    }

    /// Puts this message in the trace of `context`: sets its `traceparent` (and `tracestate`, when
    /// not empty) headers from `context`'s span context, replacing any set before, so the publish
    /// sends them instead of the caller's current context. With a context that has no valid span
    /// context, it removes them, and the publish injects the current context as usual.
    ///
    /// By default every publish carries the context current when it is made (see
    /// [`current_context`](crate::current_context)); this is for a message published on behalf of
    /// another trace, or for the messages of [`Client::publish_stream`], which otherwise all carry
    /// the context of the call.
    ///
    /// ```
    /// use opentelemetry::trace::{
    ///     SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    /// };
    /// use opentelemetry::Context;
    /// use switchboard_client::Publish;
    ///
    /// let context = Context::new().with_remote_span_context(SpanContext::new(
    ///     TraceId::from(0x0af7651916cd43dd8448eb211c80319c),
    ///     SpanId::from(0xb7ad6b7169203331),
    ///     TraceFlags::SAMPLED,
    ///     true,
    ///     TraceState::default(),
    /// ));
    /// let message = Publish::new("crm.contact.updated", r#"{"id":42}"#).trace_context(&context);
    /// assert_eq!(
    ///     message.header_map()["traceparent"],
    ///     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    /// );
    /// ```
    pub fn trace_context(mut self, context: &opentelemetry::Context) -> Publish {
        trace::replace_headers(context, &mut self.request.headers);
        self
    }

    /// The channel this message is published on.
    pub fn channel(&self) -> &str {
        &self.request.channel
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.request.payload
    }

    /// The headers set so far.
    pub fn header_map(&self) -> &HashMap<String, String> {
        &self.request.headers
    }

    /// The hop count set so far (see [`Publish::hops`]).
    pub fn hop_count(&self) -> u32 {
        self.request.hops
    }

    /// The request this message is sent as.
    pub fn into_request(self) -> PublishRequest {
        self.request
    }
}

impl From<Publish> for PublishRequest {
    fn from(message: Publish) -> PublishRequest {
        message.request
    }
}

/// A TTL in whole milliseconds, rounded up, saturating at `u64::MAX`.
fn ttl_millis(ttl: Duration) -> u64 {
    let millis = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// What a failed publish asks of the caller, from [`Error::publish_kind`]: fix the message, fix
/// the credentials, give up on this message, or retry.
///
/// It is read from the gRPC code, one table in [`Error::publish_kind`], so a refusal in a publish
/// stream ([`Error::Refused`]) sorts the same as the same refusal of a single publish.
/// `docs/ERRORS.md` lists the reasons behind each code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The message is malformed (`INVALID_ARGUMENT`: `CHANNEL_INVALID`, `PAYLOAD_TOO_LARGE`,
    /// `HEADERS_INVALID`, ...; `OUT_OF_RANGE` for a request the transport finds too large; or
    /// [`Error::InvalidArgument`] from the client). Sending it again fails again: fix it.
    Invalid,
    /// The call's credentials do not allow it (`UNAUTHENTICATED`: no, a bad or an expired token;
    /// `PERMISSION_DENIED`: `PUBLISH_DENIED`, `ORIGIN_NOT_ALLOWED`). An expired token
    /// ([`Error::is_token_expired`]) works again with a new one; the others need other grants.
    Denied,
    /// The message is well-formed and allowed, but the broker's rules refuse it
    /// (`FAILED_PRECONDITION`: `LOOP_DETECTED`, see [`Publish::caused_by`]). Not worth a retry.
    Refused,
    /// The broker could not take the message now: the connection failed, there is no leader or
    /// quorum, the broker is stopping, or a limit was reached (`RATE_LIMITED`, whose wait is in
    /// the `retry_after_ms` [metadata](Error::metadata)); or, on the client's side, its circuit
    /// breaker is open ([`Error::CircuitOpen`]) or an outbox is full ([`Error::OutboxFull`]).
    /// Retry later with the same idempotency key: a write whose fate is unknown
    /// (`LEADER_UNREACHABLE`, `NO_QUORUM`) is then stored once. A
    /// [`RetryPolicy`](crate::RetryPolicy) does this for you (not every failure of this kind is
    /// retried by it: see there).
    Unavailable,
    /// The [`Publisher`] was used after its stream ended ([`Error::Closed`]); the acks stream says
    /// why it ended.
    Closed,
    /// Anything else: a failure of the broker itself (`INTERNAL`, `DATA_LOSS`), or a code a publish
    /// does not answer with. Report it.
    Other,
}

impl Error {
    /// What this error, returned by a publish ([`Client::publish`], [`Publisher::send`],
    /// [`Publisher::publish`], a refusal from [`split_stream_ack`]), asks of the caller; see
    /// [`PublishErrorKind`]. Meant for publish errors, though it sorts any error.
    ///
    /// # Examples
    /// ```no_run
    /// use switchboard_client::{Client, Publish, PublishErrorKind};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let message = Publish::new("crm.contact.updated", r#"{"id":42}"#).idempotency_key("c42-v7");
    /// match client.publish(message).await {
    ///     Ok(ack) => println!("stored at offset {}", ack.offset),
    ///     Err(error) if error.publish_kind() == PublishErrorKind::Unavailable => {
    ///         // Keep the message (with its idempotency key) and send it again later.
    ///     }
    ///     Err(error) => return Err(error),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn publish_kind(&self) -> PublishErrorKind {
        let code = match self {
            Error::Closed => return PublishErrorKind::Closed,
            Error::InvalidArgument(_) => return PublishErrorKind::Invalid,
            Error::Connect { .. }
            | Error::CircuitOpen { .. }
            | Error::OutboxFull { .. }
            | Error::NoReply { .. } => return PublishErrorKind::Unavailable,
            Error::OutboxStorage { .. } => return PublishErrorKind::Other,
            Error::Status { .. } | Error::Refused(_) => self.code(),
        };
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => PublishErrorKind::Invalid,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                PublishErrorKind::Denied
            }
            tonic::Code::FailedPrecondition => PublishErrorKind::Refused,
            code if crate::error::is_transient_code(code) => PublishErrorKind::Unavailable,
            _ => PublishErrorKind::Other,
        }
    }
}

/// Splits one answer of a publish stream into its sequence number (the zero-based position of the
/// request it answers) and its outcome: the ack, or the refusal as an [`Error::Refused`].
pub fn split_stream_ack(ack: PublishStreamAck) -> (u64, Result<PublishAck, Error>) {
    let outcome = match ack.result {
        Some(publish_stream_ack::Result::Ack(ack)) => Ok(ack),
        Some(publish_stream_ack::Result::Refusal(refusal)) => Err(Error::Refused(refusal)),
        None => Err(Error::Status {
            code: tonic::Code::Internal,
            reason: None,
            message: "the broker sent a stream ack with neither an ack nor a refusal".to_owned(),
            metadata: Default::default(),
        }),
    };
    (ack.sequence, outcome)
}

type PendingCall = JoinHandle<Result<tonic::Response<Streaming<PublishStreamAck>>, tonic::Status>>;

/// The answers of a publish stream, one [`PublishStreamAck`] per message in message order; see
/// [`Client::publish_stream`] and [`Client::publisher`].
///
/// A refused message yields `Ok` with a refusal inside (use [`split_stream_ack`]) and the stream
/// goes on; an `Err` is a broker-side or transport failure that ends the stream. Dropping it
/// cancels the call.
#[derive(Debug)]
pub struct PublishAcks {
    state: AcksState,
}

#[derive(Debug)]
enum AcksState {
    /// The call runs in a task of its own, so messages flow before anyone polls the acks.
    Starting(PendingCall),
    Streaming(Box<Streaming<PublishStreamAck>>),
    /// Under a retry policy: the answers of the task that resumes broken streams
    /// (`publish_resume.rs`).
    Resuming {
        answers: mpsc::Receiver<Result<PublishStreamAck, Error>>,
        task: JoinHandle<()>,
    },
    Done,
}

impl Stream for PublishAcks {
    type Item = Result<PublishStreamAck, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match &mut self.state {
                AcksState::Starting(call) => {
                    let outcome = ready!(Pin::new(call).poll(cx));
                    match outcome {
                        Ok(Ok(response)) => {
                            self.state = AcksState::Streaming(Box::new(response.into_inner()));
                        }
                        Ok(Err(status)) => {
                            self.state = AcksState::Done;
                            return Poll::Ready(Some(Err(status.into())));
                        }
                        Err(join_error) => {
                            self.state = AcksState::Done;
                            return Poll::Ready(Some(Err(Error::Status {
                                code: tonic::Code::Cancelled,
                                reason: None,
                                message: format!("the publish stream task ended: {join_error}"),
                                metadata: Default::default(),
                            })));
                        }
                    }
                }
                AcksState::Streaming(acks) => {
                    return match ready!(acks.poll_next_unpin(cx)) {
                        Some(Ok(ack)) => Poll::Ready(Some(Ok(ack))),
                        Some(Err(status)) => {
                            self.state = AcksState::Done;
                            Poll::Ready(Some(Err(status.into())))
                        }
                        None => {
                            self.state = AcksState::Done;
                            Poll::Ready(None)
                        }
                    };
                }
                AcksState::Resuming { answers, .. } => {
                    return match ready!(answers.poll_recv(cx)) {
                        Some(answer) => Poll::Ready(Some(answer)),
                        None => {
                            self.state = AcksState::Done;
                            Poll::Ready(None)
                        }
                    };
                }
                AcksState::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for PublishAcks {
    fn drop(&mut self) {
        match &self.state {
            AcksState::Starting(call) => call.abort(),
            AcksState::Resuming { task, .. } => task.abort(),
            AcksState::Streaming(_) | AcksState::Done => {}
        }
    }
}

/// The sending half of a publish stream opened with [`Client::publisher`]: a bounded queue of
/// messages, so a fast producer waits instead of growing memory.
///
/// Clones feed the same stream. The stream ends (and the broker finishes its acks) once every
/// clone is dropped.
#[derive(Clone, Debug)]
pub struct Publisher {
    queue: mpsc::Sender<PublishRequest>,
}

impl Publisher {
    /// Queues one message, waiting while the queue is full. Its ack arrives on the
    /// [`PublishAcks`] stream, at the position of this message.
    ///
    /// The message carries the context of a `create {channel}` span, a child of the span current
    /// when `send` is called, unless it has a `traceparent` header of its own (see
    /// [`Publish::trace_context`]).
    ///
    /// # Errors
    /// [`Error::Closed`] when the stream has ended (the broker or the connection closed it, or
    /// the [`PublishAcks`] were dropped); the acks stream says why.
    pub async fn send(&self, message: impl Into<PublishRequest>) -> Result<(), Error> {
        let mut request: PublishRequest = message.into();
        trace::create_span(&Span::current(), &request.channel, &mut request.headers);
        self.queue
            .send(request)
            .await
            .map_err(|_closed| Error::Closed)
    }

    /// Whether the stream has ended, so [`Publisher::send`] would fail.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

impl Client {
    /// Publishes one message and waits for its ack, which the broker sends once the message is
    /// durable.
    ///
    /// It runs under a `publish {channel}` span (kind `PRODUCER`, a child of the current span,
    /// see [`current_context`](crate::current_context)), whose trace context goes with it, in the
    /// request metadata and in the message's headers, unless the message has a `traceparent`
    /// header of its own (see [`Publish::trace_context`]; the span is then of kind `CLIENT` and
    /// links to it). See `docs/OBSERVABILITY.md` for the span's attributes.
    ///
    /// A retry of a message already stored (same channel and idempotency key, within the broker's
    /// dedup window) is acknowledged with `duplicate` set and the original offset and publish
    /// time; nothing new is stored.
    ///
    /// # Errors
    /// [`Error::Status`] with the broker's code and reason when the message is refused (for
    /// example `INVALID_ARGUMENT CHANNEL_INVALID`, `FAILED_PRECONDITION LOOP_DETECTED` for a
    /// publish loop, see [`Publish::caused_by`]) or the call fails (`UNAVAILABLE`);
    /// [`Error::publish_kind`] sorts them by what to do (fix, give up, retry).
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use switchboard_client::{Client, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let ack = client
    ///     .publish(
    ///         Publish::new("crm.contact.updated", r#"{"id":42}"#)
    ///             .idempotency_key("contact-42-v7")
    ///             .ttl(Duration::from_secs(60)),
    ///     )
    ///     .await?;
    /// println!("offset {} correlation {}", ack.offset, ack.correlation_id);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish(&self, message: impl Into<PublishRequest>) -> Result<PublishAck, Error> {
        self.publish_with(message, &self.retry_policy().clone())
            .await
    }

    /// [`Client::publish`] under another retry policy than the client's (see
    /// [`ConnectOptions::retry`](crate::ConnectOptions::retry)) for this one call.
    ///
    /// Under a policy that retries, a message without an idempotency key gets a random UUID as
    /// its key before the first attempt, and keeps it for every retry: a retry of a message that
    /// was in fact stored is answered `duplicate` with the original offset (within the broker's
    /// `loops.dedup_window`, 2 minutes by default). Ephemeral messages are never retried.
    ///
    /// # Errors
    /// As [`Client::publish`]: the last attempt's error once the policy gives up (the broker's
    /// own code and reason), at once for a failure that is not retried;
    /// [`Error::CircuitOpen`] when the client's circuit breaker is open.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use switchboard_client::{Client, Publish, RetryPolicy};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let policy = RetryPolicy::within(Duration::from_secs(10));
    /// let ack = client
    ///     .publish_with(Publish::new("crm.contact.updated", r#"{"id":42}"#), &policy)
    ///     .await?;
    /// println!("offset {} (a retry of a stored message: {})", ack.offset, ack.duplicate);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_with(
        &self,
        message: impl Into<PublishRequest>,
        policy: &RetryPolicy,
    ) -> Result<PublishAck, Error> {
        let mut message: PublishRequest = message.into();
        let trace::Outgoing { span, context } =
            trace::publish_span(&message.channel, &mut message.headers);
        let outcome = self
            .publish_attempts(message, policy, &context)
            .instrument(span.clone())
            .await;
        match &outcome {
            Ok(ack) => trace::published(&span, ack.offset),
            Err(error) => trace::failed(&span, error),
        }
        outcome
    }

    /// The attempts of [`Client::publish_with`], under its span.
    async fn publish_attempts(
        &self,
        mut message: PublishRequest,
        policy: &RetryPolicy,
        context: &opentelemetry::Context,
    ) -> Result<PublishAck, Error> {
        let retries = !policy.is_none() && !message.ephemeral;
        if retries && message.idempotency_key.is_empty() {
            message.idempotency_key = new_idempotency_key();
        }
        let started = Instant::now();
        let mut backoff = policy.backoff_schedule();
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            let request = if retries {
                message.clone()
            } else {
                std::mem::take(&mut message)
            };
            let error = match self.publish_once(request, context).await {
                Ok(ack) => return Ok(ack),
                Err(error) => error,
            };
            if !retries {
                return Err(error);
            }
            let Some(delay) = next_wait(policy, &mut backoff, attempts, started, &error) else {
                return Err(error);
            };
            tracing::debug!(
                channel = %message.channel,
                idempotency_key = %message.idempotency_key,
                %error,
                attempts,
                delay_ms = delay.as_millis() as u64,
                "publish failed, retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One `Publish` call, through the circuit breaker when the client has one.
    pub(crate) async fn publish_once(
        &self,
        message: PublishRequest,
        context: &opentelemetry::Context,
    ) -> Result<PublishAck, Error> {
        let permit = match self.breaker() {
            Some(breaker) => Some(breaker.admit(Instant::now())?),
            None => None,
        };
        let outcome = match self.failover() {
            Some(failover) => {
                let mut message = message;
                // Sent to another node after a failure whose outcome is unknown: the key makes
                // it count once.
                if !message.ephemeral && message.idempotency_key.is_empty() {
                    message.idempotency_key = new_idempotency_key();
                }
                failover.publish(message, context).await
            }
            None => {
                let mut request = tonic::Request::new(message);
                trace::inject_metadata(context, request.metadata_mut());
                self.grpc()
                    .publish(request)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(Error::from)
            }
        };
        if let Some(permit) = permit {
            permit.record(&outcome, Instant::now());
        }
        outcome
    }

    /// Publishes every message of `messages` on one stream, for high-rate producers, and returns
    /// the stream of acks: exactly one per message, in message order.
    ///
    /// The messages are sent as the broker takes them, while the acks are read, so `messages`
    /// must not wait on the acks. When the messages are produced as you go, [`Client::publisher`]
    /// is the simpler handle.
    ///
    /// The trace context current when this is called goes in the request metadata; every message
    /// that has no `traceparent` of its own carries the context of a `create {channel}` span, a
    /// child of that context. Give a message its own with [`Publish::trace_context`].
    ///
    /// # Errors
    /// [`Error::Status`] when the broker rejects the call as a whole; an `Err` item on the
    /// returned stream when it fails later. A refused message is not an error of the stream: its
    /// ack carries the refusal (see [`split_stream_ack`]).
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{split_stream_ack, Client, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let messages = futures::stream::iter(
    ///     (0..100).map(|i| Publish::new("telemetry.widget.click", format!(r#"{{"n":{i}}}"#))),
    /// );
    /// let mut acks = client.publish_stream(messages).await?;
    /// while let Some(ack) = acks.next().await {
    ///     match split_stream_ack(ack?) {
    ///         (sequence, Ok(ack)) => println!("#{sequence} at offset {}", ack.offset),
    ///         (sequence, Err(refused)) => eprintln!("#{sequence} refused: {refused}"),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_stream<S>(&self, messages: S) -> Result<PublishAcks, Error>
    where
        S: Stream + Send + 'static,
        S::Item: Into<PublishRequest>,
    {
        let context = trace::current_context();
        let opened_in = Span::current();
        let mut request = tonic::Request::new(messages.map(move |message| {
            let mut message: PublishRequest = message.into();
            trace::create_span(&opened_in, &message.channel, &mut message.headers);
            message
        }));
        trace::inject_metadata(&context, request.metadata_mut());
        let response = self.grpc().publish_stream(request).await?;
        Ok(PublishAcks {
            state: AcksState::Streaming(Box::new(response.into_inner())),
        })
    }

    /// Opens a publish stream fed through a bounded queue of `capacity` messages (at least 1):
    /// send with the [`Publisher`] (clone it for several producers) and read the acks, one per
    /// message in send order, from the [`PublishAcks`]. Drop every `Publisher` to end the stream.
    ///
    /// The call starts at once in a task of its own, so messages flow even before the acks are
    /// polled; read the acks all the same, or the broker stops taking messages once its answers
    /// fill the connection's flow-control window. Dropping the acks cancels the stream.
    ///
    /// The request metadata carries the trace context current when this is called; each message
    /// carries the one current when it is sent (see [`Publisher::send`]).
    ///
    /// Under a client retry policy that retries ([`ConnectOptions::retry`](crate::ConnectOptions::retry)),
    /// the stream resumes: each message gets an idempotency key (its own, or a UUID), and when
    /// the stream breaks (or a message is refused for a retryable reason) a new one is opened
    /// and the messages not yet answered are sent again, first and in order, with the same keys;
    /// one answer per message still comes, in send order, its `sequence` the message's position
    /// in this publisher. The acks stream ends with an error only when the policy gives up. See
    /// `docs/CLIENT-RESILIENCE.md` for the guarantees.
    ///
    /// # Panics
    /// When called outside a Tokio runtime (it spawns a task).
    ///
    /// # Example
    /// ```no_run
    /// use futures::StreamExt;
    /// use switchboard_client::{Client, Publish};
    ///
    /// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
    /// let (publisher, mut acks) = client.publisher(256);
    /// let reader = tokio::spawn(async move {
    ///     let mut count = 0;
    ///     while let Some(ack) = acks.next().await {
    ///         ack?;
    ///         count += 1;
    ///     }
    ///     Ok::<_, switchboard_client::Error>(count)
    /// });
    /// for i in 0..1000 {
    ///     publisher.send(Publish::new("telemetry.widget.click", format!("{i}"))).await?;
    /// }
    /// drop(publisher);
    /// # let _ = reader.await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn publisher(&self, capacity: usize) -> (Publisher, PublishAcks) {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        if !self.retry_policy().is_none() {
            let (answers, answers_receiver) = mpsc::channel(capacity.max(1));
            let task = tokio::spawn(crate::publish_resume::run(
                self.clone(),
                self.retry_policy().clone(),
                trace::current_context(),
                capacity.max(1),
                receiver,
                answers,
            ));
            return (
                Publisher { queue },
                PublishAcks {
                    state: AcksState::Resuming {
                        answers: answers_receiver,
                        task,
                    },
                },
            );
        }
        let mut grpc = self.grpc();
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        trace::inject_metadata(&trace::current_context(), request.metadata_mut());
        let call = tokio::spawn(async move { grpc.publish_stream(request).await });
        (
            Publisher { queue },
            PublishAcks {
                state: AcksState::Starting(call),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::v1::Refusal;

    #[test]
    fn builder_fills_the_request() {
        let request = PublishRequest::from(
            Publish::new("a.b", "{}")
                .content_type("application/json")
                .schema_version("1.2.0")
                .correlation_id("c")
                .causation_id("d")
                .idempotency_key("e")
                .ttl(Duration::from_secs(30))
                .header("k", "v1")
                .header("k", "v2")
                .headers([("x", "y")]),
        );
        assert_eq!(request.channel, "a.b");
        assert_eq!(request.payload, Bytes::from_static(b"{}"));
        assert_eq!(request.content_type, "application/json");
        assert_eq!(request.schema_version, "1.2.0");
        assert_eq!(request.correlation_id, "c");
        assert_eq!(request.causation_id, "d");
        assert_eq!(request.idempotency_key, "e");
        assert_eq!(request.ttl_ms, 30_000);
        assert_eq!(request.headers.len(), 2);
        assert_eq!(request.headers["k"], "v2");
    }

    #[test]
    fn caused_by_carries_correlation_causation_and_hops() {
        let cause = Message {
            offset: 1234,
            channel: "a.b".to_owned(),
            correlation_id: "3f2b9a1e-0000-4000-8000-000000000000".to_owned(),
            causation_id: "1000".to_owned(),
            hops: 4,
            ..Message::default()
        };
        let request = PublishRequest::from(Publish::new("a.c", "{}").caused_by(&cause));
        assert_eq!(request.correlation_id, cause.correlation_id);
        assert_eq!(request.causation_id, "1234");
        assert_eq!(request.hops, 5);
        assert_eq!(request.channel, "a.c");

        // A first message nobody caused.
        let first = Message {
            offset: 1,
            ..Message::default()
        };
        let request = PublishRequest::from(
            Publish::new("a.c", "{}")
                .correlation_id("mine")
                .caused_by(&first),
        );
        assert_eq!(
            (
                request.correlation_id.as_str(),
                request.causation_id.as_str()
            ),
            ("mine", "1")
        );
        assert_eq!(request.hops, 1);

        // Later setters override, and the count saturates.
        let deep = Message {
            offset: 9,
            hops: u32::MAX,
            ..Message::default()
        };
        let message = Publish::new("a.c", "{}")
            .caused_by(&deep)
            .causation_id("other");
        assert_eq!(message.hop_count(), u32::MAX);
        let request = PublishRequest::from(message.hops(2));
        assert_eq!((request.causation_id.as_str(), request.hops), ("other", 2));
    }

    #[test]
    fn hops_default_to_zero() {
        let message = Publish::new("a.b", "{}");
        assert_eq!(message.hop_count(), 0);
        assert_eq!(PublishRequest::from(message.hops(3)).hops, 3);
    }

    #[test]
    fn ttl_rounds_up_to_whole_milliseconds() {
        assert_eq!(ttl_millis(Duration::ZERO), 0);
        assert_eq!(ttl_millis(Duration::from_micros(1)), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_millis(500)), 500);
        assert_eq!(ttl_millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn stream_acks_split_into_outcomes() {
        let ack = PublishStreamAck {
            sequence: 3,
            result: Some(publish_stream_ack::Result::Ack(PublishAck {
                offset: 9,
                ..PublishAck::default()
            })),
        };
        let (sequence, outcome) = split_stream_ack(ack);
        assert_eq!(sequence, 3);
        assert_eq!(outcome.unwrap().offset, 9);

        let refused = PublishStreamAck {
            sequence: 4,
            result: Some(publish_stream_ack::Result::Refusal(Refusal {
                code: 3,
                reason: "CHANNEL_INVALID".to_owned(),
                message: "bad".to_owned(),
                metadata: Default::default(),
            })),
        };
        let (sequence, outcome) = split_stream_ack(refused);
        assert_eq!(sequence, 4);
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "INVALID_ARGUMENT CHANNEL_INVALID: bad"
        );
    }

    #[test]
    fn publish_errors_sort_by_what_the_caller_should_do() {
        let status = |code: tonic::Code| Error::from(tonic::Status::new(code, "x"));
        let refusal = |code: i32| {
            Error::Refused(Refusal {
                code,
                reason: "R".to_owned(),
                message: String::new(),
                metadata: Default::default(),
            })
        };
        let cases = [
            (
                status(tonic::Code::InvalidArgument),
                PublishErrorKind::Invalid,
            ),
            (status(tonic::Code::OutOfRange), PublishErrorKind::Invalid),
            (
                Error::InvalidArgument("x".to_owned()),
                PublishErrorKind::Invalid,
            ),
            (
                status(tonic::Code::Unauthenticated),
                PublishErrorKind::Denied,
            ),
            (
                status(tonic::Code::PermissionDenied),
                PublishErrorKind::Denied,
            ),
            (
                status(tonic::Code::FailedPrecondition),
                PublishErrorKind::Refused,
            ),
            (refusal(9), PublishErrorKind::Refused),
            (refusal(3), PublishErrorKind::Invalid),
            (refusal(8), PublishErrorKind::Unavailable),
            (
                status(tonic::Code::Unavailable),
                PublishErrorKind::Unavailable,
            ),
            (
                status(tonic::Code::ResourceExhausted),
                PublishErrorKind::Unavailable,
            ),
            (
                Error::Connect {
                    url: "http://b:1".to_owned(),
                    message: "refused".to_owned(),
                },
                PublishErrorKind::Unavailable,
            ),
            (Error::Closed, PublishErrorKind::Closed),
            (status(tonic::Code::DataLoss), PublishErrorKind::Other),
            (status(tonic::Code::Unimplemented), PublishErrorKind::Other),
        ];
        for (error, kind) in cases {
            assert_eq!(error.publish_kind(), kind, "{error}");
        }
    }
}
