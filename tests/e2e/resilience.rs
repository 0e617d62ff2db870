//! Issue 24, publishers that ride out outages: retries under idempotency keys through a broker
//! restart and a leader kill (every message stored once, in order), the circuit breaker (opens,
//! fails fast, half-opens, closes), the outbox (bounded, flushed in order), refusals that are not
//! retried, and `sb publish --retry`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_client::{
    CircuitPolicy, CircuitState, Client, ConnectOptions, Error, HistoryQuery, OutboxOptions,
    Publish, PublishAck, PublishErrorKind, Reason, RetryPolicy, Start,
};
use switchboard_e2e::{eventually, sb_binary, start_cluster, BrokerProcess, DEADLINE};

use crate::common::*;
use crate::observability::scrape;

/// Retries with short backoffs, so the tests spend their time on the outage, not on waiting.
fn retrying() -> RetryPolicy {
    RetryPolicy::within(Duration::from_secs(30))
        .backoff(Duration::from_millis(20), Duration::from_millis(500))
}

async fn start_broker(dir: &tempfile::TempDir) -> BrokerProcess {
    BrokerProcess::start(&dir.path().join("data"), &[]).expect("broker starts")
}

/// The payloads stored on `channel`, in offset order, with their offsets.
async fn stored_on(client: &Client, channel: &str) -> Vec<(u64, String)> {
    client
        .history_all(HistoryQuery::new(channel).from(Start::Earliest), 100_000)
        .await
        .expect("history")
        .iter()
        .map(|m| (m.offset, payload_text(m)))
        .collect()
}

/// Every message of `0..n` stored exactly once, in order, at the offsets its acks named.
fn assert_stored_once_in_order(stored: &[(u64, String)], acks: &[PublishAck], n: u64) {
    let payloads: Vec<&str> = stored.iter().map(|(_, p)| p.as_str()).collect();
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "every message stored once, in order");
    let acked: Vec<u64> = acks.iter().map(|a| a.offset).collect();
    let offsets: Vec<u64> = stored.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        acked, offsets,
        "each ack names the offset its message is stored at"
    );
}

/// Publishes `0..n` on `channel` one after the other with `client` (whose policy retries), and
/// counts the acks in `acked`.
fn spawn_publisher(
    client: Client,
    channel: &'static str,
    n: u64,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<PublishAck>> {
    tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..n {
            let ack = client
                .publish(Publish::new(channel, i.to_string()))
                .await
                .unwrap_or_else(|e| panic!("message {i} not published: {e}"));
            acks.push(ack);
            acked.store(i + 1, Ordering::SeqCst);
        }
        acks
    })
}

