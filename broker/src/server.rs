//! Wiring: opens the stores, starts raft, the proposer, the sweeper, the gRPC listener (with
//! health, reflection, gRPC-Web and the browser gateway) and the admin listener, and stops them
//! in order on shutdown.
//!
//! Shutdown order: stop accepting and end streams (the edge sees the signal), let in-flight
//! publishes finish, stop raft (which stops the log flusher after a last sync), sync the state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::raft::Member;
use anyhow::Context;
use switchboard_proto::internal::v1::raft_server::RaftServer;
use switchboard_proto::v1::auth_server::AuthServer;
use switchboard_proto::v1::broker_server::BrokerServer;
use switchboard_proto::v1::cluster_server::ClusterServer;
use switchboard_proto::v1::entities_server::EntitiesServer;
use switchboard_proto::v1::kpi_service_server::KpiServiceServer;
use switchboard_proto::v1::schema_service_server::SchemaServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_web::GrpcWebLayer;
use tower::layer::util::{Identity, Stack};
use tower::Layer;

use crate::cluster::internal::InternalService;
use crate::cluster::pre_vote::{self, LeaderContact};
use crate::cluster::service::ClusterService;
use crate::cluster::{self, Leader};
use crate::config::Config;
use crate::edge::auth::{Gate, GateInterceptor};
use crate::edge::entities::{EntitiesService, WatchRoutes};
use crate::edge::grpc_guard::GrpcGuard;
use crate::edge::kpis::KpisService;
use crate::edge::schemas::SchemasService;
use crate::edge::subscribe_codec::BrokerRoutes;
use crate::edge::token_endpoint::AuthService;
use crate::edge::BrokerService;
use crate::fanout::catch_up_budget::CatchUpBudget;
use crate::fanout::ephemeral::Broadcaster;
use crate::fanout::hub::Hub;
use crate::gateway::Gateway;
use crate::observability::{admin, metrics};
use crate::raft;
use crate::schema::drift::DriftReporter;
use crate::shutdown::{self, ShutdownSignal, ShutdownTrigger};
use crate::state::sled_sync::SledSync;
use crate::state::store::MessageStore;
use crate::state::{self, AppliedProgress};
use crate::transport::send_buffers::{self, Connections, CountingLayer};
use crate::transport::{self, ConnectionLimits, LimitedIncoming, PacedIncoming};
use crate::write::admission::Admission;
use crate::write::proposer::Proposer;
use crate::write::sweeper;

/// About what one open subscription costs the broker (its task, mailbox, stream and HTTP/2
/// stream): 10,240 of them took 147 MiB in the memory benchmark (docs/BENCHMARKS.md). Counted so
/// that memory is handed back once many of them close.
const SUBSCRIPTION_MEMORY: usize = 16 * 1024;

/// Longest wait for connections to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent calls (streams included) on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// How many times `limits.max_metadata_bytes` HTTP/2 accepts, so the limit is enforced per call
/// with a status rather than by HTTP/2 (edge::grpc_guard).
const HEADER_LIST_CEILING_FACTOR: u32 = 4;
/// Room above the payload limit for the rest of a publish request (headers, ids, channel).
const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// How often batch files nothing points into are looked for, to be removed.
const BATCH_FILE_RECLAIM: Duration = Duration::from_millis(100);

/// How often refilled rate-limit buckets are forgotten.
const RATE_LIMIT_SWEEP: Duration = Duration::from_secs(30);

/// How often histogram samples are folded into their buckets between scrapes (bounds memory).
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// The services whose gRPC health is reported; "" is the whole server.
const HEALTH_SERVICES: [&str; 6] = [
    "",
    <BrokerServer<BrokerService> as NamedService>::NAME,
    <EntitiesServer<EntitiesService> as NamedService>::NAME,
    <SchemaServiceServer<SchemasService> as NamedService>::NAME,
    <KpiServiceServer<KpisService> as NamedService>::NAME,
    <AuthServer<AuthService> as NamedService>::NAME,
];

/// A started broker.
pub struct Broker {
    /// The address the gRPC listener is bound to (useful with port 0).
    pub local_addr: SocketAddr,
    /// The address the admin listener (`/metrics`, `/healthz`) is bound to, if it is on.
    pub admin_addr: Option<SocketAddr>,
    /// The address the internal raft listener is bound to, if this node is clustered.
    pub raft_addr: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    /// Write admission, which knows why raft stopped once it has (see [`Broker::fatal_error`]).
    admission: Admission,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
    admin: Option<tokio::task::JoinHandle<()>>,
}

