//! Event time of a consumed message.
//!
//! Sources are tried in the configured order: the Kafka record timestamp when the topic uses
//! CreateTime, then a top-level JSON field of the payload. A message no source dates is
//! counted as "no timestamp" in the bucket of its arrival. A payload that cannot be parsed
//! while the JSON field is consulted is *malformed*: it is counted (as malformed and without
//! timestamp), never skipped.
//!
//! JSON times may be epoch seconds, milliseconds, microseconds or nanoseconds (told apart by
//! magnitude, as Uber's Chaperone did), as numbers or numeric strings, or RFC 3339 strings.
//! Times outside the record contract's plausible range (2000..2200) are not used.

use std::fmt;

use chaperone_audit::record::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use rdkafka::Timestamp;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::config::TimeSource;

/// The outcome of dating one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTime {
    /// A usable event time (epoch ms).
    Timed(i64),
    /// No source dated the message.
    Untimed,
    /// The payload could not be parsed for an event time.
    Malformed,
}

/// Dates messages according to the configured sources.
#[derive(Debug, Clone)]
pub struct Dater {
    sources: Vec<TimeSource>,
    json_field: Option<String>,
}

impl Dater {
    /// A dater trying `sources` in order; `json_field` is skipped when `json_field` is `None`.
    pub fn new(sources: Vec<TimeSource>, json_field: Option<String>) -> Self {
        Self {
            sources,
            json_field,
        }
    }

    /// Dates one message from its record timestamp and payload.
    #[inline]
    pub fn date(&self, timestamp: Timestamp, payload: Option<&[u8]>) -> EventTime {
        for source in &self.sources {
            match source {
                TimeSource::CreateTime => {
                    if let Timestamp::CreateTime(ms) = timestamp
                        && plausible(ms)
                    {
                        return EventTime::Timed(ms);
                    }
                }
                TimeSource::JsonField => {
                    let Some(field) = self.json_field.as_deref() else {
                        continue;
                    };
                    let Some(payload) = payload else {
                        // A tombstone has nothing to parse.
                        continue;
                    };
                    match json_time(payload, field) {
                        Ok(Some(ms)) => return EventTime::Timed(ms),
                        Ok(None) => {}
                        Err(Unparsable) => return EventTime::Malformed,
                    }
                }
            }
        }
        EventTime::Untimed
    }
}

fn plausible(ms: i64) -> bool {
    (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&ms)
}

/// A payload that cannot be parsed for an event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("payload is not a JSON object with a plausible event time")]
pub struct Unparsable;

/// Reads `field` from a JSON object payload: `Ok(None)` when the object lacks it, `Err` when
/// the payload is not a JSON object or the field is not a plausible time.
pub fn json_time(payload: &[u8], field: &str) -> Result<Option<i64>, Unparsable> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let raw = FindField(field)
        .deserialize(&mut de)
        .map_err(|_| Unparsable)?;
    de.end().map_err(|_| Unparsable)?;
    match raw {
        None => Ok(None),
        Some(raw) => raw
            .to_millis()
            .filter(|ms| plausible(*ms))
            .map(Some)
            .ok_or(Unparsable),
    }
}

/// A JSON time value before unit detection.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Int(i128),
    Float(f64),
    Text(String),
}

impl Raw {
    fn to_millis(&self) -> Option<i64> {
        match self {
            Raw::Int(n) => Some(scale_int(*n)),
            Raw::Float(f) => scale_float(*f),
            Raw::Text(s) => {
                let t = s.trim();
                if let Ok(n) = t.parse::<i128>() {
                    Some(scale_int(n))
                } else if let Ok(f) = t.parse::<f64>() {
                    scale_float(f)
                } else {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .ok()
                        .map(|d| d.timestamp_millis())
                }
            }
        }
    }
}

