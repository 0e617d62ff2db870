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
//! - `nats.rs`: the same workloads against NATS JetStream (`async-nats`).

mod brokers;
mod nats;
mod payload;
mod sb;
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
    after_help = "Workloads: W1 persisted publish, W2 latency at a fixed rate (W2a exact, W2b wildcard),\n\
                  W3 fan-out, W4 entity updates with watchers. See docs/BENCHMARKS.md.\n\n\
                  Example: switchboard-bench --quick --only W1,W3"
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

    /// Run only these workloads (comma-separated: W1, W2, W3, W4; W2a or W2b for one phase of W2).
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
}

/// The size of each workload, full or `--quick`.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
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
    pub name: &'static str,
    pub unit: &'static str,
    pub value: f64,
    pub higher_is_better: bool,
}

impl Metric {
    pub fn higher(name: &'static str, unit: &'static str, value: f64) -> Metric {
        Metric {
            name,
            unit,
            value,
            higher_is_better: true,
        }
    }

    pub fn lower(name: &'static str, unit: &'static str, value: f64) -> Metric {
        Metric {
            name,
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
}

/// One workload against one broker, with the broker's own consumption.
#[derive(Clone, Debug, Serialize)]
struct Run {
    workload: &'static str,
    broker: &'static str,
    outcome: Option<Outcome>,
    error: Option<String>,
    stats: Option<BrokerStats>,
    /// CPU seconds the benchmark process itself (the clients) used during the workload.
    client_cpu_seconds: Option<f64>,
    seconds: f64,
}

/// One line of the side-by-side table.
#[derive(Clone, Debug, Serialize)]
struct Row {
    workload: &'static str,
    metric: String,
    unit: &'static str,
    switchboard_variant: &'static str,
    switchboard: Option<f64>,
    nats: Option<f64>,
    /// Switchboard's figure divided by NATS's.
    ratio: Option<f64>,
    higher_is_better: bool,
}

const WORKLOADS: [(&str, &str); 5] = [
    ("W1", "persisted publish"),
    (
        "W2a",
        "latency at 5,000 msgs/s, 1 subscriber, exact channel",
    ),
    ("W2b", "latency at 5,000 msgs/s, 10 subscribers, wildcard"),
    ("W3", "fan-out to subscribers on a wildcard"),
    ("W4", "entity updates with watchers"),
];

fn selected(only: &[String]) -> anyhow::Result<BTreeSet<&'static str>> {
    if only.is_empty() {
        return Ok(WORKLOADS.iter().map(|(id, _)| *id).collect());
    }
    let mut chosen = BTreeSet::new();
    for item in only {
        let item = item.trim().to_ascii_uppercase();
        let matched: Vec<&'static str> = WORKLOADS
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| {
                let id = id.to_ascii_uppercase();
                id == item || (item.len() == 2 && id.starts_with(&item))
            })
            .collect();
        if matched.is_empty() {
            bail!("unknown workload {item:?} (expected W1, W2, W2a, W2b, W3 or W4)");
        }
        chosen.extend(matched);
    }
    Ok(chosen)
}

