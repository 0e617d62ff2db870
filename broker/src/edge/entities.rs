//! The `switchboard.v1.Entities` service: entity updates, deletes, reads and watches.
//!
//! Writes go through the proposer like publishes (one log entry can carry both), and apply merges
//! them (see [`crate::entity`]). Reads come from this node's store. A watch is a subscription to
//! the entities' state channels, registered before the snapshot is read, so no change falls
//! between the snapshot and the stream; a change the snapshot already showed is skipped by
//! version.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use futures::StreamExt as _;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::entities_server::{Entities as EntitiesRpc, EntitiesServer};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::auth::TokenBound;
use super::{convert, Edge};
use crate::entity::{Change, EntityState, Stamp};
use crate::error::{BrokerError, Reason};
use crate::fanout::outgoing::{Delivery, Outgoing, SharedMessage};
use crate::fanout::registry::{FlowPolicy, Opening};
use crate::fanout::subscription::SubscriptionSpec;
use crate::message::{EntityWrite, Item, ItemOutcome};
use crate::observability::metrics;
use crate::security::caller::Caller;
use crate::state::entity_doc::state_channel;

/// Longest entity type or id.
const MAX_KEY_PART: usize = 64;
/// Longest writer id.
const MAX_WRITER_LEN: usize = 128;
/// Changes buffered per watch before its subscription waits for the client.
const WATCH_BUFFER: usize = 64;

/// The `switchboard.v1.Entities` service; cheap to clone.
#[derive(Clone)]
pub(crate) struct EntitiesService {
    edge: Arc<Edge>,
}

impl EntitiesService {
    pub(super) fn new(edge: Arc<Edge>) -> EntitiesService {
        EntitiesService { edge }
    }
}

fn invalid(reason: Reason, message: impl Into<String>) -> BrokerError {
    BrokerError::invalid(reason, message)
}

