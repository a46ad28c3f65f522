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

/// Most significant decimal digits a histogram read from the wire may declare. Its buckets
/// are allocated before its counts are read, so this bounds what one record costs to read:
/// 3 digits over 0..=7 days is about 170 KiB for the moment of reading.
pub const MAX_WIRE_SIGFIG: u32 = 3;

/// First 4 bytes of a V2 HdrHistogram.
const V2_COOKIE: u32 = 0x1c84_9313;
/// First 4 bytes of a DEFLATE-compressed V2 HdrHistogram.
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9314;
/// Bytes of a V2 header: cookie, payload length, normalizing offset, significant digits,
/// lowest discernible value, highest trackable value, integer-to-double ratio.
const V2_HEADER_LEN: usize = 40;

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
    /// The V2 header is not one this crate reads: wrong cookie, a payload length that is not
    /// the length of the bytes that follow, or bounds or precision out of range. Checked
    /// before anything is allocated for the histogram.
    #[error("histogram header is invalid: {0}")]
    Header(String),
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
    ///
    /// The header is checked before the deserializer sees it, since the deserializer
    /// allocates what the header declares: the payload length must be the length of the bytes
    /// that follow, the bounds within 1..=[`MAX_LATENCY_MS`] and the precision at most
    /// [`MAX_WIRE_SIGFIG`] digits. A compressed V2 histogram is inflated into at most
    /// [`MAX_ENCODED_LEN`] bytes and then checked the same way.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HistogramError> {
        let inflated;
        let plain = match cookie(bytes)? {
            V2_COOKIE => bytes,
            V2_COMPRESSED_COOKIE => {
                inflated = inflate(bytes)?;
                &inflated[..]
            }
            other => {
                return Err(HistogramError::Header(format!(
                    "cookie {other:#010x} is not a V2 HdrHistogram's"
                )));
            }
        };
        check_v2_header(plain)?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &plain[..])
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

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

fn cookie(bytes: &[u8]) -> Result<u32, HistogramError> {
    if bytes.len() < 8 {
        return Err(HistogramError::Header(format!(
            "{} bytes, shorter than a header",
            bytes.len()
        )));
    }
    Ok(be_u32(bytes, 0))
}

/// The uncompressed V2 histogram inside a compressed one, bounded to [`MAX_ENCODED_LEN`].
fn inflate(bytes: &[u8]) -> Result<Vec<u8>, HistogramError> {
    use std::io::Read as _;
    let declared = be_u32(bytes, 4) as usize;
    if declared != bytes.len() - 8 {
        return Err(HistogramError::Header(format!(
            "compressed payload length is {declared} but {} bytes follow",
            bytes.len() - 8
        )));
    }
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(&bytes[8..])
        .take(MAX_ENCODED_LEN as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| HistogramError::Format(format!("cannot inflate: {e}")))?;
    if out.len() > MAX_ENCODED_LEN {
        return Err(HistogramError::TooLarge(out.len()));
    }
    if cookie(&out)? != V2_COOKIE {
        return Err(HistogramError::Header(
            "compressed histogram does not hold a V2 histogram".to_owned(),
        ));
    }
    Ok(out)
}

