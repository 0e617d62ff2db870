//! The message store: the state machine's on-disk layout in one sled tree, and the reads that
//! History and lagging subscribers make.
//!
//! One tree, with the kind of each record in its first key byte:
//!
//! | key | value | what |
//! |---|---|---|
//! | `b` + first offset (u64 BE) | bincode [`BodyLocation`] | one group-committed batch, the unit of storage: where its body (bincode `Vec<StoredMessage>`) is in the [batch files](super::batch_files) |
//! | `t` + publish time µs + first offset | empty | time index: where a time-based start begins |
//! | `x` + earliest expiry µs + first offset | empty | expiry index: which batches the sweep must visit |
//! | `i` + channel + 0 + idempotency key | bincode (offset, publish time µs) | dedup: the message a key names |
//! | `k` + publish time µs + offset | the `i` key | dedup records in time order, for forgetting them |
//! | `e` + type + 0 + id | bincode [`EntityState`] | an entity's merged state |
//! | `c` + name | bincode [`ConsumerState`] | a durable consumer |
//! | `s` + pattern + 0 + version | bincode [`SchemaRecord`] | a registered payload schema ([`crate::schema`]) |
//! | `m` | bincode (raft's [`Bookkeeping`](crate::raft::state_machine::Bookkeeping), [`Position`](super::position::Position)) | last applied log id and membership; next offset, totals |
//!
//! A batch keeps its original first offset as its key even after the sweep removed some of its
//! messages, so "the batch that may hold offset N" is always the last `b` key at or below N.
//! Publish times never decrease with offsets (apply guarantees it), so the time index is also in
//! offset order.
//!
//! Batch bodies live outside the tree, in append-only files ([`super::batch_files`]), because sled
//! handles values of tens of KiB poorly; the tree keeps only where each one is. A [`WriteBatch`]
//! carries the tree writes of one applied entry and the bodies they stop pointing at.
//!
//! An entry's writes go into the tree as plain inserts, in order, not as one `sled::Batch`: sled
//! 0.34 rolls its I/O buffer before and after every batch (a `write` and a `sync_file_range` on
//! its I/O thread per applied entry), which was most of what the state store cost the publish
//! pipeline (docs/BENCHMARKS.md). So a crash can leave part of an entry in the tree; the state
//! machine trusts the tree only after a clean stop and otherwise rebuilds it from its snapshot and
//! the log ([`crate::raft::state_machine`]). Readers may see an entry's records appear one by one:
//! every read tolerates a batch record without its index entries and the reverse.
//!
//! Every bincode value (and every body) is sealed with a checksum ([`crate::checksum`]) and checked on every read;
//! a damaged one is a [`BrokerError::Corrupt`] (`DATA_LOSS`), never served. The index records with
//! an empty value have nothing to check: they only point at batches, which are checked.

use std::path::Path;
use std::sync::Arc;

mod decoded;
mod kpi_records;

use decoded::{Decoded, Kept};

use super::batch_files::BatchFiles;
pub(crate) use super::batch_files::BodyLocation;

use super::dedup::DedupRecord;
use crate::channel::Pattern;
use crate::checksum;
use crate::entity::EntityState;
use crate::error::BrokerError;
use crate::message::{ConsumerState, SchemaRecord, StoredMessage};

const BATCH: u8 = b'b';
const TIME: u8 = b't';
const EXPIRY: u8 = b'x';
const DEDUP: u8 = b'i';
const DEDUP_BY_TIME: u8 = b'k';
const ENTITY: u8 = b'e';
const CONSUMER: u8 = b'c';
const SCHEMA: u8 = b's';
/// KPI view definitions and their cells: [`kpi_records`].
const VIEW: u8 = b'v';
const KPI_CELL: u8 = b'q';
const META: &[u8] = b"m";

/// The store's tree in the state database.
///
/// # Errors
/// sled's error.
pub(crate) fn tree(db: &sled::Db) -> sled::Result<sled::Tree> {
    db.open_tree("messages")
}

/// The meta record (applied position) of the store's `tree`, before the store is opened.
///
/// # Errors
/// sled's error.
pub(crate) fn meta(tree: &sled::Tree) -> sled::Result<Option<sled::IVec>> {
    tree.get(META)
}

