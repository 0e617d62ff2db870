//! TTL: a message is delivered before it expires, never after, and the sweep removes it from disk.

use std::time::{Duration, SystemTime};

use switchboard_client::{HistoryQuery, Publish, Start};
use switchboard_e2e::{eventually, SseStream};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;

use crate::common::*;

fn expiry(ack: &switchboard_proto::v1::PublishAck, ttl: Duration) -> SystemTime {
    let ts = ack.publish_time.expect("publish time");
    SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32) + ttl
}

#[tokio::test]
async fn expired_messages_are_never_delivered_even_before_the_sweep() {
    // A sweep interval of an hour: whatever hides the message below is the read path, not the sweep.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("no-sweep.toml");
    std::fs::write(&config, "[retention]\nsweep_interval = \"1h\"\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;

    let ttl = Duration::from_millis(1500);
    let mut live = f.client.subscribe("ttl.>", Start::Latest).await.unwrap();
    let short = f
        .client
        .publish(Publish::new("ttl.short.lived", "{}").ttl(ttl))
        .await
        .unwrap();
    let kept = f
        .client
        .publish(Publish::new("ttl.kept.forever", "{}"))
        .await
        .unwrap();

    // A live subscriber gets it while it is fresh, with its expiry.
    let got = take(&mut live, 2).await;
    assert_eq!(offsets(&got), vec![short.offset, kept.offset]);
    assert_eq!(got[0].ttl_ms, 1500);
    assert!(got[0].expires_at.is_some() && got[1].expires_at.is_none());

    // Once its time has passed, no read path returns it.
    let expires = expiry(&short, ttl);
    eventually("the short-lived message to expire", || async {
        (SystemTime::now() > expires).then_some(())
    })
    .await
    .unwrap();
    let page = f.client.history(HistoryQuery::new("ttl.>")).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![kept.offset]);
    let mut replay = f.client.subscribe("ttl.>", Start::Earliest).await.unwrap();
    assert_eq!(offsets(&take(&mut replay, 1).await), vec![kept.offset]);
    // It is still on disk: nothing swept it yet.
    assert_eq!(f.client.info().await.unwrap().first_offset, short.offset);
}

#[tokio::test]
async fn the_sweep_removes_expired_messages_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast-sweep.toml");
    std::fs::write(&config, "[retention]\nsweep_interval = \"50ms\"\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;

    let short = f
        .client
        .publish(Publish::new("ttl.short.lived", "{}").ttl(Duration::from_millis(300)))
        .await
        .unwrap();
    let kept = f
        .client
        .publish(Publish::new("ttl.kept.forever", "{}"))
        .await
        .unwrap();
    let before = f.client.info().await.unwrap();
    assert_eq!(before.first_offset, short.offset);

    let client = f.client.clone();
    let after = eventually("the sweep to remove the expired message", || {
        let client = client.clone();
        async move {
            let info = client.info().await.ok()?;
            (info.first_offset == kept.offset).then_some(info)
        }
    })
    .await
    .unwrap();
    assert!(after.stored_bytes < before.stored_bytes);
    assert_eq!(after.last_offset, kept.offset);
}

/// The next `n` events of a raw `Subscribe` stream after `Subscribed`: gaps and messages, as
/// `(kind, from, to, reason)` for a gap and `("message", offset, offset, 0)` for a message.
async fn raw_events(
    events: &mut tonic::Streaming<pb::SubscribeEvent>,
    n: usize,
) -> Vec<(&'static str, u64, u64, i32)> {
    use pb::subscribe_event::Event;
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout(switchboard_e2e::DEADLINE, events.message())
            .await
            .unwrap_or_else(|_| panic!("nothing more after {out:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended after {out:?}"));
        match event.event {
            Some(Event::Subscribed(_)) => {}
            Some(Event::Gap(gap)) => out.push(("gap", gap.from_offset, gap.to_offset, gap.reason)),
            Some(Event::Message(m)) => out.push(("message", m.offset, m.offset, 0)),
            // Not asked for (max_batch 0): never sent here.
            Some(Event::Batch(batch)) => panic!("a batch nobody asked for: {batch:?}"),
            None => {}
        }
    }
    out
}

