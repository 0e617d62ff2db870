//! Apply: the only place that decides. It turns a committed [`Command`] into store writes, using
//! nothing but the command and the state before it — no wall clock, no randomness — so every
//! replica, and every replay after a crash, reaches the same state.
//!
//! Offsets are given here, in log order: a batch's messages get consecutive offsets after the
//! last one given. The publish time is the leader's stamp, raised to the previous publish time if
//! the leader's clock went backwards, so publish times never decrease with offsets (the time index
//! relies on it).

use std::collections::HashMap;
use std::sync::Arc;

use super::entity_doc::{state_channel, EntityDoc};
use super::position::Position;
use super::store::{MessageStore, WriteBatch};
use super::{dedup, loops, ttl};
use crate::entity::EntityState;
use crate::error::BrokerError;
use crate::kpi::fold::Fold;
use crate::kpi::{BackfillReport, View, ViewDefinition, ViewRecord};
use crate::message::{
    Command, CommandOutcome, ConsumerState, ConsumerWrite, EntityWrite, Item, ItemOutcome,
    NewMessage, Owner, Refusal, Rules, SchemaRecord, SchemaWrite, StoredMessage, ViewWrite,
};

/// Decides the items of one batch, in order. See the module docs.
struct BatchApply<'a> {
    store: &'a MessageStore,
    rules: Rules,
    publish_time_us: u64,
    next_offset: u64,
    /// Messages stored by this batch so far, in offset order.
    stored: Vec<StoredMessage>,
    /// Idempotency keys recorded by this batch (its writes are not readable yet).
    dedup: dedup::Recorded,
    /// Entities this batch read or wrote, by store key, as it leaves them so far, with the
    /// bytes of their encoding (its writes are not readable yet); handed to the store's cache
    /// with the batch's writes.
    entities: HashMap<Vec<u8>, (EntityState, usize)>,
    /// Consumers written by this batch (`None`: deleted).
    consumers: HashMap<String, Option<ConsumerState>>,
    /// Schema registrations written by this batch (`false`: deleted).
    schemas: HashMap<(String, String), bool>,
    loops_detected: u64,
}

impl BatchApply<'_> {
    fn store_message(&mut self, message: NewMessage, chain: Vec<String>) -> u64 {
        let offset = self.next_offset;
        self.next_offset += 1;
        self.stored.push(StoredMessage {
            offset,
            publish_time_us: self.publish_time_us,
            message,
            chain,
        });
        offset
    }

    fn known_message(&self, offset: u64) -> Result<Option<StoredMessage>, BrokerError> {
        match self.stored.iter().find(|m| m.offset == offset) {
            Some(m) => Ok(Some(m.clone())),
            None => self.store.message(offset),
        }
    }

    fn publish(
        &mut self,
        mut message: NewMessage,
        batch: &mut WriteBatch,
    ) -> Result<ItemOutcome, BrokerError> {
        let now = self.publish_time_us;
        // A retry is answered with the original before anything else: it is never a loop.
        if let Some(original) = self
            .dedup
            .original(self.store, &message, now, &self.rules)?
        {
            return Ok(ItemOutcome::Duplicate {
                offset: original.offset,
                publish_time_us: original.publish_time_us,
                correlation_id: original.correlation_id,
            });
        }

        // Loops: follow the cause, when it is a message this broker still holds.
        let cause = match message.causation_id.parse::<u64>() {
            Ok(offset) => self.known_message(offset)?,
            Err(_) => None,
        };
        let chain = match loops::chain(&mut message, cause.as_ref(), now, &self.rules) {
            Ok(chain) => chain,
            Err(detected) => {
                self.store_message(detected.report, Vec::new());
                self.loops_detected += 1;
                return Ok(ItemOutcome::Refused(Refusal::Loop {
                    detail: detected.detail,
                }));
            }
        };

        let retry_key = dedup::Key::of(&message);
        let offset = self.store_message(message, chain);
        if let Some(key) = retry_key {
            self.dedup.record(batch, key, offset, now)?;
        }
        Ok(ItemOutcome::Stored {
            offset,
            publish_time_us: now,
        })
    }

    fn entity(
        &mut self,
        write: &EntityWrite,
        batch: &mut WriteBatch,
    ) -> Result<ItemOutcome, BrokerError> {
        let key = MessageStore::entity_key(&write.entity_type, &write.id);
        // Merged in place: every refusal below returns before the state is changed.
        let (current, bytes) = match self.entities.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(absent) => {
                let stored = self.store.entity_to_change(absent.key())?;
                absent.insert(stored.unwrap_or_default())
            }
        };
        let current_version = current.version;
        let leader_ms = self.publish_time_us / 1000;
        // Timestamp 0 asks the broker to stamp the write, here, where the log order is known.
        let broker_stamp;
        let stamp = if write.stamp.timestamp_ms == 0 {
            broker_stamp = current.broker_stamp(leader_ms, write.stamp.writer.clone());
            &broker_stamp
        } else {
            &write.stamp
        };
        let ahead_ms = stamp.timestamp_ms.saturating_sub(leader_ms);
        if ahead_ms > self.rules.max_clock_skew_ms {
            return Ok(ItemOutcome::Refused(Refusal::ClockSkew {
                current_version,
                ahead_ms,
                max_skew_ms: self.rules.max_clock_skew_ms,
            }));
        }
        if let Some(expected_version) = write.expected_version {
            if expected_version != current_version {
                return Ok(ItemOutcome::Refused(Refusal::VersionConflict {
                    current_version,
                    expected_version,
                }));
            }
        }
        // A merge that refuses changes nothing (see `EntityState::merge`).
        if !current.merge(&write.change, stamp) {
            return Ok(ItemOutcome::Refused(Refusal::Stale { current_version }));
        }
        current.accept(stamp, self.publish_time_us);
        *bytes = MessageStore::put_entity(batch, &key, current)?;
        let payload = EntityDoc::encode(&write.entity_type, &write.id, current)?;
        let next = current.clone();
        self.store_message(
            NewMessage::system(state_channel(&write.entity_type, &write.id), payload),
            Vec::new(),
        );
        Ok(ItemOutcome::Entity(Box::new(next)))
    }
}

