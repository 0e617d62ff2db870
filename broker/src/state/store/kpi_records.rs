//! The store's records of KPI views ([`crate::kpi`]): each view's definition, and its cells.
//!
//! ```text
//! v <name>                                              → ViewRecord
//! q <name> 0x00 <length s: u32 BE> <start s: u64 BE> <group key> → Cell
//! ```
//!
//! A cell's key sorts by view, window length, then window start, so a window's cells are one
//! prefix and the windows before a time are one range.

use std::sync::Arc;

use super::{corrupt, Kept, MessageStore, WriteBatch, KPI_CELL, VIEW};
use crate::checksum;
use crate::error::BrokerError;
use crate::kpi::cell::{Cell, Group};
use crate::kpi::{CompiledViews, ViewDefinition, ViewRecord};

/// Cells the cache keeps decoded at most: the cells a busy view set touches per entry (views ×
/// windows × active groups); past it (or past the bytes bound) the cache starts over.
pub(super) const KPI_CELLS_CACHED: usize = 1024;
/// Bytes the cached cells may hold decoded ([`Cell::heap_size`]): a cell's sketches hold a count
/// for every bucket between their lowest and highest value (16 KB per sign and measure at most,
/// a few KB for typical measures), so the cell count alone would not bound it.
pub(super) const KPI_CELL_BYTES_CACHED: usize = 16 << 20;

fn view_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(VIEW);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The prefix of every cell of view `name` (its name ends with the 0 byte, which names never
/// hold, so one view's prefix is never another's).
fn view_cells_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + name.len() + 12);
    push_view_cells_prefix(&mut key, name);
    key
}

fn push_view_cells_prefix(key: &mut Vec<u8>, name: &str) {
    key.push(KPI_CELL);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
}

/// Bytes of the prefix of a view's cells of one window length: [`view_cells_prefix`] and the
/// length.
fn length_prefix_len(name: &str) -> usize {
    name.len() + 2 + 4
}

impl MessageStore {
    /// The view named `name`.
    ///
    /// # Errors
    /// The embedded store's error, or a damaged record.
    pub(crate) fn view(&self, name: &str) -> Result<Option<ViewRecord>, BrokerError> {
        match self.tree.get(view_key(name))? {
            Some(v) => checksum::decode(&v)
                .map(Some)
                .map_err(|e| corrupt("KPI view", e)),
            None => Ok(None),
        }
    }

