//! A cell: what one view holds for one group in one window — the messages counted and, per
//! measure, count, sum, min, max and a quantile sketch. Every value a KPI answers with is read
//! from cells; none keeps the values themselves.

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;

/// Which group a cell belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Group {
    /// The message had no value for the view's `group_by` (or the view has none).
    Missing,
    /// Messages of groups past the view's `max_groups` in this window.
    Other,
    /// A group by its value.
    Named(String),
}

impl Group {
    const MISSING: u8 = 0;
    const OTHER: u8 = 1;
    const NAMED: u8 = 2;

    /// The group as the last part of a cell's key: a tag byte, then a name's bytes.
    pub(crate) fn to_key(&self, out: &mut Vec<u8>) {
        match self {
            Group::Missing => out.push(Self::MISSING),
            Group::Other => out.push(Self::OTHER),
            Group::Named(name) => {
                out.push(Self::NAMED);
                out.extend_from_slice(name.as_bytes());
            }
        }
    }

    /// Reads [`Group::to_key`]'s bytes; `None` when they are not such bytes.
    pub(crate) fn from_key(bytes: &[u8]) -> Option<Group> {
        match bytes.split_first()? {
            (&Self::MISSING, []) => Some(Group::Missing),
            (&Self::OTHER, []) => Some(Group::Other),
            (&Self::NAMED, name) => std::str::from_utf8(name)
                .ok()
                .map(|n| Group::Named(n.to_owned())),
            _ => None,
        }
    }

    /// The key tag of named groups (to count them by prefix).
    pub(crate) const fn named_tag() -> u8 {
        Self::NAMED
    }
}

/// One measure's values in a cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Stats {
    /// Values added.
    pub(crate) count: u64,
    /// Their sum.
    pub(crate) sum: f64,
    /// The smallest (meaningful only when `count > 0`).
    pub(crate) min: f64,
    /// The largest (meaningful only when `count > 0`).
    pub(crate) max: f64,
    /// Their distribution, for quantiles.
    pub(crate) sketch: Sketch,
}

impl Stats {
    /// Adds a finite value (others are not numbers a KPI can use, and are left out).
    pub(crate) fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += 1;
        self.sum += value;
        self.sketch.add(value);
    }

    /// Adds every value of `other` (combining windows or groups; no reader does yet).
    #[cfg(test)]
    pub(crate) fn merge(&mut self, other: &Stats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.sum += other.sum;
        self.sketch.merge(&other.sketch);
    }

    /// The mean, when there are values.
    pub(crate) fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The `q` quantile within the sketch's relative error, kept inside the exact min and max.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let estimate = self.sketch.quantile(q)?;
        Some(estimate.clamp(self.min, self.max))
    }
}

/// A view's values for one group in one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Cell {
    /// Messages counted.
    pub(crate) messages: u64,
    /// One per measure of the view, in its order.
    pub(crate) measures: Vec<Stats>,
}

/// [`Cell`] as stored: the sketches as their compact bytes.
#[derive(Serialize, Deserialize)]
struct StoredCell {
    messages: u64,
    measures: Vec<StoredStats>,
}

#[derive(Serialize, Deserialize)]
struct StoredStats {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// [`Sketch::to_bytes`]. `Bytes` is written as one byte string where a `Vec<u8>` is written
    /// byte by byte; bincode lays both out the same way (a length, then the bytes).
    sketch: bytes::Bytes,
}

impl Cell {
    /// An empty cell for a view with `measures` measures.
    pub(crate) fn new(measures: usize) -> Cell {
        Cell {
            messages: 0,
            measures: vec![Stats::default(); measures],
        }
    }

    /// Adds every value of `other`.
    #[cfg(test)]
    pub(crate) fn merge(&mut self, other: &Cell) {
        self.messages += other.messages;
        if self.measures.len() < other.measures.len() {
            self.measures.resize(other.measures.len(), Stats::default());
        }
        for (mine, theirs) in self.measures.iter_mut().zip(&other.measures) {
            mine.merge(theirs);
        }
    }

