//! Power loss, simulated: each broker's data folder is a lazy disk
//! (`switchboard_e2e::power_loss`), a FUSE file system that forgets at a simulated power cut
//! every write since the file's last `fsync`/`fdatasync` — what a `kill -9` cannot show, since
//! the page cache survives a process. After a cut the brokers see a new boot id
//! (`SWITCHBOARD_BOOT_ID_FILE`), as after a real power loss. Needs `/dev/fuse` and
//! `fusermount3` (root here); skipped with a message without them, a failure under CI.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchboard_client::{Client, HistoryQuery, Publish, Start};
use switchboard_e2e::history::{digest, History};
use switchboard_e2e::power_loss::{BootId, Cut, LazyDisk};
use switchboard_e2e::{eventually, start_cluster, BrokerProcess, ClusterNode, DEADLINE};

use crate::common::payload_text;

const CHANNEL: &str = "power.orders";
const PUBLISHERS: usize = 3;
const PER_PUBLISHER: usize = 400;

/// A lazy disk per node, mounted where `start_cluster` puts node `id`'s data (`root/node<id>`).
fn lazy_disks(root: &std::path::Path, n: u64) -> Option<Vec<LazyDisk>> {
    (1..=n)
        .map(|id| {
            LazyDisk::for_test(
                &root.join(format!("backing{id}")),
                &root.join(format!("node{id}")),
            )
        })
        .collect()
}

/// Asserts that a broker restarted after a cut did not repair its state store in place from its
/// undo log, which speaks only for a crash of the process in the same boot: after a power loss
/// the store is rebuilt from the snapshot and the log (the cut emptied the never-synced undo log,
/// or it is from another boot — `SWITCHBOARD_BOOT_ID_FILE` — when a torn cut kept some of it, or
/// sled found its own never-synced `conf` torn and the store was set aside), or, when nothing of
/// the store had been synced, it starts as new.
fn assert_seen_as_power_loss(what: &str, log: &str) {
    assert!(
        !log.contains("not stopped cleanly, but it is whole"),
        "{what} repaired its state store in place from its undo log after a power cut: {log}"
    );
}

/// The public URLs publishers cycle over; replaced when nodes restart on new ports.
type Urls = Arc<RwLock<Vec<String>>>;

fn urls_of(nodes: &[ClusterNode]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.process.is_some())
        .map(ClusterNode::url)
        .collect()
}

/// A subscriber's name and what it received (offset, payload), filled as it runs.
type Seen = (String, Arc<Mutex<Vec<(u64, String)>>>);

/// One acknowledged publish: its offset, its payload (which names it), when the ack arrived.
type Acked = (u64, String, Instant);

/// Publishes `count` messages one after another, each with its name as idempotency key, retried
/// on the next node until acknowledged (a retry of one that did commit is answered with its
/// original offset).
async fn publisher(p: usize, count: usize, urls: Urls, acked: Arc<AtomicUsize>) -> Vec<Acked> {
    let mut clients: BTreeMap<String, Client> = BTreeMap::new();
    let mut out = Vec::with_capacity(count);
    let mut attempt = p;
    for i in 0..count {
        let key = format!("p{p}-{i}");
        let payload = format!("{{\"id\":\"{key}\"}}");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let url = {
                let urls = urls.read().unwrap();
                urls[attempt % urls.len()].clone()
            };
            let client = match clients.get(&url) {
                Some(client) => Some(client.clone()),
                None => Client::connect(url.clone()).await.ok().inspect(|client| {
                    clients.insert(url.clone(), client.clone());
                }),
            };
            let answer = match client {
                Some(client) => {
                    let publish =
                        Publish::new(CHANNEL, payload.clone()).idempotency_key(key.as_str());
                    tokio::time::timeout(Duration::from_secs(5), client.publish(publish))
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                None => None,
            };
            if let Some(ack) = answer {
                out.push((ack.offset, payload, Instant::now()));
                acked.fetch_add(1, Ordering::SeqCst);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key} not acknowledged within 90 s"
            );
            attempt += 1;
            // Pacing between retries while nodes are down, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    out
}

/// A subscriber from the start of the log on `url`, recording what it receives until its stream
/// ends (its node dies) or `stop` is set.
fn subscriber(url: String, seen: Arc<Mutex<Vec<(u64, String)>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(client) = Client::connect(url).await else {
            return;
        };
        let Ok(mut subscription) = client.subscribe("power.>", Start::Earliest).await else {
            return;
        };
        while let Some(Ok(message)) = subscription.next().await {
            seen.lock()
                .unwrap()
                .push((message.offset, payload_text(&message)));
        }
    })
}