impl BatchApply<'_> {
    fn consumer(
        &mut self,
        write: &ConsumerWrite,
        batch: &mut WriteBatch,
    ) -> Result<ItemOutcome, BrokerError> {
        let name = match write {
            ConsumerWrite::Open { name, .. }
            | ConsumerWrite::OpenWithoutOwner { name, .. }
            | ConsumerWrite::Ack { name, .. }
            | ConsumerWrite::Delete { name } => name,
        };
        let current = match self.consumers.get(name) {
            Some(state) => state.clone(),
            None => self.store.consumer(name)?,
        };
        let next = match (write, current) {
            (
                ConsumerWrite::Open { .. } | ConsumerWrite::OpenWithoutOwner { .. },
                Some(existing),
            ) => return Ok(ItemOutcome::Consumer(Some(existing))),
            (
                ConsumerWrite::Open {
                    pattern,
                    policy,
                    start_offset,
                    owner,
                    ..
                },
                None,
            ) => Some(self.new_consumer(pattern, *policy, *start_offset, owner.clone())),
            (
                ConsumerWrite::OpenWithoutOwner {
                    pattern,
                    policy,
                    start_offset,
                    ..
                },
                None,
            ) => Some(self.new_consumer(pattern, *policy, *start_offset, None)),
            (
                ConsumerWrite::Ack {
                    acked_offset,
                    redeliveries,
                    ..
                },
                Some(mut state),
            ) => {
                state.acked_offset = state.acked_offset.max(*acked_offset);
                state.redeliveries += redeliveries;
                Some(state)
            }
            (ConsumerWrite::Ack { .. }, None) => return Ok(ItemOutcome::Consumer(None)),
            (ConsumerWrite::Delete { .. }, _) => None,
        };
        MessageStore::put_consumer(batch, name, next.as_ref())?;
        self.consumers.insert(name.clone(), next.clone());
        Ok(ItemOutcome::Consumer(next))
    }

    /// A consumer created now, starting at `start_offset`.
    fn new_consumer(
        &self,
        pattern: &str,
        policy: i32,
        start_offset: u64,
        owner: Option<Owner>,
    ) -> ConsumerState {
        ConsumerState {
            pattern: pattern.to_owned(),
            policy,
            acked_offset: start_offset.saturating_sub(1),
            redeliveries: 0,
            created_at_us: self.publish_time_us,
            owner,
        }
    }
}

impl BatchApply<'_> {
    /// Registers or removes a schema. The document was compiled at the edge before it was
    /// proposed; apply stores it as it is, so every replica holds the same bytes.
    fn schema(
        &mut self,
        write: &SchemaWrite,
        batch: &mut WriteBatch,
    ) -> Result<ItemOutcome, BrokerError> {
        let (pattern, version) = match write {
            SchemaWrite::Put {
                pattern, version, ..
            }
            | SchemaWrite::Delete { pattern, version } => (pattern, version),
        };
        let key = (pattern.clone(), version.clone());
        let existed = match self.schemas.get(&key) {
            Some(present) => *present,
            None => self.store.schema(pattern, version)?.is_some(),
        };
        let record = match write {
            SchemaWrite::Put {
                document,
                policy,
                registered_by,
                ..
            } => Some(SchemaRecord {
                document: document.clone(),
                policy: *policy,
                registered_at_us: self.publish_time_us,
                registered_by: registered_by.clone(),
            }),
            SchemaWrite::Delete { .. } => None,
        };
        if record.is_some() || existed {
            MessageStore::put_schema(batch, pattern, version, record.as_ref())?;
        }
        self.schemas.insert(key, record.is_some());
        Ok(ItemOutcome::Schema {
            existed,
            applied_at_us: self.publish_time_us,
        })
    }
}

