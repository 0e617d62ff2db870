//! Records as the last applied entries left them, kept decoded, so the next entry that changes
//! one need not read and decode it from the tree again: the KPI cells a fold adds to, the
//! entities an update merges into.
//!
//! Apply *takes* a record out ([`Decoded::take`]) and its entry's [`WriteBatch`](super::WriteBatch)
//! hands it back, as that entry left it, once the entry's writes are in the tree
//! ([`Decoded::keep`]). So the cache never holds what an entry decided before the tree holds it: an
//! entry refused, discarded or failed part way leaves the record out, and the next one reads the
//! tree. What replaces records behind apply's back (a clear, a snapshot's records, removals the
//! cache does not follow) empties it ([`Decoded::forget`]).
//!
//! Bounded by records and by the bytes their encodings take; past either bound it starts over
//! (a working set larger than the bound reads the tree, as it would without the cache).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A record handed back to the cache: its key, its decoded value, and the bytes its encoding
/// takes (what the bound counts).
pub(crate) struct Kept<V> {
    pub key: Vec<u8>,
    pub value: V,
    pub bytes: usize,
}

struct Held<V> {
    records: HashMap<Vec<u8>, (V, usize)>,
    bytes: usize,
}

/// See the module docs.
pub(crate) struct Decoded<V> {
    held: Mutex<Held<V>>,
    max_records: usize,
    max_bytes: usize,
}

impl<V> Decoded<V> {
    /// A cache of at most `max_records` records whose encodings take at most `max_bytes`.
    pub(crate) fn new(max_records: usize, max_bytes: usize) -> Decoded<V> {
        Decoded {
            held: Mutex::new(Held {
                records: HashMap::new(),
                bytes: 0,
            }),
            max_records,
            max_bytes,
        }
    }

    fn held(&self) -> MutexGuard<'_, Held<V>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record under `key` as the last applied entry left it, taken out, with the bytes its
    /// encoding takes; `None` when it is not cached.
    pub(crate) fn take(&self, key: &[u8]) -> Option<(V, usize)> {
        let mut held = self.held();
        let taken = held.records.remove(key)?;
        held.bytes -= taken.1;
        Some(taken)
    }

    /// Keeps the records of an applied entry, in order (a later one of the same key wins).
    pub(crate) fn keep(&self, records: impl IntoIterator<Item = Kept<V>>) {
        let mut records = records.into_iter().peekable();
        if records.peek().is_none() {
            return;
        }
        let mut held = self.held();
        for Kept { key, value, bytes } in records {
            if bytes > self.max_bytes {
                held.bytes -= held.records.remove(&key).map_or(0, |(_, b)| b);
                continue;
            }
            if let Some((_, before)) = held.records.remove(&key) {
                held.bytes -= before;
            }
            if held.records.len() >= self.max_records || held.bytes + bytes > self.max_bytes {
                held.records.clear();
                held.bytes = 0;
            }
            held.bytes += bytes;
            held.records.insert(key, (value, bytes));
        }
    }

    /// Empties the cache.
    pub(crate) fn forget(&self) {
        let mut held = self.held();
        held.records.clear();
        held.bytes = 0;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.held().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(key: &str, value: u32, bytes: usize) -> Kept<u32> {
        Kept {
            key: key.as_bytes().to_vec(),
            value,
            bytes,
        }
    }

    #[test]
    fn a_taken_record_is_gone_until_kept_again() {
        let cache = Decoded::new(10, 1_000);
        cache.keep([kept("a", 1, 10), kept("a", 2, 20)]);
        assert_eq!(cache.take(b"a"), Some((2, 20)), "the later one wins");
        assert_eq!(cache.take(b"a"), None);
        cache.keep([kept("a", 3, 10)]);
        cache.forget();
        assert_eq!(cache.take(b"a"), None);
    }

    #[test]
    fn past_either_bound_it_starts_over() {
        let cache = Decoded::new(2, 100);
        cache.keep([kept("a", 1, 10), kept("b", 2, 10), kept("c", 3, 10)]);
        assert_eq!(cache.len(), 1, "by records");
        assert_eq!(cache.take(b"c"), Some((3, 10)));
        cache.keep([kept("a", 1, 60), kept("b", 2, 60)]);
        assert_eq!(
            (cache.len(), cache.take(b"b")),
            (1, Some((2, 60))),
            "by bytes"
        );
        cache.keep([kept("a", 1, 10), kept("a", 2, 101)]);
        assert_eq!(
            cache.take(b"a"),
            None,
            "too large to keep, and the older is stale"
        );
        // Replacing a record counts its bytes once.
        for value in 0..50 {
            cache.keep([kept("a", value, 60)]);
        }
        assert_eq!(cache.take(b"a"), Some((49, 60)));
    }
}