/// Everything `url` delivers from the start of its log, once it delivered `up_to`.
async fn delivered_up_to(url: &str, up_to: u64) -> Vec<(u64, String)> {
    let client = Client::connect(url.to_owned()).await.unwrap();
    let mut subscription = client.subscribe("power.>", Start::Earliest).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while seen.last().is_none_or(|(offset, _)| *offset < up_to) {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(message))) => seen.push((message.offset, payload_text(&message))),
            other => panic!(
                "{url}: the subscription stopped after {} messages, before offset {up_to}: \
                 {other:?}",
                seen.len()
            ),
        }
    }
    seen
}

/// A node's whole stored log, offset → payload, and its digest.
async fn stored(url: &str) -> Option<(BTreeMap<u64, String>, String)> {
    let client = Client::connect(url.to_owned()).await.ok()?;
    let messages = client
        .history_all(HistoryQuery::new(">").from(Start::Earliest), 100_000)
        .await
        .ok()?;
    let log = messages
        .iter()
        .map(|m| (m.offset, payload_text(m)))
        .collect();
    let digest = digest(
        messages
            .iter()
            .map(|m| (m.offset, m.channel.as_str(), m.payload.as_ref())),
    );
    Some((log, digest))
}

/// The logs of every node once they agree (followers may still be catching up).
async fn agreed_logs(urls: &[String]) -> Vec<(BTreeMap<u64, String>, String)> {
    eventually("every node holding the same log", || async {
        let mut logs = Vec::new();
        for url in urls {
            logs.push(stored(url).await?);
        }
        logs.windows(2).all(|w| w[0].1 == w[1].1).then_some(logs)
    })
    .await
    .unwrap()
}

/// The checks after a cut: the history checker over every ack, the subscribers before the cut
/// (their deliveries still name offsets), a subscriber per node from the start after it, and each
/// node's digest; then no message stored twice.
async fn check_after_the_cut(acked: &[Acked], before: &[Seen], urls: &[String]) {
    let mut history = History::new();
    for (offset, payload, _) in acked {
        history.acked(*offset, payload.clone());
    }
    for (name, seen) in before {
        history.subscriber(name);
        for (offset, payload) in seen.lock().unwrap().iter() {
            history.delivered(name, *offset, payload.clone());
        }
    }
    let last = acked.iter().map(|(offset, _, _)| *offset).max().unwrap();
    let mut surviving = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let name = format!("after-cut-node{}", i + 1);
        history.subscriber(&name);
        for (offset, payload) in delivered_up_to(url, last).await {
            history.delivered(&name, offset, payload);
        }
        surviving.push(name);
    }
    let logs = agreed_logs(urls).await;
    for (i, (_, digest)) in logs.iter().enumerate() {
        history.node_digest(&format!("node{}", i + 1), digest.clone());
    }
    let surviving: Vec<&str> = surviving.iter().map(String::as_str).collect();
    if let Err(anomalies) = history.check(&surviving) {
        panic!(
            "{} anomalies after the power cut, first ones: {:#?}",
            anomalies.len(),
            &anomalies[..anomalies.len().min(10)]
        );
    }
    let (log, _) = &logs[0];
    let distinct: BTreeSet<&String> = log.values().collect();
    assert_eq!(
        distinct.len(),
        log.len(),
        "a message stored twice (idempotent retries across the cut)"
    );
    assert_eq!(
        log.len(),
        PUBLISHERS * PER_PUBLISHER,
        "every message stored once"
    );
}

/// Starts the publishers and a subscriber per node.
fn start_load(
    nodes: &[ClusterNode],
    urls: &Urls,
    acked: &Arc<AtomicUsize>,
) -> (Vec<tokio::task::JoinHandle<Vec<Acked>>>, Vec<Seen>) {
    let mut before = Vec::new();
    for node in nodes {
        let seen = Arc::new(Mutex::new(Vec::new()));
        subscriber(node.url(), seen.clone());
        before.push((format!("before-cut-node{}", node.id), seen));
    }
    let publishers = (0..PUBLISHERS)
        .map(|p| tokio::spawn(publisher(p, PER_PUBLISHER, urls.clone(), acked.clone())))
        .collect();
    (publishers, before)
}

