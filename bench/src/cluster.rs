//! `--cluster`: the three-node workloads (W5). Switchboard: three voters on loopback, each with
//! its own data folder and `--fsync always`, and optionally read replicas (raft learners).
//! NATS: three nats-servers with routes on loopback, each with its own store, and the stream
//! `BENCH` with three replicas, once with the default sync interval and once with
//! `sync_interval: always`. Fresh nodes for every workload. The workloads are W1, W2a and W3's
//! own code, pointed at different nodes; what this adds is each node's CPU and RSS, from which
//! the cost per acknowledged and per delivered message follows. The same code serves both
//! clusters: a node's role (leader, follower, replica) is raft's for Switchboard and the stream
//! leader's for NATS.
//!
//! All the nodes run on the same machine, so they share its cores: a replica cannot add capacity
//! here, and what the figures give is the cost of each node's part.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use switchboard_client::Client;
use tokio::time::Instant;

use crate::brokers::{
    self, Broker, BrokerStats, NatsConfig, NatsRoutes, NatsServer, NatsSync, RunningBroker,
    SwitchboardBroker,
};
use crate::{
    limit, nats, print_notes, print_side_by_side, rows, run_one, sb, single, unit_suffix, Args,
    Metric, Outcome, Plan, Row, Side,
};

/// The workloads of `--cluster`, in the order they run in each round.
pub const WORKLOADS: [(&str, &str); 5] = [
    ("W1", "W1 on one node, the reference"),
    ("W5a-leader", "W1's publisher sent to the leader"),
    (
        "W5a-follower",
        "W1's publisher sent to a follower, which forwards to the leader",
    ),
    (
        "W5b",
        "W2a's fixed rate and publisher on the leader, its subscriber on another node",
    ),
    (
        "W5c",
        "W3's publisher on the leader, its subscribers spread over the replicas (or the followers)",
    ),
];

/// The run label of Switchboard's three-node runs (the one-node reference is "switchboard"; NATS's
/// are "nats-r3" and "nats-r3-sync-always").
const CLUSTER: &str = "switchboard-cluster";

const VOTERS: u64 = 3;

/// How long the cluster may take to elect a leader and have every member announce itself.
const SETTLE: Duration = Duration::from_secs(60);

/// Where a workload finds the nodes: each node's name and public URL, the leader first, then the
/// followers, then the replicas.
#[derive(Clone, Debug)]
pub struct Layout {
    nodes: Vec<NodeInfo>,
}

#[derive(Clone, Debug)]
struct NodeInfo {
    /// "leader", "follower 1", "replica 2", ...: by role, so rounds line up whichever id leads.
    name: String,
    role: Role,
    url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
    Replica,
}

impl Layout {
    fn of(&self, role: Role) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(move |node| node.role == role)
    }

    fn leader(&self) -> anyhow::Result<&NodeInfo> {
        self.of(Role::Leader)
            .next()
            .ok_or_else(|| anyhow!("the cluster has no leader"))
    }

    fn follower(&self) -> anyhow::Result<&NodeInfo> {
        self.of(Role::Follower)
            .next()
            .ok_or_else(|| anyhow!("the cluster has no follower"))
    }

    /// Where subscribers go: the replicas when there are some (that is what they are for), else
    /// the followers.
    fn readers(&self) -> Vec<&NodeInfo> {
        let replicas: Vec<&NodeInfo> = self.of(Role::Replica).collect();
        if replicas.is_empty() {
            self.of(Role::Follower).collect()
        } else {
            replicas
        }
    }
}

struct Node {
    info: NodeInfo,
    broker: RunningBroker,
}

