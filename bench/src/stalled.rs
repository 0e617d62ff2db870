//! `--stalled`: the broker's memory with subscribers that never read (issue 20, item 1).
//!
//! One Switchboard broker (admin listener on, for `/metrics`) gets `connections` client
//! connections of `streams` subscriptions each on one pattern. Each of those connections
//! advertises the largest HTTP/2 windows (2^31 − 1 bytes, unless `--default-windows`) and a 4 KiB
//! socket receive buffer, and once its subscriptions are open it stops reading its socket for
//! good. A healthy subscriber on a connection of its own reads everything. A publisher on another
//! connection then sends `publish_mib` MiB in messages of `message_size` bytes (one
//! `PublishStream`, at most `--window` unacknowledged). The broker's `VmRSS` and `VmHWM` are
//! sampled every 100 ms throughout; at the end of publishing the tool reads the broker's buffer
//! metrics; then it closes the stalled connections and reads the RSS 5 s and 15 s later.
//!
//! A broker without the bound can grow past this machine's memory, so publishing stops early
//! when the broker's RSS passes `--rss-cap-mib` (the report says so), and the broker is killed if
//! it goes on to a quarter more than that.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::task::AtomicWaker;
use serde::Serialize;
use switchboard_client::{Client, Start, SubscribeOptions, Subscription};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::brokers::{self, Resident, SwitchboardBroker};
use crate::sb::Windowed;
use crate::scrape;
use crate::tally::{self, Windowed as _};

/// The subscriptions' pattern and the channel published to.
const PATTERN: &str = "membench.*";
const CHANNEL: &str = "membench.events";
/// How often the broker's resident set is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How often the broker's [`METRICS`] are read, for their peaks.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);
/// After the stalled connections are closed, the RSS is reported this long later, twice.
const AFTER_CLOSE: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(15)];
/// The broker metrics reported at the end of publishing and after the close.
const METRICS: [&str; 3] = [
    "switchboard_send_buffered_bytes",
    "switchboard_catch_up_held_bytes",
    "switchboard_stalled_connections_closed_total",
];

/// The size of one run.
#[derive(Clone, Debug, Serialize)]
pub struct StalledPlan {
    pub connections: usize,
    pub streams: usize,
    pub publish_bytes: u64,
    pub message_size: usize,
    pub window: usize,
    /// Whether the stalled connections advertise 2^31 − 1 byte HTTP/2 windows (else tonic's
    /// defaults).
    pub huge_windows: bool,
    pub rss_cap_kib: u64,
    pub fsync: &'static str,
}

impl StalledPlan {
    fn messages(&self) -> u64 {
        self.publish_bytes / self.message_size.max(1) as u64
    }
}

/// One reading of the broker's resident set, `at_ms` after the broker started.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    at_ms: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