impl BatchApply<'_> {
    /// Defines or drops a KPI view. `fold` has folded every message of the batch so far, so a
    /// view defined here is backfilled from the store and those messages, and counts the rest.
    fn view(
        &mut self,
        write: &ViewWrite,
        fold: &mut Fold<'_>,
        batch: &mut WriteBatch,
    ) -> Result<ItemOutcome, BrokerError> {
        match write {
            ViewWrite::Put {
                definition,
                defined_by,
                backfill_limit,
                max_views,
            } => {
                let view = match ViewDefinition::parse(definition) {
                    Ok(view) => view,
                    Err(e) => {
                        return Ok(ItemOutcome::Refused(Refusal::ViewInvalid {
                            detail: e.to_string(),
                        }))
                    }
                };
                let name = view.definition.name.clone();
                let existed = fold.has_view(&name);
                if !existed && fold.view_count() >= *max_views as usize {
                    return Ok(ItemOutcome::Refused(Refusal::ViewLimit {
                        max_views: *max_views,
                    }));
                }
                fold.replace_view(&name, Some(view.clone()), batch)?;
                let backfill = self.backfill(&view, fold, *backfill_limit)?;
                let record = ViewRecord {
                    definition: view.definition.to_json(),
                    defined_at_us: self.publish_time_us,
                    defined_by: defined_by.clone(),
                    backfill,
                };
                MessageStore::put_view(batch, &name, Some(&record))?;
                Ok(ItemOutcome::View {
                    existed,
                    applied_at_us: self.publish_time_us,
                    backfill: Some(backfill),
                })
            }
            ViewWrite::Delete { name } => {
                let existed = fold.has_view(name);
                if existed {
                    fold.replace_view(name, None, batch)?;
                    MessageStore::put_view(batch, name, None)?;
                }
                Ok(ItemOutcome::View {
                    existed,
                    applied_at_us: self.publish_time_us,
                    backfill: None,
                })
            }
        }
    }

    /// Folds into a new `view` the retained messages within the span it keeps (its longest
    /// window length times the windows kept), oldest first, at most `limit` of them; then the
    /// messages of this batch so far. A batch the store cannot read is passed over (and
    /// logged): a view's numbers are not worth stopping apply for.
    fn backfill(
        &self,
        view: &View,
        fold: &mut Fold<'_>,
        limit: u64,
    ) -> Result<BackfillReport, BrokerError> {
        let mut report = BackfillReport::default();
        if limit == 0 {
            return Ok(report);
        }
        let name = view.definition.name.as_str();
        let span_us = view
            .windows
            .iter()
            .map(|w| u64::from(w.length_s) * u64::from(w.keep) * 1_000_000)
            .max()
            .unwrap_or(0);
        let mut count =
            |fold: &mut Fold<'_>, message: &StoredMessage| -> Result<bool, BrokerError> {
                if report.messages_read >= limit {
                    report.truncated = true;
                    return Ok(false);
                }
                if report.first_offset == 0 {
                    report.first_offset = message.offset;
                }
                report.last_offset = message.offset;
                report.messages_read += 1;
                if fold.add(message, Some(name))? {
                    report.messages_counted += 1;
                }
                Ok(true)
            };
        let since_us = self.publish_time_us.saturating_sub(span_us);
        if let Some(from) = self.store.first_offset_at_or_after(since_us)? {
            'batches: for stored in self.store.batches_from(from) {
                let stored = match stored {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::warn!(view = name, error = %e, "a batch the KPI backfill cannot read is passed over");
                        continue;
                    }
                };
                for message in stored.messages.iter().filter(|m| m.offset >= from) {
                    if !count(fold, message)? {
                        break 'batches;
                    }
                }
            }
        }
        for message in &self.stored {
            if !count(fold, message)? {
                break;
            }
        }
        Ok(report)
    }
}

