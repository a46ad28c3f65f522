//! Tier reconciliation: for every edge of the configured topology (upstream tier -> downstream
//! tier), topic, scope and event-time bucket, decide once the bucket is final whether the
//! downstream tier saw every message the upstream tier saw.
//!
//! * [`config`]: the topology and timing rules ([`ReconcileConfig`]).
//! * [`verdict`]: the rules themselves, pure functions ([`evaluate`], [`judge`]); the model
//!   is written down in `docs/verdicts.md`.
//! * `engine`: one evaluation pass over PostgreSQL: buckets whose counts changed (found through
//!   `audit_count_changes`) are queued; queued buckets that are final get verdicts, written
//!   with their history, incident changes and alert outbox events in one transaction.
//! * [`changes`]: what it hands on: each changed verdict of an alerting edge, to the
//!   [`IncidentRecorder`] it was given (the alert stage's, wired by `lib.rs`).
//! * [`query`]: what the API serves.
//!
//! [`run`] evaluates every `interval`; tests build a [`Reconciler`] on a hand-moved [`crate::Clock`] and
//! call [`Reconciler::evaluate_once`].

pub mod changes;
pub mod config;
mod engine;
pub mod metrics;
pub mod query;
pub mod verdict;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use chaperone_daemon_support::Clock;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use changes::{ChangedVerdict, IncidentRecorder, RecordError, Recording};
pub use config::{ConfigError, EdgeConfig, ReconcileConfig};

use crate::store::{Cutoff, Kept, Prune};

/// Rows deleted per retention statement by [`Reconciler::prune`].
const PRUNE_BATCH: i64 = 1_000;

/// Retention of the reconciler's tables: verdicts of buckets that started before the cutoff,
/// history entries written before it. (`reconcile_pending` and `reconcile_sources_passed`
/// are kept to the lookback by every pass.)
pub const PRUNE: &[Prune] = &[
    Prune::older("reconcile_verdicts", "bucket_start_ms", Cutoff::BucketStart),
    Prune::older("reconcile_verdict_history", "changed_at", Cutoff::Touched),
];
pub use engine::{PassReport, ReconcileError};
pub use metrics::ReconcileMetrics;
pub use query::{Verdict, VerdictChange, latest_verdicts_by_topic, list_verdicts, verdict_history};
pub use verdict::{Finality, VerdictStatus, evaluate, judge};

use crate::ingest::Reach;
use crate::job::{First, Pace, Periodic};

/// Evaluates buckets against a clock.
#[derive(Debug, Clone)]
pub struct Reconciler {
    pool: PgPool,
    config: ReconcileConfig,
    clock: Clock,
    metrics: ReconcileMetrics,
    notices: Arc<Mutex<engine::Notices>>,
    reach: Reach,
    incidents: Arc<dyn IncidentRecorder>,
}

impl Reconciler {
    /// A reconciler over `pool` (migrated) with `config` (validated by the caller), handing
    /// every changed verdict of an alerting edge to `incidents`.
    pub fn new(
        pool: PgPool,
        config: ReconcileConfig,
        clock: Clock,
        metrics: ReconcileMetrics,
        incidents: Arc<dyn IncidentRecorder>,
    ) -> Self {
        Self {
            pool,
            config,
            clock,
            metrics,
            notices: Arc::default(),
            reach: Reach::default(),
            incidents,
        }
    }

    /// Counts an observer's silence only while the cluster it reports through is reachable,
    /// as `reach` says (without it, every cluster counts as always reachable).
    pub fn hearing(self, reach: Reach) -> Self {
        Self { reach, ..self }
    }

    /// Deletes what is older than `retention_days` (see [`ReconcileConfig::retention_days`]),
    /// as the collector's retention job does: verdicts and their history ([`PRUNE`]), then
    /// what its [`IncidentRecorder`] wrote ([`IncidentRecorder::prune`]). Returns the rows
    /// deleted.
    pub async fn prune(&self) -> Result<u64, crate::store::StoreError> {
        let now = self.clock.now();
        let mut deleted = 0;
        for prune in [PRUNE, self.incidents.prune()] {
            let kept = Kept {
                days: self.config.retention_days,
                prune,
            };
            let per_table = kept.prune_older(&self.pool, now, PRUNE_BATCH).await?;
            deleted += per_table.iter().map(|&(_, n)| n).sum::<u64>();
        }
        Ok(deleted)
    }

    /// One pass: queues changed buckets and judges every queued bucket that is final now.
    pub async fn evaluate_once(&self) -> Result<PassReport, ReconcileError> {
        let timer = self.metrics.pass_seconds.start_timer();
        let result = engine::pass(
            &self.pool,
            &self.config,
            self.clock.now(),
            &self.reach,
            self.incidents.as_ref(),
            &self.metrics,
            &self.notices,
        )
        .await;
        timer.observe_duration();
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.passes.with_label_values(&[label]).inc();
        result
    }
}

/// Runs the reconciler on the system clock until `shutdown` is cancelled.
pub async fn run(
    pool: PgPool,
    config: ReconcileConfig,
    incidents: Arc<dyn IncidentRecorder>,
    metrics: ReconcileMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(
        pool,
        config,
        Clock::system(),
        Reach::default(),
        incidents,
        metrics,
        shutdown,
    )
    .await
}

/// Runs the reconciler on `clock` until `shutdown` is cancelled. A failed pass is logged and
/// retried at the next interval; a pass in progress at shutdown is abandoned (its open
/// transaction rolls back).
pub async fn run_with_clock(
    pool: PgPool,
    config: ReconcileConfig,
    clock: Clock,
    reach: Reach,
    incidents: Arc<dyn IncidentRecorder>,
    metrics: ReconcileMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().context("reconcile configuration")?;
    if !config.enabled {
        tracing::info!("reconciliation disabled");
        shutdown.cancelled().await;
        return Ok(());
    }
    let interval = config.interval;
    let reconciler = Reconciler::new(pool, config, clock, metrics, incidents).hearing(reach);
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "reconciler started"
    );
    let job = Periodic {
        failed: Some("reconcile pass failed; retrying next interval"),
        abandoned: "reconcile pass abandoned at shutdown",
        pace: Pace::Every(interval),
        first: First::Now,
        finish_within: None,
        // `evaluate_once` counts its passes (`reconcile_passes_total`).
        runs: None,
    };
    let reconciler = &reconciler;
    job.run(&shutdown, move || async move {
        let report = reconciler.evaluate_once().await?;
        tracing::debug!(
            queued = report.queued,
            evaluated = report.evaluated,
            changed = report.changed,
            pending = report.pending,
            "reconcile pass done"
        );
        Ok::<_, ReconcileError>(())
    })
    .await;
    tracing::info!("reconciler stopped");
    Ok(())
}