/// Puts back the before-images of the entries a crash cut short ([`super::undo`]), on the bare
/// tree, before the store (and its batch files' accounting) is opened.
///
/// # Errors
/// sled's error.
pub(crate) fn put_back(
    tree: &sled::Tree,
    images: Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> sled::Result<()> {
    for (key, value) in images {
        match value {
            Some(value) => tree.insert(key, value)?,
            None => tree.remove(key)?,
        };
    }
    Ok(())
}

/// Handle to the message store; cheap to clone (sled trees are reference-counted).
#[derive(Clone)]
pub struct MessageStore {
    tree: sled::Tree,
    bodies: Arc<BatchFiles>,
    /// Raised whenever the schema or KPI view records may have changed (an applied write of
    /// one, a cleared store, a snapshot's records), so what was compiled from them
    /// ([`crate::schema::SchemaRegistry`], [`crate::kpi::CompiledViews`]) knows to reload
    /// without reading the tree on every publish.
    registry_generation: Arc<std::sync::atomic::AtomicU64>,
    /// The KPI views compiled at a registry generation, for apply ([`Self::compiled_views`]).
    compiled_views: Arc<std::sync::Mutex<Option<CompiledAt>>>,
    /// KPI cells as the last applied entries left them, decoded, so the next entry need not read
    /// and decode them again ([`kpi_records`], [`decoded`]). Bounded.
    kpi_cells_cache: Arc<Decoded<crate::kpi::cell::Cell>>,
    /// Entities as the last applied entries left them, decoded, so an update merges into the
    /// state in memory rather than reading and decoding it again ([`decoded`]). Bounded.
    entities_cache: Arc<Decoded<EntityState>>,
}

/// Entities the cache keeps decoded at most, and the bytes their encodings may take: a hot set
/// of thousands of entities is merged into in memory; the bytes bound keeps large entities from
/// making it hundreds of MB (decoded, an entity takes a few times its encoding).
const ENTITIES_CACHED: usize = 8192;
const ENTITY_BYTES_CACHED: usize = 8 << 20;

/// Views compiled at a registry generation.
type CompiledAt = (u64, Arc<crate::kpi::CompiledViews>);

/// The store's records at one moment, for a snapshot built off the apply path: the records are
/// copied when the view is taken, and the bodies of its batches are read later from the batch
/// files, which are append-only and kept from removal while the view lives (a sweep meanwhile
/// releases bodies but removes no file).
pub struct SnapshotView {
    records: Vec<(sled::IVec, sled::IVec)>,
    store: MessageStore,
    _hold: super::batch_files::FilesHold,
}

impl SnapshotView {
    /// Every record in key order: a batch's record holds its body, as it would if the tree stored
    /// bodies itself, so a snapshot is whole on its own.
    pub fn records(&self) -> impl Iterator<Item = Result<(&[u8], Vec<u8>), BrokerError>> + '_ {
        self.records.iter().map(|(k, v)| {
            if k.first() == Some(&BATCH) {
                let body = self.store.read_body(&decode_location(v)?)?;
                Ok((k.as_ref(), body))
            } else {
                Ok((k.as_ref(), v.to_vec()))
            }
        })
    }
}

/// The writes of one applied entry: tree writes applied in order by [`MessageStore::apply`],
/// and the batch bodies they start and stop pointing at, accounted once they are applied.
#[derive(Default)]
pub struct WriteBatch {
    writes: Vec<(sled::IVec, Option<sled::IVec>)>,
    added: Vec<BodyLocation>,
    released: Vec<BodyLocation>,
    /// The batch writes a schema or a KPI view record.
    registries_changed: bool,
    /// KPI cells written, decoded, for the cache once they are applied ([`kpi_records`]).
    kpi_cells: Vec<Kept<crate::kpi::cell::Cell>>,
    /// The batch removes KPI cells.
    kpi_cells_removed: bool,
    /// Entities as the entry leaves them (written, or read and left as they were), decoded, for
    /// the cache once the writes are applied ([`WriteBatch::keep_entities`]).
    entities: Vec<Kept<EntityState>>,
}

impl WriteBatch {
    fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.writes.push((key.into(), None));
    }

    /// The first half of the writes, as a crash part way through applying them would leave.
    #[cfg(test)]
    pub(crate) fn first_half(mut self) -> WriteBatch {
        let half = self.writes.len() / 2;
        self.writes.truncate(half.max(1));
        WriteBatch {
            writes: self.writes,
            added: Vec::new(),
            released: Vec::new(),
            registries_changed: self.registries_changed,
            kpi_cells: Vec::new(),
            kpi_cells_removed: true,
            entities: Vec::new(),
        }
    }

    /// Hands the entities an entry read or wrote, as it leaves them (key, state, the bytes of the
    /// state's encoding), to the cache once the entry's writes are applied.
    pub(crate) fn keep_entities(
        &mut self,
        entities: impl IntoIterator<Item = (Vec<u8>, EntityState, usize)>,
    ) {
        self.entities
            .extend(
                entities
                    .into_iter()
                    .map(|(key, value, bytes)| Kept { key, value, bytes }),
            );
    }
}

