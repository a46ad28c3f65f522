//! The latency distribution of one open cell, kept small until it is worth a full histogram.
//!
//! A full [`Latency`] (an HdrHistogram over 0 ..= 7 days at two significant digits) holds
//! 3,072 counters, about 24 KiB, however few messages it has seen. A producer writing
//! scattered CreateTimes opens a cell per message, so the service starts each cell
//! [`CellLatency::Sparse`]: the histogram bins it has recorded into and their counts, a few
//! bytes each. Once a cell has recorded into more than [`SPARSE_MAX_BINS`] distinct bins it
//! becomes [`CellLatency::Dense`], a [`Latency`] holding the same counts.
//!
//! A sparse bin is named by the lowest value the histogram maps to it, so
//! [`CellLatency::into_latency`] records into exactly the counters that recording every value
//! into a [`Latency`] would have: the V2 bytes on the wire are the same either way.

use std::sync::LazyLock;

use chaperone_audit::Latency;
use chaperone_audit::histogram::MAX_LATENCY_MS;

/// Distinct bins a sparse latency holds before it becomes a full histogram: 64 bins take
/// 512 bytes, a full histogram about 24 KiB.
pub const SPARSE_MAX_BINS: usize = 64;

/// An empty histogram of the wire format's bounds, asked which bin a value falls in.
static LAYOUT: LazyLock<Latency> = LazyLock::new(Latency::new);

/// Heap bytes of one full histogram.
pub fn dense_bytes() -> usize {
    LAYOUT.inner().distinct_values() * size_of::<u64>()
}

/// A latency as [`Latency::record`] clamps it.
#[inline]
fn clamp(latency_ms: i64) -> u64 {
    u64::try_from(latency_ms).unwrap_or(0).min(MAX_LATENCY_MS)
}

/// The bin of a clamped latency, named by the lowest value in it (which fits in a `u32`,
/// since latencies are clamped to [`MAX_LATENCY_MS`]).
#[inline]
fn bin_of(v: u64) -> u32 {
    u32::try_from(LAYOUT.inner().lowest_equivalent(v)).unwrap_or(u32::MAX)
}

/// One sparse bin: (lowest value of the bin, count).
type Bin = (u32, u32);

/// The latency distribution of one cell.
#[derive(Debug, Clone, PartialEq)]
pub enum CellLatency {
    /// Bins recorded into and their counts, sorted by bin; at most [`SPARSE_MAX_BINS`].
    Sparse(Vec<Bin>),
    /// A full histogram.
    Dense(Box<Latency>),
}

impl Default for CellLatency {
    fn default() -> Self {
        Self::Sparse(Vec::new())
    }
}

