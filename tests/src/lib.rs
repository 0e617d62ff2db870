//! Harness for end-to-end tests: real `switchboard` processes, started on port 0 in their own data
//! folders, killed when their handle is dropped.
//!
//! The broker prints `listening on ADDR` on stdout once it accepts requests, then
//! `admin listening on ADDR` for its admin listener; [`BrokerProcess::start`] waits for those lines
//! (with a deadline) instead of sleeping. Waiting for anything else is [`eventually`]: poll a
//! condition until a deadline. [`http_get`] reads the admin endpoints.
// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// Path of the `sb` binary (crate `switchboard-cli`), beside the broker's: `cargo test --workspace`
/// builds it; alone, `cargo build -p switchboard-cli` does.
pub fn sb_binary() -> PathBuf {
    broker_binary().with_file_name(format!("sb{}", std::env::consts::EXE_SUFFIX))
}

/// A running broker process.
pub struct BrokerProcess {
    child: Option<Child>,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The bound admin (HTTP) address; `None` when started with `--admin-listen off`.
    pub admin_addr: Option<SocketAddr>,
    /// Its data folder.
    pub data_dir: PathBuf,
    log_path: PathBuf,
}

impl BrokerProcess {
    /// Starts a broker on `listen` (use `127.0.0.1:0` for any port) with data in `data_dir`, plus
    /// `extra` arguments; waits until it accepts requests. Its admin listener is on any free
    /// loopback port unless `extra` has its own `--admin-listen`.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<BrokerProcess> {
        Self::start_with_env(data_dir, listen, extra, &[])
    }

    /// [`BrokerProcess::start_on`] with extra environment variables for the broker process.
    pub fn start_with_env(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<BrokerProcess> {
        Self::start_wrapped(&[], data_dir, listen, extra, env)
    }

    /// [`BrokerProcess::start_with_env`] with the broker run by a wrapper command (`wrapper` then
    /// the broker's path and arguments), e.g. `strace -f -o FILE`. The handle's process is the
    /// wrapper's: [`BrokerProcess::wrapped_pid`] finds the broker under it.
    pub fn start_wrapped(
        wrapper: &[&std::ffi::OsStr],
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<BrokerProcess> {
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
        let admin_flag = admin_listen_flag(extra);
        let expect_admin = !matches!(admin_flag, Some(value) if is_off(value));
        let default_admin: &[&str] = match admin_flag {
            Some(_) => &[],
            None => &["--admin-listen", "127.0.0.1:0"],
        };
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(default_admin)
            .args(extra)
            .env("SWITCHBOARD_LOG_LEVEL", "info,openraft=warn")
            .envs(env.iter().copied())
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
                    let _ = tx.send((false, addr.trim().to_owned()));
                } else if let Some(addr) = line.strip_prefix("admin listening on ") {
                    let _ = tx.send((true, addr.trim().to_owned()));
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let mut addr = None;
        let mut admin_addr = None;
        while addr.is_none() || (expect_admin && admin_addr.is_none()) {
            let wait = deadline.saturating_duration_since(Instant::now());
            let (is_admin, line) = match rx.recv_timeout(wait) {
                Ok(received) => received,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    bail!("broker did not start within {START_DEADLINE:?}; its log:\n{log}");
                }
            };
            let Ok(parsed) = line.parse::<SocketAddr>() else {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bad address line from the broker: {line:?}");
            };
            if is_admin {
                admin_addr = Some(parsed);
            } else {
                addr = Some(parsed);
            }
        }
        let addr = addr.context("no address line")?;
        Ok(BrokerProcess {
            child: Some(child),
            addr,
            admin_addr,
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

    /// The admin listener's base URL, e.g. `http://127.0.0.1:40123`.
    ///
    /// # Panics
    /// If the broker was started with `--admin-listen off`.
    pub fn admin_url(&self) -> String {
        let addr = self
            .admin_addr
            .expect("this broker was started without an admin listener");
        format!("http://{addr}")
    }

    /// The broker's log so far (stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id of the started process: the broker's, or the wrapper's when started by
    /// [`BrokerProcess::start_wrapped`] (the broker's too for a wrapper that executes it, like
    /// `prlimit`). `None` once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process id of the wrapper's first child: the broker, when started by
    /// [`BrokerProcess::start_wrapped`].
    pub fn wrapped_pid(&self) -> Option<i32> {
        let pid = self.child.as_ref()?.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Sends `signal` to the process `pid` (one started under a wrapper, say).
    ///
    /// # Errors
    /// kill(2) failed (no such process, for example).
    pub fn signal_pid(pid: i32, signal: i32) -> Result<()> {
        if unsafe_kill(pid, signal) != 0 {
            bail!(
                "cannot signal process {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits (with a deadline) for the process to exit by itself, e.g. a wrapper whose broker was
    /// signalled directly.
    pub fn wait_exit(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("process did not exit within {DEADLINE:?}");
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
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
        let child = self.child.as_ref().ok_or_else(|| anyhow!("not running"))?;
        let pid = i32::try_from(child.id())?;
        if unsafe_kill(pid, libc::SIGTERM) != 0 {
            bail!("cannot signal the broker");
        }
        self.wait_exit()
    }
}

/// The value given to `--admin-listen` in `args` (`--admin-listen V` or `--admin-listen=V`).
fn admin_listen_flag<'a>(args: &[&'a str]) -> Option<&'a str> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if *arg == "--admin-listen" {
            return Some(args.next().copied().unwrap_or(""));
        }
        if let Some(value) = arg.strip_prefix("--admin-listen=") {
            return Some(value);
        }
    }
    None
}

fn is_off(value: &str) -> bool {
    let value = value.trim();
    value.is_empty() || value.eq_ignore_ascii_case("off")
}

/// A response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET url` over HTTP/1.1 (plain `http://host:port/path` only), reading the whole response: enough
/// for the admin listener, without an HTTP client dependency.
pub async fn http_get(url: &str) -> Result<HttpResponse> {
    http_request("GET", url, &[], b"").await
}

/// Splits a plain `http://host:port/path` URL.
fn split_url(url: &str) -> Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The request head for `method url` with `headers` and a body of `body_len` bytes.
fn request_head(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body_len: usize,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if body_len > 0 || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Parses a status line and header lines (names in lower case).
fn parse_head(url: &str, head: &str) -> Result<(u16, Vec<(String, String)>)> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{url}: bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

/// `method url` over HTTP/1.1 with `headers` and `body`, reading the whole response.
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (host, path) = split_url(url)?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        let mut request = request_head(method, host, path, headers, body.len()).into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| anyhow!("{method} {url}: no response within {DEADLINE:?}"))??;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {url}: no end of headers in {text:?}"))?;
    let (status, headers) = parse_head(url, head)?;
    let body = if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name; `None` for the default `message`.
    pub event: Option<String>,
    /// The `id:` field.
    pub id: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

/// A Server-Sent-Events response read event by event (a chunked HTTP/1.1 body).
pub struct SseStream {
    /// The response's status.
    pub status: u16,
    /// The response's headers, names in lower case.
    pub headers: Vec<(String, String)>,
    stream: tokio::net::TcpStream,
    /// Received bytes not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked text not yet parsed into events.
    text: String,
    /// Events parsed but not yet returned.
    pending: std::collections::VecDeque<SseEvent>,
    /// How many comment lines (keep-alives) were seen.
    pub comments: usize,
}

impl SseStream {
    /// `GET url` with `headers`; returns once the response head has arrived.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Result<SseStream> {
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        Self::open_with("GET", url, &all, b"").await
    }

    /// `method url` with `headers` and `body`; returns once the response head has arrived.
    pub async fn open_with(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<SseStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (host, path) = split_url(url)?;
        let open = async {
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            let mut request = request_head(method, host, path, headers, body.len()).into_bytes();
            request.extend_from_slice(body);
            stream.write_all(&request).await?;
            let mut raw = Vec::new();
            let end = loop {
                if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    bail!("connection closed before the response head");
                }
                raw.extend_from_slice(&buf[..n]);
            };
            let head = String::from_utf8(raw[..end].to_vec())?;
            let rest = raw[end + 4..].to_vec();
            anyhow::Ok((stream, head, rest))
        };
        let (stream, head, raw) = tokio::time::timeout(DEADLINE, open)
            .await
            .map_err(|_| anyhow!("{method} {url}: no response head within {DEADLINE:?}"))??;
        let (status, headers) = parse_head(url, &head)?;
        Ok(SseStream {
            status,
            headers,
            stream,
            raw,
            text: String::new(),
            pending: std::collections::VecDeque::new(),
            comments: 0,
        })
    }

    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Moves complete chunks from `raw` to `text`; false once the last chunk arrived.
    fn dechunk_available(&mut self) -> Result<bool> {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return Ok(true);
            };
            let size_text = std::str::from_utf8(&self.raw[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            if size == 0 {
                return Ok(false);
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return Ok(true);
            }
            self.text
                .push_str(std::str::from_utf8(&self.raw[start..start + size])?);
            self.raw.drain(..start + size + 2);
        }
    }

    /// Parses every complete block received so far into `pending`, counting comment lines;
    /// false once the stream has ended.
    fn parse_available(&mut self) -> Result<bool> {
        let open = self.dechunk_available()?;
        while let Some(end) = self.text.find("\n\n") {
            let block: String = self.text.drain(..end + 2).collect();
            let mut event = SseEvent {
                event: None,
                id: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event.event = Some(value.to_owned()),
                    "id" => event.id = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if has_data {
                self.pending.push_back(event);
            }
        }
        Ok(open)
    }

    /// Reads more of the stream, failing at `deadline` or when the connection closes.
    async fn read_more(&mut self, deadline: tokio::time::Instant) -> Result<()> {
        use tokio::io::AsyncReadExt;

        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
            .await
            .map_err(|_| anyhow!("nothing arrived within {DEADLINE:?}"))??;
        if n == 0 {
            bail!("the connection closed");
        }
        self.raw.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// The next event with data (comments and `retry:` blocks are skipped), failing after
    /// [`DEADLINE`] or when the stream ends.
    pub async fn next_event(&mut self) -> Result<SseEvent> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let open = self.parse_available()?;
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if !open {
                bail!("the event stream ended");
            }
            self.read_more(deadline).await?;
        }
    }

    /// For a streamed body that is not SSE (gRPC-Web): reads until the de-chunked text received
    /// so far satisfies `done`, and returns it all.
    pub async fn body_until(&mut self, done: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let open = self.dechunk_available()?;
            if done(&self.text) {
                return Ok(self.text.clone());
            }
            if !open {
                bail!(
                    "the body ended without the expected content: {:?}",
                    self.text
                );
            }
            self.read_more(deadline).await?;
        }
    }

    /// Waits for one more comment line (a keep-alive); events arriving meanwhile are kept for
    /// [`SseStream::next_event`].
    pub async fn next_comment(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let before = self.comments;
        loop {
            let open = self.parse_available()?;
            if self.comments > before {
                return Ok(());
            }
            if !open {
                bail!("the event stream ended");
            }
            self.read_more(deadline).await?;
        }
    }
}

