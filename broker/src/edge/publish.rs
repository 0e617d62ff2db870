//! `Publish` and `PublishStream`, and the gateway's publishes: each message is admitted (the call
//! budgets), validated, checked against the caller's grant, and queued to the proposer; a stream's
//! messages that have already arrived are grouped into one proposal. Every refusal is counted and
//! audited here (or by the [`Caller`]'s grant check), whichever way the publish came.

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{Future, FutureExt, StreamExt};
use switchboard_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{convert, status, Edge};
use crate::error::BrokerError;
use crate::message::{Item, ItemOutcome};
use crate::observability::metrics::{self, PublishResult};
use crate::observability::trace;
use crate::security::caller::Caller;
use crate::write::proposer;

/// Acks buffered per `PublishStream` before the stream's task waits for the client.
pub(super) const PUBLISH_STREAM_BUFFER: usize = 256;

/// The ack for a publish's outcome, or the error it was refused with.
fn ack(outcome: ItemOutcome, correlation_id: String) -> Result<pb::PublishAck, BrokerError> {
    let (offset, publish_time_us, duplicate, correlation_id) = match outcome {
        ItemOutcome::Stored {
            offset,
            publish_time_us,
        } => (offset, publish_time_us, false, correlation_id),
        // A retry is answered as the original was, correlation id included.
        ItemOutcome::Duplicate {
            offset,
            publish_time_us,
            correlation_id,
        } => (offset, publish_time_us, true, correlation_id),
        ItemOutcome::Refused(refusal) => return Err(refusal.into()),
        ItemOutcome::Entity(_)
        | ItemOutcome::Consumer(_)
        | ItemOutcome::Schema { .. }
        | ItemOutcome::View { .. } => {
            return Err(BrokerError::Consensus(
                "a publish was applied as another kind of write".into(),
            ))
        }
    };
    Ok(pb::PublishAck {
        offset,
        publish_time: Some(convert::timestamp(publish_time_us)),
        correlation_id,
        duplicate,
    })
}

/// The acks of one group of a stream's messages, in order.
type BoxedAcks = Pin<Box<dyn Future<Output = Vec<pb::PublishStreamAck>> + Send>>;

/// Most messages a `PublishStream` gathers into one proposal from what has already arrived.
const STREAM_GROUP_MESSAGES: usize = 256;

/// Stop gathering a stream's group once its payloads reach this many bytes (a group always takes
/// at least one message), so one group stays a modest part of a log entry.
const STREAM_GROUP_BYTES: usize = 256 * 1024;

/// One publish of a group: admitted, with its trace parent, or already refused.
pub(crate) type PublishAttempt = Result<(pb::PublishRequest, Option<trace::Parent>), BrokerError>;

/// What a publish keeps while it is being committed: what its ack needs, what its refusal is
/// accounted under, and its trace spans (ended with the answer).
struct InFlight {
    correlation_id: String,
    channel: String,
    caller: Caller,
    publish: tracing::Span,
    commit: tracing::Span,
}

impl InFlight {
    fn answer(
        self,
        outcome: Result<ItemOutcome, BrokerError>,
    ) -> Result<pb::PublishAck, BrokerError> {
        let InFlight {
            correlation_id,
            channel,
            caller,
            publish,
            commit,
        } = self;
        let acked = outcome.and_then(|outcome| ack(outcome, correlation_id));
        drop(commit);
        match &acked {
            Ok(ack) => trace::published(&publish, ack.offset),
            Err(e) => trace::refused(&publish, e.reason().as_str()),
        }
        drop(publish);
        match acked {
            Ok(ack) => {
                let result = if ack.duplicate {
                    PublishResult::Duplicate
                } else {
                    PublishResult::Accepted
                };
                metrics::publish(result, None);
                Ok(ack)
            }
            Err(e) => Err(refused(&caller, &channel, e)),
        }
    }
}

/// Accounts for a refused publish (metrics and the audit log) and hands the error back.
fn refused(caller: &Caller, channel: &str, e: BrokerError) -> BrokerError {
    metrics::publish(PublishResult::Refused, Some(e.reason()));
    caller.audit_refused(channel, &e);
    e
}

/// Where each publish of a group stands once it was read.
enum Slot {
    Refused(BrokerError),
    Proposed(InFlight),
    /// An ephemeral message, already handed on: its ack.
    Sent(pb::PublishAck),
}

fn stream_ack(sequence: u64, result: Result<pb::PublishAck, BrokerError>) -> pb::PublishStreamAck {
    let result = match result {
        Ok(ack) => pb::publish_stream_ack::Result::Ack(ack),
        Err(e) => pb::publish_stream_ack::Result::Refusal(status::refusal(&e)),
    };
    pb::PublishStreamAck {
        sequence,
        result: Some(result),
    }
}