fn key(key: Option<pb::EntityKey>) -> Result<(String, String), BrokerError> {
    let key = key.ok_or_else(|| invalid(Reason::EntityKeyInvalid, "the entity key is required"))?;
    for (what, part) in [("type", &key.r#type), ("id", &key.id)] {
        let ok = !part.is_empty()
            && part.len() <= MAX_KEY_PART
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(invalid(
                Reason::EntityKeyInvalid,
                format!(
                    "entity {what} must be 1 to {MAX_KEY_PART} characters of [A-Za-z0-9_-], got {:?}",
                    crate::error::shorten(part)
                ),
            ));
        }
    }
    Ok((key.r#type, key.id))
}

/// The entity's fields once `values` are merged over `current`'s, as one JSON object (the
/// document a schema for its state channel judges).
fn document_after(current: Option<&EntityState>, values: &BTreeMap<String, String>) -> Vec<u8> {
    let mut document = serde_json::Map::new();
    let current_fields = current.into_iter().flat_map(|state| state.fields.iter());
    for (name, field) in current_fields {
        document.insert(name.clone(), json_value(&field.value));
    }
    for (name, value) in values {
        document.insert(name.clone(), json_value(value));
    }
    serde_json::Value::Object(document).to_string().into_bytes()
}

/// A stored field's canonical JSON text as a value (it was checked as JSON when written).
fn json_value(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

fn stamp(stamp: Option<pb::WriteStamp>) -> Result<Stamp, BrokerError> {
    let stamp =
        stamp.ok_or_else(|| invalid(Reason::WriteStampInvalid, "the write stamp is required"))?;
    if stamp.writer.is_empty() || stamp.writer.len() > MAX_WRITER_LEN {
        return Err(invalid(
            Reason::WriteStampInvalid,
            format!("the stamp's writer must be 1 to {MAX_WRITER_LEN} bytes"),
        ));
    }
    Ok(Stamp {
        timestamp_ms: stamp.timestamp_ms,
        version: stamp.version,
        writer: stamp.writer,
    })
}

fn fields(bytes: &[u8], max: usize) -> Result<BTreeMap<String, String>, BrokerError> {
    if bytes.len() > max {
        return Err(invalid(
            Reason::EntityFieldsInvalid,
            format!("fields take {} bytes; the limit is {max}", bytes.len()),
        ));
    }
    // The same check as a JSON payload's (UTF-8, depth, numbers), then the object itself.
    let not_json = |e: serde_json::Error| {
        invalid(
            Reason::EntityFieldsInvalid,
            format!("fields are not JSON: {e}"),
        )
    };
    super::validate::check_json(bytes).map_err(not_json)?;
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(not_json)?;
    let serde_json::Value::Object(map) = value else {
        return Err(invalid(
            Reason::EntityFieldsInvalid,
            "fields must be a JSON object",
        ));
    };
    if map.is_empty() {
        return Err(invalid(
            Reason::EntityFieldsInvalid,
            "fields must name at least one field",
        ));
    }
    Ok(map
        .into_iter()
        .map(|(name, value)| (name, value.to_string()))
        .collect())
}

/// Whether an `If-None-Match` condition matches an existing entity whose ETag is `etag`
/// (RFC 9110 §13.1.2): `*`, or a comma-separated list of entity tags one of which is `etag` by
/// weak comparison (a `W/` prefix is ignored). An empty condition matches nothing.
pub(crate) fn if_none_match(condition: &str, etag: &str) -> bool {
    let opaque = |tag: &str| {
        let tag = tag.trim();
        tag.strip_prefix("W/").unwrap_or(tag).to_owned()
    };
    let etag = opaque(etag);
    condition.trim() == "*"
        || condition
            .split(',')
            .map(opaque)
            .any(|tag| !tag.is_empty() && tag == etag)
}

impl EntitiesService {
    /// Checks the entity as this update would leave it against the schema registered for its
    /// state channel, if any (docs/SCHEMAS.md#entity-updates). The check reads this node's state:
    /// a concurrent write may change what the merge makes of it, so it judges the entity as this
    /// writer sees it.
    fn check_schema(
        &self,
        entity_type: &str,
        id: &str,
        values: &BTreeMap<String, String>,
        caller: &Caller,
    ) -> Result<(), BrokerError> {
        let channel = state_channel(entity_type, id);
        // The entity is read only when a schema applies: most entity types have none, and an
        // update must not pay a store read for nothing.
        let document = || {
            let current = self.edge.store.entity(entity_type, id)?;
            Ok(document_after(current.as_ref(), values))
        };
        let verdict = self.edge.schemas.check_entity(&channel, document);
        self.edge.drift.account(verdict).inspect_err(|error| {
            metrics::entity_refused(error.reason());
            caller.audit_refused(&format!("{entity_type}.{id}"), error);
        })
    }

    async fn write(
        &self,
        write: EntityWrite,
        caller: &Caller,
    ) -> Result<Response<pb::EntityResponse>, Status> {
        let (entity_type, id) = (write.entity_type.clone(), write.id.clone());
        match self.edge.proposer.propose(Item::Entity(write)).await? {
            ItemOutcome::Entity(state) => Ok(Response::new(pb::EntityResponse {
                entity: Some(convert::entity_state(&entity_type, &id, &state)),
            })),
            ItemOutcome::Refused(refusal) => {
                let error = BrokerError::from(refusal);
                metrics::entity_refused(error.reason());
                caller.audit_refused(&format!("{entity_type}.{id}"), &error);
                Err(error.into())
            }
            other => Err(BrokerError::Consensus(format!(
                "an entity write was applied as {other:?}"
            ))
            .into()),
        }
    }
}

#[tonic::async_trait]
impl EntitiesRpc for EntitiesService {
    async fn update_entity(
        &self,
        request: Request<pb::UpdateEntityRequest>,
    ) -> Result<Response<pb::EntityResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let (entity_type, id) = key(request.key)?;
        caller.check_update_entity(&entity_type, &id)?;
        let values = fields(&request.fields, self.edge.config.limits.max_payload_bytes)?;
        let stamp = stamp(request.stamp)?;
        self.check_schema(&entity_type, &id, &values, &caller)?;
        self.write(
            EntityWrite {
                entity_type,
                id,
                change: Change::Update(values),
                stamp,
                expected_version: request.expected_version,
            },
            &caller,
        )
        .await
    }

    async fn delete_entity(
        &self,
        request: Request<pb::DeleteEntityRequest>,
    ) -> Result<Response<pb::EntityResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let (entity_type, id) = key(request.key)?;
        caller.check_update_entity(&entity_type, &id)?;
        let stamp = stamp(request.stamp)?;
        self.write(
            EntityWrite {
                entity_type,
                id,
                change: Change::Delete,
                stamp,
                expected_version: request.expected_version,
            },
            &caller,
        )
        .await
    }

    async fn get_entity(
        &self,
        request: Request<pb::GetEntityRequest>,
    ) -> Result<Response<pb::GetEntityResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let (entity_type, id) = key(request.key)?;
        caller.check_read_entity(&entity_type, &id)?;
        if !request.stale_ok {
            // Read index: wait until this node has applied every write committed before now, as
            // the leader confirms with a quorum; a read on a follower is then as fresh as one on
            // the leader.
            self.edge.proposer.leader().read_barrier().await?;
        }
        let state = self.edge.store.entity(&entity_type, &id)?.ok_or_else(|| {
            BrokerError::EntityNotFound {
                entity_type: entity_type.clone(),
                id: id.clone(),
            }
        })?;
        if if_none_match(&request.if_none_match, &state.etag()) {
            return Ok(Response::new(pb::GetEntityResponse {
                not_modified: true,
                entity: None,
            }));
        }
        Ok(Response::new(pb::GetEntityResponse {
            not_modified: false,
            entity: Some(convert::entity_state(&entity_type, &id, &state)),
        }))
    }

    type WatchEntitiesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::EntityEvent, Status>> + Send>>;

    async fn watch_entities(
        &self,
        request: Request<pb::WatchEntitiesRequest>,
    ) -> Result<Response<Self::WatchEntitiesStream>, Status> {
        // The generated server (and the gateway) take events as values; the `WatchEntities` route
        // itself is served from the shared encodings ([`WatchRoutes`]).
        let items = self.watch_items(request)?;
        Ok(Response::new(Box::pin(
            items.map(|item| item.map(WatchItem::into_event)),
        )))
    }
}

