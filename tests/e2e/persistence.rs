//! Durability: every acknowledged message survives `kill -9`, in offset order; the state a crash
//! leaves is rebuilt from the snapshot and the log exactly, and a clean stop needs no rebuild.

use std::collections::BTreeMap;

use serde_json::json;
use switchboard_client::{Client, EntityUpdate, HistoryQuery, Publish, Start};

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

/// What the state machine logs when it rebuilds the state after a start without a clean stop.
const REBUILD_WARNING: &str = "not stopped cleanly";

/// The state of one entity, its version, and every stored message's offset and channel.
async fn state(client: &Client) -> (u64, serde_json::Value, Vec<(u64, String)>) {
    let entity = client
        .get_entity("contact", "1", None)
        .await
        .unwrap()
        .into_entity()
        .unwrap();
    let fields = serde_json::from_slice(&entity.fields).unwrap();
    let stored = client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.offset, m.channel))
        .collect();
    (entity.version, fields, stored)
}

#[tokio::test]
async fn a_crash_after_snapshots_rebuilds_the_same_state_and_a_clean_stop_needs_no_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshots every 10 entries, so the crash comes after several of them and a rebuild must load
    // the latest one and apply only the log after it.
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "[raft]\nsnapshot_every_entries = 10\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args = ["--config", config.as_str()];
    let mut f = fixture(&args).await;

    // Entity merges count versions: applying any entry twice would show.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..35u64 {
        f.client
            .update_entity(
                EntityUpdate::new("contact", "1", json!({ "calls": i })).stamp(t + i, 1, "crm"),
            )
            .await
            .unwrap();
    }
    let original = f
        .client
        .publish(Publish::new("orders.placed", "{}").idempotency_key("order-1"))
        .await
        .unwrap();
    for i in 0..12 {
        f.client
            .publish(Publish::new(format!("orders.p{i}"), "{}"))
            .await
            .unwrap();
    }
    let before = state(&f.client).await;
    assert_eq!((before.0, &before.1), (35, &json!({ "calls": 34 })));

    f.broker.kill9();
    f.broker.restart(&args).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    assert_eq!(state(&client).await, before, "the state after the crash");
    assert_eq!(f.broker.log().matches(REBUILD_WARNING).count(), 1);
    let retry = client
        .publish(Publish::new("orders.placed", "{}").idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(retry.duplicate, "the dedup record was rebuilt too");
    assert_eq!(retry.offset, original.offset);
    let next = client
        .publish(Publish::new("orders.next", "{}"))
        .await
        .unwrap();
    assert_eq!(next.offset, before.2.last().unwrap().0 + 1);

    // A clean stop: the next start trusts the store as it is.
    let after = state(&client).await;
    drop(client);
    let status = f.broker.terminate().unwrap();
    assert!(status.success(), "{status:?}; log:\n{}", f.broker.log());
    f.broker.restart(&args).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    assert_eq!(state(&client).await, after);
    assert_eq!(
        f.broker.log().matches(REBUILD_WARNING).count(),
        1,
        "no rebuild after a clean stop"
    );
}

/// Flips one byte of the file at `path`.
fn flip(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn damaged_snapshot_files_and_a_lost_state_store_are_repaired_or_refused_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "[raft]\nsnapshot_every_entries = 10\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args = ["--config", config.as_str()];
    let mut f = fixture(&args).await;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..35u64 {
        f.client
            .update_entity(
                EntityUpdate::new("contact", "1", json!({ "calls": i })).stamp(t + i, 1, "crm"),
            )
            .await
            .unwrap();
    }
    for i in 0..40 {
        f.client
            .publish(Publish::new(format!("orders.p{i}"), "{}"))
            .await
            .unwrap();
    }
    let before = state(&f.client).await;
    let snapshots = f.broker.data_dir.join("state").join("snapshots");

    // The pointer to the current snapshot damaged after a crash: repaired from the snapshot file
    // itself, never trusted (a wrong index there would lose or replay entries).
    f.broker.kill9();
    flip(&snapshots.join("current"), 67);
    f.broker.restart(&args).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    assert_eq!(state(&client).await, before, "the state after the repair");
    assert!(
        f.broker.log().contains("the snapshot pointer is damaged"),
        "{}",
        f.broker.log()
    );

    // The state store lost after a clean stop: rebuilt from the snapshot and the log.
    drop((client, f.client));
    assert!(f.broker.terminate().unwrap().success());
    std::fs::remove_file(f.broker.data_dir.join("state").join("db")).unwrap();
    f.broker.restart(&args).unwrap();
    let client = Client::connect(f.broker.url()).await.unwrap();
    assert_eq!(state(&client).await, before, "the state after the rebuild");
    assert!(
        f.broker
            .log()
            .contains("the state store (state/db) is damaged; set aside"),
        "{}",
        f.broker.log()
    );

    // The pointer and every snapshot file damaged: nothing to repair from, so the start is
    // refused, naming the file and the way back — no panic, no silent start.
    drop(client);
    f.broker.kill9();
    flip(&snapshots.join("current"), 67);
    for entry in std::fs::read_dir(&snapshots).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "snap") {
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }
    }
    let data_dir = f.broker.data_dir.clone();
    let refused = switchboard_e2e::BrokerProcess::start(&data_dir, &args);
    assert!(refused.is_err(), "a start from damaged snapshots");
    let log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap();
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("snapshots/current is damaged"), "{log}");
    assert!(last.contains("The way back"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
