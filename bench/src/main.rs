//! `switchboard-bench`: the side-by-side comparison of Switchboard with NATS JetStream asked for
//! in the benchmark issue. It starts each broker itself (a fresh one per workload, on a free
//! loopback port, with its data in a temporary folder), runs the same workloads against both, and
//! prints every figure side by side with the ratio; `--json FILE` writes them as JSON too.
//!
//! Every workload is bounded in count and in time and stops by itself. `bench/run.sh` installs
//! `nats-server`, builds the release binaries and runs the whole comparison.
//!
//! Layout:
//! - `main.rs`: the command line, the order of the runs, the table and the JSON;
//! - `brokers.rs`: starting, measuring (peak RSS, CPU seconds from `/proc`) and stopping brokers;
//! - `payload.rs`: the message bodies (sequence number and send time inside) and histograms;
//! - `tally.rs`: reading subscriptions and watches, and the figures made of what they saw;
//! - `sb.rs`: the workloads against Switchboard (`switchboard-client`);
//! - `nats.rs`: the same workloads against NATS JetStream (`async-nats`);
//! - `stalled.rs`: `--stalled`, the broker's memory with subscribers that never read (Switchboard
//!   alone, no comparison).
//! - `cluster.rs`: `--cluster`, the three-node workloads (W5) and each node's CPU per message
//!   (Switchboard alone, no comparison).

mod brokers;
mod cluster;
mod nats;
mod payload;
mod sb;
mod stalled;
mod tally;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;

use crate::brokers::{BrokerStats, NatsServer, SwitchboardBroker};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-bench",
    about = "Runs the same workloads against Switchboard and NATS JetStream and prints them side by side",
    after_help = "Workloads: W1 persisted publish, W2 latency at a fixed rate (W2a exact, W2b wildcard,\n\
                  W2e ephemeral messages against core NATS), W3 fan-out, W4 entity updates with watchers. See docs/BENCHMARKS.md.\n\n\
                  With --cluster (Switchboard alone, three voters on loopback, --replicas learners):\n\
                  W1 on one node (the reference), W5a-leader / W5a-follower W1's publisher sent to\n\
                  the leader / to a follower, W5b W2a with the subscriber on another node than the\n\
                  publisher, W5c W3 with the subscribers spread over the replicas (or the followers);\n\
                  each node's CPU per acknowledged and per delivered message.\n\n\
                  Examples: switchboard-bench --quick --only W1,W3\n\
                  \x20         switchboard-bench --cluster --replicas 2 --rounds 3 --json w5.json"
)]
struct Args {
    /// The `switchboard` broker binary.
    #[arg(long, default_value = "target/release/switchboard")]
    switchboard: PathBuf,

    /// The `nats-server` binary (Debian package `nats-server`).
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

    /// Instead of the comparison, run the three-node workloads (W5) against a Switchboard cluster
    /// of three voters on loopback, each with its own data folder under --data-root and
    /// `--fsync always`; fresh nodes for every workload. NATS is not run. `--only`, `--rounds`,
    /// `--quick`, `--size`, `--window` and `--json` apply.
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

/// One line of the side-by-side table.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    workload: &'static str,
    metric: String,
    unit: &'static str,
    switchboard_variant: &'static str,
    switchboard: Option<f64>,
    /// The lowest and highest of Switchboard's figures over the rounds.
    switchboard_range: Option<(f64, f64)>,
    nats: Option<f64>,
    /// Switchboard's figure divided by NATS's (of the medians, when there are several rounds).
    ratio: Option<f64>,
    /// The lowest and highest ratio of one round's figures (Switchboard's over NATS's in the
    /// same round).
    ratio_range: Option<(f64, f64)>,
    higher_is_better: bool,
}

