// The in-process mock `Broker` and `Entities` services, and the helpers that drive them: shared
// by the client's tests (`client/tests/mock_broker.rs`) and sb's (`cli/tests/sb.rs`), which
// `include!` this file (an `include!`d file cannot carry `//!` docs, hence plain comments).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use switchboard_client::proto::{
    AckRequest, AckResponse, ConsumerInfo, DeleteConsumerRequest, DeleteConsumerResponse, Gap,
    GetConsumerRequest, ListConsumersRequest, ListConsumersResponse, ListSubscriptionsRequest,
    ListSubscriptionsResponse, SubscriptionInfo,
};
use switchboard_client::proto::{
    DeleteEntityRequest, Entity, EntityKey, EntityResponse, GetEntityRequest, GetEntityResponse,
    SnapshotComplete, UpdateEntityRequest, WatchEntitiesRequest,
};
use switchboard_client::proto::{
    HistoryRequest, HistoryResponse, Message, PublishAck, PublishRequest, PublishStreamAck,
    Refusal, SubscribeEvent, SubscribeRequest, Subscribed,
};
use switchboard_client::{
    split_stream_ack, Client, EntityDelete, EntityEvent, EntityExt, EntityRead, EntityUpdate,
    Error, FlowPolicy, GapReason, HistoryQuery, Publish, Start, SubscribeOptions,
    SubscriptionEvent,
};
use switchboard_proto::v1::broker_server::{Broker, BrokerServer};
use switchboard_proto::v1::entities_server::{Entities, EntitiesServer};
use switchboard_proto::v1::start_position::Position;
use switchboard_proto::v1::{
    entity_event, publish_stream_ack, subscribe_event, InfoRequest, InfoResponse,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

const WAIT: Duration = Duration::from_secs(5);

/// What the mock does for one `Subscribe` call: send these items, then close the stream or hold
/// it open until the client goes away.
struct Plan {
    items: Vec<Result<SubscribeEvent, Status>>,
    hold: bool,
}

#[derive(Default)]
struct State {
    plans: VecDeque<Plan>,
    subscribe_requests: Vec<SubscribeRequest>,
    /// Subscribe streams the client cancelled while they were held open.
    cancelled: usize,
    published: Vec<PublishRequest>,
    /// Offsets 1..=history_len are stored.
    history_len: u64,
    /// Entities by (type, id).
    entities: HashMap<(String, String), Entity>,
    entity_updates: Vec<UpdateEntityRequest>,
    entity_deletes: Vec<DeleteEntityRequest>,
    /// What the mock does for each `WatchEntities` call, in order; once they are used up, a
    /// snapshot of `entities` and a held stream.
    watch_plans: VecDeque<WatchPlan>,
    /// Every `Ack` received.
    acks: Vec<AckRequest>,
    /// What `ListSubscriptions` answers.
    subscriptions: Vec<SubscriptionInfo>,
    /// The durable consumers, for `ListConsumers`, `GetConsumer` and `DeleteConsumer`.
    consumers: Vec<ConsumerInfo>,
}

/// What the mock does for one `WatchEntities` call: send these items, then close the stream or
/// hold it open until the client goes away.
struct WatchPlan {
    items: Vec<Result<switchboard_client::proto::EntityEvent, Status>>,
    hold: bool,
}

#[derive(Clone, Default)]
struct Mock {
    state: Arc<Mutex<State>>,
}

impl Mock {
    fn plan(&self, items: Vec<Result<SubscribeEvent, Status>>, hold: bool) {
        self.state
            .lock()
            .unwrap()
            .plans
            .push_back(Plan { items, hold });
    }

    fn starts(&self) -> Vec<Option<Position>> {
        self.state
            .lock()
            .unwrap()
            .subscribe_requests
            .iter()
            .map(|request| request.start.and_then(|start| start.position))
            .collect()
    }

    fn cancelled(&self) -> usize {
        self.state.lock().unwrap().cancelled
    }

    fn requests(&self) -> Vec<SubscribeRequest> {
        self.state.lock().unwrap().subscribe_requests.clone()
    }

    /// Every `Ack` received, as (subscription id, offsets).
    fn acks(&self) -> Vec<(u64, Vec<u64>)> {
        self.state
            .lock()
            .unwrap()
            .acks
            .iter()
            .map(|ack| (ack.subscription_id, ack.offsets.clone()))
            .collect()
    }
}

fn message(offset: u64) -> Message {
    Message {
        offset,
        channel: "a.b".to_owned(),
        payload: format!("{offset}").into(),
        ..Message::default()
    }
}

fn delivery(offset: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Message(message(offset))),
    })
}

/// `Subscribed` as subscription 1.
fn subscribed(next_offset: u64) -> Result<SubscribeEvent, Status> {
    subscribed_as(next_offset, 1)
}