impl EntitiesService {
    /// Opens a watch: its state subscription, and the stream that sends the snapshot and then
    /// the subscription's changes until the caller's token expires. The stream is polled by the
    /// response itself: a watch has one task (its subscription's), not one more to pass each
    /// change on.
    pub(crate) fn watch_items(
        &self,
        request: Request<pb::WatchEntitiesRequest>,
    ) -> Result<WatchItems, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let edge = &self.edge;
        let pattern = edge.validator.pattern(&request.pattern)?;
        let state_pattern = edge
            .validator
            .pattern(&format!("$state.{}", pattern.as_str()))?;
        // A watch reads every entity type its pattern can reach.
        caller.check_subscribe(&state_pattern)?;
        let (changes_tx, changes) = mpsc::channel(WATCH_BUFFER);
        // An entity's channel carries only its versions, so conflating per channel is conflating
        // per entity; dropping old versions with a gap would add nothing a watcher can use.
        let policy = match pb::FlowPolicy::try_from(request.policy) {
            Ok(pb::FlowPolicy::Conflate | pb::FlowPolicy::DropOldest) => FlowPolicy::Conflate,
            _ => FlowPolicy::Lossless,
        };
        let min_interval = (request.min_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(u64::from(request.min_interval_ms)));
        let registered = edge.registry.open(Opening {
            pattern: state_pattern.as_str().to_owned(),
            policy,
            durable: None,
            owner: caller.owner(),
            max_unacked: None,
            peer: caller.peer(),
            acked_floor: 0,
        })?;
        edge.spawn_subscription(
            registered,
            SubscriptionSpec {
                pattern: state_pattern,
                start: super::validate::Start::Latest,
                window: edge.config.subscriptions.queue_depth as u64,
                min_interval,
                ack_timeout: None,
                // An entity's state comes from stored messages only.
                ephemeral: false,
                // One change per event: the watch filters and sends them one by one.
                max_batch: 1,
            },
            changes_tx,
        )?;
        let watch = Watch {
            store: edge.store.clone(),
            pattern,
            changes,
            shown: HashMap::new(),
            pending: VecDeque::new(),
            phase: Phase::Opening,
        };
        let items = futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        });
        Ok(TokenBound::new(&caller, Box::pin(items)))
    }
}

/// What a watch's task sends down its stream: an event built for this watch (a snapshot entry,
/// the end of the snapshot), or a change, shared by every watch of the entity and encoded once
/// ([`super::delivery::entity_change`]).
pub(crate) enum WatchItem {
    /// An event of this watch alone.
    Event(pb::EntityEvent),
    /// A change: the state message that carries it.
    Change(Arc<SharedMessage>),
}

impl WatchItem {
    /// The item as an `EntityEvent` value (for the generated server and the gateway).
    fn into_event(self) -> pb::EntityEvent {
        match self {
            WatchItem::Event(event) => event,
            WatchItem::Change(shared) => pb::EntityEvent {
                event: super::delivery::entity_change(&shared)
                    .map(|change| pb::entity_event::Event::Change(change.entity.clone())),
            },
        }
    }

