//! Loops and duplicates end to end: two services that republish each other's messages, a long
//! legitimate chain, and idempotent retries inside and after the dedup window.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use switchboard_client::{Client, Publish, Reason, Start};
use switchboard_e2e::eventually;
use tonic::Code;

use crate::common::*;

/// A service that republishes every message of `from` on `to`, as a reaction to it, and reports
/// each result.
fn relay(
    client: Client,
    from: &'static str,
    to: &'static str,
    results: tokio::sync::mpsc::Sender<Result<u64, switchboard_client::Error>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sub = client.subscribe(from, Start::Earliest).await.unwrap();
        while let Some(Ok(delivery)) = sub.next().await {
            let result = client
                .publish(Publish::new(to, "{}").caused_by(&delivery))
                .await
                .map(|ack| ack.offset);
            if results.send(result).await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test]
async fn two_services_republishing_each_other_are_stopped_on_the_second_entry_and_reported() {
    let f = fixture(&[]).await;
    let mut reports = f
        .client
        .subscribe("$sys.loop.detected", Start::Latest)
        .await
        .unwrap();
    let (tx, mut results) = tokio::sync::mpsc::channel(16);
    let a_to_b = relay(f.client.clone(), "ping.a", "ping.b", tx.clone());
    let b_to_a = relay(f.client.clone(), "ping.b", "ping.a", tx);

    let start = f
        .client
        .publish(Publish::new("ping.a", "{}"))
        .await
        .unwrap();
    // A→B is accepted; B→A would enter ping.a a second time: refused.
    let first = tokio::time::timeout(switchboard_e2e::DEADLINE, results.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.unwrap() > start.offset);
    let second = tokio::time::timeout(switchboard_e2e::DEADLINE, results.recv())
        .await
        .unwrap()
        .unwrap();
    let err = second.unwrap_err();
    assert_eq!(
        (err.code(), err.reason()),
        (Code::FailedPrecondition, Some(Reason::LoopDetected))
    );

    let report = take(&mut reports, 1).await.remove(0);
    let report: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(report["channel"], "ping.a");
    assert_eq!(report["chain"], serde_json::json!(["ping.a", "ping.b"]));
    assert_eq!(
        f.client.info().await.unwrap().loops_detected,
        1,
        "the refusal is counted"
    );
    a_to_b.abort();
    b_to_a.abort();
}

#[tokio::test]
async fn a_long_chain_through_distinct_channels_is_accepted_up_to_the_hop_limit() {
    let f = fixture(&[]).await;
    let mut sub = f.client.subscribe("chain.>", Start::Latest).await.unwrap();
    f.client
        .publish(Publish::new("chain.c0", "{}"))
        .await
        .unwrap();
    let mut cause = take(&mut sub, 1).await.remove(0);
    for i in 1..=16 {
        f.client
            .publish(Publish::new(format!("chain.c{i}"), "{}").caused_by(&cause))
            .await
            .unwrap_or_else(|e| panic!("hop {i}: {e}"));
        cause = take(&mut sub, 1).await.remove(0);
        assert_eq!(cause.hops, i);
    }
    // One more hop than the default limit of 16.
    let err = f
        .client
        .publish(Publish::new("chain.c17", "{}").caused_by(&cause))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some(Reason::LoopDetected));
}

#[tokio::test]
async fn a_retry_with_the_same_key_returns_the_same_offset_and_after_the_window_is_stored_anew() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("short-dedup.toml");
    std::fs::write(&config, "[loops]\ndedup_window = \"1s\"\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;

    let first = f
        .client
        .publish(Publish::new("pay.charge.created", "{\"n\":1}").idempotency_key("charge-77"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let retry = f
        .client
        .publish(Publish::new("pay.charge.created", "{\"n\":1}").idempotency_key("charge-77"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.offset, retry.publish_time),
        (first.offset, first.publish_time)
    );
    assert_eq!(
        f.client.info().await.unwrap().last_offset,
        first.offset,
        "nothing new stored"
    );

    let ts = first.publish_time.unwrap();
    let window_end = SystemTime::UNIX_EPOCH
        + Duration::new(ts.seconds as u64, ts.nanos as u32)
        + Duration::from_secs(1);
    eventually("the dedup window to pass", || async {
        (SystemTime::now() > window_end).then_some(())
    })
    .await
    .unwrap();
    let later = f
        .client
        .publish(Publish::new("pay.charge.created", "{\"n\":1}").idempotency_key("charge-77"))
        .await
        .unwrap();
    assert!(!later.duplicate);
    assert!(later.offset > first.offset);
}
