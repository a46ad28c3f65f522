//! Reads the status pages need and the API has no function for: one topic's verdicts over a
//! range, how far behind each tier's watermark is, one incident with its buckets and its
//! webhook deliveries. Everything the API also serves is read through the API's own
//! functions (`store`, `reconcile::query`, `alerts::query`), so the numbers agree.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Most verdict rows one topic page reads.
pub const MAX_VERDICTS: i64 = 20_000;

/// Whether the store knows `topic`.
pub async fn topic_exists(pool: &PgPool, topic: &str) -> Result<bool, sqlx::Error> {
    let found: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM audit_topics WHERE topic = $1")
        .bind(topic)
        .fetch_optional(pool)
        .await?;
    Ok(found.is_some())
}

/// The event-time watermark of one tier of one topic: for every partition (and datacenter,
/// cluster and physical topic) the furthest mark of any observer that has not shut down, then
/// the lowest of those. The tier has counted everything before it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TierWatermark {
    /// Logical topic.
    pub topic: String,
    /// Tier.
    pub tier: String,
    /// Lowest partition watermark, epoch ms.
    pub watermark_ms: i64,
    /// When the collector last applied progress of this tier and topic.
    pub last_seen_at: DateTime<Utc>,
}

/// Watermarks of every tier of every topic (`topic = None`) or of one topic, by topic and tier.
pub async fn tier_watermarks(
    pool: &PgPool,
    topic: Option<&str>,
) -> Result<Vec<TierWatermark>, sqlx::Error> {
    sqlx::query_as(
        "SELECT topic, tier, min(mark) AS watermark_ms, max(seen) AS last_seen_at
           FROM (SELECT topic, tier, max(watermark_ms) AS mark, max(last_seen_at) AS seen
                   FROM audit_progress
                  WHERE NOT closing AND ($1::text IS NULL OR topic = $1)
                  GROUP BY topic, tier, cluster, datacenter, physical_topic, partition) p
          GROUP BY topic, tier
          ORDER BY topic, tier",
    )
    .bind(topic)
    .fetch_all(pool)
    .await
}

/// One current verdict of a topic's bucket, as the pages show it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BucketVerdict {
    /// Edge name.
    pub edge: String,
    /// Datacenter compared, '' when the edge sums over datacenters.
    pub datacenter: String,
    /// Partition, -1 for the whole topic.
    pub partition: i32,
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Verdict as stored.
    pub status: String,
    /// Upstream count.
    pub expected: i64,
    /// Downstream count.
    pub actual: i64,
    /// `actual - expected`.
    pub difference: i64,
    /// Messages missing downstream.
    pub missing: i64,
    /// For `tier_silent`, the silent tier.
    pub silent_tier: Option<String>,
    /// For `lagging`, how far behind when judged, ms.
    pub lag_ms: Option<i64>,
    /// Incident the bucket belongs or belonged to.
    pub incident_id: Option<i64>,
    /// Changes after the first judgement.
    pub revisions: i32,
    /// When last changed.
    pub changed_at: DateTime<Utc>,
}

/// Current verdicts of `topic` for buckets starting in `[from_ms, to_ms)`, topic-level and
/// per partition, by bucket, edge, datacenter and partition; at most [`MAX_VERDICTS`].
pub async fn topic_verdicts(
    pool: &PgPool,
    topic: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<BucketVerdict>, sqlx::Error> {
    sqlx::query_as(
        "SELECT edge, datacenter, partition, bucket_start_ms, bucket_width_ms, status, expected,
                actual, difference, missing, silent_tier, lag_ms, incident_id, revisions,
                changed_at
           FROM reconcile_verdicts
          WHERE topic = $1 AND bucket_start_ms >= $2 AND bucket_start_ms < $3
          ORDER BY bucket_start_ms, edge, datacenter, partition
          LIMIT $4",
    )
    .bind(topic)
    .bind(from_ms)
    .bind(to_ms)
    .bind(MAX_VERDICTS)
    .fetch_all(pool)
    .await
}

/// The topic-level verdicts of the buckets that joined incident `id`, by bucket.
pub async fn incident_verdicts(pool: &PgPool, id: i64) -> Result<Vec<BucketVerdict>, sqlx::Error> {
    sqlx::query_as(
        "SELECT edge, datacenter, partition, bucket_start_ms, bucket_width_ms, status, expected,
                actual, difference, missing, silent_tier, lag_ms, incident_id, revisions,
                changed_at
           FROM reconcile_verdicts
          WHERE incident_id = $1 AND partition = -1
          ORDER BY bucket_start_ms, edge, datacenter
          LIMIT $2",
    )
    .bind(id)
    .bind(MAX_VERDICTS)
    .fetch_all(pool)
    .await
}

/// One webhook notification of an incident and how its delivery went.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct IncidentDelivery {
    /// Webhook name.
    pub webhook: String,
    /// `firing` or `resolved`.
    pub kind: String,
    /// POSTs tried so far.
    pub attempts: i32,
    /// When the receiver accepted it; `None` while pending or parked.
    pub sent_at: Option<DateTime<Utc>>,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: DateTime<Utc>,
    /// When it was parked (never tried again).
    pub parked_at: Option<DateTime<Utc>>,
    /// HTTP status of the last failed attempt's answer, if there was one.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the notification was created.
    pub created_at: DateTime<Utc>,
}

impl IncidentDelivery {
    /// `sent`, `parked` or `pending`, as the API's `state`.
    pub fn state(&self) -> &'static str {
        if self.sent_at.is_some() {
            "sent"
        } else if self.parked_at.is_some() {
            "parked"
        } else {
            "pending"
        }
    }
}

/// Every notification of incident `id`, oldest first.
pub async fn incident_deliveries(
    pool: &PgPool,
    id: i64,
) -> Result<Vec<IncidentDelivery>, sqlx::Error> {
    sqlx::query_as(
        "SELECT webhook, kind, attempts, sent_at, next_attempt_at, parked_at, last_status,
                last_error, created_at
           FROM alert_deliveries
          WHERE incident_id = $1
          ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// One incident as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Incident {
    /// Incident id (also in webhook bodies).
    pub id: i64,
    /// Logical topic.
    pub topic: String,
    /// Edge name.
    pub edge: String,
    /// Datacenter compared, '' when the edge sums over datacenters.
    pub datacenter: String,
    /// `open`, `resolved` or `superseded`.
    pub status: String,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// First bucket that joined, epoch ms.
    pub first_bucket_start_ms: i64,
    /// Last bucket that joined, epoch ms.
    pub last_bucket_start_ms: i64,
    /// Buckets that joined.
    pub buckets: i32,
    /// Buckets still bad.
    pub bad_buckets: i32,
    /// Largest missing count of one bucket.
    pub max_missing: i64,
    /// When opened.
    pub opened_at: DateTime<Utc>,
    /// When resolved or superseded.
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Incident `id`, if there is one.
pub async fn incident(pool: &PgPool, id: i64) -> Result<Option<Incident>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, topic, edge, datacenter, status, bucket_width_ms, first_bucket_start_ms,
                last_bucket_start_ms, buckets, bad_buckets, max_missing, opened_at, resolved_at
           FROM alert_incidents
          WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
