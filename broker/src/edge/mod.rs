//! The edge: the public gRPC service `switchboard.v1.Broker`.
//!
//! Handlers stay thin: unpack the request, validate it ([`validate`]), call the domain (proposer,
//! store, hub), and map errors in one place ([`status`]). Nothing is written for a request that
//! fails validation.
//!
//! - [`auth`]: the gate before every handler (origin, token, call budgets), which leaves each
//!   call its [`Caller`](crate::security::caller::Caller), through which every grant is checked.
//! - [`validate`]: every rule a request must pass, with its stable reason.
//! - [`entities`]: the `switchboard.v1.Entities` service.
//! - [`convert`]: protobuf ⇄ broker types.
//! - [`status`]: the one mapping from errors to gRPC statuses and stream refusals.

pub mod auth;
mod consumers;
pub mod convert;
pub mod entities;
pub mod status;
pub mod subscribe_codec;
pub mod token_endpoint;
pub mod validate;

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{Future, FutureExt, Stream, StreamExt};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_server::Broker as BrokerRpc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::error::BrokerError;
use crate::hub::Hub;
use crate::message::{now_us, Item, ItemOutcome};
use crate::observability::metrics::{self, PublishResult};
use crate::observability::{admin, trace};
use crate::proposer::{self, Proposer};
use crate::raft::state_machine::AppliedProgress;
use crate::raft::Raft;
use crate::security::caller::Caller;
use crate::shutdown::ShutdownSignal;
use crate::store::{MessageStore, ReadRange};
use crate::subscription::outgoing::Outgoing;
use crate::subscription::registry::{Registered, Registry};
use crate::subscription::{self, SubscriptionSpec};
use auth::{Gate, TokenBound};
use validate::{Start, Validator};

/// Events buffered per `Subscribe` stream before the subscription task waits for the client.
pub(crate) const SUBSCRIBE_STREAM_BUFFER: usize = 64;
/// Acks buffered per `PublishStream` before the stream's task waits for the client.
const PUBLISH_STREAM_BUFFER: usize = 256;
/// Batches one History call may visit, so a sparse pattern cannot scan the whole store at once.
const HISTORY_MAX_BATCHES: usize = 4096;

/// What every handler shares.
struct Edge {
    config: Arc<Config>,
    validator: Validator,
    proposer: Proposer,
    store: MessageStore,
    hub: Hub,
    raft: Raft,
    progress: watch::Receiver<AppliedProgress>,
    shutdown: ShutdownSignal,
    /// The live subscriptions of this node.
    registry: Registry,
    /// Who may call, and how often.
    gate: Arc<Gate>,
}

impl BrokerService {
    /// The live subscriptions of this node (for metrics).
    pub fn registry(&self) -> Registry {
        self.edge.registry.clone()
    }

    /// The `switchboard.v1.Entities` service over the same parts.
    pub fn entities(&self) -> entities::EntitiesService {
        entities::EntitiesService::new(Arc::clone(&self.edge))
    }

    /// Spends one unit of `caller`'s budgets and queues one publish, as each message of a
    /// `PublishStream` does; the returned future yields its ack. Messages queued one after the
    /// other keep that order (the gateway's batches rely on it).
    pub(crate) async fn queue_publish(
        &self,
        request: pb::PublishRequest,
        caller: &Caller,
    ) -> PendingAck {
        match admit_publish(&self.edge, caller, request, &None) {
            Ok((request, parent)) => self.edge.begin_publish(request, caller, parent).await,
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
    }
}

/// The `switchboard.v1.Broker` service; cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    edge: Arc<Edge>,
}

impl BrokerService {
    /// Builds the service over the broker's parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        proposer: Proposer,
        store: MessageStore,
        hub: Hub,
        raft: Raft,
        progress: watch::Receiver<AppliedProgress>,
        shutdown: ShutdownSignal,
        gate: Arc<Gate>,
    ) -> BrokerService {
        let registry = Registry::new(
            config.subscriptions.max_per_connection,
            config.subscriptions.max_per_broker,
        );
        BrokerService {
            edge: Arc::new(Edge {
                registry,
                validator: Validator::new(config.limits.clone()),
                config,
                proposer,
                store,
                hub,
                raft,
                progress,
                shutdown,
                gate,
            }),
        }
    }
}

