//! What the reconciliation and alert tests share beyond `chaperone-test-support` (where the
//! database, the webhook receiver and polling live): a database dropped whatever the outcome,
//! rows of counts and progress written straight into the ingest tables and a reconciler on a
//! hand-moved clock.
//!
//! Tests fail (never skip) when the PostgreSQL of `dev/stack up` is not there.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chaperone_collector::alerts::Incidents;
use chaperone_collector::reconcile::{
    PassReport, ReconcileConfig, ReconcileMetrics, Reconciler, Verdict,
};
pub use chaperone_test_support::ManualClock;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

// The shared test database, for `use reconcile_support::*`.
pub use chaperone_test_support::TestDb;

/// Start of the first bucket the tests use: 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;
/// Bucket width of the tests.
pub const WIDTH: i64 = 60_000;
/// Allowed lateness of [`config`].
pub const LATENESS: i64 = 30_000;
/// Maximum wait of [`config`].
pub const MAX_WAIT: i64 = 600_000;
/// Settle time of [`config`].
pub const SETTLE: i64 = 5_000;

pub fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().expect("valid time")
}

/// End of the `n`-th bucket after [`T0`].
pub fn end(n: i64) -> i64 {
    T0 + (n + 1) * WIDTH
}

/// Start of the `n`-th bucket after [`T0`].
pub fn start(n: i64) -> i64 {
    T0 + n * WIDTH
}

/// A migrated database of its own for one test, dropped when the value is dropped, also when
/// the test panics.
pub async fn reconcile_db() -> anyhow::Result<TestDb> {
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(10));
    Ok(TestDb::create_with(pool).await?.dropped_on_drop())
}

/// Adds `count` messages seen by `tier` in `datacenter` to one bucket and partition, the way
/// ingest does (a late record adds to the row and records the bucket as changed).
pub async fn add_counts(
    pool: &PgPool,
    topic: &str,
    bucket_start_ms: i64,
    tier: &str,
    datacenter: &str,
    partition: i32,
    count: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_counts (topic, bucket_start_ms, bucket_width_ms, tier, datacenter,
             cluster, partition, count, latency, records)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, ''::bytea, 1)
         ON CONFLICT (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition)
         DO UPDATE SET count = audit_counts.count + EXCLUDED.count,
             records = audit_counts.records + 1, updated_at = now(),
             change_seq = nextval('audit_change_seq')",
    )
    .bind(topic)
    .bind(bucket_start_ms)
    .bind(WIDTH)
    .bind(tier)
    .bind(datacenter)
    .bind(format!("{tier}-{datacenter}"))
    .bind(partition)
    .bind(count)
    .execute(pool)
    .await
    .context("inserting counts")?;
    sqlx::query(
        "INSERT INTO audit_count_changes (topic, bucket_start_ms, bucket_width_ms, tier)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(topic)
    .bind(bucket_start_ms)
    .bind(WIDTH)
    .bind(tier)
    .execute(pool)
    .await
    .context("recording the changed bucket")?;
    Ok(())
}

/// Raises the watermark of one partition of `tier`: for `producer` as the producer instance
/// `test-host/test`, for any other tier as the consumer that owns the partition (a row with a
/// position).
pub async fn progress(
    pool: &PgPool,
    topic: &str,
    tier: &str,
    datacenter: &str,
    partition: i32,
    watermark_ms: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_progress (tier, cluster, datacenter, topic, physical_topic, partition,
             watermark_ms, bucket_width_ms, last_emitted_ms, host, instance, position)
         VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $6, 'test-host', 'test',
             CASE WHEN $1 = 'producer' THEN NULL ELSE 0 END)
         ON CONFLICT (tier, cluster, datacenter, topic, physical_topic, partition, host, instance)
         DO UPDATE SET watermark_ms = greatest(audit_progress.watermark_ms, EXCLUDED.watermark_ms),
             last_emitted_ms = greatest(audit_progress.last_emitted_ms, EXCLUDED.last_emitted_ms),
             last_seen_at = now(), change_seq = nextval('audit_change_seq')",
    )
    .bind(tier)
    .bind(format!("{tier}-{datacenter}"))
    .bind(datacenter)
    .bind(topic)
    .bind(partition)
    .bind(watermark_ms)
    .bind(WIDTH)
    .execute(pool)
    .await
    .context("inserting progress")?;
    Ok(())
}