    /// Every view as (name, record), in name order.
    pub(crate) fn views(
        &self,
    ) -> impl Iterator<Item = Result<(String, ViewRecord), BrokerError>> + '_ {
        self.tree.scan_prefix([VIEW]).map(|kv| {
            let (k, v) = kv?;
            let name = std::str::from_utf8(&k[1..]).map_err(|e| corrupt("KPI view key", e))?;
            let record = checksum::decode(&v).map_err(|e| corrupt("KPI view", e))?;
            Ok((name.to_owned(), record))
        })
    }

    /// Adds the write (or, with `None`, the removal) of view `name`'s record.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub(crate) fn put_view(
        batch: &mut WriteBatch,
        name: &str,
        record: Option<&ViewRecord>,
    ) -> Result<(), BrokerError> {
        let key = view_key(name);
        match record {
            Some(record) => {
                let value = checksum::encode(record).map_err(|e| corrupt("KPI view", e))?;
                batch.insert(key, value);
            }
            None => batch.remove(key),
        }
        batch.registries_changed = true;
        Ok(())
    }

    /// The views compiled, for apply: compiled again only when a view record may have changed
    /// since ([`MessageStore::registry_generation`]). A record that no longer reads as a view
    /// (it was checked before it was written, so only damage does that) is left out and logged.
    ///
    /// # Errors
    /// The embedded store's error.
    pub(crate) fn compiled_views(&self) -> Result<Arc<CompiledViews>, BrokerError> {
        let generation = self.registry_generation();
        let mut cached = self
            .compiled_views
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, views)) = cached.as_ref() {
            if *at == generation {
                return Ok(Arc::clone(views));
            }
        }
        let mut views = Vec::new();
        for entry in self.views() {
            match entry.and_then(|(name, record)| {
                ViewDefinition::parse(&record.definition)
                    .map_err(|e| corrupt("KPI view", format!("{name}: {e}")))
            }) {
                Ok(view) => views.push(view),
                Err(e) => tracing::error!(error = %e, "a KPI view is left out"),
            }
        }
        let compiled = Arc::new(CompiledViews::new(views));
        *cached = Some((generation, Arc::clone(&compiled)));
        Ok(compiled)
    }

    /// The key prefix of every cell of view `name`.
    pub(crate) fn kpi_view_prefix(name: &str) -> Vec<u8> {
        view_cells_prefix(name)
    }

    /// The key prefix of view `name`'s cells in the window of `length_s` starting at `start_s`.
    pub(crate) fn kpi_window_prefix(name: &str, length_s: u32, start_s: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(name.len() + 14);
        Self::kpi_window_prefix_into(&mut key, name, length_s, start_s);
        key
    }

    /// [`Self::kpi_window_prefix`], appended to `key`.
    pub(crate) fn kpi_window_prefix_into(
        key: &mut Vec<u8>,
        name: &str,
        length_s: u32,
        start_s: u64,
    ) {
        push_view_cells_prefix(key, name);
        key.extend_from_slice(&length_s.to_be_bytes());
        key.extend_from_slice(&start_s.to_be_bytes());
    }

    /// The cell stored under `key` (a window prefix and a group key).
    ///
    /// # Errors
    /// The embedded store's error, or a damaged cell.
    pub(crate) fn kpi_cell(&self, key: &[u8]) -> Result<Option<Cell>, BrokerError> {
        match self.tree.get(key)? {
            Some(v) => Cell::decode(&v)
                .map(Some)
                .map_err(|e| corrupt("KPI cell", e)),
            None => Ok(None),
        }
    }

    /// Adds the write of `cell` under `key`; once applied, the cell stays decoded in the cache
    /// for the next entry.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub(crate) fn put_kpi_cell(
        batch: &mut WriteBatch,
        key: Vec<u8>,
        cell: Cell,
    ) -> Result<(), BrokerError> {
        let value = cell.encode().map_err(|e| corrupt("KPI cell", e))?;
        // Counted decoded: a dense sketch holds more than its encoding when its values are few
        // and far apart.
        let bytes = cell.heap_size();
        batch.insert(key.clone(), value);
        batch.kpi_cells.push(Kept {
            key,
            value: cell,
            bytes,
        });
        Ok(())
    }

    /// The cell under `key` as the last applied entry left it, taken out of the cache (the fold
    /// that takes it writes it back with its entry); `None` when it is not cached.
    pub(crate) fn take_cached_kpi_cell(&self, key: &[u8]) -> Option<Cell> {
        self.kpi_cells_cache.take(key).map(|(cell, _)| cell)
    }

    /// Named groups in the window at `prefix`, counting up to `cap` (no need to count further).
    ///
    /// # Errors
    /// The embedded store's error.
    pub(crate) fn kpi_named_groups(&self, prefix: &[u8], cap: u32) -> Result<u32, BrokerError> {
        let mut named = prefix.to_vec();
        named.push(Group::named_tag());
        let mut count = 0;
        for kv in self.tree.scan_prefix(named) {
            kv?;
            count += 1;
            if count >= cap {
                break;
            }
        }
        Ok(count)
    }

    /// Adds the removal of view `name`'s cells of `length_s` in windows starting before
    /// `before_s`. Returns how many.
    ///
    /// # Errors
    /// The embedded store's error.
    pub(crate) fn remove_kpi_windows_before(
        &self,
        batch: &mut WriteBatch,
        name: &str,
        length_s: u32,
        before_s: u64,
    ) -> Result<u64, BrokerError> {
        let start = Self::kpi_window_prefix(name, length_s, 0);
        let end = Self::kpi_window_prefix(name, length_s, before_s);
        let mut removed = 0;
        for kv in self.tree.range(start..end) {
            let (key, _) = kv?;
            batch.remove(key);
            removed += 1;
        }
        batch.kpi_cells_removed |= removed > 0;
        Ok(removed)
    }

    /// Adds the removal of every cell of view `name`. Returns how many.
    ///
    /// # Errors
    /// The embedded store's error.
    pub(crate) fn remove_kpi_cells(
        &self,
        batch: &mut WriteBatch,
        name: &str,
    ) -> Result<u64, BrokerError> {
        let mut removed = 0;
        for kv in self.tree.scan_prefix(view_cells_prefix(name)) {
            let (key, _) = kv?;
            batch.remove(key);
            removed += 1;
        }
        // Even with none stored: cells of this view may be cached from an entry before.
        batch.kpi_cells_removed = true;
        Ok(removed)
    }

    /// View `name`'s cells of `length_s` in the windows starting from `from_s` to `to_s`
    /// (inclusive), as (window start, group, cell), in window then group order.
    ///
    /// # Errors
    /// The embedded store's error, or a damaged cell.
    pub(crate) fn kpi_cells(
        &self,
        name: &str,
        length_s: u32,
        from_s: u64,
        to_s: u64,
    ) -> Result<Vec<(u64, Group, Cell)>, BrokerError> {
        let start = Self::kpi_window_prefix(name, length_s, from_s);
        let end = Self::kpi_window_prefix(name, length_s, to_s.saturating_add(1));
        let skip = length_prefix_len(name);
        let mut cells = Vec::new();
        for kv in self.tree.range(start..end) {
            let (key, value) = kv?;
            let rest = &key[skip..];
            let (window, group) = rest
                .split_at_checked(8)
                .ok_or_else(|| corrupt("KPI cell key", "too short"))?;
            let window = u64::from_be_bytes(
                window
                    .try_into()
                    .map_err(|_| corrupt("KPI cell key", "too short"))?,
            );
            let group =
                Group::from_key(group).ok_or_else(|| corrupt("KPI cell key", "a bad group"))?;
            let cell = Cell::decode(&value).map_err(|e| corrupt("KPI cell", e))?;
            cells.push((window, group, cell));
        }
        Ok(cells)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_cells_count_what_they_hold_decoded() {
        // Eight measures whose values span the widest sketch: a few hundred bytes encoded,
        // ~256 KB decoded.
        let mut cell = Cell::new(8);
        for stats in &mut cell.measures {
            for v in [1e-6, 1e6, -1e-6, -1e6] {
                stats.add(v);
            }
        }
        let encoded = cell.encode().unwrap().len();
        let decoded = cell.heap_size();
        assert!(
            decoded > 100 * encoded,
            "{decoded} decoded, {encoded} encoded"
        );
        let mut batch = WriteBatch::default();
        MessageStore::put_kpi_cell(&mut batch, b"q-key".to_vec(), cell).unwrap();
        assert_eq!(batch.kpi_cells[0].bytes, decoded);
        // So the cache's bytes bound holds at most 64 such cells, not 1,024.
        assert!(KPI_CELL_BYTES_CACHED / decoded <= 64);
    }
}
