//! The HTTP admin listener (`admin_listen`, default `127.0.0.1:7401`, `off` to disable):
//! - `GET /metrics`: Prometheus text format 0.0.4 — the recorded event metrics and the broker's
//!   state read at scrape time (see [`super::metrics`]);
//! - `GET /healthz`: `200 ok` while this node knows a raft leader and has room to write, `503`
//!   with the reason otherwise (no leader; storage full);
//! - `GET /console` (with its script and style), `GET /console/api/state` and
//!   `GET /console/api/history`: the read-only operator console (see [`super::console`] and
//!   [`super::history`], whose sampler runs while the listener does).
//!
//! Anything else is 404 (405 for another method). It is plain HTTP/1.1 on hyper, the server tonic
//! already uses; it stops accepting when shutdown begins and closes its connections gracefully.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::raft::Member;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::console;
use super::history::{self, History};
use super::metrics::{self, Scrape, SubscriptionScrape};
use crate::fanout::registry::{Control, Registry};
use crate::raft::Raft;
use crate::shutdown::ShutdownSignal;
use crate::state::AppliedProgress;
use crate::transport::{is_resource_exhaustion, AcceptPacing};

/// The content type of the Prometheus text exposition format.
pub(crate) const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const PAGE_CONTENT_TYPE: &str = "text/html; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";
const SCRIPT_CONTENT_TYPE: &str = "text/javascript; charset=utf-8";
const STYLE_CONTENT_TYPE: &str = "text/css; charset=utf-8";
/// Admin connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints read: the broker's parts, shared with the gRPC service.
pub(crate) struct Sources {
    /// This node's raft id.
    pub node_id: u64,
    /// The raft handle, for its metrics.
    pub raft: Raft,
    /// Applied offsets and sizes.
    pub progress: watch::Receiver<AppliedProgress>,
    /// The live subscriptions of this node.
    pub registry: Registry,
    /// The data folder, measured for `switchboard_disk_bytes`.
    pub data_dir: PathBuf,
    /// The message log: the console reads its durable consumers and latest channels.
    pub store: crate::state::store::MessageStore,
    /// Write admission: free space and whether writes are refused for it.
    pub admission: crate::write::admission::Admission,
    /// The public listener's connections: bytes waiting for their sockets.
    pub connections: crate::transport::send_buffers::Connections,
    /// Messages read from the store and held for subscriptions that fell behind.
    pub catch_up: Arc<crate::fanout::catch_up_budget::CatchUpBudget>,
}

impl Sources {
    /// Whether this node knows a leader (what `/healthz` and gRPC health report), with its raft
    /// still running.
    pub(crate) fn has_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        // A raft core that stopped (a fatal storage error, or a panic) leaves its last metrics
        // behind, leader included; only the closed channel says it is gone. Found by the fault
        // test of a wiped node, whose core stopped while /healthz kept answering 200.
        metrics.has_changed().is_ok() && metrics.borrow().current_leader.is_some()
    }

    /// Reads the broker's state for a scrape.
    pub(crate) async fn scrape(&self) -> Scrape {
        let progress = *self.progress.borrow();
        let (term, leader, committed) = {
            let raft = self.raft.metrics();
            let raft = raft.borrow();
            (
                raft.current_term,
                raft.current_leader,
                committed_index(&raft, progress.applied_index),
            )
        };
        let subscriptions = self
            .registry
            .list()
            .iter()
            .map(|control| subscription_scrape(control))
            .collect();
        let disk_bytes = disk_bytes(self.data_dir.clone()).await;
        // A few small reads of /proc, and a walk of /proc/self/fd that grows with connections.
        let process = tokio::task::spawn_blocking(super::process::read)
            .await
            .ok()
            .flatten();
        let (disk_free_bytes, storage_full) = self.admission.free_space();
        Scrape {
            disk_free_bytes,
            storage_full,
            node_id: self.node_id,
            last_offset: progress.last_offset,
            stored_bytes: progress.stored_bytes,
            disk_bytes,
            loops_detected: progress.loops_detected,
            raft_term: term,
            raft_leader: leader,
            raft_committed_index: committed,
            raft_applied_index: progress.applied_index,
            subscriptions,
            send_buffered_bytes: self.connections.waiting_bytes() as u64,
            catch_up_held_bytes: self.catch_up.held() as u64,
            process,
        }
    }
}

/// One live subscription's position and queue, as `/metrics`, the console and its history read it.
pub(crate) fn subscription_scrape(control: &Control) -> SubscriptionScrape {
    let stats = control.mailbox_stats();
    let next_offset = control.flight().next_offset;
    SubscriptionScrape {
        id: control.id,
        pattern: control.pattern.clone(),
        // Waiting on an empty mailbox, it has passed every offset dispatched, those of channels
        // it does not follow too: a caught-up subscription lags by 0.
        next_offset: match stats.caught_up_through {
            Some(through) => next_offset.max(through + 1),
            None => next_offset,
        },
        queue_messages: stats.messages,
        queue_bytes: stats.bytes,
    }
}

