//! A quantile sketch with a stated relative error, mergeable, of bounded size, and computed the
//! same way on every machine (the DDSketch idea: values fall into buckets whose bounds grow
//! geometrically, so any quantile read back is within 1% of the true one).
//!
//! **Determinism.** Every node of a cluster folds the same messages into its own sketches and
//! must reach the same bytes, whatever its CPU or C library. A logarithm from the platform's
//! `libm` may differ in the last bit between machines and put a value in a neighbouring bucket,
//! so the bucket of a value is computed from its IEEE-754 bits with additions and multiplications
//! only: the exponent, plus the mantissa's fraction as a linear stand-in for the logarithm of the
//! mantissa (`log2(v) ≈ e + (m - 1)` for `v = m·2^e`, `1 ≤ m < 2`). That stand-in's slope is at
//! most `1/ln 2` times the true one's, so [`INDEX_PER_LOG2`] buckets per power of two are enough
//! for every bucket's upper bound to be within `(1 + α)/(1 - α)` of its lower bound, with
//! α = [`RELATIVE_ACCURACY`]: the harmonic mean of a bucket's bounds is within α of any value in
//! it.
//!
//! **Size.** Positive and negative values keep buckets of their own (`v` and `-v` share the
//! index), zero and values too small to index are counted apart. A side's buckets are one dense
//! run of counts (adding a value is an index and an increment) spanning at most [`MAX_BUCKETS`]
//! consecutive indexes; past that its lowest buckets are folded into the lowest one kept, which
//! keeps the high quantiles (the ones KPIs ask for) exact to α and makes only the smallest
//! magnitudes coarser. 2,048 buckets span a ratio of 2^41 between the smallest and largest value
//! at full accuracy.

/// The largest relative error of a quantile read from a sketch (for values within the span the
/// buckets keep, see the module docs).
#[cfg(test)]
pub(crate) const RELATIVE_ACCURACY: f64 = 0.01;

/// Buckets per power of two. `1 / ln((1 + α) / (1 - α))` is 49.99 for α = 1%; 50 makes every
/// bucket a little narrower than the bound needs.
const INDEX_PER_LOG2: f64 = 50.0;

/// Consecutive buckets one side (positive or negative values) spans at most.
pub(crate) const MAX_BUCKETS: usize = 2048;

/// Magnitudes below this are counted as zero (they have no useful bucket).
const MIN_INDEXABLE: f64 = 1e-9;

/// A mergeable quantile sketch. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sketch {
    /// Counts of positive values by bucket index.
    positive: Buckets,
    /// Counts of negative values by the bucket index of their magnitude.
    negative: Buckets,
    /// Zeros and magnitudes below [`MIN_INDEXABLE`].
    zero: u64,
}

/// One side's counts: `counts[i]` is bucket `lowest + i`'s. Empty, or its first and last counts
/// are not zero — so two sides holding the same counts are equal, whatever order they came in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Buckets {
    lowest: i32,
    counts: Vec<u64>,
}

impl Buckets {
    /// Adds `n` to bucket `index` (n > 0), folding the lowest buckets into the lowest kept when
    /// the span would pass [`MAX_BUCKETS`].
    fn add(&mut self, index: i32, n: u64) {
        if self.counts.is_empty() {
            self.lowest = index;
            self.counts.push(n);
            return;
        }
        // Indexes are within ±2^16 (a finite f64's exponent times 50), so i64 never overflows.
        let offset = i64::from(index) - i64::from(self.lowest);
        let len = self.counts.len() as i64;
        if (0..len).contains(&offset) {
            self.counts[offset as usize] += n;
        } else if offset >= len {
            // Above the highest: extend up, then fold what fell below the span.
            self.counts.resize(offset as usize, 0);
            self.counts.push(n);
            let over = self.counts.len().saturating_sub(MAX_BUCKETS);
            if over > 0 {
                let folded: u64 = self.counts.drain(..over).sum();
                self.counts[0] += folded;
                self.lowest += over as i32;
                self.trim_low();
            }
        } else {
            // Below the lowest: extend down as far as the span allows; lower still lands in the
            // lowest bucket kept.
            let room = (MAX_BUCKETS - self.counts.len()) as i64;
            let down = (-offset).min(room) as usize;
            if down == 0 {
                self.counts[0] += n;
                return;
            }
            self.counts.splice(0..0, std::iter::repeat_n(0, down));
            self.lowest -= down as i32;
            self.counts[0] += n;
        }
    }

