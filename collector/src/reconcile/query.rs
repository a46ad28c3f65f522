//! Read side of the verdict tables, for the HTTP API.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::model::{BucketKey, VerdictStatus};

/// Most rows one listing returns.
pub const MAX_ROWS: i64 = 10_000;

/// Stored form of a verdict.
#[derive(Debug, sqlx::FromRow)]
struct VerdictDbRow {
    edge: String,
    topic: String,
    datacenter: String,
    partition: i32,
    bucket_start_ms: i64,
    bucket_width_ms: i64,
    from_tier: String,
    to_tier: String,
    status: String,
    expected: i64,
    actual: i64,
    difference: i64,
    missing: i64,
    silent_tier: Option<String>,
    lag_ms: Option<i64>,
    stale_instances: Vec<String>,
    waiting_on: Vec<String>,
    final_reason: String,
    incident_id: Option<i64>,
    revisions: i32,
    first_judged_at: DateTime<Utc>,
    changed_at: DateTime<Utc>,
}

/// One verdict as served by the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Edge name, for example `producer->regional`.
    pub edge: String,
    /// Logical topic.
    pub topic: String,
    /// Datacenter compared, or null for edges summed over datacenters.
    pub datacenter: Option<String>,
    /// Partition compared, or null for the whole topic.
    pub partition: Option<i32>,
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Upstream tier.
    pub from_tier: String,
    /// Downstream tier.
    pub to_tier: String,
    /// The verdict.
    pub status: VerdictStatus,
    /// Messages counted upstream.
    pub expected: i64,
    /// Messages counted downstream.
    pub actual: i64,
    /// `actual - expected`.
    pub difference: i64,
    /// Messages missing downstream (`max(expected - actual, 0)`).
    pub missing: i64,
    /// For `tier_silent`, the silent tier.
    pub silent_tier: Option<String>,
    /// For `lagging`: how far the least advanced downstream observer was behind when judged,
    /// ms.
    pub lag_ms: Option<i64>,
    /// Upstream instances (`host/instance`) that stopped reporting without a clean shutdown
    /// before passing the bucket: their counts of it may be incomplete.
    pub stale_instances: Vec<String>,
    /// For buckets judged by waiting (`max_wait`, `loss_after`): the live observers that had
    /// not passed the bucket, as `tier:host/instance` (`… partition N` for a consumer
    /// partition).
    pub waiting_on: Vec<String>,
    /// `progress`, `max_wait` or `loss_after`: why the bucket was final.
    pub final_reason: String,
    /// Incident the bucket belongs or belonged to.
    pub incident_id: Option<i64>,
    /// Changes after the first judgement (late records re-open verdicts).
    pub revisions: i32,
    /// When first judged.
    pub first_judged_at: DateTime<Utc>,
    /// When last changed.
    pub changed_at: DateTime<Utc>,
}

impl TryFrom<VerdictDbRow> for Verdict {
    type Error = sqlx::Error;

    fn try_from(r: VerdictDbRow) -> Result<Self, Self::Error> {
        let status = r
            .status
            .parse()
            .map_err(|e: super::verdict::UnknownStatus| sqlx::Error::Decode(Box::new(e)))?;
        Ok(Verdict {
            edge: r.edge,
            topic: r.topic,
            datacenter: (!r.datacenter.is_empty()).then_some(r.datacenter),
            partition: (r.partition >= 0).then_some(r.partition),
            bucket_start_ms: r.bucket_start_ms,
            bucket_width_ms: r.bucket_width_ms,
            from_tier: r.from_tier,
            to_tier: r.to_tier,
            status,
            expected: r.expected,
            actual: r.actual,
            difference: r.difference,
            missing: r.missing,
            silent_tier: r.silent_tier,
            lag_ms: r.lag_ms,
            stale_instances: r.stale_instances,
            waiting_on: r.waiting_on,
            final_reason: r.final_reason,
            incident_id: r.incident_id,
            revisions: r.revisions,
            first_judged_at: r.first_judged_at,
            changed_at: r.changed_at,
        })
    }
}

const VERDICT_COLUMNS: &str = "edge, topic, datacenter, partition, bucket_start_ms, \
     bucket_width_ms, from_tier, to_tier, status, expected, actual, difference, missing, \
     silent_tier, lag_ms, stale_instances, waiting_on, final_reason, incident_id, revisions, \
     first_judged_at, changed_at";

/// Every verdict (topic-level and per partition) of the buckets `keys`, in no order; a stored
/// status this version does not know fails the read.
pub(crate) async fn bucket_verdicts(
    conn: &mut PgConnection,
    keys: &[BucketKey],
) -> Result<Vec<Verdict>, sqlx::Error> {
    let (topics, starts, widths) = BucketKey::columns(keys);
    let rows: Vec<VerdictDbRow> = sqlx::query_as(&format!(
        "SELECT {VERDICT_COLUMNS} FROM reconcile_verdicts
          WHERE (topic, bucket_start_ms, bucket_width_ms) IN
                (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]))"
    ))
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(Verdict::try_from).collect()
}