/// Runs `workload` against a fresh broker started by `start`, then measures and stops the broker.
async fn run_one<B, S, SF, W, WF>(
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
    W: FnOnce(String) -> WF,
    WF: Future<Output = anyhow::Result<Outcome>>,
{
    eprintln!("[bench] {workload} on {broker}: starting the broker");
    let began = std::time::Instant::now();
    let mut server = match start().await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("[bench] {workload} on {broker}: cannot start the broker: {error:#}");
            return Run {
                workload,
                broker,
                outcome: None,
                error: Some(format!("cannot start the broker: {error:#}")),
                stats: None,
                client_cpu_seconds: None,
                seconds: 0.0,
            };
        }
    };
    let url = server.url();
    let baseline = server.stats().ok();
    let client_baseline = brokers::process_stats(std::process::id()).ok();
    eprintln!("[bench] {workload} on {broker}: running (at most {limit:?})");
    let result = match tokio::time::timeout(limit, work(url)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
    };
    let stats = server.stats().ok().map(|end| match &baseline {
        Some(start) => end.since(start),
        None => end,
    });
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
                workload,
                broker,
                outcome: Some(outcome),
                error: None,
                stats,
                client_cpu_seconds,
                seconds,
            }
        }
        Err(error) => {
            eprintln!("[bench] {workload} on {broker}: failed: {error:#}");
            Run {
                workload,
                broker,
                outcome: None,
                error: Some(format!("{error:#}")),
                stats,
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
    let chosen = selected(&args.only)?;
    let data_root = args.data_root.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&data_root)
        .with_context(|| format!("cannot create {}", data_root.display()))?;
    if !args.switchboard.exists() {
        bail!(
            "no switchboard binary at {} (build it with `cargo build --release --bin switchboard`)",
            args.switchboard.display()
        );
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

    let rows = rows(&runs);
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

/// Pairs every Switchboard figure with NATS's figure for the same workload and metric, and adds
/// the brokers' peak RSS and CPU seconds.
fn rows(runs: &[Run]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (workload, _) in WORKLOADS {
        let nats_run = runs
            .iter()
            .find(|run| run.workload == workload && run.broker == "nats");
        for sb_run in runs
            .iter()
            .filter(|run| run.workload == workload && run.broker != "nats")
        {
            let variant = sb_run.broker;
            let nats_metric = |name: &str| {
                nats_run
                    .and_then(|run| run.outcome.as_ref())
                    .and_then(|outcome| outcome.metrics.iter().find(|m| m.name == name))
                    .map(|m| m.value)
            };
            let names: Vec<Metric> = sb_run
                .outcome
                .as_ref()
                .map(|o| o.metrics.clone())
                .or_else(|| {
                    nats_run
                        .and_then(|run| run.outcome.as_ref())
                        .map(|o| o.metrics.clone())
                })
                .unwrap_or_default();
            for metric in names {
                let switchboard = sb_run
                    .outcome
                    .as_ref()
                    .and_then(|o| o.metrics.iter().find(|m| m.name == metric.name))
                    .map(|m| m.value);
                let nats = nats_metric(metric.name);
                rows.push(row(
                    workload,
                    metric.name.to_owned(),
                    metric.unit,
                    variant,
                    switchboard,
                    nats,
                    metric.higher_is_better,
                ));
            }
            let sb_stats = sb_run.stats.as_ref();
            let nats_stats = nats_run.and_then(|run| run.stats.as_ref());
            rows.push(row(
                workload,
                "broker peak RSS".to_owned(),
                "MB",
                variant,
                sb_stats.map(|s| s.peak_rss_kib as f64 / 1024.0),
                nats_stats.map(|s| s.peak_rss_kib as f64 / 1024.0),
                false,
            ));
            rows.push(row(
                workload,
                "broker CPU".to_owned(),
                "s",
                variant,
                sb_stats.map(|s| s.cpu_seconds),
                nats_stats.map(|s| s.cpu_seconds),
                false,
            ));
            rows.push(row(
                workload,
                "bench client CPU".to_owned(),
                "s",
                variant,
                sb_run.client_cpu_seconds,
                nats_run.and_then(|run| run.client_cpu_seconds),
                false,
            ));
        }
    }
    rows
}

fn row(
    workload: &'static str,
    metric: String,
    unit: &'static str,
    switchboard_variant: &'static str,
    switchboard: Option<f64>,
    nats: Option<f64>,
    higher_is_better: bool,
) -> Row {
    let ratio = match (switchboard, nats) {
        (Some(s), Some(n)) if n != 0.0 => Some(s / n),
        _ => None,
    };
    Row {
        workload,
        metric,
        unit,
        switchboard_variant,
        switchboard,
        nats,
        ratio,
        higher_is_better,
    }
}

fn format_value(value: Option<f64>) -> String {
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
    println!(
        "Switchboard vs NATS JetStream ({}; payload {} B, window {})",
        if quick { "--quick" } else { "full run" },
        plan.size,
        plan.window
    );
    println!();
    println!("| workload | metric | Switchboard | NATS JetStream | ratio SB/NATS | better |");
    println!("|---|---|---:|---:|---:|---|");
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
        let unit = if row.metric.contains(row.unit) {
            String::new()
        } else {
            format!(" ({})", row.unit)
        };
        println!(
            "| {} | {}{}{} | {} | {} | {} | {} |",
            row.workload,
            row.metric,
            unit,
            variant,
            format_value(row.switchboard),
            format_value(row.nats),
            ratio,
            better
        );
    }
    let notes: Vec<String> = runs
        .iter()
        .flat_map(|run| {
            let mut lines: Vec<String> = run
                .outcome
                .iter()
                .flat_map(|o| o.notes.iter())
                .map(|note| format!("- {} on {}: {note}", run.workload, run.broker))
                .collect();
            if let Some(error) = &run.error {
                lines.push(format!(
                    "- {} on {}: FAILED: {error}",
                    run.workload, run.broker
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_accepts_groups_and_phases() {
        let all = selected(&[]).unwrap();
        assert_eq!(all.len(), 5);
        let some = selected(&["W1".to_owned(), "w3".to_owned()]).unwrap();
        assert_eq!(some.into_iter().collect::<Vec<_>>(), vec!["W1", "W3"]);
        let w2 = selected(&["W2".to_owned()]).unwrap();
        assert_eq!(w2.into_iter().collect::<Vec<_>>(), vec!["W2a", "W2b"]);
        let w2b = selected(&["W2b".to_owned()]).unwrap();
        assert_eq!(w2b.into_iter().collect::<Vec<_>>(), vec!["W2b"]);
        assert!(selected(&["W9".to_owned()]).is_err());
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(format_value(Some(34_400.4)), "34,400");
        assert_eq!(format_value(None), "—");
    }
}
