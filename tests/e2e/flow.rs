//! Per-consumer flow control, through the raw gRPC contract: a stalled consumer isolated with
//! bounded memory, conflation, throttling, DROP_OLDEST gaps, credits, durable consumers, limits.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use switchboard_e2e::{eventually, http_get, BrokerProcess, DEADLINE};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::Code;

use crate::common::*;

type Events = tonic::Streaming<pb::SubscribeEvent>;

fn config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("flow.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Opens a subscription; returns its stream and its `Subscribed` event.
async fn open(raw: &mut Raw, request: pb::SubscribeRequest) -> (Events, pb::Subscribed) {
    let mut events = raw
        .subscribe(request)
        .await
        .expect("subscribes")
        .into_inner();
    match next(&mut events).await {
        pb::subscribe_event::Event::Subscribed(s) => (events, s),
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

async fn next(events: &mut Events) -> pb::subscribe_event::Event {
    match tokio::time::timeout(DEADLINE, events.message()).await {
        Ok(Ok(Some(pb::SubscribeEvent { event: Some(event) }))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn subscribe(pattern: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        pattern: pattern.into(),
        ..Default::default()
    }
}

fn from_earliest(mut request: pb::SubscribeRequest) -> pb::SubscribeRequest {
    request.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Earliest(pb::Earliest {})),
    });
    request
}

async fn subscription_info(raw: &mut Raw, id: u64) -> pb::SubscriptionInfo {
    raw.list_subscriptions(pb::ListSubscriptionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .subscriptions
        .into_iter()
        .find(|s| s.subscription_id == id)
        .expect("the subscription is listed")
}

/// A JSON payload of about 1 KiB carrying `value`: large enough that a stalled consumer's HTTP/2
/// windows fill and the broker, not the transport, has to hold (or drop) messages.
fn padded(value: usize) -> String {
    format!("{{\"v\":{value},\"pad\":\"{}\"}}", "x".repeat(1000))
}

fn value_of(m: &pb::Message) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["v"].as_u64().unwrap()
}

fn message(event: pb::subscribe_event::Event) -> pb::Message {
    match event {
        pb::subscribe_event::Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stalled_subscriber_slows_nobody_stays_within_its_buffer_and_then_gets_everything() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    // The stalled subscriber: opened, then not read at all while 100,000 messages are published.
    let (mut stalled, stalled_sub) = open(&mut client, subscribe("bulk.>")).await;

    let total = 100_000usize;
    let payloads = (0..total)
        .map(|i| (format!("bulk.c{}", i % 10), i.to_string()))
        .collect();
    let offsets = publish_all(&mut client, payloads).await;

    // Another subscriber reads every message, in order.
    let mut reader = raw(f.broker.url()).await;
    let mut request = subscribe("bulk.>");
    request.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Offset(offsets[0])),
    });
    let (mut events, _) = open(&mut reader, request).await;
    for (i, expected) in offsets.iter().enumerate() {
        let m = message(next(&mut events).await);
        assert_eq!(m.offset, *expected, "second subscriber, message {i}");
    }

    // The broker's own accounting: the stalled subscriber never held more than its bound, and was
    // switched to the store instead.
    let info = subscription_info(&mut client, stalled_sub.subscription_id).await;
    assert!(
        info.peak_buffered_bytes <= info.buffered_bytes_limit,
        "{info:?}"
    );
    assert!(
        info.slow_switches >= 1,
        "it fell behind and was served from the store: {info:?}"
    );

    // And it still gets all 100,000, in order.
    for (i, expected) in offsets.iter().enumerate() {
        let m = message(next(&mut stalled).await);
        assert_eq!(m.offset, *expected, "stalled subscriber, message {i}");
    }
}

