//! The collector's shared vocabulary: types that several stages speak, kept here so that
//! every stage imports them from below instead of from one another. This module imports
//! nothing of the crate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One event-time bucket of one topic: what the reconciler queues and judges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    /// Logical topic.
    pub topic: String,
    /// Bucket start, epoch ms.
    pub start: i64,
    /// Bucket width, ms.
    pub width: i64,
}

impl BucketKey {
    /// The topics, starts and widths of `keys`, as three columns for SQL (`unnest`).
    pub fn columns(keys: &[BucketKey]) -> (Vec<String>, Vec<i64>, Vec<i64>) {
        (
            keys.iter().map(|k| k.topic.clone()).collect(),
            keys.iter().map(|k| k.start).collect(),
            keys.iter().map(|k| k.width).collect(),
        )
    }
}

/// A configuration value that cannot work, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration key `{key}`: {message}")]
#[non_exhaustive]
pub struct ConfigError {
    /// Dotted path of the key, for example `clusters[1].bootstrap`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// A new error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

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
    /// The downstream tier has not shown that it read past the bucket by the maximum wait:
    /// what it lacks may still arrive (delay, not loss).
    Lagging,
    /// The downstream tier saw more than the upstream tier counted, while an upstream
    /// instance that stopped without a clean shutdown may have lost counts of the bucket:
    /// the auditor's own gap, not the pipeline's.
    UpstreamIncomplete,
    /// The downstream tier, a consumer group counting at-least-once, saw more than the
    /// upstream tier: messages processed again after a member stopped between sending its
    /// counts and committing its offsets, which its delivery guarantee allows.
    Redelivered,
}

impl VerdictStatus {
    /// Every status, in a stable order.
    pub const ALL: [VerdictStatus; 7] = [
        VerdictStatus::Complete,
        VerdictStatus::Missing,
        VerdictStatus::Duplicated,
        VerdictStatus::TierSilent,
        VerdictStatus::Lagging,
        VerdictStatus::UpstreamIncomplete,
        VerdictStatus::Redelivered,
    ];

    /// The status as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictStatus::Complete => "complete",
            VerdictStatus::Missing => "missing",
            VerdictStatus::Duplicated => "duplicated",
            VerdictStatus::TierSilent => "tier_silent",
            VerdictStatus::Lagging => "lagging",
            VerdictStatus::UpstreamIncomplete => "upstream_incomplete",
            VerdictStatus::Redelivered => "redelivered",
        }
    }

    /// Whether the status is a fault of the audited pipeline, which opens incidents and
    /// notifies. `lagging` (delay), `upstream_incomplete` (the auditor's own gap) and
    /// `redelivered` (what an at-least-once consumer may do) are stored, served and exported
    /// as metrics, but do not notify.
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            VerdictStatus::Missing | VerdictStatus::Duplicated | VerdictStatus::TierSilent
        )
    }
}

impl fmt::Display for VerdictStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a verdict status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown verdict status `{0}` (expected complete, missing, duplicated, tier_silent, \
     lagging, upstream_incomplete or redelivered)"
)]
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