impl Edge {
    /// Validates a publish and checks the caller may publish there; on success the message to
    /// propose and what its answer needs. A refusal is accounted here.
    fn prepare_publish(
        &self,
        request: pb::PublishRequest,
        caller: &Caller,
        parent: Option<trace::Parent>,
    ) -> Result<(crate::message::NewMessage, InFlight), BrokerError> {
        let channel = request.channel.clone();
        let mut message = match self.validator.publish(request) {
            Ok(message) => message,
            Err(e) => return Err(refused(caller, &channel, e)),
        };
        // The caller's check counts the denial as an access refusal and audits it, as for every
        // grant; it is still a refused publish.
        if let Err(e) = caller.check_publish(&message.channel) {
            metrics::publish(PublishResult::Refused, Some(e.reason()));
            return Err(e);
        }
        // The schema check comes after the grant, so a caller learns nothing of the schemas of
        // channels it may not publish to; drift is counted and announced either way.
        if let Err(e) = self.drift.account(self.schemas.check(&message)) {
            return Err(refused(caller, &channel, e));
        }
        let publish =
            trace::publish_span(parent.as_ref(), &message.channel, &message.correlation_id);
        trace::stamp_message(&publish, &mut message.headers);
        let commit = trace::commit_span(&publish, &message.channel);
        let flight = InFlight {
            correlation_id: message.correlation_id.clone(),
            channel,
            caller: caller.clone(),
            publish,
            commit,
        };
        Ok((message, flight))
    }

    /// Queues a group of publishes as one proposal (in order, after anything queued before);
    /// the returned future yields one answer per attempt, in order. Refused attempts keep their
    /// place. `Publish`, `PublishStream` and the gateway all come through here, so the metrics and
    /// the audit log of refusals are recorded in one place; queueing happens before this returns,
    /// which keeps a stream's messages in order. One proposal rather than one per message: a
    /// stream's messages then cost the proposer, the queue and the wake-ups once per group.
    async fn begin_publishes(&self, attempts: Vec<PublishAttempt>, caller: &Caller) -> PendingAcks {
        let mut items = Vec::with_capacity(attempts.len());
        let mut slots = Vec::with_capacity(attempts.len());
        for attempt in attempts {
            let ephemeral = attempt.as_ref().is_ok_and(|(request, _)| request.ephemeral);
            let prepared =
                attempt.and_then(|(request, parent)| self.prepare_publish(request, caller, parent));
            slots.push(match prepared {
                Ok((message, flight)) if ephemeral => match self.send_ephemeral(message, flight) {
                    Ok(ack) => Slot::Sent(ack),
                    Err(e) => Slot::Refused(e),
                },
                Ok((message, flight)) => {
                    items.push(Item::Publish(message));
                    Slot::Proposed(flight)
                }
                Err(e) => Slot::Refused(e),
            });
        }
        let submitted = if items.is_empty() {
            None
        } else {
            Some(self.proposer.submit(items).await)
        };
        async move {
            let mut outcomes = match submitted {
                None => Ok(Vec::new().into_iter()),
                Some(Ok(pending)) => proposer::outcome(pending).await.map(Vec::into_iter),
                Some(Err(e)) => Err(e),
            };
            slots
                .into_iter()
                .map(|slot| match slot {
                    Slot::Refused(e) => Err(e),
                    Slot::Sent(ack) => Ok(ack),
                    Slot::Proposed(flight) => {
                        let outcome = match &mut outcomes {
                            Ok(outcomes) => outcomes.next().ok_or_else(|| {
                                BrokerError::Consensus(
                                    "apply answered a proposal with fewer outcomes than items"
                                        .into(),
                                )
                            }),
                            Err(e) => Err(e.clone()),
                        };
                        flight.answer(outcome)
                    }
                })
                .collect()
        }
        .boxed()
    }

    /// Hands an admitted ephemeral message to the subscribers of every node, now; its ack has
    /// offset 0 (it is never stored) and this node's time. The hop limit is checked here, as
    /// apply checks it for a stored message: ephemeral reactions can loop too. (Its causal chain
    /// is not followed: an ephemeral message is no stored cause.)
    fn send_ephemeral(
        &self,
        mut message: crate::message::NewMessage,
        flight: InFlight,
    ) -> Result<pb::PublishAck, BrokerError> {
        let max_hops = self.config.loops.max_hops;
        if message.hops > max_hops {
            let e = BrokerError::LoopDetected {
                detail: format!("{} hops exceed the limit of {max_hops}", message.hops),
            };
            return Err(refused(&flight.caller, &flight.channel, e));
        }
        // Never stored, so nothing to deduplicate or expire.
        message.idempotency_key.clear();
        message.ttl_ms = 0;
        let publish_time_us = crate::message::now_us();
        let correlation_id = flight.correlation_id.clone();
        self.ephemeral.publish(crate::message::StoredMessage {
            offset: 0,
            publish_time_us,
            message,
            chain: Vec::new(),
        });
        metrics::publish(PublishResult::Accepted, None);
        drop(flight);
        Ok(pb::PublishAck {
            offset: 0,
            publish_time: Some(convert::timestamp(publish_time_us)),
            correlation_id,
            duplicate: false,
        })
    }