impl Broker {
    /// Opens the data directory, starts every part and begins serving on `config.listen`.
    ///
    /// # Errors
    /// The data directory cannot be opened, raft cannot start, or the address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Broker> {
        let config = Arc::new(config);
        if let Some(handle) = metrics::install() {
            spawn_metrics_upkeep(handle);
        }
        // Security first: a bad key, certificate or origin entry stops the start before any store
        // is opened.
        let (endpoint, minted) = AuthService::prepare(&config)?;
        let gate = Arc::new(Gate::from_config(&config, minted)?);
        let tls = transport::server_tls(&config.tls)?;
        let (trigger, signal) = shutdown::channel();
        // Bound first, so this node's membership record can name the real port (port 0).
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let raft_listener = match config.cluster.listen.0 {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (cluster.listen)"))?,
            ),
            None => None,
        };
        let me = raft::own_member(&config, local_addr);
        let initial_membership = raft::initial_membership(&config, &me)?;
        let max_frame = raft::network::max_frame_bytes(config.proposer.max_batch_bytes);
        let cluster_tls = transport::cluster_tls(&config.cluster)?;
        let (raft_server_tls, peer_tls) = cluster_tls.unzip();
        let peers = raft::network::Peers::new(max_frame, peer_tls);
        let consensus = Replicated::start(&config, me.clone(), peers.clone()).await?;
        let leader = Leader::new(
            consensus.raft.clone(),
            peers.clone(),
            config.node_id,
            config.cluster.forward_timeout,
            config.cluster.listen.0.is_some(),
        );

        let raft_addr = match raft_listener {
            Some(raft_listener) => {
                let addr = raft_listener.local_addr()?;
                let timing = raft::Timing::of(&config);
                let contact =
                    LeaderContact::new(Duration::from_millis(timing.election_timeout_min_ms));
                tokio::spawn(pre_vote::run(
                    consensus.raft.clone(),
                    config.node_id,
                    peers.clone(),
                    contact.clone(),
                    Duration::from_millis(timing.heartbeat_ms),
                    initial_membership,
                    signal.clone(),
                ));
                let internal = RaftServer::new(InternalService::new(
                    consensus.raft.clone(),
                    config.node_id,
                    config.cluster.forward_timeout,
                    contact,
                    consensus.hub.clone(),
                ))
                .max_decoding_message_size(max_frame)
                .max_encoding_message_size(max_frame);
                let mut stopping = signal.clone();
                let incoming = PacedIncoming::new(
                    TcpIncoming::from(raft_listener).with_nodelay(Some(true)),
                    "raft",
                );
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = raft_server_tls {
                    builder = builder.tls_config(tls).context(
                        "invalid cluster TLS settings (cluster.tls_cert_file, cluster.tls_key_file, cluster.tls_ca_file)",
                    )?;
                }
                let server = builder
                    .http2_keepalive_interval(Some(Duration::from_secs(10)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(5)))
                    .add_service(internal)
                    .serve_with_incoming_shutdown(incoming, async move { stopping.wait().await });
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(error = %e, "the raft listener failed");
                    }
                });
                tokio::spawn(cluster::announce(
                    leader.clone(),
                    me.public_addr.clone(),
                    signal.clone(),
                ));
                Some(addr)
            }
            None => None,
        };

        let admission = Admission::new(&config.data_dir, config.store.min_free_bytes);
        tokio::spawn(admission.clone().measure_until(signal.clone()));
        tokio::spawn(watch_for_fatal(
            consensus.raft.clone(),
            admission.clone(),
            signal.clone(),
        ));
        let rules = config.rules();
        let proposer = Proposer::start(
            consensus.raft.clone(),
            leader.clone(),
            &config.proposer,
            rules,
            admission.clone(),
        );
        tokio::spawn(sweeper::run(
            consensus.raft.clone(),
            config.node_id,
            consensus.store.clone(),
            consensus.progress.clone(),
            config.retention.clone(),
            rules,
            signal.clone(),
        ));
        // Ephemeral messages reach the other members directly, not through the log.
        let ephemeral = match raft_addr {
            Some(_) => Broadcaster::clustered(
                consensus.hub.clone(),
                consensus.raft.clone(),
                config.node_id,
                peers.clone(),
                signal.clone(),
            ),
            None => Broadcaster::local(consensus.hub.clone()),
        };
        // Schema drift is announced through the log, as the broker's own publishes.
        let drift = DriftReporter::start(
            proposer.clone(),
            config.node_id,
            config.schemas.drift_events_per_second,
            signal.clone(),
        );
        let service = BrokerService::new(
            Arc::clone(&config),
            proposer,
            consensus.store.clone(),
            consensus.hub.clone(),
            consensus.raft.clone(),
            consensus.progress.clone(),
            signal.clone(),
            Arc::clone(&gate),
            ephemeral,
            drift,
        );
        spawn_rate_limit_sweep(Arc::clone(&gate), signal.clone());
        // What the public listener's connections hold for their clients, bounded broker-wide.
        let connections = Connections::new(config.limits.max_send_buffer_bytes);
        let catch_up = Arc::clone(consensus.hub.catch_up_budget());
        let registry = service.registry();
        tokio::spawn(send_buffers::watch(
            connections.clone(),
            config.limits.stalled_connection_timeout,
            move || catch_up.held() + registry.len() * SUBSCRIPTION_MEMORY,
            signal.clone(),
        ));
        spawn_batch_file_reclaim(
            consensus.store.clone(),
            Arc::clone(&consensus.state_sync),
            signal.clone(),
        );

        let admin_listener = match config.admin_listen.addr() {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };

        let (admin_addr, admin) = match admin_listener {
            Some(admin_listener) => {
                let addr = admin_listener.local_addr()?;
                let sources = Arc::new(admin::Sources {
                    node_id: config.node_id,
                    raft: consensus.raft.clone(),
                    progress: consensus.progress.clone(),
                    registry: service.registry(),
                    data_dir: config.data_dir.clone(),
                    store: consensus.store.clone(),
                    admission: admission.clone(),
                    connections: connections.clone(),
                    catch_up: Arc::clone(consensus.hub.catch_up_budget()),
                });
                let task = tokio::spawn(admin::serve(admin_listener, sources, signal.clone()));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };

        let (reporter, health) = tonic_health::server::health_reporter();
        let raft_metrics = consensus.raft.metrics();
        let serving_now = raft_metrics.borrow().current_leader.is_some();
        set_health(&reporter, serving_now).await;
        tokio::spawn(report_health(
            reporter,
            raft_metrics,
            signal.clone(),
            serving_now,
        ));
        // Each version's builder adds its own descriptors; the other's are added so both list
        // every service served here.
        // google.rpc's error details too, so any reflection client (grpcurl) decodes the
        // ErrorInfo every refusal carries.
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()
            .context("cannot build the reflection service")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("cannot build the reflection service")?;

        let max_message = config.limits.max_payload_bytes
            + config.limits.max_header_bytes
            + REQUEST_OVERHEAD_BYTES;
        let interceptor = GateInterceptor(Arc::clone(&gate));
        // Built before the services take the broker service and the gate.
        let gateway = config
            .gateway
            .enabled
            .then(|| Gateway::new(&config, Arc::clone(&gate), service.clone()));
        // `WatchEntities` is served from shared encodings (edge::entities::WatchRoutes).
        let entities = InterceptedService::new(
            WatchRoutes::new(service.entities(), max_message),
            interceptor.clone(),
        );
        let schemas = InterceptedService::new(
            SchemaServiceServer::new(service.schemas()).max_decoding_message_size(max_message),
            interceptor.clone(),
        );
        let kpis = InterceptedService::new(
            KpiServiceServer::new(service.kpis()).max_decoding_message_size(max_message),
            interceptor.clone(),
        );
        // `Subscribe` is served with a codec that writes shared delivery bytes
        // (edge::subscribe_codec); the gate wraps the routes, so it covers that path too.
        let grpc =
            InterceptedService::new(BrokerRoutes::new(service, max_message), interceptor.clone());
        let cluster_admin =
            InterceptedService::new(ClusterServer::new(ClusterService::new(leader)), interceptor);
        // Token requests are small; the default 4 MiB limit would let one cost a large buffer.
        let auth = AuthServer::new(endpoint.with_gate(gate)).max_decoding_message_size(64 * 1024);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).context(
                "invalid TLS settings (tls.cert_file, tls.key_file, tls.client_ca_file)",
            )?;
        }
        // The public services also answer gRPC-Web (web clients generated from proto/); the
        // wrapper translates only requests whose content type is gRPC-Web. It wraps each service
        // rather than the server, as it would refuse every other HTTP/1.1 request (the gateway's).
        let web = GrpcWebLayer::new();
        let mut routes = Routes::builder();
        routes
            .add_service(web.layer(grpc))
            .add_service(web.layer(entities))
            .add_service(web.layer(schemas))
            .add_service(web.layer(kpis))
            .add_service(web.layer(auth))
            .add_service(web.layer(cluster_admin))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        // Metadata over the limit and unary calls with a second message are refused here, per
        // call (edge::grpc_guard); the gateway's routes, merged below, are not gRPC.
        let guard = GrpcGuard::new(
            config.limits.max_metadata_bytes as usize,
            &[
                switchboard_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        )?;
        let grpc_routes =
            routes
                .routes()
                .into_axum_router()
                .layer(axum::middleware::from_fn_with_state(
                    guard,
                    GrpcGuard::check,
                ));
        let routes = match gateway {
            // The browser gateway shares the port: paths under /v1/ are its own, every other
            // path is a gRPC method.
            Some(gateway) => Routes::from(gateway.around(grpc_routes)),
            None => Routes::from(grpc_routes),
        };
        let router = builder
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // hyper allows 200 concurrent streams per connection unless told; tonic's default
            // removes the limit, which would let one connection open unbounded subscriptions.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Metadata (the token, trace context) is bounded by limits.max_metadata_bytes in
            // edge::grpc_guard, per call. HTTP/2 accepts four times as much, because it can only
            // refuse a larger header list with a bare 431 or by closing the connection (GOAWAY),
            // which would end the connection's other calls too.
            .http2_max_header_list_size(Some(
                config
                    .limits
                    .max_metadata_bytes
                    .saturating_mul(HEADER_LIST_CEILING_FACTOR),
            ))
            // Browsers' fetch and EventSource speak HTTP/1.1 to the gateway.
            .accept_http1(config.gateway.enabled)
            .layer(CountingLayer::new(connections.clone()))
            .add_routes(routes);
        let limits = ConnectionLimits {
            max: config.limits.max_connections,
            max_per_address: config.limits.max_connections_per_address,
            handshake_timeout: config.limits.handshake_timeout,
        };
        let serving = tokio::spawn(serve(
            router,
            listener,
            limits,
            connections,
            signal,
            consensus,
        ));
        Ok(Broker {
            local_addr,
            admin_addr,
            raft_addr,
            trigger,
            admission,
            serving,
            admin,
        })
    }

    /// Resolves, with the reason, once raft has stopped on a fatal error (a storage error, say):
    /// the node can then neither write nor vote, and should stop — `main` shuts it down and exits
    /// non-zero so a supervisor restarts it. Never resolves otherwise.
    pub async fn fatal_error(&self) -> String {
        self.admission.stopped().await
    }

    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.trigger.trigger();
    }

    /// Waits until the broker has stopped.
    ///
    /// # Errors
    /// Serving failed, the stores could not be synced on the way out, or raft had stopped on a
    /// fatal error.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.serving.await.context("broker task panicked")?;
        if let Some(admin) = self.admin {
            // It stops on the same signal; an in-flight scrape is answered first.
            if admin.await.is_err() {
                tracing::warn!("the admin listener task panicked");
            }
        }
        served?;
        match self.admission.fatal() {
            Some(why) => Err(anyhow::anyhow!(
                "stopped because raft failed on this node: {why}"
            )),
            None => Ok(()),
        }
    }
}

