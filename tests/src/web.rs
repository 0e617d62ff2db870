//! Browser-side helpers: a static file server (the demo pages, served on as many origins as a
//! test needs) and a minimal WebDriver client for headless Chromium driven by `chromedriver`.
//!
//! The WebDriver protocol is JSON over HTTP; the few commands the tests need (open a session,
//! navigate, run a script, take a screenshot) are plain requests through [`crate::http_request`],
//! so no browser-automation crate is needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::{eventually, DEADLINE};

/// The `web/demo` folder of the repository.
pub fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/demo")
}

/// Serves the files of `dir` over HTTP/1.1 on `addr` (port 0 for any) from a background thread,
/// one short-lived thread per connection; returns the bound address. Only `GET` of a file
/// directly under `dir`: the demo has no subfolders, and refusing `/` and `..` keeps the server
/// from reading anything else.
pub fn serve_dir(dir: PathBuf, addr: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    let bound = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // A broken connection only concerns its browser tab.
                let _ = serve_one(&dir, stream);
            });
        }
    });
    Ok(bound)
}

fn serve_one(dir: &Path, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers: nothing in them changes a static answer.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target
        .split('?')
        .next()
        .unwrap_or("/")
        .trim_start_matches('/');
    let name = if path.is_empty() { "index.html" } else { path };
    let file = (method == "GET" && !name.contains('/') && !name.contains(".."))
        .then(|| std::fs::read(dir.join(name)).ok())
        .flatten();
    let (status, content_type, body) = match file {
        Some(body) => ("200 OK", content_type(name), body),
        None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

/// Where Debian's `chromium` and `chromium-driver` put their programs.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether the browser tests must run: `SWITCHBOARD_BROWSER_TESTS=1` (set by `.ci/run`) turns a
/// missing Chromium into a failure instead of a skip.
pub fn browser_tests_required() -> bool {
    std::env::var("SWITCHBOARD_BROWSER_TESTS").is_ok_and(|v| v == "1")
}

/// `Some(reason)` when Chromium or chromedriver is not installed.
pub fn chromium_missing() -> Option<String> {
    [CHROMIUM, CHROMEDRIVER]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is not installed (apt-get install chromium chromium-driver)"))
}

/// A `chromedriver` process and one headless Chromium session; both end when dropped, and the
/// browser profile folder with them.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless session.
    pub async fn start() -> Result<Browser> {
        Self::start_with(&[]).await
    }

    /// [`Browser::start`] with extra Chromium command-line arguments.
    pub async fn start_with(extra_args: &[&str]) -> Result<Browser> {
        let port = crate::free_loopback_ports(1)?[0];
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            profile,
        };
        let status_url = format!("{}/status", browser.base);
        eventually("chromedriver is ready", || async {
            let (_, body) = webdriver_request("GET", &status_url, b"").ok()?;
            let status: Value = serde_json::from_str(&body).ok()?;
            status["value"]["ready"].as_bool().filter(|r| *r)
        })
        .await?;
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=900,760".to_owned(),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
            },
        }}});
        let created = browser.command("POST", "/session", &capabilities).await?;
        browser.session = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {created}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; the `value` of its answer, or its error.
    async fn command(&self, method: &str, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        // GET commands take no body at all: chromedriver refuses even `null`.
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body)?
        };
        let method_owned = method.to_owned();
        let (status, text) =
            tokio::task::spawn_blocking(move || webdriver_request(&method_owned, &url, &body))
                .await??;
        let answer: Value =
            serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))?;
        if status != 200 {
            bail!("{method} {path}: {status} {}", answer["value"]);
        }
        Ok(answer["value"].clone())
    }

    fn session_path(&self, tail: &str) -> String {
        format!("/session/{}{tail}", self.session)
    }

    /// Loads `url` in the current tab (waits for the page's load event).
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command("POST", &self.session_path("/url"), &json!({ "url": url }))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page and returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> Result<Value> {
        let body = json!({ "script": script, "args": args });
        self.command("POST", &self.session_path("/execute/sync"), &body)
            .await
    }

    /// Polls `script` until it returns something other than `null`/`false`, within [`DEADLINE`].
    pub async fn wait_for(&self, what: &str, script: &str) -> Result<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let value = self.eval(script, json!([])).await?;
            if !value.is_null() && value != Value::Bool(false) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("page condition not met within {DEADLINE:?}: {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A PNG of the current page.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let encoded = self
            .command("GET", &self.session_path("/screenshot"), &Value::Null)
            .await?;
        let encoded = encoded.as_str().ok_or_else(|| anyhow!("no screenshot"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; killing the driver then frees its port. Best effort:
        // drop cannot wait on async requests, so a blocking one goes straight to the socket.
        if !self.session.is_empty() {
            let url = format!("{}{}", self.base, self.session_path(""));
            let _ = webdriver_request("DELETE", &url, b"");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One request to chromedriver: it keeps connections open whatever `Connection: close` says, so
/// the answer ends at its `Content-Length`, not at end of stream.
fn webdriver_request(method: &str, url: &str, body: &[u8]) -> Result<(u16, String)> {
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{url}: bad status line {status_line:?}"))?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut answer = vec![0; length];
    reader.read_exact(&mut answer)?;
    Ok((status, String::from_utf8(answer)?))
}