/// What to read: matching, unexpired messages from `from` on, within bounds.
pub struct ReadRange<'a> {
    /// First offset to consider (inclusive).
    pub from: u64,
    /// Last offset to consider (inclusive); `u64::MAX` for none.
    pub to_offset: u64,
    /// Latest publish time to consider (inclusive), µs; `u64::MAX` for none.
    pub to_time_us: u64,
    /// Only messages whose channel matches.
    pub pattern: &'a Pattern,
    /// Messages expired at this time are skipped.
    pub now_us: u64,
    /// Stop after this many messages.
    pub limit: usize,
    /// Stop once the messages read take this many bytes (a page always holds at least one).
    pub max_bytes: usize,
    /// Stop after visiting this many batches, so a sparse pattern cannot make one read scan the
    /// whole store.
    pub max_batches: usize,
}

/// One page of a read.
pub struct ReadPage {
    /// Matching messages, in offset order.
    pub messages: Vec<StoredMessage>,
    /// The offset to continue from.
    pub next: u64,
    /// True when the range is exhausted: nothing at or after `next` is within bounds yet.
    pub done: bool,
}

/// A batch as read back: its key (original first offset) and its remaining messages.
pub struct StoredBatch {
    /// The batch's key: the offset of its first message when it was written.
    pub key: u64,
    /// Messages still stored, in offset order.
    pub messages: Vec<StoredMessage>,
    /// Encoded size, as counted in the stored-bytes total.
    pub encoded_len: usize,
    /// Where its body is.
    location: BodyLocation,
}

fn key(kind: u8, a: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = kind;
    k[1..].copy_from_slice(&a.to_be_bytes());
    k
}

fn key2(kind: u8, a: u64, b: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = kind;
    k[1..9].copy_from_slice(&a.to_be_bytes());
    k[9..].copy_from_slice(&b.to_be_bytes());
    k
}

/// `kind` + `a` + 0 + `b`: the key of a record named by two strings (channel segments and
/// channels never contain a 0 byte, so the split is unambiguous).
fn pair_key(kind: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len() + b.len());
    k.push(kind);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> BrokerError {
    tracing::error!(what, error = %e, "a stored record is damaged; it is not served");
    BrokerError::Corrupt(format!("{what}: {e}"))
}

fn be_u64(bytes: &[u8]) -> Result<u64, BrokerError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| BrokerError::Storage(format!("corrupt key of {} bytes", bytes.len())))
}

/// A consumer record as versions before owners were recorded wrote it: [`ConsumerState`] without
/// its last field.
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ConsumerStateWithoutOwner {
    pattern: String,
    policy: i32,
    acked_offset: u64,
    redeliveries: u64,
    created_at_us: u64,
}

/// A consumer record, in today's layout or the one before owners were recorded (the same bytes
/// without the owner, so it is tried second): such a consumer is owned by nobody, which leaves it
/// to `admin`s rather than to anyone (docs/FLOW.md).
fn decode_consumer(value: &[u8]) -> Result<ConsumerState, BrokerError> {
    let payload = checksum::open(value).map_err(|e| corrupt("consumer", e))?;
    match bincode::deserialize::<ConsumerState>(payload) {
        Ok(state) => Ok(state),
        Err(current) => match bincode::deserialize::<ConsumerStateWithoutOwner>(payload) {
            Ok(old) => Ok(ConsumerState {
                pattern: old.pattern,
                policy: old.policy,
                acked_offset: old.acked_offset,
                redeliveries: old.redeliveries,
                created_at_us: old.created_at_us,
                owner: None,
            }),
            Err(_) => Err(corrupt("consumer", current)),
        },
    }
}

fn decode_location(value: &[u8]) -> Result<BodyLocation, BrokerError> {
    checksum::decode(value).map_err(|e| corrupt("batch location", e))
}

impl MessageStore {
    /// Opens (or creates) the store's tree in `db`, with its batch bodies in `batches_dir`.
    ///
    /// # Errors
    /// The embedded store's error, or the batch files cannot be opened.
    pub fn open(db: &sled::Db, batches_dir: &Path) -> Result<Self, BrokerError> {
        let tree = tree(db)?;
        let mut locations = Vec::new();
        for kv in tree.scan_prefix([BATCH]) {
            let (_, v) = kv?;
            // A damaged location is logged and later refused when read, like any damaged record;
            // it does not stop the start.
            if let Ok(location) = decode_location(&v) {
                locations.push(location);
            }
        }
        let bodies = BatchFiles::open(batches_dir, &locations).map_err(|e| {
            BrokerError::Storage(format!(
                "cannot open the batch files in {}: {e}",
                batches_dir.display()
            ))
        })?;
        Ok(MessageStore {
            tree,
            bodies: Arc::new(bodies),
            registry_generation: Arc::default(),
            compiled_views: Arc::default(),
            kpi_cells_cache: Arc::new(Decoded::new(
                kpi_records::KPI_CELLS_CACHED,
                kpi_records::KPI_CELL_BYTES_CACHED,
            )),
            entities_cache: Arc::new(Decoded::new(ENTITIES_CACHED, ENTITY_BYTES_CACHED)),
        })
    }