/// Folds histogram samples into buckets every [`METRICS_UPKEEP`], as the exporter asks of a
/// recorder installed without its own HTTP listener. One task per process.
fn spawn_metrics_upkeep(handle: &'static metrics_exporter_prometheus::PrometheusHandle) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    });
}

/// Forgets refilled rate-limit buckets every [`RATE_LIMIT_SWEEP`], until shutdown.
fn spawn_rate_limit_sweep(gate: Arc<Gate>, mut shutdown: ShutdownSignal) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RATE_LIMIT_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => gate.sweep(),
                _ = shutdown.wait() => return,
            }
        }
    });
}

/// Gives back the space of batch files no batch points into any more, every
/// [`BATCH_FILE_RECLAIM`], until shutdown: a file is removed only after a sync of the state has
/// made its release durable, and without this the next sync would wait for a snapshot — while a
/// nearly full disk refuses the writes that would lead to one.
fn spawn_batch_file_reclaim(
    store: MessageStore,
    state_sync: Arc<SledSync>,
    mut shutdown: ShutdownSignal,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BATCH_FILE_RECLAIM);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            if !store.has_removable_files() {
                continue;
            }
            let sync = Arc::clone(&state_sync);
            match tokio::task::spawn_blocking(move || sync.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot sync the state to free batch files")
                }
                Err(_) => return,
            }
        }
    });
}

