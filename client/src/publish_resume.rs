//! The task behind a [`Publisher`](crate::Publisher) whose client retries
//! ([`ConnectOptions::retry`](crate::ConnectOptions::retry)): it runs `PublishStream` calls one
//! after the other, and when one breaks it opens another and sends again, first and in order,
//! every message the broken one had not answered, with the same idempotency keys.
//!
//! Why this cannot duplicate: each message gets its key when the task takes it (the caller's, or
//! a new UUID), and keeps it on every stream; a message the broken stream had in fact stored is
//! answered `duplicate` with its original offset on the new one (within the broker's
//! `loops.dedup_window`). The caller still sees exactly one answer per message, in send order,
//! numbered by its position in the publisher (not in the stream that carried it).
//!
//! Retried: a broken stream (the connection lost, the broker stopping or ending it early), and a
//! message refused for a retryable reason (`NO_LEADER`, ...), which is handled as a break: the
//! stream is dropped and that message and the ones behind it are sent again. Every other refusal
//! is passed on as the message's answer. When the policy gives up (its deadline counts from the
//! first failure since the last answer), the acks stream ends with the last error.
//!
//! Ephemeral messages are at most once: one the broken stream had not answered is not sent
//! again; its answer is a refusal (`UNAVAILABLE`, no reason) saying so.
//!
//! Memory is bounded: at most `capacity` messages are in flight (sent, not answered), besides the
//! `capacity` waiting in the publisher's queue.
//!
//! With the client's circuit breaker, each stream is one call through it: it is opened only when
//! there is a message to send and the circuit lets it through, its first answer counts as the
//! breaker's success (a probe's answer closes the circuit at once, not when the stream ends), and
//! a stream that breaks before any answer with an endpoint failure counts as a failure. While the
//! circuit is open the task waits its cooldown out (at least the backoff's delay), within the
//! policy's deadline, rather than ending the stream: the messages stay queued, in order.

use std::collections::VecDeque;
use std::time::Instant;