    /// Bytes the cell holds on the heap, about (its measures and their sketches' buckets).
    pub(crate) fn heap_size(&self) -> usize {
        self.measures.len() * std::mem::size_of::<Stats>()
            + self
                .measures
                .iter()
                .map(|m| m.sketch.heap_size())
                .sum::<usize>()
    }

    /// The cell as serde data for the store's sealed encoding.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, bincode::Error> {
        crate::checksum::encode(&StoredCell {
            messages: self.messages,
            measures: self
                .measures
                .iter()
                .map(|s| StoredStats {
                    count: s.count,
                    sum: s.sum,
                    min: s.min,
                    max: s.max,
                    sketch: s.sketch.to_bytes().into(),
                })
                .collect(),
        })
    }

    /// Reads [`Cell::encode`]'s bytes.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Cell, String> {
        let stored: StoredCell = crate::checksum::decode(bytes).map_err(|e| e.to_string())?;
        let measures = stored
            .measures
            .into_iter()
            .map(|s| {
                Ok(Stats {
                    count: s.count,
                    sum: s.sum,
                    min: s.min,
                    max: s.max,
                    sketch: Sketch::from_bytes(&s.sketch).ok_or("a damaged sketch")?,
                })
            })
            .collect::<Result<_, &str>>()?;
        Ok(Cell {
            messages: stored.messages,
            measures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_exact_except_quantiles_which_stay_within_min_and_max() {
        let mut stats = Stats::default();
        for v in [3.0, 1.0, 2.0, f64::NAN] {
            stats.add(v);
        }
        assert_eq!(
            (stats.count, stats.sum, stats.min, stats.max),
            (3, 6.0, 1.0, 3.0)
        );
        assert_eq!(stats.avg(), Some(2.0));
        let p100 = stats.quantile(1.0).unwrap();
        assert!((2.97..=3.0).contains(&p100), "{p100}");
        assert_eq!(Stats::default().avg(), None);
        assert_eq!(Stats::default().quantile(0.5), None);
    }

    #[test]
    fn cells_merge_and_round_trip() {
        let mut a = Cell::new(1);
        a.messages = 2;
        a.measures[0].add(5.0);
        let mut b = Cell::new(1);
        b.messages = 1;
        b.measures[0].add(-1.0);
        a.merge(&b);
        assert_eq!(a.messages, 3);
        assert_eq!((a.measures[0].min, a.measures[0].max), (-1.0, 5.0));
        let bytes = a.encode().unwrap();
        assert_eq!(Cell::decode(&bytes).unwrap(), a);
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(Cell::decode(&damaged).is_err());
    }

    #[test]
    fn cells_stored_with_the_sketch_as_a_byte_vector_still_read() {
        // The layout cells were first stored in: the sketch serialized as a `Vec<u8>`.
        #[derive(Serialize)]
        struct Before {
            messages: u64,
            measures: Vec<(u64, f64, f64, f64, Vec<u8>)>,
        }
        let mut cell = Cell::new(1);
        cell.messages = 4;
        for v in [1.0, 2.5, 1e6] {
            cell.measures[0].add(v);
        }
        let s = &cell.measures[0];
        let before = crate::checksum::encode(&Before {
            messages: 4,
            measures: vec![(s.count, s.sum, s.min, s.max, s.sketch.to_bytes())],
        })
        .unwrap();
        assert_eq!(before, cell.encode().unwrap());
        assert_eq!(Cell::decode(&before).unwrap(), cell);
    }

    #[test]
    fn groups_round_trip_through_their_key() {
        for group in [
            Group::Missing,
            Group::Other,
            Group::Named(String::new()),
            Group::Named("queue-7".into()),
        ] {
            let mut key = Vec::new();
            group.to_key(&mut key);
            assert_eq!(Group::from_key(&key), Some(group));
        }
        assert_eq!(Group::from_key(&[1, 0]), None);
        assert_eq!(Group::from_key(&[]), None);
    }
}