    /// Batch files fill up at `bytes` from now on: the step in which the space of expired batches
    /// comes back.
    pub fn set_batch_file_bytes(&self, bytes: u64) {
        self.bodies.set_file_bytes(bytes);
    }

    /// Whether a sync would now remove batch files no batch points into.
    pub fn has_removable_files(&self) -> bool {
        self.bodies.has_removable()
    }

    /// True when the store holds no record at all (a new state folder).
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    fn load_batch(&self, key: &[u8], value: &[u8]) -> Result<StoredBatch, BrokerError> {
        let location = decode_location(value)?;
        let body = self.read_body(&location)?;
        let messages: Vec<StoredMessage> =
            checksum::decode(&body).map_err(|e| corrupt("batch", e))?;
        Ok(StoredBatch {
            key: be_u64(&key[1..])?,
            messages,
            encoded_len: body.len(),
            location,
        })
    }

    fn read_body(&self, location: &BodyLocation) -> Result<Vec<u8>, BrokerError> {
        self.bodies
            .read(location)
            .map_err(|e| corrupt("batch body", e))
    }

    /// Makes every batch body written so far durable, runs `sync_database` (which must make the
    /// tree durable), then frees the batch files no batch points into any more.
    ///
    /// # Errors
    /// Any I/O error; the writes since the last sync are then not known to be durable.
    pub fn sync(&self, sync_database: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        self.bodies.sync(sync_database)
    }

    /// The raw meta record, if any.
    ///
    /// # Errors
    /// The embedded store's error.
    pub fn meta(&self) -> Result<Option<sled::IVec>, BrokerError> {
        Ok(meta(&self.tree)?)
    }

    /// What each key `batch` writes holds now (its first write's before-image), for the undo
    /// record ([`super::undo`]).
    ///
    /// # Errors
    /// The embedded store's error.
    pub(crate) fn before_images(
        &self,
        batch: &WriteBatch,
    ) -> Result<Vec<super::undo::BeforeImage>, BrokerError> {
        let mut seen = std::collections::HashSet::with_capacity(batch.writes.len());
        let mut images = Vec::with_capacity(batch.writes.len());
        for (key, _) in &batch.writes {
            if seen.insert(key.clone()) {
                images.push((key.clone(), self.tree.get(key)?));
            }
        }
        Ok(images)
    }

    /// Applies a batch of writes, in order (not atomically: see the module docs).
    ///
    /// # Errors
    /// The embedded store's error; the tree may then hold part of the batch, and the caller must
    /// not trust it again before undoing it ([`super::undo`]) or rebuilding it.
    pub fn apply(&self, batch: WriteBatch) -> Result<(), BrokerError> {
        let registries_changed = batch.registries_changed;
        if registries_changed || batch.kpi_cells_removed {
            // Before the writes: a failure part way leaves nothing cached that the tree lost.
            self.kpi_cells_cache.forget();
        }
        for (key, value) in batch.writes {
            let written = match value {
                Some(value) => self.tree.insert(key, value),
                None => self.tree.remove(key),
            };
            if let Err(e) = written {
                // The tree holds part of the entry: nothing cached is trusted until it is undone
                // or rebuilt (both replace the store, but this costs nothing).
                self.forget_decoded();
                return Err(e.into());
            }
        }
        self.bodies.commit(&batch.added, &batch.released);
        if registries_changed {
            self.registries_changed();
        }
        self.kpi_cells_cache.keep(batch.kpi_cells);
        self.entities_cache.keep(batch.entities);
        Ok(())
    }

    /// Empties the caches of decoded records ([`decoded`]).
    fn forget_decoded(&self) {
        self.kpi_cells_cache.forget();
        self.entities_cache.forget();
    }

