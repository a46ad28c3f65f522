//! How the pages write times and durations: UTC to the second, and relative to the
//! collector's clock ("3 min ago").

use chrono::{DateTime, Utc};
use maud::{Markup, html};

/// `2026-01-01 00:00:00 UTC`.
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The UTC time of epoch milliseconds, or the number itself when it is out of range.
pub fn utc_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), utc)
}

/// A duration in its largest whole unit: `850 ms`, `42 s`, `3 min`, `5 h`, `2 d`.
pub fn duration_ms(ms: i64) -> String {
    let a = ms.unsigned_abs();
    let (n, unit) = match a {
        0..1_000 => (a, "ms"),
        1_000..60_000 => (a / 1_000, "s"),
        60_000..3_600_000 => (a / 60_000, "min"),
        3_600_000..86_400_000 => (a / 3_600_000, "h"),
        _ => (a / 86_400_000, "d"),
    };
    format!("{n} {unit}")
}

/// `3 min ago`, `in 2 s` or `now`.
pub fn relative(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let d = (now - t).num_milliseconds();
    if d.abs() < 1_000 {
        "now".to_owned()
    } else if d > 0 {
        format!("{} ago", duration_ms(d))
    } else {
        format!("in {}", duration_ms(d))
    }
}

/// A `<time>` element: UTC, then the relative time; the machine-readable value in
/// `datetime`.
pub fn time(now: DateTime<Utc>, t: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)) title=(utc(t)) {
            (utc(t)) " " span.rel { "(" (relative(now, t)) ")" }
        }
    }
}

/// [`time`] of epoch milliseconds.
pub fn time_ms(now: DateTime<Utc>, ms: i64) -> Markup {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => time(now, t),
        None => html! { (ms) },
    }
}

/// Percent-encodes `s` for a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Link to a topic's page.
pub fn topic_href(topic: &str) -> String {
    format!("/topics/{}", encode(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(ms).expect("time")
    }

    #[test]
    fn writes_utc_and_relative_times() {
        let t = at(1_767_225_600_000);
        assert_eq!(utc(t), "2026-01-01 00:00:00 UTC");
        assert_eq!(utc_ms(1_767_225_600_000), "2026-01-01 00:00:00 UTC");
        assert_eq!(relative(at(1_767_225_780_000), t), "3 min ago");
        assert_eq!(relative(at(1_767_225_598_000), t), "in 2 s");
        assert_eq!(relative(at(1_767_225_600_400), t), "now");
        assert_eq!(
            relative(at(1_767_225_600_000 + 2 * 86_400_000), t),
            "2 d ago"
        );
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(-5 * 3_600_000), "5 h");
    }

    #[test]
    fn time_elements_carry_both() {
        let t = at(1_767_225_600_000);
        let html = time(at(1_767_225_660_000), t).into_string();
        assert!(html.contains("2026-01-01 00:00:00 UTC"), "{html}");
        assert!(html.contains("(1 min ago)"), "{html}");
        assert!(
            html.contains("datetime=\"2026-01-01T00:00:00.000Z\""),
            "{html}"
        );
    }
}
