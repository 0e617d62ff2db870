//! Concurrent publishers: offsets strictly increase and every ack matches what a subscriber gets.

use std::collections::BTreeMap;

use switchboard_client::{Publish, Start};

use crate::common::*;

#[tokio::test]
async fn concurrent_publishers_get_distinct_increasing_offsets_that_match_deliveries() {
    let f = fixture(&[]).await;
    let mut sub = f.client.subscribe("conc.>", Start::Latest).await.unwrap();

    let mut tasks = Vec::new();
    // Unary publishers.
    for p in 0..6 {
        let client = f.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..50 {
                let payload = format!("\"u{p}-{i}\"");
                let ack = client
                    .publish(Publish::new(format!("conc.unary.p{p}"), payload.clone()))
                    .await
                    .unwrap();
                acked.push((ack.offset, payload));
            }
            acked
        }));
    }
    // Streaming publishers.
    for p in 0..2 {
        let client = f.client.clone();
        tasks.push(tokio::spawn(async move {
            let payloads: Vec<String> = (0..200).map(|i| format!("\"s{p}-{i}\"")).collect();
            publish_stream_acked(&client, format!("conc.stream.p{p}"), payloads).await
        }));
    }

    let mut per_publisher = Vec::new();
    for task in tasks {
        per_publisher.push(task.await.unwrap());
    }
    let acked = merge_acked(per_publisher);
    assert_eq!(acked.len(), 700);

    let got = take(&mut sub, 700).await;
    let delivered: BTreeMap<u64, String> =
        got.iter().map(|m| (m.offset, payload_text(m))).collect();
    assert!(
        offsets(&got).windows(2).all(|w| w[0] < w[1]),
        "delivered in offset order"
    );
    assert_eq!(delivered, acked);
}