    /// Writes the item as an encoded `EntityEvent`: a change from its shared encoding.
    fn encode(&self, buf: &mut impl bytes::BufMut) -> Result<(), Status> {
        use prost::Message as _;
        match self {
            WatchItem::Event(event) => event
                .encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode an entity event: {e}"))),
            WatchItem::Change(shared) => {
                let change = super::delivery::entity_change(shared)
                    .ok_or_else(|| Status::internal("a state message carries no entity"))?;
                buf.put_slice(&change.event);
                Ok(())
            }
        }
    }
}

/// The items of one watch, until the caller's token expires.
pub(crate) type WatchItems =
    TokenBound<std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchItem, Status>> + Send>>>;

/// Encodes [`WatchItem`]s and decodes `WatchEntitiesRequest`s: the codec of the `WatchEntities`
/// route in [`WatchRoutes`].
#[derive(Debug, Clone, Copy, Default)]
struct WatchCodec;

impl tonic::codec::Codec for WatchCodec {
    type Encode = WatchItem;
    type Decode = pb::WatchEntitiesRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> WatchCodec {
        WatchCodec
    }

    fn decoder(&mut self) -> WatchCodec {
        WatchCodec
    }
}

impl tonic::codec::Encoder for WatchCodec {
    type Item = WatchItem;
    type Error = Status;

    fn encode(
        &mut self,
        item: WatchItem,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        item.encode(dst)
    }
}

impl tonic::codec::Decoder for WatchCodec {
    type Item = pb::WatchEntitiesRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::WatchEntitiesRequest>, Status> {
        switchboard_proto::codec::decode_request(src).map(Some)
    }
}

/// The path of the call [`WatchRoutes`] serves itself.
const WATCH_PATH: &str = "/switchboard.v1.Entities/WatchEntities";

struct WatchSvc(EntitiesService);

impl tonic::server::ServerStreamingService<pb::WatchEntitiesRequest> for WatchSvc {
    type Response = WatchItem;
    type ResponseStream = WatchItems;
    type Future = tonic::codegen::BoxFuture<Response<WatchItems>, Status>;

    fn call(&mut self, request: Request<pb::WatchEntitiesRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.watch_items(request).map(Response::new) })
    }
}

/// The `switchboard.v1.Entities` service: the generated server, with `WatchEntities` served from
/// the shared encodings of the changes, so a change watched by many is encoded once rather than
/// once per watch (as `Subscribe` is, [`super::subscribe_codec`]). The bytes on the wire are the
/// same `EntityEvent`s.
#[derive(Clone)]
pub(crate) struct WatchRoutes {
    service: EntitiesService,
    generated: EntitiesServer<EntitiesService>,
    max_decoding_message_size: usize,
}

impl WatchRoutes {
    /// Serves `service`; requests larger than `max_decoding_message_size` bytes are refused.
    pub(crate) fn new(service: EntitiesService, max_decoding_message_size: usize) -> WatchRoutes {
        WatchRoutes {
            generated: EntitiesServer::new(service.clone())
                .max_decoding_message_size(max_decoding_message_size),
            service,
            max_decoding_message_size,
        }
    }
}

impl tonic::server::NamedService for WatchRoutes {
    const NAME: &'static str =
        <EntitiesServer<EntitiesService> as tonic::server::NamedService>::NAME;
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for WatchRoutes {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let service = WatchSvc(self.service.clone());
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(max_decoding), None);
            Ok(grpc.server_streaming(service, request).await)
        })
    }
}

/// The entities a watch's snapshot has still to read.
type Entities = Box<dyn Iterator<Item = Result<(String, String, EntityState), BrokerError>> + Send>;

/// Where a watch is.
enum Phase {
    /// Waiting until its state subscription is live.
    Opening,
    /// Sending the snapshot: the entities still to read, and how many were sent.
    Snapshot(Entities, u64),
    /// Passing changes on.
    Live,
    /// Ended (after an error, or with its subscription).
    Ended,
}

/// One watch: the snapshot once its state subscription is live, then the changes newer than
/// what the snapshot showed.
struct Watch {
    store: crate::state::store::MessageStore,
    pattern: crate::channel::Pattern,
    changes: mpsc::Receiver<Result<Outgoing, BrokerError>>,
    /// The version last sent, by state channel (which names the entity): a change the snapshot
    /// or an earlier event already showed is skipped.
    shown: HashMap<String, u64>,
    /// Deliveries of a batch not yet looked at.
    pending: VecDeque<Delivery>,
    phase: Phase,
}