/// Verdicts of buckets starting in `[from_ms, to_ms)` (either bound optional), optionally of
/// one status, newest bucket first, at most [`MAX_ROWS`].
pub async fn list_verdicts(
    pool: &PgPool,
    status: Option<VerdictStatus>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Result<Vec<Verdict>, sqlx::Error> {
    let rows: Vec<VerdictDbRow> = sqlx::query_as(&format!(
        "SELECT {VERDICT_COLUMNS} FROM reconcile_verdicts
          WHERE ($1::text IS NULL OR status = $1)
            AND ($2::bigint IS NULL OR bucket_start_ms >= $2)
            AND ($3::bigint IS NULL OR bucket_start_ms < $3)
          ORDER BY bucket_start_ms DESC, topic, edge, datacenter, partition
          LIMIT $4"
    ))
    .bind(status.map(VerdictStatus::as_str))
    .bind(from_ms)
    .bind(to_ms)
    .bind(MAX_ROWS)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Verdict::try_from).collect()
}

/// For every topic, edge and datacenter: the topic-level verdict of the latest judged bucket.
/// Ordered by topic, edge, datacenter.
pub async fn latest_verdicts_by_topic(pool: &PgPool) -> Result<Vec<Verdict>, sqlx::Error> {
    let rows: Vec<VerdictDbRow> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (topic, edge, datacenter) {VERDICT_COLUMNS}
           FROM reconcile_verdicts
          WHERE partition = -1
          ORDER BY topic, edge, datacenter, bucket_start_ms DESC"
    ))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Verdict::try_from).collect()
}

/// One recorded judgement or change of a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct VerdictChange {
    /// Edge name.
    pub edge: String,
    /// Logical topic.
    pub topic: String,
    /// Datacenter compared, '' when summed over datacenters.
    pub datacenter: String,
    /// Partition, -1 for the whole topic.
    pub partition: i32,
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Status before the change, null for the first judgement.
    pub old_status: Option<String>,
    /// Status after the change.
    pub status: String,
    /// Upstream count.
    pub expected: i64,
    /// Downstream count.
    pub actual: i64,
    /// `actual - expected`.
    pub difference: i64,
    /// For `tier_silent`, the silent tier.
    pub silent_tier: Option<String>,
    /// For `lagging`, how far behind, ms.
    pub lag_ms: Option<i64>,
    /// Upstream instances whose counts of the bucket may be incomplete.
    pub stale_instances: Vec<String>,
    /// Observers the bucket was still waiting for when judged by waiting.
    pub waiting_on: Vec<String>,
    /// `progress`, `max_wait` or `loss_after`.
    pub final_reason: String,
    /// When (reconciler clock).
    pub changed_at: DateTime<Utc>,
}

/// History of the verdicts of one topic for buckets starting in `[from_ms, to_ms)`, oldest
/// change first, at most [`MAX_ROWS`].
pub async fn verdict_history(
    pool: &PgPool,
    topic: &str,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Result<Vec<VerdictChange>, sqlx::Error> {
    sqlx::query_as(
        "SELECT edge, topic, datacenter, partition, bucket_start_ms, bucket_width_ms, old_status,
                status, expected, actual, difference, silent_tier, lag_ms, stale_instances,
                waiting_on, final_reason, changed_at
           FROM reconcile_verdict_history
          WHERE topic = $1
            AND ($2::bigint IS NULL OR bucket_start_ms >= $2)
            AND ($3::bigint IS NULL OR bucket_start_ms < $3)
          ORDER BY id
          LIMIT $4",
    )
    .bind(topic)
    .bind(from_ms)
    .bind(to_ms)
    .bind(MAX_ROWS)
    .fetch_all(pool)
    .await
}

/// Most verdict rows the status page reads for one topic or incident.
pub const MAX_VERDICTS: i64 = 20_000;

/// Current verdicts of `topic` for buckets starting in `[from_ms, to_ms)`, topic-level and
/// per partition, by bucket, edge, datacenter and partition; at most [`MAX_VERDICTS`].
pub async fn topic_verdicts(
    pool: &PgPool,
    topic: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Verdict>, sqlx::Error> {
    let rows: Vec<VerdictDbRow> = sqlx::query_as(&format!(
        "SELECT {VERDICT_COLUMNS} FROM reconcile_verdicts
          WHERE topic = $1 AND bucket_start_ms >= $2 AND bucket_start_ms < $3
          ORDER BY bucket_start_ms, edge, datacenter, partition
          LIMIT $4"
    ))
    .bind(topic)
    .bind(from_ms)
    .bind(to_ms)
    .bind(MAX_VERDICTS)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Verdict::try_from).collect()
}

/// The topic-level verdicts of the buckets that joined incident `id`, by bucket.
pub async fn incident_verdicts(pool: &PgPool, id: i64) -> Result<Vec<Verdict>, sqlx::Error> {
    let rows: Vec<VerdictDbRow> = sqlx::query_as(&format!(
        "SELECT {VERDICT_COLUMNS} FROM reconcile_verdicts
          WHERE incident_id = $1 AND partition = -1
          ORDER BY bucket_start_ms, edge, datacenter
          LIMIT $2"
    ))
    .bind(id)
    .bind(MAX_VERDICTS)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Verdict::try_from).collect()
}
