//! Starting, measuring and stopping the two brokers. Each run gets a fresh process with its data
//! in a temporary folder (removed afterwards) and a free loopback port, so every peak RSS belongs
//! to one workload.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A broker's consumption over one workload, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerStats {
    /// `VmHWM`: the process's peak resident set since it started, in KiB.
    pub peak_rss_kib: u64,
    /// `utime + stime`, in seconds.
    pub cpu_seconds: f64,
}

impl BrokerStats {
    /// The CPU used since `start` (the peak RSS is the process's, so it stays as it is).
    pub fn since(&self, start: &BrokerStats) -> BrokerStats {
        BrokerStats {
            peak_rss_kib: self.peak_rss_kib,
            cpu_seconds: (self.cpu_seconds - start.cpu_seconds).max(0.0),
        }
    }
}

/// A running broker: one process, or a cluster of several.
pub trait Broker {
    /// What a workload is given to reach it: a URL, or a cluster's layout.
    type Endpoint: Send + 'static;
    fn endpoint(&self) -> Self::Endpoint;
    /// Its peak RSS and CPU seconds so far (for a cluster: the CPU of all its nodes, the peak RSS
    /// of the largest).
    fn stats(&self) -> anyhow::Result<BrokerStats>;
    /// Each node's figures so far, by node name; empty for a single process.
    fn node_stats(&self) -> Vec<(String, BrokerStats)> {
        Vec::new()
    }
    /// The admin listeners (`/metrics`) of its Switchboard nodes; none for NATS. Each log entry
    /// is counted once, by the node whose proposer made the batch: a follower counts the
    /// batches it forwards to the leader.
    fn metrics_addrs(&self) -> Vec<SocketAddr> {
        Vec::new()
    }
    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits for it.
    fn stop(&mut self) -> impl std::future::Future<Output = ()>;
}

/// The process and the data folder common to both brokers.
struct Process {
    child: Child,
    pid: u32,
    /// Removed when dropped.
    _dir: tempfile::TempDir,
}

impl Process {
    fn stats(&self) -> anyhow::Result<BrokerStats> {
        process_stats(self.pid)
    }