    fn registries_changed(&self) {
        self.registry_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// A number that changes whenever the schema or KPI view records may have: what their
    /// compiled forms compare before trusting what they compiled.
    pub fn registry_generation(&self) -> u64 {
        self.registry_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Removes every record and batch body (before installing a snapshot).
    ///
    /// # Errors
    /// The embedded store's error, or a batch file that cannot be removed.
    pub fn clear(&self) -> Result<(), BrokerError> {
        self.forget_decoded();
        self.tree.clear()?;
        self.registries_changed();
        self.bodies
            .clear()
            .map_err(|e| BrokerError::Storage(format!("cannot remove the batch files: {e}")))
    }

    /// A view of every record as it is now, for a snapshot written while the store goes on
    /// changing (see [`SnapshotView`]). Taken while apply is held; cheap next to the snapshot's
    /// bodies: the records are small (a batch's record is its location).
    ///
    /// # Errors
    /// The embedded store's error.
    pub fn snapshot_view(&self) -> Result<SnapshotView, BrokerError> {
        let hold = self.bodies.hold();
        let records = self.tree.iter().collect::<Result<Vec<_>, sled::Error>>()?;
        Ok(SnapshotView {
            records,
            store: self.clone(),
            _hold: hold,
        })
    }

    /// Writes one record of a snapshot (see [`SnapshotView::records`]).
    ///
    /// # Errors
    /// The embedded store's error, or the batch body cannot be written.
    pub fn insert_snapshot_record(&self, key: &[u8], value: &[u8]) -> Result<(), BrokerError> {
        if key.first() == Some(&BATCH) {
            // The body goes to the batch files; the tree keeps where it is, as `put_batch` does.
            let (location, sealed_location) = self.append_body(value)?;
            self.tree.insert(key, sealed_location)?;
            self.bodies.commit(&[location], &[]);
            return Ok(());
        }
        self.tree.insert(key, value)?;
        match key.first() {
            Some(&SCHEMA | &VIEW) => self.registries_changed(),
            Some(&KPI_CELL) => self.kpi_cells_cache.forget(),
            Some(&ENTITY) => self.entities_cache.forget(),
            _ => {}
        }
        Ok(())
    }

    /// Appends a sealed body to the batch files; returns its location, and the location sealed
    /// as the tree stores it.
    fn append_body(&self, sealed: &[u8]) -> Result<(BodyLocation, Vec<u8>), BrokerError> {
        let location = self
            .bodies
            .append(sealed)
            .map_err(|e| BrokerError::Storage(format!("cannot write a batch body: {e}")))?;
        let value = checksum::encode(&location)
            .map_err(|e| BrokerError::Storage(format!("cannot encode a batch location: {e}")))?;
        Ok((location, value))
    }

    /// Reads the batch stored under `key`.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn batch(&self, key: u64) -> Result<Option<StoredBatch>, BrokerError> {
        let k = self::key(BATCH, key);
        match self.tree.get(k)? {
            Some(v) => self.load_batch(&k, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The oldest stored batch.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn first_batch(&self) -> Result<Option<StoredBatch>, BrokerError> {
        match self.tree.scan_prefix([BATCH]).next() {
            Some(kv) => {
                let (k, v) = kv?;
                self.load_batch(&k, &v).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Batches in offset order, starting with the one that may hold `offset`.
    pub fn batches_from(
        &self,
        offset: u64,
    ) -> Box<dyn Iterator<Item = Result<StoredBatch, BrokerError>> + '_> {
        // The batch holding `offset` starts at or before it: the last batch key <= offset.
        let start = match self
            .tree
            .range(key(BATCH, 0)..=key(BATCH, offset))
            .next_back()
            .transpose()
        {
            Ok(Some((k, _))) => match be_u64(&k[1..]) {
                Ok(start) => start,
                Err(e) => return Box::new(std::iter::once(Err(e))),
            },
            Ok(None) => offset,
            Err(e) => return Box::new(std::iter::once(Err(e.into()))),
        };
        Box::new(
            self.tree
                .range(key(BATCH, start)..=key(BATCH, u64::MAX))
                .map(|kv| {
                    let (k, v) = kv?;
                    self.load_batch(&k, &v)
                }),
        )
    }

    /// Reads one page of `range`. Runs synchronously: sled reads are served from its cache or a
    /// single disk read per batch.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn read(&self, range: &ReadRange<'_>) -> Result<ReadPage, BrokerError> {
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let mut next = range.from;
        for (visited, batch) in self.batches_from(range.from).enumerate() {
            if visited >= range.max_batches {
                return Ok(ReadPage {
                    messages,
                    next,
                    done: false,
                });
            }
            for m in batch?.messages {
                if m.offset < next {
                    continue;
                }
                if m.offset > range.to_offset || m.publish_time_us > range.to_time_us {
                    return Ok(ReadPage {
                        messages,
                        next,
                        done: true,
                    });
                }
                next = m.offset + 1;
                if range.pattern.matches(&m.message.channel) && !m.is_expired(range.now_us) {
                    bytes += m.message.approximate_size();
                    messages.push(m);
                    if messages.len() >= range.limit || bytes >= range.max_bytes {
                        return Ok(ReadPage {
                            messages,
                            next,
                            done: false,
                        });
                    }
                }
            }
        }
        Ok(ReadPage {
            messages,
            next,
            done: true,
        })
    }

    /// Every stored batch, the newest first: for readers that want the latest messages, such as a
    /// schema's compatibility report ([`crate::schema::compat`]). Lazy: a reader that stops early
    /// reads no more.
    pub fn batches_newest_first(
        &self,
    ) -> impl Iterator<Item = Result<StoredBatch, BrokerError>> + '_ {
        self.tree.scan_prefix([BATCH]).rev().map(|kv| {
            let (k, v) = kv?;
            self.load_batch(&k, &v)
        })
    }

    /// The offset of the first message at or after `from`, and at or before `to`, that is still
    /// stored and not expired at `now_us` (whatever its channel); `None` when retention or TTL
    /// removed all of them. Offsets are given to stored messages only, one after the other, so
    /// every offset below the one returned and from `from` on names a removed message.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn first_present_offset(
        &self,
        from: u64,
        to: u64,
        now_us: u64,
    ) -> Result<Option<u64>, BrokerError> {
        for batch in self.batches_from(from) {
            for m in batch?.messages {
                if m.offset < from {
                    continue;
                }
                if m.offset > to {
                    return Ok(None);
                }
                if !m.is_expired(now_us) {
                    return Ok(Some(m.offset));
                }
            }
        }
        Ok(None)
    }

    /// The first offset of the first batch published at or after `time_us`, if any.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn first_offset_at_or_after(&self, time_us: u64) -> Result<Option<u64>, BrokerError> {
        match self
            .tree
            .range(key2(TIME, time_us, 0)..=key2(TIME, u64::MAX, u64::MAX))
            .next()
        {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(Some(be_u64(&k[9..17])?))
            }
            None => Ok(None),
        }
    }

    /// Keys of batches whose earliest expiry is at or before `now_us`, at most `limit` of them.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn expired_batch_keys(&self, now_us: u64, limit: usize) -> Result<Vec<u64>, BrokerError> {
        let mut keys = Vec::new();
        for kv in self
            .tree
            .range(key2(EXPIRY, 0, 0)..=key2(EXPIRY, now_us, u64::MAX))
            .take(limit)
        {
            let (k, _) = kv?;
            keys.push(be_u64(&k[9..17])?);
        }
        Ok(keys)
    }

