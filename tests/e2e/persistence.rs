//! Durability: every acknowledged message survives `kill -9`, in offset order.

use std::collections::BTreeMap;

use switchboard_client::{Client, HistoryQuery, Publish, Start};

use crate::common::*;

#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let mut f = fixture(&[]).await;
    // Eight concurrent publishers, so acks come from group-committed batches.
    let mut tasks = Vec::new();
    for p in 0..8 {
        let client = f.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..60 {
                let payload = format!("{{\"p\":{p},\"i\":{i}}}");
                let ack = client
                    .publish(Publish::new(
                        format!("orders.p{p}.created"),
                        payload.clone(),
                    ))
                    .await
                    .unwrap();
                acked.push((ack.offset, payload));
            }
            acked
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 480);

    f.broker.kill9();
    f.broker.restart(&[]).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();

    let stored = client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 10_000)
        .await
        .unwrap();
    let stored: BTreeMap<u64, String> =
        stored.iter().map(|m| (m.offset, payload_text(m))).collect();
    assert_eq!(
        stored, acked,
        "every acknowledged message, and nothing else"
    );
    let offsets: Vec<u64> = stored.keys().copied().collect();
    assert_eq!(offsets, (1..=480).collect::<Vec<_>>());

    // The log goes on after the last offset.
    let ack = client
        .publish(Publish::new("orders.after.restart", "{}"))
        .await
        .unwrap();
    assert_eq!(ack.offset, 481);
}