async fn wait_for_acks(acked: &AtomicUsize, n: usize) {
    eventually("acknowledgements before the cut", || async {
        (acked.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await
    .unwrap();
}

async fn settled(url: &str) -> u64 {
    let client = Client::connect(url.to_owned()).await.unwrap();
    eventually("a leader", || async {
        let status = client.cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(status.leader_id)
    })
    .await
    .unwrap()
}

/// Scenario 1: three nodes under load with `fsync = "always"`, the power of all three cut at
/// once (every unsynced write on every node lost), then restarted: no acknowledged message lost
/// or stored twice, the same log on every node, subscribers see everything in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_of_every_node_at_once_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut disks) = lazy_disks(dir.path(), 3) else {
        return;
    };
    let mut boot = BootId::create(&dir.path().join("boot_id")).unwrap();
    let boot_file = boot.path.to_string_lossy().into_owned();
    let mut nodes = start_cluster(
        dir.path(),
        3,
        &[("SWITCHBOARD_BOOT_ID_FILE", boot_file.as_str())],
    )
    .expect("three nodes start");
    settled(&nodes[0].url()).await;
    let urls: Urls = Arc::new(RwLock::new(urls_of(&nodes)));
    let acked = Arc::new(AtomicUsize::new(0));
    let (publishers, before) = start_load(&nodes, &urls, &acked);
    wait_for_acks(&acked, PUBLISHERS * PER_PUBLISHER / 3).await;

    for node in &mut nodes {
        node.kill9();
    }
    for (i, disk) in disks.iter_mut().enumerate() {
        let report = disk.power_cut(Cut::Clean).unwrap();
        eprintln!(
            "node{}: power cut took back {} unsynced changes in {} files",
            i + 1,
            report.undone,
            report.files
        );
        assert!(
            report.files > 0,
            "node{}: the cut found nothing unsynced (the state store is synced lazily, so it \
             should have)",
            i + 1
        );
    }
    boot.new_boot().unwrap();
    for node in &mut nodes {
        node.start_again()
            .unwrap_or_else(|e| panic!("node{} starts after the cut: {e:#}", node.id));
    }
    *urls.write().unwrap() = urls_of(&nodes);
    for node in &nodes {
        assert_seen_as_power_loss(&format!("node{}", node.id), &node.process().log());
    }

    let mut all = Vec::new();
    for publisher in publishers {
        all.extend(publisher.await.unwrap());
    }
    let urls = urls_of(&nodes);
    check_after_the_cut(&all, &before, &urls).await;
}

/// Scenario 2: a minority (one follower) loses power with torn writes (a random prefix of each
/// file's unsynced writes kept, the last perhaps in part, at 512-byte sector boundaries) while
/// the other two go on acknowledging; it restarts, catches up, and the same checks hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_losing_power_with_torn_writes_catches_up_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut disks) = lazy_disks(dir.path(), 3) else {
        return;
    };
    let mut boot = BootId::create(&dir.path().join("boot_id")).unwrap();
    let boot_file = boot.path.to_string_lossy().into_owned();
    let mut nodes = start_cluster(
        dir.path(),
        3,
        &[("SWITCHBOARD_BOOT_ID_FILE", boot_file.as_str())],
    )
    .expect("three nodes start");
    let leader = settled(&nodes[0].url()).await;
    let follower = usize::try_from(if leader == 1 { 2 } else { 1 }).unwrap() - 1;
    let urls: Urls = Arc::new(RwLock::new(urls_of(&nodes)));
    let acked = Arc::new(AtomicUsize::new(0));
    let (publishers, before) = start_load(&nodes, &urls, &acked);
    wait_for_acks(&acked, PUBLISHERS * PER_PUBLISHER / 3).await;

    nodes[follower].kill9();
    *urls.write().unwrap() = urls_of(&nodes);
    let seed = std::env::var("POWER_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!(
        "torn power cut of node{} with seed {seed} (replay: POWER_CUT_SEED={seed})",
        follower + 1
    );
    let report = disks[follower].power_cut(Cut::Torn { seed }).unwrap();
    eprintln!("node{}: {report:?}", follower + 1);
    // The others keep going; the follower comes back in a new boot while they do.
    wait_for_acks(&acked, PUBLISHERS * PER_PUBLISHER / 2).await;
    boot.new_boot().unwrap();
    nodes[follower].start_again().unwrap_or_else(|e| {
        panic!(
            "node{} starts after a torn cut (seed {seed}): {e:#}",
            follower + 1
        )
    });
    *urls.write().unwrap() = urls_of(&nodes);
    assert_seen_as_power_loss("the follower", &nodes[follower].process().log());

    let mut all = Vec::new();
    for publisher in publishers {
        all.extend(publisher.await.unwrap());
    }
    let urls = urls_of(&nodes);
    check_after_the_cut(&all, &before, &urls).await;
}