    /// [`Edge::begin_publishes`] for one publish.
    pub(super) async fn begin_publish(
        &self,
        request: pb::PublishRequest,
        caller: &Caller,
        parent: Option<trace::Parent>,
    ) -> PendingAck {
        self.begin_publishes(vec![Ok((request, parent))], caller)
            .await
            .map(|answers| {
                answers.into_iter().next().unwrap_or_else(|| {
                    Err(BrokerError::Consensus("a publish got no answer".into()))
                })
            })
            .boxed()
    }
}

/// A publish queued for commit; resolves to its ack or refusal.
pub(crate) type PendingAck =
    Pin<Box<dyn Future<Output = Result<pb::PublishAck, BrokerError>> + Send>>;

/// A group of publishes queued for commit; resolves to their answers, in order.
pub(crate) type PendingAcks =
    Pin<Box<dyn Future<Output = Vec<Result<pb::PublishAck, BrokerError>>> + Send>>;

/// Spends one unit of `caller`'s budgets for one message of a stream or a gateway batch: the
/// message with its trace parent (its own `traceparent` header wins over the stream's), or the
/// refusal.
pub(super) fn admit_publish(
    edge: &Edge,
    caller: &Caller,
    request: pb::PublishRequest,
    stream_parent: &Option<trace::Parent>,
) -> PublishAttempt {
    // Opening a stream spent one unit of the budgets; each message spends one more, so a stream
    // is no way around the rate limits.
    if let Err(e) = edge.gate.admit(caller) {
        metrics::access_refused(e.reason());
        return Err(e);
    }
    let parent = trace::parent_from_headers(&request.headers).or_else(|| stream_parent.clone());
    Ok((request, parent))
}

/// Feeds one `PublishStream`: reads requests while fewer than `max_unacked` wait for their ack, and
/// sends acks in request order as they complete. Requests that have already arrived when one is
/// read join it in one proposal (up to [`STREAM_GROUP_MESSAGES`] and [`STREAM_GROUP_BYTES`]).
pub(super) async fn publish_stream_task(
    edge: Arc<Edge>,
    mut inbound: Streaming<pb::PublishRequest>,
    out: mpsc::Sender<Result<pb::PublishStreamAck, Status>>,
    caller: Caller,
    parent: Option<trace::Parent>,
) {
    let max_unacked = edge.config.publish_stream.max_unacked;
    let mut shutdown = edge.shutdown.clone();
    let mut pending: FuturesOrdered<BoxedAcks> = FuturesOrdered::new();
    let mut unacked = 0usize;
    let mut sequence = 0u64;
    let mut inbound_open = true;
    let mut shutting_down = false;
    // Why reading stopped early (a request that does not decode), told once the acks owed for
    // the requests before it are sent.
    let mut broken: Option<Status> = None;
    loop {
        if !inbound_open && pending.is_empty() {
            if shutting_down {
                let _ = out.send(Err(Status::from(BrokerError::ShuttingDown))).await;
            } else if let Some(status) = broken {
                let _ = out.send(Err(status)).await;
            }
            return;
        }
        tokio::select! {
            biased;
            Some(acks) = pending.next(), if !pending.is_empty() => {
                unacked -= acks.len();
                for ack in acks {
                    if out.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
            item = inbound.message(), if inbound_open && unacked < max_unacked => match item {
                Ok(Some(request)) => {
                    let room = (max_unacked - unacked).min(STREAM_GROUP_MESSAGES);
                    let mut bytes = request.payload.len();
                    let mut group = vec![admit_publish(&edge, &caller, request, &parent)];
                    while group.len() < room && bytes < STREAM_GROUP_BYTES {
                        // Only what is already here: `message` keeps its state in the stream,
                        // so dropping it unfinished loses nothing.
                        match inbound.message().now_or_never() {
                            Some(Ok(Some(request))) => {
                                bytes += request.payload.len();
                                group.push(admit_publish(&edge, &caller, request, &parent));
                            }
                            Some(Ok(None)) => {
                                inbound_open = false;
                                break;
                            }
                            Some(Err(status)) => {
                                tracing::debug!(%status, "publish stream broken by the client");
                                inbound_open = false;
                                broken = Some(status);
                                break;
                            }
                            None => break,
                        }
                    }
                    let first = sequence;
                    sequence += group.len() as u64;
                    unacked += group.len();
                    let answers = edge.begin_publishes(group, &caller).await;
                    pending.push_back(
                        answers
                            .map(move |answers| {
                                (first..)
                                    .zip(answers)
                                    .map(|(sequence, answer)| stream_ack(sequence, answer))
                                    .collect()
                            })
                            .boxed(),
                    );
                }
                Ok(None) => inbound_open = false,
                Err(status) => {
                    tracing::debug!(%status, "publish stream broken by the client");
                    inbound_open = false;
                    broken = Some(status);
                }
            },
            _ = shutdown.wait(), if inbound_open => {
                // Stop reading; acks already owed are still sent, then the stream ends.
                inbound_open = false;
                shutting_down = true;
            }
        }
    }
}