#[tokio::test]
async fn resuming_from_a_message_swept_in_the_middle_of_the_log_gives_a_retention_gap() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast-sweep.toml");
    std::fs::write(&config, "[retention]\nsweep_interval = \"50ms\"\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;

    // kept, expiring, expiring, kept, expiring, kept: two removed runs in the middle of the log.
    let short = Duration::from_millis(300);
    let mut acked = Vec::new();
    for expires in [false, true, true, false, true, false] {
        let publish = Publish::new("ttl.mid.log", "{}");
        let publish = if expires { publish.ttl(short) } else { publish };
        acked.push(f.client.publish(publish).await.unwrap().offset);
    }
    let before = f.client.info().await.unwrap();
    let client = f.client.clone();
    eventually("the sweep to remove the three expired messages", || {
        let client = client.clone();
        let before = before.stored_bytes;
        async move {
            let history = client.history(HistoryQuery::new("ttl.>")).await.ok()?;
            let info = client.info().await.ok()?;
            (history.messages.len() == 3 && info.stored_bytes < before).then_some(())
        }
    })
    .await
    .unwrap();
    // Only the removed messages in the middle went; the log still starts at the first one.
    assert_eq!(f.client.info().await.unwrap().first_offset, acked[0]);

    let retention = pb::gap::Reason::Retention as i32;
    let mut raw = BrokerClient::connect(f.broker.url()).await.unwrap();
    let subscribe = |from: u64| pb::SubscribeRequest {
        pattern: "ttl.>".into(),
        start: Some(Start::Offset(from).into()),
        ..Default::default()
    };
    // From the first removed message: one gap for the run it starts, then what is left. The
    // later removed message is not announced: an expired message is never delivered, and the
    // gap is about the position the subscription resumed from.
    let mut events = raw
        .subscribe(subscribe(acked[1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        raw_events(&mut events, 3).await,
        vec![
            ("gap", acked[1], acked[2], retention),
            ("message", acked[3], acked[3], 0),
            ("message", acked[5], acked[5], 0),
        ]
    );
    // From the middle of a removed run: the gap covers the rest of it.
    let mut events = raw
        .subscribe(subscribe(acked[2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        raw_events(&mut events, 2).await,
        vec![
            ("gap", acked[2], acked[2], retention),
            ("message", acked[3], acked[3], 0),
        ]
    );
    // From a message still stored: no gap.
    let mut events = raw
        .subscribe(subscribe(acked[3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        raw_events(&mut events, 2).await,
        vec![
            ("message", acked[3], acked[3], 0),
            ("message", acked[5], acked[5], 0),
        ]
    );

    // The browser's resume (`Last-Event-ID` names the last message seen) gets the same gap.
    let mut sse = SseStream::open(
        &format!("http://{}/v1/subscribe?pattern=ttl.%3E", f.broker.addr),
        &[("Last-Event-ID", &acked[0].to_string())],
    )
    .await
    .unwrap();
    assert_eq!(sse.status, 200);
    let mut event = sse.next_event().await.unwrap();
    while event.event.as_deref() == Some("subscribed") {
        event = sse.next_event().await.unwrap();
    }
    assert_eq!(event.event.as_deref(), Some("gap"), "{event:?}");
    let gap: serde_json::Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(
        (gap["from_offset"].as_u64(), gap["to_offset"].as_u64()),
        (Some(acked[1]), Some(acked[2])),
        "{gap}"
    );
    assert!(
        gap["reason"].as_str().unwrap().contains("RETENTION"),
        "{gap}"
    );
    let message = sse.next_event().await.unwrap();
    assert_eq!(message.id, Some(acked[3].to_string()));
}
