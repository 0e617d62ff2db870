//! The replicated log: openraft over segment files, driving a state it is given.
//!
//! - [`log_store`]: the raft log and vote (`<data>/log`), made durable with a real fdatasync before
//!   openraft is told an append is flushed; its entries in [`segment`] files, its vote, committed
//!   id, purge point and durable watermark in [`log_meta`].
//! - [`state_machine`]: the adapter openraft applies entries through: raft's bookkeeping and the
//!   snapshot files, around an [`AppliedState`] — the trait the broker's state
//!   ([`crate::state`]) implements. Raft knows nothing of messages, stores or subscribers.
//! - [`network`]: node-to-node RPC to peers' internal raft listeners (`cluster.listen`).
//!
//! [`start`] opens the log and starts raft over the state; a lone node initializes its membership
//! (itself) on first start and waits until it leads. A cluster member does not wait (the election
//! needs its peers, and the public listener reports NOT_SERVING until a leader is known); it
//! initializes its static voters ([`initial_membership`]) later, once a pre-vote finds no leader
//! (`cluster::pre_vote`).

// openraft's StorageError is large by design and is what its traits return; boxing it here
// would only add conversions at every trait boundary.
pub(crate) mod log_meta;
#[allow(clippy::result_large_err)]
pub(crate) mod log_store;
pub(crate) mod network;
mod recent;
pub(crate) mod segment;
#[allow(clippy::result_large_err)]
pub(crate) mod state_machine;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::SnapshotPolicy;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::message::{Command, CommandOutcome};
pub(crate) use state_machine::AppliedState;
use state_machine::StateMachine;

openraft::declare_raft_types!(
    /// Switchboard's raft types: the log carries [`Command`]s and apply answers with
    /// [`CommandOutcome`]s; snapshots are files.
    pub(crate) TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = u64,
        Node = Member,
        SnapshotData = tokio::fs::File,
);

/// What the cluster knows of a member: where its peers reach its raft listener, and where clients
/// reach its public API. Carrying the public address in the membership (rather than openraft's
/// `BasicNode`, which holds one address) lets any node name the leader's client-facing address in
/// an UNAVAILABLE answer without asking anyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    /// `host:port` of its raft listener (`cluster.advertise`).
    pub raft_addr: String,
    /// `host:port` of its public gRPC listener (`cluster.public_advertise`); empty when unknown
    /// (a static peer that has not announced it yet).
    pub public_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft {} public {}", self.raft_addr, self.public_addr)
    }
}

/// A running raft node.
pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// How long a starting node waits to become leader of its one-voter cluster.
const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of snapshot per InstallSnapshot call.
const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// How long one snapshot chunk may take to be received and stored.
const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 10_000;

/// How often the log's size since the last snapshot is looked at.
const SNAPSHOT_SIZE_CHECK: Duration = Duration::from_millis(100);

/// Segment files of the log: a quarter of `raft.snapshot_log_bytes`, between 1 and 64 MiB, so a
/// purge after a snapshot frees space in steps small next to the log it bounds.
fn segment_bytes(snapshot_log_bytes: u64) -> u64 {
    (snapshot_log_bytes / 4).clamp(1 << 20, segment::SEGMENT_BYTES)
}