async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in HEALTH_SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// Watches raft for a fatal stop (a storage error it cannot go on from, or its core ending) until
/// shutdown, and tells `admission`, which refuses writes from then on and says why.
async fn watch_for_fatal(raft: raft::Raft, admission: Admission, mut shutdown: ShutdownSignal) {
    let mut metrics = raft.metrics();
    let stopped = loop {
        if let Err(e) = &metrics.borrow_and_update().running_state {
            break e.to_string();
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                break "the raft core stopped".to_owned();
            },
            _ = shutdown.wait() => return,
        }
    };
    if shutdown.is_triggered() {
        return;
    }
    tracing::error!(
        error = %stopped,
        "raft stopped on this node: writes are refused, and the broker stops so that a supervisor restarts it"
    );
    admission.set_fatal(stopped);
}

/// Keeps gRPC health in step with raft: SERVING while this node knows a leader, NOT_SERVING while
/// it does not, and NOT_SERVING from the moment shutdown begins (so balancers drain it).
async fn report_health(
    reporter: HealthReporter,
    mut raft: watch::Receiver<openraft::RaftMetrics<u64, Member>>,
    mut shutdown: ShutdownSignal,
    mut serving: bool,
) {
    loop {
        tokio::select! {
            changed = raft.changed() => if changed.is_err() { break },
            _ = shutdown.wait() => break,
        }
        let now = raft.borrow_and_update().current_leader.is_some();
        if now != serving {
            serving = now;
            if serving {
                tracing::info!("a leader is known again: health SERVING");
            } else {
                tracing::warn!("no leader known: health NOT_SERVING");
            }
            set_health(&reporter, serving).await;
        }
    }
    set_health(&reporter, false).await;
}

