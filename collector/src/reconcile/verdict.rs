//! The judgement itself: a pure function of counts, progress marks and the time, so that the
//! rules can be read (and tested) without a database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The verdict on one bucket of one edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictStatus {
    /// The downstream tier saw exactly what the upstream tier saw.
    Complete,
    /// The downstream tier saw fewer messages than the upstream tier.
    Missing,
    /// The downstream tier saw more messages than the upstream tier.
    Duplicated,
    /// A tier that should report progress did not get past the bucket.
    TierSilent,
}

impl VerdictStatus {
    /// Every status, in a stable order.
    pub const ALL: [VerdictStatus; 4] = [
        VerdictStatus::Complete,
        VerdictStatus::Missing,
        VerdictStatus::Duplicated,
        VerdictStatus::TierSilent,
    ];

    /// The status as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictStatus::Complete => "complete",
            VerdictStatus::Missing => "missing",
            VerdictStatus::Duplicated => "duplicated",
            VerdictStatus::TierSilent => "tier_silent",
        }
    }

    /// Whether the status is something to tell people about.
    pub fn is_bad(self) -> bool {
        self != VerdictStatus::Complete
    }
}

impl fmt::Display for VerdictStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a verdict status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown verdict status `{0}` (expected complete, missing, duplicated or tier_silent)")]
pub struct UnknownStatus(pub String);

impl FromStr for VerdictStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VerdictStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Why a bucket was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finality {
    /// Every partition of the tiers progressed past the bucket end plus the allowed lateness.
    Progress,
    /// The maximum wait after the bucket end passed.
    MaxWait,
}

impl Finality {
    /// The reason as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Finality::Progress => "progress",
            Finality::MaxWait => "max_wait",
        }
    }
}

/// Which side of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The upstream (`from`) tier.
    Upstream,
    /// The downstream (`to`) tier.
    Downstream,
}

/// Whether a bucket ending at `bucket_end_ms` can be judged at `now_ms`.
///
/// Final by progress when the downstream tier has reported at least one partition and every
/// partition of both tiers (upstream ones, when it reports any) has a watermark at or past
/// `bucket_end_ms + lateness_ms`; final anyway once `now_ms >= bucket_end_ms + max_wait_ms`.
pub fn finality(
    bucket_end_ms: i64,
    lateness_ms: i64,
    max_wait_ms: i64,
    now_ms: i64,
    upstream_watermarks: &[i64],
    downstream_watermarks: &[i64],
) -> Option<Finality> {
    let due = bucket_end_ms.saturating_add(lateness_ms);
    if !downstream_watermarks.is_empty()
        && downstream_watermarks.iter().all(|&w| w >= due)
        && upstream_watermarks.iter().all(|&w| w >= due)
    {
        Some(Finality::Progress)
    } else if now_ms >= bucket_end_ms.saturating_add(max_wait_ms) {
        Some(Finality::MaxWait)
    } else {
        None
    }
}

/// A judged bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    /// The verdict.
    pub status: VerdictStatus,
    /// For [`VerdictStatus::TierSilent`], which tier was silent.
    pub silent: Option<Side>,
}

/// Judges a final bucket.
///
/// * zero messages on both sides: complete, whatever the progress marks say;
/// * the downstream tier has no partition whose watermark reached `bucket_end_ms`: tier silent
///   (downstream);
/// * the upstream tier counted nothing, the downstream tier counted something and no upstream
///   partition reached `bucket_end_ms`: tier silent (upstream), not duplicated;
/// * otherwise the counts decide: missing, duplicated or complete.
pub fn judge(
    bucket_end_ms: i64,
    expected: i64,
    actual: i64,
    upstream_watermarks: &[i64],
    downstream_watermarks: &[i64],
) -> Judgement {
    let reached = |w: &[i64]| w.iter().any(|&w| w >= bucket_end_ms);
    let (status, silent) = if expected == 0 && actual == 0 {
        (VerdictStatus::Complete, None)
    } else if !reached(downstream_watermarks) {
        (VerdictStatus::TierSilent, Some(Side::Downstream))
    } else if expected == 0 && !reached(upstream_watermarks) {
        (VerdictStatus::TierSilent, Some(Side::Upstream))
    } else if actual < expected {
        (VerdictStatus::Missing, None)
    } else if actual > expected {
        (VerdictStatus::Duplicated, None)
    } else {
        (VerdictStatus::Complete, None)
    };
    Judgement { status, silent }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: i64 = 120_000;

    #[test]
    fn final_when_every_downstream_partition_is_past_lateness() {
        assert_eq!(
            finality(END, 10, 1_000, 0, &[], &[END + 10, END + 50]),
            Some(Finality::Progress)
        );
        assert_eq!(finality(END, 10, 1_000, 0, &[], &[END + 10, END + 9]), None);
        assert_eq!(
            finality(END, 10, 1_000, 0, &[END], &[END + 10]),
            None,
            "upstream lags"
        );
        assert_eq!(
            finality(END, 10, 1_000, 0, &[], &[]),
            None,
            "no downstream progress"
        );
        assert_eq!(finality(END, 10, 1_000, END + 999, &[], &[]), None);
        assert_eq!(
            finality(END, 10, 1_000, END + 1_000, &[], &[]),
            Some(Finality::MaxWait)
        );
    }

    #[test]
    fn counts_decide_once_both_tiers_reported() {
        let j = |e, a| judge(END, e, a, &[END], &[END]).status;
        assert_eq!(j(10, 10), VerdictStatus::Complete);
        assert_eq!(j(10, 7), VerdictStatus::Missing);
        assert_eq!(j(10, 12), VerdictStatus::Duplicated);
        assert_eq!(j(0, 0), VerdictStatus::Complete);
    }

    #[test]
    fn zero_everywhere_is_complete_even_without_progress() {
        assert_eq!(judge(END, 0, 0, &[], &[]).status, VerdictStatus::Complete);
    }

    #[test]
    fn silence_is_told_apart_from_loss() {
        let down = judge(END, 10, 0, &[END], &[END - 1]);
        assert_eq!(down.status, VerdictStatus::TierSilent);
        assert_eq!(down.silent, Some(Side::Downstream));
        let down = judge(END, 10, 0, &[END], &[]);
        assert_eq!(down.silent, Some(Side::Downstream));
        let up = judge(END, 0, 5, &[], &[END]);
        assert_eq!(up.status, VerdictStatus::TierSilent);
        assert_eq!(up.silent, Some(Side::Upstream));
        // An upstream tier that reported progress but counted nothing: duplicates downstream.
        assert_eq!(
            judge(END, 0, 5, &[END], &[END]).status,
            VerdictStatus::Duplicated
        );
        // Upstream counts prove it was there, even without progress.
        assert_eq!(judge(END, 5, 3, &[], &[END]).status, VerdictStatus::Missing);
    }

    #[test]
    fn statuses_round_trip() {
        for s in VerdictStatus::ALL {
            assert_eq!(s.as_str().parse::<VerdictStatus>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("lost".parse::<VerdictStatus>().is_err());
    }
}
