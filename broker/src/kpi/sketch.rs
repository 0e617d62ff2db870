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
//! index), zero and values too small to index are counted apart. A side holds at most
//! [`MAX_BUCKETS`]; past that its lowest buckets are folded into the next one up, which keeps the
//! high quantiles (the ones KPIs ask for) exact to α and makes only the smallest magnitudes
//! coarser. 2,048 buckets span a ratio of 2^41 between the smallest and largest value at full
//! accuracy.

use std::collections::BTreeMap;

/// The largest relative error of a quantile read from a sketch (for values within the span the
/// buckets keep, see the module docs).
#[cfg(test)]
pub(crate) const RELATIVE_ACCURACY: f64 = 0.01;

/// Buckets per power of two. `1 / ln((1 + α) / (1 - α))` is 49.99 for α = 1%; 50 makes every
/// bucket a little narrower than the bound needs.
const INDEX_PER_LOG2: f64 = 50.0;

/// Buckets one side (positive or negative values) keeps at most.
pub(crate) const MAX_BUCKETS: usize = 2048;

/// Magnitudes below this are counted as zero (they have no useful bucket).
const MIN_INDEXABLE: f64 = 1e-9;

/// A mergeable quantile sketch. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sketch {
    /// Counts of positive values by bucket index.
    positive: BTreeMap<i32, u64>,
    /// Counts of negative values by the bucket index of their magnitude.
    negative: BTreeMap<i32, u64>,
    /// Zeros and magnitudes below [`MIN_INDEXABLE`].
    zero: u64,
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
        *side.entry(index_of(magnitude)).or_insert(0) += 1;
        collapse(side);
    }

    /// Adds every value of `other`.
    #[cfg(test)]
    pub(crate) fn merge(&mut self, other: &Sketch) {
        for (mine, theirs) in [
            (&mut self.positive, &other.positive),
            (&mut self.negative, &other.negative),
        ] {
            for (index, count) in theirs {
                *mine.entry(*index).or_insert(0) += count;
            }
            collapse(mine);
        }
        self.zero += other.zero;
    }

    /// Values added.
    pub(crate) fn count(&self) -> u64 {
        self.zero + self.positive.values().sum::<u64>() + self.negative.values().sum::<u64>()
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
        for (index, n) in self.negative.iter().rev() {
            seen += n;
            if seen > rank {
                return Some(-representative(*index));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for (index, n) in &self.positive {
            seen += n;
            if seen > rank {
                return Some(representative(*index));
            }
        }
        None
    }

    /// The sketch as bytes: `zero`, then each side as its bucket count followed by
    /// (index, count) pairs in index order, every number a LEB128 varint (indexes zigzagged).
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * (self.positive.len() + self.negative.len()));
        put_varint(&mut out, self.zero);
        for side in [&self.positive, &self.negative] {
            put_varint(&mut out, side.len() as u64);
            for (index, count) in side {
                put_varint(&mut out, zigzag(*index));
                put_varint(&mut out, *count);
            }
        }
        out
    }

    /// Reads [`Sketch::to_bytes`]'s output; `None` when it is not such bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Sketch> {
        let mut input = bytes;
        let zero = take_varint(&mut input)?;
        let mut sides = [BTreeMap::new(), BTreeMap::new()];
        for side in &mut sides {
            let len = usize::try_from(take_varint(&mut input)?).ok()?;
            if len > MAX_BUCKETS {
                return None;
            }
            for _ in 0..len {
                let index = unzigzag(take_varint(&mut input)?)?;
                side.insert(index, take_varint(&mut input)?);
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

/// Folds the lowest buckets of a side into the next one up until it keeps [`MAX_BUCKETS`].
fn collapse(side: &mut BTreeMap<i32, u64>) {
    while side.len() > MAX_BUCKETS {
        let Some((_, lowest)) = side.pop_first() else {
            return;
        };
        if let Some(mut next) = side.first_entry() {
            *next.get_mut() += lowest;
        }
    }
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
        assert_eq!(sketch.positive.len(), MAX_BUCKETS);
        assert_eq!(sketch.count(), 3000, "collapsing keeps every count");
        assert_within(sketch.quantile(1.0).unwrap(), value / 1.0205);
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
        assert_eq!(Sketch::default().to_bytes(), vec![0, 0, 0]);
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [0, 1, -1, 4096, -4096, i32::MAX, i32::MIN] {
            assert_eq!(unzigzag(zigzag(v)), Some(v));
        }
    }
}