/// One reading of the broker's [`METRICS`], `at_ms` after the broker started.
#[derive(Clone, Debug, Serialize)]
struct Scrape {
    at_ms: u64,
    values: Vec<(String, Option<f64>)>,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct StalledReport {
    broker: String,
    plan: StalledPlan,
    idle: Resident,
    /// Once every subscription is open, before any socket stalls.
    subscribed: Resident,
    seconds_to_subscribe: f64,
    published: u64,
    publish_failed: u64,
    publish_seconds: f64,
    /// From the moment the sockets stopped being read to the end of publishing.
    seconds_stalled_at_publish_end: f64,
    /// The most `VmRSS` seen by the 100 ms sampler while publishing.
    peak_rss_publishing_kib: u64,
    at_publish_end: Resident,
    metrics_at_publish_end: Vec<(String, Option<f64>)>,
    /// The highest value of each of [`METRICS`] read every 250 ms from the start of publishing
    /// until the stalled connections were closed.
    peak_metrics: Vec<(String, Option<f64>)>,
    reader_received: u64,
    reader_seconds: f64,
    /// Just before the stalled connections are closed (after the reader finished).
    before_close: Resident,
    /// `AFTER_CLOSE` after the stalled connections were closed.
    after_close: Vec<(f64, Resident)>,
    metrics_after_close: Vec<(String, Option<f64>)>,
    notes: Vec<String>,
    samples: Vec<Sample>,
    scrapes: Vec<Scrape>,
}

/// Runs the benchmark against a fresh broker started from `binary`, with its data under `root`.
pub async fn run(
    binary: std::path::PathBuf,
    root: std::path::PathBuf,
    plan: StalledPlan,
) -> anyhow::Result<StalledReport> {
    let version = brokers::switchboard_version(&binary).await;
    eprintln!(
        "[membench] {version}: {} connections × {} stalled subscriptions ({} windows), {} MiB in {} B messages",
        plan.connections,
        plan.streams,
        if plan.huge_windows { "2^31-1 byte" } else { "default" },
        plan.publish_bytes >> 20,
        plan.message_size
    );
    let mut broker = SwitchboardBroker::launch(binary, root, plan.fsync, true).await?;
    let limit = Duration::from_secs(900);
    let result = tokio::time::timeout(limit, measure(&mut broker, version, plan)).await;
    broker.stop().await;
    match result {
        Ok(report) => report,
        Err(_elapsed) => bail!("the memory benchmark did not finish within {limit:?}"),
    }
}

async fn measure(
    broker: &mut SwitchboardBroker,
    version: String,
    plan: StalledPlan,
) -> anyhow::Result<StalledReport> {
    let pid = broker.pid();
    let url = broker.url();
    let admin = broker
        .admin_addr()
        .ok_or_else(|| anyhow!("the broker has no admin listener"))?;
    let started = Instant::now();
    let mut notes = Vec::new();
    let sampler = Sampler::start(pid, admin, started, plan.rss_cap_kib);
    let idle = brokers::resident(pid)?;

    eprintln!("[membench] opening the subscriptions");
    let opening = Instant::now();
    let mut stalled = Vec::with_capacity(plan.connections);
    let opened = futures::future::join_all(
        (0..plan.connections).map(|_| StalledConnection::open(&url, &plan)),
    )
    .await;
    for connection in opened {
        stalled.push(connection?);
    }
    let seconds_to_subscribe = opening.elapsed().as_secs_f64();
    let subscribed = brokers::resident(pid)?;
    for connection in &stalled {
        connection.valve.stall();
    }
    let stalled_at = Instant::now();

    // The healthy reader: its own connection, default windows, reads everything.
    let messages = plan.messages();
    let (expected_tx, expected) = watch::channel(u64::MAX);
    let reader_deadline = Instant::now() + Duration::from_secs(600);
    let reader = crate::sb::subscribers(
        std::slice::from_ref(&url),
        PATTERN,
        1,
        &expected,
        None,
        reader_deadline,
    )
    .await?;

    eprintln!("[membench] publishing {messages} messages");
    let client = Client::connect(url.clone())
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let stream = Windowed::open(&client, plan.window);
    let publish_start = Instant::now();
    let publish_start_ms = started.elapsed().as_millis() as u64;
    for seq in 0..messages {
        if sampler.over_cap.load(Ordering::Relaxed) {
            notes.push(format!(
                "publishing stopped after {seq} of {messages} messages: the broker's RSS passed {} MiB",
                plan.rss_cap_kib >> 10
            ));
            break;
        }
        if let Err(error) = stream.send(CHANNEL, seq, plan.message_size).await {
            if sampler.killed.load(Ordering::Relaxed) {
                bail!(
                    "the broker's RSS passed {} MiB {:.1} s after the sockets stalled, after {seq} \
                     messages: it was killed",
                    (plan.rss_cap_kib + plan.rss_cap_kib / 4) >> 10,
                    stalled_at.elapsed().as_secs_f64()
                );
            }
            return Err(error);
        }
    }
    let acks = stream.finish().await?;
    let publish_seconds = publish_start.elapsed().as_secs_f64();
    let seconds_stalled_at_publish_end = stalled_at.elapsed().as_secs_f64();
    let at_publish_end = brokers::resident(pid)?;
    let publish_end_ms = started.elapsed().as_millis() as u64;
    let metrics_at_publish_end = scrape(admin).await;
    let peak_rss_publishing_kib = sampler
        .samples()
        .iter()
        .filter(|s| (publish_start_ms..=publish_end_ms).contains(&s.at_ms))
        .map(|s| s.rss_kib)
        .chain([at_publish_end.rss_kib])
        .max()
        .unwrap_or(at_publish_end.rss_kib);
    eprintln!(
        "[membench] published {} in {publish_seconds:.1} s; RSS {} MiB (peak {} MiB)",
        acks.acked,
        at_publish_end.rss_kib >> 10,
        peak_rss_publishing_kib >> 10
    );

    expected_tx.send_replace(acks.acked);
    let reading = Instant::now();
    let received = tally::join(reader).await?;
    let reader_received = received.iter().map(|r| r.count).sum();
    let reader_seconds = reading.elapsed().as_secs_f64();
    if reader_received < acks.acked {
        notes.push(format!(
            "the healthy reader received {reader_received} of {} messages before its deadline",
            acks.acked
        ));
    }
    if acks.failed > 0 {
        notes.push(format!(
            "{} publishes refused (first: {})",
            acks.failed,
            acks.first_failure.as_deref().unwrap_or("?")
        ));
    }

    let before_close = brokers::resident(pid)?;
    let close_ms = started.elapsed().as_millis() as u64;
    let peak_metrics = METRICS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let peak = sampler
                .scrapes()
                .iter()
                .filter(|s| (publish_start_ms..=close_ms).contains(&s.at_ms))
                .filter_map(|s| s.values.get(i).and_then(|(_, v)| *v))
                .reduce(f64::max);
            ((*name).to_owned(), peak)
        })
        .collect();
    eprintln!("[membench] closing the stalled connections");
    let closed_at = Instant::now();
    for connection in &stalled {
        connection.valve.close();
    }
    drop(stalled);
    let mut after_close = Vec::new();
    for after in AFTER_CLOSE {
        tokio::time::sleep_until(closed_at + after).await;
        after_close.push((after.as_secs_f64(), brokers::resident(pid)?));
    }
    let metrics_after_close = scrape(admin).await;
    if sampler.killed.load(Ordering::Relaxed) {
        notes.push("the broker was killed: its RSS went past 1.25 × the cap".to_owned());
    }
    let (samples, scrapes) = sampler.stop().await;
    Ok(StalledReport {
        broker: version,
        plan,
        idle,
        subscribed,
        seconds_to_subscribe,
        published: acks.acked,
        publish_failed: acks.failed,
        publish_seconds,
        seconds_stalled_at_publish_end,
        peak_rss_publishing_kib,
        at_publish_end,
        metrics_at_publish_end,
        peak_metrics,
        reader_received,
        reader_seconds,
        before_close,
        after_close,
        metrics_after_close,
        notes,
        samples,
        scrapes,
    })
}

