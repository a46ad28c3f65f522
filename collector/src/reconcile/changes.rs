//! What the reconciler hands on: each changed topic-level verdict of an alerting edge goes,
//! inside the transaction that writes it, to an [`IncidentRecorder`]. The alert stage's
//! incidents and outbox implement it; `lib.rs` wires them, so the reconciler imports nothing
//! of the stages above it.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::model::VerdictStatus;
use crate::store::Prune;

/// A changed topic-level verdict of an alerting edge.
#[derive(Debug, Clone, Copy)]
pub struct ChangedVerdict<'a> {
    /// Logical topic.
    pub topic: &'a str,
    /// Edge name.
    pub edge: &'a str,
    /// Datacenter compared, '' for edges summed over datacenters.
    pub datacenter: &'a str,
    /// Upstream tier.
    pub from_tier: &'a str,
    /// Downstream tier.
    pub to_tier: &'a str,
    /// The new verdict.
    pub status: VerdictStatus,
    /// For `tier_silent`, the silent tier.
    pub silent_tier: Option<&'a str>,
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Messages counted upstream.
    pub expected: i64,
    /// Messages counted downstream.
    pub actual: i64,
    /// Whether the verdict it replaces was bad.
    pub was_bad: bool,
    /// The incident of the verdict it replaces.
    pub incident_id: Option<i64>,
}

/// Why a changed verdict could not be handed on; the reconciler's transaction rolls back.
pub type RecordError = Box<dyn std::error::Error + Send + Sync>;

/// The future of [`IncidentRecorder::record`].
pub type Recording<'a> =
    Pin<Box<dyn Future<Output = Result<Option<i64>, RecordError>> + Send + 'a>>;

/// Records what a changed verdict means for incidents, in the reconciler's transaction.
pub trait IncidentRecorder: std::fmt::Debug + Send + Sync {
    /// Opens, joins or resolves the incident of `change` on `conn` (the reconciler's open
    /// transaction) at `now`. Returns the incident the verdict belongs to, or the one it had
    /// when it belongs to none now; it is stored with the verdict.
    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        change: &'a ChangedVerdict<'a>,
        now: DateTime<Utc>,
    ) -> Recording<'a>;

    /// Retention statements of the tables it writes, run after the reconciler's own by
    /// [`super::Reconciler::prune`].
    fn prune(&self) -> &'static [Prune];
}