    /// Drops leading zero counts (folding may leave the new lowest one empty only when it was
    /// and nothing was folded, which `add`'s callers never do; kept for the invariant's sake).
    fn trim_low(&mut self) {
        let zeros = self.counts.iter().take_while(|c| **c == 0).count();
        if zeros > 0 {
            self.counts.drain(..zeros);
            self.lowest += zeros as i32;
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (index, count) of the buckets holding values, lowest first.
    fn occupied(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        let lowest = self.lowest;
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(move |(i, n)| (lowest + i as i32, *n))
    }

    /// Buckets holding values.
    fn occupied_len(&self) -> usize {
        self.counts.iter().filter(|n| **n > 0).count()
    }
}

impl Sketch {
    /// Adds one value. NaN and infinities are not added (the caller counts them apart).
    pub(crate) fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let magnitude = value.abs();
        if magnitude < MIN_INDEXABLE {
            self.zero += 1;
            return;
        }
        let side = if value > 0.0 {
            &mut self.positive
        } else {
            &mut self.negative
        };
        side.add(index_of(magnitude), 1);
    }

    /// Adds every value of `other`.
    #[cfg(test)]
    pub(crate) fn merge(&mut self, other: &Sketch) {
        for (mine, theirs) in [
            (&mut self.positive, &other.positive),
            (&mut self.negative, &other.negative),
        ] {
            for (index, count) in theirs.occupied() {
                mine.add(index, count);
            }
        }
        self.zero += other.zero;
    }

    /// Bytes its buckets hold on the heap.
    pub(crate) fn heap_size(&self) -> usize {
        (self.positive.counts.capacity() + self.negative.counts.capacity()) * 8
    }

    /// Values added.
    pub(crate) fn count(&self) -> u64 {
        self.zero + self.positive.total() + self.negative.total()
    }

    /// The `q` quantile (0 ≤ q ≤ 1) of the values added, within [`RELATIVE_ACCURACY`]; `None`
    /// when none were.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // The rank of the value wanted, 0-based, as a lower quantile.
        let rank = (q * (count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Ascending: the most negative first (the highest magnitude index), then zeros, then
        // positives from the lowest index.
        for (index, n) in self.negative.occupied().rev() {
            seen += n;
            if seen > rank {
                return Some(-representative(index));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for (index, n) in self.positive.occupied() {
            seen += n;
            if seen > rank {
                return Some(representative(index));
            }
        }
        None
    }

    /// The sketch as bytes: `zero`, then each side as its number of non-empty buckets followed
    /// by (index, count) pairs in index order, every number a LEB128 varint (indexes zigzagged).
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let (positive, negative) = (self.positive.occupied_len(), self.negative.occupied_len());
        let mut out = Vec::with_capacity(8 + 4 * (positive + negative));
        put_varint(&mut out, self.zero);
        for (side, len) in [(&self.positive, positive), (&self.negative, negative)] {
            put_varint(&mut out, len as u64);
            for (index, count) in side.occupied() {
                put_varint(&mut out, zigzag(index));
                put_varint(&mut out, count);
            }
        }
        out
    }

    /// Reads [`Sketch::to_bytes`]'s output; `None` when it is not such bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Sketch> {
        let mut input = bytes;
        let zero = take_varint(&mut input)?;
        let mut sides = [Buckets::default(), Buckets::default()];
        for side in &mut sides {
            let len = usize::try_from(take_varint(&mut input)?).ok()?;
            if len > MAX_BUCKETS {
                return None;
            }
            let mut previous = None;
            for _ in 0..len {
                let index = unzigzag(take_varint(&mut input)?)?;
                let count = take_varint(&mut input)?;
                // Written in ascending order, each bucket once and not empty.
                if count == 0 || previous.is_some_and(|p| p >= index) {
                    return None;
                }
                previous = Some(index);
                side.add(index, count);
            }
        }
        if !input.is_empty() {
            return None;
        }
        let [positive, negative] = sides;
        Some(Sketch {
            positive,
            negative,
            zero,
        })
    }
}

/// The bucket of a positive, finite magnitude of at least [`MIN_INDEXABLE`]: `ceil(L(v) ·
/// INDEX_PER_LOG2)` with `L(v) = e + (m - 1)`, from the bits (see the module docs).
fn index_of(magnitude: f64) -> i32 {
    let bits = magnitude.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    // The mantissa with the exponent of 1.0: a value in [1, 2).
    let mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let log2 = f64::from(exponent) + (mantissa - 1.0);
    (log2 * INDEX_PER_LOG2).ceil() as i32
}

/// The value at `L = log2`, inverting [`index_of`]'s stand-in for the logarithm.
fn value_at(log2: f64) -> f64 {
    let exponent = log2.floor();
    let mantissa = 1.0 + (log2 - exponent);
    mantissa * 2f64.powi(exponent as i32)
}

/// The value a bucket stands for: the harmonic mean of its bounds, within α of both.
fn representative(index: i32) -> f64 {
    let lower = value_at(f64::from(index - 1) / INDEX_PER_LOG2);
    let upper = value_at(f64::from(index) / INDEX_PER_LOG2);
    2.0 * lower * upper / (lower + upper)
}

fn zigzag(value: i32) -> u64 {
    u64::from(((value << 1) ^ (value >> 31)) as u32)
}

fn unzigzag(value: u64) -> Option<i32> {
    let value = u32::try_from(value).ok()?;
    Some(((value >> 1) as i32) ^ -((value & 1) as i32))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The true `q` quantile of sorted `values`, as the sketch defines rank.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn assert_within(estimate: f64, truth: f64) {
        let error = ((estimate - truth) / truth).abs();
        assert!(
            error <= RELATIVE_ACCURACY,
            "{estimate} is {error:.4} away from {truth}"
        );
    }

    #[test]
    fn every_value_reads_back_within_the_stated_error() {
        // Across many powers of two and every position within one.
        let mut value = 1e-6;
        while value < 1e12 {
            let mut sketch = Sketch::default();
            sketch.add(value);
            assert_within(sketch.quantile(0.5).unwrap(), value);
            sketch = Sketch::default();
            sketch.add(-value);
            assert_within(sketch.quantile(0.5).unwrap(), -value);
            value *= 1.0137;
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution_are_within_the_stated_error() {
        // A long-tailed handle-time-like distribution: deterministic, no RNG needed.
        let mut values: Vec<f64> = (1..=10_000)
            .map(|i| {
                let u = f64::from(i) / 10_001.0;
                30.0 * (-(1.0 - u).ln()) + 5.0
            })
            .collect();
        let mut sketch = Sketch::default();
        for v in &values {
            sketch.add(*v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
            assert_within(sketch.quantile(q).unwrap(), exact(&values, q));
        }
        assert_eq!(sketch.count(), 10_000);
    }

    #[test]
    fn negatives_zeros_and_positives_sort_together() {
        let mut sketch = Sketch::default();
        for v in [-100.0, -1.0, 0.0, 0.0, 1.0, 100.0, f64::NAN, f64::INFINITY] {
            sketch.add(v);
        }
        assert_eq!(sketch.count(), 6, "NaN and infinity are not added");
        assert_within(sketch.quantile(0.0).unwrap(), -100.0);
        assert_within(sketch.quantile(0.2).unwrap(), -1.0);
        assert_eq!(sketch.quantile(0.5).unwrap(), 0.0);
        assert_within(sketch.quantile(1.0).unwrap(), 100.0);
        assert_eq!(Sketch::default().quantile(0.5), None);
        assert_eq!(sketch.quantile(1.5), None);
    }

    #[test]
    fn merging_equals_adding_everything_to_one() {
        let (mut a, mut b, mut both) = (Sketch::default(), Sketch::default(), Sketch::default());
        for i in 0..500 {
            let v = f64::from(i) * 1.7 - 100.0;
            if i % 3 == 0 { &mut a } else { &mut b }.add(v);
            both.add(v);
        }
        a.merge(&b);
        assert_eq!(a, both);
    }

    #[test]
    fn the_size_is_bounded_and_high_quantiles_stay_exact() {
        let mut sketch = Sketch::default();
        // 3,000 distinct buckets' worth of magnitudes, over the bound.
        let mut value = 1e-6;
        for _ in 0..3000 {
            sketch.add(value);
            value *= 1.0205;
        }
        assert_eq!(sketch.positive.counts.len(), MAX_BUCKETS);
        assert_eq!(sketch.count(), 3000, "collapsing keeps every count");
        assert_within(sketch.quantile(1.0).unwrap(), value / 1.0205);
    }

    #[test]
    fn values_below_a_full_span_count_in_its_lowest_bucket() {
        let mut sketch = Sketch::default();
        // Exactly MAX_BUCKETS buckets from 1.0 up (50 per power of two).
        let top = value_at(((MAX_BUCKETS - 1) as f64 - 0.5) / INDEX_PER_LOG2);
        assert_eq!((index_of(1.0), index_of(top)), (0, MAX_BUCKETS as i32 - 1));
        sketch.add(1.0);
        sketch.add(top);
        assert_eq!(sketch.positive.counts.len(), MAX_BUCKETS);
        sketch.add(1e-3);
        assert_eq!(
            sketch.positive.counts.len(),
            MAX_BUCKETS,
            "the span did not grow"
        );
        assert_eq!(sketch.count(), 3);
        assert_eq!(sketch.positive.counts[0], 2, "1e-3 counts in 1.0's bucket");
        assert_within(sketch.quantile(1.0).unwrap(), top);
        let bytes = sketch.to_bytes();
        assert_eq!(Sketch::from_bytes(&bytes), Some(sketch));
    }

    #[test]
    fn bytes_round_trip_and_damage_is_refused() {
        let mut sketch = Sketch::default();
        for v in [-3.5, 0.0, 1.0, 2.0, 2.0, 1e9] {
            sketch.add(v);
        }
        let bytes = sketch.to_bytes();
        assert_eq!(Sketch::from_bytes(&bytes), Some(sketch));
        assert_eq!(Sketch::from_bytes(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Sketch::from_bytes(&longer), None);
        assert_eq!(Sketch::from_bytes(&[0xff; 12]), None);
        // Buckets out of order, twice, or empty.
        assert_eq!(Sketch::from_bytes(&[0, 2, 4, 1, 2, 1, 0]), None);
        assert_eq!(Sketch::from_bytes(&[0, 2, 2, 1, 2, 1, 0]), None);
        assert_eq!(Sketch::from_bytes(&[0, 1, 2, 0, 0]), None);
        assert!(Sketch::from_bytes(&[0, 2, 2, 1, 4, 1, 0]).is_some());
        assert_eq!(Sketch::default().to_bytes(), vec![0, 0, 0]);
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [0, 1, -1, 4096, -4096, i32::MAX, i32::MIN] {
            assert_eq!(unzigzag(zigzag(v)), Some(v));
        }
    }
}
