//! Durations in configuration: the one rule of the whole workspace (audit-lib, chaperone-service
//! and the collector, files and command-line flags alike).
//!
//! A duration is text with a unit, read by [`humantime`]: `"250ms"`, `"30s"`, `"5m"`,
//! `"1h 30m"`, `"7d"`. A bare number (`60000`, or `"60000"`) is an error that suggests the
//! fix, because the same number used to mean milliseconds in one crate and seconds in
//! another. Use with `#[serde(with = "chaperone_audit::duration")]` on a
//! [`std::time::Duration`] field; [`parse`] serves command-line flags.
//!
//! It lives here, in the record contract crate, rather than in the daemons' internal crate
//! because [`crate::AuditConfig`] needs the same rule and producers link only this crate; its
//! single dependency, `humantime`, has no dependencies of its own.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// A number without a unit.
    #[error("`{given}`: a duration needs a unit, such as {suggestion}")]
    UnitNeeded {
        /// The number as written.
        given: String,
        /// What to write instead.
        suggestion: String,
    },
    /// Anything else humantime refuses (an unknown unit, no number, an overflow).
    #[error("`{given}` is not a duration such as \"30s\", \"250ms\" or \"1h 30m\": {reason}")]
    Invalid {
        /// The text as written.
        given: String,
        /// humantime's reason.
        reason: String,
    },
}

fn unit_needed(given: String, whole: Option<u64>) -> DurationError {
    let suggestion = match whole {
        Some(n) if n >= 1_000 && n.is_multiple_of(1_000) => {
            format!("\"{}s\" or \"{n}ms\"", n / 1_000)
        }
        _ => format!("\"{given}s\" or \"{given}ms\""),
    };
    DurationError::UnitNeeded { given, suggestion }
}

/// Reads a duration with a unit (`"250ms"`, `"30s"`, `"5m"`, `"1h 30m"`, `"7d"`).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(unit_needed(t.to_owned(), t.parse().ok()));
    }
    humantime::parse_duration(t).map_err(|e| DurationError::Invalid {
        given: text.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a duration the way [`parse`] reads it (`"1m 30s"`, `"250ms"`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serializes a duration as text with units.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// Deserializes a duration from text with a unit; a bare number is an error that suggests
/// the fix (TOML shows the offending `key = value` line with it).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration with a unit, such as \"30s\" or \"250ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(E::custom(unit_needed(v.to_string(), Some(v))))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(E::custom(unit_needed(v.to_string(), u64::try_from(v).ok())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(unit_needed(v.to_string(), None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
    struct Holder {
        #[serde(with = "super")]
        d: Duration,
    }

    #[test]
    fn reads_units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn a_bare_number_needs_a_unit_and_the_error_says_which() {
        let e = parse("60000").unwrap_err().to_string();
        assert_eq!(
            e,
            "`60000`: a duration needs a unit, such as \"60s\" or \"60000ms\""
        );
        let e = parse("30").unwrap_err().to_string();
        assert!(e.contains("\"30s\" or \"30ms\""), "{e}");
        assert!(parse("1.5").is_err());
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for bad in ["", "s", "5 parsecs", "-1s", "99999999999999999999d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_refuses_bare_numbers_and_round_trips_text() {
        let e = toml::from_str::<Holder>("d = 60000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d = 60000"), "{e}");
        assert!(
            e.contains("needs a unit, such as \"60s\" or \"60000ms\""),
            "{e}"
        );
        let e = serde_json::from_str::<Holder>(r#"{"d": 5}"#).unwrap_err();
        assert!(e.to_string().contains("needs a unit"), "{e}");
        let h: Holder = toml::from_str("d = \"1m 30s\"").expect("parses");
        assert_eq!(h.d, Duration::from_secs(90));
        let text = serde_json::to_string(&h).expect("serializes");
        assert_eq!(text, r#"{"d":"1m 30s"}"#);
        assert_eq!(serde_json::from_str::<Holder>(&text).expect("reads"), h);
    }
}
