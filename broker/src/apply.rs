//! Apply: the only place that decides. It turns a committed [`Command`] into store writes, using
//! nothing but the command and the state before it — no wall clock, no randomness — so every
//! replica, and every replay after a crash, reaches the same state.
//!
//! Offsets are given here, in log order: a batch's messages get consecutive offsets after the
//! last one given. The publish time is the leader's stamp, raised to the previous publish time if
//! the leader's clock went backwards, so publish times never decrease with offsets (the time index
//! relies on it).

use std::sync::Arc;

use openraft::{BasicNode, LogId, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::message::{Command, CommandOutcome, StoredMessage};
use crate::store::MessageStore;

/// Most batches one sweep visits, so a sweep never stalls apply for long; the next sweep goes on.
const SWEEP_BATCH_LIMIT: usize = 512;

/// The state machine's small, always-in-memory state, persisted as the store's meta record in the
/// same atomic write as the data it describes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    /// The last log entry whose effects are in the store.
    pub last_applied: Option<LogId<u64>>,
    /// The last membership applied.
    pub membership: StoredMembership<u64, BasicNode>,
    /// The offset the next published message gets (offsets start at 1).
    pub next_offset: u64,
    /// The latest publish time given, µs since the epoch.
    pub last_publish_time_us: u64,
    /// Encoded bytes of all stored batches.
    pub stored_bytes: u64,
}

impl StateMeta {
    /// Reads the meta record, or the initial state for an empty store.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn load(store: &MessageStore) -> Result<StateMeta, BrokerError> {
        match store.meta()? {
            Some(bytes) => bincode::deserialize(&bytes)
                .map_err(|e| BrokerError::Storage(format!("corrupt state meta: {e}"))),
            None => Ok(StateMeta {
                next_offset: 1,
                ..StateMeta::default()
            }),
        }
    }

    /// Adds the write of this meta record to `batch`.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub fn write(&self, batch: &mut sled::Batch) -> Result<(), BrokerError> {
        let bytes = bincode::serialize(self)
            .map_err(|e| BrokerError::Storage(format!("cannot encode state meta: {e}")))?;
        MessageStore::put_meta(batch, &bytes);
        Ok(())
    }

    /// The highest offset given so far (0 when none).
    pub fn last_offset(&self) -> u64 {
        self.next_offset.saturating_sub(1)
    }
}

/// Applies `command` on top of `meta`: adds the store writes to `batch`, advances `meta`, and
/// returns the outcome and the messages that became visible (for the hub).
///
/// `meta` is only changed when this returns `Ok`; on error the caller must discard `batch`.
///
/// # Errors
/// The embedded store's error, or a corrupt record met while sweeping.
pub fn apply_command(
    store: &MessageStore,
    meta: &mut StateMeta,
    command: &Command,
    batch: &mut sled::Batch,
) -> Result<(CommandOutcome, Vec<Arc<StoredMessage>>), BrokerError> {
    match command {
        Command::Publish {
            stamped_at_us,
            messages,
        } => {
            if messages.is_empty() {
                return Ok((CommandOutcome::Nothing, Vec::new()));
            }
            let first_offset = meta.next_offset;
            let publish_time_us = (*stamped_at_us).max(meta.last_publish_time_us);
            let stored: Vec<StoredMessage> = messages
                .iter()
                .zip(first_offset..)
                .map(|(message, offset)| StoredMessage {
                    offset,
                    publish_time_us,
                    message: message.clone(),
                })
                .collect();
            let len = MessageStore::put_batch(batch, first_offset, &stored)?;
            meta.next_offset = first_offset + stored.len() as u64;
            meta.last_publish_time_us = publish_time_us;
            meta.stored_bytes += len as u64;
            Ok((
                CommandOutcome::Published {
                    first_offset,
                    publish_time_us,
                },
                stored.into_iter().map(Arc::new).collect(),
            ))
        }
        Command::Sweep {
            now_us,
            max_age_us,
            max_bytes,
        } => {
            let removed = sweep(store, meta, *now_us, *max_age_us, *max_bytes, batch)?;
            Ok((CommandOutcome::Swept { removed }, Vec::new()))
        }
    }
}

