//! Retention: one job deletes what outlived its retention, in batches, so that no
//! transaction holds locks for long. Each stage names its own tables' statements in the one
//! [`Prune`] shape (the store's are [`PRUNE`]); the job runs the stages it is given, each with
//! its own days (counts and progress after `retention.days`; verdicts, their history and
//! settled incidents after `reconcile.retention_days`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::{PgPool, Postgres};

use super::StoreError;
use super::write::relax_commit;
use crate::job::{First, Pace, Periodic};

/// Deletion of old data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Buckets that started more than this many days ago are deleted, and so are record ids
    /// and progress rows older than that. 0 keeps everything.
    pub days: u32,
    /// Rows deleted per statement, so retention never holds long locks.
    pub batch_size: i64,
    /// How often the retention job runs.
    #[serde(with = "chaperone_audit::duration")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            days: 30,
            batch_size: 5_000,
            interval: Duration::from_secs(3_600),
        }
    }
}

/// One table's retention, in the stage that owns the table: a statement that deletes at most
/// `$2` rows of `table` older than the cutoff `$1`, run until it deletes fewer.
#[derive(Debug, Clone, Copy)]
pub struct Prune {
    /// The table, as named in metrics and logs.
    pub table: &'static str,
    /// What `$1` is.
    pub by: Cutoff,
    delete: Delete,
}

#[derive(Debug, Clone, Copy)]
enum Delete {
    /// The rows whose column is before the cutoff.
    Older(&'static str),
    /// A batch `DELETE` of its own.
    Sql(&'static str),
}

impl Prune {
    /// The rows of `table` whose `column` is before the cutoff.
    pub const fn older(table: &'static str, column: &'static str, by: Cutoff) -> Self {
        Self {
            table,
            by,
            delete: Delete::Older(column),
        }
    }

    /// The rows `sql` deletes: at most `$2` of them, older than the cutoff `$1`.
    pub const fn sql(table: &'static str, by: Cutoff, sql: &'static str) -> Self {
        Self {
            table,
            by,
            delete: Delete::Sql(sql),
        }
    }

    fn statement(&self) -> std::borrow::Cow<'static, str> {
        match self.delete {
            Delete::Older(column) => format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))",
                table = self.table
            )
            .into(),
            Delete::Sql(sql) => sql.into(),
        }
    }
}

/// What a [`Prune`] statement compares with its cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// Bucket starts, epoch ms (`bigint`).
    BucketStart,
    /// A time the row was last touched (`timestamptz`).
    Touched,
}

/// The store's own tables: counts of buckets that started before the cutoff; record ids,
/// streams' applied ranges, bucket changes, progress rows, topics (without counts) and parked
/// records last touched before it.
pub const PRUNE: &[Prune] = &[
    Prune::older("audit_counts", "bucket_start_ms", Cutoff::BucketStart),
    Prune::older("audit_record_seen", "ingested_at", Cutoff::Touched),
    Prune::older("audit_record_ranges", "updated_at", Cutoff::Touched),
    Prune::older("audit_count_changes", "changed_at", Cutoff::Touched),
    Prune::older("audit_progress", "last_seen_at", Cutoff::Touched),
    Prune::sql(
        "audit_topics",
        Cutoff::Touched,
        "DELETE FROM audit_topics WHERE ctid = ANY(ARRAY( \
             SELECT t.ctid FROM audit_topics t WHERE t.last_seen_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM audit_counts c WHERE c.topic = t.topic) LIMIT $2))",
    ),
    Prune::older("ingest_parked", "parked_at", Cutoff::Touched),
];

/// Runs `statements` in order, each in batches of `batch` rows (one transaction each, so that
/// none holds locks for long) until a batch deletes fewer: bucket starts are compared with
/// `cutoff_ms`, times with `cutoff_at`. Returns the rows deleted per table.
pub async fn prune(
    pool: &PgPool,
    statements: &[Prune],
    cutoff_ms: i64,
    cutoff_at: DateTime<Utc>,
    batch: i64,
) -> Result<Vec<(&'static str, u64)>, StoreError> {
    let mut out = Vec::with_capacity(statements.len());
    for p in statements {
        let n = delete_in_batches(
            pool,
            &p.statement(),
            |q| match p.by {
                Cutoff::BucketStart => q.bind(cutoff_ms).bind(batch),
                Cutoff::Touched => q.bind(cutoff_at).bind(batch),
            },
            batch,
        )
        .await?;
        out.push((p.table, n));
    }
    Ok(out)
}