fn subscribed_as(next_offset: u64, subscription_id: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Subscribed(Subscribed {
            next_offset,
            subscription_id,
            acked_offset: 0,
        })),
    })
}

fn gap(from_offset: u64, to_offset: u64, count: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Gap(Gap {
            from_offset,
            to_offset,
            count,
            reason: GapReason::Dropped as i32,
        })),
    })
}

/// A delivery of `offset` that was sent `redelivery` times before.
fn redelivery(offset: u64, redelivery: u32) -> Result<SubscribeEvent, Status> {
    let mut message = message(offset);
    message.redelivery = redelivery;
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Message(message)),
    })
}

fn consumer_info(name: &str) -> ConsumerInfo {
    ConsumerInfo {
        name: name.to_owned(),
        pattern: "orders.>".to_owned(),
        policy: switchboard_client::proto::FlowPolicy::Conflate as i32,
        acked_offset: 41,
        pending: 2,
        redeliveries: 1,
        connected: true,
        created_at: Some(prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 250_000_000,
        }),
    }
}

fn refused(code: Code, reason: &str, message: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "switchboard", HashMap::new()),
    )
}

/// An entity refusal carrying `current_version` in its ErrorInfo metadata, as the broker sends.
fn entity_refused(code: Code, reason: &str, message: &str, current_version: u64) -> Status {
    let mut metadata = HashMap::new();
    metadata.insert("current_version".to_owned(), current_version.to_string());
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "switchboard", metadata),
    )
}

fn entity_key(r#type: &str, id: &str) -> EntityKey {
    EntityKey {
        r#type: r#type.to_owned(),
        id: id.to_owned(),
    }
}

fn sample_entity(id: &str, version: u64, fields: &'static str) -> Entity {
    Entity {
        key: Some(entity_key("contact", id)),
        fields: fields.into(),
        version,
        etag: format!("\"{version}\""),
        updated_at: Some(prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 250_000_000,
        }),
        ..Entity::default()
    }
}

fn entity_event(
    event: entity_event::Event,
) -> Result<switchboard_client::proto::EntityEvent, Status> {
    Ok(switchboard_client::proto::EntityEvent { event: Some(event) })
}

#[tonic::async_trait]
impl Broker for Mock {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishAck>, Status> {
        let request = request.into_inner();
        if request.channel.ends_with('.') {
            return Err(refused(
                Code::InvalidArgument,
                "CHANNEL_INVALID",
                "channel segment 2 is empty",
            ));
        }
        let mut state = self.state.lock().unwrap();
        let original = state.published.iter().position(|stored| {
            !request.idempotency_key.is_empty()
                && stored.channel == request.channel
                && stored.idempotency_key == request.idempotency_key
        });
        if let Some(index) = original {
            return Ok(Response::new(PublishAck {
                offset: index as u64 + 1,
                publish_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                correlation_id: "generated".to_owned(),
                duplicate: true,
            }));
        }
        state.published.push(request.clone());
        Ok(Response::new(PublishAck {
            offset: state.published.len() as u64,
            publish_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            correlation_id: if request.correlation_id.is_empty() {
                "generated".to_owned()
            } else {
                request.correlation_id
            },
            duplicate: false,
        }))
    }

    type PublishStreamStream = ReceiverStream<Result<PublishStreamAck, Status>>;

