//! What the reconciler judges from, read in its own transaction: the buckets whose counts
//! changed (taken from `audit_count_changes`), each cell's count summed over clusters
//! (`audit_counts`), and every observer's progress (`audit_progress`) with the staleness rule
//! of docs/verdicts.md applied.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use crate::model::BucketKey;

/// Counts of one tier, datacenter and partition in a bucket, summed over clusters: `None`
/// when that sum does not fit in an `i64`.
#[derive(Debug, Clone)]
pub struct CellCount {
    /// Tier.
    pub tier: String,
    /// Datacenter.
    pub datacenter: String,
    /// Partition, -1 when the tier does not know it.
    pub partition: i32,
    /// Messages, summed over clusters.
    pub count: Option<i64>,
}

/// One observer's progress in one partition of a topic, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProgressMark {
    /// Logical topic.
    pub topic: String,
    /// Tier.
    pub tier: String,
    /// Datacenter.
    pub datacenter: String,
    /// Width of the buckets the observer counts in, ms.
    pub bucket_width_ms: i64,
    /// How far it got.
    #[sqlx(flatten)]
    pub mark: Mark,
}

/// How far one observer (host + instance) got in one partition.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Mark {
    /// Partition, -1 when the observer does not know it.
    pub partition: i32,
    /// `host/instance` of the observer.
    pub observer: String,
    /// Event-time watermark, epoch ms.
    pub watermark_ms: i64,
    /// When the observer made its latest progress record (its clock), epoch ms.
    pub last_emitted_ms: i64,
    /// The observer consumes the partition with committed offsets (its tier reports
    /// positions; see the `consumer_tiers` view): one owner at a time, handed over through
    /// the offsets, so the furthest mark of any owner stands for the partition. Producer
    /// instances have no such hand-over.
    pub consumer: bool,
    /// The observer shut down cleanly after sending every count.
    pub closing: bool,
    /// The observer is a consumer whose counts are at-least-once: a member killed between
    /// sending its counts and committing its offsets has those messages counted again.
    pub at_least_once: bool,
    /// No progress from the observer within `instance_timeout`, both on the collector's clock
    /// and against the newest progress of any observer (so a collector that lags behind its
    /// audit topics does not find everyone stale), while its cluster was reachable
    /// ([`Silence`]).
    pub stale: bool,
}

/// The staleness rule's parameters (docs/verdicts.md): an observer is stale when it has been
/// silent since before `seen_before` on the collector's clock, `timeout_ms` behind the newest
/// progress of any observer, and for that long while the cluster it reports through was
/// reachable (`reachable_since` per alias in `aliases`, `None` while unreachable).
#[derive(Debug, Clone, Copy)]
pub struct Silence<'a> {
    /// Now minus the instance timeout, on the collector's clock.
    pub seen_before: DateTime<Utc>,
    /// The instance timeout, ms.
    pub timeout_ms: i64,
    /// Probed clusters' aliases.
    pub aliases: &'a [String],
    /// Since when each of `aliases` is reachable.
    pub reachable_since: &'a [Option<DateTime<Utc>>],
}

/// The staleness rule on an observer's `last_seen`, the collector's time of its latest
/// progress, `last_emitted`, that progress's own time, and `source`, the cluster it reports
/// through. `$seen_before`, `$timeout`, `$reach` and the parameter after it bind the fields of
/// [`Silence`].
fn stale_sql(
    last_seen: &str,
    last_emitted: &str,
    source: &str,
    seen_before: u8,
    timeout: u8,
    reach: u8,
) -> String {
    let since = reach + 1;
    format!(
        "({last_seen} < ${seen_before} AND {last_emitted} < \
         (SELECT max(last_emitted_ms) FROM audit_progress) - ${timeout} AND NOT EXISTS \
         (SELECT 1 FROM UNNEST(${reach}::text[], ${since}::timestamptz[]) AS r(alias, since) \
           WHERE r.alias = {source} AND (r.since IS NULL OR r.since >= ${seen_before})))"
    )
}