/// Rows removed from the store's own tables by one retention run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// `audit_counts` rows.
    pub counts: u64,
    /// `audit_record_seen` rows (ids of applied counts records).
    pub record_ids: u64,
    /// `audit_record_ranges` rows (applied sequence numbers of a stream of counts records).
    pub record_ranges: u64,
    /// `audit_count_changes` rows.
    pub changes: u64,
    /// `audit_progress` rows.
    pub progress: u64,
    /// `audit_topics` rows.
    pub topics: u64,
    /// `ingest_parked` rows (records the dead-letter topic would not take).
    pub parked: u64,
}

/// Prunes the store's own tables ([`PRUNE`]): count rows of buckets that started before
/// `cutoff_ms`, and the rest last touched before `cutoff_at`, `batch` rows per transaction.
pub async fn delete_expired(
    pool: &PgPool,
    cutoff_ms: i64,
    cutoff_at: DateTime<Utc>,
    batch: i64,
) -> Result<RetentionOutcome, StoreError> {
    let deleted = prune(pool, PRUNE, cutoff_ms, cutoff_at, batch).await?;
    let of = |table: &str| {
        deleted
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(0, |&(_, n)| n)
    };
    Ok(RetentionOutcome {
        counts: of("audit_counts"),
        record_ids: of("audit_record_seen"),
        record_ranges: of("audit_record_ranges"),
        changes: of("audit_count_changes"),
        progress: of("audit_progress"),
        topics: of("audit_topics"),
        parked: of("ingest_parked"),
    })
}

/// One stage's tables and how long they are kept.
#[derive(Debug, Clone, Copy)]
pub struct Kept {
    /// Days kept; 0 keeps everything.
    pub days: u32,
    /// The stage's [`Prune`] statements.
    pub prune: &'static [Prune],
}

impl Kept {
    /// Deletes what is older than `days` before `now`, `batch` rows per transaction (nothing
    /// when `days` is 0). Returns the rows deleted per table.
    pub async fn prune_older(
        &self,
        pool: &PgPool,
        now: DateTime<Utc>,
        batch: i64,
    ) -> Result<Vec<(&'static str, u64)>, StoreError> {
        if self.days == 0 {
            return Ok(Vec::new());
        }
        let cutoff_at = now - chrono::Duration::days(i64::from(self.days));
        prune(
            pool,
            self.prune,
            cutoff_at.timestamp_millis(),
            cutoff_at,
            batch,
        )
        .await
    }
}

/// Every `config.interval` until `shutdown`, prunes each stage's tables of what is older than
/// its days (`kept`, in order), `config.batch_size` rows per transaction. Failures are logged
/// and retried at the next interval.
pub async fn run_retention(
    pool: PgPool,
    config: RetentionConfig,
    kept: Vec<Kept>,
    clock: chaperone_daemon_support::Clock,
    metrics: crate::metrics::IngestMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if kept.iter().all(|k| k.days == 0) {
        tracing::info!("retention disabled");
        return;
    }
    let job = Periodic {
        failed: Some("retention run failed; retrying at the next interval"),
        abandoned: "retention run abandoned at shutdown",
        pace: Pace::Every(config.interval),
        first: First::Now,
        finish_within: None,
        runs: Some(metrics.retention_runs.clone()),
    };
    let (pool, config, kept, metrics) = (&pool, &config, &kept, &metrics);
    job.run(&shutdown, move || {
        let now = clock.now();
        async move { run_once(pool, config, kept, now, metrics).await }
    })
    .await;
}

/// One retention run at `now`.
async fn run_once(
    pool: &PgPool,
    config: &RetentionConfig,
    kept: &[Kept],
    now: DateTime<Utc>,
    metrics: &crate::metrics::IngestMetrics,
) -> Result<(), StoreError> {
    for k in kept.iter().filter(|k| k.days > 0) {
        let deleted = k.prune_older(pool, now, config.batch_size).await?;
        for &(table, n) in &deleted {
            metrics
                .retention_deleted
                .with_label_values(&[table])
                .inc_by(n);
        }
        tracing::info!(days = k.days, ?deleted, "retention run finished");
    }
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

async fn delete_in_batches(
    pool: &PgPool,
    sql: &str,
    bind: impl for<'q> Fn(PgQuery<'q>) -> PgQuery<'q>,
    batch: i64,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let mut tx = pool.begin().await?;
        relax_commit(&mut tx).await?;
        let n = bind(sqlx::query(sql))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        total += n;
        if n < u64::try_from(batch).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}