    async fn publish_stream(
        &self,
        request: Request<tonic::Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut requests = request.into_inner();
        let (sender, receiver) = mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut sequence = 0;
            while let Some(Ok(request)) = requests.next().await {
                let result = if request.channel.ends_with('.') {
                    publish_stream_ack::Result::Refusal(Refusal {
                        code: Code::InvalidArgument as i32,
                        reason: "CHANNEL_INVALID".to_owned(),
                        message: "channel segment 2 is empty".to_owned(),
                        metadata: Default::default(),
                    })
                } else {
                    let mut state = state.lock().unwrap();
                    state.published.push(request);
                    publish_stream_ack::Result::Ack(PublishAck {
                        offset: state.published.len() as u64,
                        ..PublishAck::default()
                    })
                };
                let ack = PublishStreamAck {
                    sequence,
                    result: Some(result),
                };
                sequence += 1;
                if sender.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    type SubscribeStream = ReceiverStream<Result<SubscribeEvent, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        if request.pattern.contains(' ') {
            return Err(refused(
                Code::InvalidArgument,
                "PATTERN_INVALID",
                "pattern has a space",
            ));
        }
        let plan = {
            let mut state = self.state.lock().unwrap();
            state.subscribe_requests.push(request);
            state.plans.pop_front()
        };
        let plan = plan.unwrap_or(Plan {
            items: vec![subscribed(1)],
            hold: true,
        });
        let (sender, receiver) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            for item in plan.items {
                if sender.send(item).await.is_err() {
                    return;
                }
            }
            if plan.hold {
                sender.closed().await;
                state.lock().unwrap().cancelled += 1;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let request = request.into_inner();
        let last = self.state.lock().unwrap().history_len;
        let from = match request.from.and_then(|from| from.position) {
            Some(Position::Offset(offset)) => offset.max(1),
            Some(Position::Earliest(_)) | None => 1,
            Some(other) => return Err(Status::invalid_argument(format!("unsupported {other:?}"))),
        };
        let last = if request.to_offset > 0 {
            last.min(request.to_offset)
        } else {
            last
        };
        let limit = match request.limit {
            0 => 100,
            limit => u64::from(limit.min(1000)),
        };
        let end = last.min(from + limit - 1);
        let messages = (from..=end).map(message).collect();
        let next_offset = if end < last { end + 1 } else { 0 };
        Ok(Response::new(HistoryResponse {
            messages,
            next_offset,
        }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            version: "mock".to_owned(),
            node_id: 1,
            ..InfoResponse::default()
        }))
    }

    /// Records the acknowledgement; answers nothing pending, acknowledged up to the highest
    /// offset acknowledged so far. Subscription 404 is unknown.
    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let request = request.into_inner();
        if request.subscription_id == 404 {
            return Err(refused(
                Code::NotFound,
                "SUBSCRIPTION_NOT_FOUND",
                "no subscription 404",
            ));
        }
        let mut state = self.state.lock().unwrap();
        state.acks.push(request);
        let acked_offset = state
            .acks
            .iter()
            .flat_map(|ack| ack.offsets.iter().copied())
            .max()
            .unwrap_or(0);
        Ok(Response::new(AckResponse {
            pending: 0,
            acked_offset,
        }))
    }

    async fn list_subscriptions(
        &self,
        _: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        Ok(Response::new(ListSubscriptionsResponse {
            subscriptions: self.state.lock().unwrap().subscriptions.clone(),
        }))
    }

    async fn list_consumers(
        &self,
        _: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        Ok(Response::new(ListConsumersResponse {
            consumers: self.state.lock().unwrap().consumers.clone(),
        }))
    }

    async fn get_consumer(
        &self,
        request: Request<GetConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        let name = request.into_inner().name;
        let state = self.state.lock().unwrap();
        match state
            .consumers
            .iter()
            .find(|consumer| consumer.name == name)
        {
            Some(consumer) => Ok(Response::new(consumer.clone())),
            None => Err(refused(
                Code::NotFound,
                "CONSUMER_NOT_FOUND",
                &format!("no durable consumer {name:?}"),
            )),
        }
    }

    async fn delete_consumer(
        &self,
        request: Request<DeleteConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        let name = request.into_inner().name;
        let mut state = self.state.lock().unwrap();
        let before = state.consumers.len();
        state.consumers.retain(|consumer| consumer.name != name);
        if state.consumers.len() == before {
            return Err(refused(
                Code::NotFound,
                "CONSUMER_NOT_FOUND",
                &format!("no durable consumer {name:?}"),
            ));
        }
        Ok(Response::new(DeleteConsumerResponse {}))
    }
}

