//! Concurrent publishers: offsets strictly increase and every ack matches what a subscriber gets.

use std::collections::BTreeMap;

use futures::StreamExt;
use switchboard_client::{split_stream_ack, Publish, Start};

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
            let stream = payloads
                .clone()
                .into_iter()
                .map(move |payload| Publish::new(format!("conc.stream.p{p}"), payload));
            let acks = client
                .publish_stream(futures::stream::iter(stream))
                .await
                .unwrap();
            let acks: Vec<_> = acks.collect().await;
            acks.into_iter()
                .zip(payloads)
                .map(|(a, payload)| (split_stream_ack(a.unwrap()).1.unwrap().offset, payload))
                .collect::<Vec<_>>()
        }));
    }

    let mut acked = BTreeMap::new();
    for task in tasks {
        let per_publisher = task.await.unwrap();
        // Each publisher's offsets increase in the order it sent.
        assert!(per_publisher.windows(2).all(|w| w[0].0 < w[1].0));
        for (offset, payload) in per_publisher {
            assert!(
                acked.insert(offset, payload).is_none(),
                "offset {offset} given twice"
            );
        }
    }
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