const WORKLOADS: [(&str, &str); 6] = [
    ("W1", "persisted publish"),
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
    server.stop().await;
    let seconds = began.elapsed().as_secs_f64();
    match result {
        Ok(outcome) => {
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

    let mut runs = Vec::new();
    let sb = |fsync: &'static str| {
        let binary = args.switchboard.clone();
        let root = data_root.clone();
        move || SwitchboardBroker::start(binary, root, fsync)
    };
    let nats = || {
        let binary = args.nats_server.clone();
        let root = data_root.clone();
        move || NatsServer::start(binary, root)
    };

    for round in 1..=plan.rounds {
        if plan.rounds > 1 {
            eprintln!("[bench] round {round} of {}", plan.rounds);
        }
        let first = runs.len();
        if chosen.contains("W1") {
            let limit = Duration::from_secs(600);
            for (variant, fsync) in [
                ("switchboard", "always"),
                ("switchboard-periodic", "periodic"),
            ] {
                let p = plan.clone();
                runs.push(
                    run_one("W1", variant, limit, sb(fsync), move |url| async move {
                        sb::w1(&url, &p).await
                    })
                    .await,
                );
            }
            let p = plan.clone();
            runs.push(
                run_one("W1", "nats", limit, nats(), move |url| async move {
                    nats::w1(&url, &p).await
                })
                .await,
            );
        }
        for (id, subscribers, wildcard) in [
            ("W2a", 1, false),
            ("W2b", plan.w2_wildcard_subscribers, true),
        ] {
            if !chosen.contains(id) {
                continue;
            }
            let limit = plan.w2_warmup + plan.w2_duration + Duration::from_secs(60);
            let p = plan.clone();
            runs.push(
                run_one(
                    id,
                    "switchboard",
                    limit,
                    sb("always"),
                    move |url| async move { sb::w2(&url, &p, subscribers, wildcard).await },
                )
                .await,
            );
            let p = plan.clone();
            runs.push(
                run_one(id, "nats", limit, nats(), move |url| async move {
                    nats::w2(&url, &p, subscribers, wildcard).await
                })
                .await,
            );
        }
        if chosen.contains("W2e") {
            let limit = plan.w2_warmup + plan.w2_duration + Duration::from_secs(60);
            let p = plan.clone();
            runs.push(
                run_one(
                    "W2e",
                    "switchboard",
                    limit,
                    sb("always"),
                    move |url| async move { sb::w2_ephemeral(&url, &p).await },
                )
                .await,
            );
            let p = plan.clone();
            runs.push(
                run_one("W2e", "nats", limit, nats(), move |url| async move {
                    nats::w2_core(&url, &p).await
                })
                .await,
            );
        }
        if chosen.contains("W3") {
            let limit = plan.w3_duration + plan.w3_drain + Duration::from_secs(60);
            let p = plan.clone();
            runs.push(
                run_one(
                    "W3",
                    "switchboard",
                    limit,
                    sb("always"),
                    move |url| async move { sb::w3(&url, &p).await },
                )
                .await,
            );
            let p = plan.clone();
            runs.push(
                run_one("W3", "nats", limit, nats(), move |url| async move {
                    nats::w3(&url, &p).await
                })
                .await,
            );
        }
        if chosen.contains("W4") {
            let limit = Duration::from_secs(300);
            let p = plan.clone();
            runs.push(
                run_one(
                    "W4",
                    "switchboard",
                    limit,
                    sb("always"),
                    move |url| async move { sb::w4(&url, &p).await },
                )
                .await,
            );
            let p = plan.clone();
            runs.push(
                run_one("W4", "nats", limit, nats(), move |url| async move {
                    nats::w4(&url, &p).await
                })
                .await,
            );
        }
        for run in &mut runs[first..] {
            run.round = round;
        }
    }

    let rows = rows(&runs, &WORKLOADS);
    print_table(&rows, &runs, &plan, args.quick);
    let failed = runs.iter().any(|run| run.error.is_some());

    if let Some(path) = &args.json {
        let report = Report {
            date: chrono::Utc::now().to_rfc3339(),
            machine: brokers::machine(&data_root).await,
            versions: serde_json::json!({
                "switchboard": switchboard_version,
                "nats_server": nats_version,
                "async_nats": "0.51",
            }),
            durability: serde_json::json!({
                "switchboard": "fsync always: the ack follows an fdatasync of the raft log entry holding the message (group commit); W1 also runs fsync periodic (sync every 200 ms, ack after the write)",
                "nats": "JetStream file storage, one replica; nats-server 2.9 acks once the message is written to the file store (the page cache) and syncs in the background every 2 minutes (its file store's default sync interval; 2.9 has no sync_interval or sync_always setting)",
            }),
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

/// Pairs every Switchboard figure with NATS's figure for the same workload and metric, and adds
/// the brokers' peak RSS and CPU seconds; with several rounds, each figure is the median of the
/// rounds.
pub(crate) fn rows(runs: &[Run], workloads: &[(&'static str, &str)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &(workload, _) in workloads {
        let of = |broker: &str| -> Vec<&Run> {
            runs.iter()
                .filter(|run| run.workload == workload && run.broker == broker)
                .collect()
        };
        let nats_runs = of("nats");
        let mut variants: Vec<&'static str> = Vec::new();
        for run in runs
            .iter()
            .filter(|run| run.workload == workload && run.broker != "nats")
        {
            if !variants.contains(&run.broker) {
                variants.push(run.broker);
            }
        }
        for variant in variants {
            let sb_runs = of(variant);
            let side_by_side =
                |metric: String,
                 unit: &'static str,
                 higher_is_better: bool,
                 figure: &dyn Fn(&Run) -> Option<f64>| {
                    row(
                        workload,
                        metric,
                        unit,
                        variant,
                        &figures(&sb_runs, figure),
                        &figures(&nats_runs, figure),
                        higher_is_better,
                    )
                };
            // The metrics the first run that finished reported (either side), in its order.
            let metrics: Vec<Metric> = sb_runs
                .iter()
                .chain(&nats_runs)
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

fn row(
    workload: &'static str,
    metric: String,
    unit: &'static str,
    switchboard_variant: &'static str,
    switchboard: &Figures,
    nats: &Figures,
    higher_is_better: bool,
) -> Row {
    let switchboard_median = median(switchboard.iter().map(|(_, v)| *v));
    let nats_median = median(nats.iter().map(|(_, v)| *v));
    let switchboard_range = switchboard.iter().fold(None, |range, (_, v)| match range {
        None => Some((*v, *v)),
        Some((low, high)) => Some((f64::min(low, *v), f64::max(high, *v))),
    });
    let ratio = match (switchboard_median, nats_median) {
        (Some(s), Some(n)) if n != 0.0 => Some(s / n),
        _ => None,
    };
    // Each round's ratio pairs the two sides measured in that round, minutes apart.
    let ratio_range = switchboard
        .iter()
        .filter_map(|(round, s)| {
            nats.iter()
                .find(|(r, n)| r == round && *n != 0.0)
                .map(|(_, n)| s / n)
        })
        .fold(None, |range, r| match range {
            None => Some((r, r)),
            Some((low, high)) => Some((f64::min(low, r), f64::max(high, r))),
        });
    Row {
        workload,
        metric,
        unit,
        switchboard_variant,
        switchboard: switchboard_median,
        switchboard_range,
        nats: nats_median,
        ratio,
        ratio_range,
        higher_is_better,
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
fn print_table(rows: &[Row], runs: &[Run], plan: &Plan, quick: bool) {
    println!();
    let rounds = plan.rounds > 1;
    println!(
        "Switchboard vs NATS JetStream ({}; payload {} B, window {}{})",
        if quick { "--quick" } else { "full run" },
        plan.size,
        plan.window,
        if rounds {
            format!("; median of {} rounds", plan.rounds)
        } else {
            String::new()
        }
    );
    println!();
    if rounds {
        println!(
            "| workload | metric | Switchboard | NATS JetStream | ratio SB/NATS | ratio in each round | better |"
        );
        println!("|---|---|---:|---:|---:|---:|---|");
    } else {
        println!("| workload | metric | Switchboard | NATS JetStream | ratio SB/NATS | better |");
        println!("|---|---|---:|---:|---:|---|");
    }
    for row in rows {
        let variant = match row.switchboard_variant {
            "switchboard-periodic" => " (SB fsync periodic)",
            _ if row.workload == "W1" => " (SB fsync always)",
            _ => "",
        };
        let ratio = row
            .ratio
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "—".to_owned());
        let better = match (row.switchboard, row.nats) {
            (Some(s), Some(n)) if s == n => "=",
            (Some(s), Some(n)) if (s > n) == row.higher_is_better => "Switchboard",
            (Some(_), Some(_)) => "NATS",
            _ => "",
        };
        let unit = unit_suffix(&row.metric, row.unit);
        let range = if rounds {
            let range = row
                .ratio_range
                .map(|(low, high)| format!("{low:.2}–{high:.2}×"))
                .unwrap_or_else(|| "—".to_owned());
            format!(" {range} |")
        } else {
            String::new()
        };
        println!(
            "| {} | {}{}{} | {} | {} | {} |{} {} |",
            row.workload,
            row.metric,
            unit,
            variant,
            format_value(row.switchboard),
            format_value(row.nats),
            ratio,
            range,
            better
        );
    }
    print_notes(runs, plan.rounds);
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
        assert_eq!(pick(&["W1", "w3"], &WORKLOADS).unwrap(), vec!["W1", "W3"]);
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
        assert_eq!(rate.nats, Some(175.0));
        assert_eq!(rate.ratio, Some(120.0 / 175.0));
        assert_eq!(rate.ratio_range, Some((0.5, 2.0)));
        assert_eq!(rate.switchboard_range, Some((100.0, 300.0)));
        // Rows without figures on either side are still there, empty.
        let rss = rows
            .iter()
            .find(|r| r.metric == "broker peak RSS")
            .expect("an RSS row");
        assert_eq!(
            (rss.switchboard, rss.nats, rss.ratio_range),
            (None, None, None)
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
    }
}