impl BrokerService {
    /// `Subscribe`: starts the subscription; its stream yields items ready to encode. Anything to
    /// check before a subscription starts (authentication, permissions) belongs here, since both
    /// ways of serving `Subscribe` go through it.
    ///
    /// # Errors
    /// The request is invalid, a limit is reached, or the broker is shutting down.
    pub async fn subscribe_outgoing(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<subscribe_codec::OutgoingStream>, Status> {
        let caller = Caller::of(request.extensions())?;
        let events = self.edge.subscribe(request.into_inner(), &caller).await?;
        Ok(Response::new(Box::pin(TokenBound::new(
            &caller,
            ReceiverStream::new(events),
        ))))
    }
}

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
        ItemOutcome::Entity(_) | ItemOutcome::Consumer(_) => {
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
    receive: tracing::Span,
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
            receive,
            commit,
        } = self;
        let acked = outcome.and_then(|outcome| ack(outcome, correlation_id));
        drop(commit);
        drop(receive);
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
    /// Starts a subscription task feeding `out` (for Subscribe, and for entity watches).
    ///
    /// # Errors
    /// [`BrokerError::ShuttingDown`] once shutdown has begun: no new stream is started then.
    fn spawn_subscription(
        &self,
        registered: Registered,
        spec: SubscriptionSpec,
        out: subscription::EventSender,
    ) -> Result<(), BrokerError> {
        if self.shutdown.is_triggered() {
            return Err(BrokerError::ShuttingDown);
        }
        tokio::spawn(subscription::run(
            self.hub.clone(),
            self.store.clone(),
            registered,
            spec,
            out,
            self.shutdown.clone(),
        ));
        Ok(())
    }

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
        let receive = trace::receive_span(parent.as_ref(), &message.channel);
        trace::stamp_message(&receive, &mut message.headers);
        let commit = trace::child_span(&receive, "switchboard.commit");
        let flight = InFlight {
            correlation_id: message.correlation_id.clone(),
            channel,
            caller: caller.clone(),
            receive,
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
            let prepared =
                attempt.and_then(|(request, parent)| self.prepare_publish(request, caller, parent));
            slots.push(match prepared {
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

    /// [`Edge::begin_publishes`] for one publish.
    async fn begin_publish(
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
fn admit_publish(
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
async fn publish_stream_task(
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
    loop {
        if !inbound_open && pending.is_empty() {
            if shutting_down {
                let _ = out.send(Err(Status::from(BrokerError::ShuttingDown))).await;
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
                                return;
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
                    return;
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

#[tonic::async_trait]
impl BrokerRpc for BrokerService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishAck>, Status> {
        let caller = Caller::of(request.extensions())?;
        let parent = trace::parent_from_metadata(request.metadata());
        let request = request.into_inner();
        let parent = trace::parent_from_headers(&request.headers).or(parent);
        let ack = self
            .edge
            .begin_publish(request, &caller, parent)
            .await
            .await?;
        Ok(Response::new(ack))
    }

    type PublishStreamStream =
        auth::TokenBound<ReceiverStream<Result<pb::PublishStreamAck, Status>>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let (out, acks) = mpsc::channel(PUBLISH_STREAM_BUFFER);
        let caller = Caller::of(request.extensions())?;
        let parent = trace::parent_from_metadata(request.metadata());
        let acks = TokenBound::new(&caller, ReceiverStream::new(acks));
        tokio::spawn(publish_stream_task(
            Arc::clone(&self.edge),
            request.into_inner(),
            out,
            caller,
            parent,
        ));
        Ok(Response::new(acks))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeEvent, Status>> + Send>>;

    /// Served through [`subscribe_codec::BrokerRoutes`], which calls
    /// [`BrokerService::subscribe_outgoing`] and encodes deliveries from their shared bytes; this
    /// is the same stream decoded, for a server built without the routes.
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let events = self.subscribe_outgoing(request).await?.into_inner();
        Ok(Response::new(Box::pin(
            events.map(|item| item.map(Outgoing::into_event)),
        )))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(
            self.edge.ack(request.into_inner(), &caller).await?,
        ))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(self.edge.list_subscriptions(&caller)))
    }

    async fn list_consumers(
        &self,
        request: Request<pb::ListConsumersRequest>,
    ) -> Result<Response<pb::ListConsumersResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(self.edge.list_consumers(&caller)?))
    }

    async fn get_consumer(
        &self,
        request: Request<pb::GetConsumerRequest>,
    ) -> Result<Response<pb::ConsumerInfo>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(
            self.edge
                .get_consumer(&request.into_inner().name, &caller)?,
        ))
    }

    async fn delete_consumer(
        &self,
        request: Request<pb::DeleteConsumerRequest>,
    ) -> Result<Response<pb::DeleteConsumerResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        self.edge
            .delete_consumer(&request.into_inner().name, &caller)
            .await?;
        Ok(Response::new(pb::DeleteConsumerResponse {}))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let edge = &self.edge;
        let pattern = edge.validator.pattern(&request.pattern)?;
        // Reading history is subscribing to the past: the same grant covers it.
        caller.check_subscribe(&pattern)?;
        let from = match edge.validator.start(request.from, Start::Earliest, false)? {
            Start::Earliest | Start::Latest => 1,
            Start::Offset(offset) => offset.max(1),
            Start::Time(time_us) => match edge.store.first_offset_at_or_after(time_us)? {
                Some(offset) => offset,
                None => return Ok(Response::new(pb::HistoryResponse::default())),
            },
        };
        let to_time_us = match &request.to_time {
            Some(ts) => convert::micros(ts).ok_or_else(|| {
                BrokerError::invalid(
                    crate::error::Reason::RangeInvalid,
                    format!("to_time {ts:?} is not a valid time after 1970"),
                )
            })?,
            None => u64::MAX,
        };
        let to_offset = match request.to_offset {
            0 => u64::MAX,
            n => n,
        };
        let history = &edge.config.history;
        let limit = match request.limit {
            0 => history.default_limit,
            n => n.min(history.max_limit),
        } as usize;
        let max_bytes = history.max_page_bytes;
        let store = edge.store.clone();
        let page = tokio::task::spawn_blocking(move || {
            store.read(&ReadRange {
                from,
                to_offset,
                to_time_us,
                pattern: &pattern,
                now_us: now_us(),
                limit,
                max_bytes,
                max_batches: HISTORY_MAX_BATCHES,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("history read failed: {e}")))??;
        Ok(Response::new(pb::HistoryResponse {
            messages: page.messages.iter().map(convert::message).collect(),
            next_offset: if page.done { 0 } else { page.next },
        }))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let edge = &self.edge;
        let progress = *edge.progress.borrow();
        let metrics = edge.raft.metrics().borrow().clone();
        let first_offset = edge
            .store
            .first_batch()?
            .and_then(|b| b.messages.first().map(|m| m.offset))
            .unwrap_or(0);
        let disk_bytes = admin::disk_bytes(edge.config.data_dir.clone()).await;
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node_id: edge.config.node_id,
            last_offset: progress.last_offset,
            first_offset,
            stored_bytes: progress.stored_bytes,
            disk_bytes,
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            applied_index: progress.applied_index,
            loops_detected: progress.loops_detected,
        }))
    }
}
