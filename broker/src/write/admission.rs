//! Write admission: what must hold before a write is proposed at all.
//!
//! - **Room on the disk.** Free space on the data folder's file system is measured every
//!   [`MEASURE_EVERY`]; a write that would take it below `store.min_free_bytes` is refused with
//!   `RESOURCE_EXHAUSTED` `STORAGE_FULL` before it reaches the log, so a disk filling up is a
//!   refusal the client can read rather than a failed log append that stops raft. Between two
//!   measurements the bytes admitted are counted against the last one (twice: the log entry and
//!   the message body each take room). Reads, subscriptions, acknowledgements, deletes and
//!   retention sweeps go on, and writes are admitted again as soon as there is room — retention
//!   freeing space, or an operator — without a restart.
//! - **A live raft.** Once raft has stopped on a fatal error ([`Admission::set_fatal`]), every
//!   write is refused at once rather than queued behind openraft's stopped core; the process
//!   then exits (see `main.rs`) so a supervisor restarts it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{BrokerError, Reason};
use crate::message::Item;
use crate::shutdown::ShutdownSignal;

/// How often free space is measured.
const MEASURE_EVERY: Duration = Duration::from_millis(250);

/// Each admitted byte takes about this many on disk before the next measurement sees it: the
/// raft log entry and the message's body in a batch file.
const DISK_BYTES_PER_BYTE: u64 = 2;

/// Whether writes may be proposed now; cheap to clone.
#[derive(Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    min_free_bytes: u64,
    /// Free bytes at the last measurement (`u64::MAX` before the first or when it failed).
    free_bytes: AtomicU64,
    /// Bytes admitted since the last measurement, as they will take room on disk.
    admitted_since: AtomicU64,
    /// Whether writes are refused for room (for the log line on each change and for health).
    full: AtomicBool,
    /// Why raft stopped, once it has (watched by `main`, which then stops the broker).
    fatal: watch::Sender<Option<String>>,
}