impl Watch {
    /// The watch's next item; `None` once it ended.
    async fn next(&mut self) -> Option<Result<WatchItem, Status>> {
        use pb::entity_event::Event;

        loop {
            match &mut self.phase {
                Phase::Opening => match self.changes.recv().await {
                    // The subscription is registered: every later change will follow.
                    Some(Ok(Outgoing::Subscribed { .. })) => {
                        let literal_type = self
                            .pattern
                            .as_str()
                            .split('.')
                            .next()
                            .filter(|t| *t != "*" && *t != ">");
                        let entities = self.store.entities(literal_type);
                        self.phase = Phase::Snapshot(Box::new(entities), 0);
                    }
                    Some(Err(e)) => return self.end(e),
                    _ => {
                        self.phase = Phase::Ended;
                        return None;
                    }
                },
                Phase::Snapshot(entities, count) => match entities.next() {
                    Some(Ok((entity_type, id, state))) => {
                        if !self.pattern.matches(&format!("{entity_type}.{id}")) {
                            continue;
                        }
                        let entity = convert::entity_state(&entity_type, &id, &state);
                        self.shown
                            .insert(state_channel(&entity_type, &id), state.version);
                        *count += 1;
                        let event = pb::EntityEvent {
                            event: Some(Event::Snapshot(entity)),
                        };
                        return Some(Ok(WatchItem::Event(event)));
                    }
                    Some(Err(e)) => return self.end(e),
                    None => {
                        let entities = *count;
                        self.phase = Phase::Live;
                        let done = pb::EntityEvent {
                            event: Some(Event::SnapshotComplete(pb::SnapshotComplete { entities })),
                        };
                        return Some(Ok(WatchItem::Event(done)));
                    }
                },
                Phase::Live if !self.pending.is_empty() => {
                    if let Some(delivery) = self.pending.pop_front() {
                        if let Some(item) = self.newer_change(&delivery) {
                            return Some(Ok(item));
                        }
                    }
                }
                Phase::Live => match self.changes.recv().await {
                    Some(Ok(Outgoing::Delivery(delivery))) => {
                        if let Some(item) = self.newer_change(&delivery) {
                            return Some(Ok(item));
                        }
                    }
                    Some(Ok(Outgoing::Subscribed { .. } | Outgoing::Gap { .. })) => {}
                    // Not sent to a watch (its subscription asks for one message per event),
                    // but read as the deliveries it holds, in order, if one came.
                    Some(Ok(Outgoing::Batch(deliveries))) => {
                        self.pending.extend(deliveries);
                    }
                    Some(Err(e)) => return self.end(e),
                    None => {
                        self.phase = Phase::Ended;
                        return None;
                    }
                },
                Phase::Ended => return None,
            }
        }
    }

    /// The change a delivered state message carries, unless the watch showed that version of the
    /// entity (or a newer one) already; records it as shown.
    fn newer_change(&mut self, delivery: &Delivery) -> Option<WatchItem> {
        // Every watch of this entity shares one decoded and encoded copy of the change; this
        // watch only passes it on.
        let shared = delivery.shared();
        let Some(change) = super::delivery::entity_change(shared) else {
            tracing::warn!(channel = %shared.message.channel, "unreadable state message");
            return None;
        };
        let version = change.entity.version;
        let channel = shared.message.channel.as_str();
        match self.shown.get_mut(channel) {
            Some(shown) if *shown >= version => return None,
            Some(shown) => *shown = version,
            None => {
                self.shown.insert(channel.to_owned(), version);
            }
        }
        Some(WatchItem::Change(Arc::clone(shared)))
    }

    /// Ends the watch with `error` as its last item.
    fn end(&mut self, error: BrokerError) -> Option<Result<WatchItem, Status>> {
        self.phase = Phase::Ended;
        Some(Err(error.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_takes_a_star_or_a_list_compared_weakly() {
        for matching in [
            "\"v3\"",
            "W/\"v3\"",
            "\"v1\", \"v3\"",
            " \"v1\",W/\"v3\" ",
            "*",
        ] {
            assert!(if_none_match(matching, "\"v3\""), "{matching}");
        }
        for other in ["", "\"v4\"", "\"v1\", W/\"v2\"", "v3", ",", "**"] {
            assert!(!if_none_match(other, "\"v3\""), "{other}");
        }
    }
}
