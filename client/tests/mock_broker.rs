//! The client against an in-process mock broker (no real broker needed): errors through the wire,
//! publishing, history paging, entities (with a mock `Entities` service), flow control (options,
//! acknowledgements, gaps, consumers), and above all the subscription's resume logic, including a
//! real connection cut through a TCP proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

#[tokio::test]
async fn resumes_after_errors_and_closes_without_gaps_or_duplicates() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            delivery(2),
            delivery(3),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    // The broker repeats offset 3 (the guard drops it), then closes the stream cleanly.
    mock.plan(
        vec![
            subscribed(4),
            delivery(3),
            delivery(4),
            delivery(5),
            delivery(6),
        ],
        false,
    );
    // The first attempt after that fails transiently.
    mock.plan(vec![Err(Status::internal("hiccup"))], false);
    mock.plan(
        vec![
            subscribed(7),
            delivery(7),
            delivery(8),
            delivery(9),
            delivery(10),
        ],
        true,
    );

    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(subscription.next_offset(), Some(1));
    let mut offsets = Vec::new();
    for _ in 0..10 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Earliest(Default::default())),
            Some(Position::Offset(4)),
            Some(Position::Offset(7)),
            Some(Position::Offset(7)),
        ]
    );
}

#[tokio::test]
async fn resumes_from_the_confirmed_offset_when_nothing_was_delivered() {
    let (mock, client) = start().await;
    mock.plan(
        vec![subscribed(42), Err(Status::unavailable("going away"))],
        false,
    );
    mock.plan(vec![subscribed(42), delivery(42)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Latest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 42);
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Latest(Default::default())),
            Some(Position::Offset(42)),
        ]
    );
}

#[tokio::test]
async fn a_non_transient_error_ends_the_subscription() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            Err(refused(
                Code::PermissionDenied,
                "CHANNEL_FORBIDDEN",
                "no access",
            )),
        ],
        false,
    );
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    let error = subscription.next().await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "PERMISSION_DENIED CHANNEL_FORBIDDEN: no access"
    );
    assert!(subscription.next().await.is_none());
    assert_eq!(mock.starts().len(), 1);
}

#[tokio::test]
async fn gives_up_after_max_reconnect_attempts() {
    let (mock, client) = start().await;
    mock.plan(vec![subscribed(1), Err(Status::unavailable("down"))], false);
    for _ in 0..5 {
        mock.plan(vec![Err(Status::unavailable("still down"))], false);
    }
    let mut subscription = client
        .subscribe_with(
            "a.>",
            Start::Earliest,
            fast().max_reconnect_attempts(Some(3)),
        )
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(error.to_string(), "UNAVAILABLE: still down");
    assert!(subscription.next().await.is_none());
    assert_eq!(mock.starts().len(), 4);
}

#[tokio::test]
async fn the_first_subscribe_error_is_returned_with_its_reason() {
    let (_mock, client) = start().await;
    let error = client
        .subscribe("a b", Start::Latest)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    assert_eq!(error.reason(), Some("PATTERN_INVALID"));
}

