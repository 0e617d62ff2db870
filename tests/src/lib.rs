//! Harness for end-to-end tests: real `switchboard` processes, started on port 0 in their own data
//! folders, killed when their handle is dropped.
//!
//! The broker prints `listening on ADDR` on stdout once it accepts requests; [`BrokerProcess::start`]
//! waits for that line (with a deadline) instead of sleeping. Waiting for anything else is
//! [`eventually`]: poll a condition until a deadline.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long a broker may take to start (including replaying its log after a crash).
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a test waits for any condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Path of the `switchboard` binary built by `cargo test` (it sits next to the test's `deps/`).
/// `SWITCHBOARD_BIN` overrides it.
pub fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    profile_dir.join(format!("switchboard{}", std::env::consts::EXE_SUFFIX))
}

/// Path of the `sb` binary, beside the broker's.
pub fn sb_binary() -> PathBuf {
    broker_binary().with_file_name(format!("sb{}", std::env::consts::EXE_SUFFIX))
}

/// A running broker process.
pub struct BrokerProcess {
    child: Option<Child>,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// Its data folder.
    pub data_dir: PathBuf,
    log_path: PathBuf,
}

impl BrokerProcess {
    /// Starts a broker on `listen` (use `127.0.0.1:0` for any port) with data in `data_dir`, plus
    /// `extra` arguments; waits until it accepts requests.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<BrokerProcess> {
        let binary = broker_binary();
        if !binary.exists() {
            bail!(
                "{} does not exist: build it first (`cargo test --workspace` does)",
                binary.display()
            );
        }
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&binary)
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("SWITCHBOARD_LOG_LEVEL", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("broker stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(START_DEADLINE) {
            Ok(addr) => addr.parse().context("bad address line")?,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("broker did not start within {START_DEADLINE:?}; its log:\n{log}");
            }
        };
        Ok(BrokerProcess {
            child: Some(child),
            addr,
            data_dir: data_dir.to_owned(),
            log_path,
        })
    }

    /// Starts a broker on any free loopback port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<BrokerProcess> {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts a broker again on the same address and data (after a kill or a stop).
    pub fn restart(&mut self, extra: &[&str]) -> Result<()> {
        self.kill9();
        let again = Self::start_on(&self.data_dir, &self.addr.to_string(), extra)?;
        *self = again;
        Ok(())
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The broker's log so far (stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills the process with SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits (with a deadline) for the process to exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let pid = i32::try_from(child.id())?;
        if unsafe_kill(pid, libc::SIGTERM) != 0 {
            bail!("cannot signal the broker");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("broker did not exit within {DEADLINE:?} of SIGTERM");
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and has no memory effects in this process.
    unsafe { libc::kill(pid, signal) }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `condition` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