/// The highest index a majority of voters has on disk, as the leader sees it; on a follower (no
/// replication view) the applied index, which never exceeds the committed one.
fn committed_index(raft: &openraft::RaftMetrics<u64, Member>, applied: u64) -> u64 {
    let Some(replication) = &raft.replication else {
        return applied;
    };
    let mut matched: Vec<u64> = raft
        .membership_config
        .membership()
        .voter_ids()
        .map(|id| {
            replication
                .get(&id)
                .and_then(|log_id| log_id.as_ref())
                .map_or(0, |log_id| log_id.index)
        })
        .collect();
    if matched.is_empty() {
        return applied;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    // With n voters, the (n/2 + 1)-th highest is on a majority.
    matched[matched.len() / 2].max(applied)
}

/// Total size of the files under the data directory, walked on a blocking thread (0 if the walk
/// fails): `switchboard_disk_bytes` here and `disk_bytes` in the `Info` call.
pub(crate) async fn disk_bytes(data_dir: PathBuf) -> u64 {
    tokio::task::spawn_blocking(move || dir_size(&data_dir))
        .await
        .unwrap_or(0)
}

/// Total size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Binds the admin listener.
///
/// # Errors
/// The address cannot be bound.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (admin_listen; \"off\" disables it)"))
}

/// Serves the admin endpoints on `listener` until shutdown begins, then closes connections
/// gracefully (an in-flight scrape is answered).
pub(crate) async fn serve(listener: TcpListener, sources: Arc<Sources>, shutdown: ShutdownSignal) {
    let mut stopping = shutdown.clone();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let mut pacing = AcceptPacing::new("admin");
    // The console's charts need the minutes before the page was opened: sampled from the start.
    let history = History::new();
    let sampler = tokio::spawn(history::sample(
        Arc::clone(&sources),
        history.clone(),
        shutdown.clone(),
    ));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    pacing.accepted();
                    accepted
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    let pause = pacing.failed(&e, std::time::Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = stopping.wait() => break,
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = stopping.wait() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin listener busy; closing a connection");
            continue;
        };
        let sources = Arc::clone(&sources);
        let history = history.clone();
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let sources = Arc::clone(&sources);
                let history = history.clone();
                async move { Ok::<_, Infallible>(respond(&sources, &history, request).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.wait() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    let _ = sampler.await;
}

fn typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn respond(
    sources: &Sources,
    history: &History,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known = [
        "/metrics",
        "/healthz",
        "/console",
        "/console/console.js",
        "/console/console.css",
        "/console/api/state",
        "/console/api/history",
    ];
    if !known.contains(&path) {
        return text(
            StatusCode::NOT_FOUND,
            "not found: this listener serves /metrics, /healthz and /console\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/healthz" {
        return if !sources.has_leader() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no leader: this node cannot accept writes\n",
            )
        } else if let Some(why) = sources.admission.storage_full() {
            text(StatusCode::SERVICE_UNAVAILABLE, why)
        } else {
            text(StatusCode::OK, "ok\n")
        };
    }
    if path == "/console" {
        let mut response = typed(PAGE_CONTENT_TYPE, console::PAGE);
        response.headers_mut().insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(console::CONTENT_SECURITY_POLICY),
        );
        return response;
    }
    if path == "/console/console.js" {
        return typed(SCRIPT_CONTENT_TYPE, console::SCRIPT);
    }
    if path == "/console/console.css" {
        return typed(STYLE_CONTENT_TYPE, console::STYLE);
    }
    if path == "/console/api/state" {
        return typed(JSON_CONTENT_TYPE, console::state(sources).await.to_string());
    }
    if path == "/console/api/history" {
        return typed(JSON_CONTENT_TYPE, history.to_json().to_string());
    }
    let body = metrics::render(&sources.scrape().await);
    let mut response = text(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::fanout::registry::Registry;
    use crate::raft;

    #[tokio::test]
    async fn healthz_turns_unhealthy_when_raft_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::defaults().unwrap();
        config.data_dir = dir.path().to_owned();
        let me = raft::own_member(&config, "127.0.0.1:7400".parse().unwrap());
        let peers = raft::network::Peers::new(1 << 20, None);
        let consensus = crate::server::Replicated::start(&config, me, peers)
            .await
            .unwrap();
        let sources = Sources {
            node_id: config.node_id,
            raft: consensus.raft.clone(),
            progress: consensus.progress.clone(),
            registry: Registry::new(10, 10),
            data_dir: dir.path().to_owned(),
            store: consensus.store.clone(),
            admission: crate::write::admission::Admission::new(dir.path(), 0),
            connections: crate::transport::send_buffers::Connections::new(usize::MAX),
            catch_up: crate::fanout::catch_up_budget::CatchUpBudget::new(1 << 20),
        };
        // A lone node leads once start returns.
        assert!(sources.has_leader());
        consensus.raft.shutdown().await.unwrap();
        // The last metrics still name this node as leader; health must not believe them.
        assert!(consensus.raft.metrics().borrow().current_leader.is_some());
        assert!(!sources.has_leader());
    }
}
