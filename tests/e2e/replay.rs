//! Replay: subscribe from earliest, from an offset, from a time; History pages.

use switchboard_client::{HistoryQuery, Publish, Start};

use crate::common::*;

#[tokio::test]
async fn subscriptions_replay_from_earliest_an_offset_and_a_time() {
    let f = fixture(&[]).await;
    let mut acks = Vec::new();
    for i in 0..10 {
        // One at a time: each message is its own batch with its own publish time.
        acks.push(
            f.client
                .publish(Publish::new(
                    format!("replay.item.{}", i % 2),
                    i.to_string(),
                ))
                .await
                .unwrap(),
        );
    }
    let all: Vec<u64> = acks.iter().map(|a| a.offset).collect();

    let mut sub = f
        .client
        .subscribe("replay.>", Start::Earliest)
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut sub, 10).await), all);

    let mut sub = f
        .client
        .subscribe("replay.>", Start::Offset(all[5]))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut sub, 5).await), all[5..].to_vec());

    let t = acks[6].publish_time.unwrap();
    let time = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::new(t.seconds as u64, t.nanos as u32);
    let mut sub = f
        .client
        .subscribe("replay.>", Start::Time(time))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut sub, 4).await), all[6..].to_vec());

    // Replay then live: the same subscription goes on with new messages.
    let next = f
        .client
        .publish(Publish::new("replay.item.0", "99"))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut sub, 1).await), vec![next.offset]);

    // A pattern filters the replay.
    let mut evens = f
        .client
        .subscribe("replay.item.0", Start::Earliest)
        .await
        .unwrap();
    let got = take(&mut evens, 6).await;
    assert!(got.iter().all(|m| m.channel == "replay.item.0"));
}

#[tokio::test]
async fn history_reads_ranges_in_pages() {
    let f = fixture(&[]).await;
    let stream = (0..25).map(|i| Publish::new("hist.a.b", i.to_string()));
    let acks = f
        .client
        .publish_stream(futures::stream::iter(stream))
        .await
        .unwrap();
    let n = futures::StreamExt::count(acks).await;
    assert_eq!(n, 25);

    let first = f
        .client
        .history(HistoryQuery::new("hist.>").from(Start::Earliest).limit(10))
        .await
        .unwrap();
    assert_eq!(offsets(&first.messages), (1..=10).collect::<Vec<_>>());
    assert_eq!(first.next_offset, Some(11));

    let ranged = f
        .client
        .history(
            HistoryQuery::new("hist.>")
                .from(Start::Offset(5))
                .to_offset(7),
        )
        .await
        .unwrap();
    assert_eq!(offsets(&ranged.messages), vec![5, 6, 7]);
    assert_eq!(ranged.next_offset, None);

    let everything = f
        .client
        .history_all(HistoryQuery::new("hist.>").limit(7), 1000)
        .await
        .unwrap();
    assert_eq!(offsets(&everything), (1..=25).collect::<Vec<_>>());
    let none = f
        .client
        .history(HistoryQuery::new("other.>"))
        .await
        .unwrap();
    assert!(none.messages.is_empty());
}
