//! The edge: the public gRPC service `switchboard.v1.Broker`, and the only layer that speaks the
//! wire (protobuf and gRPC statuses).
//!
//! Handlers stay thin: unpack the request, validate it ([`validate`]), call the domain (proposer,
//! store, hub), and map errors in one place ([`status`]). Nothing is written for a request that
//! fails validation.
//!
//! - [`auth`]: the gate before every handler (origin, token, call budgets), which leaves each
//!   call its [`Caller`], through which every grant is checked.
//! - [`grpc_guard`]: per-call checks before tonic decodes a call (metadata size, one request
//!   message per unary call); malformed protobuf is refused by `switchboard_proto::codec`.
//! - [`validate`]: every rule a request must pass, with its stable reason.
//! - `publish`: `Publish` and `PublishStream` (and the gateway's publishes), grouped into
//!   proposals, with the metrics and audit lines of refusals.
//! - `subscribe`: `Subscribe` — the grant, the durable consumer it names, the subscription task;
//!   [`subscribe_codec`] serves its stream from shared bytes.
//! - `consumers`: `Ack` and the durable-consumer calls.
//! - [`entities`]: the `switchboard.v1.Entities` service.
//! - [`schemas`]: the `switchboard.v1.SchemaService` (the payload schema registry; the check a
//!   publish meets is in `publish`, over [`crate::schema`]).
//! - [`kpis`]: the `switchboard.v1.KpiService` (KPI views and their values, over
//!   [`crate::kpi`]).
//! - [`token_endpoint`]: the `switchboard.v1.Auth` token endpoint.
//! - [`convert`]: protobuf ⇄ broker types.
//! - [`status`]: the one mapping from errors to gRPC statuses and stream refusals.
//!
//! This file holds the `Broker` service itself (its RPCs, `History` and `Info` inline) and the
//! parts every handler shares (`Edge`).

pub(crate) mod auth;
mod consumers;
pub mod convert;
pub(crate) mod delivery;
pub(crate) mod entities;
pub(crate) mod grpc_guard;
pub(crate) mod kpis;
mod publish;
pub(crate) mod schemas;
pub(crate) mod status;
mod subscribe;
pub(crate) mod subscribe_codec;
pub(crate) mod token_endpoint;
pub(crate) mod validate;

use std::pin::Pin;
use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_server::Broker as BrokerRpc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::error::BrokerError;
use crate::fanout::ephemeral::Broadcaster;
use crate::fanout::hub::Hub;
use crate::fanout::registry::{Registered, Registry};
use crate::fanout::subscription::{self, SubscriptionSpec};
use crate::message::now_us;
use crate::observability::{admin, trace};
use crate::raft::Raft;
use crate::schema::drift::DriftReporter;
use crate::schema::SchemaRegistry;
use crate::security::caller::Caller;
use crate::shutdown::ShutdownSignal;
use crate::state::store::{MessageStore, ReadRange};
use crate::state::AppliedProgress;
use crate::write::proposer::Proposer;
use auth::{Gate, TokenBound};
use publish::{admit_publish, publish_stream_task, PendingAck, PUBLISH_STREAM_BUFFER};
use validate::{Start, Validator};

/// Batches one History call may visit, so a sparse pattern cannot scan the whole store at once.
const HISTORY_MAX_BATCHES: usize = 4096;

/// The `switchboard.v1.Broker` service; cheap to clone.
#[derive(Clone)]
pub(crate) struct BrokerService {
    edge: Arc<Edge>,
}