/// Takes a snapshot whenever the applied log since the last one holds more bytes than `floor`
/// or than the stored messages (`stored_bytes`), whichever is more — openraft's own policy
/// counts entries only, and an entry can be one message or a thousand. So a crash replays at most
/// that much on top of the snapshot, and the log on disk stays within it (plus a segment, and the
/// entries a cluster keeps for lagging followers). Snapshotting at the store's size keeps the
/// cost of writing snapshots to about one store's worth per store's worth of log. Ends when raft
/// stops.
async fn snapshot_by_size(
    raft: Raft,
    log: log_store::LogStore,
    floor: u64,
    stored_bytes: impl Fn() -> u64,
) {
    let mut tick = tokio::time::interval(SNAPSHOT_SIZE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = raft.metrics();
    loop {
        tick.tick().await;
        if metrics.has_changed().is_err() {
            return;
        }
        let (snapshot, applied) = {
            let m = metrics.borrow();
            (m.snapshot.map(|l| l.index), m.last_applied.map(|l| l.index))
        };
        // What a snapshot now would cover: the log between the last one and what is applied.
        let covered = log
            .bytes_after(snapshot)
            .saturating_sub(log.bytes_after(applied));
        if covered < floor.max(stored_bytes()) {
            continue;
        }
        tracing::debug!(
            covered,
            "the log since the last snapshot is large: taking one"
        );
        // openraft ignores the trigger while a snapshot is being built.
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}

/// This node's own membership entry, from the configuration: `public_addr` is where clients reach
/// the public listener (bound at `public_listen`).
pub(crate) fn own_member(config: &Config, public_listen: std::net::SocketAddr) -> Member {
    let advertise = config.cluster.advertise.trim();
    let raft_addr = if let Some(addr) = config
        .cluster
        .voters()
        .ok()
        .and_then(|v| v.get(&config.node_id).cloned())
    {
        addr
    } else if !advertise.is_empty() {
        advertise.to_owned()
    } else {
        config
            .cluster
            .listen
            .0
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let public = config.cluster.public_advertise.trim();
    let public_addr = if !public.is_empty() {
        public.to_owned()
    } else if public_listen.ip().is_unspecified() {
        // 0.0.0.0 is no address to give a client: no hint beats a wrong one.
        String::new()
    } else {
        public_listen.to_string()
    };
    Member {
        raft_addr,
        public_addr,
    }
}

/// Raft's timers, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How often a leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// The shortest election timeout: also how long a voter goes without a leader before it
    /// asks for pre-votes, and before it grants one.
    pub election_timeout_min_ms: u64,
    /// The longest election timeout.
    pub election_timeout_max_ms: u64,
}

impl Timing {
    /// The timers for `config`. A lone node elects itself at once, so short timeouts only speed up
    /// its start. Between peers, an election timeout must outlast the pauses of a loaded machine
    /// (fdatasync stalls, snapshot dumps, CPU shared with other work): too short and followers
    /// depose a healthy leader over and over. About a second still fails over within two.
    pub(crate) fn of(config: &Config) -> Timing {
        let (heartbeat_ms, election_timeout_min_ms, election_timeout_max_ms) =
            if config.cluster.listen.0.is_none() {
                (50, 150, 300)
            } else {
                (100, 700, 1_400)
            };
        Timing {
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
        }
    }
}

/// The membership this node starts a new cluster with, if it starts one: the static voters
/// (`cluster.members`), or this node alone when it has no raft listener; `None` for a newcomer,
/// which waits to be added.
///
/// # Errors
/// `cluster.members` does not parse.
pub(crate) fn initial_membership(
    config: &Config,
    me: &Member,
) -> anyhow::Result<Option<BTreeMap<u64, Member>>> {
    let voters = config
        .cluster
        .voters()
        .map_err(|e| anyhow::anyhow!("cluster.members: {e}"))?;
    if !voters.is_empty() {
        // Every static member initializes with the same voters: openraft accepts identical
        // initial memberships from all of them, and whichever vote wins leads. Identical down to
        // the node records, because all of them write it as the same log entry (index 0) and
        // none is ever replaced: so no public addresses here, only what every member was given.
        // Each node announces its own public address once a leader is known.
        Ok(Some(
            voters
                .into_iter()
                .map(|(id, raft_addr)| {
                    let member = Member {
                        raft_addr,
                        public_addr: String::new(),
                    };
                    (id, member)
                })
                .collect(),
        ))
    } else if config.cluster.listen.0.is_none() {
        Ok(Some(BTreeMap::from([(config.node_id, me.clone())])))
    } else {
        Ok(None)
    }
}

/// Opens the log under `config.data_dir` and starts raft over `state`, whose snapshots go to
/// `snapshot_dir`; `stored_bytes` tells the size of the state's messages, for the snapshot policy
/// ([`snapshot_by_size`]). A single node (no `cluster.members`) waits until it leads and has applied its
/// whole log; a member of a static cluster returns at once.
///
/// # Errors
/// The log or the snapshots cannot be opened, raft fails to start, or a single node does not lead
/// in time.
pub(crate) async fn start<S: AppliedState>(
    config: &Config,
    me: Member,
    peers: network::Peers,
    state: S,
    snapshot_dir: &std::path::Path,
    stored_bytes: impl Fn() -> u64 + Send + 'static,
) -> anyhow::Result<Raft> {
    let log_dir = config.data_dir.join("log");
    let mut log_store = log_store::LogStore::open_with(
        &log_dir,
        config.durability.fsync,
        config.durability.sync_interval,
        segment_bytes(config.raft.snapshot_log_bytes),
    )
    .with_context(|| format!("cannot open the log store in {}", log_dir.display()))?;

    let log_state = openraft::storage::RaftLogStorage::get_log_state(&mut log_store)
        .await
        .with_context(|| format!("cannot read the log store in {}", log_dir.display()))?;
    let state_machine = StateMachine::open(state, snapshot_dir, &log_state)?;

    let timing = Timing::of(config);
    let raft_config = openraft::Config {
        cluster_name: "switchboard".into(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        // Between peers, elections start off and are turned on only while a pre-vote would win
        // (`cluster::pre_vote`); a lone node elects itself as openraft would.
        enable_elect: config.cluster.listen.0.is_none(),
        // One snapshot chunk per InstallSnapshot call, and the time it may take: written and
        // synced by the receiver, on a busy machine. openraft's 200 ms default times a 3 MiB
        // chunk out under load, and the transfer then starts over without end.
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT_MS,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every_entries),
        // Entries kept behind a snapshot, so a briefly lagging follower still gets log entries
        // rather than a whole snapshot; never more than the snapshot interval itself. A lone
        // node has no follower: it keeps none, so its log is bounded by the snapshot policy.
        max_in_snapshot_log_to_keep: if config.cluster.listen.0.is_none() {
            0
        } else {
            config.raft.snapshot_every_entries.min(1_000)
        },
        // Each entry is a whole proposer batch: few per message keep a replication message's size
        // within the raft listener's frame limit.
        max_payload_entries: network::MAX_ENTRIES_PER_APPEND,
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")?;

    let log_size = log_store.clone();
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        network::Network::new(peers),
        log_store,
        state_machine,
    )
    .await
    .context("cannot start raft")?;
    tokio::spawn(snapshot_by_size(
        raft.clone(),
        log_size,
        config.raft.snapshot_log_bytes,
        stored_bytes,
    ));

    // Three ways to start: a single node (no raft listener) is a one-voter cluster and initializes
    // here; a static member (`cluster.members`) forms the cluster with its peers, initializing only
    // once a pre-vote says no leader is there (`cluster::pre_vote::run`); a node with a raft
    // listener but no members is a newcomer that initializes nothing and waits to be added as a
    // learner (a membership of its own would be a second, conflicting cluster).
    let single = config.cluster.listen.0.is_none();
    if single && !raft.is_initialized().await? {
        if let Some(members) = initial_membership(config, &me)? {
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(openraft::error::RaftError::APIError(
                    openraft::error::InitializeError::NotAllowed(_),
                )) => {}
                Err(e) => return Err(e).context("cannot initialize the cluster membership"),
            }
        }
    }
    if single {
        raft.wait(Some(LEADERSHIP_TIMEOUT))
            .current_leader(config.node_id, "waiting to lead the one-voter cluster")
            .await
            .context("this node did not become leader")?;
        // Every entry in a lone voter's log was acknowledged or is about to be: serve nothing
        // before all of it is applied. After a crash the state is rebuilt from the snapshot and
        // openraft re-applies at start only up to the committed id it last wrote down (lazily),
        // so without this wait a reader could see the store while the rest is applied again.
        let (last_log_index, last_applied) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            (
                metrics.last_log_index,
                metrics.last_applied.map(|l| l.index),
            )
        };
        if last_log_index > last_applied {
            tracing::info!(
                last_applied,
                last_log_index,
                "applying the rest of the log before serving"
            );
            raft.wait(None)
                .applied_index_at_least(last_log_index, "applying the log before serving")
                .await
                .context("the log was not applied")?;
        }
    }

    Ok(raft)
}
