//! The replicated log: openraft over two sled databases.
//!
//! - [`log_store`]: the raft log and vote (`<data>/log`), made durable with a real fdatasync before
//!   openraft is told an append is flushed.
//! - [`state_machine`]: the applied state (`<data>/state`): messages, indexes, last applied.
//! - [`sync`]: the fdatasync that sled's `flush()` does not do.
//! - [`network`]: node-to-node RPC. A single node is a one-voter cluster, so for now this is a
//!   stub that reaches nobody; the cluster issue replaces it with a tonic service.
//!
//! [`start`] opens both stores, starts raft, makes this node a one-voter cluster on first start,
//! and waits until it leads.

// openraft's StorageError is large by design and is what its traits return; boxing it here
// would only add conversions at every trait boundary.
#[allow(clippy::result_large_err)]
pub mod log_store;
pub mod network;
#[allow(clippy::result_large_err)]
pub mod state_machine;
pub mod sync;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::watch;

use crate::config::Config;
use crate::hub::Hub;
use crate::message::{Command, CommandOutcome};
use crate::store::MessageStore;
use state_machine::{AppliedProgress, StateMachine};

openraft::declare_raft_types!(
    /// Switchboard's raft types: the log carries [`Command`]s and apply answers with
    /// [`CommandOutcome`]s; snapshots are files.
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = tokio::fs::File,
);

/// A running raft node.
pub type Raft = openraft::Raft<TypeConfig>;

/// How long a starting node waits to become leader of its one-voter cluster.
const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// Log entries between snapshots. A snapshot lets openraft purge the log behind it.
const SNAPSHOT_EVERY_ENTRIES: u64 = 20_000;

/// Everything the rest of the broker needs from the replicated log.
pub struct Consensus {
    /// The raft handle: propose with `client_write_ff`, read metrics.
    pub raft: Raft,
    /// The applied messages, for readers.
    pub store: MessageStore,
    /// Fan-out of applied messages to local subscribers.
    pub hub: Hub,
    /// Applied offsets and sizes, for Info and readers.
    pub progress: watch::Receiver<AppliedProgress>,
    /// Syncs the state database (at shutdown).
    pub state_sync: Arc<sync::SledSync>,
}

/// Opens the stores under `config.data_dir`, starts raft and waits until this node leads.
///
/// # Errors
/// A store cannot be opened, raft fails to start, or no leader emerges in time.
pub async fn start(config: &Config) -> anyhow::Result<Consensus> {
    let log_dir = config.data_dir.join("log");
    let state_dir = config.data_dir.join("state");
    let log_store = log_store::LogStore::open(
        &log_dir,
        config.store.cache_bytes,
        config.durability.fsync,
        config.durability.sync_interval,
    )
    .with_context(|| format!("cannot open the log store in {}", log_dir.display()))?;

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let state_db = sled::Config::new()
        .path(&state_dir)
        .cache_capacity(config.store.cache_bytes)
        .open()
        .with_context(|| format!("cannot open the state store in {}", state_dir.display()))?;
    let store = MessageStore::open(&state_db)?;
    let last_offset = crate::apply::StateMeta::load(&store)?.last_offset();
    let hub = Hub::new(
        last_offset,
        config.subscriptions.queue_depth,
        config.subscriptions.queue_bytes,
    );
    let (progress_tx, progress) = watch::channel(AppliedProgress::default());
    let state_machine = StateMachine::open(state_db, &state_dir, hub.clone(), progress_tx)?;
    let state_sync = state_machine.sync_handle();

    let raft_config = openraft::Config {
        cluster_name: "switchboard".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")?;

    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        network::Network,
        log_store,
        state_machine,
    )
    .await
    .context("cannot start raft")?;

    if !raft.is_initialized().await? {
        let mut members = BTreeMap::new();
        members.insert(
            config.node_id,
            BasicNode {
                addr: config.listen.to_string(),
            },
        );
        raft.initialize(members)
            .await
            .context("cannot initialize the one-voter cluster")?;
    }
    raft.wait(Some(LEADERSHIP_TIMEOUT))
        .current_leader(config.node_id, "waiting to lead the one-voter cluster")
        .await
        .context("this node did not become leader")?;

    Ok(Consensus {
        raft,
        store,
        hub,
        progress,
        state_sync,
    })
}

/// openraft's own storage test suite, run against the sled log store and state machine: the same
/// checks every openraft storage implementation must pass (log state, purge, truncate, vote,
/// membership, apply, snapshot transfer).
#[cfg(test)]
mod storage_suite {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::TypeConfig;
    use crate::config::FsyncPolicy;
    use crate::hub::Hub;

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = LogStore::open(
                &dir.path().join("log"),
                8 << 20,
                FsyncPolicy::Always,
                std::time::Duration::from_millis(100),
            )
            .expect("log store opens");
            let state_dir = dir.path().join("state");
            let db = sled::Config::new()
                .path(&state_dir)
                .cache_capacity(8 << 20)
                .open()
                .expect("state db opens");
            let (progress, _) = tokio::sync::watch::channel(Default::default());
            let sm = StateMachine::open(db, &state_dir, Hub::new(0, 16, 1 << 20), progress)
                .expect("state machine opens");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite_passes() {
        Suite::test_all(SledBuilder).expect("storage suite");
    }
}
