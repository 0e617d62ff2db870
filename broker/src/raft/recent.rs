//! The entries just appended to the log, kept in memory until their first reader takes them.
//!
//! openraft 0.9 applies committed entries by reading them back from the log store, so every entry
//! was encoded into its segment and then read, checked and decoded again to be applied: 6.8% of
//! the broker's CPU in benchmark W1 (docs/BENCHMARKS.md). An append keeps its entries here as
//! they are, and the first read of a range that is wholly here takes them out instead. Any later
//! read of the same entries (a second follower's replication, a retry) goes to the segments as
//! before: the files stay the only record, and this only saves work.
//!
//! What is kept is always a suffix of the log (or nothing), so "wholly here" is a range check:
//! an append that does not follow the last kept entry, a truncation, a purge and a take all keep
//! it so. Bounded in entries and in bytes (as encoded in the segment); past either bound the
//! oldest go first.

use std::collections::VecDeque;

use openraft::Entry;

use super::TypeConfig;

/// Most entries kept: a lone node applies an entry within a sync round of appending it, so a few
/// are enough; the rest of the bound is for a moment of lag.
const MAX_ENTRIES: usize = 64;

/// Most bytes kept, counted as the entries' encoded lengths in the segment: an entry can be as
/// large as `proposer.max_batch_bytes` (4 MiB by default).
const MAX_BYTES: usize = 16 << 20;

/// Appended entries not yet read, oldest first.
#[derive(Default)]
pub(super) struct RecentEntries {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) -> Option<Entry<TypeConfig>> {
        let (entry, size) = self.entries.pop_front()?;
        self.bytes -= size;
        Some(entry)
    }

    /// Keeps `appended`, which were just written after every entry already in the log, in order,
    /// with `lengths`, their encoded lengths in the segment.
    pub(super) fn push(&mut self, appended: Vec<Entry<TypeConfig>>, lengths: &[u32]) {
        let Some(first) = appended.first().map(|e| e.log_id.index) else {
            return;
        };
        if lengths.len() != appended.len() {
            // Kept entries must end where the log does: without a length for each, keep none.
            self.clear();
            return;
        }
        if self.last_index().is_some_and(|last| last + 1 != first) {
            self.clear();
        }
        for (entry, length) in appended.into_iter().zip(lengths) {
            let size = *length as usize;
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > MAX_ENTRIES || self.bytes > MAX_BYTES {
            self.pop_front();
        }
    }

    /// The entries with indexes in `start..end` if every one of them is here (and at least one
    /// is asked for), taken out together with every older one; otherwise `None`, and nothing
    /// changes. `end` may lie past the log's end (an unbounded read), as the kept entries end
    /// where the log does.
    pub(super) fn take(&mut self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first || start > last || end <= start {
            return None;
        }
        while self.first_index().is_some_and(|i| i < start) {
            self.pop_front();
        }
        let mut taken = Vec::new();
        while self.first_index().is_some_and(|i| i < end) {
            taken.extend(self.pop_front());
        }
        Some(taken)
    }

    /// Forgets the entries at `index` and after (the log was cut there).
    pub(super) fn truncate(&mut self, index: u64) {
        while self.last_index().is_some_and(|i| i >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets the entries at `index` and before (the log was purged up to there).
    pub(super) fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|i| i <= index) {
            self.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        indexes.map(entry).collect()
    }

    /// Appends the entries `indexes`, each `length` bytes long in the segment.
    fn push(recent: &mut RecentEntries, indexes: std::ops::RangeInclusive<u64>, length: u32) {
        let appended = entries(indexes);
        let lengths = vec![length; appended.len()];
        recent.push(appended, &lengths);
    }

    fn indexes(entries: &[Entry<TypeConfig>]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn a_range_wholly_kept_is_taken_once_with_everything_older() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=3, 100);
        push(&mut recent, 4..=5, 100);
        assert_eq!(indexes(&recent.take(2, 4).unwrap()), vec![2, 3]);
        // Taken (and entry 1 with them): the next read of them goes to the files.
        assert!(recent.take(2, 4).is_none());
        assert!(recent.take(1, 2).is_none());
        // An unbounded read ends where the log does.
        assert_eq!(indexes(&recent.take(4, u64::MAX).unwrap()), vec![4, 5]);
        assert!(recent.take(6, u64::MAX).is_none());
    }

    #[test]
    fn a_range_that_starts_before_the_kept_entries_is_not_served() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 5..=6, 100);
        assert!(recent.take(4, 6).is_none());
        assert_eq!(indexes(&recent.take(5, 7).unwrap()), vec![5, 6]);
    }

    #[test]
    fn an_append_that_does_not_follow_starts_over() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=3, 100);
        push(&mut recent, 7..=8, 100);
        assert!(recent.take(1, 4).is_none());
        assert_eq!(indexes(&recent.take(7, 9).unwrap()), vec![7, 8]);
    }

    #[test]
    fn truncate_and_purge_keep_a_suffix_of_the_log() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=6, 100);
        recent.truncate(5);
        recent.purge(2);
        assert!(
            recent.take(5, 6).is_none(),
            "cut off: 5 is no longer the one appended"
        );
        push(&mut recent, 5..=5, 100);
        assert_eq!(indexes(&recent.take(3, u64::MAX).unwrap()), vec![3, 4, 5]);
    }

    #[test]
    fn the_oldest_go_past_the_byte_bound() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=3, (MAX_BYTES / 2) as u32);
        assert!(recent.take(1, 2).is_none(), "three halves do not fit");
        assert_eq!(indexes(&recent.take(2, u64::MAX).unwrap()), vec![2, 3]);
    }

    #[test]
    fn an_append_without_a_length_for_each_entry_keeps_nothing() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=2, 100);
        recent.push(entries(3..=4), &[100]);
        assert!(recent.take(1, u64::MAX).is_none());
    }

    #[test]
    fn the_oldest_go_past_the_entry_bound() {
        let mut recent = RecentEntries::default();
        push(&mut recent, 1..=(MAX_ENTRIES as u64 + 10), 100);
        assert!(recent.take(1, 2).is_none());
        let kept = recent.take(11, u64::MAX).unwrap();
        assert_eq!(kept.len(), MAX_ENTRIES);
    }
}
