//! TTL: a message is delivered before it expires, never after, and the sweep removes it from disk.

use std::time::{Duration, SystemTime};

use switchboard_client::{HistoryQuery, Publish, Start};
use switchboard_e2e::eventually;

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
