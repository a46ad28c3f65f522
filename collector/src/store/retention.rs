//! Retention: one job deletes what outlived its retention, in batches, so that no
//! transaction holds locks for long: counts, record ids, bucket changes, progress and topics
//! after `retention.days`, verdicts, their history and settled incidents after
//! `reconcile.retention_days`.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres};

use super::StoreError;
use super::write::relax_commit;
use crate::job::{First, Pace, Periodic};

/// Rows removed by one retention run, by table.
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

/// Deletes count rows of buckets that started before `cutoff_ms`, and record ids, streams'
/// applied ranges, bucket changes, progress rows, topics and parked records last touched
/// before `cutoff_at`, `batch` rows per transaction.
pub async fn delete_expired(
    pool: &PgPool,
    cutoff_ms: i64,
    cutoff_at: DateTime<Utc>,
    batch: i64,
) -> Result<RetentionOutcome, StoreError> {
    let counts = delete_in_batches(
        pool,
        "DELETE FROM audit_counts WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM audit_counts WHERE bucket_start_ms < $1 LIMIT $2))",
        |q| q.bind(cutoff_ms).bind(batch),
        batch,
    )
    .await?;
    let record_ids =
        delete_before(pool, "audit_record_seen", "ingested_at", cutoff_at, batch).await?;
    let record_ranges =
        delete_before(pool, "audit_record_ranges", "updated_at", cutoff_at, batch).await?;
    let changes =
        delete_before(pool, "audit_count_changes", "changed_at", cutoff_at, batch).await?;
    let progress = delete_before(pool, "audit_progress", "last_seen_at", cutoff_at, batch).await?;
    let topics = delete_in_batches(
        pool,
        "DELETE FROM audit_topics WHERE ctid = ANY(ARRAY( \
             SELECT t.ctid FROM audit_topics t WHERE t.last_seen_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM audit_counts c WHERE c.topic = t.topic) LIMIT $2))",
        |q| q.bind(cutoff_at).bind(batch),
        batch,
    )
    .await?;
    let parked = delete_before(pool, "ingest_parked", "parked_at", cutoff_at, batch).await?;
    let out = RetentionOutcome {
        counts,
        record_ids,
        record_ranges,
        changes,
        progress,
        topics,
        parked,
    };
    Ok(out)
}

/// Deletes expired rows every `config.interval` until `shutdown`: counts and progress older
/// than `config.days`, verdicts and settled incidents older than `verdict_days` (0 keeps
/// either). Failures are logged and retried at the next interval.
pub async fn run_retention(
    pool: PgPool,
    config: crate::config::RetentionConfig,
    verdict_days: u32,
    clock: chaperone_daemon_support::Clock,
    metrics: crate::metrics::IngestMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if config.days == 0 && verdict_days == 0 {
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
    let (pool, config, metrics) = (&pool, &config, &metrics);
    job.run(&shutdown, move || {
        let now = clock.now();
        async move { run_once(pool, config, verdict_days, now, metrics).await }
    })
    .await;
}

/// One retention run at `now`.
async fn run_once(
    pool: &PgPool,
    config: &crate::config::RetentionConfig,
    verdict_days: u32,
    now: DateTime<Utc>,
    metrics: &crate::metrics::IngestMetrics,
) -> Result<(), StoreError> {
    if config.days > 0 {
        let cutoff_at = now - chrono::Duration::days(i64::from(config.days));
        let out = delete_expired(
            pool,
            cutoff_at.timestamp_millis(),
            cutoff_at,
            config.batch_size,
        )
        .await?;
        for (table, n) in [
            ("audit_counts", out.counts),
            ("audit_record_seen", out.record_ids),
            ("audit_record_ranges", out.record_ranges),
            ("audit_count_changes", out.changes),
            ("audit_progress", out.progress),
            ("audit_topics", out.topics),
            ("ingest_parked", out.parked),
        ] {
            metrics
                .retention_deleted
                .with_label_values(&[table])
                .inc_by(n);
        }
        tracing::info!(
            %cutoff_at,
            counts = out.counts,
            record_ids = out.record_ids,
            record_ranges = out.record_ranges,
            changes = out.changes,
            progress = out.progress,
            topics = out.topics,
            parked = out.parked,
            "retention run finished"
        );
    }
    if verdict_days > 0 {
        let deleted = delete_expired_verdicts(pool, verdict_days, now).await?;
        tracing::info!(
            deleted,
            "old verdicts, history and settled incidents deleted"
        );
    }
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Deletes the rows of `table` whose `column` is before `cutoff`, `batch` per transaction.
/// `table` and `column` are names from this file, never input.
async fn delete_before(
    pool: &PgPool,
    table: &str,
    column: &str,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<u64, StoreError> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
    );
    delete_in_batches(pool, &sql, |q| q.bind(cutoff).bind(batch), batch).await
}

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

/// Rows deleted per retention statement.
const VERDICT_BATCH: i64 = 1_000;

/// Deletes verdicts of buckets that started before `now - retention_days`, history entries
/// older than that, and incidents resolved before it with their events and deliveries, in
/// batches of [`VERDICT_BATCH`]. Returns the rows deleted.
pub async fn delete_expired_verdicts(
    pool: &PgPool,
    retention_days: u32,
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    if retention_days == 0 {
        return Ok(0);
    }
    let cutoff = now - chrono::Duration::days(i64::from(retention_days));
    let cutoff_ms = cutoff.timestamp_millis();
    let statements = [
        "DELETE FROM reconcile_verdicts WHERE ctid IN (SELECT ctid FROM reconcile_verdicts
          WHERE bucket_start_ms < $1 LIMIT $3)",
        "DELETE FROM reconcile_verdict_history WHERE id IN (SELECT id
           FROM reconcile_verdict_history WHERE changed_at < $2 LIMIT $3)",
        "DELETE FROM alert_deliveries WHERE id IN (SELECT d.id FROM alert_deliveries d
           JOIN alert_incidents i ON i.id = d.incident_id
          WHERE i.status <> 'open' AND i.resolved_at < $2 LIMIT $3)",
        "DELETE FROM alert_events WHERE id IN (SELECT e.id FROM alert_events e
           JOIN alert_incidents i ON i.id = e.incident_id
          WHERE i.status <> 'open' AND i.resolved_at < $2
            AND NOT EXISTS (SELECT 1 FROM alert_deliveries d WHERE d.event_id = e.id)
          LIMIT $3)",
        "DELETE FROM alert_incidents WHERE id IN (SELECT i.id FROM alert_incidents i
          WHERE i.status <> 'open' AND i.resolved_at < $2
            AND NOT EXISTS (SELECT 1 FROM alert_events e WHERE e.incident_id = i.id)
          LIMIT $3)",
    ];
    let mut deleted = 0;
    for sql in statements {
        loop {
            let n = sqlx::query(sql)
                .bind(cutoff_ms)
                .bind(cutoff)
                .bind(VERDICT_BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            deleted += n;
            if n < VERDICT_BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}