impl CellLatency {
    /// Records one latency, as [`Latency::record`] does. Returns how many heap bytes the
    /// cell grew by.
    #[inline]
    pub fn record(&mut self, latency_ms: i64) -> usize {
        let bins = match self {
            Self::Dense(h) => {
                h.record(latency_ms);
                return 0;
            }
            Self::Sparse(bins) => bins,
        };
        let bin = bin_of(clamp(latency_ms));
        match bins.binary_search_by_key(&bin, |b| b.0) {
            Ok(i) => {
                if let Some(n) = bins[i].1.checked_add(1) {
                    bins[i].1 = n;
                    return 0;
                }
            }
            Err(i) if bins.len() < SPARSE_MAX_BINS => {
                let before = bins.capacity();
                bins.insert(i, (bin, 1));
                return (bins.capacity() - before) * size_of::<Bin>();
            }
            Err(_) => {}
        }
        // Too many bins (or a count past u32): the full histogram is now the smaller form.
        let freed = bins.capacity() * size_of::<Bin>();
        let mut dense = Box::new(to_latency(bins));
        dense.record(latency_ms);
        *self = Self::Dense(dense);
        self.heap_bytes().saturating_sub(freed)
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Sparse(bins) => bins.capacity() * size_of::<Bin>(),
            Self::Dense(_) => dense_bytes() + size_of::<Latency>(),
        }
    }

    /// Whether this is a full histogram.
    pub fn is_dense(&self) -> bool {
        matches!(self, Self::Dense(_))
    }

    /// Values recorded.
    pub fn len(&self) -> u64 {
        match self {
            Self::Sparse(bins) => bins.iter().map(|b| u64::from(b.1)).sum(),
            Self::Dense(h) => h.len(),
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The full histogram with these counts, as the wire format carries it.
    pub fn into_latency(self) -> Latency {
        match self {
            Self::Sparse(bins) => to_latency(&bins),
            Self::Dense(h) => *h,
        }
    }
}

fn to_latency(bins: &[Bin]) -> Latency {
    let mut h = Latency::new();
    for &(bin, n) in bins {
        h.record_n(i64::from(bin), u64::from(n));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plain(values: &[i64]) -> Latency {
        let mut h = Latency::new();
        for &v in values {
            h.record(v);
        }
        h
    }

    fn cell(values: &[i64]) -> CellLatency {
        let mut c = CellLatency::default();
        for &v in values {
            c.record(v);
        }
        c
    }

    /// Latencies as a hostile producer makes them: negative (event time in the future),
    /// beyond 7 days, and everything between, in bins of every width.
    fn latency() -> impl Strategy<Value = i64> {
        prop_oneof![
            -1_000_000_000_000i64..0,
            0i64..300,
            0i64..100_000,
            0i64..=MAX_LATENCY_MS as i64,
            MAX_LATENCY_MS as i64..i64::MAX,
        ]
    }

    proptest! {
        /// Sparse or dense, the histogram sent is the one recording every value gives: equal
        /// as a histogram and byte for byte in the V2 wire format.
        #[test]
        fn equals_a_plain_histogram(values in prop::collection::vec(latency(), 0..400)) {
            let c = cell(&values);
            prop_assert_eq!(c.len(), values.len() as u64);
            let got = c.into_latency();
            let want = plain(&values);
            prop_assert_eq!(got.to_bytes(), want.to_bytes());
            prop_assert_eq!(got.encode(), want.encode());
            prop_assert_eq!(&got, &want);
        }

        /// Merging cells sent sparse gives what merging plain histograms gives (what the
        /// collector does with records from several hosts or flushes).
        #[test]
        fn merges_equal_plain_merges(
            a in prop::collection::vec(latency(), 0..100),
            b in prop::collection::vec(latency(), 0..100),
        ) {
            let mut got = Latency::decode(&cell(&a).into_latency().encode()).expect("decodes");
            got.merge(&Latency::decode(&cell(&b).into_latency().encode()).expect("decodes"));
            let all: Vec<i64> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(got.to_bytes(), plain(&all).to_bytes());
        }
    }

    #[test]
    fn stays_sparse_up_to_the_bin_limit_then_turns_dense() {
        let mut c = CellLatency::default();
        assert_eq!(c.heap_bytes(), 0);
        // Values below 256 ms each have a bin of their own.
        for v in 0..SPARSE_MAX_BINS as i64 {
            c.record(v);
            c.record(v);
        }
        assert!(!c.is_dense());
        assert!(c.heap_bytes() <= SPARSE_MAX_BINS * 8);
        let grew = c.record(SPARSE_MAX_BINS as i64);
        assert!(c.is_dense());
        assert!(
            grew >= 20 * 1024,
            "a dense cell holds about 24 KiB, grew {grew}"
        );
        assert_eq!(c.len(), 2 * SPARSE_MAX_BINS as u64 + 1);
        assert_eq!(c.record(5), 0);
    }

    #[test]
    fn values_of_one_bin_share_it() {
        // 1 % precision: 100,000 and 100,100 ms fall in one bin.
        let c = cell(&[100_000, 100_100, -5, 0, i64::MAX, MAX_LATENCY_MS as i64]);
        match &c {
            CellLatency::Sparse(bins) => assert_eq!(bins.len(), 3, "{bins:?}"),
            CellLatency::Dense(_) => panic!("six values made a cell dense"),
        }
        assert_eq!(c.into_latency().len(), 6);
    }

    #[test]
    fn a_count_past_u32_turns_the_cell_dense_and_keeps_counting() {
        let mut c = CellLatency::Sparse(vec![(bin_of(10), u32::MAX)]);
        c.record(10);
        assert!(c.is_dense());
        assert_eq!(c.len(), u64::from(u32::MAX) + 1);
    }
}