/// Applies `command` on top of `meta`: adds the store writes to `batch`, advances `meta`, and
/// returns the outcome and the messages that became visible (for the hub).
///
/// `meta` is only changed when this returns `Ok`; on error the caller must discard `batch`.
///
/// # Errors
/// The embedded store's error, or a corrupt record.
pub(crate) fn apply_command(
    store: &MessageStore,
    meta: &mut Position,
    command: &Command,
    batch: &mut WriteBatch,
) -> Result<(CommandOutcome, Vec<Arc<StoredMessage>>), BrokerError> {
    match command {
        Command::Batch {
            stamped_at_us,
            rules,
            items,
        } => {
            let publish_time_us = (*stamped_at_us).max(meta.last_publish_time_us);
            let mut decide = BatchApply {
                store,
                rules: *rules,
                publish_time_us,
                next_offset: meta.next_offset,
                stored: Vec::new(),
                dedup: dedup::Recorded::default(),
                entities: HashMap::new(),
                consumers: HashMap::new(),
                schemas: HashMap::new(),
                loops_detected: 0,
            };
            let mut outcomes = Vec::with_capacity(items.len());
            // KPI views fold the batch's messages, in log order with the view writes among them.
            let mut fold = Fold::new(store, store.compiled_views()?);
            let mut folded = 0;
            for item in items {
                outcomes.push(match item {
                    Item::Publish(message) => decide.publish(message.clone(), batch)?,
                    Item::Entity(write) => decide.entity(write, batch)?,
                    Item::Consumer(write) => decide.consumer(write, batch)?,
                    Item::Schema(write) => decide.schema(write, batch)?,
                    Item::View(write) => {
                        for message in &decide.stored[folded..] {
                            fold.add(message, None)?;
                        }
                        folded = decide.stored.len();
                        decide.view(write, &mut fold, batch)?
                    }
                });
            }
            for message in &decide.stored[folded..] {
                fold.add(message, None)?;
            }
            fold.write(batch)?;
            if let Some(first) = decide.stored.first() {
                let len = store.put_batch(batch, first.offset, &decide.stored)?;
                meta.stored_bytes += len as u64;
                meta.last_publish_time_us = publish_time_us;
            }
            meta.next_offset = decide.next_offset;
            meta.loops_detected += decide.loops_detected;
            batch.keep_entities(
                decide
                    .entities
                    .drain()
                    .map(|(key, (state, bytes))| (key, state, bytes)),
            );
            Ok((
                CommandOutcome::Batch(outcomes),
                decide.stored.into_iter().map(Arc::new).collect(),
            ))
        }
        Command::Sweep {
            now_us,
            max_age_us,
            max_bytes,
            dedup_window_us,
        } => {
            let removed = ttl::sweep(store, meta, *now_us, *max_age_us, *max_bytes, batch)?;
            dedup::forget(store, batch, *now_us, *dedup_window_us)?;
            Ok((CommandOutcome::Swept { removed }, Vec::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::Stamp;
    use crate::state::loops::LOOP_CHANNEL;
    use crate::state::position;

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
            hops: 0,
        }
    }

    const RULES: Rules = Rules {
        dedup_window_us: 120_000_000,
        loop_window_us: 300_000_000,
        max_hops: 16,
        max_clock_skew_ms: 60_000,
    };

    fn publish_command(stamped_at_us: u64, messages: Vec<NewMessage>) -> Command {
        Command::Batch {
            stamped_at_us,
            rules: RULES,
            items: messages.into_iter().map(Item::Publish).collect(),
        }
    }

    fn run(store: &MessageStore, meta: &mut Position, command: Command) -> CommandOutcome {
        let mut batch = WriteBatch::default();
        let (outcome, _) = apply_command(store, meta, &command, &mut batch).unwrap();
        meta.write(&Default::default(), &mut batch).unwrap();
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
        let store = MessageStore::open(&db, &dir.path().join("batches")).unwrap();
        (dir, store)
    }

    #[test]
    fn offsets_are_consecutive_and_times_never_decrease() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let a = run(
            &store,
            &mut meta,
            publish_command(100, vec![message("a.b", 0); 3]),
        );
        // The leader's clock went backwards: the time is held at the previous one.
        let b = run(
            &store,
            &mut meta,
            publish_command(50, vec![message("a.b", 0)]),
        );
        let stored = |offset| ItemOutcome::Stored {
            offset,
            publish_time_us: 100,
        };
        assert_eq!(
            a,
            CommandOutcome::Batch(vec![stored(1), stored(2), stored(3)])
        );
        assert_eq!(b, CommandOutcome::Batch(vec![stored(4)]));
        assert_eq!(all_offsets(&store), vec![1, 2, 3, 4]);
        assert_eq!(position::load(&store).unwrap().1, meta);
    }

    #[test]
    fn same_commands_give_the_same_store() {
        let commands = vec![
            publish_command(1_000, vec![message("a.b", 1), message("a.c", 0)]),
            publish_command(2_000, vec![message("a.d", 5)]),
            Command::Sweep {
                now_us: 3_000,
                max_age_us: u64::MAX,
                max_bytes: u64::MAX,
                dedup_window_us: 0,
            },
        ];
        let dumps: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..2)
            .map(|_| {
                let (_dir, store) = temp_store();
                let mut meta = position::load(&store).unwrap().1;
                for c in &commands {
                    run(&store, &mut meta, c.clone());
                }
                store
                    .snapshot_view()
                    .unwrap()
                    .records()
                    .map(|kv| {
                        let (k, v) = kv.unwrap();
                        (k.to_vec(), v)
                    })
                    .collect()
            })
            .collect();
        assert_eq!(dumps[0], dumps[1]);
    }

    #[test]
    fn sweep_removes_expired_messages_and_keeps_the_rest() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        // ttl 1 ms = 1000 µs: expires at 1_000 + 1_000.
        run(
            &store,
            &mut meta,
            publish_command(
                1_000,
                vec![message("a.b", 1), message("a.c", 0), message("a.d", 10)],
            ),
        );
        let before = meta.stored_bytes;
        assert_eq!(
            run(
                &store,
                &mut meta,
                Command::Sweep {
                    now_us: 1_999,
                    max_age_us: u64::MAX,
                    max_bytes: u64::MAX,
                    dedup_window_us: 0,
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
                    max_bytes: u64::MAX,
                    dedup_window_us: 0,
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
                    max_bytes: u64::MAX,
                    dedup_window_us: 0,
                }
            ),
            CommandOutcome::Swept { removed: 1 }
        );
        assert_eq!(all_offsets(&store), vec![2]);
        // Nothing with a TTL is left, so the expiry index is empty.
        assert!(store.expired_batch_keys(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn the_first_present_offset_skips_removed_and_expired_messages() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        // Offsets 1..=5; 2, 3 and 5 live 1 ms (expire at 2_000), 1 and 4 forever.
        let ttls = [0, 1, 1, 0, 1];
        run(
            &store,
            &mut meta,
            publish_command(1_000, ttls.iter().map(|t| message("a.b", *t)).collect()),
        );
        assert_eq!(store.first_present_offset(2, 5, 1_999).unwrap(), Some(2));
        // Expired, not yet swept: gone for readers all the same.
        assert_eq!(store.first_present_offset(2, 5, 2_000).unwrap(), Some(4));
        let sweep = Command::Sweep {
            now_us: 2_000,
            max_age_us: u64::MAX,
            max_bytes: u64::MAX,
            dedup_window_us: 0,
        };
        run(&store, &mut meta, sweep);
        assert_eq!(all_offsets(&store), vec![1, 4]);
        assert_eq!(store.first_present_offset(0, 5, 2_000).unwrap(), Some(1));
        assert_eq!(store.first_present_offset(2, 5, 2_000).unwrap(), Some(4));
        assert_eq!(store.first_present_offset(3, 5, 2_000).unwrap(), Some(4));
        assert_eq!(store.first_present_offset(2, 3, 2_000).unwrap(), None);
        assert_eq!(store.first_present_offset(5, 5, 2_000).unwrap(), None);
        assert_eq!(store.first_present_offset(6, 9, 2_000).unwrap(), None);
    }

    #[test]
    fn retention_by_age_and_by_bytes_removes_oldest_batches() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        for t in 1..=4u64 {
            run(
                &store,
                &mut meta,
                publish_command(t * 1_000, vec![message("a.b", 0)]),
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
                    max_bytes: u64::MAX,
                    dedup_window_us: 0,
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
                    max_bytes: one,
                    dedup_window_us: 0,
                }
            ),
            CommandOutcome::Swept { removed: 1 }
        );
        assert_eq!(all_offsets(&store), vec![4]);
        assert_eq!(meta.stored_bytes, one);
        assert_eq!(store.first_offset_at_or_after(0).unwrap(), Some(4));
    }

    fn batch(stamped_at_us: u64, items: Vec<Item>) -> Command {
        Command::Batch {
            stamped_at_us,
            rules: RULES,
            items,
        }
    }

    fn outcomes(outcome: CommandOutcome) -> Vec<ItemOutcome> {
        match outcome {
            CommandOutcome::Batch(o) => o,
            other => panic!("not a batch: {other:?}"),
        }
    }

    fn keyed(channel: &str, key: &str) -> NewMessage {
        let mut m = message(channel, 0);
        m.idempotency_key = key.into();
        m
    }

    #[test]
    fn a_retry_within_the_window_names_the_original_and_after_it_is_stored_anew() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        // The retry in the same batch, in a later batch, and after the window.
        let first = outcomes(run(
            &store,
            &mut meta,
            batch(
                1_000,
                vec![
                    Item::Publish(keyed("a.b", "k")),
                    Item::Publish(keyed("a.b", "k")),
                ],
            ),
        ));
        assert_eq!(
            first[0],
            ItemOutcome::Stored {
                offset: 1,
                publish_time_us: 1_000
            }
        );
        assert_eq!(
            first[1],
            ItemOutcome::Duplicate {
                offset: 1,
                publish_time_us: 1_000,
                correlation_id: "00000000-0000-4000-8000-000000000000".into(),
            }
        );
        let later = outcomes(run(
            &store,
            &mut meta,
            batch(
                2_000,
                vec![
                    Item::Publish(keyed("a.b", "k")),
                    Item::Publish(keyed("a.c", "k")),
                ],
            ),
        ));
        assert_eq!(
            later[0],
            ItemOutcome::Duplicate {
                offset: 1,
                publish_time_us: 1_000,
                correlation_id: "00000000-0000-4000-8000-000000000000".into(),
            }
        );
        assert_eq!(
            later[1],
            ItemOutcome::Stored {
                offset: 2,
                publish_time_us: 2_000
            },
            "keys are per channel"
        );
        let after = 1_000 + RULES.dedup_window_us;
        let fresh = outcomes(run(
            &store,
            &mut meta,
            batch(after, vec![Item::Publish(keyed("a.b", "k"))]),
        ));
        assert_eq!(
            fresh[0],
            ItemOutcome::Stored {
                offset: 3,
                publish_time_us: after
            }
        );
    }

    fn caused_by(channel: &str, cause: u64, correlation: &str) -> NewMessage {
        let mut m = message(channel, 0);
        m.causation_id = cause.to_string();
        m.correlation_id = correlation.into();
        m
    }

    #[test]
    fn a_chain_that_reenters_a_channel_is_refused_and_reported() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let c = "11111111-1111-4111-8111-111111111111";
        let a1 = outcomes(run(
            &store,
            &mut meta,
            batch(1_000, vec![Item::Publish(message("svc.a", 0))]),
        ));
        assert!(matches!(a1[0], ItemOutcome::Stored { offset: 1, .. }));
        let b = outcomes(run(
            &store,
            &mut meta,
            batch(2_000, vec![Item::Publish(caused_by("svc.b", 1, c))]),
        ));
        assert!(matches!(b[0], ItemOutcome::Stored { offset: 2, .. }));
        // Back into svc.a: refused, and the report takes offset 3.
        let a2 = outcomes(run(
            &store,
            &mut meta,
            batch(3_000, vec![Item::Publish(caused_by("svc.a", 2, c))]),
        ));
        assert!(
            matches!(&a2[0], ItemOutcome::Refused(Refusal::Loop { detail }) if detail.contains("svc.a"))
        );
        let report = store.message(3).unwrap().unwrap();
        assert_eq!(report.message.channel, LOOP_CHANNEL);
        assert_eq!(meta.loops_detected, 1);
        // A long chain through distinct channels is fine, and hops are counted by the broker.
        let mut cause = 2;
        for i in 0..10 {
            let o = outcomes(run(
                &store,
                &mut meta,
                batch(
                    4_000 + i,
                    vec![Item::Publish(caused_by(&format!("svc.c{i}"), cause, c))],
                ),
            ));
            let ItemOutcome::Stored { offset, .. } = o[0] else {
                panic!("{o:?}")
            };
            cause = offset;
        }
        assert_eq!(store.message(cause).unwrap().unwrap().message.hops, 11);
        // Past the hop limit.
        let mut long = caused_by("svc.z", cause, c);
        long.hops = 0;
        let mut meta2 = meta.clone();
        let rules = Rules {
            max_hops: 5,
            ..RULES
        };
        let mut writes = WriteBatch::default();
        let (o, _) = apply_command(
            &store,
            &mut meta2,
            &Command::Batch {
                stamped_at_us: 5_000,
                rules,
                items: vec![Item::Publish(long)],
            },
            &mut writes,
        )
        .unwrap();
        assert!(matches!(
            &outcomes(o)[0],
            ItemOutcome::Refused(Refusal::Loop { .. })
        ));
    }

    #[test]
    fn the_state_document_is_written_as_serde_would_write_it() {
        // The direct encoding must give the very bytes the document type serializes to: replicas
        // running either version publish the same payload, and readers parse it as before.
        let canonical = |text: &str| {
            serde_json::from_str::<serde_json::Value>(text)
                .unwrap()
                .to_string()
        };
        let mut state = EntityState::default();
        assert_eq!(
            EntityDoc::encode("contact", "c1", &state).unwrap(),
            serde_json::to_string(&EntityDoc::new("contact", "c1", &state)).unwrap()
        );
        let values = [
            ("name", "\"Ada \\\"the\\\" Lovelace \u{e9}\u{1F600}\""),
            ("n", "12345678901234567890"),
            ("f", "-1.5e-7"),
            ("pi", "3.141592653589793"),
            ("nested", r#"{"b":[1,null,true],"a":{"z":"\n"}}"#),
            ("quote\"d\\key", "false"),
        ];
        let change = crate::entity::Change::Update(
            values
                .iter()
                .map(|(k, v)| (k.to_string(), canonical(v)))
                .collect(),
        );
        let written = Stamp {
            timestamp_ms: 7,
            version: 3,
            writer: "w\"1".into(),
        };
        assert!(state.merge(&change, &written));
        state.accept(&written, 1_764_000_000_123_456);
        for state in [state.clone(), {
            let mut deleted = state.clone();
            let later = Stamp {
                timestamp_ms: 8,
                ..written.clone()
            };
            deleted.merge(&crate::entity::Change::Delete, &later);
            deleted.accept(&later, 1_764_000_000_223_456);
            deleted
        }] {
            let direct = EntityDoc::encode("contact", "c-1_x", &state).unwrap();
            let via_doc =
                serde_json::to_string(&EntityDoc::new("contact", "c-1_x", &state)).unwrap();
            assert_eq!(direct, via_doc);
            let back: EntityDoc = serde_json::from_str(&direct).unwrap();
            assert_eq!(back, EntityDoc::new("contact", "c-1_x", &state));
        }
    }

    fn entity_write(fields: &[(&str, &str)], ts: u64, writer: &str, expected: Option<u64>) -> Item {
        Item::Entity(EntityWrite {
            entity_type: "contact".into(),
            id: "42".into(),
            change: crate::entity::Change::Update(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            stamp: Stamp {
                timestamp_ms: ts,
                version: 0,
                writer: writer.into(),
            },
            expected_version: expected,
        })
    }

    /// A write with timestamp 0 is stamped by the broker as it is applied: after every stamp the
    /// entity holds, so writes the broker stamps are never stale, even within one millisecond
    /// and behind a writer whose clock is ahead.
    #[test]
    fn writes_the_broker_stamps_follow_every_stamp_the_entity_holds() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let now_us = 10_000_000; // leader time: 10 s
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(
                now_us,
                vec![
                    entity_write(&[("name", "1")], 0, "http", None),
                    entity_write(&[("name", "2")], 0, "http", None),
                    // A writer 5 s ahead of the leader, then the broker again.
                    entity_write(&[("name", "3")], 15_000, "crm", None),
                    entity_write(&[("name", "4")], 0, "http", None),
                ],
            ),
        ));
        let stamps: Vec<Stamp> = o
            .iter()
            .map(|outcome| match outcome {
                ItemOutcome::Entity(state) => state.last_stamp.clone().unwrap(),
                other => panic!("refused: {other:?} in {o:?}"),
            })
            .collect();
        let stamp = |ts: u64, version: u64, writer: &str| Stamp {
            timestamp_ms: ts,
            version,
            writer: writer.into(),
        };
        assert_eq!(
            stamps,
            [
                stamp(10_000, 0, "http"),
                stamp(10_000, 1, "http"),
                stamp(15_000, 0, "crm"),
                stamp(15_000, 1, "http"),
            ]
        );
        let stored = store.entity("contact", "42").unwrap().unwrap();
        assert_eq!(stored.fields_json(), r#"{"name":4}"#);
    }

    #[test]
    fn entity_writes_merge_refuse_and_publish_their_state() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let now_us = 10_000_000; // leader time: 10 s
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(
                now_us,
                vec![
                    entity_write(&[("name", "\"Ada\"")], 9_000, "crm", Some(0)),
                    entity_write(&[("phone", "\"555\"")], 9_500, "tel", None),
                    entity_write(&[("name", "\"Old\"")], 8_000, "tel", None),
                    entity_write(&[("name", "\"X\"")], 9_900, "crm", Some(1)),
                    entity_write(&[("name", "\"Future\"")], 10_000 + 60_001, "crm", None),
                ],
            ),
        ));
        let ItemOutcome::Entity(first) = &o[0] else {
            panic!("{o:?}")
        };
        assert_eq!(first.version, 1);
        let ItemOutcome::Entity(second) = &o[1] else {
            panic!("{o:?}")
        };
        assert_eq!(second.fields_json(), r#"{"name":"Ada","phone":"555"}"#);
        assert_eq!(
            o[2],
            ItemOutcome::Refused(Refusal::Stale { current_version: 2 })
        );
        assert_eq!(
            o[3],
            ItemOutcome::Refused(Refusal::VersionConflict {
                current_version: 2,
                expected_version: 1
            })
        );
        assert!(matches!(
            o[4],
            ItemOutcome::Refused(Refusal::ClockSkew {
                current_version: 2,
                ..
            })
        ));
        let stored = store.entity("contact", "42").unwrap().unwrap();
        assert_eq!(stored.version, 2);
        // Each accepted change was published on the entity's state channel.
        let states: Vec<_> = store
            .batches_from(0)
            .flat_map(|b| b.unwrap().messages)
            .collect();
        assert_eq!(states.len(), 2);
        assert!(states
            .iter()
            .all(|m| m.message.channel == "$state.contact.42"));
        let doc: EntityDoc = serde_json::from_slice(&states[1].message.payload).unwrap();
        assert_eq!(doc.version, 2);
        assert_eq!(doc.fields["phone"], "555");
    }

    #[test]
    fn durable_consumers_open_once_ack_forward_only_and_delete() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let alice = Owner {
            issuer: "https://idp.test".into(),
            subject: "alice".into(),
        };
        let open = |start, subject: &str| {
            Item::Consumer(ConsumerWrite::Open {
                name: "panel".into(),
                pattern: "a.>".into(),
                policy: 1,
                start_offset: start,
                owner: Some(Owner {
                    subject: subject.into(),
                    ..alice.clone()
                }),
            })
        };
        let ack = |offset| {
            Item::Consumer(ConsumerWrite::Ack {
                name: "panel".into(),
                acked_offset: offset,
                redeliveries: 1,
            })
        };
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(
                1_000,
                vec![open(5, "alice"), open(99, "bob"), ack(7), ack(6)],
            ),
        ));
        let state = |o: &ItemOutcome| match o {
            ItemOutcome::Consumer(Some(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            state(&o[0]).acked_offset,
            4,
            "a new consumer starts at its start offset"
        );
        assert_eq!(
            state(&o[1]).acked_offset,
            4,
            "opening an existing consumer keeps it"
        );
        assert_eq!(
            state(&o[1]).owner,
            Some(alice),
            "and its owner: the edge refuses the other caller"
        );
        assert_eq!(state(&o[2]).acked_offset, 7);
        assert_eq!(state(&o[3]).acked_offset, 7, "acks never move back");
        assert_eq!(state(&o[3]).redeliveries, 2);
        assert_eq!(store.consumer("panel").unwrap().unwrap().acked_offset, 7);
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(
                2_000,
                vec![
                    Item::Consumer(ConsumerWrite::Delete {
                        name: "panel".into(),
                    }),
                    ack(9),
                ],
            ),
        ));
        assert_eq!(
            o,
            vec![ItemOutcome::Consumer(None), ItemOutcome::Consumer(None)]
        );
        assert!(store.consumer("panel").unwrap().is_none());
    }

    /// `ConsumerWrite` as versions before owners were recorded wrote it into the log.
    #[derive(serde::Serialize)]
    enum ConsumerWriteWithoutOwners {
        Open {
            name: String,
            pattern: String,
            policy: i32,
            start_offset: u64,
        },
        Ack {
            name: String,
            acked_offset: u64,
            redeliveries: u64,
        },
        Delete {
            name: String,
        },
    }

    #[test]
    fn consumer_writes_in_a_log_from_before_owners_still_read_and_create_unowned_consumers() {
        let old = [
            ConsumerWriteWithoutOwners::Open {
                name: "panel".into(),
                pattern: "a.>".into(),
                policy: 1,
                start_offset: 5,
            },
            ConsumerWriteWithoutOwners::Ack {
                name: "panel".into(),
                acked_offset: 6,
                redeliveries: 0,
            },
            ConsumerWriteWithoutOwners::Delete {
                name: "other".into(),
            },
        ];
        let read: Vec<ConsumerWrite> = old
            .iter()
            .map(|w| bincode::deserialize(&bincode::serialize(w).unwrap()).unwrap())
            .collect();
        assert_eq!(
            read,
            vec![
                ConsumerWrite::OpenWithoutOwner {
                    name: "panel".into(),
                    pattern: "a.>".into(),
                    policy: 1,
                    start_offset: 5,
                },
                ConsumerWrite::Ack {
                    name: "panel".into(),
                    acked_offset: 6,
                    redeliveries: 0,
                },
                ConsumerWrite::Delete {
                    name: "other".into(),
                },
            ]
        );
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        run(
            &store,
            &mut meta,
            batch(1_000, read.into_iter().map(Item::Consumer).collect()),
        );
        let state = store.consumer("panel").unwrap().unwrap();
        assert_eq!((state.acked_offset, state.owner), (6, None));
    }

    // The entities an entry merges into are kept decoded across entries (the store's cache,
    // `store/decoded.rs`). Each test below changes or replaces the stored entity by a path other
    // than an applied update, and would fail if the next update merged into a stale copy.

    /// The version an update of contact 42 stamped `ts` by `writer` gets (`None`: refused).
    fn update_version(
        store: &MessageStore,
        meta: &mut Position,
        ts: u64,
        writer: &str,
    ) -> Option<u64> {
        let o = outcomes(run(
            store,
            meta,
            batch(
                ts * 1_000,
                vec![entity_write(&[("n", "1")], ts, writer, None)],
            ),
        ));
        match &o[0] {
            ItemOutcome::Entity(state) => Some(state.version),
            _ => None,
        }
    }

    #[test]
    fn an_entry_whose_writes_are_discarded_leaves_no_entity_cached() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        assert_eq!(update_version(&store, &mut meta, 1_000, "a"), Some(1));
        // Decided, then dropped (an undo record that cannot be written, a failed entry).
        let mut discarded = WriteBatch::default();
        let mut scratch = meta.clone();
        let command = batch(
            2_000_000,
            vec![entity_write(&[("n", "2")], 2_000, "a", None)],
        );
        apply_command(&store, &mut scratch, &command, &mut discarded).unwrap();
        drop(discarded);
        assert_eq!(update_version(&store, &mut meta, 3_000, "a"), Some(2));
        assert_eq!(store.entity("contact", "42").unwrap().unwrap().version, 2);
    }

    #[test]
    fn a_cleared_store_forgets_its_entities() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        assert_eq!(update_version(&store, &mut meta, 1_000, "a"), Some(1));
        assert_eq!(update_version(&store, &mut meta, 2_000, "a"), Some(2));
        store.clear().unwrap();
        let mut meta = position::load(&store).unwrap().1;
        // An older stamp than the cleared state held: new again, so accepted.
        assert_eq!(update_version(&store, &mut meta, 500, "a"), Some(1));
    }

    #[test]
    fn an_installed_snapshot_replaces_the_entities_cached() {
        let (dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        assert_eq!(update_version(&store, &mut meta, 1_000, "a"), Some(1));
        let path = dir.path().join("snapshot");
        crate::state::snapshot_file::write(&store.snapshot_view().unwrap(), &path).unwrap();
        assert_eq!(update_version(&store, &mut meta, 2_000, "a"), Some(2));
        assert_eq!(update_version(&store, &mut meta, 3_000, "a"), Some(3));
        crate::state::snapshot_file::load(&store, &path).unwrap();
        let mut meta = position::load(&store).unwrap().1;
        // Merged into the snapshot's version 1, whose field is stamped 1,000: 1,500 wins.
        assert_eq!(update_version(&store, &mut meta, 1_500, "a"), Some(2));
        assert_eq!(store.entity("contact", "42").unwrap().unwrap().version, 2);
    }

    #[test]
    fn deletes_and_refusals_leave_the_cached_entity_as_stored() {
        let (_dir, store) = temp_store();
        let mut meta = position::load(&store).unwrap().1;
        let delete = |ts: u64| {
            Item::Entity(EntityWrite {
                entity_type: "contact".into(),
                id: "42".into(),
                change: crate::entity::Change::Delete,
                stamp: Stamp {
                    timestamp_ms: ts,
                    version: 0,
                    writer: "a".into(),
                },
                expected_version: None,
            })
        };
        assert_eq!(update_version(&store, &mut meta, 1_000, "a"), Some(1));
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(2_000_000, vec![delete(2_000)]),
        ));
        assert!(matches!(&o[0], ItemOutcome::Entity(state) if state.version == 2));
        // Older than the delete: refused, in the entry after it and in the same entry as a
        // refused conditional write.
        assert_eq!(update_version(&store, &mut meta, 1_500, "a"), None);
        let o = outcomes(run(
            &store,
            &mut meta,
            batch(
                3_000_000,
                vec![
                    entity_write(&[("n", "3")], 3_000, "a", Some(7)),
                    entity_write(&[("n", "3")], 1_800, "a", None),
                ],
            ),
        ));
        assert_eq!(
            o,
            vec![
                ItemOutcome::Refused(Refusal::VersionConflict {
                    current_version: 2,
                    expected_version: 7
                }),
                ItemOutcome::Refused(Refusal::Stale { current_version: 2 }),
            ]
        );
        assert_eq!(update_version(&store, &mut meta, 4_000, "a"), Some(3));
        let stored = store.entity("contact", "42").unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.fields_json()),
            (3, r#"{"n":1}"#.to_owned())
        );
        assert!(stored.tombstone.is_some());
    }
}