/// Removes expired messages, then whole batches past the age limit, then the oldest batches while
/// the store is over its byte limit. Visits at most [`SWEEP_BATCH_LIMIT`] batches.
fn sweep(
    store: &MessageStore,
    meta: &mut StateMeta,
    now_us: u64,
    max_age_us: u64,
    max_bytes: u64,
    batch: &mut sled::Batch,
) -> Result<u64, BrokerError> {
    let mut removed = 0u64;
    let mut bytes = meta.stored_bytes;
    let mut visited = std::collections::HashSet::new();

    // Age: every message of a batch shares one publish time, so whole batches go.
    for key in
        store.batch_keys_published_before(now_us.saturating_sub(max_age_us), SWEEP_BATCH_LIMIT)?
    {
        if let Some(old) = store.batch(key)? {
            MessageStore::delete_batch(batch, &old);
            removed += old.messages.len() as u64;
            bytes = bytes.saturating_sub(old.encoded_len as u64);
            visited.insert(key);
        }
    }

    // TTL: drop the expired messages of each batch the expiry index points at; rewrite the rest.
    let budget = SWEEP_BATCH_LIMIT.saturating_sub(visited.len());
    for key in store.expired_batch_keys(now_us, budget)? {
        if visited.contains(&key) {
            continue;
        }
        let Some(old) = store.batch(key)? else {
            continue;
        };
        visited.insert(key);
        let keep: Vec<StoredMessage> = old
            .messages
            .iter()
            .filter(|m| !m.is_expired(now_us))
            .cloned()
            .collect();
        removed += (old.messages.len() - keep.len()) as u64;
        bytes = bytes.saturating_sub(old.encoded_len as u64);
        MessageStore::delete_batch(batch, &old);
        if !keep.is_empty() {
            bytes += MessageStore::put_batch(batch, key, &keep)? as u64;
        }
    }

    // Bytes: oldest first. Batches already handled above are skipped (their size is counted).
    if bytes > max_bytes {
        for item in store.batches_from(0) {
            if bytes <= max_bytes || visited.len() >= SWEEP_BATCH_LIMIT {
                break;
            }
            let old = item?;
            if !visited.insert(old.key) {
                continue;
            }
            MessageStore::delete_batch(batch, &old);
            removed += old.messages.len() as u64;
            bytes = bytes.saturating_sub(old.encoded_len as u64);
        }
    }

    meta.stored_bytes = bytes;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NewMessage;

    fn message(channel: &str, ttl_ms: u64) -> NewMessage {
        NewMessage {
            channel: channel.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            content_type: "application/json".into(),
            schema_version: "1.0.0".into(),
            correlation_id: "00000000-0000-4000-8000-000000000000".into(),
            causation_id: String::new(),
            idempotency_key: String::new(),
            ttl_ms,
            headers: Default::default(),
        }
    }

    fn run(store: &MessageStore, meta: &mut StateMeta, command: Command) -> CommandOutcome {
        let mut batch = sled::Batch::default();
        let (outcome, _) = apply_command(store, meta, &command, &mut batch).unwrap();
        meta.write(&mut batch).unwrap();
        store.apply(batch).unwrap();
        outcome
    }

    fn all_offsets(store: &MessageStore) -> Vec<u64> {
        store
            .batches_from(0)
            .flat_map(|b| b.unwrap().messages.into_iter().map(|m| m.offset))
            .collect()
    }

    fn temp_store() -> (tempfile::TempDir, MessageStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, MessageStore::open(&db).unwrap())
    }

    #[test]
    fn offsets_are_consecutive_and_times_never_decrease() {
        let (_dir, store) = temp_store();
        let mut meta = StateMeta::load(&store).unwrap();
        let a = run(
            &store,
            &mut meta,
            Command::Publish {
                stamped_at_us: 100,
                messages: vec![message("a.b", 0); 3],
            },
        );
        // The leader's clock went backwards: the time is held at the previous one.
        let b = run(
            &store,
            &mut meta,
            Command::Publish {
                stamped_at_us: 50,
                messages: vec![message("a.b", 0)],
            },
        );
        assert_eq!(
            a,
            CommandOutcome::Published {
                first_offset: 1,
                publish_time_us: 100
            }
        );
        assert_eq!(
            b,
            CommandOutcome::Published {
                first_offset: 4,
                publish_time_us: 100
            }
        );
        assert_eq!(all_offsets(&store), vec![1, 2, 3, 4]);
        assert_eq!(StateMeta::load(&store).unwrap(), meta);
    }

    #[test]
    fn same_commands_give_the_same_store() {
        let commands = vec![
            Command::Publish {
                stamped_at_us: 1_000,
                messages: vec![message("a.b", 1), message("a.c", 0)],
            },
            Command::Publish {
                stamped_at_us: 2_000,
                messages: vec![message("a.d", 5)],
            },
            Command::Sweep {
                now_us: 3_000,
                max_age_us: u64::MAX,
                max_bytes: u64::MAX,
            },
        ];
        let dumps: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..2)
            .map(|_| {
                let (_dir, store) = temp_store();
                let mut meta = StateMeta::load(&store).unwrap();
                for c in &commands {
                    run(&store, &mut meta, c.clone());
                }
                store
                    .iter_raw()
                    .map(|kv| {
                        let (k, v) = kv.unwrap();
                        (k.to_vec(), v.to_vec())
                    })
                    .collect()
            })
            .collect();
        assert_eq!(dumps[0], dumps[1]);
    }

    #[test]
    fn sweep_removes_expired_messages_and_keeps_the_rest() {
        let (_dir, store) = temp_store();
        let mut meta = StateMeta::load(&store).unwrap();
        // ttl 1 ms = 1000 µs: expires at 1_000 + 1_000.
        run(
            &store,
            &mut meta,
            Command::Publish {
                stamped_at_us: 1_000,
                messages: vec![message("a.b", 1), message("a.c", 0), message("a.d", 10)],
            },
        );
        let before = meta.stored_bytes;
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 1_999,
                    max_age_us: u64::MAX,
                    max_bytes: u64::MAX
                }
            ),
            CommandOutcome::Swept { removed: 0 }
        );
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 2_000,
                    max_age_us: u64::MAX,
                    max_bytes: u64::MAX
                }
            ),
            CommandOutcome::Swept { removed: 1 }
        );
        assert_eq!(all_offsets(&store), vec![2, 3]);
        assert!(meta.stored_bytes < before);
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 20_000,
                    max_age_us: u64::MAX,
                    max_bytes: u64::MAX
                }
            ),
            CommandOutcome::Swept { removed: 1 }
        );
        assert_eq!(all_offsets(&store), vec![2]);
        // Nothing with a TTL is left, so the expiry index is empty.
        assert!(store.expired_batch_keys(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn retention_by_age_and_by_bytes_removes_oldest_batches() {
        let (_dir, store) = temp_store();
        let mut meta = StateMeta::load(&store).unwrap();
        for t in 1..=4u64 {
            run(
                &store,
                &mut meta,
                Command::Publish {
                    stamped_at_us: t * 1_000,
                    messages: vec![message("a.b", 0)],
                },
            );
        }
        // Older than 2_500 µs at now = 4_000 with max age 1_500: batches at 1_000 and 2_000 go.
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 4_000,
                    max_age_us: 1_500,
                    max_bytes: u64::MAX
                }
            ),
            CommandOutcome::Swept { removed: 2 }
        );
        assert_eq!(all_offsets(&store), vec![3, 4]);
        let one = meta.stored_bytes / 2;
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 4_000,
                    max_age_us: u64::MAX,
                    max_bytes: one
                }
            ),
            CommandOutcome::Swept { removed: 1 }
        );
        assert_eq!(all_offsets(&store), vec![4]);
        assert_eq!(meta.stored_bytes, one);
        assert_eq!(store.first_offset_at_or_after(0).unwrap(), Some(4));
    }
}
