//! Durability: every acknowledged message survives `kill -9`, in offset order; the state a crash
//! leaves is recovered in place (the entry it cut short undone) or rebuilt from the snapshot and
//! the log, exactly; a clean stop needs neither.

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
const REBUILD_WARNING: &str = "not stopped cleanly; rebuilding";
/// What the state logs when a crash is recovered in place.
const RECOVERED_IN_PLACE: &str = "it is whole: the log is applied from its position on";

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

/// A config file in `dir` that takes a snapshot every 10 log entries; its path.
fn snapshots_every_10_entries(dir: &std::path::Path) -> String {
    let config = dir.join("switchboard.toml");
    std::fs::write(&config, "[raft]\nsnapshot_every_entries = 10\n").unwrap();
    config.to_str().unwrap().to_owned()
}

/// Updates entity `contact.1` 35 times (its `calls` field 0 to 34). Entity merges count
/// versions: applying any entry twice would show in the version.
async fn update_one_entity_35_times(client: &Client) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..35u64 {
        client
            .update_entity(
                EntityUpdate::new("contact", "1", json!({ "calls": i })).stamp(t + i, 1, "crm"),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_crash_after_snapshots_recovers_the_same_state_in_place_and_a_clean_stop_needs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshots every 10 entries, so the crash comes after several of them and a rebuild must load
    // the latest one and apply only the log after it.
    let config = snapshots_every_10_entries(dir.path());
    let args = ["--config", config.as_str()];
    let mut f = fixture(&args).await;
    update_one_entity_35_times(&f.client).await;
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
    // Recovered in place: the entry the crash cut short (if any) undone, no snapshot load.
    assert_eq!(f.broker.log().matches(RECOVERED_IN_PLACE).count(), 1);
    assert_eq!(f.broker.log().matches(REBUILD_WARNING).count(), 0);
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
        f.broker.log().matches(REBUILD_WARNING).count()
            + f.broker.log().matches(RECOVERED_IN_PLACE).count(),
        1,
        "nothing to recover after a clean stop"
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
    let config = snapshots_every_10_entries(dir.path());
    let args = ["--config", config.as_str()];
    let mut f = fixture(&args).await;
    update_one_entity_35_times(&f.client).await;
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

#[tokio::test]
async fn kill_9_during_writes_again_and_again_applies_every_entry_exactly_once() {
    let mut f = fixture(&[]).await;
    // Every publish carries its key; every entity update adds one to the entity's version.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut updates_acked = 0u64;
    let mut updates_sent = 0u64;
    for cycle in 0..6u64 {
        let client = Client::connect(f.broker.url()).await.unwrap();
        let mut tasks = Vec::new();
        for p in 0..4u64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0.. {
                    let key = format!("c{cycle}-p{p}-{i}");
                    match client
                        .publish(Publish::new(format!("orders.p{p}"), "{}").idempotency_key(&key))
                        .await
                    {
                        Ok(ack) => acked.push((key, ack.offset)),
                        Err(_) => return acked,
                    }
                }
                acked
            }));
        }
        let writer = client.clone();
        let updates = tokio::spawn(async move {
            let (mut sent, mut ok) = (0u64, 0u64);
            for i in 0.. {
                sent += 1;
                // Stamped by the client's clock, which only moves forward.
                let update = EntityUpdate::new("contact", "1", json!({ "n": i }));
                if writer.update_entity(update).await.is_err() {
                    return (sent, ok);
                }
                ok += 1;
            }
            (sent, ok)
        });
        // Kill in the middle of the writes, once some are acknowledged and the state store has
        // written part of them out (sled keeps the rest in its buffers): a crash then finds
        // entries to undo.
        let probe = Client::connect(f.broker.url()).await.unwrap();
        let db = f.broker.data_dir.join("state").join("db");
        let db_size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        let written_before = db_size();
        let target = 40 * (cycle + 1);
        switchboard_e2e::eventually("writes under way and partly written out", || async {
            let info = probe.info().await.ok()?;
            (info.last_offset >= target && db_size() > written_before).then_some(())
        })
        .await
        .unwrap();
        f.broker.kill9();
        for task in tasks {
            acked.extend(task.await.unwrap());
        }
        let (sent, ok) = updates.await.unwrap();
        updates_sent += sent;
        updates_acked += ok;
        f.broker.restart(&[]).unwrap();
    }

    let client = Client::connect(f.broker.url()).await.unwrap();
    // Each acknowledged key is stored once, at its offset: a retry finds it.
    for (key, offset) in &acked {
        let channel = format!("orders.{}", key.split('-').nth(1).unwrap());
        let retry = client
            .publish(Publish::new(channel, "{}").idempotency_key(key))
            .await
            .unwrap();
        assert!(retry.duplicate, "{key}");
        assert_eq!(retry.offset, *offset, "{key}");
    }
    let stored = client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 100_000)
        .await
        .unwrap();
    let offsets: Vec<u64> = stored.iter().map(|m| m.offset).collect();
    let mut unique = offsets.clone();
    unique.dedup();
    assert_eq!(offsets, unique, "no offset twice");
    // No entity update applied twice (the version would run past what was sent).
    let version = client
        .get_entity("contact", "1", None)
        .await
        .unwrap()
        .into_entity()
        .unwrap()
        .version;
    assert!(
        (updates_acked..=updates_sent).contains(&version),
        "version {version}, {updates_acked} updates acknowledged of {updates_sent} sent"
    );
    let log = f.broker.log();
    assert!(log.contains(RECOVERED_IN_PLACE), "{log}");
    eprintln!(
        "{} restarts recovered in place, {} with entries undone, {} rebuilt",
        log.matches(RECOVERED_IN_PLACE).count(),
        log.matches("undoing the entries a crash cut short").count(),
        log.matches(REBUILD_WARNING).count()
    );
}