/// The replicated log and what it feeds on this node: the state (its store, progress and sync),
/// and the hub it announces applied messages to.
pub(crate) struct Replicated {
    pub(crate) raft: raft::Raft,
    pub(crate) store: MessageStore,
    pub(crate) hub: Hub,
    pub(crate) progress: watch::Receiver<AppliedProgress>,
    pub(crate) state_sync: Arc<SledSync>,
}

impl Replicated {
    /// Opens the state (announcing to a new hub) and starts raft over it.
    pub(crate) async fn start(
        config: &Config,
        me: raft::Member,
        peers: raft::network::Peers,
    ) -> anyhow::Result<Replicated> {
        // The state resets the hub to the store's last offset once it has opened (and, if need
        // be, rebuilt) the store.
        let hub = Hub::new(
            0,
            config.subscriptions.queue_depth,
            config.subscriptions.queue_bytes,
            CatchUpBudget::new(config.subscriptions.catch_up_bytes),
        );
        let (state, progress) = state::open(config, Arc::new(hub.clone()))?;
        let store = state.store();
        let state_sync = state.sync_handle();
        let snapshot_dir = state::snapshot_dir(&state::state_dir(config));
        let sizes = progress.clone();
        let stored_bytes = move || sizes.borrow().stored_bytes;
        let raft = raft::start(config, me, peers, state, &snapshot_dir, stored_bytes).await?;
        Ok(Replicated {
            raft,
            store,
            hub,
            progress,
            state_sync,
        })
    }
}

async fn serve(
    router: Router<Stack<CountingLayer, Identity>>,
    listener: TcpListener,
    limits: ConnectionLimits,
    connections: Connections,
    signal: ShutdownSignal,
    consensus: Replicated,
) -> anyhow::Result<()> {
    let mut stopping = signal.clone();
    // Nagle's algorithm would hold small acks back for the peer's delayed ACK (~40 ms each).
    let incoming = LimitedIncoming::new(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        limits,
        connections,
    );
    let server =
        router.serve_with_incoming_shutdown(incoming, async move { stopping.wait().await });
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
    tokio::task::spawn_blocking(move || state_sync.stop())
        .await
        .context("state sync task failed")?
        .context("cannot sync the state store")?;
    tracing::info!("stopped");
    Ok(())
}
