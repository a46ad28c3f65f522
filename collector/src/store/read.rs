//! What the API and the status page read from the store: topics, count rows, and bucket
//! summaries with latency percentiles of exactly merged histograms.

use std::collections::{BTreeMap, BTreeSet};

use chaperone_audit::Latency;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;
use super::write::{opt_max, opt_min};

/// A topic known to the store.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TopicRow {
    /// Logical topic.
    pub topic: String,
    /// When the collector first stored a record of it.
    pub first_seen_at: DateTime<Utc>,
    /// When the collector last stored a record of it.
    pub last_seen_at: DateTime<Utc>,
    /// Start of the latest bucket with counts, epoch ms.
    pub last_bucket_start_ms: Option<i64>,
}

/// Every topic, by name.
pub async fn list_topics(pool: &PgPool) -> Result<Vec<TopicRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT t.topic, t.first_seen_at, t.last_seen_at, \
             (SELECT max(c.bucket_start_ms) FROM audit_counts c WHERE c.topic = t.topic) \
                 AS last_bucket_start_ms \
         FROM audit_topics t ORDER BY t.topic",
    )
    .fetch_all(pool)
    .await?)
}

/// One stored `audit_counts` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CountsRow {
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Tier.
    pub tier: String,
    /// Datacenter.
    pub datacenter: String,
    /// Cluster reported by the hop.
    pub cluster: String,
    /// Partition or -1.
    pub partition: i32,
    /// Messages.
    pub count: i64,
    /// Payload bytes.
    pub bytes: i64,
    /// Messages without event time.
    pub no_timestamp: i64,
    /// Unparseable messages.
    pub malformed: i64,
    /// Earliest event time.
    pub min_event_ms: Option<i64>,
    /// Latest event time.
    pub max_event_ms: Option<i64>,
    /// V2 HdrHistogram.
    pub latency: Vec<u8>,
}

/// Count rows of `topic` whose bucket starts in `from_ms .. to_ms`.
pub async fn counts_rows(
    pool: &PgPool,
    topic: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<CountsRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition, count, \
             bytes, no_timestamp, malformed, min_event_ms, max_event_ms, latency \
         FROM audit_counts WHERE topic = $1 AND bucket_start_ms >= $2 AND bucket_start_ms < $3 \
         ORDER BY bucket_start_ms, bucket_width_ms, tier",
    )
    .bind(topic)
    .bind(from_ms)
    .bind(to_ms)
    .fetch_all(pool)
    .await?)
}

/// Totals and latency of one tier in one bucket, summed over datacenters, clusters and
/// partitions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TierSummary {
    /// Tier.
    pub tier: String,
    /// Messages.
    pub count: i64,
    /// Payload bytes.
    pub bytes: i64,
    /// Messages without event time.
    pub no_timestamp: i64,
    /// Unparseable messages.
    pub malformed: i64,
    /// Earliest event time, epoch ms.
    pub min_event_ms: Option<i64>,
    /// Latest event time, epoch ms.
    pub max_event_ms: Option<i64>,
    /// Datacenters that reported.
    pub datacenters: Vec<String>,
    /// Latency percentiles of the merged histogram.
    pub latency_ms: LatencySummary,
}

/// Percentiles of a merged latency histogram (ms); `None` when it holds no values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    /// Values in the histogram.
    pub samples: u64,
    /// Median.
    pub p50: Option<u64>,
    /// 95th percentile.
    pub p95: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest value (HdrHistogram precision).
    pub max: Option<u64>,
}

impl LatencySummary {
    /// Percentiles of `h`.
    pub fn of(h: &Latency) -> Self {
        Self {
            samples: h.len(),
            p50: h.quantile(0.50),
            p95: h.quantile(0.95),
            p99: h.quantile(0.99),
            max: h.max(),
        }
    }
}

/// Every tier of one bucket.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BucketSummary {
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Tiers in name order.
    pub tiers: Vec<TierSummary>,
}

