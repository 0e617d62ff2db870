//! Wiring: opens the stores, starts raft, the proposer, the sweeper and the gRPC listener, and
//! stops them in order on shutdown.
//!
//! Shutdown order: stop accepting and end streams (the edge sees the signal), let in-flight
//! publishes finish, stop raft (which stops the log flusher after a last sync), sync the state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_proto::v1::broker_server::BrokerServer;
use switchboard_proto::v1::entities_server::EntitiesServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::edge::entities::EntitiesService;
use crate::edge::BrokerService;
use crate::proposer::Proposer;
use crate::shutdown::{self, ShutdownSignal, ShutdownTrigger};
use crate::{raft, retention};

/// Longest wait for connections to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent calls (streams included) on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Room above the payload limit for the rest of a publish request (headers, ids, channel).
const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// A started broker.
pub struct Broker {
    /// The address the gRPC listener is bound to (useful with port 0).
    pub local_addr: SocketAddr,
    trigger: ShutdownTrigger,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Broker {
    /// Opens the data directory, starts every part and begins serving on `config.listen`.
    ///
    /// # Errors
    /// The data directory cannot be opened, raft cannot start, or the address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Broker> {
        let config = Arc::new(config);
        let (trigger, signal) = shutdown::channel();
        let consensus = raft::start(&config).await?;

        let rules = config.rules();
        let proposer = Proposer::start(consensus.raft.clone(), &config.proposer, rules);
        tokio::spawn(retention::run(
            consensus.raft.clone(),
            config.node_id,
            consensus.store.clone(),
            consensus.progress.clone(),
            config.retention.clone(),
            rules,
            signal.clone(),
        ));
        let service = BrokerService::new(
            Arc::clone(&config),
            proposer,
            consensus.store.clone(),
            consensus.hub.clone(),
            consensus.raft.clone(),
            consensus.progress.clone(),
            signal.clone(),
        );

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let max_message = config.limits.max_payload_bytes
            + config.limits.max_header_bytes
            + REQUEST_OVERHEAD_BYTES;
        let entities =
            EntitiesServer::new(service.entities()).max_decoding_message_size(max_message);
        let grpc = BrokerServer::new(service).max_decoding_message_size(max_message);
        let serving = tokio::spawn(serve(grpc, entities, listener, signal, consensus));
        Ok(Broker {
            local_addr,
            trigger,
            serving,
        })
    }

    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.trigger.trigger();
    }

    /// Waits until the broker has stopped.
    ///
    /// # Errors
    /// Serving failed, or the stores could not be synced on the way out.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.serving.await.context("broker task panicked")?
    }
}

async fn serve(
    grpc: BrokerServer<BrokerService>,
    entities: EntitiesServer<EntitiesService>,
    listener: TcpListener,
    signal: ShutdownSignal,
    consensus: raft::Consensus,
) -> anyhow::Result<()> {
    let mut stopping = signal.clone();
    // Nagle's algorithm would hold small acks back for the peer's delayed ACK (~40 ms each).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // hyper allows 200 concurrent streams per connection unless told; tonic's default removes
        // the limit, which would let one connection open unbounded subscriptions.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(grpc)
        .add_service(entities)
        .serve_with_incoming_shutdown(incoming, async move { stopping.wait().await });
    let mut drain_started = signal.clone();
    let drained = async {
        drain_started.wait().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        result = server => result.context("gRPC server failed")?,
        _ = drained => tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them"),
    }
    tracing::info!("listener closed; stopping raft");
    if let Err(e) = consensus.raft.shutdown().await {
        tracing::warn!(error = %e, "raft did not stop cleanly");
    }
    let state_sync = consensus.state_sync;
    tokio::task::spawn_blocking(move || state_sync.sync())
        .await
        .context("state sync task failed")?
        .context("cannot sync the state store")?;
    tracing::info!("stopped");
    Ok(())
}