use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::{publish_stream_ack, PublishRequest, PublishStreamAck, Refusal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use crate::bearer::AuthChannel;
use crate::circuit::Permit;
use crate::client::Client;
use crate::error::Error;
use crate::retry::{is_endpoint_failure, new_idempotency_key, next_wait, retry_after, RetryPolicy};
use crate::trace;

/// A message the task has taken from the publisher's queue: its position in the publisher, and
/// the request (with its key).
type Numbered = (u64, PublishRequest);

/// The answers' side of the task.
type Answers = mpsc::Sender<Result<PublishStreamAck, Error>>;

/// Runs publish streams until the publisher's queue is closed and every message is answered, or
/// the policy gives up, or the acks are dropped.
pub(crate) async fn run(
    client: Client,
    policy: RetryPolicy,
    context: opentelemetry::Context,
    capacity: usize,
    mut input: mpsc::Receiver<PublishRequest>,
    answers: Answers,
) {
    let mut grpc = client.grpc();
    let breaker = client.breaker();
    let failover = client.failover();
    let mut next_position: u64 = 0;
    let mut input_done = false;
    // Taken from the queue, not yet sent on the current stream (after a break: the unanswered
    // ones first, in order).
    let mut to_send: VecDeque<Numbered> = VecDeque::new();
    let mut backoff = policy.backoff_schedule();
    // The first failure since the last answer, and the attempts since then.
    let mut failing_since: Option<(Instant, u32)> = None;
    loop {
        let mut permit = None;
        if let Some(breaker) = &breaker {
            // A stream is opened for something to send, so an idle publisher is never the probe
            // that holds a half-open circuit.
            if to_send.is_empty() && !input_done {
                tokio::select! {
                    _ = answers.closed() => return,
                    received = input.recv() => match received {
                        Some(request) => {
                            to_send.push_back((next_position, with_key(request)));
                            next_position += 1;
                        }
                        None => input_done = true,
                    },
                }
            }
            if to_send.is_empty() && input_done {
                return;
            }
            match breaker.admit(Instant::now()) {
                Ok(admitted) => permit = Some(admitted),
                Err(open) => {
                    let least = match &open {
                        Error::CircuitOpen { retry_in, .. } => *retry_in,
                        _ => std::time::Duration::ZERO,
                    };
                    let (since, _) = failing_since.get_or_insert((Instant::now(), 0));
                    let delay = backoff.next_delay().max(least);
                    if since.elapsed() + delay > policy.deadline {
                        let _ = answers.send(Err(open)).await;
                        return;
                    }
                    tokio::select! {
                        _ = answers.closed() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
        }
        // With failover, each stream goes to the current node, which a break moves on.
        let node = failover.as_ref().map(|failover| {
            let (index, node_grpc) = failover.stream_node();
            grpc = node_grpc;
            index
        });
        let failure = {
            let mut stream = Stream {
                grpc: &mut grpc,
                context: &context,
                capacity,
                input: &mut input,
                input_done: &mut input_done,
                next_position: &mut next_position,
                to_send: &mut to_send,
                in_flight: VecDeque::new(),
                answers: &answers,
                progressed: false,
                permit: permit.take(),
            };
            let outcome = stream.run().await;
            let progressed = stream.progressed;
            let mut unanswered = std::mem::take(&mut stream.in_flight);
            if let (Some(permit), Ended::Failed(error)) = (stream.permit.take(), &outcome) {
                permit.record::<()>(&Err(error.clone()), Instant::now());
            }
            drop(stream);
            if progressed {
                failing_since = None;
                backoff.reset();
            }
            // What the broken stream had not answered goes first on the next.
            while let Some(message) = unanswered.pop_back() {
                to_send.push_front(message);
            }
            match outcome {
                Ended::Done | Ended::AcksDropped => return,
                Ended::Failed(error) => {
                    if let (Some(failover), Some(index)) = (&failover, node) {
                        if is_endpoint_failure(&error) {
                            failover.stream_failed(index, &error);
                        }
                    }
                    error
                }
            }
        };
        let (since, attempts) = failing_since.get_or_insert((Instant::now(), 0));
        *attempts = attempts.saturating_add(1);
        let Some(delay) = next_wait(&policy, &mut backoff, *attempts, *since, &failure) else {
            let _ = answers.send(Err(failure)).await;
            return;
        };
        tracing::warn!(
            error = %failure,
            unanswered = to_send.len(),
            delay_ms = delay.as_millis() as u64,
            "publish stream broken, sending the unanswered messages again on a new one"
        );
        drop_ephemeral(&mut to_send, &answers).await;
        tokio::select! {
            _ = answers.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Answers the ephemeral messages among `to_send` with a refusal and removes them: they are at
/// most once, so a message whose fate is unknown is not sent again.
async fn drop_ephemeral(to_send: &mut VecDeque<Numbered>, answers: &Answers) {
    let mut kept = VecDeque::with_capacity(to_send.len());
    for (position, request) in to_send.drain(..) {
        if !request.ephemeral {
            kept.push_back((position, request));
            continue;
        }
        let refusal = Refusal {
            code: tonic::Code::Unavailable as i32,
            reason: String::new(),
            message: "an ephemeral message is not sent again after its stream broke \
                      (at most once): it may or may not have been delivered"
                .to_owned(),
            metadata: Default::default(),
        };
        let _ = answers
            .send(Ok(PublishStreamAck {
                sequence: position,
                result: Some(publish_stream_ack::Result::Refusal(refusal)),
            }))
            .await;
    }
    *to_send = kept;
}

enum Ended {
    /// The queue is closed and everything was answered.
    Done,
    /// Nobody reads the answers any more.
    AcksDropped,
    /// The stream broke (or a message was refused for a retryable reason).
    Failed(Error),
}

/// One `PublishStream` call.
struct Stream<'a> {
    grpc: &'a mut BrokerClient<AuthChannel>,
    context: &'a opentelemetry::Context,
    capacity: usize,
    input: &'a mut mpsc::Receiver<PublishRequest>,
    input_done: &'a mut bool,
    next_position: &'a mut u64,
    to_send: &'a mut VecDeque<Numbered>,
    /// Sent on this stream, not answered yet, in order.
    in_flight: VecDeque<Numbered>,
    answers: &'a Answers,
    /// Whether this stream answered at least one message.
    progressed: bool,
    /// The circuit breaker's leave for this stream, recorded at its first answer.
    permit: Option<Permit>,
}

impl Stream<'_> {
    async fn run(&mut self) -> Ended {
        let (sender, receiver) = mpsc::channel::<PublishRequest>(self.capacity);
        let mut sender = Some(sender);
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        trace::inject_metadata(self.context, request.metadata_mut());
        let mut grpc = self.grpc.clone();
        // The call runs beside the feeding below: tonic sends the messages while it waits for
        // the response headers, which the broker may hold back until the first message.
        let mut call = Box::pin(async move { grpc.publish_stream(request).await });
        let mut acks: Option<Streaming<PublishStreamAck>> = None;
        let mut answered_on_stream: u64 = 0;
        loop {
            if sender.is_some()
                && *self.input_done
                && self.to_send.is_empty()
                && self.in_flight.is_empty()
            {
                // Everything answered and nothing more to come: end the request stream, so the
                // broker ends the answers.
                sender = None;
            }
            let room = self.in_flight.len() < self.capacity;
            let can_send = room && !self.to_send.is_empty();
            let can_take = room && self.to_send.is_empty() && !*self.input_done;
            tokio::select! {
                _ = self.answers.closed() => return Ended::AcksDropped,
                opened = &mut call, if acks.is_none() => match opened {
                    Ok(response) => acks = Some(response.into_inner()),
                    Err(status) => return Ended::Failed(status.into()),
                },
                permit = reserve(&sender), if can_send => {
                    let Some(permit) = permit else {
                        return Ended::Failed(closed_early());
                    };
                    if let Some((position, request)) = self.to_send.pop_front() {
                        permit.send(request.clone());
                        self.in_flight.push_back((position, request));
                    }
                }
                received = self.input.recv(), if can_take => match received {
                    Some(request) => {
                        let position = *self.next_position;
                        *self.next_position += 1;
                        self.to_send.push_back((position, with_key(request)));
                    }
                    None => *self.input_done = true,
                },
                answer = next_ack(&mut acks) => match answer {
                    Ok(Some(ack)) => {
                        if ack.sequence != answered_on_stream {
                            return Ended::Failed(out_of_order(ack.sequence, answered_on_stream));
                        }
                        let Some((position, _)) = self.in_flight.front() else {
                            return Ended::Failed(out_of_order(ack.sequence, answered_on_stream));
                        };
                        let position = *position;
                        if let Some(publish_stream_ack::Result::Refusal(refusal)) = &ack.result {
                            let refused = Error::Refused(refusal.clone());
                            if retry_after(&refused).is_some() {
                                // Handled as a break, so that this message is sent again before
                                // the ones behind it.
                                return Ended::Failed(refused);
                            }
                        }
                        answered_on_stream += 1;
                        self.in_flight.pop_front();
                        self.progressed = true;
                        if let Some(permit) = self.permit.take() {
                            permit.record::<()>(&Ok(()), Instant::now());
                        }
                        let answer = PublishStreamAck { sequence: position, ..ack };
                        if self.answers.send(Ok(answer)).await.is_err() {
                            return Ended::AcksDropped;
                        }
                    }
                    Ok(None) if sender.is_none() && self.in_flight.is_empty() => return Ended::Done,
                    Ok(None) => return Ended::Failed(closed_early()),
                    Err(status) => return Ended::Failed(status.into()),
                },
            }
        }
    }
}

/// Room for one message on the request stream; `None` once it is closed (the call ended).
async fn reserve(
    sender: &Option<mpsc::Sender<PublishRequest>>,
) -> Option<mpsc::Permit<'_, PublishRequest>> {
    match sender {
        Some(sender) => sender.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

/// The next answer, once the call is open (pending until then).
async fn next_ack(
    acks: &mut Option<Streaming<PublishStreamAck>>,
) -> Result<Option<PublishStreamAck>, tonic::Status> {
    match acks {
        Some(acks) => acks.message().await,
        None => std::future::pending().await,
    }
}

/// The request with an idempotency key: its own, or a new UUID (not for an ephemeral message,
/// which the broker does not deduplicate).
fn with_key(mut request: PublishRequest) -> PublishRequest {
    if request.idempotency_key.is_empty() && !request.ephemeral {
        request.idempotency_key = new_idempotency_key();
    }
    request
}

/// The broker ended the stream with messages unanswered: a break like any other (for example a
/// broker that is shutting down).
fn closed_early() -> Error {
    Error::Status {
        code: tonic::Code::Unavailable,
        reason: None,
        message: "the broker ended the publish stream before answering every message".to_owned(),
        metadata: Default::default(),
    }
}

/// An answer that is not for the next message: a fault of the stream, which is dropped and its
/// unanswered messages sent again on a new one.
fn out_of_order(got: u64, expected: u64) -> Error {
    Error::Status {
        code: tonic::Code::Internal,
        reason: None,
        message: format!("the broker answered position {got} of the stream, expected {expected}"),
        metadata: Default::default(),
    }
}