/// What a lone node lost to a power cut under load: the acks (with their arrival times) and
/// which of them are gone after the restart, and when the cut came.
struct LoneCut {
    acked: Vec<Acked>,
    lost: Vec<Acked>,
    cut_at: Instant,
}

/// A lone node on a lazy disk with `fsync` and `sync_interval`, two publishers until
/// `min_acks` are acknowledged and at least `min_run` has passed, then a power cut; returns what
/// was acknowledged and what the restarted node no longer holds.
async fn lone_node_cut(
    fsync: &str,
    sync_interval: &str,
    min_acks: usize,
    min_run: Duration,
) -> Option<LoneCut> {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = LazyDisk::for_test(&dir.path().join("backing"), &dir.path().join("data"))?;
    let mut boot = BootId::create(&dir.path().join("boot_id")).unwrap();
    let boot_file = boot.path.to_string_lossy().into_owned();
    let env = [
        ("SWITCHBOARD_BOOT_ID_FILE", boot_file.as_str()),
        ("SWITCHBOARD_DURABILITY_FSYNC", fsync),
        ("SWITCHBOARD_DURABILITY_SYNC_INTERVAL", sync_interval),
    ];
    let mut broker = BrokerProcess::start_with_env(&disk.path, "127.0.0.1:0", &[], &env).unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..2 {
        let client = Client::connect(broker.url()).await.unwrap();
        let acked = acked.clone();
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let payload = format!("{{\"id\":\"p{p}-{i}\"}}");
                match client.publish(Publish::new(CHANNEL, payload.clone())).await {
                    Ok(ack) => acked
                        .lock()
                        .unwrap()
                        .push((ack.offset, payload, Instant::now())),
                    Err(_) => break,
                }
            }
        }));
    }
    let started = Instant::now();
    eventually("enough acknowledgements before the cut", || async {
        (acked.lock().unwrap().len() >= min_acks && started.elapsed() >= min_run).then_some(())
    })
    .await
    .unwrap();
    let cut_at = Instant::now();
    broker.kill9();
    stop.store(true, Ordering::SeqCst);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let report = disk.power_cut(Cut::Clean).unwrap();
    eprintln!(
        "fsync={fsync} sync_interval={sync_interval}: the cut took back {} changes in {} files",
        report.undone, report.files
    );
    boot.new_boot().unwrap();
    let broker = BrokerProcess::start_with_env(&disk.path, "127.0.0.1:0", &[], &env)
        .unwrap_or_else(|e| panic!("fsync={fsync}: the node starts after the cut: {e:#}"));
    assert_seen_as_power_loss("the lone node", &broker.log());
    let (log, _) = stored(&broker.url()).await.unwrap();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for (offset, payload, _) in &acked {
        if let Some(found) = log.get(offset) {
            assert_eq!(
                found, payload,
                "offset {offset} names another message after the cut"
            );
        }
    }
    let lost = acked
        .iter()
        .filter(|(offset, _, _)| !log.contains_key(offset))
        .cloned()
        .collect();
    Some(LoneCut {
        acked,
        lost,
        cut_at,
    })
}

/// Scenario 3: a lone node. With `fsync = "always"` a power cut loses no acknowledged message;
/// with `fsync = "periodic"` it loses only messages acknowledged within the window DURABILITY.md
/// states (`sync_interval` plus the time a sync takes) before the cut; and with a sync interval
/// of an hour it loses what was acknowledged since the start — the lazy disk does drop unsynced
/// writes, so the first two results mean something.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_node_loses_nothing_acknowledged_with_fsync_always_and_only_the_window_with_periodic(
) {
    let Some(always) = lone_node_cut("always", "200ms", 600, Duration::ZERO).await else {
        return;
    };
    assert!(
        always.lost.is_empty(),
        "fsync=always lost {} of {} acknowledged messages to a power cut, e.g. {:?}",
        always.lost.len(),
        always.acked.len(),
        &always.lost[..always.lost.len().min(5)]
    );

    // The stated window, plus slack for a sync's own time and the scheduling of a loaded 2-core
    // machine running the whole suite (the lazy disk's syncs are instant).
    let interval = Duration::from_millis(500);
    let slack = Duration::from_secs(1);
    let periodic = lone_node_cut("periodic", "500ms", 1000, Duration::from_secs(3))
        .await
        .unwrap();
    let oldest_allowed = periodic.cut_at - interval - slack;
    let beyond: Vec<_> = periodic
        .lost
        .iter()
        .filter(|(_, _, at)| *at < oldest_allowed)
        .map(|(offset, _, at)| (*offset, periodic.cut_at - *at))
        .collect();
    eprintln!(
        "fsync=periodic, sync_interval 500ms: {} of {} acknowledged lost, the oldest acknowledged \
         {:?} before the cut",
        periodic.lost.len(),
        periodic.acked.len(),
        periodic
            .lost
            .iter()
            .map(|(_, _, at)| periodic.cut_at - *at)
            .max()
    );
    assert!(
        beyond.is_empty(),
        "fsync=periodic lost messages acknowledged longer than sync_interval + {slack:?} before \
         the cut (offset, age): {:?}",
        &beyond[..beyond.len().min(10)]
    );
    let kept_old = periodic
        .acked
        .iter()
        .filter(|(_, _, at)| *at < oldest_allowed)
        .count();
    assert!(
        kept_old > 0,
        "the run had acknowledgements older than the window"
    );

    let never_synced = lone_node_cut("periodic", "1h", 300, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        never_synced.lost.len() * 2 > never_synced.acked.len(),
        "with no sync for an hour most acknowledged messages are lost at a power cut: {} of {}",
        never_synced.lost.len(),
        never_synced.acked.len()
    );
}