/// Seconds below 1e11, milliseconds below 1e14, microseconds below 1e17, else nanoseconds.
fn scale_int(n: i128) -> i64 {
    let a = n.abs();
    let ms = if a < 100_000_000_000 {
        n * 1_000
    } else if a < 100_000_000_000_000 {
        n
    } else if a < 100_000_000_000_000_000 {
        n / 1_000
    } else {
        n / 1_000_000
    };
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn scale_float(f: f64) -> Option<i64> {
    if !f.is_finite() {
        return None;
    }
    let a = f.abs();
    let ms = if a < 1e11 {
        f * 1e3
    } else if a < 1e14 {
        f
    } else if a < 1e17 {
        f / 1e3
    } else {
        f / 1e6
    };
    if ms.abs() < 9.0e18 {
        Some(ms.floor() as i64)
    } else {
        None
    }
}

/// Finds one top-level field of a JSON object without building the object.
struct FindField<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FindField<'_> {
    type Value = Option<Raw>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FindField<'_> {
    type Value = Option<Raw>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.0))? {
            if is_field && found.is_none() {
                found = Some(map.next_value_seed(RawSeed)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Compares a key with the wanted field name without allocating.
struct KeyIs<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

struct RawSeed;

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Raw;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RawSeed {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a string")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Text(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_067_201_250; // 2025-11-25T10:40:01.250Z

    fn json_first() -> Dater {
        Dater::new(
            vec![TimeSource::JsonField, TimeSource::CreateTime],
            Some("ts".into()),
        )
    }

    #[test]
    fn create_time_is_preferred_by_default() {
        let d = Dater::new(
            vec![TimeSource::CreateTime, TimeSource::JsonField],
            Some("ts".into()),
        );
        assert_eq!(
            d.date(Timestamp::CreateTime(T), Some(b"garbage")),
            EventTime::Timed(T)
        );
        // LogAppendTime is not an event time: fall through to the payload.
        assert_eq!(
            d.date(Timestamp::LogAppendTime(T), Some(br#"{"ts": 1764067201}"#)),
            EventTime::Timed(1_764_067_201_000)
        );
        assert_eq!(
            d.date(Timestamp::NotAvailable, Some(br#"{"x": 1}"#)),
            EventTime::Untimed
        );
    }

    #[test]
    fn units_are_detected() {
        let d = json_first();
        let cases: [(&[u8], i64); 7] = [
            (br#"{"ts": 1764067201}"#, 1_764_067_201_000),
            (br#"{"ts": 1764067201.25}"#, T),
            (br#"{"ts": 1764067201250}"#, T),
            (br#"{"ts": 1764067201250123}"#, T),
            (br#"{"ts": 1764067201250123456}"#, T),
            (br#"{"a": {"ts": 1}, "ts": "1764067201250"}"#, T),
            (br#"{"ts": "2025-11-25T10:40:01.250Z", "b": [1, 2]}"#, T),
        ];
        for (payload, want) in cases {
            assert_eq!(
                d.date(Timestamp::NotAvailable, Some(payload)),
                EventTime::Timed(want),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn garbage_is_malformed_never_skipped() {
        let d = json_first();
        for payload in [
            &b"\xff\xfe not json"[..],
            b"",
            b"[1, 2]",
            b"{\"ts\": true}",
            b"{\"ts\": \"yesterday\"}",
            b"{\"ts\": 12}",
            b"{\"ts\": 1764067201} trailing",
            b"{\"ts\": 1764067201",
        ] {
            assert_eq!(
                d.date(Timestamp::CreateTime(T), Some(payload)),
                EventTime::Malformed,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn missing_field_falls_through() {
        let d = json_first();
        assert_eq!(
            d.date(Timestamp::CreateTime(T), Some(br#"{"other": 1}"#)),
            EventTime::Timed(T)
        );
        assert_eq!(d.date(Timestamp::CreateTime(T), None), EventTime::Timed(T));
        let only_json = Dater::new(vec![TimeSource::JsonField], Some("ts".into()));
        assert_eq!(
            only_json.date(Timestamp::CreateTime(T), Some(br#"{"other": 1}"#)),
            EventTime::Untimed
        );
    }

    #[test]
    fn implausible_record_timestamps_are_untimed() {
        let d = Dater::new(vec![TimeSource::CreateTime], None);
        assert_eq!(d.date(Timestamp::CreateTime(0), None), EventTime::Untimed);
        assert_eq!(d.date(Timestamp::CreateTime(-5), None), EventTime::Untimed);
    }
}
