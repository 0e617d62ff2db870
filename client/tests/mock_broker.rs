//! The client against an in-process mock broker (no real broker needed): errors through the wire,
//! publishing, history paging, and above all the subscription's resume logic, including a real
//! connection cut through a TCP proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use switchboard_client::proto::{
    HistoryRequest, HistoryResponse, Message, PublishAck, PublishRequest, PublishStreamAck,
    Refusal, SubscribeEvent, SubscribeRequest, Subscribed,
};
use switchboard_client::{
    split_stream_ack, Client, Error, HistoryQuery, Publish, Start, SubscribeOptions,
};
use switchboard_proto::v1::broker_server::{Broker, BrokerServer};
use switchboard_proto::v1::start_position::Position;
use switchboard_proto::v1::{publish_stream_ack, subscribe_event, InfoRequest, InfoResponse};
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

fn subscribed(next_offset: u64) -> Result<SubscribeEvent, Status> {
    Ok(SubscribeEvent {
        event: Some(subscribe_event::Event::Subscribed(Subscribed {
            next_offset,
        })),
    })
}

fn refused(code: Code, reason: &str, message: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "switchboard", HashMap::new()),
    )
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
}

async fn serve(mock: Mock) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BrokerServer::new(mock))
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
    assert_eq!(stderr, "sb: subscribed to a.> (next offset 1)\n");
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