impl Admission {
    /// Admission for a broker whose data is in `data_dir`, with no measurement yet; see
    /// [`Admission::measure_until`].
    pub(crate) fn new(data_dir: &Path, min_free_bytes: u64) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                min_free_bytes,
                free_bytes: AtomicU64::new(u64::MAX),
                admitted_since: AtomicU64::new(0),
                full: AtomicBool::new(false),
                fatal: watch::Sender::new(None),
            }),
        }
    }

    /// Measures free space now, and then every [`MEASURE_EVERY`] until `shutdown`.
    pub(crate) async fn measure_until(self, mut shutdown: ShutdownSignal) {
        let mut tick = tokio::time::interval(MEASURE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            let dir = self.inner.data_dir.clone();
            match tokio::task::spawn_blocking(move || fs2::available_space(dir)).await {
                Ok(Ok(free)) => self.record(free),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot measure the free space of the data folder")
                }
                Err(_) => {}
            }
        }
    }

    /// Records a measurement of the free space.
    pub(crate) fn record(&self, free: u64) {
        self.inner.free_bytes.store(free, Ordering::Relaxed);
        self.inner.admitted_since.store(0, Ordering::Relaxed);
        let full = free < self.inner.min_free_bytes;
        if self.inner.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::warn!(
                    free_bytes = free,
                    min_free_bytes = self.inner.min_free_bytes,
                    "the data folder's disk is nearly full: writes are refused (STORAGE_FULL) until there is room again"
                );
            } else {
                tracing::info!(
                    free_bytes = free,
                    "there is room on the disk again: writes are admitted"
                );
            }
        }
    }

    /// Admits `items` or says why not. Items that free room or keep subscriptions going (entity
    /// deletes, durable consumer writes) are admitted even when the disk is nearly full.
    ///
    /// # Errors
    /// [`Reason::StorageFull`] when the write would take free space below the floor;
    /// [`BrokerError::Consensus`] once raft has stopped.
    pub(crate) fn admit(&self, items: &[Item]) -> Result<(), BrokerError> {
        self.check_alive()?;
        if items.iter().all(Item::needs_no_room) {
            return Ok(());
        }
        let bytes: u64 = items.iter().map(|i| i.approximate_size() as u64).sum();
        let needs = bytes.saturating_mul(DISK_BYTES_PER_BYTE);
        let admitted = self
            .inner
            .admitted_since
            .fetch_add(needs, Ordering::Relaxed)
            .saturating_add(needs);
        let free = self.inner.free_bytes.load(Ordering::Relaxed);
        if free.saturating_sub(admitted) < self.inner.min_free_bytes {
            self.inner
                .admitted_since
                .fetch_sub(needs, Ordering::Relaxed);
            return Err(BrokerError::Exhausted {
                reason: Reason::StorageFull,
                message: format!(
                    "the broker's disk is nearly full ({} free, store.min_free_bytes is {}): \
                     writes are refused until retention or an operator makes room; reads and \
                     subscriptions go on",
                    human_bytes(free),
                    human_bytes(self.inner.min_free_bytes),
                ),
            });
        }
        Ok(())
    }

    /// Fails once raft has stopped.
    ///
    /// # Errors
    /// [`BrokerError::Consensus`] naming why raft stopped.
    pub(crate) fn check_alive(&self) -> Result<(), BrokerError> {
        match &*self.inner.fatal.borrow() {
            Some(why) => Err(BrokerError::Consensus(format!(
                "raft stopped on this node ({why}); it is exiting to be restarted"
            ))),
            None => Ok(()),
        }
    }

    /// Records that raft stopped for `why` (the first reason stands); from now on every write
    /// is refused.
    pub(crate) fn set_fatal(&self, why: String) {
        self.inner.fatal.send_if_modified(|fatal| {
            let first = fatal.is_none();
            if first {
                *fatal = Some(why);
            }
            first
        });
    }

    /// Why raft stopped, if it has.
    pub(crate) fn fatal(&self) -> Option<String> {
        self.inner.fatal.borrow().clone()
    }

    /// Resolves, with the reason, once raft has stopped; never otherwise.
    pub(crate) async fn stopped(&self) -> String {
        let mut fatal = self.inner.fatal.subscribe();
        // The sender lives as long as `self`, so the wait ends only with a reason.
        let why = match fatal.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Why writes are refused for room, when they are (for `/healthz`).
    pub(crate) fn storage_full(&self) -> Option<String> {
        self.inner.full.load(Ordering::Relaxed).then(|| {
            format!(
                "storage full: {} free on the data folder's disk, below store.min_free_bytes ({}): \
                 writes are refused\n",
                human_bytes(self.inner.free_bytes.load(Ordering::Relaxed)),
                human_bytes(self.inner.min_free_bytes),
            )
        })
    }

    /// Free bytes at the last measurement (`None` before the first), and whether writes are
    /// refused for room.
    pub(crate) fn free_space(&self) -> (Option<u64>, bool) {
        let free = self.inner.free_bytes.load(Ordering::Relaxed);
        (
            (free != u64::MAX).then_some(free),
            self.inner.full.load(Ordering::Relaxed),
        )
    }
}

/// `bytes` for a person: `12.3 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NewMessage;

    fn publish(bytes: usize) -> Item {
        Item::Publish(NewMessage::on_channel(
            "a.b",
            bytes::Bytes::from(vec![b'x'; bytes]),
        ))
    }

    fn admission(free: u64) -> Admission {
        let admission = Admission::new(Path::new("."), 1_000_000);
        admission.record(free);
        admission
    }

    #[test]
    fn writes_below_the_floor_are_refused_with_the_reason_and_admitted_again_when_room_returns() {
        let admission = admission(900_000);
        let refused = admission.admit(&[publish(10)]).unwrap_err();
        assert_eq!(refused.reason(), Reason::StorageFull);
        assert!(
            refused.to_string().contains("store.min_free_bytes"),
            "{refused}"
        );
        assert!(admission.storage_full().is_some());
        admission.record(5_000_000);
        admission.admit(&[publish(10)]).unwrap();
        assert!(admission.storage_full().is_none());
    }

    #[test]
    fn bytes_admitted_between_measurements_count_against_the_last_one() {
        let admission = admission(1_500_000);
        // 2 × 100 kB per write: two fit above the floor, the third does not.
        admission.admit(&[publish(100_000)]).unwrap();
        admission.admit(&[publish(100_000)]).unwrap();
        assert!(admission.admit(&[publish(100_000)]).is_err());
        // A smaller one still fits in what is left.
        admission.admit(&[publish(10_000)]).unwrap();
    }

    #[test]
    fn a_stopped_raft_refuses_every_write() {
        let admission = admission(u64::MAX - 1);
        admission.set_fatal("the log cannot be written".into());
        let refused = admission.admit(&[publish(1)]).unwrap_err();
        assert!(refused.to_string().contains("the log cannot be written"));
    }
}