/// Decodes a chunked body.
fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.push_str(chunk);
        body = rest
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| anyhow!("chunk not followed by CRLF"))?;
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

/// `n` loopback ports that were free a moment ago: each is bound to port 0 and released. For
/// settings that must be known before a process starts (the raft listeners every member of a
/// static cluster names), where port 0 cannot be used.
pub fn free_loopback_ports(n: usize) -> Result<Vec<u16>> {
    // All bound at once, so the n ports differ.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// One node of a loopback test cluster: how to (re)start it, and the running process.
pub struct ClusterNode {
    /// Its raft id.
    pub id: u64,
    /// Its raft listener, `127.0.0.1:port`.
    pub raft_addr: String,
    /// `SWITCHBOARD_CLUSTER_MEMBERS` it starts with (empty for a node that joins as a learner).
    pub members: String,
    /// Extra `SWITCHBOARD_*` settings.
    pub env: Vec<(String, String)>,
    /// The running broker; `None` after [`ClusterNode::kill9`].
    pub process: Option<BrokerProcess>,
    data_dir: PathBuf,
}

impl ClusterNode {
    /// Starts node `id` with data under `root/node<id>`, its raft listener on `raft_addr`, and
    /// `members` as its static voters (empty = a newcomer waiting to be added).
    pub fn start(
        root: &Path,
        id: u64,
        raft_addr: &str,
        members: &str,
        env: &[(&str, &str)],
    ) -> Result<ClusterNode> {
        let mut node = ClusterNode {
            id,
            raft_addr: raft_addr.to_owned(),
            members: members.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            process: None,
            data_dir: root.join(format!("node{id}")),
        };
        node.start_again()?;
        Ok(node)
    }

    /// Starts the process (again, on its data): its public and admin ports are new ones.
    pub fn start_again(&mut self) -> Result<()> {
        let id = self.id.to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("SWITCHBOARD_CLUSTER_LISTEN", &self.raft_addr),
            ("SWITCHBOARD_CLUSTER_MEMBERS", &self.members),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let process = BrokerProcess::start_with_env(
            &self.data_dir,
            "127.0.0.1:0",
            &["--node-id", &id],
            &env,
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// The running process.
    ///
    /// # Panics
    /// If it was killed.
    pub fn process(&self) -> &BrokerProcess {
        self.process.as_ref().expect("this node is not running")
    }

    /// Its public URL.
    pub fn url(&self) -> String {
        self.process().url()
    }

    /// SIGKILL, no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill9();
        }
    }

    /// Its data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// Starts `n` nodes (ids 1..=n) forming one static cluster on loopback, each with `env` added.
pub fn start_cluster(root: &Path, n: usize, env: &[(&str, &str)]) -> Result<Vec<ClusterNode>> {
    // The raft ports are picked free and then released for the nodes to bind, so another test
    // process can take one in between ("Address already in use"): then the whole cluster starts
    // again on fresh ports and empty folders, a few times.
    let mut attempt = 1;
    loop {
        match start_cluster_once(root, n, env) {
            Err(e) if attempt < 4 && format!("{e:#}").contains("Address already in use") => {
                for id in 1..=n {
                    let _ = std::fs::remove_dir_all(root.join(format!("node{id}")));
                }
                attempt += 1;
            }
            started => return started,
        }
    }
}

/// The `cluster.members` value for voters 1, 2, … at `addrs`: `1=addr,2=addr,…`.
pub fn static_members(addrs: &[String]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

fn start_cluster_once(root: &Path, n: usize, env: &[(&str, &str)]) -> Result<Vec<ClusterNode>> {
    let ports = free_loopback_ports(n)?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let members = static_members(&addrs);
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| ClusterNode::start(root, i as u64 + 1, addr, &members, env))
        .collect()
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

pub mod compose;
pub mod history;
pub mod otlp;
pub mod power_loss;
pub mod strace;
pub mod web;

/// A small file system of its own (a tmpfs) for a test that fills a disk; unmounted when dropped.
pub struct SmallDisk {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` at `path` (created if missing).
    ///
    /// # Errors
    /// Mounting is not possible here (it needs root, or CAP_SYS_ADMIN).
    pub fn mount(path: &Path, bytes: u64) -> Result<SmallDisk> {
        std::fs::create_dir_all(path)?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .context("cannot run mount")?;
        if !output.status.success() {
            bail!(
                "cannot mount a tmpfs at {}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    /// Mounts one for a test, or says why the test is skipped (`None`); under CI (`CI` set) a
    /// disk that cannot be mounted fails the test instead.
    pub fn for_test(path: &Path, bytes: u64) -> Option<SmallDisk> {
        match SmallDisk::mount(path, bytes) {
            Ok(disk) => Some(disk),
            Err(e) if std::env::var_os("CI").is_some() => panic!("{e:#}"),
            Err(e) => {
                eprintln!("skipped: {e:#} (run as root to include this test)");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