#[tokio::test]
async fn resumes_after_the_connection_is_cut() {
    let mock = Mock::default();
    let proxy = Proxy::start(serve(mock.clone()).await).await;
    let client = Client::connect(proxy.address.to_string()).await.unwrap();
    mock.plan(vec![subscribed(1), delivery(1), delivery(2)], true);
    mock.plan(vec![subscribed(3), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    assert_eq!(next_offset(&mut subscription).await, 2);
    proxy.cut();
    assert_eq!(next_offset(&mut subscription).await, 3);
    assert_eq!(mock.starts()[1], Some(Position::Offset(3)));
}

#[tokio::test]
async fn dropping_the_subscription_cancels_the_call() {
    let (mock, client) = start().await;
    let subscription = client.subscribe("a.>", Start::Latest).await.unwrap();
    assert_eq!(mock.cancelled(), 0);
    drop(subscription);
    let deadline = tokio::time::Instant::now() + WAIT;
    while mock.cancelled() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn publish_and_refusal() {
    let (mock, client) = start().await;
    let ack = client
        .publish(
            Publish::new("a.b", "{}")
                .header("k", "v")
                .ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(ack.offset, 1);
    assert_eq!(ack.correlation_id, "generated");
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!((stored.ttl_ms, stored.headers["k"].as_str()), (1000, "v"));

    let error = client.publish(Publish::new("a.", "{}")).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty"
    );
    assert!(matches!(error, Error::Status { .. }));
}

#[tokio::test]
async fn publish_stream_acks_in_order_with_refusals() {
    let (_mock, client) = start().await;
    let messages = futures::stream::iter(
        ["a.b", "a.", "a.c"]
            .into_iter()
            .map(|channel| Publish::new(channel, "{}")),
    );
    let acks: Vec<_> = client
        .publish_stream(messages)
        .await
        .unwrap()
        .map(|ack| split_stream_ack(ack.unwrap()))
        .collect()
        .await;
    assert_eq!(acks.len(), 3);
    assert_eq!(acks[0].0, 0);
    assert_eq!(acks[0].1.as_ref().unwrap().offset, 1);
    assert_eq!(
        acks[1].1.as_ref().unwrap_err().reason(),
        Some("CHANNEL_INVALID")
    );
    assert_eq!(acks[2].1.as_ref().unwrap().offset, 2);
}

#[tokio::test]
async fn publisher_handle_sends_before_acks_are_read() {
    let (mock, client) = start().await;
    let (publisher, acks) = client.publisher(4);
    for i in 0..10 {
        tokio::time::timeout(WAIT, publisher.send(Publish::new("a.b", format!("{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    drop(publisher);
    let acks: Vec<_> = tokio::time::timeout(WAIT, acks.collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(acks.len(), 10);
    assert_eq!(mock.state.lock().unwrap().published.len(), 10);
}

#[tokio::test]
async fn history_pages_through_everything() {
    let (mock, client) = start().await;
    mock.state.lock().unwrap().history_len = 2500;
    let all = client
        .history_all(HistoryQuery::new("a.>"), usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all
        .windows(2)
        .all(|pair| pair[1].offset == pair[0].offset + 1));

    let some = client
        .history_all(
            HistoryQuery::new("a.>").from(Start::Offset(10)).limit(7),
            20,
        )
        .await
        .unwrap();
    assert_eq!(
        some.iter().map(|m| m.offset).collect::<Vec<_>>(),
        (10..30).collect::<Vec<_>>()
    );

    let page = client
        .history(HistoryQuery::new("a.>").to_offset(3))
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 3);
    assert_eq!(page.next_offset, None);

    let latest = client
        .history(HistoryQuery::new("a.>").from(Start::Latest))
        .await
        .unwrap_err();
    assert!(matches!(latest, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn info_round_trip() {
    let (_mock, client) = start().await;
    let info = client.info().await.unwrap();
    assert_eq!((info.version.as_str(), info.node_id), ("mock", 1));
}

/// Runs the `sb` binary against `address` and returns (status, stdout, stderr).
async fn sb(
    address: SocketAddr,
    args: &[&str],
    stdin: Option<&'static [u8]>,
) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sb"));
    command
        .arg("--server")
        .arg(address.to_string())
        .args(args)
        .env_remove("SB_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_prints_the_ack_and_reports_refusals() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "publish",
            "a.b",
            r#"{"x":1}"#,
            "--ttl",
            "30s",
            "--header",
            "k=v=w",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout,
        "{\"offset\":1,\"publish_time\":\"1970-01-01T00:00:01.000Z\",\"correlation_id\":\"generated\"}\n"
    );
    let (status, _, stderr) = sb(
        address,
        &["publish", "a.b", "-"],
        Some(b"{\"from\":\"stdin\"}\n"),
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    {
        let state = mock.state.lock().unwrap();
        assert_eq!(state.published[0].ttl_ms, 30_000);
        assert_eq!(state.published[0].headers["k"], "v=w");
        assert_eq!(&state.published[1].payload[..], b"{\"from\":\"stdin\"}\n");
    }

    let (status, stdout, stderr) = sb(address, &["publish", "a.", "{}"], None).await;
    assert_eq!(status, 1);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: INVALID_ARGUMENT CHANNEL_INVALID: channel segment 2 is empty\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_subscribe_prints_deliveries_and_stops() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let mut binary = message(2);
    binary.payload = vec![0xff, 0x00].into();
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(binary)),
            }),
            delivery(3),
            delivery(4),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(
        address,
        &["subscribe", "a.>", "--from", "earliest", "--count", "3"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stderr,
        "sb: subscribed to a.> (next offset 1, subscription 1)\n"
    );
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["payload"], "1");
    assert_eq!(lines[0]["payload_encoding"], "utf8");
    assert_eq!(lines[1]["payload"], "/wA=");
    assert_eq!(lines[1]["payload_encoding"], "base64");
    assert_eq!(lines[2]["offset"], 3);

    let started = std::time::Instant::now();
    let (status, stdout, _) = sb(address, &["subscribe", "a.>", "--timeout", "300ms"], None).await;
    assert_eq!((status, stdout.as_str()), (0, ""));
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, _, stderr) = sb(address, &["subscribe", "a b"], None).await;
    assert_eq!(status, 1);
    assert_eq!(
        stderr,
        "error: INVALID_ARGUMENT PATTERN_INVALID: pattern has a space\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_history_and_info() {
    let mock = Mock::default();
    mock.state.lock().unwrap().history_len = 30;
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &["history", "a.>", "--from", "5", "--limit", "12"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let offsets: Vec<u64> = json_lines(&stdout)
        .iter()
        .map(|line| line["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (5..17).collect::<Vec<_>>());

    let (status, stdout, _) = sb(address, &["history", "a.>", "--limit", "0"], None).await;
    assert_eq!((status, stdout.lines().count()), (0, 30));

    let (status, stdout, _) = sb(address, &["info"], None).await;
    assert_eq!(status, 0);
    let info = json_lines(&stdout);
    assert_eq!(info.len(), 1);
    assert_eq!(info[0]["version"], "mock");
    assert_eq!(info[0]["applied_index"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_names_the_url_it_cannot_reach() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, stdout, stderr) = sb(address, &["info"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert!(
        stderr.starts_with(&format!(
            "error: cannot connect to http://127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn publish_carries_causation_and_reports_duplicates() {
    let (mock, client) = start().await;
    let cause = Message {
        offset: 7,
        channel: "a.b".to_owned(),
        correlation_id: "3f2b9a1e-0000-4000-8000-000000000000".to_owned(),
        hops: 2,
        ..Message::default()
    };
    let first = client
        .publish(
            Publish::new("a.c", "{}")
                .caused_by(&cause)
                .idempotency_key("k"),
        )
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = client
        .publish(Publish::new("a.c", "{}").idempotency_key("k"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!(stored.correlation_id, cause.correlation_id);
    assert_eq!((stored.causation_id.as_str(), stored.hops), ("7", 3));
}

#[tokio::test]
async fn entity_update_get_and_delete() {
    let (mock, client) = start().await;
    let client = client.with_writer_id("panel-7");
    let entity = client
        .update_entity(EntityUpdate::new(
            "contact",
            "42",
            serde_json::json!({"name": "Ada"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        (entity.entity_type(), entity.entity_id()),
        ("contact", "42")
    );
    assert_eq!(entity.version, 1);
    assert_eq!(
        entity.fields_json().unwrap(),
        serde_json::json!({"name": "Ada"})
    );
    assert_eq!(entity.last_stamp.as_ref().unwrap().writer, "panel-7");

    let entity = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"vip": true})).expect_version(1),
        )
        .await
        .unwrap();
    assert_eq!(entity.version, 2);
    assert_eq!(
        entity.fields_json().unwrap(),
        serde_json::json!({"name": "Ada", "vip": true})
    );
    {
        // Two writes in a row from one client: stamps strictly increase, the expected version is
        // sent only when set.
        let state = mock.state.lock().unwrap();
        let (a, b) = (&state.entity_updates[0], &state.entity_updates[1]);
        let (sa, sb) = (a.stamp.clone().unwrap(), b.stamp.clone().unwrap());
        assert!((sb.timestamp_ms, sb.version) > (sa.timestamp_ms, sa.version));
        assert_eq!((a.expected_version, b.expected_version), (None, Some(1)));
    }

    let read = client.get_entity("contact", "42", None).await.unwrap();
    let EntityRead::Modified(read) = read else {
        panic!("expected the entity, got {read:?}")
    };
    assert_eq!(read, entity);

    let not_modified = client
        .get_entity("contact", "42", Some(&entity.etag))
        .await
        .unwrap();
    assert_eq!(not_modified, EntityRead::NotModified);
    let stale_etag = client
        .get_entity("contact", "42", Some("\"1\""))
        .await
        .unwrap();
    assert!(matches!(stale_etag, EntityRead::Modified(_)));

    let deleted = client
        .delete_entity(EntityDelete::new("contact", "42").stamp(u64::MAX, 0, "janitor"))
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.fields_json().unwrap(), serde_json::json!({}));
    assert_eq!(deleted.version, 3);
    assert_eq!(
        mock.state.lock().unwrap().entity_deletes[0].expected_version,
        None
    );

    let missing = client.get_entity("contact", "404", None).await.unwrap_err();
    assert_eq!(
        missing.to_string(),
        "NOT_FOUND ENTITY_NOT_FOUND: no entity contact.404"
    );
    assert_eq!(missing.reason(), Some("ENTITY_NOT_FOUND"));
}

#[tokio::test]
async fn entity_refusals_carry_the_current_version() {
    let (_mock, client) = start().await;
    client
        .update_entity(EntityUpdate::new(
            "contact",
            "42",
            serde_json::json!({"a": 1}),
        ))
        .await
        .unwrap();
    let conflict = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"a": 2})).expect_version(0),
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflict.to_string(),
        "ABORTED VERSION_CONFLICT: expected version 0, the entity is at 1"
    );
    assert_eq!(conflict.code(), Code::Aborted);
    assert_eq!(conflict.reason(), Some("VERSION_CONFLICT"));
    assert_eq!(conflict.current_version(), Some(1));
    assert!(!conflict.is_transient());
    match &conflict {
        Error::Status { metadata, .. } => assert_eq!(metadata["current_version"], "1"),
        other => panic!("unexpected {other:?}"),
    }

    let stale = client
        .update_entity(
            EntityUpdate::new("contact", "42", serde_json::json!({"a": 3})).stamp(1, 0, "old"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        stale.to_string(),
        "FAILED_PRECONDITION STALE_UPDATE: no field wins"
    );
    assert_eq!(stale.current_version(), Some(1));

    let not_an_object = client
        .update_entity(EntityUpdate::new("contact", "42", serde_json::json!([1])))
        .await
        .unwrap_err();
    assert!(matches!(not_an_object, Error::InvalidArgument(_)));
}

async fn next_event(
    watch: &mut switchboard_client::EntityWatch,
) -> Option<Result<EntityEvent, Error>> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("an event in time")
}

#[tokio::test]
async fn watch_entities_snapshot_then_changes() {
    let (mock, client) = start().await;
    mock.state.lock().unwrap().watch_plans.push_back(WatchPlan {
        items: vec![
            entity_event(entity_event::Event::Snapshot(sample_entity(
                "1",
                4,
                r#"{"name":"Ada"}"#,
            ))),
            entity_event(entity_event::Event::SnapshotComplete(SnapshotComplete {
                entities: 1,
            })),
            Ok(switchboard_client::proto::EntityEvent { event: None }),
            entity_event(entity_event::Event::Change(sample_entity(
                "2",
                1,
                r#"{"name":"Bob"}"#,
            ))),
            Err(refused(
                Code::Unavailable,
                "SHUTTING_DOWN",
                "the broker is stopping",
            )),
        ],
        hold: false,
    });
    let mut watch = client.watch_entities("contact.*").await.unwrap();
    assert_eq!(watch.pattern(), "contact.*");
    assert!(!watch.is_live());

    let Some(Ok(EntityEvent::Snapshot(first))) = next_event(&mut watch).await else {
        panic!("expected a snapshot")
    };
    assert_eq!((first.entity_id(), first.version), ("1", 4));
    assert!(matches!(
        next_event(&mut watch).await,
        Some(Ok(EntityEvent::SnapshotComplete(1)))
    ));
    let Some(Ok(EntityEvent::Change(change))) = next_event(&mut watch).await else {
        panic!("expected a change (an unknown event is skipped)")
    };
    assert_eq!(
        change.fields_json().unwrap(),
        serde_json::json!({"name": "Bob"})
    );
    let error = next_event(&mut watch).await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "UNAVAILABLE SHUTTING_DOWN: the broker is stopping"
    );
    assert!(next_event(&mut watch).await.is_none());
    assert!(watch.is_live());

    // A stream the broker closes cleanly ends with an UNAVAILABLE error.
    mock.state.lock().unwrap().watch_plans.push_back(WatchPlan {
        items: vec![entity_event(entity_event::Event::SnapshotComplete(
            SnapshotComplete { entities: 0 },
        ))],
        hold: false,
    });
    let mut watch = client.watch_entities(">").await.unwrap();
    assert!(matches!(
        watch.next().await,
        Some(Ok(EntityEvent::SnapshotComplete(0)))
    ));
    let closed = watch.next().await.unwrap().unwrap_err();
    assert_eq!(closed.code(), Code::Unavailable);
    assert!(closed.is_transient());
    assert!(watch.next().await.is_none());

    let invalid = client.watch_entities("a b").await.unwrap_err();
    assert_eq!(
        invalid.to_string(),
        "INVALID_ARGUMENT PATTERN_INVALID: pattern has a space"
    );
    let empty = client.watch_entities("").await.unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument(_)));
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_hops_and_duplicates() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let args = [
        "publish",
        "a.b",
        "{}",
        "--idempotency-key",
        "k",
        "--hops",
        "2",
        "--causation-id",
        "5",
    ];
    let (status, first, stderr) = sb(address, &args, None).await;
    assert_eq!(status, 0, "{stderr}");
    assert!(!first.contains("duplicate"), "{first}");
    let (status, again, _) = sb(address, &args, None).await;
    assert_eq!(status, 0);
    assert_eq!(
        again,
        "{\"offset\":1,\"publish_time\":\"1970-01-01T00:00:01.000Z\",\"correlation_id\":\"generated\",\"duplicate\":true}\n"
    );
    let stored = mock.state.lock().unwrap().published[0].clone();
    assert_eq!((stored.hops, stored.causation_id.as_str()), (2, "5"));

    let mut reaction = message(3);
    reaction.hops = 2;
    mock.plan(
        vec![
            subscribed(1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(reaction)),
            }),
            delivery(4),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(address, &["subscribe", "a.>", "--count", "2"], None).await;
    assert_eq!(status, 0, "{stderr}");
    let lines = json_lines(&stdout);
    assert_eq!(lines[0]["hops"], 2);
    assert!(lines[1].get("hops").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_entity_update_get_delete() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            r#"{"name":"Ada","tags":["a"]}"#,
            "--timestamp",
            "1714564800100",
            "--version",
            "2",
            "--writer",
            "panel-7",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout,
        concat!(
            r#"{"type":"contact","id":"42","version":1,"etag":"\"1\"","deleted":false,"#,
            r#""updated_at":"2024-05-01T12:00:00.250Z","fields":{"name":"Ada","tags":["a"]},"#,
            r#""last_stamp":{"timestamp_ms":1714564800100,"version":2,"writer":"panel-7"}}"#,
            "\n"
        )
    );

    // From stdin, with the default stamp: now, version 0, the default writer.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            "-",
            "--expect-version",
            "1",
        ],
        Some(br#"{"vip":true}"#),
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let line = &json_lines(&stdout)[0];
    assert_eq!(line["version"], 2);
    assert_eq!(
        line["fields"],
        serde_json::json!({"name": "Ada", "tags": ["a"], "vip": true})
    );
    {
        let state = mock.state.lock().unwrap();
        let request = &state.entity_updates[1];
        let stamp = request.stamp.clone().unwrap();
        assert!(stamp.timestamp_ms >= before, "{stamp:?}");
        assert_eq!(stamp.version, 0);
        assert!(stamp.writer.starts_with("sb"), "{stamp:?}");
        assert_eq!(request.expected_version, Some(1));
    }

    let (status, stdout, _) = sb(address, &["entity", "get", "contact", "42"], None).await;
    assert_eq!(status, 0);
    let etag = json_lines(&stdout)[0]["etag"].as_str().unwrap().to_owned();
    assert_eq!(etag, "\"2\"");
    let (status, stdout, _) = sb(
        address,
        &["entity", "get", "contact", "42", "--if-none-match", &etag],
        None,
    )
    .await;
    assert_eq!((status, stdout.as_str()), (0, "{\"not_modified\":true}\n"));

    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "update",
            "contact",
            "42",
            r#"{"a":1}"#,
            "--expect-version",
            "7",
        ],
        None,
    )
    .await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: ABORTED VERSION_CONFLICT: expected version 7, the entity is at 2\n"
    );

    let (status, _, stderr) =
        sb(address, &["entity", "update", "contact", "42", "[1]"], None).await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with(
            "error: invalid argument: the fields of entity contact.42 must be a JSON object"
        ),
        "{stderr}"
    );
    let (status, _, stderr) = sb(
        address,
        &["entity", "update", "contact", "42", "{nope"],
        None,
    )
    .await;
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with("error: invalid argument: the fields are not valid JSON: "),
        "{stderr}"
    );

    let (status, stdout, stderr) = sb(
        address,
        &[
            "entity",
            "delete",
            "contact",
            "42",
            "--timestamp",
            "99999999999999",
            "--writer",
            "janitor",
            "--expect-version",
            "2",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    let line = &json_lines(&stdout)[0];
    assert_eq!(
        (line["deleted"].clone(), line["version"].clone()),
        (true.into(), 3.into())
    );
    assert_eq!(line["fields"], serde_json::json!({}));
    assert_eq!(line["last_stamp"]["writer"], "janitor");

    let (status, stdout, stderr) = sb(address, &["entity", "get", "contact", "404"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: NOT_FOUND ENTITY_NOT_FOUND: no entity contact.404\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_entity_watch_prints_snapshot_and_changes() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    mock.state.lock().unwrap().watch_plans.push_back(WatchPlan {
        items: vec![
            entity_event(entity_event::Event::Snapshot(sample_entity(
                "1",
                4,
                r#"{"name":"Ada"}"#,
            ))),
            entity_event(entity_event::Event::SnapshotComplete(SnapshotComplete {
                entities: 1,
            })),
            entity_event(entity_event::Event::Change(sample_entity(
                "1",
                5,
                r#"{"name":"Ada L."}"#,
            ))),
            entity_event(entity_event::Event::Change(sample_entity(
                "2",
                1,
                r#"{"name":"Bob"}"#,
            ))),
            entity_event(entity_event::Event::Change(sample_entity(
                "3",
                1,
                r#"{"name":"Cy"}"#,
            ))),
        ],
        hold: true,
    });
    let (status, stdout, stderr) = sb(
        address,
        &["entity", "watch", "contact.*", "--count", "2"],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stderr, "sb: watching contact.*\n");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0]["event"], "snapshot");
    assert_eq!(lines[0]["fields"], serde_json::json!({"name": "Ada"}));
    assert_eq!(lines[0]["updated_at"], "2024-05-01T12:00:00.250Z");
    assert_eq!(
        stdout.lines().nth(1),
        Some(r#"{"event":"snapshot_complete","entities":1}"#)
    );
    assert_eq!(lines[2]["event"], "change");
    assert_eq!(
        (lines[2]["id"].clone(), lines[2]["version"].clone()),
        ("1".into(), 5.into())
    );
    assert_eq!(lines[3]["id"], "2");
    assert!(stdout.starts_with(r#"{"event":"snapshot","type":"contact","id":"1","#));

    // --count 0: the snapshot only (the default plan: the mock's entities, none here).
    let (status, stdout, stderr) =
        sb(address, &["entity", "watch", ">", "--count", "0"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, "{\"event\":\"snapshot_complete\",\"entities\":0}\n");

    // --timeout with nothing happening.
    let (status, stdout, _) = sb(
        address,
        &["entity", "watch", ">", "--timeout", "300ms"],
        None,
    )
    .await;
    assert_eq!((status, stdout.lines().count()), (0, 1));

    let (status, _, stderr) = sb(address, &["entity", "watch", "a b"], None).await;
    assert_eq!(status, 1);
    assert_eq!(
        stderr,
        "error: INVALID_ARGUMENT PATTERN_INVALID: pattern has a space\n"
    );
}

async fn next_subscription_event(
    subscription: &mut switchboard_client::Subscription,
) -> Result<SubscriptionEvent, Error> {
    tokio::time::timeout(WAIT, subscription.next_event())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
}

fn flow_options() -> SubscribeOptions {
    fast()
        .policy(FlowPolicy::DropOldest)
        .window(100)
        .throttle(Duration::from_millis(250))
        .max_unacked(8)
        .durable("billing")
        .ack_timeout(Duration::from_secs(30))
}

#[tokio::test]
async fn flow_options_are_sent_with_every_subscribe() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed_as(1, 11),
            delivery(1),
            delivery(2),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    // A durable consumer resumes after its acknowledged offset: 2 was not acknowledged, so it
    // comes again, and is not dropped as a duplicate.
    mock.plan(vec![subscribed_as(2, 12), delivery(2), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, flow_options())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, [1, 2, 2, 3]);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.pattern, "a.>");
        assert_eq!(
            request.policy,
            switchboard_client::proto::FlowPolicy::DropOldest as i32
        );
        assert_eq!(request.window, 100);
        assert_eq!(request.min_interval_ms, 250);
        assert_eq!(request.max_unacked, 8);
        assert_eq!(request.durable_name, "billing");
        assert_eq!(request.ack_timeout_ms, 30_000);
    }
    // Throttled, so it resumes from the confirmed offset (and the broker resumes a durable
    // consumer after its acknowledged offset whatever the start).
    assert_eq!(
        mock.starts(),
        [
            Some(Position::Earliest(Default::default())),
            Some(Position::Offset(1)),
        ]
    );

    // The defaults send nothing but the pattern and the start.
    let _plain = client.subscribe("b.>", Start::Latest).await.unwrap();
    let request = mock.requests().pop().unwrap();
    assert_eq!(
        (
            request.policy,
            request.window,
            request.min_interval_ms,
            request.max_unacked,
            request.durable_name.as_str(),
            request.ack_timeout_ms
        ),
        (0, 0, 0, 0, "", 0)
    );

    let empty = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            SubscribeOptions::default().durable(""),
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn redeliveries_and_throttled_deliveries_are_not_dropped() {
    let (mock, client) = start().await;
    // Not durable: a plain repeat is dropped, a redelivery is not.
    mock.plan(
        vec![
            subscribed(1),
            delivery(1),
            delivery(2),
            delivery(1),
            redelivery(1, 1),
            delivery(3),
        ],
        true,
    );
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    assert_eq!(offsets, [1, 2, 1, 3]);

    // Throttled: a trailing-edge delivery overtaken by another channel's comes out of order.
    mock.plan(
        vec![subscribed(5), delivery(7), delivery(5), delivery(8)],
        true,
    );
    let mut throttled = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            fast().throttle(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..3 {
        offsets.push(next_offset(&mut throttled).await);
    }
    assert_eq!(offsets, [7, 5, 8]);
}

#[tokio::test]
async fn a_throttled_subscription_resumes_from_what_has_settled() {
    let (mock, client) = start().await;
    mock.plan(
        vec![
            subscribed(5),
            delivery(7),
            delivery(5),
            Err(Status::unavailable("leader lost")),
        ],
        false,
    );
    mock.plan(vec![subscribed(5), delivery(6), delivery(7)], true);
    let mut subscription = client
        .subscribe_with(
            "a.>",
            Start::Latest,
            fast().throttle(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(next_offset(&mut subscription).await);
    }
    // Nothing settled (the deliveries were too recent): from the confirmed offset, and the
    // repeat of 7 is kept.
    assert_eq!(offsets, [7, 5, 6, 7]);
    assert_eq!(mock.starts()[1], Some(Position::Offset(5)));
}

#[tokio::test]
async fn a_gap_is_an_event_and_the_message_stream_skips_it() {
    let (mock, client) = start().await;
    let items = vec![
        subscribed(1),
        delivery(1),
        gap(2, 9, 5),
        delivery(10),
        delivery(11),
    ];
    mock.plan(items.clone(), true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let SubscriptionEvent::Message(first) =
        next_subscription_event(&mut subscription).await.unwrap()
    else {
        panic!("expected a message")
    };
    assert_eq!(first.offset, 1);
    let SubscriptionEvent::Gap(skipped) = next_subscription_event(&mut subscription).await.unwrap()
    else {
        panic!("expected a gap")
    };
    assert_eq!(
        (skipped.from_offset, skipped.to_offset, skipped.count),
        (2, 9, 5)
    );
    assert_eq!(skipped.reason(), GapReason::Dropped);
    {
        let mut events = subscription.events();
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(&event, SubscriptionEvent::Message(message) if message.offset == 10),
            "{event:?}"
        );
    }
    assert_eq!(next_offset(&mut subscription).await, 11);

    // As a stream of messages, the gap is skipped.
    mock.plan(items, true);
    let mut messages = client
        .subscribe_with("a.>", Start::Earliest, fast())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for _ in 0..3 {
        offsets.push(next_offset(&mut messages).await);
    }
    assert_eq!(offsets, [1, 10, 11]);
}

#[tokio::test]
async fn acks_go_out_with_the_current_subscription_id() {
    let mock = Mock::default();
    let proxy = Proxy::start(serve(mock.clone()).await).await;
    let client = Client::connect(proxy.address.to_string()).await.unwrap();
    mock.plan(vec![subscribed_as(1, 11), delivery(1), delivery(2)], true);
    mock.plan(vec![subscribed_as(3, 12), delivery(3)], true);
    let mut subscription = client
        .subscribe_with("a.>", Start::Earliest, fast().max_unacked(2))
        .await
        .unwrap();
    assert_eq!(subscription.id(), Some(11));
    let acker = subscription.acker();
    assert_eq!(acker.subscription_id(), Some(11));

    assert_eq!(next_offset(&mut subscription).await, 1);
    let answer = subscription.ack(1).await.unwrap();
    assert_eq!(answer.acked_offset, 1);
    // From another task, while the subscription is being read.
    let acking = tokio::spawn({
        let acker = acker.clone();
        async move { acker.ack_many(&[2]).await }
    });
    assert_eq!(next_offset(&mut subscription).await, 2);
    assert_eq!(acking.await.unwrap().unwrap().acked_offset, 2);

    proxy.cut();
    assert_eq!(next_offset(&mut subscription).await, 3);
    assert_eq!(subscription.id(), Some(12));
    assert_eq!(acker.subscription_id(), Some(12));
    acker.ack(3).await.unwrap();
    assert_eq!(mock.acks(), [(11, vec![1]), (11, vec![2]), (12, vec![3])]);

    // Once the subscription is gone, there is nothing to acknowledge with.
    drop(subscription);
    let ended = acker.ack(4).await.unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(acker.subscription_id(), None);
}

#[tokio::test]
async fn an_unknown_subscription_id_is_reported() {
    let (mock, client) = start().await;
    mock.plan(vec![subscribed_as(1, 404), delivery(1)], true);
    let mut subscription = client.subscribe("a.>", Start::Earliest).await.unwrap();
    assert_eq!(next_offset(&mut subscription).await, 1);
    let error = subscription.ack(1).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "NOT_FOUND SUBSCRIPTION_NOT_FOUND: no subscription 404"
    );
}

#[tokio::test]
async fn subscriptions_and_consumers_round_trip() {
    let (mock, client) = start().await;
    {
        let mut state = mock.state.lock().unwrap();
        state.subscriptions.push(SubscriptionInfo {
            subscription_id: 3,
            pattern: "a.>".to_owned(),
            durable_name: "billing".to_owned(),
            lagging: true,
            ..SubscriptionInfo::default()
        });
        state.consumers.push(consumer_info("billing"));
        state.consumers.push(consumer_info("audit"));
    }
    let subscriptions = client.list_subscriptions().await.unwrap();
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(
        (subscriptions[0].subscription_id, subscriptions[0].lagging),
        (3, true)
    );

    let names: Vec<String> = client
        .list_consumers()
        .await
        .unwrap()
        .into_iter()
        .map(|consumer| consumer.name)
        .collect();
    assert_eq!(names, ["billing", "audit"]);
    let billing = client.consumer("billing").await.unwrap();
    assert_eq!(billing.acked_offset, 41);
    assert_eq!(
        FlowPolicy::from_proto(billing.policy),
        Some(FlowPolicy::Conflate)
    );

    client.delete_consumer("billing").await.unwrap();
    let missing = client.consumer("billing").await.unwrap_err();
    assert_eq!(
        missing.to_string(),
        "NOT_FOUND CONSUMER_NOT_FOUND: no durable consumer \"billing\""
    );
    assert_eq!(
        client
            .delete_consumer("billing")
            .await
            .unwrap_err()
            .reason(),
        Some("CONSUMER_NOT_FOUND")
    );
    assert!(matches!(
        client.consumer("").await.unwrap_err(),
        Error::InvalidArgument(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_subscribe_acks_and_prints_gaps() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    let mut conflated = message(3);
    conflated.skipped = 4;
    conflated.redelivery = 1;
    mock.plan(
        vec![
            subscribed_as(1, 5),
            delivery(1),
            gap(2, 2, 1),
            Ok(SubscribeEvent {
                event: Some(subscribe_event::Event::Message(conflated)),
            }),
            delivery(4),
            delivery(5),
        ],
        true,
    );
    let (status, stdout, stderr) = sb(
        address,
        &[
            "subscribe",
            "a.>",
            "--from",
            "earliest",
            "--count",
            "3",
            "--ack",
            "--durable",
            "billing",
            "--max-unacked",
            "2",
            "--policy",
            "conflate",
            "--throttle",
            "250ms",
            "--ack-timeout",
            "30s",
        ],
        None,
    )
    .await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stderr,
        "sb: subscribed to a.> (next offset 1, subscription 5)\n"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(
        lines[1],
        r#"{"gap":{"from_offset":2,"to_offset":2,"count":1,"reason":"dropped"}}"#
    );
    let conflated = &json_lines(&stdout)[2];
    assert_eq!(
        (
            conflated["offset"].clone(),
            conflated["skipped"].clone(),
            conflated["redelivery"].clone()
        ),
        (3.into(), 4.into(), 1.into())
    );
    assert!(json_lines(&stdout)[0].get("skipped").is_none());
    assert_eq!(mock.acks(), [(5, vec![1]), (5, vec![3]), (5, vec![4])]);
    let request = mock.requests().pop().unwrap();
    assert_eq!(
        (
            request.durable_name.as_str(),
            request.max_unacked,
            request.policy,
            request.min_interval_ms,
            request.ack_timeout_ms
        ),
        (
            "billing",
            2,
            switchboard_client::proto::FlowPolicy::Conflate as i32,
            250,
            30_000
        )
    );

    // Without --ack nothing is acknowledged.
    mock.plan(vec![subscribed_as(1, 6), delivery(1)], true);
    let (status, _, stderr) = sb(address, &["subscribe", "a.>", "--count", "1"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(mock.acks().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_consumers_and_subscriptions() {
    let mock = Mock::default();
    let address = serve(mock.clone()).await;
    {
        let mut state = mock.state.lock().unwrap();
        state.consumers.push(consumer_info("billing"));
        state.consumers.push(consumer_info("audit"));
        state.subscriptions.push(SubscriptionInfo {
            subscription_id: 3,
            pattern: "a.>".to_owned(),
            policy: switchboard_client::proto::FlowPolicy::DropOldest as i32,
            next_offset: 11,
            delivered: 10,
            ..SubscriptionInfo::default()
        });
    }
    let (status, stdout, stderr) = sb(address, &["consumer", "list"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        stdout.lines().next(),
        Some(concat!(
            r#"{"name":"billing","pattern":"orders.>","policy":"conflate","acked_offset":41,"#,
            r#""pending":2,"redeliveries":1,"connected":true,"#,
            r#""created_at":"2024-05-01T12:00:00.250Z"}"#
        ))
    );
    assert_eq!(json_lines(&stdout)[1]["name"], "audit");

    let (status, stdout, _) = sb(address, &["consumer", "info", "audit"], None).await;
    assert_eq!(status, 0);
    assert_eq!(json_lines(&stdout)[0]["name"], "audit");

    let (status, stdout, _) = sb(address, &["consumer", "delete", "audit"], None).await;
    assert_eq!((status, stdout.as_str()), (0, "{\"deleted\":\"audit\"}\n"));
    let (status, stdout, stderr) = sb(address, &["consumer", "info", "audit"], None).await;
    assert_eq!((status, stdout.as_str()), (1, ""));
    assert_eq!(
        stderr,
        "error: NOT_FOUND CONSUMER_NOT_FOUND: no durable consumer \"audit\"\n"
    );

    let (status, stdout, stderr) = sb(address, &["subscriptions"], None).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        json_lines(&stdout),
        [serde_json::json!({
            "subscription_id": 3, "pattern": "a.>", "policy": "drop-oldest", "durable_name": "",
            "next_offset": 11, "lagging": false, "buffered_messages": 0, "buffered_bytes": 0,
            "peak_buffered_bytes": 0, "buffered_bytes_limit": 0, "pending": 0, "delivered": 10,
            "slow_switches": 0, "waiting_for_credit": false,
        })]
    );
}
