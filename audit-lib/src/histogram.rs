//! Mergeable latency distributions.
//!
//! Latency is the time a hop saw a message minus its event time, in milliseconds. Each
//! audit record carries an HdrHistogram serialized in the V2 format and base64-encoded, so
//! the collector can add histograms from many hosts and report true percentiles instead
//! of averages of percentiles.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};

/// Largest latency tracked exactly: 7 days. Larger values are clamped to it.
pub const MAX_LATENCY_MS: u64 = 7 * 24 * 3_600_000;

/// Significant decimal digits kept (1 % relative precision).
const SIGFIG: u8 = 2;

/// Upper bound on the size of an encoded histogram accepted by the decoder.
pub const MAX_ENCODED_LEN: usize = 64 * 1024;

/// A latency histogram in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency(Histogram<u64>);

/// A histogram that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HistogramError {
    /// The string is longer than [`MAX_ENCODED_LEN`].
    #[error("encoded histogram is {0} bytes, more than the {MAX_ENCODED_LEN} allowed")]
    TooLarge(usize),
    /// The string is not base64.
    #[error("histogram is not valid base64: {0}")]
    Base64(String),
    /// The bytes are not a V2 HdrHistogram.
    #[error("histogram is not a valid HdrHistogram V2 payload: {0}")]
    Format(String),
    /// The histogram tracks values beyond [`MAX_LATENCY_MS`].
    #[error("histogram tracks values up to {0}, beyond the {MAX_LATENCY_MS} ms allowed")]
    Range(u64),
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram covering 0 ..= [`MAX_LATENCY_MS`].
    pub fn new() -> Self {
        #[allow(clippy::expect_used)]
        let h = Histogram::new_with_bounds(1, MAX_LATENCY_MS, SIGFIG)
            .expect("constant histogram bounds are valid");
        Self(h)
    }

    /// Records one latency. Negative latencies (event time ahead of the observer's clock)
    /// are recorded as 0; latencies beyond [`MAX_LATENCY_MS`] are clamped.
    #[inline]
    pub fn record(&mut self, latency_ms: i64) {
        let v = u64::try_from(latency_ms).unwrap_or(0).min(MAX_LATENCY_MS);
        self.0.saturating_record(v);
    }

    /// Records `n` occurrences of one latency, as `n` calls of [`Latency::record`] would.
    #[inline]
    pub fn record_n(&mut self, latency_ms: i64, n: u64) {
        let v = u64::try_from(latency_ms).unwrap_or(0).min(MAX_LATENCY_MS);
        self.0.saturating_record_n(v, n);
    }

    /// Adds every value of `other` into `self`.
    pub fn merge(&mut self, other: &Latency) {
        // Both histograms share the same bounds, so `add` cannot fail; saturate defensively.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of values recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at quantile `q` (0.0 ..= 1.0), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q))
    }

    /// The largest value recorded, or `None` when empty.
    pub fn max(&self) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.max())
    }

    /// The underlying HdrHistogram.
    pub fn inner(&self) -> &Histogram<u64> {
        &self.0
    }

    /// Serializes to the wire form: V2 HdrHistogram, base64 (standard alphabet, padded).
    pub fn encode(&self) -> String {
        STANDARD.encode(self.to_bytes())
    }

    /// Parses the wire form produced by [`Latency::encode`].
    pub fn decode(s: &str) -> Result<Self, HistogramError> {
        if s.len() > MAX_ENCODED_LEN {
            return Err(HistogramError::TooLarge(s.len()));
        }
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| HistogramError::Base64(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// Serializes to a V2 HdrHistogram, raw bytes (the form the collector stores).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64);
        #[allow(clippy::expect_used)]
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .expect("serializing a histogram of this crate's bounds into a Vec cannot fail");
        buf
    }

    /// Parses a V2 HdrHistogram written by [`Latency::to_bytes`] (or by any writer, as long as
    /// it tracks values within [`MAX_LATENCY_MS`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HistogramError> {
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| HistogramError::Format(format!("{e:?}")))?;
        if h.high() > MAX_LATENCY_MS {
            return Err(HistogramError::Range(h.high()));
        }
        // What `encode` writes already has this crate's bounds: keep it as it is.
        if h.low() == 1 && h.high() == MAX_LATENCY_MS && h.sigfig() == SIGFIG {
            return Ok(Self(h));
        }
        let mut out = Self::new();
        out.0
            .add(&h)
            .map_err(|e| HistogramError::Format(format!("{e:?}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(values: &[i64]) -> Latency {
        let mut h = Latency::new();
        for &v in values {
            h.record(v);
        }
        h
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(values in prop::collection::vec(-10i64..1_000_000_000, 0..300)) {
            let h = of(&values);
            let back = Latency::decode(&h.encode()).expect("decodes");
            prop_assert_eq!(back.len(), values.len() as u64);
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(&Latency::from_bytes(&h.to_bytes()).expect("decodes"), &h);
        }

        #[test]
        fn merge_equals_recording_everything(
            a in prop::collection::vec(0i64..10_000_000, 0..200),
            b in prop::collection::vec(0i64..10_000_000, 0..200),
        ) {
            let mut merged = Latency::decode(&of(&a).encode()).expect("decodes");
            merged.merge(&Latency::decode(&of(&b).encode()).expect("decodes"));
            let all: Vec<i64> = a.iter().chain(&b).copied().collect();
            let direct = of(&all);
            prop_assert_eq!(merged.len(), direct.len());
            for q in [0.5, 0.95, 0.99, 1.0] {
                prop_assert_eq!(merged.quantile(q), direct.quantile(q));
            }
        }

        #[test]
        fn merge_is_commutative(
            a in prop::collection::vec(0i64..10_000_000, 0..100),
            b in prop::collection::vec(0i64..10_000_000, 0..100),
        ) {
            let mut ab = of(&a);
            ab.merge(&of(&b));
            let mut ba = of(&b);
            ba.merge(&of(&a));
            prop_assert_eq!(ab, ba);
        }
    }

    #[test]
    fn record_n_equals_recording_n_times() {
        let mut once = Latency::new();
        once.record_n(1_234, 3);
        once.record_n(-7, 2);
        once.record_n(i64::MAX, 1);
        assert_eq!(once, of(&[1_234, 1_234, 1_234, -7, -7, i64::MAX]));
    }

    #[test]
    fn clamps_out_of_range_values() {
        let h = of(&[-5, i64::MAX]);
        assert_eq!(h.len(), 2);
        assert_eq!(h.quantile(0.0), Some(0));
        assert!(h.max().expect("non-empty") >= MAX_LATENCY_MS);
    }

    #[test]
    fn histograms_with_other_bounds_are_normalised() {
        let mut foreign = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("bounds");
        foreign.record(1_500).expect("in range");
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(&foreign, &mut buf)
            .expect("serializes");
        let h = Latency::decode(&STANDARD.encode(buf)).expect("decodes");
        assert_eq!(h.inner().high(), MAX_LATENCY_MS);
        assert_eq!(h.inner().sigfig(), SIGFIG);
        assert_eq!(h.len(), 1);
        let mut merged = Latency::new();
        merged.merge(&h);
        assert_eq!(merged.len(), 1);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Latency::decode("%%%"),
            Err(HistogramError::Base64(_))
        ));
        assert!(matches!(
            Latency::decode("AAAA"),
            Err(HistogramError::Format(_))
        ));
        let huge = "A".repeat(MAX_ENCODED_LEN + 4);
        assert!(matches!(
            Latency::decode(&huge),
            Err(HistogramError::TooLarge(_))
        ));
    }
}