#[tokio::test]
async fn conflation_delivers_the_final_value_of_every_channel_and_counts_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(&[
        "--config",
        &config(&dir, "[subscriptions]\nqueue_depth = 4\n"),
    ])
    .await;
    let mut client = raw(f.broker.url()).await;
    let mut request = subscribe("price.>");
    request.policy = pb::FlowPolicy::Conflate as i32;
    let (mut events, _) = open(&mut client, request).await;

    let per_channel = 2_000;
    let payloads = (0..per_channel * 5)
        .map(|i| (format!("price.s{}", i % 5), padded(i / 5)))
        .collect();
    publish_all(&mut client, payloads).await;

    // Read until every channel has shown its final value.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut accounted: HashMap<String, u64> = HashMap::new();
    let mut deliveries = 0;
    while last.len() < 5 || last.values().any(|v| *v != per_channel as u64 - 1) {
        let m = message(next(&mut events).await);
        deliveries += 1;
        *accounted.entry(m.channel.clone()).or_default() += 1 + m.skipped;
        last.insert(m.channel.clone(), value_of(&m));
    }
    assert!(
        deliveries < per_channel * 5,
        "conflation skipped something ({deliveries} deliveries)"
    );
    for (channel, n) in accounted {
        assert_eq!(
            n, per_channel as u64,
            "{channel}: deliveries plus skipped add up"
        );
    }
}

#[tokio::test]
async fn a_throttled_subscriber_gets_the_latest_value_on_the_trailing_edge() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let mut request = subscribe("ui.>");
    request.min_interval_ms = 300;
    let (mut events, _) = open(&mut client, request).await;

    publish_all(
        &mut client,
        (1..=10)
            .map(|i| ("ui.counter".to_owned(), i.to_string()))
            .collect(),
    )
    .await;
    let mut got = Vec::new();
    let mut accounted = 0;
    loop {
        let m = message(next(&mut events).await);
        accounted += 1 + m.skipped;
        got.push(payload_text(&m));
        if got.last().map(String::as_str) == Some("10") {
            break;
        }
    }
    assert_eq!(
        got.first().map(String::as_str),
        Some("1"),
        "the first value goes at once"
    );
    assert!(got.len() < 10, "values were coalesced: {got:?}");
    assert_eq!(
        accounted, 10,
        "every value is delivered or counted as skipped"
    );
}