    /// Keys of batches published before `time_us`, oldest first, at most `limit` of them.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn batch_keys_published_before(
        &self,
        time_us: u64,
        limit: usize,
    ) -> Result<Vec<u64>, BrokerError> {
        let mut keys = Vec::new();
        if time_us == 0 {
            return Ok(keys);
        }
        for kv in self
            .tree
            .range(key2(TIME, 0, 0)..key2(TIME, time_us, 0))
            .take(limit)
        {
            let (k, _) = kv?;
            keys.push(be_u64(&k[9..17])?);
        }
        Ok(keys)
    }

    /// Adds the writes that store `messages` as one batch under `key` to `batch`; returns the
    /// encoded size. `messages` must not be empty and must share one publish time.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub fn put_batch(
        &self,
        batch: &mut WriteBatch,
        key: u64,
        messages: &[StoredMessage],
    ) -> Result<usize, BrokerError> {
        let body = checksum::encode(messages)
            .map_err(|e| BrokerError::Storage(format!("cannot encode batch: {e}")))?;
        let (location, sealed_location) = self.append_body(&body)?;
        batch.insert(&self::key(BATCH, key), sealed_location);
        batch.added.push(location);
        let len = body.len();
        if let Some(first) = messages.first() {
            batch.insert(&key2(TIME, first.publish_time_us, key), &[]);
        }
        if let Some(expiry) = messages.iter().filter_map(|m| m.expires_at_us()).min() {
            batch.insert(&key2(EXPIRY, expiry, key), &[]);
        }
        Ok(len)
    }

    /// Adds the writes that remove the stored batch `old` (its record and index entries); its
    /// body's space is freed once no batch in its file is left.
    pub fn delete_batch(batch: &mut WriteBatch, old: &StoredBatch) {
        batch.released.push(old.location);
        batch.remove(&key(BATCH, old.key));
        if let Some(first) = old.messages.first() {
            batch.remove(&key2(TIME, first.publish_time_us, old.key));
        }
        if let Some(expiry) = old.messages.iter().filter_map(|m| m.expires_at_us()).min() {
            batch.remove(&key2(EXPIRY, expiry, old.key));
        }
    }

    /// The stored message at `offset`, if it is still stored.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn message(&self, offset: u64) -> Result<Option<StoredMessage>, BrokerError> {
        match self.batches_from(offset).next() {
            Some(batch) => Ok(batch?.messages.into_iter().find(|m| m.offset == offset)),
            None => Ok(None),
        }
    }

    /// The message an idempotency key on a channel names: `(offset, publish time µs)`.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn dedup(&self, channel: &str, key: &str) -> Result<Option<DedupRecord>, BrokerError> {
        match self.tree.get(pair_key(DEDUP, channel, key))? {
            Some(v) => checksum::decode(&v)
                .map(Some)
                .map_err(|e| corrupt("dedup record", e)),
            None => Ok(None),
        }
    }

    /// Adds the writes that record `channel`/`key` as naming the message at `offset`.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub fn put_dedup(
        batch: &mut WriteBatch,
        channel: &str,
        key: &str,
        record: &DedupRecord,
    ) -> Result<(), BrokerError> {
        let record_key = pair_key(DEDUP, channel, key);
        let value = checksum::encode(record).map_err(|e| corrupt("dedup record", e))?;
        batch.insert(
            key2(DEDUP_BY_TIME, record.publish_time_us, record.offset).to_vec(),
            record_key.clone(),
        );
        batch.insert(record_key, value);
        Ok(())
    }

    /// Adds the writes that forget dedup records older than `before_us` (at most `limit`);
    /// returns how many. A key reused since keeps its newer record.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn forget_dedup_before(
        &self,
        batch: &mut WriteBatch,
        before_us: u64,
        limit: usize,
    ) -> Result<usize, BrokerError> {
        let mut n = 0;
        for kv in self
            .tree
            .range(key2(DEDUP_BY_TIME, 0, 0)..key2(DEDUP_BY_TIME, before_us, 0))
            .take(limit)
        {
            let (k, record_key) = kv?;
            let offset = be_u64(&k[9..17])?;
            batch.remove(k);
            if let Some(v) = self.tree.get(&record_key)? {
                let current: DedupRecord =
                    checksum::decode(&v).map_err(|e| corrupt("dedup record", e))?;
                if current.offset == offset {
                    batch.remove(record_key);
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// Whether any dedup record is older than `before_us` (so a sweep has something to forget).
    ///
    /// # Errors
    /// The embedded store's error.
    pub fn has_dedup_before(&self, before_us: u64) -> Result<bool, BrokerError> {
        Ok(self
            .tree
            .range(key2(DEDUP_BY_TIME, 0, 0)..key2(DEDUP_BY_TIME, before_us, 0))
            .next()
            .transpose()?
            .is_some())
    }

    /// An entity's state, if it was ever written.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn entity(&self, entity_type: &str, id: &str) -> Result<Option<EntityState>, BrokerError> {
        Ok(self
            .read_entity(&pair_key(ENTITY, entity_type, id))?
            .map(|(state, _)| state))
    }

    /// The key an entity's state is stored under.
    pub(crate) fn entity_key(entity_type: &str, id: &str) -> Vec<u8> {
        pair_key(ENTITY, entity_type, id)
    }

    fn read_entity(&self, key: &[u8]) -> Result<Option<(EntityState, usize)>, BrokerError> {
        match self.tree.get(key)? {
            Some(v) => checksum::decode(&v)
                .map(|state| Some((state, v.len())))
                .map_err(|e| corrupt("entity", e)),
            None => Ok(None),
        }
    }

    /// The entity stored under `key` ([`Self::entity_key`]) as the last applied entry left it,
    /// for apply to merge into, with the bytes of its encoding: taken out of the cache, or read.
    /// The entry hands it back ([`WriteBatch::keep_entities`]).
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub(crate) fn entity_to_change(
        &self,
        key: &[u8],
    ) -> Result<Option<(EntityState, usize)>, BrokerError> {
        match self.entities_cache.take(key) {
            Some(cached) => Ok(Some(cached)),
            None => self.read_entity(key),
        }
    }

    /// Every stored entity whose type is `entity_type` (all types when `None`), in key order:
    /// `(type, id, state)`.
    pub fn entities(
        &self,
        entity_type: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, String, EntityState), BrokerError>> + Send + 'static
    {
        let prefix = match entity_type {
            Some(t) => pair_key(ENTITY, t, ""),
            None => vec![ENTITY],
        };
        self.tree.scan_prefix(prefix).map(|kv| {
            let (k, v) = kv?;
            let name = std::str::from_utf8(&k[1..]).map_err(|e| corrupt("entity key", e))?;
            let (t, id) = name
                .split_once('\0')
                .ok_or_else(|| corrupt("entity key", "no separator"))?;
            let state = checksum::decode(&v).map_err(|e| corrupt("entity", e))?;
            Ok((t.to_owned(), id.to_owned(), state))
        })
    }

    /// Adds the write of an entity's state under `key` ([`Self::entity_key`]); returns the bytes
    /// of its encoding.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub(crate) fn put_entity(
        batch: &mut WriteBatch,
        key: &[u8],
        state: &EntityState,
    ) -> Result<usize, BrokerError> {
        let value = checksum::encode(state).map_err(|e| corrupt("entity", e))?;
        let bytes = value.len();
        batch.insert(key, value);
        Ok(bytes)
    }

    /// A durable consumer's state.
    ///
    /// # Errors
    /// The embedded store's error, or a corrupt record.
    pub fn consumer(&self, name: &str) -> Result<Option<ConsumerState>, BrokerError> {
        let mut k = vec![CONSUMER];
        k.extend_from_slice(name.as_bytes());
        match self.tree.get(k)? {
            Some(v) => decode_consumer(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Every durable consumer, by name.
    pub fn consumers(
        &self,
    ) -> impl Iterator<Item = Result<(String, ConsumerState), BrokerError>> + '_ {
        self.tree.scan_prefix([CONSUMER]).map(|kv| {
            let (k, v) = kv?;
            let name =
                String::from_utf8(k[1..].to_vec()).map_err(|e| corrupt("consumer key", e))?;
            Ok((name, decode_consumer(&v)?))
        })
    }

    /// Adds the write (or, with `None`, the removal) of a consumer.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub fn put_consumer(
        batch: &mut WriteBatch,
        name: &str,
        state: Option<&ConsumerState>,
    ) -> Result<(), BrokerError> {
        let mut k = vec![CONSUMER];
        k.extend_from_slice(name.as_bytes());
        match state {
            Some(state) => {
                let value = checksum::encode(state).map_err(|e| corrupt("consumer", e))?;
                batch.insert(k, value);
            }
            None => batch.remove(k),
        }
        Ok(())
    }

    /// The schema registered for `pattern` at `version`.
    ///
    /// # Errors
    /// The embedded store's error, or a damaged record.
    pub fn schema(
        &self,
        pattern: &str,
        version: &str,
    ) -> Result<Option<SchemaRecord>, BrokerError> {
        match self.tree.get(pair_key(SCHEMA, pattern, version))? {
            Some(v) => checksum::decode(&v)
                .map(Some)
                .map_err(|e| corrupt("schema", e)),
            None => Ok(None),
        }
    }

    /// Every registered schema as (pattern, version, record), in key order.
    pub fn schemas(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, SchemaRecord), BrokerError>> + '_ {
        self.tree.scan_prefix([SCHEMA]).map(|kv| {
            let (k, v) = kv?;
            let name = std::str::from_utf8(&k[1..]).map_err(|e| corrupt("schema key", e))?;
            let (pattern, version) = name
                .split_once('\0')
                .ok_or_else(|| corrupt("schema key", "no separator"))?;
            let record = checksum::decode(&v).map_err(|e| corrupt("schema", e))?;
            Ok((pattern.to_owned(), version.to_owned(), record))
        })
    }

    /// Adds the write (or, with `None`, the removal) of a schema registration.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub fn put_schema(
        batch: &mut WriteBatch,
        pattern: &str,
        version: &str,
        record: Option<&SchemaRecord>,
    ) -> Result<(), BrokerError> {
        let k = pair_key(SCHEMA, pattern, version);
        match record {
            Some(record) => {
                let value = checksum::encode(record).map_err(|e| corrupt("schema", e))?;
                batch.insert(k, value);
            }
            None => batch.remove(k),
        }
        batch.registries_changed = true;
        Ok(())
    }

    /// Adds the write of the meta record.
    pub fn put_meta(batch: &mut WriteBatch, meta: &[u8]) {
        batch.insert(META, meta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Owner;

    #[test]
    fn a_consumer_written_before_owners_were_recorded_reads_as_owned_by_nobody() {
        let old = ConsumerStateWithoutOwner {
            pattern: "a.>".into(),
            policy: 1,
            acked_offset: 7,
            redeliveries: 2,
            created_at_us: 1_000,
        };
        let sealed = checksum::encode(&old).unwrap();
        let state = decode_consumer(&sealed).unwrap();
        assert_eq!(
            state,
            ConsumerState {
                pattern: "a.>".into(),
                policy: 1,
                acked_offset: 7,
                redeliveries: 2,
                created_at_us: 1_000,
                owner: None,
            }
        );
        let owned = ConsumerState {
            owner: Some(Owner {
                issuer: "https://idp.test".into(),
                subject: "alice".into(),
            }),
            ..state
        };
        assert_eq!(
            decode_consumer(&checksum::encode(&owned).unwrap()).unwrap(),
            owned
        );
        // Damage is still damage, in either layout.
        let mut damaged = sealed;
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            decode_consumer(&damaged),
            Err(BrokerError::Corrupt(_))
        ));
        assert!(matches!(
            decode_consumer(&checksum::seal(&[1, 2, 3])),
            Err(BrokerError::Corrupt(_))
        ));
    }
}
