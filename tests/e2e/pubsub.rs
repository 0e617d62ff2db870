//! Publish and wildcard subscribe: what is delivered, to whom, with what.

use switchboard_client::{Publish, Reason, Start};

use crate::common::*;

#[tokio::test]
async fn wildcard_subscribers_get_exactly_their_matches_with_everything_the_publisher_set() {
    let f = fixture(&[]).await;
    let mut updated = f
        .client
        .subscribe("crm.*.updated", Start::Latest)
        .await
        .unwrap();
    let mut all_crm = f.client.subscribe("crm.>", Start::Latest).await.unwrap();

    let correlation = "3f2c1a9e-8d4b-4c3a-9e1f-0a2b3c4d5e6f";
    let first = f
        .client
        .publish(
            Publish::new("crm.contact.updated", r#"{"id":1}"#)
                .correlation_id(correlation)
                .causation_id("cause-1")
                .idempotency_key("key-1")
                .schema_version("2.1.0")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
        )
        .await
        .unwrap();
    assert_eq!(first.correlation_id, correlation);
    let deleted = f
        .client
        .publish(Publish::new("crm.contact.deleted", "{}"))
        .await
        .unwrap();
    let other = f
        .client
        .publish(Publish::new("billing.invoice.updated", "{}"))
        .await
        .unwrap();
    let second = f
        .client
        .publish(Publish::new("crm.deal.updated", "[1,2]"))
        .await
        .unwrap();
    assert!(
        first.offset < deleted.offset
            && deleted.offset < other.offset
            && other.offset < second.offset
    );
    assert!(
        !second.correlation_id.is_empty(),
        "a correlation id is generated when absent"
    );

    let got = take(&mut updated, 2).await;
    assert_eq!(offsets(&got), vec![first.offset, second.offset]);
    let m = &got[0];
    assert_eq!(m.channel, "crm.contact.updated");
    assert_eq!(payload_text(m), r#"{"id":1}"#);
    assert_eq!(m.correlation_id, correlation);
    assert_eq!(m.causation_id, "cause-1");
    assert_eq!(m.idempotency_key, "key-1");
    assert_eq!(m.schema_version, "2.1.0");
    assert_eq!(m.content_type, "application/json");
    assert_eq!(m.publish_time, first.publish_time);
    assert_eq!(
        m.headers.get("traceparent").map(String::as_str),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(got[1].correlation_id, second.correlation_id);

    let got = take(&mut all_crm, 3).await;
    assert_eq!(
        offsets(&got),
        vec![first.offset, deleted.offset, second.offset]
    );

    // A marker proves the stream is past everything above; nothing else may have come.
    let marker = f
        .client
        .publish(Publish::new("crm.marker.updated", "{}"))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut updated, 1).await), vec![marker.offset]);
    assert_nothing_more(&mut updated, std::time::Duration::from_millis(200)).await;
}

#[tokio::test]
async fn many_subscriptions_share_one_connection_and_info_reports_the_log() {
    let f = fixture(&[]).await;
    let mut subs = Vec::new();
    for i in 0..20 {
        subs.push(
            f.client
                .subscribe(format!("room.r{i}.>"), Start::Latest)
                .await
                .unwrap(),
        );
    }
    for i in 0..20 {
        f.client
            .publish(Publish::new(format!("room.r{i}.msg"), format!("{i}")))
            .await
            .unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = take(sub, 1).await;
        assert_eq!(payload_text(&got[0]), i.to_string());
    }
    let info = f.client.info().await.unwrap();
    assert_eq!(info.last_offset, 20);
    assert_eq!(info.first_offset, 1);
    assert_eq!(info.node_id, 1);
    assert_eq!(info.leader_id, 1);
    assert!(info.stored_bytes > 0 && info.disk_bytes > info.stored_bytes);
    assert!(!info.version.is_empty());
}

#[tokio::test]
async fn a_slow_subscriber_catches_up_from_the_store_without_gap_or_duplicate() {
    // A two-message mailbox makes the subscriber fall behind at once, so it must switch to the
    // store and back, repeatedly.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small-mailbox.toml");
    std::fs::write(&config, "[subscriptions]\nqueue_depth = 2\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;
    let options = switchboard_client::SubscribeOptions::default().buffer(1);
    let mut slow = f
        .client
        .subscribe_with("load.>", Start::Latest, options)
        .await
        .unwrap();

    let total = 600u64;
    let publishes = (0..total).map(|i| Publish::new(format!("load.c{}", i % 3), i.to_string()));
    let acked: Vec<u64> = publish_stream_answers(&f.client, publishes)
        .await
        .into_iter()
        .map(|(_, answer)| match answer {
            Ok(ack) => ack.offset,
            Err(e) => panic!("refused: {e}"),
        })
        .collect();
    assert_eq!(acked.len() as u64, total);

    // Only now does the subscriber read: everything must come, in order, once.
    let got = take(&mut slow, total as usize).await;
    assert_eq!(offsets(&got), acked);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(payload_text(m), i.to_string());
    }
    let marker = f
        .client
        .publish(Publish::new("load.marker", "{}"))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut slow, 1).await), vec![marker.offset]);
}

#[tokio::test]
async fn a_stream_answers_every_message_in_order_with_refusals_in_their_place() {
    let f = fixture(&[]).await;
    // All of it is sent at once, so the broker reads many messages together and proposes them
    // as groups: the answers must still come one per message, in order, each for its own.
    let total = 500usize;
    let publishes = (0..total).map(|i| {
        let channel = if i % 5 == 0 {
            format!("grp..{i}")
        } else {
            format!("grp.c.{i}")
        };
        Publish::new(channel, i.to_string())
    });
    let answers = publish_stream_answers(&f.client, publishes).await;
    assert_eq!(answers.len(), total);
    let mut offsets = Vec::new();
    for (i, (sequence, answer)) in answers.into_iter().enumerate() {
        assert_eq!(sequence, i as u64);
        match answer {
            Ok(ack) => {
                assert_ne!(i % 5, 0, "message {i} has an invalid channel");
                offsets.push(ack.offset);
            }
            Err(e) => {
                assert_eq!(i % 5, 0, "message {i} was refused: {e}");
                assert_eq!(e.reason(), Some(Reason::ChannelInvalid));
            }
        }
    }
    assert_eq!(offsets.len(), total - total / 5);
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "accepted messages get consecutive offsets in the order sent"
    );
    let stored = f
        .client
        .history_all(
            switchboard_client::HistoryQuery::new("grp.>").from(Start::Earliest),
            10_000,
        )
        .await
        .unwrap();
    let payloads: Vec<String> = stored.iter().map(payload_text).collect();
    let expected: Vec<String> = (0..total)
        .filter(|i| i % 5 != 0)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(payloads, expected, "nothing refused was stored");
}