/// A running cluster: three Switchboard voters and `replicas` learners, or three nats-servers.
pub struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// A cluster of `side`'s broker: Switchboard with `replicas` learners, or NATS (which has
    /// none) syncing as the side says.
    async fn start(
        side: Side,
        binary: PathBuf,
        root: PathBuf,
        replicas: u8,
    ) -> anyhow::Result<Cluster> {
        match side {
            Side::Switchboard(_) => Cluster::switchboard(binary, root, replicas).await,
            Side::Nats(sync) => Cluster::nats(&binary, &root, sync).await,
        }
    }

    /// Starts three voters with static members (ids 1–3), waits for a leader and for every
    /// member's public address, then starts each replica as a newcomer (a raft listener and no
    /// members) and adds it through the Cluster AddLearner RPC, which returns once it caught up.
    async fn switchboard(binary: PathBuf, root: PathBuf, replicas: u8) -> anyhow::Result<Cluster> {
        let ports = brokers::free_ports(VOTERS as usize + usize::from(replicas))?;
        let raft: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let members = raft
            .iter()
            .take(VOTERS as usize)
            .zip(1..)
            .map(|(addr, id)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut started: Vec<(u64, SwitchboardBroker)> = Vec::new();
        for (id, raft_addr) in (1..).zip(&raft) {
            let voter = id <= VOTERS;
            let broker = SwitchboardBroker::launch_with(
                binary.clone(),
                root.clone(),
                "always",
                true,
                &["--node-id".to_owned(), id.to_string()],
                &[
                    ("SWITCHBOARD_CLUSTER_LISTEN".to_owned(), raft_addr.clone()),
                    (
                        "SWITCHBOARD_CLUSTER_MEMBERS".to_owned(),
                        if voter {
                            members.clone()
                        } else {
                            String::new()
                        },
                    ),
                ],
            )
            .await
            .with_context(|| format!("cannot start node {id}"))?;
            started.push((id, broker));
        }
        let first = started
            .first()
            .map(|(_, broker)| broker.url())
            .ok_or_else(|| anyhow!("no node started"))?;
        let voter_ids: Vec<u64> = (1..=VOTERS).collect();
        let leader = settled(&first, &voter_ids).await?;
        let admin = Client::connect(first.clone())
            .await
            .with_context(|| format!("cannot connect to {first}"))?;
        for ((id, broker), raft_addr) in started.iter().zip(&raft).skip(VOTERS as usize) {
            let status = admin
                .cluster_add_learner(*id, raft_addr.clone(), broker.addr().to_string())
                .await
                .with_context(|| format!("cannot add node {id} as a replica"))?;
            match status.nodes.iter().find(|n| n.id == *id) {
                Some(node) if node.role == "learner" => {}
                other => bail!("node {id} was not added as a learner: {other:?}"),
            }
        }
        let all_ids: Vec<u64> = started.iter().map(|(id, _)| *id).collect();
        // Every node can reach the leader (a follower or replica answers the status by asking
        // it), so writes through any of them are forwarded from the first message on.
        for (_, broker) in &started {
            let seen = settled(&broker.url(), &all_ids).await?;
            if seen != leader {
                bail!("the leader changed while the cluster settled ({leader} → {seen})");
            }
        }
        let members = started.into_iter().map(|(id, broker)| {
            let role = if id == leader {
                Role::Leader
            } else if id <= VOTERS {
                Role::Follower
            } else {
                Role::Replica
            };
            (role, RunningBroker::Switchboard(broker))
        });
        Ok(Cluster::named(members))
    }

    /// Starts three nats-servers, each routing to the other two on loopback, creates the stream
    /// `BENCH` with three replicas and waits until they are current; the stream's leader is the
    /// cluster's leader here (the server JetStream publishes go through).
    async fn nats(binary: &Path, root: &Path, sync: NatsSync) -> anyhow::Result<Cluster> {
        let ports = brokers::free_ports(2 * VOTERS as usize)?;
        let (client_ports, route_ports) = ports.split_at(VOTERS as usize);
        let mut servers: Vec<(String, NatsServer)> = Vec::new();
        for (n, (&port, &route_port)) in (1..).zip(client_ports.iter().zip(route_ports)) {
            let name = format!("n{n}");
            let config = NatsConfig {
                port,
                sync,
                cluster: Some(NatsRoutes {
                    name: name.clone(),
                    port: route_port,
                    peers: route_ports
                        .iter()
                        .copied()
                        .filter(|peer| *peer != route_port)
                        .collect(),
                }),
            };
            let server = NatsServer::launch(binary, root, &config)
                .await
                .with_context(|| format!("cannot start nats-server {name}"))?;
            servers.push((name, server));
        }
        let first = servers
            .first()
            .map(|(_, server)| server.url())
            .ok_or_else(|| anyhow!("no nats-server started"))?;
        let leader = nats::replicated_stream(&first, VOTERS as usize).await?;
        if !servers.iter().any(|(name, _)| *name == leader) {
            bail!("the stream's leader {leader:?} is none of the servers started");
        }
        let members = servers.into_iter().map(|(name, server)| {
            let role = if name == leader {
                Role::Leader
            } else {
                Role::Follower
            };
            (role, RunningBroker::Nats(server))
        });
        Ok(Cluster::named(members))
    }

    /// The cluster of `members`, each named by its role ("leader", "follower 1", "replica 2",
    /// ...), the leader first, then the followers, then the replicas.
    fn named(members: impl IntoIterator<Item = (Role, RunningBroker)>) -> Cluster {
        let mut nodes: Vec<Node> = Vec::new();
        let (mut followers, mut replicas) = (0, 0);
        for (role, broker) in members {
            let name = match role {
                Role::Leader => "leader".to_owned(),
                Role::Follower => {
                    followers += 1;
                    format!("follower {followers}")
                }
                Role::Replica => {
                    replicas += 1;
                    format!("replica {replicas}")
                }
            };
            nodes.push(Node {
                info: NodeInfo {
                    name,
                    role,
                    url: broker.endpoint(),
                },
                broker,
            });
        }
        nodes.sort_by_key(|node| match node.info.role {
            Role::Leader => 0,
            Role::Follower => 1,
            Role::Replica => 2,
        });
        eprintln!(
            "[bench] cluster up: {}",
            nodes
                .iter()
                .map(|n| format!("{} {}", n.info.name, n.info.url))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Cluster { nodes }
    }
}

/// Waits until the node at `url` answers the cluster status with a leader and with every node
/// of `ids` a member with a public address; returns the leader's id.
async fn settled(url: &str, ids: &[u64]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let last = match Client::connect(url.to_owned()).await {
            Ok(client) => match client.cluster_status().await {
                Ok(status) => {
                    let complete = status.leader_id != 0
                        && ids.iter().all(|id| {
                            status
                                .nodes
                                .iter()
                                .any(|n| n.id == *id && !n.public_address.is_empty())
                        });
                    if complete {
                        return Ok(status.leader_id);
                    }
                    format!("{status:?}")
                }
                Err(error) => error.to_string(),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            bail!("the cluster did not settle within {SETTLE:?} (at {url}; last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Broker for Cluster {
    type Endpoint = Layout;

    fn endpoint(&self) -> Layout {
        Layout {
            nodes: self.nodes.iter().map(|node| node.info.clone()).collect(),
        }
    }

    /// The CPU of all the nodes together, and the peak RSS of the largest.
    fn stats(&self) -> anyhow::Result<BrokerStats> {
        let mut total = BrokerStats {
            peak_rss_kib: 0,
            cpu_seconds: 0.0,
        };
        for node in &self.nodes {
            let stats = node.broker.stats()?;
            total.peak_rss_kib = total.peak_rss_kib.max(stats.peak_rss_kib);
            total.cpu_seconds += stats.cpu_seconds;
        }
        Ok(total)
    }

    fn node_stats(&self) -> Vec<(String, BrokerStats)> {
        self.nodes
            .iter()
            .filter_map(|node| Some((node.info.name.clone(), node.broker.stats().ok()?)))
            .collect()
    }

    fn metrics_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.nodes
            .iter()
            .flat_map(|node| node.broker.metrics_addrs())
            .collect()
    }

    /// Stops every node at once: one by one, the last ones would spend their shutdown looking
    /// for a quorum that is gone.
    async fn stop(&mut self) {
        futures::future::join_all(self.nodes.iter_mut().map(|node| node.broker.stop())).await;
    }
}

/// The three-node workload `workload` against `side`'s cluster laid out as `layout`: W1's, W2a's
/// and W3's code, pointed at different nodes.
async fn w5(workload: &str, side: Side, layout: Layout, plan: &Plan) -> anyhow::Result<Outcome> {
    let leader = layout.leader()?.url.clone();
    let is_nats = matches!(side, Side::Nats(_));
    match workload {
        "W5a-leader" => single("W1", side, &leader, plan).await,
        "W5a-follower" => single("W1", side, &layout.follower()?.url, plan).await,
        "W5b" => {
            let reader = layout
                .readers()
                .first()
                .map(|node| node.url.clone())
                .ok_or_else(|| anyhow!("no node to subscribe on"))?;
            if is_nats {
                nats::w2_across(&leader, &reader, plan, 1, false).await
            } else {
                sb::w2_across(&leader, &reader, plan, 1, false, false).await
            }
        }
        "W5c" => {
            let readers = layout.readers();
            let urls: Vec<String> = readers.iter().map(|node| node.url.clone()).collect();
            let (mut outcome, per_reader) = if is_nats {
                nats::w3_spread(&leader, &urls, plan).await?
            } else {
                sb::w3_spread(&leader, &urls, plan).await?
            };
            add_per_reader(&mut outcome, &readers, &per_reader);
            Ok(outcome)
        }
        other => bail!("no three-node workload {other}"),
    }
}

/// W5c: each reader's deliveries per second, over the same period as the total's (first publish
/// to last delivery), and its count for the cost per delivered message.
fn add_per_reader(outcome: &mut Outcome, readers: &[&NodeInfo], per_reader: &[u64]) {
    let seconds = outcome
        .metrics
        .iter()
        .find(|m| m.name == "first publish→last delivery")
        .map(|m| m.value)
        .unwrap_or(0.0);
    for (node, delivered) in readers.iter().zip(per_reader) {
        outcome.metrics.push(Metric::higher(
            format!("delivered msgs/s, {}", node.name),
            "msgs/s",
            *delivered as f64 / seconds.max(1e-9),
        ));
        outcome
            .counts
            .push((format!("delivered on {}", node.name), *delivered));
    }
}

/// Adds what each message cost the nodes, now that their CPU over the workload is known: CPU per
/// acknowledged message over all nodes and per node, each node's CPU seconds and peak RSS, and a
/// subscribers' node's CPU per message it delivered.
fn add_costs(run: &mut crate::Run) {
    let clustered = !run.nodes.is_empty();
    let nodes: Vec<(String, BrokerStats)> = if !clustered {
        // The one-node reference: its only node is the whole cluster.
        run.stats
            .iter()
            .map(|stats| ("the node".to_owned(), stats.clone()))
            .collect()
    } else {
        run.nodes.clone()
    };
    let Some(outcome) = run.outcome.as_mut() else {
        return;
    };
    let per_message_us = |cpu: f64, count: u64| cpu / count.max(1) as f64 * 1e6;
    let acknowledged = outcome.count("acknowledged").unwrap_or(0);
    let total: f64 = nodes.iter().map(|(_, stats)| stats.cpu_seconds).sum();
    outcome.metrics.push(Metric::lower(
        "CPU per acked msg, all nodes",
        "µs",
        per_message_us(total, acknowledged),
    ));
    for (name, stats) in nodes.iter().filter(|_| clustered) {
        outcome.metrics.push(Metric::lower(
            format!("CPU, {name}"),
            "s",
            stats.cpu_seconds,
        ));
        outcome.metrics.push(Metric::lower(
            format!("peak RSS, {name}"),
            "MB",
            stats.peak_rss_kib as f64 / 1024.0,
        ));
        outcome.metrics.push(Metric::lower(
            format!("CPU per acked msg, {name}"),
            "µs",
            per_message_us(stats.cpu_seconds, acknowledged),
        ));
        if let Some(delivered) = outcome.count(&format!("delivered on {name}")) {
            outcome.metrics.push(Metric::lower(
                format!("CPU per delivered msg, {name}"),
                "µs",
                per_message_us(stats.cpu_seconds, delivered),
            ));
        }
    }
}

/// "3 voters" or "3 voters + 2 replicas".
fn topology(replicas: u8) -> String {
    match replicas {
        0 => format!("{VOTERS} voters"),
        n => format!(
            "{VOTERS} voters + {n} replica{}",
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// `/proc/loadavg`: what else the machine was doing around a round.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

/// `--cluster`: every chosen workload, `plan.rounds` times, on each side (Switchboard, then NATS
/// in each sync mode it has), then the table (and the JSON).
pub async fn run(
    args: &Args,
    plan: &Plan,
    chosen: &BTreeSet<&'static str>,
    data_root: PathBuf,
) -> anyhow::Result<()> {
    let version = brokers::switchboard_version(&args.switchboard).await;
    let nats_version = brokers::nats_version(&args.nats_server)
        .await
        .with_context(|| format!("cannot run {}", args.nats_server.display()))?;
    let nats_modes = crate::nats_sync_modes(&nats_version);
    let replicas = args.replicas;
    eprintln!(
        "[bench] {version}, {} on loopback, fsync always, against {nats_version}, three servers \
         with routes on loopback and an R3 stream; data under {}; {} round(s)",
        topology(replicas),
        data_root.display(),
        plan.rounds
    );
    let sides: Vec<Side> = std::iter::once(Side::Switchboard("always"))
        .chain(nats_modes.iter().map(|sync| Side::Nats(*sync)))
        .collect();
    let mut runs = Vec::new();
    let mut load = Vec::new();
    for round in 1..=plan.rounds {
        eprintln!("[bench] round {round} of {}", plan.rounds);
        let first = runs.len();
        let load_before = loadavg();
        for (workload, _) in WORKLOADS {
            if !chosen.contains(workload) {
                continue;
            }
            for &side in &sides {
                let (binary, root, p) = (side.binary(args), data_root.clone(), plan.clone());
                let limit = limit(workload, plan);
                runs.push(if workload == "W1" {
                    run_one(
                        workload,
                        side.label(),
                        limit,
                        move || side.start(binary, root),
                        move |url| async move { single(workload, side, &url, &p).await },
                    )
                    .await
                } else {
                    run_one(
                        workload,
                        cluster_label(side),
                        limit,
                        move || Cluster::start(side, binary, root, replicas),
                        move |layout| async move { w5(workload, side, layout, &p).await },
                    )
                    .await
                });
            }
        }
        for run in &mut runs[first..] {
            run.round = round;
            add_costs(run);
        }
        load.push(serde_json::json!({
            "round": round,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        }));
    }

    let rows = rows(&runs, &WORKLOADS);
    print_table(&rows, &runs, plan, replicas, args.quick, &nats_version);
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "date": chrono::Utc::now().to_rfc3339(),
            "machine": brokers::machine(&data_root).await,
            "switchboard": version,
            "topology": topology(replicas),
            "nats_server": nats_version,
            "nats_server_binary": args.nats_server.display().to_string(),
            "nats_topology": "3 nats-servers, routes on loopback, stream BENCH with 3 replicas (file storage)",
            "durability": crate::durability(
                "fsync always on every node: an ack follows the fdatasync of the entry on a majority of the voters (replicas never count)",
                &nats_modes,
            ),
            "load": load,
            "plan": plan,
            "quick": args.quick,
            "rows": rows,
            "runs": runs,
        });
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("[bench] results written to {}", path.display());
    }
    if runs.iter().any(|run| run.error.is_some()) {
        bail!("some runs failed (see above)");
    }
    Ok(())
}

/// The run label of `side`'s three-node runs.
fn cluster_label(side: Side) -> &'static str {
    match side {
        Side::Switchboard(_) => CLUSTER,
        Side::Nats(sync) => sync.label(true),
    }
}

/// The table, as Markdown: each figure's median over the rounds, Switchboard's beside each
/// JetStream mode's, then what each cluster keeps of its one-node rate.
fn print_table(
    rows: &[Row],
    runs: &[crate::Run],
    plan: &Plan,
    replicas: u8,
    quick: bool,
    nats_version: &str,
) {
    println!();
    println!(
        "Three nodes: Switchboard, {} on loopback, fsync always, vs {nats_version}, three servers \
         with routes on loopback and an R3 stream ({}; payload {} B, window {}; median of {} \
         round{}). W1 is one node of each, the reference.",
        topology(replicas),
        if quick { "--quick" } else { "full run" },
        plan.size,
        plan.window,
        plan.rounds,
        if plan.rounds == 1 { "" } else { "s" }
    );
    println!();
    let switchboard = format!("Switchboard ({})", topology(replicas));
    print_side_by_side(rows, plan.rounds, &switchboard, true, |row| {
        // The generic rows, named for what they are in a cluster.
        let metric = match (row.workload, row.metric.as_str()) {
            (_, "broker peak RSS") if row.switchboard_variant == CLUSTER => {
                "peak RSS, largest node"
            }
            (_, "broker CPU") if row.switchboard_variant == CLUSTER => "CPU, all nodes",
            (_, "broker CPU") => "CPU, the node",
            (_, metric) => metric,
        };
        format!("{metric}{}", unit_suffix(metric, row.unit))
    });
    // What a cluster keeps of one node's rate, from the medians.
    let rate = |workload: &str| {
        rows.iter()
            .find(|row| row.workload == workload && row.metric == "msgs/s")
    };
    if let Some(single) = rate("W1") {
        for workload in ["W5a-leader", "W5a-follower"] {
            let Some(clustered) = rate(workload) else {
                continue;
            };
            let mut shares = vec![format!(
                "Switchboard {}",
                share(clustered.switchboard, single.switchboard)
            )];
            for sync in NatsSync::BOTH {
                if let (Some(c), Some(s)) = (clustered.versus(sync), single.versus(sync)) {
                    shares.push(format!("{} {}", sync.title(true), share(c.value, s.value)));
                }
            }
            println!();
            println!(
                "{workload} msgs/s as a share of the same broker's one-node W1 (medians): {}",
                shares.join("; ")
            );
        }
    }
    print_notes(runs, plan.rounds);
}

/// "0.38×", or "—" without both figures.
fn share(clustered: Option<f64>, single: Option<f64>) -> String {
    match (clustered, single) {
        (Some(c), Some(s)) if s > 0.0 => format!("{:.2}×", c / s),
        _ => "—".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, role: Role) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            role,
            url: format!("http://{name}"),
        }
    }

    #[test]
    fn subscribers_go_to_the_replicas_when_there_are_some() {
        let mut layout = Layout {
            nodes: vec![
                node("leader", Role::Leader),
                node("follower 1", Role::Follower),
                node("follower 2", Role::Follower),
            ],
        };
        let names = |layout: &Layout| -> Vec<String> {
            layout.readers().iter().map(|n| n.name.clone()).collect()
        };
        assert_eq!(names(&layout), vec!["follower 1", "follower 2"]);
        layout.nodes.push(node("replica 1", Role::Replica));
        layout.nodes.push(node("replica 2", Role::Replica));
        assert_eq!(names(&layout), vec!["replica 1", "replica 2"]);
        assert_eq!(layout.leader().unwrap().name, "leader");
        assert_eq!(layout.follower().unwrap().name, "follower 1");
    }

    #[test]
    fn costs_are_per_acknowledged_and_per_delivered_message() {
        let stats = |cpu: f64| BrokerStats {
            peak_rss_kib: 1,
            cpu_seconds: cpu,
        };
        let mut run = crate::Run {
            round: 1,
            workload: "W5c",
            broker: CLUSTER,
            outcome: Some(Outcome {
                counts: vec![
                    ("acknowledged".to_owned(), 1_000),
                    ("delivered on follower 1".to_owned(), 4_000),
                ],
                ..Outcome::default()
            }),
            error: None,
            stats: Some(stats(0.5)),
            nodes: vec![
                ("leader".to_owned(), stats(0.3)),
                ("follower 1".to_owned(), stats(0.2)),
            ],
            client_cpu_seconds: None,
            seconds: 1.0,
        };
        add_costs(&mut run);
        let value = |name: &str| {
            run.outcome
                .as_ref()
                .and_then(|o| o.metrics.iter().find(|m| m.name == name))
                .map(|m| m.value)
        };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
        assert!(close(value("CPU per acked msg, all nodes"), 500.0));
        assert!(close(value("CPU per acked msg, leader"), 300.0));
        assert!(close(value("CPU, follower 1"), 0.2));
        assert!(close(value("CPU per delivered msg, follower 1"), 50.0));
        assert_eq!(value("CPU per delivered msg, leader"), None);
    }
}