/// Sends `0..n` on `channel` through a [`Client::publisher`] stream of `client` (whose policy
/// retries), and collects the answers (counted in `acked`): each must be an ack, in send order.
fn spawn_stream_publisher(
    client: &Client,
    channel: &'static str,
    n: u64,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<PublishAck>> {
    let (publisher, mut answers) = client.publisher(32);
    tokio::spawn(async move {
        for i in 0..n {
            publisher
                .send(Publish::new(channel, i.to_string()))
                .await
                .unwrap();
        }
    });
    tokio::spawn(async move {
        let mut acks = Vec::new();
        while let Some(answer) = futures::StreamExt::next(&mut answers).await {
            let answer =
                answer.unwrap_or_else(|e| panic!("stream failed after {}: {e}", acks.len()));
            let (sequence, outcome) = switchboard_client::split_stream_ack(answer);
            assert_eq!(sequence, acks.len() as u64, "answers in send order");
            acks.push(outcome.unwrap_or_else(|e| panic!("message {sequence} refused: {e}")));
            acked.store(acks.len() as u64, Ordering::SeqCst);
        }
        acks
    })
}

async fn wait_acked(acked: &AtomicU64, n: u64) {
    eventually(&format!("{n} messages acknowledged"), || async {
        (acked.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retrying_publisher_rides_out_a_broker_restart_storing_every_message_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let options = ConnectOptions::default().retry(retrying());
    let client = Client::connect_with(broker.url(), options).await.unwrap();

    const N: u64 = 300;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = spawn_publisher(client.clone(), "resilience.restart.tick", N, acked.clone());
    wait_acked(&acked, 50).await;
    // kill -9, then the same address and data again: the publisher is mid-run.
    broker.restart(&[]).unwrap();
    let at_restart = acked.load(Ordering::SeqCst);
    let acks = tokio::time::timeout(DEADLINE, publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    assert!(
        at_restart < N,
        "the publisher was done before the restart: nothing was tested"
    );

    let stored = stored_on(&client, "resilience.restart.tick").await;
    assert_stored_once_in_order(&stored, &acks, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_stream_resumes_across_a_broker_restart_storing_every_message_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let options = ConnectOptions::default().retry(retrying());
    let client = Client::connect_with(broker.url(), options).await.unwrap();

    const N: u64 = 3000;
    let acked = Arc::new(AtomicU64::new(0));
    let answers = spawn_stream_publisher(&client, "resilience.stream.tick", N, acked.clone());
    wait_acked(&acked, 200).await;
    broker.restart(&[]).unwrap();
    let at_restart = acked.load(Ordering::SeqCst);
    let acks = tokio::time::timeout(DEADLINE, answers)
        .await
        .expect("every message answered")
        .unwrap();
    assert!(
        at_restart < N,
        "the stream was done before the restart: nothing was tested"
    );
    let stored = stored_on(&client, "resilience.stream.tick").await;
    assert_stored_once_in_order(&stored, &acks, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_stream_goes_through_the_circuit_breaker_and_waits_out_an_open_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let options = ConnectOptions::default()
        .retry(retrying())
        .circuit_breaker(CircuitPolicy::new(2, Duration::from_millis(200)));
    let client = Client::connect_with(broker.url(), options).await.unwrap();

    const N: u64 = 1000;
    let acked = Arc::new(AtomicU64::new(0));
    let stream = spawn_stream_publisher(&client, "resilience.stream.circuit", N, acked.clone());
    wait_acked(&acked, 100).await;
    broker.kill9();
    // The streams that fail while the broker is away open the circuit.
    eventually("the circuit open", || async {
        (client.circuit_state() != Some(CircuitState::Closed)).then_some(())
    })
    .await
    .unwrap();
    let at_open = acked.load(Ordering::SeqCst);
    broker.restart(&[]).unwrap();
    let acks = tokio::time::timeout(DEADLINE, stream)
        .await
        .expect("the stream finishes")
        .unwrap();
    assert!(at_open < N, "the stream was done before the circuit opened");
    assert_eq!(client.circuit_state(), Some(CircuitState::Closed));
    let stored = stored_on(&client, "resilience.stream.circuit").await;
    assert_stored_once_in_order(&stored, &acks, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_the_message_are_not_retried() {
    let f = fixture(&[]).await;
    let client = Client::connect_with(f.broker.url(), ConnectOptions::default().retry(retrying()))
        .await
        .unwrap();

    let cases = [
        (
            Publish::new("resilience..bad", "{}"),
            Reason::ChannelInvalid,
        ),
        (
            Publish::new("resilience.refused.json", "not json"),
            Reason::PayloadNotJson,
        ),
    ];
    for (message, reason) in cases {
        let error = client.publish(message).await.expect_err("refused");
        assert_eq!(error.reason(), Some(reason), "{error}");
        assert_eq!(error.publish_kind(), PublishErrorKind::Invalid);
    }
    // The broker counted one refusal of each: the client sent each message once. (The client
    // returned, so no attempt is still on its way.)
    let scrape = eventually("the refusals counted", || async {
        let scrape = scrape(&f.broker).await;
        let counted = |reason| {
            scrape.sum(
                "switchboard_publishes_total",
                &[("result", "refused"), ("reason", reason)],
            )
        };
        (counted("CHANNEL_INVALID") >= 1.0 && counted("PAYLOAD_NOT_JSON") >= 1.0).then_some(scrape)
    })
    .await
    .unwrap();
    for reason in ["CHANNEL_INVALID", "PAYLOAD_NOT_JSON"] {
        assert_eq!(
            scrape.sum(
                "switchboard_publishes_total",
                &[("result", "refused"), ("reason", reason)]
            ),
            1.0,
            "{reason} sent once"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_opens_fails_fast_half_opens_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let mut options = ConnectOptions::default()
        .circuit_breaker(CircuitPolicy::new(3, Duration::from_millis(200)));
    // The probe below meets a frozen broker: it must wait for it, not time out.
    options.connect_timeout = Duration::from_secs(60);
    let client = Client::connect_with(broker.url(), options).await.unwrap();
    assert_eq!(client.circuit_state(), Some(CircuitState::Closed));
    client
        .publish(Publish::new("resilience.circuit.tick", "0"))
        .await
        .unwrap();

    // Down: three failures of the endpoint open the circuit.
    broker.kill9();
    for attempt in 0..3 {
        let error = client
            .publish(Publish::new("resilience.circuit.tick", "1"))
            .await
            .expect_err("the broker is down");
        assert!(
            !matches!(error, Error::CircuitOpen { .. }),
            "attempt {attempt}: {error}"
        );
        assert_eq!(error.publish_kind(), PublishErrorKind::Unavailable);
    }
    assert_eq!(client.circuit_state(), Some(CircuitState::Open));
    // Open: the call fails at once, without being sent, with an error of its own.
    let error = client
        .publish(Publish::new("resilience.circuit.tick", "1"))
        .await
        .expect_err("the circuit is open");
    match &error {
        Error::CircuitOpen { url, retry_in } => {
            assert_eq!(url, &broker.url());
            assert!(*retry_in <= Duration::from_millis(200), "{retry_in:?}");
        }
        other => panic!("not a circuit error: {other}"),
    }
    assert_eq!(error.publish_kind(), PublishErrorKind::Unavailable);

    // Back on the same address, but frozen (SIGSTOP): the probe that goes through once the
    // cooldown is over waits for an answer, and meanwhile the circuit is half open.
    broker.restart(&[]).unwrap();
    let pid = i32::try_from(broker.pid().unwrap()).unwrap();
    BrokerProcess::signal_pid(pid, libc::SIGSTOP).unwrap();
    let probe = tokio::spawn({
        let client = client.clone();
        async move {
            loop {
                match client
                    .publish(Publish::new("resilience.circuit.tick", "2"))
                    .await
                {
                    // Not yet: wait out the cooldown it names.
                    Err(Error::CircuitOpen { retry_in, .. }) => {
                        tokio::time::sleep(retry_in.max(Duration::from_millis(5))).await
                    }
                    outcome => return outcome,
                }
            }
        }
    });
    eventually("the circuit half open", || async {
        (client.circuit_state() == Some(CircuitState::HalfOpen)).then_some(())
    })
    .await
    .unwrap();
    // Only the probe goes through: the others still fail fast.
    match client
        .publish(Publish::new("resilience.circuit.tick", "x"))
        .await
    {
        Err(Error::CircuitOpen { retry_in, .. }) => assert_eq!(retry_in, Duration::ZERO),
        other => panic!("a second call went through a half-open circuit: {other:?}"),
    }
    BrokerProcess::signal_pid(pid, libc::SIGCONT).unwrap();
    let ack = tokio::time::timeout(DEADLINE, probe)
        .await
        .expect("the probe is answered")
        .unwrap()
        .expect("the probe is stored");
    assert_eq!(client.circuit_state(), Some(CircuitState::Closed));
    let next = client
        .publish(Publish::new("resilience.circuit.tick", "3"))
        .await
        .unwrap();
    assert!(next.offset > ack.offset);
    let payloads: Vec<String> = stored_on(&client, "resilience.circuit.tick")
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(payloads, ["0", "2", "3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_is_bounded_and_flushes_in_order_once_the_broker_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let options = ConnectOptions::default()
        .circuit_breaker(CircuitPolicy::new(3, Duration::from_millis(100)));
    let client = Client::connect_with(broker.url(), options).await.unwrap();
    broker.kill9();

    // Bounded by count: 20 queue while the broker is down, the 21st is refused.
    const N: u64 = 20;
    let outbox = client.outbox(
        OutboxOptions::default()
            .max_messages(N as usize)
            .backoff(Duration::from_millis(10), Duration::from_millis(200)),
    );
    let receipts: Vec<_> = (0..N)
        .map(|i| {
            outbox
                .publish(Publish::new("resilience.outbox.tick", i.to_string()))
                .expect("room in the outbox")
        })
        .collect();
    let keys: std::collections::HashSet<&str> =
        receipts.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(keys.len(), N as usize, "every message has a key of its own");
    match outbox.publish(Publish::new("resilience.outbox.tick", "overflow")) {
        Err(Error::OutboxFull {
            messages,
            max_messages,
            ..
        }) => assert_eq!((messages, max_messages), (N as usize, N as usize)),
        other => panic!("a full outbox took another message: {other:?}"),
    }
    assert_eq!(outbox.len(), N as usize);
    // Its sends go through the circuit breaker, which opens while the broker is away.
    eventually("the circuit open", || async {
        (client.circuit_state() == Some(CircuitState::Open)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(outbox.len(), N as usize, "nothing is dropped while down");

    // Bounded by bytes too: three messages of about 320 encoded bytes fit in 1100, the fourth
    // does not.
    let small = client.outbox(OutboxOptions::default().max_bytes(1100));
    let payload = format!("\"{}\"", "x".repeat(250));
    for _ in 0..3 {
        small
            .publish(Publish::new("resilience.outbox.bytes", payload.clone()))
            .expect("room for three");
    }
    let error = small
        .publish(Publish::new("resilience.outbox.bytes", payload.clone()))
        .expect_err("no room for a fourth");
    assert!(
        matches!(error, Error::OutboxFull { messages: 3, .. }),
        "{error}"
    );
    assert!(small.bytes() <= 1100);
    drop(small);

    // Back: everything queued is stored once, in order.
    broker.restart(&[]).unwrap();
    tokio::time::timeout(DEADLINE, outbox.flushed())
        .await
        .expect("the outbox flushes");
    let mut acks = Vec::new();
    for receipt in receipts {
        acks.push(receipt.await.expect("stored"));
    }
    let stored = stored_on(&client, "resilience.outbox.tick").await;
    assert_stored_once_in_order(&stored, &acks, N);
    assert_eq!(client.circuit_state(), Some(CircuitState::Closed));
    // And there is room again.
    outbox
        .publish(Publish::new("resilience.outbox.tick", "\"after\""))
        .expect("room again")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retrying_publisher_rides_out_a_leader_kill_storing_every_message_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let first = Client::connect(nodes[0].url()).await.unwrap();
    let status = eventually("a leader", || async {
        let status = first.cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(status)
    })
    .await
    .unwrap();
    let leader = status.leader_id;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // Publishing through a follower, which forwards to the leader: it answers NO_LEADER or
    // LEADER_UNREACHABLE while the leader is gone, and the client retries.
    let client = Client::connect_with(
        nodes[usize::try_from(follower - 1).unwrap()].url(),
        ConnectOptions::default().retry(retrying()),
    )
    .await
    .unwrap();

    // Two publishers at once: one publish at a time, and a publish stream.
    const N: u64 = 200;
    const STREAMED: u64 = 2000;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = spawn_publisher(client.clone(), "resilience.failover.tick", N, acked.clone());
    let streamed = Arc::new(AtomicU64::new(0));
    let stream = spawn_stream_publisher(
        &client,
        "resilience.failover.stream",
        STREAMED,
        streamed.clone(),
    );
    wait_acked(&acked, 30).await;
    wait_acked(&streamed, 100).await;
    nodes[usize::try_from(leader - 1).unwrap()].kill9();
    let at_kill = (
        acked.load(Ordering::SeqCst),
        streamed.load(Ordering::SeqCst),
    );
    let acks = tokio::time::timeout(DEADLINE, publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    let stream_acks = tokio::time::timeout(DEADLINE, stream)
        .await
        .expect("the stream finishes")
        .unwrap();
    assert!(
        at_kill.0 < N && at_kill.1 < STREAMED,
        "a publisher was done before the kill: {at_kill:?}"
    );
    let after = client.cluster_status().await.unwrap();
    assert_ne!(after.leader_id, leader, "a new leader took over");

    let stored = stored_on(&client, "resilience.failover.tick").await;
    assert_stored_once_in_order(&stored, &acks, N);
    let stored = stored_on(&client, "resilience.failover.stream").await;
    assert_stored_once_in_order(&stored, &stream_acks, STREAMED);
}

/// A three-node cluster with a leader, and the leader's id.
async fn cluster_with_leader(dir: &tempfile::TempDir) -> (Vec<switchboard_e2e::ClusterNode>, u64) {
    let nodes = start_cluster(dir.path(), 3, &[]).expect("three nodes start");
    let first = Client::connect(nodes[0].url()).await.unwrap();
    let status = eventually(
        "a leader whose members all announced their addresses",
        || async {
            let status = first.cluster_status().await.ok()?;
            let announced = status.nodes.iter().all(|n| !n.public_address.is_empty());
            (status.leader_id != 0 && announced).then_some(status)
        },
    )
    .await
    .unwrap();
    (nodes, status.leader_id)
}

fn node_index(id: u64) -> usize {
    usize::try_from(id - 1).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_fail_over_to_another_node_before_the_circuit_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, leader) = cluster_with_leader(&dir).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let follower_url = nodes[node_index(follower)].url();
    // No retry policy, and a breaker that opens at the first failure that counts: only the
    // failover keeps the publishes going when the node the client talks to dies.
    let client = Client::connect_with(
        &follower_url,
        ConnectOptions::default()
            .failover(true)
            .circuit_breaker(CircuitPolicy::new(1, Duration::from_secs(60))),
    )
    .await
    .unwrap();
    let known = client.known_nodes();
    assert_eq!(known.len(), 3, "learned every member: {known:?}");
    assert_eq!(client.current_node(), follower_url);

    const N: u64 = 300;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = spawn_publisher(client.clone(), "resilience.nodes.tick", N, acked.clone());
    wait_acked(&acked, 30).await;
    nodes[node_index(follower)].kill9();
    let at_kill = acked.load(Ordering::SeqCst);
    let acks = tokio::time::timeout(DEADLINE, publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    assert!(at_kill < N, "the publisher was done before the kill");
    assert_ne!(client.current_node(), follower_url, "moved to another node");
    assert_eq!(client.circuit_state(), Some(CircuitState::Closed));

    let reader = Client::connect(nodes[node_index(leader)].url())
        .await
        .unwrap();
    let stored = stored_on(&reader, "resilience.nodes.tick").await;
    assert_stored_once_in_order(&stored, &acks, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_on_the_leader_fails_over_when_it_is_killed_storing_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, leader) = cluster_with_leader(&dir).await;
    let leader_url = nodes[node_index(leader)].url();
    let client = Client::connect_with(
        &leader_url,
        ConnectOptions::default().retry(retrying()).failover(true),
    )
    .await
    .unwrap();
    assert_eq!(client.known_nodes().len(), 3);

    // One publish at a time, and a resuming publish stream: both must move to another node.
    const N: u64 = 200;
    const STREAMED: u64 = 2000;
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = spawn_publisher(client.clone(), "resilience.nodes.leader", N, acked.clone());
    let streamed = Arc::new(AtomicU64::new(0));
    let stream = spawn_stream_publisher(
        &client,
        "resilience.nodes.stream",
        STREAMED,
        streamed.clone(),
    );
    wait_acked(&acked, 30).await;
    wait_acked(&streamed, 100).await;
    nodes[node_index(leader)].kill9();
    let at_kill = (
        acked.load(Ordering::SeqCst),
        streamed.load(Ordering::SeqCst),
    );
    let acks = tokio::time::timeout(DEADLINE, publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    let stream_acks = tokio::time::timeout(DEADLINE, stream)
        .await
        .expect("the stream finishes")
        .unwrap();
    assert!(
        at_kill.0 < N && at_kill.1 < STREAMED,
        "a publisher was done before the kill: {at_kill:?}"
    );
    assert_ne!(client.current_node(), leader_url);

    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    let reader = Client::connect(nodes[node_index(survivor)].url())
        .await
        .unwrap();
    // A follower applies what its leader committed shortly after the ack.
    let stored = eventually("the last message applied on the reader's node", || async {
        let stored = stored_on(&reader, "resilience.nodes.leader").await;
        (stored.last().map(|(o, _)| *o) >= acks.last().map(|a| a.offset)).then_some(stored)
    })
    .await
    .unwrap();
    assert_stored_once_in_order(&stored, &acks, N);
    let stored = eventually("the stream's last message on the reader's node", || async {
        let stored = stored_on(&reader, "resilience.nodes.stream").await;
        (stored.last().map(|(o, _)| *o) >= stream_acks.last().map(|a| a.offset)).then_some(stored)
    })
    .await
    .unwrap();
    assert_stored_once_in_order(&stored, &stream_acks, STREAMED);
}

/// A client whose connection is made on its first call, so it can be made while the broker is
/// down (as a service starting during an outage would, under a retry policy).
fn lazy_client(url: &str) -> Client {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap();
    Client::from_channel(endpoint.connect_lazy(), url)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_on_disk_keeps_what_waits_across_a_reopen_and_a_torn_tail_storing_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let url = broker.url();
    let file = dir.path().join("outbox.log");
    let options =
        OutboxOptions::default().backoff(Duration::from_millis(10), Duration::from_millis(200));

    // Two messages go through while the broker is up: answered, they leave the file.
    let client = lazy_client(&url);
    let outbox = client.outbox_on_disk(&file, options.clone()).unwrap();
    for i in 0..2 {
        outbox
            .publish(Publish::new("resilience.disk.tick", i.to_string()))
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "truncated once all answered"
    );

    // The broker goes away; what is published meanwhile waits, on disk.
    broker.kill9();
    let mut keys = Vec::new();
    for i in 2..20 {
        let receipt = outbox
            .publish(Publish::new("resilience.disk.tick", i.to_string()))
            .unwrap();
        keys.push(receipt.idempotency_key().to_owned());
    }
    assert!(
        client_outbox_file_error(&client, &file),
        "a second outbox cannot take the file"
    );
    // The process's outbox and client go (as in a crash: nothing is flushed).
    drop(outbox);
    drop(client);
    // And the last write was torn: a record's header and part of its body at the end.
    let mut bytes = std::fs::read(&file).unwrap();
    let torn = bytes[..20].to_vec();
    bytes.extend_from_slice(&torn);
    std::fs::write(&file, &bytes).unwrap();

    // A new client and outbox on the file: the 18 are queued again, before anything new. The
    // dropped outbox's task releases the lock when it ends, moments after its handle went
    // (docs/CLIENT-RESILIENCE.md): the open is retried until then, within the deadline.
    let client = lazy_client(&url);
    let outbox = eventually("the dropped outbox released the file", || {
        let opened = client.outbox_on_disk(&file, options.clone());
        async move {
            match opened {
                Ok(outbox) => Some(outbox),
                Err(Error::OutboxStorage { .. }) => None,
                Err(other) => panic!("{other}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(outbox.len(), 18, "every message not answered is back");
    let later = outbox
        .publish(Publish::new("resilience.disk.tick", "20"))
        .unwrap();
    broker.restart(&[]).unwrap();
    tokio::time::timeout(DEADLINE, outbox.flushed())
        .await
        .expect("the outbox flushes");
    let last = later.await.unwrap();

    let stored = stored_on(&client, "resilience.disk.tick").await;
    let payloads: Vec<&str> = stored.iter().map(|(_, p)| p.as_str()).collect();
    let expected: Vec<String> = (0..=20).map(|i: u64| i.to_string()).collect();
    assert_eq!(payloads, expected, "every message stored once, in order");
    assert_eq!(stored.last().map(|(o, _)| *o), Some(last.offset));
    let history = client
        .history_all(
            HistoryQuery::new("resilience.disk.tick").from(Start::Earliest),
            1000,
        )
        .await
        .unwrap();
    let sent_keys: Vec<&str> = history[2..20]
        .iter()
        .map(|m| m.idempotency_key.as_str())
        .collect();
    assert_eq!(
        sent_keys, keys,
        "sent again with the keys they were queued with"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
}

/// Whether opening a second outbox on `file` fails (the first holds it).
fn client_outbox_file_error(client: &Client, file: &std::path::Path) -> bool {
    matches!(
        client.outbox_on_disk(file, OutboxOptions::default()),
        Err(Error::OutboxStorage { .. })
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_retry_waits_for_a_broker_that_is_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir).await;
    let url = broker.url();
    broker.kill9();

    // Without --retry: refused at once.
    let once = Command::new(sb_binary())
        .args(["--server", &url, "publish", "resilience.cli.tick", "1"])
        .output()
        .unwrap();
    assert!(!once.status.success());
    assert!(
        String::from_utf8_lossy(&once.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );

    // With --retry: it keeps trying until the broker is back.
    let mut waiting = Command::new(sb_binary())
        .args([
            "--server",
            &url,
            "publish",
            "resilience.cli.tick",
            "2",
            "--retry",
            "30s",
        ])
        .env("SB_LOG", "switchboard_client=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log says when it failed to connect and is retrying: only then is the broker started.
    let stderr = waiting.stderr.take().unwrap();
    let (retrying_tx, retrying_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if line.contains("connect failed, retrying") {
                let _ = retrying_tx.send(());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    retrying_rx
        .recv_timeout(DEADLINE)
        .expect("sb logs a failed connection it retries");
    broker.restart(&[]).unwrap();
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = log.join().unwrap();
    assert!(output.status.success(), "{stderr}");
    let ack: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(ack["offset"].as_u64().unwrap() >= 1, "{ack}");
    let client = Client::connect(&url).await.unwrap();
    let stored = stored_on(&client, "resilience.cli.tick").await;
    assert_eq!(
        stored.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
        ["2"]
    );
}