/// Checks the counts of a V2 payload (zig-zag LEB128 varints, negative ones runs of zeros)
/// for the one value the deserializer cannot take: a run of 2^63 zeros, whose negation
/// overflows.
fn check_v2_payload(payload: &[u8]) -> Result<(), HistogramError> {
    let mut i = 0;
    while i < payload.len() {
        let mut value = 0u64;
        let mut len = 0;
        while len < 9 && i + len < payload.len() {
            let b = payload[i + len];
            if len == 8 {
                value |= u64::from(b) << 56;
                len += 1;
                break;
            }
            value |= u64::from(b & 0x7f) << (7 * len);
            len += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if value == u64::MAX {
            return Err(HistogramError::Format(format!(
                "a run of 2^63 zeros at payload byte {i}"
            )));
        }
        i += len;
    }
    Ok(())
}

/// Checks an uncompressed V2 header against the bytes that follow it.
fn check_v2_header(bytes: &[u8]) -> Result<(), HistogramError> {
    let bad = |what: String| Err(HistogramError::Header(what));
    if bytes.len() < V2_HEADER_LEN {
        return bad(format!("{} bytes, shorter than a header", bytes.len()));
    }
    let declared = be_u32(bytes, 4) as usize;
    if declared != bytes.len() - V2_HEADER_LEN {
        return bad(format!(
            "payload length is {declared} but {} bytes follow",
            bytes.len() - V2_HEADER_LEN
        ));
    }
    let sigfig = be_u32(bytes, 12);
    if sigfig > MAX_WIRE_SIGFIG {
        return bad(format!(
            "{sigfig} significant digits, more than the {MAX_WIRE_SIGFIG} allowed"
        ));
    }
    check_v2_payload(&bytes[V2_HEADER_LEN..])?;
    let (low, high) = (be_u64(bytes, 16), be_u64(bytes, 24));
    if high > MAX_LATENCY_MS {
        return Err(HistogramError::Range(high));
    }
    if low == 0 || high < low.saturating_mul(2) {
        return bad(format!(
            "bounds {low}..={high}: the lowest value must be at least 1 and the highest at least twice it"
        ));
    }
    Ok(())
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
            Err(HistogramError::Header(_))
        ));
        let huge = "A".repeat(MAX_ENCODED_LEN + 4);
        assert!(matches!(
            Latency::decode(&huge),
            Err(HistogramError::TooLarge(_))
        ));
    }

    /// A valid encoding of `h` with its header's field at `at` overwritten by `value`.
    fn with_field(h: &Latency, at: usize, value: &[u8]) -> Vec<u8> {
        let mut b = h.to_bytes();
        b[at..at + value.len()].copy_from_slice(value);
        b
    }

    #[test]
    fn a_header_declaring_more_than_follows_is_refused_before_allocating() {
        // 40 bytes claiming a payload of 0xFFFFFFFF bytes: the deserializer would resize its
        // buffer to that before reading.
        let claim = "HISTE/////8AAAAAAAAAAgAAAAAAAAABAAAAACQMhAA/8AAAAAAAAA==";
        let err = Latency::decode(claim).expect_err("refused");
        assert!(matches!(err, HistogramError::Header(_)), "{err}");
        assert!(err.to_string().contains("4294967295"), "{err}");

        let h = of(&[5, 50, 500]);
        let short = with_field(&h, 4, &1u32.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&short),
            Err(HistogramError::Header(_))
        ));
        let mut trailing = h.to_bytes();
        trailing.push(0);
        assert!(matches!(
            Latency::from_bytes(&trailing),
            Err(HistogramError::Header(_))
        ));
    }

    #[test]
    fn header_bounds_and_precision_are_checked() {
        let h = of(&[5]);
        let sigfig = with_field(&h, 12, &5u32.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&sigfig),
            Err(HistogramError::Header(_))
        ));
        let zero_low = with_field(&h, 16, &0u64.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&zero_low),
            Err(HistogramError::Header(_))
        ));
        let high = with_field(&h, 24, &u64::MAX.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&high),
            Err(HistogramError::Range(u64::MAX))
        ));
        let cookie = with_field(&h, 0, &0x1c84_9311u32.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&cookie),
            Err(HistogramError::Header(_))
        ));
        // Unchanged, the same bytes decode.
        assert_eq!(Latency::from_bytes(&h.to_bytes()).expect("decodes"), h);
    }

    #[test]
    fn a_zero_run_that_cannot_be_negated_is_refused() {
        // One 9-byte varint of all ones: zig-zag decodes to i64::MIN, a run of 2^63 zeros.
        let mut b = of(&[]).to_bytes();
        b.truncate(V2_HEADER_LEN);
        b.extend([0xff; 9]);
        b[4..8].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            Latency::from_bytes(&b),
            Err(HistogramError::Format(_))
        ));
    }

    #[test]
    fn compressed_histograms_are_read_within_bounds() {
        use hdrhistogram::serialization::V2DeflateSerializer;
        let h = of(&[1, 20, 300, 4_000]);
        let mut buf = Vec::new();
        V2DeflateSerializer::new()
            .serialize(h.inner(), &mut buf)
            .expect("serializes");
        assert_eq!(Latency::from_bytes(&buf).expect("decodes"), h);

        // A compressed stream that inflates past the bound is refused however small it is.
        let mut bomb_inner = V2_COOKIE.to_be_bytes().to_vec();
        bomb_inner.extend(std::iter::repeat_n(0u8, 4 * MAX_ENCODED_LEN));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, &bomb_inner).expect("compresses");
        let packed = z.finish().expect("compresses");
        assert!(packed.len() < 2048);
        let mut bomb = V2_COMPRESSED_COOKIE.to_be_bytes().to_vec();
        bomb.extend((packed.len() as u32).to_be_bytes());
        bomb.extend(packed);
        assert!(matches!(
            Latency::from_bytes(&bomb),
            Err(HistogramError::TooLarge(_))
        ));
    }
}
