//! A full disk: writes are refused with a reason before they reach the log, reads go on, and
//! writes resume by themselves once there is room; a disk filled behind the broker's back (the
//! floor turned off) stops the process with a clear message, and nothing acknowledged is lost.
//! Each runs on a small tmpfs of its own (root needed; skipped with a message without it, a
//! failure under CI).

use std::collections::BTreeMap;

use switchboard_client::{Client, HistoryQuery, Publish, Reason, Start};
use switchboard_e2e::{eventually, http_get, BrokerProcess, SmallDisk};

use crate::common::payload_text;

const DISK_BYTES: u64 = 48 << 20;
const PAYLOAD_BYTES: usize = 60 << 10;

/// Publishes 60 KiB messages until one is refused, returning the acknowledged ones and the
/// refusal. At most enough to fill the disk twice over.
async fn publish_until_refused(
    client: &Client,
    acked: &mut BTreeMap<u64, String>,
) -> switchboard_client::Error {
    let filler = "x".repeat(PAYLOAD_BYTES);
    for i in 0..(2 * DISK_BYTES as usize / PAYLOAD_BYTES) {
        let payload = format!("{{\"i\":{i},\"fill\":\"{filler}\"}}");
        match client
            .publish(Publish::new(format!("fill.m{i}"), payload.clone()))
            .await
        {
            Ok(ack) => {
                acked.insert(ack.offset, payload);
            }
            Err(e) => return e,
        }
    }
    panic!(
        "{} publishes of {PAYLOAD_BYTES} bytes were all accepted on a {DISK_BYTES}-byte disk",
        acked.len()
    );
}

async fn stored(client: &Client) -> BTreeMap<u64, String> {
    client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 100_000)
        .await
        .unwrap()
        .iter()
        .map(|m| (m.offset, payload_text(m)))
        .collect()
}

/// Takes `bytes` of the disk with a file of its own, to be removed to make room.
fn ballast(disk: &SmallDisk, bytes: usize) -> std::path::PathBuf {
    let path = disk.path.join("ballast");
    std::fs::write(&path, vec![1u8; bytes]).unwrap();
    path
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_writes_with_a_reason_serves_reads_and_recovers_without_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::for_test(&dir.path().join("disk"), DISK_BYTES) else {
        return;
    };
    let room = ballast(&disk, 16 << 20);
    let data_dir = disk.path.join("data");
    let broker = BrokerProcess::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &[],
        &[("SWITCHBOARD_STORE_MIN_FREE_BYTES", "8388608")],
    )
    .unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let mut acked = BTreeMap::new();
    // Refusals come first from the bytes admitted since the last measurement of free space;
    // health reports the disk full once a measurement finds it below the floor.
    let health_url = format!("{}/healthz", broker.admin_url());
    let deadline = std::time::Instant::now() + switchboard_e2e::DEADLINE;
    let health = loop {
        let refused = publish_until_refused(&client, &mut acked).await;
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert_eq!(refused.reason(), Some(Reason::StorageFull), "{refused}");
        assert!(
            refused.to_string().contains("store.min_free_bytes"),
            "{refused}"
        );
        let health = http_get(&health_url).await.unwrap();
        if health.status == 503 {
            break health;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes are refused but the disk was never reported full: {}",
            health.body
        );
        // Poll again after the next measurement of free space.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(health.body.starts_with("storage full"), "{}", health.body);
    assert!(!acked.is_empty());
    // Reads go on, and say nothing was lost.
    assert_eq!(stored(&client).await, acked);

    // Room again: writes resume by themselves.
    std::fs::remove_file(room).unwrap();
    let ack = eventually("a publish is accepted once there is room", || async {
        client.publish(Publish::new("fill.after", "{}")).await.ok()
    })
    .await
    .unwrap();
    acked.insert(ack.offset, "{}".into());
    assert_eq!(stored(&client).await, acked);
    let health = http_get(&format!("{}/healthz", broker.admin_url()))
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
}

#[tokio::test]
async fn a_disk_filled_without_a_floor_stops_the_broker_with_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::for_test(&dir.path().join("disk"), DISK_BYTES) else {
        return;
    };
    let room = ballast(&disk, 16 << 20);
    let data_dir = disk.path.join("data");
    let floor_off = [("SWITCHBOARD_STORE_MIN_FREE_BYTES", "0")];
    let mut broker =
        BrokerProcess::start_with_env(&data_dir, "127.0.0.1:0", &[], &floor_off).unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let mut acked = BTreeMap::new();
    let failed = publish_until_refused(&client, &mut acked).await;
    drop(client);

    // The node does not linger as a zombie: it stops, non-zero, saying why.
    let status = broker.wait_exit().unwrap();
    assert!(!status.success(), "{status:?}");
    let log = broker.log();
    assert!(log.contains("raft stopped on this node"), "{failed}\n{log}");
    assert!(log.contains("No space left on device"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // Room again (what a supervisor's restart meets once an operator acted): everything
    // acknowledged is there.
    std::fs::remove_file(room).unwrap();
    let broker = BrokerProcess::start_with_env(&data_dir, "127.0.0.1:0", &[], &floor_off).unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let stored = stored(&client).await;
    for (offset, payload) in &acked {
        assert_eq!(
            stored.get(offset),
            Some(payload),
            "acknowledged offset {offset}"
        );
    }
    client
        .publish(Publish::new("fill.after", "{}"))
        .await
        .unwrap();
}

/// Bytes of every file under `dir`.
fn folder_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => folder_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn retention_bounds_the_whole_data_folder() {
    const MAX_BYTES: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let max_bytes = MAX_BYTES.to_string();
    let broker = BrokerProcess::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &[],
        &[
            ("SWITCHBOARD_RETENTION_MAX_BYTES", max_bytes.as_str()),
            ("SWITCHBOARD_RETENTION_SWEEP_INTERVAL", "50ms"),
            ("SWITCHBOARD_RAFT_SNAPSHOT_LOG_BYTES", max_bytes.as_str()),
        ],
    )
    .unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    // 30 times the bound, from eight publishers at once.
    let filler = "x".repeat(PAYLOAD_BYTES);
    let rounds = 30 * MAX_BYTES as usize / PAYLOAD_BYTES / 8;
    let mut largest = 0;
    for round in 0..rounds {
        let mut publishes = Vec::new();
        for p in 0..8 {
            let payload = format!("{{\"r\":{round},\"p\":{p},\"fill\":\"{filler}\"}}");
            publishes.push(client.publish(Publish::new(format!("fill.p{p}"), payload)));
        }
        for ack in futures::future::join_all(publishes).await {
            ack.unwrap();
        }
        largest = largest.max(folder_bytes(&data_dir));
    }
    eprintln!("largest data folder while publishing: {largest} bytes");
    // docs/DURABILITY.md: about 4 × retention.max_bytes + raft.snapshot_log_bytes + 16 MiB,
    // plus what arrives while sweeps, snapshots and reclaims catch up (~100 ms each); measured
    // here ~36 MiB at ~48 MB/s of publishes.
    let bound = 5 * MAX_BYTES + 2 * MAX_BYTES + (16 << 20);
    assert!(largest < bound, "{largest} bytes > {bound}");
    // Once sweeps, snapshots and reclaims caught up, it is back within a small multiple.
    let settled = eventually("the data folder to shrink", || async {
        let now = folder_bytes(&data_dir);
        (now < 5 * MAX_BYTES + (8 << 20)).then_some(now)
    })
    .await
    .unwrap();
    eprintln!("settled at {settled} bytes");
}