/// Progress of one producer instance (`host/<instance>`) for `topic` in `datacenter`: its
/// watermark, when it made the record, and whether it said it shut down cleanly.
pub async fn instance_progress(
    pool: &PgPool,
    topic: &str,
    datacenter: &str,
    instance: &str,
    watermark_ms: i64,
    emitted_ms: i64,
    closing: bool,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_progress (tier, cluster, datacenter, topic, physical_topic, partition,
             watermark_ms, bucket_width_ms, last_emitted_ms, host, instance, closing)
         VALUES ('producer', 'producer-' || $1, $1, $2, $2, 0, $3, $4, $5, 'host', $6, $7)
         ON CONFLICT (tier, cluster, datacenter, topic, physical_topic, partition, host, instance)
         DO UPDATE SET watermark_ms = greatest(audit_progress.watermark_ms, EXCLUDED.watermark_ms),
             last_emitted_ms = EXCLUDED.last_emitted_ms, closing = EXCLUDED.closing,
             last_seen_at = now()",
    )
    .bind(datacenter)
    .bind(topic)
    .bind(watermark_ms)
    .bind(WIDTH)
    .bind(emitted_ms)
    .bind(instance)
    .bind(closing)
    .execute(pool)
    .await
    .context("inserting instance progress")?;
    Ok(())
}

/// Every tier of the default topology (producer per topic, regional and aggregate per
/// partition 0) has progressed to `watermark_ms` in `datacenter`.
pub async fn all_progress(
    pool: &PgPool,
    topic: &str,
    datacenter: &str,
    watermark_ms: i64,
) -> anyhow::Result<()> {
    progress(pool, topic, "producer", datacenter, -1, watermark_ms).await?;
    progress(pool, topic, "regional", datacenter, 0, watermark_ms).await?;
    progress(pool, topic, "aggregate", datacenter, 0, watermark_ms).await?;
    Ok(())
}

/// Producers and regional (partition 0) of `datacenter` `dc1` both counted `n` messages of
/// `topic` in bucket 0 and passed it.
pub async fn regional_counted(pool: &PgPool, topic: &str, n: i64) -> anyhow::Result<()> {
    add_counts(pool, topic, start(0), "producer", "dc1", -1, n).await?;
    add_counts(pool, topic, start(0), "regional", "dc1", 0, n).await?;
    progress(pool, topic, "producer", "dc1", -1, end(0) + LATENESS).await?;
    progress(pool, topic, "regional", "dc1", 0, end(0) + LATENESS).await?;
    Ok(())
}

/// The reconciler configuration of the tests: the default topology with short waits.
pub fn config() -> ReconcileConfig {
    ReconcileConfig {
        allowed_lateness: Duration::from_millis(LATENESS as u64),
        max_wait: Duration::from_millis(MAX_WAIT as u64),
        settle: Duration::from_millis(SETTLE as u64),
        ..ReconcileConfig::default()
    }
}

/// A reconciler on a manual clock standing at `now_ms`.
pub fn reconciler(
    pool: &PgPool,
    config: ReconcileConfig,
    now_ms: i64,
) -> (Reconciler, ManualClock) {
    let clock = ManualClock::new(at(now_ms));
    let metrics = ReconcileMetrics::new(&prometheus::Registry::new()).expect("metrics register");
    (
        Reconciler::new(
            pool.clone(),
            config.clone(),
            clock.clock(),
            metrics,
            Arc::new(Incidents::new(&config)),
        ),
        clock,
    )
}

/// Runs one pass, failing the test on error.
pub async fn pass(r: &Reconciler) -> PassReport {
    r.evaluate_once().await.expect("reconcile pass")
}

/// Queues what changed, lets it settle and judges it again: one pass, then another
/// [`SETTLE`] later. Returns the first pass's report.
pub async fn rejudge(r: &Reconciler, clock: &ManualClock) -> PassReport {
    let first = pass(r).await;
    clock.advance(chrono::Duration::milliseconds(SETTLE));
    pass(r).await;
    first
}

/// Marks every progress row of `tier` for `topic` as last seen, and last sent, long ago: the
/// observer stopped reporting.
pub async fn stop_reporting(pool: &PgPool, topic: &str, tier: &str) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE audit_progress SET last_seen_at = '2000-01-01T00:00:00Z',
                last_emitted_ms = last_emitted_ms - 86400000
          WHERE topic = $1 AND tier = $2",
    )
    .bind(topic)
    .bind(tier)
    .execute(pool)
    .await
    .context("ageing progress")?;
    Ok(())
}

/// Every verdict of `topic`, ordered by edge, datacenter, partition and bucket.
pub async fn verdicts(pool: &PgPool, topic: &str) -> Vec<Verdict> {
    let mut all: Vec<Verdict> =
        chaperone_collector::reconcile::list_verdicts(pool, None, None, None)
            .await
            .expect("list verdicts")
            .into_iter()
            .filter(|v| v.topic == topic)
            .collect();
    all.sort_by(|a, b| {
        (&a.edge, &a.datacenter, a.partition, a.bucket_start_ms).cmp(&(
            &b.edge,
            &b.datacenter,
            b.partition,
            b.bucket_start_ms,
        ))
    });
    all
}

/// The topic-level verdict of `edge` for the bucket starting at `bucket_start_ms`.
pub async fn verdict(
    pool: &PgPool,
    topic: &str,
    edge: &str,
    bucket_start_ms: i64,
) -> Option<Verdict> {
    verdicts(pool, topic)
        .await
        .into_iter()
        .find(|v| v.edge == edge && v.partition.is_none() && v.bucket_start_ms == bucket_start_ms)
}