/// Reads the broker's resident set every [`SAMPLE_EVERY`]; flags `over_cap` when it passes the
/// cap, and kills the broker past 1.25 × the cap.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    scrapes: Arc<Mutex<Vec<Scrape>>>,
    scraper: tokio::task::JoinHandle<()>,
    over_cap: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32, admin: std::net::SocketAddr, started: Instant, cap_kib: u64) -> Sampler {
        let scrapes = Arc::new(Mutex::new(Vec::new()));
        let scraper = tokio::spawn({
            let scrapes = scrapes.clone();
            async move {
                let mut every = tokio::time::interval(SCRAPE_EVERY);
                loop {
                    every.tick().await;
                    // Quietly: a failed scrape is a gap in the series.
                    let values = known_metrics(&scrape::page(admin).await.unwrap_or_default());
                    if let Ok(mut scrapes) = scrapes.lock() {
                        scrapes.push(Scrape {
                            at_ms: started.elapsed().as_millis() as u64,
                            values,
                        });
                    }
                }
            }
        });
        let samples = Arc::new(Mutex::new(Vec::new()));
        let over_cap = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (samples, over_cap, killed) = (samples.clone(), over_cap.clone(), killed.clone());
            async move {
                let mut every = tokio::time::interval(SAMPLE_EVERY);
                loop {
                    every.tick().await;
                    let Ok(now) = brokers::resident(pid) else {
                        break;
                    };
                    if now.rss_kib > cap_kib {
                        over_cap.store(true, Ordering::Relaxed);
                    }
                    if now.rss_kib > cap_kib + cap_kib / 4 && !killed.swap(true, Ordering::Relaxed)
                    {
                        eprintln!(
                            "[membench] the broker's RSS is {} MiB: killing it",
                            now.rss_kib >> 10
                        );
                        let _ = tokio::process::Command::new("kill")
                            .arg("-KILL")
                            .arg(pid.to_string())
                            .status()
                            .await;
                    }
                    if let Ok(mut samples) = samples.lock() {
                        samples.push(Sample {
                            at_ms: started.elapsed().as_millis() as u64,
                            rss_kib: now.rss_kib,
                            hwm_kib: now.hwm_kib,
                        });
                    }
                }
            }
        });
        Sampler {
            samples,
            scrapes,
            scraper,
            over_cap,
            killed,
            task,
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn scrapes(&self) -> Vec<Scrape> {
        self.scrapes.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn stop(self) -> (Vec<Sample>, Vec<Scrape>) {
        self.task.abort();
        self.scraper.abort();
        let (samples, scrapes) = (self.samples(), self.scrapes());
        let _ = self.task.await;
        let _ = self.scraper.await;
        (samples, scrapes)
    }
}

/// The [`METRICS`] from the admin listener's `/metrics` (`None` for one the broker does not
/// export, or when the scrape fails).
async fn scrape(admin: std::net::SocketAddr) -> Vec<(String, Option<f64>)> {
    let text = match scrape::page(admin).await {
        Ok(text) => text,
        Err(error) => {
            eprintln!("[membench] cannot read /metrics: {error:#}");
            String::new()
        }
    };
    known_metrics(&text)
}

/// The [`METRICS`] in a Prometheus text page.
fn known_metrics(text: &str) -> Vec<(String, Option<f64>)> {
    METRICS
        .iter()
        .map(|name| ((*name).to_owned(), scrape::value(text, name)))
        .collect()
}

/// Whether a connection's socket is read: first yes, then no (stalled), then it fails (closed).
#[derive(Default)]
struct Valve {
    state: AtomicU8,
    /// The task waiting to read while stalled, woken when the valve closes.
    reader: AtomicWaker,
}

const OPEN: u8 = 0;
const STALLED: u8 = 1;
const CLOSED: u8 = 2;

impl Valve {
    fn stall(&self) {
        self.state.store(STALLED, Ordering::SeqCst);
    }

    fn close(&self) {
        self.state.store(CLOSED, Ordering::SeqCst);
        self.reader.wake();
    }

    fn closed_error() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by the benchmark",
        )
    }
}