#[tokio::test]
async fn drop_oldest_announces_gaps_whose_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(&[
        "--config",
        &config(&dir, "[subscriptions]\nqueue_depth = 4\n"),
    ])
    .await;
    let mut client = raw(f.broker.url()).await;
    let mut request = subscribe("drop.>");
    request.policy = pb::FlowPolicy::DropOldest as i32;
    request.window = 20;
    let (mut events, _) = open(&mut client, request).await;

    let total = 5_000;
    let offsets = publish_all(
        &mut client,
        (0..total)
            .map(|i| ("drop.x".to_owned(), padded(i)))
            .collect(),
    )
    .await;
    let final_offset = *offsets.last().unwrap();
    let (mut delivered, mut dropped, mut last_seen) = (0u64, 0u64, 0u64);
    while last_seen < final_offset {
        match next(&mut events).await {
            pb::subscribe_event::Event::Message(m) => {
                assert!(m.offset > last_seen, "in order");
                last_seen = m.offset;
                delivered += 1;
            }
            pb::subscribe_event::Event::Gap(g) => {
                assert!(
                    g.from_offset > last_seen && g.to_offset >= g.from_offset,
                    "{g:?}"
                );
                assert_eq!(g.reason, pb::gap::Reason::Dropped as i32);
                last_seen = g.to_offset;
                dropped += g.count;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(dropped > 0, "the stalled consumer lost something");
    assert_eq!(
        delivered + dropped,
        total as u64,
        "gaps and deliveries add up"
    );
}

#[tokio::test]
async fn credits_hold_deliveries_until_acknowledged() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let mut request = subscribe("credit.>");
    request.max_unacked = 3;
    let (mut events, sub) = open(&mut client, request).await;
    let offsets = publish_all(
        &mut client,
        (0..10)
            .map(|i| ("credit.x".to_owned(), i.to_string()))
            .collect(),
    )
    .await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(message(next(&mut events).await).offset);
    }
    assert_eq!(got, offsets[..3].to_vec());
    // The broker holds the other seven back, waiting for credits, not on the wire.
    let mut lister = client.clone();
    let id = sub.subscription_id;
    let info = eventually("the subscription to wait for credits", || {
        let mut lister = lister.clone();
        async move {
            let info = subscription_info(&mut lister, id).await;
            info.waiting_for_credit.then_some(info)
        }
    })
    .await
    .unwrap();
    assert_eq!((info.pending, info.delivered), (3, 3));
    let ack = lister
        .ack(pb::AckRequest {
            subscription_id: id,
            offsets: vec![offsets[0]],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.pending, 2);
    assert_eq!(message(next(&mut events).await).offset, offsets[3]);
}

#[tokio::test]
async fn a_durable_consumer_resumes_after_its_last_ack_and_gets_unacked_messages_again() {
    let mut f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let durable = |timeout_ms| {
        let mut r = from_earliest(subscribe("dur.>"));
        r.durable_name = "panel-7".into();
        r.ack_timeout_ms = timeout_ms;
        r
    };
    let offsets = publish_all(
        &mut client,
        (0..10)
            .map(|i| ("dur.events".to_owned(), i.to_string()))
            .collect(),
    )
    .await;

    let (mut events, sub) = open(&mut client, durable(0)).await;
    assert_eq!(sub.acked_offset, 0);
    let got: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(message(next(&mut events).await).offset);
        }
        v
    };
    assert_eq!(got, offsets[..5].to_vec());
    let ack = client
        .ack(pb::AckRequest {
            subscription_id: sub.subscription_id,
            offsets: offsets[..3].to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.acked_offset, offsets[2]);

    // The consumer dies mid-stream, and so does the broker.
    drop(events);
    f.broker.kill9();
    f.broker.restart(&[]).unwrap();
    let mut client = raw(f.broker.url()).await;

    // Reconnecting with the same name resumes after the last acknowledgement: 4 and 5, which were
    // delivered but never acknowledged, come again.
    let (mut events, sub) = open(&mut client, durable(300)).await;
    assert_eq!(sub.acked_offset, offsets[2]);
    assert_eq!(sub.next_offset, offsets[3]);
    let mut again = Vec::new();
    for _ in 3..10 {
        again.push(message(next(&mut events).await).offset);
    }
    assert_eq!(again, offsets[3..].to_vec());

    // Nothing is acknowledged now: after the ack timeout the oldest is redelivered.
    let redelivered = message(next(&mut events).await);
    assert_eq!(
        (redelivered.offset, redelivered.redelivery),
        (offsets[3], 1)
    );

    let info = client
        .get_consumer(pb::GetConsumerRequest {
            name: "panel-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.connected);
    assert_eq!(info.acked_offset, offsets[2]);
    assert_eq!(info.pending, 7);
    assert!(info.redeliveries >= 1);

    // Deleting the consumer ends its subscription and forgets it.
    client
        .delete_consumer(pb::DeleteConsumerRequest {
            name: "panel-7".into(),
        })
        .await
        .unwrap();
    let end = loop {
        match tokio::time::timeout(DEADLINE, events.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(end.map(|s| s.code()), Some(Code::FailedPrecondition));
    let missing = client
        .get_consumer(pb::GetConsumerRequest {
            name: "panel-7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn subscriptions_past_a_limit_are_refused_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(&[
        "--config",
        &config(
            &dir,
            "[subscriptions]\nmax_per_connection = 2\nmax_per_broker = 3\n",
        ),
    ])
    .await;
    let mut one = raw(f.broker.url()).await;
    let _a = open(&mut one, subscribe("lim.a")).await;
    let _b = open(&mut one, subscribe("lim.b")).await;
    let Err(err) = one.subscribe(subscribe("lim.c")).await else {
        panic!("refused per connection");
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        switchboard_client::Error::from(err).reason(),
        Some(switchboard_client::Reason::SubscriptionLimit)
    );

    let mut two = raw(f.broker.url()).await;
    let _c = open(&mut two, subscribe("lim.c")).await;
    let Err(err) = two.subscribe(subscribe("lim.d")).await else {
        panic!("refused per broker");
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_message_that_expires_while_held_for_a_credit_is_never_delivered() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let mut request = subscribe("held.>");
    request.max_unacked = 1;
    let (mut events, sub) = open(&mut client, request).await;
    let first = f
        .client
        .publish(switchboard_client::Publish::new("held.a", "{}"))
        .await
        .unwrap()
        .offset;
    f.client
        .publish(
            switchboard_client::Publish::new("held.b", "{}")
                .ttl(std::time::Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!(message(next(&mut events).await).offset, first);
    // The second waits for a credit until it has expired (History no longer returns it).
    eventually("the short-lived message to expire", || async {
        let left = f
            .client
            .history_all(
                switchboard_client::HistoryQuery::new("held.b")
                    .from(switchboard_client::Start::Earliest),
                10,
            )
            .await
            .ok()?;
        left.is_empty().then_some(())
    })
    .await
    .unwrap();
    client
        .ack(pb::AckRequest {
            subscription_id: sub.subscription_id,
            offsets: vec![first],
        })
        .await
        .unwrap();
    let last = f
        .client
        .publish(switchboard_client::Publish::new("held.c", "{}"))
        .await
        .unwrap()
        .offset;
    assert_eq!(
        message(next(&mut events).await).offset,
        last,
        "the expired message is skipped"
    );
}

/// A counter or gauge without labels, from the broker's /metrics.
async fn metric(broker: &BrokerProcess, name: &str) -> Option<u64> {
    let scrape = http_get(&format!("{}/metrics", broker.admin_url()))
        .await
        .ok()?;
    scrape.body.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Stops the reading of [`StallingSocket`]s, and lets it go on.
#[derive(Default)]
struct Stall {
    stalled: AtomicBool,
    readers: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl Stall {
    fn stop_reading(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }

    fn read_again(&self) {
        self.stalled.store(false, Ordering::Relaxed);
        for reader in std::mem::take(&mut *self.readers.lock().unwrap()) {
            reader.wake();
        }
    }
}

/// A socket whose reading stops while its [`Stall`] says so: the client then takes no byte, as a
/// client that stopped reading would.
struct StallingSocket {
    stream: tokio::net::TcpStream,
    stall: Arc<Stall>,
}

impl AsyncRead for StallingSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.stall.stalled.load(Ordering::Relaxed) {
            self.stall.readers.lock().unwrap().push(cx.waker().clone());
            if self.stall.stalled.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallingSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A client on its own connection that advertises the largest HTTP/2 windows and a small socket
/// receive buffer, and stops reading its socket while `stall` says so.
async fn stalling_client(url: &str, stall: Arc<Stall>) -> Raw {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let stall = Arc::clone(&stall);
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(4096)?;
            let stream = socket.connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(StallingSocket {
                stream,
                stall,
            }))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .connect_with_connector(connector)
        .await
        .expect("connects");
    BrokerClient::new(channel)
}

/// 4 stalling clients with 8 subscriptions on `bulk.>` each, whose reading then stops: their
/// streams, and the clients (the connections live as long as they do).
async fn stalled_subscriptions(url: &str, stall: &Arc<Stall>) -> (Vec<Events>, Vec<Raw>) {
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = stalling_client(url, Arc::clone(stall)).await;
        for _ in 0..8 {
            streams.push(open(&mut client, subscribe("bulk.>")).await.0);
        }
        clients.push(client);
    }
    stall.stop_reading();
    (streams, clients)
}

/// Publishes 3,000 padded messages (~1 KiB each) over `bulk.c0`..`bulk.c9`; their offsets.
async fn publish_bulk(url: &str) -> Vec<u64> {
    let mut publisher = raw(url.to_owned()).await;
    let payloads = (0..3_000)
        .map(|i| (format!("bulk.c{}", i % 10), padded(i)))
        .collect();
    publish_all(&mut publisher, payloads).await
}

#[tokio::test]
async fn connections_that_stop_reading_are_closed_once_send_buffers_pass_their_bound() {
    let dir = tempfile::tempdir().unwrap();
    let settings =
        "[limits]\nmax_send_buffer_bytes = 1048576\nstalled_connection_timeout = \"500ms\"\n";
    let f = fixture(&["--config", &config(&dir, settings)]).await;
    let stall = Arc::new(Stall::default());
    let (stalled_streams, _stalled_clients) = stalled_subscriptions(&f.broker.url(), &stall).await;
    let mut reader = raw(f.broker.url()).await;
    let (mut reading, _) = open(&mut reader, subscribe("bulk.>")).await;

    // About 3 MB, for each of the 32 stalled subscriptions: without a bound, HTTP/2 would keep
    // up to ~400 KiB of it per stream once the sockets stop taking any.
    let offsets = publish_bulk(&f.broker.url()).await;

    // A client that reads is served in full, in order, whatever the stalled ones do.
    for expected in &offsets {
        assert_eq!(message(next(&mut reading).await).offset, *expected);
    }
    let broker = &f.broker;
    eventually(
        "stalled connections closed and send buffers back under their bound",
        || async {
            let closed = metric(broker, "switchboard_stalled_connections_closed_total").await?;
            let waiting = metric(broker, "switchboard_send_buffered_bytes").await?;
            (closed >= 1 && waiting <= 1024 * 1024).then_some(())
        },
    )
    .await
    .unwrap();
    drop(stalled_streams);
}

#[tokio::test]
async fn a_connection_that_stops_reading_is_held_to_a_share_of_the_bound_and_resumes_without_a_gap()
{
    let dir = tempfile::tempdir().unwrap();
    // The watcher never closes anyone here (1 h): only the gate keeps the buffers bounded.
    let settings = "[limits]\nmax_send_buffer_bytes = 1048576\n\
                    stalled_connection_timeout = \"1h\"\n\
                    [subscriptions]\ncatch_up_bytes = 1048576\n";
    let f = fixture(&["--config", &config(&dir, settings)]).await;
    let stall = Arc::new(Stall::default());
    let (stalled_streams, stalled_clients) = stalled_subscriptions(&f.broker.url(), &stall).await;
    let mut reader = raw(f.broker.url()).await;
    let (mut reading, _) = open(&mut reader, subscribe("bulk.>")).await;

    // About 3 MB for each of the 32 stalled subscriptions: without the gate HTTP/2 would keep up
    // to ~400 KiB of it per stream (~12 MB), with it the stalled connections hold at most the
    // bound plus, each, their floor (256 KiB) and one chunk of a response (32 KiB and a message).
    let offsets = publish_bulk(&f.broker.url()).await;
    for expected in &offsets {
        assert_eq!(message(next(&mut reading).await).offset, *expected);
    }
    let waiting = metric(&f.broker, "switchboard_send_buffered_bytes")
        .await
        .unwrap();
    let bound = 1024 * 1024 + 4 * (256 + 34) * 1024;
    assert!(
        waiting <= bound,
        "{waiting} bytes wait for the stalled sockets, bound {bound}"
    );
    let held = metric(&f.broker, "switchboard_catch_up_held_bytes")
        .await
        .unwrap();
    let bound = 1024 * 1024 + 32 * (32 + 2) * 1024;
    assert!(
        held <= bound,
        "{held} bytes read from the store held for the stalled subscriptions, bound {bound}"
    );

    // Once their clients read again, every stalled subscription gets everything, in order.
    stall.read_again();
    let last = *offsets.last().unwrap();
    let mut readers = tokio::task::JoinSet::new();
    for mut events in stalled_streams {
        let offsets = offsets.clone();
        readers.spawn(async move {
            let mut got = Vec::new();
            while got.last() != Some(&last) {
                got.push(message(next(&mut events).await).offset);
            }
            assert_eq!(got, offsets, "no gap and no duplicate");
        });
    }
    while let Some(done) = readers.join_next().await {
        done.unwrap();
    }
    drop(stalled_clients);
}
