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
    pub async fn start(
        binary: PathBuf,
        root: PathBuf,
        fsync: &'static str,
    ) -> anyhow::Result<RunningBroker> {
        Ok(RunningBroker::Switchboard(
            SwitchboardBroker::launch(binary, root, fsync, false).await?,
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

    /// Its peak RSS and CPU seconds so far.
    pub fn stats(&self) -> anyhow::Result<BrokerStats> {
        self.process.stats()
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }
}

/// `nats-server -js` with file storage, on a free loopback port, configured by a file it is given.
pub struct NatsServer {
    process: Process,
    port: u16,
}

/// The configuration file: loopback only, JetStream with its store in the run's folder. Debian's
/// nats-server 2.9 has no `sync_interval` / `sync_always` setting (they came in 2.10): its file
/// store syncs every 2 minutes, whatever this file says.
pub fn nats_config(port: u16, store_dir: &Path) -> String {
    format!(
        "# Written by switchboard-bench for one run.\n\
         host: 127.0.0.1\n\
         port: {port}\n\
         max_payload: 1MB\n\
         jetstream {{\n  \
           store_dir: \"{}\"\n  \
           max_memory_store: 1GB\n  \
           max_file_store: 20GB\n\
         }}\n",
        store_dir.display()
    )
}

impl NatsServer {
    pub async fn start(binary: PathBuf, root: PathBuf) -> anyhow::Result<RunningBroker> {
        let dir = data_dir(&root, "sb-bench-nats-")?;
        let port = free_port()?;
        let config = dir.path().join("nats.conf");
        std::fs::write(&config, nats_config(port, &dir.path().join("jetstream")))?;
        let log = std::fs::File::create(dir.path().join("nats.log"))?;
        let log_err = log.try_clone()?;
        let mut child = Command::new(&binary)
            .arg("-js")
            .arg("-c")
            .arg(&config)
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
        Ok(RunningBroker::Nats(NatsServer {
            process: Process {
                child,
                pid,
                _dir: dir,
            },
            port,
        }))
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
            RunningBroker::Nats(server) => format!("nats://127.0.0.1:{}", server.port),
        }
    }

    fn stats(&self) -> anyhow::Result<BrokerStats> {
        self.process().stats()
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
        let text = nats_config(4999, Path::new("/tmp/x"));
        assert!(text.contains("host: 127.0.0.1"));
        assert!(text.contains("port: 4999"));
        assert!(text.contains("store_dir: \"/tmp/x\""));
    }
}