/// A TCP socket that stops being read once its valve stalls, and fails once it closes: the HTTP/2
/// connection over it then ends and the socket is closed.
struct ValvedSocket {
    stream: tokio::net::TcpStream,
    valve: Arc<Valve>,
}

impl AsyncRead for ValvedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.valve.state.load(Ordering::SeqCst) {
            OPEN => Pin::new(&mut self.stream).poll_read(cx, buf),
            STALLED => {
                self.valve.reader.register(cx.waker());
                // Closed in between: the wake may have gone to an earlier waker.
                if self.valve.state.load(Ordering::SeqCst) == CLOSED {
                    return Poll::Ready(Err(Valve::closed_error()));
                }
                Poll::Pending
            }
            _ => Poll::Ready(Err(Valve::closed_error())),
        }
    }
}

impl AsyncWrite for ValvedSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.valve.state.load(Ordering::SeqCst) == CLOSED {
            return Poll::Ready(Err(Valve::closed_error()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One client connection whose subscriptions will never be read.
struct StalledConnection {
    valve: Arc<Valve>,
    /// Kept open until the connection is closed.
    _subscriptions: Vec<Subscription>,
    _client: Client,
}

impl StalledConnection {
    async fn open(url: &str, plan: &StalledPlan) -> anyhow::Result<StalledConnection> {
        let addr: std::net::SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("not a loopback address: {url}"))?;
        let valve = Arc::new(Valve::default());
        let connector = tower::service_fn({
            let valve = valve.clone();
            move |_: tonic::transport::Uri| {
                let valve = valve.clone();
                async move {
                    if valve.state.load(Ordering::SeqCst) == CLOSED {
                        return Err(Valve::closed_error());
                    }
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    // The kernel keeps little for a client that does not read.
                    socket.set_recv_buffer_size(4096)?;
                    let stream = socket.connect(addr).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(ValvedSocket {
                        stream,
                        valve,
                    }))
                }
            }
        });
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?;
        if plan.huge_windows {
            endpoint = endpoint
                .initial_stream_window_size(i32::MAX as u32)
                .initial_connection_window_size(i32::MAX as u32);
        }
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let client = Client::from_channel(channel, url);
        let mut subscriptions = Vec::with_capacity(plan.streams);
        for _ in 0..plan.streams {
            subscriptions.push(
                client
                    .subscribe_with(
                        PATTERN,
                        Start::Latest,
                        SubscribeOptions::default().max_reconnect_attempts(Some(0)),
                    )
                    .await
                    .with_context(|| format!("cannot subscribe to {PATTERN}"))?,
            );
        }
        Ok(StalledConnection {
            valve,
            _subscriptions: subscriptions,
            _client: client,
        })
    }
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

/// The report as a Markdown table, one row per figure.
pub fn print(report: &StalledReport) {
    let plan = &report.plan;
    println!();
    println!(
        "Memory with subscribers that never read: {} ({} connections × {} subscriptions, {} windows; {} messages of {} B published)",
        report.broker,
        plan.connections,
        plan.streams,
        if plan.huge_windows {
            "2^31-1 byte HTTP/2"
        } else {
            "default HTTP/2"
        },
        report.published,
        plan.message_size
    );
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    let row = |name: String, value: String| println!("| {name} | {value} |");
    row("RSS idle (MiB)".into(), mib(report.idle.rss_kib));
    row(
        format!(
            "RSS with the subscriptions open (MiB; {:.1} s to open)",
            report.seconds_to_subscribe
        ),
        mib(report.subscribed.rss_kib),
    );
    row(
        "peak RSS while publishing (MiB, 100 ms samples)".into(),
        mib(report.peak_rss_publishing_kib),
    );
    row(
        format!(
            "RSS at the end of publishing (MiB; {:.1} s publishing, {:.1} s after the sockets stalled)",
            report.publish_seconds, report.seconds_stalled_at_publish_end
        ),
        mib(report.at_publish_end.rss_kib),
    );
    row(
        "VmHWM at the end of publishing (MiB)".into(),
        mib(report.at_publish_end.hwm_kib),
    );
    for (name, value) in &report.metrics_at_publish_end {
        row(
            format!("`{name}` at the end of publishing"),
            value.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}")),
        );
    }
    for (name, value) in &report.peak_metrics {
        row(
            format!("`{name}`, highest (read every 250 ms until the close)"),
            value.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}")),
        );
    }
    row(
        format!(
            "healthy reader: messages received ({:.1} s after publishing)",
            report.reader_seconds
        ),
        format!("{} of {}", report.reader_received, report.published),
    );
    row(
        "RSS before closing the stalled connections (MiB)".into(),
        mib(report.before_close.rss_kib),
    );
    for (after, resident) in &report.after_close {
        row(
            format!("RSS {after:.0} s after closing them (MiB)"),
            mib(resident.rss_kib),
        );
    }
    for (name, value) in &report.metrics_after_close {
        row(
            format!("`{name}` 15 s after closing"),
            value.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}")),
        );
    }
    if !report.notes.is_empty() {
        println!();
        for note in &report.notes {
            println!("- {note}");
        }
    }
}