/// A simplified merge: the stamps of the last change only (not per field), enough to exercise
/// the client's side of the contract.
#[tonic::async_trait]
impl Entities for Mock {
    async fn update_entity(
        &self,
        request: Request<UpdateEntityRequest>,
    ) -> Result<Response<EntityResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        state.entity_updates.push(request.clone());
        let key = request.key.clone().unwrap_or_default();
        let stamp = request.stamp.clone().unwrap_or_default();
        if stamp.writer.is_empty() {
            return Err(refused(
                Code::InvalidArgument,
                "WRITER_INVALID",
                "the writer is empty",
            ));
        }
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&request.fields) else {
            return Err(refused(
                Code::InvalidArgument,
                "FIELDS_INVALID",
                "fields must be a JSON object",
            ));
        };
        let slot = (key.r#type.clone(), key.id.clone());
        let current = state.entities.get(&slot).cloned();
        let current_version = current.as_ref().map_or(0, |entity| entity.version);
        if let Some(expected) = request.expected_version {
            if expected != current_version {
                return Err(entity_refused(
                    Code::Aborted,
                    "VERSION_CONFLICT",
                    &format!("expected version {expected}, the entity is at {current_version}"),
                    current_version,
                ));
            }
        }
        let mut entity = current.unwrap_or_else(|| Entity {
            key: Some(key),
            fields: "{}".into(),
            ..Entity::default()
        });
        let last = entity.last_stamp.clone().unwrap_or_default();
        if entity.version > 0
            && (stamp.timestamp_ms, stamp.version, stamp.writer.as_bytes())
                <= (last.timestamp_ms, last.version, last.writer.as_bytes())
        {
            return Err(entity_refused(
                Code::FailedPrecondition,
                "STALE_UPDATE",
                "no field wins",
                current_version,
            ));
        }
        let mut merged: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&entity.fields).unwrap();
        merged.extend(fields);
        entity.fields = serde_json::to_vec(&merged).unwrap().into();
        entity.version += 1;
        entity.etag = format!("\"{}\"", entity.version);
        entity.deleted = false;
        entity.updated_at = Some(prost_types::Timestamp {
            seconds: 1_714_564_800,
            nanos: 250_000_000,
        });
        entity.last_stamp = Some(stamp);
        state.entities.insert(slot, entity.clone());
        Ok(Response::new(EntityResponse {
            entity: Some(entity),
        }))
    }

    async fn delete_entity(
        &self,
        request: Request<DeleteEntityRequest>,
    ) -> Result<Response<EntityResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        state.entity_deletes.push(request.clone());
        let key = request.key.clone().unwrap_or_default();
        let slot = (key.r#type.clone(), key.id.clone());
        let Some(entity) = state.entities.get_mut(&slot) else {
            return Err(refused(
                Code::NotFound,
                "ENTITY_NOT_FOUND",
                "no entity contact.404",
            ));
        };
        if let Some(expected) = request.expected_version {
            if expected != entity.version {
                return Err(entity_refused(
                    Code::Aborted,
                    "VERSION_CONFLICT",
                    "version mismatch",
                    entity.version,
                ));
            }
        }
        entity.fields = "{}".into();
        entity.deleted = true;
        entity.version += 1;
        entity.etag = format!("\"{}\"", entity.version);
        entity.last_stamp = request.stamp;
        Ok(Response::new(EntityResponse {
            entity: Some(entity.clone()),
        }))
    }

    async fn get_entity(
        &self,
        request: Request<GetEntityRequest>,
    ) -> Result<Response<GetEntityResponse>, Status> {
        let request = request.into_inner();
        let key = request.key.unwrap_or_default();
        let state = self.state.lock().unwrap();
        let Some(entity) = state.entities.get(&(key.r#type.clone(), key.id.clone())) else {
            return Err(refused(
                Code::NotFound,
                "ENTITY_NOT_FOUND",
                &format!("no entity {}.{}", key.r#type, key.id),
            ));
        };
        if !request.if_none_match.is_empty() && request.if_none_match == entity.etag {
            return Ok(Response::new(GetEntityResponse {
                not_modified: true,
                entity: None,
            }));
        }
        Ok(Response::new(GetEntityResponse {
            not_modified: false,
            entity: Some(entity.clone()),
        }))
    }

    type WatchEntitiesStream =
        ReceiverStream<Result<switchboard_client::proto::EntityEvent, Status>>;

    async fn watch_entities(
        &self,
        request: Request<WatchEntitiesRequest>,
    ) -> Result<Response<Self::WatchEntitiesStream>, Status> {
        let request = request.into_inner();
        if request.pattern.contains(' ') {
            return Err(refused(
                Code::InvalidArgument,
                "PATTERN_INVALID",
                "pattern has a space",
            ));
        }
        let plan = {
            let mut state = self.state.lock().unwrap();
            state.watch_plans.pop_front().unwrap_or_else(|| {
                let mut entities: Vec<Entity> = state.entities.values().cloned().collect();
                entities.sort_by_key(|entity| entity.entity_id().to_owned());
                let count = entities.len() as u64;
                let mut items: Vec<_> = entities
                    .into_iter()
                    .map(|entity| entity_event(entity_event::Event::Snapshot(entity)))
                    .collect();
                items.push(entity_event(entity_event::Event::SnapshotComplete(
                    SnapshotComplete { entities: count },
                )));
                WatchPlan { items, hold: true }
            })
        };
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(async move {
            for item in plan.items {
                if sender.send(item).await.is_err() {
                    return;
                }
            }
            if plan.hold {
                sender.closed().await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

async fn serve(mock: Mock) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BrokerServer::new(mock.clone()))
            .add_service(EntitiesServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

/// A TCP proxy whose connections can be cut, to lose the connection for real.
struct Proxy {
    address: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let registry = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().unwrap().push(connection);
            }
        });
        Proxy {
            address,
            connections,
        }
    }

    fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

fn fast() -> SubscribeOptions {
    SubscribeOptions::default().backoff(Duration::from_millis(1), Duration::from_millis(20))
}

async fn next_offset(subscription: &mut switchboard_client::Subscription) -> u64 {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription goes on")
        .expect("a message, not an error")
        .offset
}

async fn start() -> (Mock, Client) {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let client = Client::connect(address.to_string()).await.unwrap();
    (mock, client)
}