impl BrokerService {
    /// Builds the service over the broker's parts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Arc<Config>,
        proposer: Proposer,
        store: MessageStore,
        hub: Hub,
        raft: Raft,
        progress: watch::Receiver<AppliedProgress>,
        shutdown: ShutdownSignal,
        gate: Arc<Gate>,
        ephemeral: Broadcaster,
        drift: DriftReporter,
    ) -> BrokerService {
        let registry = Registry::new(
            config.subscriptions.max_per_connection,
            config.subscriptions.max_per_broker,
        );
        let schemas = Arc::new(SchemaRegistry::new(store.clone()));
        BrokerService {
            edge: Arc::new(Edge {
                registry,
                schemas,
                drift,
                validator: Validator::new(config.limits.clone()),
                config,
                proposer,
                store,
                hub,
                raft,
                progress,
                shutdown,
                gate,
                ephemeral,
            }),
        }
    }

    /// The live subscriptions of this node (for metrics).
    pub(crate) fn registry(&self) -> Registry {
        self.edge.registry.clone()
    }

    /// The `switchboard.v1.SchemaService` over the same parts.
    pub(crate) fn schemas(&self) -> schemas::SchemasService {
        schemas::SchemasService::new(Arc::clone(&self.edge))
    }

    /// The `switchboard.v1.KpiService` over the same parts.
    pub(crate) fn kpis(&self) -> kpis::KpisService {
        kpis::KpisService::new(Arc::clone(&self.edge))
    }

    /// The `switchboard.v1.Entities` service over the same parts.
    pub(crate) fn entities(&self) -> entities::EntitiesService {
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

    /// `Subscribe`: starts the subscription; its stream yields items ready to encode. Anything to
    /// check before a subscription starts (authentication, permissions) belongs here, since both
    /// ways of serving `Subscribe` go through it.
    ///
    /// # Errors
    /// The request is invalid, a limit is reached, or the broker is shutting down.
    pub(crate) async fn subscribe_outgoing(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<subscribe_codec::OutgoingStream>, Status> {
        let caller = Caller::of(request.extensions())?;
        let events = self.edge.subscribe(request.into_inner(), &caller).await?;
        let events = ReceiverStream::new(events).map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(TokenBound::new(&caller, events))))
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

    type PublishStreamStream = TokenBound<ReceiverStream<Result<pb::PublishStreamAck, Status>>>;

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
            events.map(|item| item.map(delivery::into_event)),
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
        Ok(Response::new(history_page(page, max_bytes)))
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

/// Room in a `HistoryResponse` for its `next_offset` field: a tag byte and a 10-byte varint.
const NEXT_OFFSET_FIELD_BYTES: usize = 11;

/// The response for a page read from the store, cut so that it encodes to at most `max_bytes`
/// (`history.max_page_bytes`, 4 MiB by default: what stock gRPC clients accept): the store's
/// page is bounded by an estimate of each message's size, this by its encoding. It keeps at least
/// one message, and `next_offset` then names the first message left out.
fn history_page(page: crate::state::store::ReadPage, max_bytes: usize) -> pb::HistoryResponse {
    use prost::Message as _;

    let budget = max_bytes.saturating_sub(NEXT_OFFSET_FIELD_BYTES);
    let mut messages = Vec::with_capacity(page.messages.len());
    let mut bytes = 0;
    let mut next_offset = if page.done { 0 } else { page.next };
    for stored in &page.messages {
        let message = convert::message(stored);
        // As a `repeated Message messages = 1` entry: a tag byte, the length, the message.
        let len = message.encoded_len();
        let entry = 1 + prost::length_delimiter_len(len) + len;
        if !messages.is_empty() && bytes + entry > budget {
            next_offset = stored.offset;
            break;
        }
        bytes += entry;
        messages.push(message);
    }
    pb::HistoryResponse {
        messages,
        next_offset,
    }
}

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
    /// Where ephemeral publishes go.
    ephemeral: Broadcaster,
    /// The payload schemas publishes are checked against.
    schemas: Arc<SchemaRegistry>,
    /// Where mismatches are counted and announced.
    drift: DriftReporter,
}

impl Edge {
    /// Waits, up to `cluster.forward_timeout`, until `holds` (a read of this node's store) is
    /// true, re-checking after each applied entry: a registry write through a follower is
    /// answered once the leader applied it, and waiting for this node too means the caller's
    /// next request here sees it. A node far behind answers at the bound anyway (the write is
    /// committed; this node applies it as it catches up).
    async fn applied_here(&self, holds: impl Fn() -> bool) {
        let mut progress = self.progress.clone();
        let wait = async {
            while !holds() {
                if progress.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.config.cluster.forward_timeout, wait).await;
    }

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
}