/// Groups rows by bucket and tier, summing counts and merging histograms exactly.
/// Rows whose histogram cannot be read contribute their counts but no latency.
pub fn summarize(rows: Vec<CountsRow>) -> Vec<BucketSummary> {
    struct Acc {
        t: TierSummary,
        dcs: BTreeSet<String>,
        h: Latency,
    }
    let mut by: BTreeMap<(i64, i64), BTreeMap<String, Acc>> = BTreeMap::new();
    for r in rows {
        let tiers = by
            .entry((r.bucket_start_ms, r.bucket_width_ms))
            .or_default();
        let acc = tiers.entry(r.tier.clone()).or_insert_with(|| Acc {
            t: TierSummary {
                tier: r.tier.clone(),
                count: 0,
                bytes: 0,
                no_timestamp: 0,
                malformed: 0,
                min_event_ms: None,
                max_event_ms: None,
                datacenters: Vec::new(),
                latency_ms: LatencySummary::of(&Latency::new()),
            },
            dcs: BTreeSet::new(),
            h: Latency::new(),
        });
        acc.t.count = acc.t.count.saturating_add(r.count);
        acc.t.bytes = acc.t.bytes.saturating_add(r.bytes);
        acc.t.no_timestamp = acc.t.no_timestamp.saturating_add(r.no_timestamp);
        acc.t.malformed = acc.t.malformed.saturating_add(r.malformed);
        acc.t.min_event_ms = opt_min(acc.t.min_event_ms, r.min_event_ms);
        acc.t.max_event_ms = opt_max(acc.t.max_event_ms, r.max_event_ms);
        acc.dcs.insert(r.datacenter);
        match Latency::from_bytes(&r.latency) {
            Ok(h) => acc.h.merge(&h),
            Err(reason) => {
                tracing::warn!(tier = %r.tier, bucket_start_ms = r.bucket_start_ms, %reason, "stored latency histogram is unreadable");
            }
        }
    }
    by.into_iter()
        .map(|((start, width), tiers)| BucketSummary {
            bucket_start_ms: start,
            bucket_width_ms: width,
            tiers: tiers
                .into_values()
                .map(|mut a| {
                    a.t.datacenters = a.dcs.into_iter().collect();
                    a.t.latency_ms = LatencySummary::of(&a.h);
                    a.t
                })
                .collect(),
        })
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[i64]) -> Latency {
        let mut l = Latency::new();
        for &v in values {
            l.record(v);
        }
        l
    }

    fn row(tier: &str, dc: &str, count: i64, latency: &Latency) -> CountsRow {
        CountsRow {
            bucket_start_ms: 1_764_067_200_000,
            bucket_width_ms: 60_000,
            tier: tier.into(),
            datacenter: dc.into(),
            cluster: "c".into(),
            partition: 0,
            count,
            bytes: count * 10,
            no_timestamp: 0,
            malformed: 0,
            min_event_ms: Some(1_764_067_200_000 + count),
            max_event_ms: Some(1_764_067_200_000 + 2 * count),
            latency: latency.to_bytes(),
        }
    }

    #[test]
    fn summary_percentiles_are_exact_merges_not_averages() {
        // Host a: 99 fast messages; host b: 1 slow one. The average of the two p50s would be
        // far from the true p50 of all 100 messages.
        let fast: Vec<i64> = vec![10; 99];
        let a = hist(&fast);
        let b = hist(&[50_000]);
        let out = summarize(vec![
            row("regional", "dc1", 99, &a),
            row("regional", "dc2", 1, &b),
        ]);
        assert_eq!(out.len(), 1);
        let t = &out[0].tiers[0];
        assert_eq!(t.count, 100);
        assert_eq!(t.datacenters, vec!["dc1".to_owned(), "dc2".to_owned()]);
        let all: Vec<i64> = fast.iter().copied().chain([50_000]).collect();
        let direct = hist(&all);
        assert_eq!(t.latency_ms.samples, 100);
        assert_eq!(t.latency_ms.p50, direct.quantile(0.5));
        assert_eq!(t.latency_ms.p99, direct.quantile(0.99));
        assert_eq!(t.latency_ms.max, direct.max());
        assert_eq!(t.min_event_ms, Some(1_764_067_200_001));
        assert_eq!(t.max_event_ms, Some(1_764_067_200_198));
    }

    #[test]
    fn summary_groups_by_bucket_and_tier() {
        let l = hist(&[]);
        let mut later = row("producer", "dc1", 3, &l);
        later.bucket_start_ms += 60_000;
        let out = summarize(vec![
            row("producer", "dc1", 5, &l),
            row("regional", "dc1", 4, &l),
            later,
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].tiers.len(), 2);
        assert_eq!(out[0].tiers[0].tier, "producer");
        assert_eq!(out[0].tiers[0].latency_ms.p50, None);
        assert_eq!(out[1].tiers[0].count, 3);
    }
}
