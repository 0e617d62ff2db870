//! Client resume: a subscriber reading while the broker is killed and restarted receives every
//! message exactly once, in order.

use std::time::Duration;

use switchboard_client::{Client, HistoryQuery, Publish, Start, SubscribeOptions};

use crate::common::*;

/// Publishes until acknowledged, riding out the broker's absence. A message whose ack was lost in
/// the crash may be stored twice (at two offsets); the test counts offsets, not payloads.
async fn publish_until_acked(client: &Client, i: u64) -> u64 {
    loop {
        match client
            .publish(Publish::new("resume.events.tick", i.to_string()))
            .await
        {
            Ok(ack) => return ack.offset,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn a_subscriber_resumes_across_a_broker_crash_with_no_gap_and_no_duplicate() {
    let mut f = fixture(&[]).await;
    let options =
        SubscribeOptions::default().backoff(Duration::from_millis(20), Duration::from_millis(200));
    let mut sub = f
        .client
        .subscribe_with("resume.>", Start::Earliest, options)
        .await
        .unwrap();

    let mut acked = Vec::new();
    for i in 0..50 {
        acked.push(publish_until_acked(&f.client, i).await);
    }
    let before = take(&mut sub, 25).await;

    f.broker.kill9();
    f.broker.restart(&[]).unwrap();

    // The same client (its channel reconnects) keeps publishing.
    for i in 50..100 {
        acked.push(publish_until_acked(&f.client, i).await);
    }
    let stored = Client::connect(f.broker.url())
        .await
        .unwrap()
        .history_all(HistoryQuery::new("resume.>"), 10_000)
        .await
        .unwrap();
    let stored = offsets(&stored);
    for offset in &acked {
        assert!(
            stored.contains(offset),
            "acknowledged offset {offset} is stored"
        );
    }

    let after = take(&mut sub, stored.len() - before.len()).await;
    let mut received = offsets(&before);
    received.extend(offsets(&after));
    assert_eq!(received, stored, "every stored message once, in order");
}