/// Takes (deletes) every count change this transaction's snapshot sees and returns the
/// buckets they touched: those of tiers matching `tiers` (`LIKE` patterns) that end at or
/// after `min_end_ms`.
///
/// Ingest writers commit concurrently, so the order of their change numbers says nothing
/// about the order in which they become visible; instead of reading past a cursor, each
/// caller takes exactly the changes its snapshot sees, and a change committed later is still
/// there for the next one.
pub async fn take_changed_buckets(
    tx: &mut Transaction<'_, Postgres>,
    tiers: &[String],
    min_end_ms: i64,
) -> Result<Vec<BucketKey>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH taken AS (DELETE FROM audit_count_changes
                         RETURNING topic, bucket_start_ms, bucket_width_ms, tier)
         SELECT DISTINCT topic, bucket_start_ms, bucket_width_ms
           FROM taken
          WHERE tier LIKE ANY($1) AND bucket_start_ms + bucket_width_ms >= $2",
    )
    .bind(tiers)
    .bind(min_end_ms)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, start, width)| BucketKey {
            topic,
            start,
            width,
        })
        .collect())
}

/// The counts of tiers matching `tiers` in the buckets `keys`, per cell (tier, datacenter,
/// partition) summed over clusters.
pub async fn cell_counts(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[BucketKey],
    tiers: &[String],
) -> Result<HashMap<BucketKey, Vec<CellCount>>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct CellSum {
        topic: String,
        bucket_start_ms: i64,
        bucket_width_ms: i64,
        tier: String,
        datacenter: String,
        partition: i32,
        count: Option<i64>,
    }
    let (topics, starts, widths) = BucketKey::columns(keys);
    // The sum over clusters is `numeric`; one that does not fit in a bigint comes back NULL
    // (the judgement reports the cell), not as an error that would fail the pass.
    let rows: Vec<CellSum> = sqlx::query_as(
        "SELECT c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.partition,
                CASE WHEN sum(c.count) BETWEEN -9223372036854775808 AND 9223372036854775807
                     THEN sum(c.count)::bigint END AS count
           FROM audit_counts c
           JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
             ON c.topic = k.topic AND c.bucket_start_ms = k.start_ms
            AND c.bucket_width_ms = k.width_ms
          WHERE c.tier LIKE ANY($4)
          GROUP BY c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.partition",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .bind(tiers)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<BucketKey, Vec<CellCount>> = HashMap::new();
    for r in rows {
        let key = BucketKey {
            topic: r.topic,
            start: r.bucket_start_ms,
            width: r.bucket_width_ms,
        };
        out.entry(key).or_default().push(CellCount {
            tier: r.tier,
            datacenter: r.datacenter,
            partition: r.partition,
            count: r.count,
        });
    }
    Ok(out)
}

/// Every observer's progress in `topics`, of tiers matching `tiers`, staleness judged by
/// `silence`.
pub async fn progress_marks(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    tiers: &[String],
    silence: &Silence<'_>,
) -> Result<Vec<ProgressMark>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT topic, tier, datacenter, partition, host || '/' || instance AS observer,
                watermark_ms, last_emitted_ms,
                tier IN (SELECT tier FROM consumer_tiers) AS consumer, closing, at_least_once,
                {stale} AS stale, bucket_width_ms
           FROM audit_progress
          WHERE topic = ANY($1) AND tier LIKE ANY($2)",
        stale = stale_sql("last_seen_at", "last_emitted_ms", "source", 3, 4, 5),
    ))
    .bind(topics)
    .bind(tiers)
    .bind(silence.seen_before)
    .bind(silence.timeout_ms)
    .bind(silence.aliases)
    .bind(silence.reachable_since)
    .fetch_all(&mut **tx)
    .await
}

/// The producer-side observers (`tier:host/instance`, of tiers matching `tiers` that do not
/// consume) that reported since `since`, did not shut down cleanly and are stale now.
pub async fn stale_observers(
    pool: &PgPool,
    tiers: &[String],
    since: DateTime<Utc>,
    silence: &Silence<'_>,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT tier || ':' || host || '/' || instance FROM audit_progress
          WHERE tier LIKE ANY($3) AND tier NOT IN (SELECT tier FROM consumer_tiers)
          GROUP BY tier, host, instance
         HAVING NOT bool_and(closing) AND max(last_seen_at) >= $2 AND {stale}",
        stale = stale_sql(
            "max(last_seen_at)",
            "max(last_emitted_ms)",
            "max(source)",
            1,
            4,
            5
        ),
    ))
    .bind(silence.seen_before)
    .bind(since)
    .bind(tiers)
    .bind(silence.timeout_ms)
    .bind(silence.aliases)
    .bind(silence.reachable_since)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}