    async fn stop(&mut self) {
        // SIGTERM by process id: both brokers shut down gracefully on it.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "[bench] process {} did not stop within 10 s of SIGTERM: killing it",
                self.pid
            );
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .filter(|ticks| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// Peak RSS (`VmHWM`) and CPU time (`utime + stime`) of process `pid`.
pub fn process_stats(pid: u32) -> anyhow::Result<BrokerStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let peak_rss_kib =
        status_kib(&status, "VmHWM:").ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let cpu_seconds = cpu_seconds_from_stat(&stat, clock_ticks_per_second())
        .ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat"))?;
    Ok(BrokerStats {
        peak_rss_kib,
        cpu_seconds,
    })
}

/// The resident set of a process from `/proc/PID/status`, in KiB.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Resident {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most it has been resident since it started.
    pub hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` of process `pid`.
pub fn resident(pid: u32) -> anyhow::Result<Resident> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status_kib(&status, name).ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok(Resident {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The value in KiB of the `/proc/PID/status` line starting with `name` (e.g. `VmHWM:`).
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in seconds. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted after the last `)`.
fn cpu_seconds_from_stat(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so field N is index N - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

fn data_dir(root: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .with_context(|| format!("cannot create a temporary folder in {}", root.display()))
}

/// A `switchboard` broker on `127.0.0.1:0` (it prints the port it bound), admin listener off
/// unless asked for.
pub struct SwitchboardBroker {
    process: Process,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

impl SwitchboardBroker {
    /// A broker for one workload, its admin listener on a loopback port too: the tool reads
    /// from `/metrics` how many messages each log entry carried.
    pub async fn start(
        binary: PathBuf,
        root: PathBuf,
        fsync: &'static str,
    ) -> anyhow::Result<RunningBroker> {
        Ok(RunningBroker::Switchboard(
            SwitchboardBroker::launch(binary, root, fsync, true).await?,
        ))
    }

    /// Starts the broker; with `admin`, its admin listener (`/metrics`) is on a free loopback
    /// port too, and this waits until the broker has said where both listen.
    pub async fn launch(
        binary: PathBuf,
        root: PathBuf,
        fsync: &'static str,
        admin: bool,
    ) -> anyhow::Result<SwitchboardBroker> {
        SwitchboardBroker::launch_with(binary, root, fsync, admin, &[], &[]).await
    }

    /// [`SwitchboardBroker::launch`] with extra arguments and `SWITCHBOARD_*` environment
    /// variables (a cluster node's id, raft listener and members).
    pub async fn launch_with(
        binary: PathBuf,
        root: PathBuf,
        fsync: &'static str,
        admin: bool,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<SwitchboardBroker> {
        let dir = data_dir(&root, "sb-bench-switchboard-")?;
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let mut child = Command::new(&binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg(if admin { "127.0.0.1:0" } else { "off" })
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--fsync")
            .arg(fsync)
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the broker exited at once"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from the broker"))?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            let (mut addr, mut admin_addr) = (None, None);
            while let Some(line) = lines.next_line().await? {
                let line = line.trim();
                if let Some(found) = line.strip_prefix("listening on ") {
                    addr = Some(found.trim().parse::<SocketAddr>()?);
                } else if let Some(found) = line.strip_prefix("admin listening on ") {
                    admin_addr = Some(found.trim().parse::<SocketAddr>()?);
                }
                if let Some(addr) = addr {
                    if !admin || admin_addr.is_some() {
                        return Ok::<_, anyhow::Error>(Some((addr, admin_addr)));
                    }
                }
            }
            Ok(None)
        })
        .await;
        let (addr, admin_addr) = match found {
            Ok(Ok(Some(found))) => found,
            other => {
                let _ = child.start_kill();
                let log =
                    std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
                bail!("the broker did not say where it listens ({other:?}); its log:\n{log}");
            }
        };
        // Keep reading its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(SwitchboardBroker {
            process: Process {
                child,
                pid,
                _dir: dir,
            },
            addr,
            admin_addr,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when it was started with one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }
}

/// How JetStream's file store syncs: the two ways the comparison runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatsSync {
    /// The default `sync_interval` (2 minutes): an ack once the message is in the page cache.
    Default,
    /// `sync_interval: always` (nats-server 2.10 and later): the file store syncs after every
    /// message, before its ack; no group commit.
    Always,
}

impl NatsSync {
    pub const BOTH: [NatsSync; 2] = [NatsSync::Default, NatsSync::Always];

    /// The run label: `nats` / `nats-sync-always`, and `nats-r3` / `nats-r3-sync-always` for a
    /// three-node cluster.
    pub fn label(self, clustered: bool) -> &'static str {
        match (self, clustered) {
            (NatsSync::Default, false) => "nats",
            (NatsSync::Always, false) => "nats-sync-always",
            (NatsSync::Default, true) => "nats-r3",
            (NatsSync::Always, true) => "nats-r3-sync-always",
        }
    }

    /// The mode of a run labelled `label`, or `None` for a Switchboard run.
    pub fn of_label(label: &str) -> Option<NatsSync> {
        NatsSync::BOTH
            .into_iter()
            .find(|mode| label == mode.label(false) || label == mode.label(true))
    }

    /// How the table names the mode (a three-node cluster's stream has three replicas).
    pub fn title(self, clustered: bool) -> &'static str {
        match (self, clustered) {
            (NatsSync::Default, false) => "JetStream default (sync every 2 min)",
            (NatsSync::Always, false) => "JetStream sync_interval: always",
            (NatsSync::Default, true) => "JetStream R3 default (sync every 2 min)",
            (NatsSync::Always, true) => "JetStream R3 sync_interval: always",
        }
    }

    /// What the JSON says the mode guarantees.
    pub fn durability(self) -> &'static str {
        match self {
            NatsSync::Default => {
                "JetStream file storage with the default sync_interval (2 minutes): the ack follows the write to the file store (the page cache); a power failure can lose up to 2 minutes of acknowledged messages"
            }
            NatsSync::Always => {
                "JetStream file storage with sync_interval: always: the file store syncs after every message, before the ack (no group commit); in a cluster each replica syncs what it stores"
            }
        }
    }
}

/// Whether the `nats-server --version` text `version` is 2.10 or later, the first with
/// `sync_interval` (so the one that can sync before an ack).
pub fn nats_syncs_always(version: &str) -> bool {
    let numbers = version
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .find(|word| word.contains('.'))
        .map(|word| {
            word.split('.')
                .map(|n| n.parse::<u32>().unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    matches!(numbers.as_slice(), [major, minor, ..] if (*major, *minor) >= (2, 10))
}

/// One nats-server's configuration: its client port, how its store syncs, and, in a cluster, its
/// name and routes.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    pub port: u16,
    pub sync: NatsSync,
    pub cluster: Option<NatsRoutes>,
}

/// A cluster member's part of the configuration: every member routes to every other on loopback.
#[derive(Clone, Debug)]
pub struct NatsRoutes {
    /// The server's name (`server_name`: JetStream clustering needs a unique one).
    pub name: String,
    /// Its route listener.
    pub port: u16,
    /// The other members' route ports.
    pub peers: Vec<u16>,
}

/// A `nats-server -js` with file storage on loopback, configured by a file it is given.
pub struct NatsServer {
    process: Process,
    port: u16,
}

/// The configuration file: loopback only, JetStream with its store in the run's folder, the sync
/// mode, and the cluster block of a cluster member. nats-server 2.9 knows no `sync_interval`:
/// [`NatsSync::Always`] needs 2.10 or later (see [`nats_syncs_always`]).
pub fn nats_config(config: &NatsConfig, store_dir: &Path) -> String {
    let mut text = format!(
        "# Written by switchboard-bench for one run.\n\
         host: 127.0.0.1\n\
         port: {}\n\
         max_payload: 1MB\n",
        config.port
    );
    if let Some(routes) = &config.cluster {
        text.push_str(&format!("server_name: {}\n", routes.name));
    }
    text.push_str(&format!(
        "jetstream {{\n  \
           store_dir: \"{}\"\n  \
           max_memory_store: 1GB\n  \
           max_file_store: 20GB\n",
        store_dir.display()
    ));
    if config.sync == NatsSync::Always {
        text.push_str("  sync_interval: always\n");
    }
    text.push_str("}\n");
    if let Some(routes) = &config.cluster {
        let peers = routes
            .peers
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "cluster {{\n  \
               name: bench\n  \
               host: 127.0.0.1\n  \
               port: {}\n  \
               routes: [{peers}]\n\
             }}\n",
            routes.port
        ));
    }
    text
}

impl NatsServer {
    /// One server on a free port, as a [`RunningBroker`].
    pub async fn start(
        binary: PathBuf,
        root: PathBuf,
        sync: NatsSync,
    ) -> anyhow::Result<RunningBroker> {
        let config = NatsConfig {
            port: free_port()?,
            sync,
            cluster: None,
        };
        Ok(RunningBroker::Nats(
            NatsServer::launch(&binary, &root, &config).await?,
        ))
    }

    /// Starts a server with `config` in a folder of its own under `root`, and waits until its
    /// client port takes connections (JetStream may still be starting then).
    pub async fn launch(
        binary: &Path,
        root: &Path,
        config: &NatsConfig,
    ) -> anyhow::Result<NatsServer> {
        let dir = data_dir(root, "sb-bench-nats-")?;
        let port = config.port;
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, nats_config(config, &dir.path().join("jetstream")))?;
        let log = std::fs::File::create(dir.path().join("nats.log"))?;
        let log_err = log.try_clone()?;
        let mut child = Command::new(binary)
            .arg("-js")
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("nats-server exited at once"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default();
                bail!("nats-server exited ({status}); its log:\n{log}");
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                bail!("nats-server did not listen on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(NatsServer {
            process: Process {
                child,
                pid,
                _dir: dir,
            },
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Either broker, so one function runs any workload against any of them.
pub enum RunningBroker {
    Switchboard(SwitchboardBroker),
    Nats(NatsServer),
}

impl RunningBroker {
    fn process(&self) -> &Process {
        match self {
            RunningBroker::Switchboard(broker) => &broker.process,
            RunningBroker::Nats(server) => &server.process,
        }
    }
}

impl Broker for RunningBroker {
    type Endpoint = String;

    fn endpoint(&self) -> String {
        match self {
            RunningBroker::Switchboard(broker) => broker.url(),
            RunningBroker::Nats(server) => server.url(),
        }
    }

    fn stats(&self) -> anyhow::Result<BrokerStats> {
        self.process().stats()
    }

    fn metrics_addrs(&self) -> Vec<SocketAddr> {
        match self {
            RunningBroker::Switchboard(broker) => broker.admin_addr().into_iter().collect(),
            RunningBroker::Nats(_) => Vec::new(),
        }
    }

    async fn stop(&mut self) {
        match self {
            RunningBroker::Switchboard(broker) => broker.process.stop().await,
            RunningBroker::Nats(server) => server.process.stop().await,
        }
    }
}

/// A port free on the loopback interface right now.
fn free_port() -> anyhow::Result<u16> {
    free_ports(1)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no free port"))
}

/// `count` distinct ports free on the loopback interface right now (all bound at once, so none
/// repeats).
pub fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

pub async fn nats_version(binary: &Path) -> anyhow::Result<String> {
    let out = Command::new(binary).arg("--version").output().await?;
    if !out.status.success() {
        bail!("{} --version failed", binary.display());
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(if text.is_empty() {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    } else {
        text
    })
}

pub async fn switchboard_version(binary: &Path) -> String {
    match Command::new(binary).arg("--version").output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => "switchboard".to_owned(),
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

/// The machine the run is on: cores, memory, kernel, and the file system under the data folder.
pub async fn machine(data_root: &Path) -> serde_json::Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_kib = read_trimmed("/proc/meminfo").and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    });
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    let cpu = read_trimmed("/proc/cpuinfo").and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let df = Command::new("df")
        .arg("--output=source,fstype")
        .arg(data_root)
        .output()
        .await
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).to_string());
    let (device, fstype) = df
        .as_deref()
        .and_then(|text| text.lines().nth(1))
        .map(|line| {
            let mut parts = line.split_whitespace();
            (
                parts.next().unwrap_or("").to_owned(),
                parts.next().unwrap_or("").to_owned(),
            )
        })
        .unwrap_or_default();
    let rotational = device
        .rsplit('/')
        .next()
        .and_then(|name| read_trimmed(format!("/sys/block/{name}/queue/rotational")));
    serde_json::json!({
        "cores": cores,
        "cpu": cpu,
        "memory_gib": memory_kib.map(|kib| (kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": kernel,
        "data_root": data_root.display().to_string(),
        "data_device": device,
        "data_fstype": fstype,
        "data_device_rotational": rotational,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let stat =
            "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1 0";
        assert_eq!(cpu_seconds_from_stat(stat, 100.0), Some(3.0));
    }

    #[test]
    fn own_process_stats_are_readable() {
        let stats = process_stats(std::process::id()).unwrap();
        assert!(stats.peak_rss_kib > 0);
        let resident = resident(std::process::id()).unwrap();
        assert!(resident.rss_kib > 0 && resident.hwm_kib >= resident.rss_kib);
    }

    #[test]
    fn nats_config_is_loopback_with_jetstream() {
        let config = NatsConfig {
            port: 4999,
            sync: NatsSync::Default,
            cluster: None,
        };
        let text = nats_config(&config, Path::new("/tmp/x"));
        assert!(text.contains("host: 127.0.0.1"));
        assert!(text.contains("port: 4999"));
        assert!(text.contains("store_dir: \"/tmp/x\""));
        assert!(!text.contains("sync_interval"));
        assert!(!text.contains("cluster"));
    }

    #[test]
    fn a_cluster_member_syncing_always_routes_to_its_peers() {
        let config = NatsConfig {
            port: 4999,
            sync: NatsSync::Always,
            cluster: Some(NatsRoutes {
                name: "n2".to_owned(),
                port: 6002,
                peers: vec![6001, 6003],
            }),
        };
        let text = nats_config(&config, Path::new("/tmp/x"));
        assert!(text.contains("server_name: n2"));
        assert!(text.contains("  sync_interval: always\n}"));
        assert!(text.contains("port: 6002"));
        assert!(text.contains("routes: [nats-route://127.0.0.1:6001, nats-route://127.0.0.1:6003]"));
    }

    #[test]
    fn sync_always_needs_nats_2_10() {
        assert!(nats_syncs_always("nats-server: v2.15.1"));
        assert!(nats_syncs_always("nats-server: v2.10.0"));
        assert!(!nats_syncs_always("nats-server: v2.9.10"));
        assert!(!nats_syncs_always("something else"));
        assert_eq!(
            NatsSync::of_label("nats-r3-sync-always"),
            Some(NatsSync::Always)
        );
        assert_eq!(NatsSync::of_label("nats"), Some(NatsSync::Default));
        assert_eq!(NatsSync::of_label("switchboard"), None);
    }
}
