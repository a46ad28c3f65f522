//! Event-time buckets aligned to the Unix epoch.
//!
//! Every hop puts a message into the bucket that holds its event time. Bucket math is a
//! pure function of (event time, width) so that every host, whatever its clock, agrees on
//! the bucket of a message.

use std::fmt;
use std::time::Duration;

/// Default bucket width: one minute.
pub const DEFAULT_WIDTH: BucketWidth = BucketWidth(60_000);

/// The narrowest bucket the contract accepts (one second).
pub const MIN_WIDTH_MS: i64 = 1_000;

/// The widest bucket the contract accepts (one day).
pub const MAX_WIDTH_MS: i64 = 86_400_000;

/// A validated bucket width in whole seconds, between [`MIN_WIDTH_MS`] and [`MAX_WIDTH_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketWidth(i64);

/// A bucket width that the contract does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bucket width {0} ms is invalid: it must be whole seconds between 1 s and 1 day")]
pub struct InvalidWidth(pub i64);

impl BucketWidth {
    /// Builds a width from milliseconds, rejecting widths that are not whole seconds or are
    /// outside 1 s ..= 1 day.
    pub fn from_millis(ms: i64) -> Result<Self, InvalidWidth> {
        if (MIN_WIDTH_MS..=MAX_WIDTH_MS).contains(&ms) && ms % 1_000 == 0 {
            Ok(Self(ms))
        } else {
            Err(InvalidWidth(ms))
        }
    }

    /// Builds a width from a [`Duration`].
    pub fn from_duration(d: Duration) -> Result<Self, InvalidWidth> {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self::from_millis(ms)
    }

    /// The width in milliseconds.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Start (inclusive, epoch milliseconds) of the bucket that holds `event_ms`.
    ///
    /// Works for times before the epoch too: the bucket of -1 ms starts at `-width`.
    pub fn start_of(self, event_ms: i64) -> i64 {
        event_ms.div_euclid(self.0) * self.0
    }

    /// End (exclusive) of the bucket that starts at `start_ms`.
    pub fn end_of(self, start_ms: i64) -> i64 {
        start_ms.saturating_add(self.0)
    }

    /// Whether `start_ms` is the start of a bucket of this width.
    pub fn is_aligned(self, start_ms: i64) -> bool {
        start_ms.rem_euclid(self.0) == 0
    }
}

impl Default for BucketWidth {
    fn default() -> Self {
        DEFAULT_WIDTH
    }
}

impl fmt::Display for BucketWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0 / 1_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn width() -> impl Strategy<Value = BucketWidth> {
        (1i64..=86_400).prop_map(|s| BucketWidth::from_millis(s * 1_000).expect("valid width"))
    }

    proptest! {
        #[test]
        fn bucket_holds_its_event(t in -4_102_444_800_000i64..4_102_444_800_000, w in width()) {
            let start = w.start_of(t);
            prop_assert!(start <= t);
            prop_assert!(t < w.end_of(start));
            prop_assert!(w.is_aligned(start));
            prop_assert_eq!(w.start_of(start), start);
        }

        #[test]
        fn neighbours_are_contiguous(t in -4_102_444_800_000i64..4_102_444_800_000, w in width()) {
            let start = w.start_of(t);
            prop_assert_eq!(w.start_of(start - 1), start - w.as_millis());
            prop_assert_eq!(w.start_of(w.end_of(start)), w.end_of(start));
        }

        #[test]
        fn widths_that_do_not_divide_an_hour_stay_epoch_aligned(hours in -500_000i64..500_000) {
            // 7 s and 7 min do not divide an hour: buckets are aligned to the epoch, not to hours.
            for secs in [7i64, 420, 3_599] {
                let w = BucketWidth::from_millis(secs * 1_000).expect("valid width");
                let t = hours * 3_600_000;
                prop_assert_eq!(w.start_of(t) % (secs * 1_000), 0);
                prop_assert!(t - w.start_of(t) < secs * 1_000);
            }
        }
    }

    #[test]
    fn negative_times_round_down() {
        let w = BucketWidth::from_millis(60_000).expect("valid width");
        assert_eq!(w.start_of(-1), -60_000);
        assert_eq!(w.start_of(-60_000), -60_000);
        assert_eq!(w.start_of(-60_001), -120_000);
        assert_eq!(w.start_of(0), 0);
    }

    #[test]
    fn leap_day_has_its_own_daily_bucket() {
        let day = BucketWidth::from_millis(MAX_WIDTH_MS).expect("valid width");
        let leap = Utc
            .with_ymd_and_hms(2024, 2, 29, 13, 37, 0)
            .unwrap()
            .timestamp_millis();
        let midnight = Utc
            .with_ymd_and_hms(2024, 2, 29, 0, 0, 0)
            .unwrap()
            .timestamp_millis();
        let next = Utc
            .with_ymd_and_hms(2024, 3, 1, 0, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(day.start_of(leap), midnight);
        assert_eq!(day.end_of(midnight), next);
        let last_ms_of_leap_day = next - 1;
        assert_eq!(day.start_of(last_ms_of_leap_day), midnight);
    }

    #[test]
    fn rejects_bad_widths() {
        assert!(BucketWidth::from_millis(0).is_err());
        assert!(BucketWidth::from_millis(-60_000).is_err());
        assert!(BucketWidth::from_millis(1_500).is_err());
        assert!(BucketWidth::from_millis(MAX_WIDTH_MS + 1_000).is_err());
        assert_eq!(BucketWidth::default().as_millis(), 60_000);
    }
}