/// The lazy disk itself, through the mount: a cut keeps what each file's last sync made durable
/// (a synced write, a synced temporary file renamed into place, a length before an unsynced
/// truncation) and loses the rest; a torn cut keeps a prefix cut at a sector boundary, the rest
/// gone or zero-filled; and a sync of one file does not make another's writes durable.
#[test]
fn the_lazy_disk_keeps_what_was_synced_and_loses_the_rest() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    let dir = tempfile::tempdir().unwrap();
    let Some(mut disk) = LazyDisk::for_test(&dir.path().join("backing"), &dir.path().join("disk"))
    else {
        return;
    };
    let root = disk.path.clone();
    let at = |name: &str| root.join(name);
    let mut synced = std::fs::File::create(at("synced")).unwrap();
    synced.write_all(b"durable").unwrap();
    synced.sync_data().unwrap();
    synced.write_all(b" and lost").unwrap();
    let mut temporary = std::fs::File::create(at("temporary")).unwrap();
    temporary.write_all(b"replaced atomically").unwrap();
    temporary.sync_all().unwrap();
    std::fs::rename(at("temporary"), at("renamed")).unwrap();
    let cut_short = std::fs::File::create(at("cut-short")).unwrap();
    cut_short.write_all_at(&[7u8; 1000], 0).unwrap();
    cut_short.sync_data().unwrap();
    cut_short.set_len(10).unwrap();
    cut_short.write_all_at(b"over", 2).unwrap();
    let mut other = std::fs::File::create(at("never-synced")).unwrap();
    other.write_all(b"gone").unwrap();
    assert_eq!(disk.unsynced_changes(), 4);
    drop((synced, temporary, cut_short, other));

    disk.power_cut(Cut::Clean).unwrap();
    assert_eq!(std::fs::read(at("synced")).unwrap(), b"durable");
    assert_eq!(
        std::fs::read(at("renamed")).unwrap(),
        b"replaced atomically"
    );
    assert_eq!(std::fs::read(at("cut-short")).unwrap(), vec![7u8; 1000]);
    assert_eq!(
        std::fs::read(at("never-synced")).unwrap(),
        b"",
        "created (the namespace is durable at once), its write lost"
    );
    assert_eq!(disk.unsynced_changes(), 0);

    // Torn: 2000 bytes written at once onto an empty file, with several seeds.
    let written: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut shapes = BTreeSet::new();
    for seed in 0..16 {
        std::fs::write(at("torn"), &written).unwrap();
        disk.power_cut(Cut::Torn { seed }).unwrap();
        let after = std::fs::read(at("torn")).unwrap();
        let kept = after.iter().take_while(|b| **b != 0).count();
        assert!(
            kept % 512 == 0 || kept == written.len(),
            "seed {seed}: kept {kept} bytes, not at a sector boundary"
        );
        assert_eq!(after[..kept], written[..kept], "seed {seed}: a prefix kept");
        assert!(
            after[kept..].iter().all(|b| *b == 0),
            "seed {seed}: the rest gone or zeros"
        );
        shapes.insert((kept, after.len()));
        std::fs::remove_file(at("torn")).unwrap();
    }
    assert!(
        shapes.len() > 2,
        "torn cuts keep different prefixes: {shapes:?}"
    );
}
