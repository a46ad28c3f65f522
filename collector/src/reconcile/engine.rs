//! One evaluation pass: queue the buckets whose counts changed, judge the ones that are final
//! and write verdicts, their history, incidents and outbox events, one transaction per batch
//! of buckets.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use super::changes::{ChangedVerdict, IncidentRecorder, RecordError};
use super::config::{ReconcileConfig, millis};
use super::metrics::ReconcileMetrics;
use super::query;
use super::verdict::{
    Computed, Findings, SourcesPassed, Times, VerdictKey, VerdictStatus, judge_bucket,
};
use crate::ingest::Reach;
use crate::model::BucketKey;
use crate::store::evidence::{self, ProgressMark, Silence};

/// Advisory lock key (hashed by PostgreSQL) held by every reconciler transaction.
const LOCK_KEY: &str = "chaperone-reconcile";

/// Overflowing cells remembered as reported; past this many the memory starts again (a cell
/// may then be reported a second time).
const MAX_OVERFLOWS_REMEMBERED: usize = 10_000;

/// Errors of one evaluation pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// PostgreSQL failed; the pass is retried at the next interval.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The incident or outbox event of a verdict change could not be recorded.
    #[error("recording an incident: {0}")]
    Incident(#[source] RecordError),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Buckets newly queued because their counts changed.
    pub queued: u64,
    /// Queued buckets looked at.
    pub evaluated: u64,
    /// Verdicts (topic- and partition-level) judged final in this pass, changed or not.
    pub judged: u64,
    /// Verdicts written because they were new or changed.
    pub changed: u64,
    /// Buckets still waiting to be final after the pass.
    pub pending: u64,
}

/// What the reconciler has already logged, so that a lasting condition is logged when it
/// starts and ends, not on every pass.
#[derive(Debug, Default)]
pub(crate) struct Notices {
    stale: BTreeSet<String>,
    widths: BTreeSet<String>,
    overflows: BTreeSet<String>,
}

impl Notices {
    /// Logs the stale instances that appeared or recovered since the last call.
    fn stale(&mut self, now: BTreeSet<String>) {
        for gone in now.difference(&self.stale) {
            tracing::warn!(
                instance = %gone,
                "producer instance stopped reporting without a clean shutdown: buckets no \
                 longer wait for it, and its counts of buckets it had not passed may be incomplete"
            );
        }
        for back in self.stale.difference(&now) {
            tracing::info!(instance = %back, "producer instance reports again or expired");
        }
        self.stale = now;
    }

    /// Logs the bucket-width mismatches that appeared or ended since the last call.
    fn widths(&mut self, now: BTreeSet<String>) {
        for new in now.difference(&self.widths) {
            tracing::error!(
                mismatch = %new,
                "tiers of one edge count a topic in different bucket widths: the edge is not \
                 compared for this topic until they agree (set the same bucket_width)"
            );
        }
        for gone in self.widths.difference(&now) {
            tracing::info!(mismatch = %gone, "bucket widths agree again (or the buckets expired)");
        }
        self.widths = now;
    }

    /// Logs and counts each cell whose counts overflow once, however many passes see it.
    fn overflows(&mut self, found: BTreeSet<String>, metrics: &ReconcileMetrics) {
        for cell in found {
            if self.overflows.contains(&cell) {
                continue;
            }
            if self.overflows.len() >= MAX_OVERFLOWS_REMEMBERED {
                self.overflows.clear();
            }
            tracing::warn!(
                %cell,
                "counts of this cell sum past the largest 64-bit integer (a tier counts wrong, \
                 or a hostile record): the cell is not judged, and no alert is raised for it"
            );
            metrics.count_overflows.inc();
            self.overflows.insert(cell);
        }
    }
}

#[derive(Debug, Clone)]
struct Existing {
    status: VerdictStatus,
    expected: i64,
    actual: i64,
    silent_tier: Option<String>,
    stale_instances: Vec<String>,
    incident_id: Option<i64>,
}

impl Computed {
    /// Whether nothing a person would read changed (a lagging bucket's lag grows on every
    /// pass; it is refreshed only with a change that is written anyway).
    fn same_as(&self, old: &Existing) -> bool {
        self.status == old.status
            && self.expected == old.expected
            && self.actual == old.actual
            && self.silent_tier == old.silent_tier
            && self.stale_instances == old.stale_instances
    }
}

async fn lock(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(LOCK_KEY)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Runs one pass at `now`.
pub(crate) async fn pass(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    reach: &Reach,
    incidents: &dyn IncidentRecorder,
    metrics: &ReconcileMetrics,
    notices: &Mutex<Notices>,
) -> Result<PassReport, ReconcileError> {
    let mut report = PassReport {
        queued: enqueue(pool, config, now).await?,
        ..PassReport::default()
    };
    let (aliases, reachable_since) = reach.columns();
    let silence = Silence {
        seen_before: now - chrono::Duration::milliseconds(millis(config.instance_timeout)),
        timeout_ms: millis(config.instance_timeout),
        aliases: &aliases,
        reachable_since: &reachable_since,
    };
    let mut after: Option<BucketKey> = None;
    let mut findings = Findings::default();
    loop {
        let mut tx = pool.begin().await?;
        lock(&mut tx).await?;
        let pending = next_pending(&mut tx, after.as_ref(), config.batch_buckets).await?;
        let Some(last) = pending.last() else {
            tx.commit().await?;
            break;
        };
        after = Some(last.key.clone());
        let keys: Vec<BucketKey> = pending.iter().map(|q| q.key.clone()).collect();
        report.evaluated += keys.len() as u64;
        let counts = evidence::cell_counts(&mut tx, &keys, &config.tier_like_patterns()).await?;
        let topics: Vec<String> = keys
            .iter()
            .map(|k| k.topic.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let progress = load_progress(&mut tx, &topics, config, &silence).await?;
        let existing = load_verdicts(&mut tx, &keys).await?;
        let mut sources = load_sources_passed(&mut tx, &keys).await?;
        let mut newly_passed: Vec<(BucketKey, String, i64)> = Vec::new();
        let settle = chrono::Duration::milliseconds(millis(config.settle));

        let mut done = Vec::new();
        let mut computed = Vec::new();
        let no_progress = Vec::new();
        let oldest_end = now.timestamp_millis() - millis(config.lookback);
        for q in &pending {
            let key = &q.key;
            if key.start.saturating_add(key.width) < oldest_end {
                // Queued but not judged within the lookback (the collector was down): too old
                // to alert about now.
                done.push(key.clone());
                continue;
            }
            let Some(rows) = counts.get(key) else {
                // The counts are gone (retention): nothing left to judge.
                done.push(key.clone());
                continue;
            };
            let topic_progress = progress.get(&key.topic).unwrap_or(&no_progress);
            let times = Times {
                queued_ms: q.first_queued_at.timestamp_millis(),
                now_ms: now.timestamp_millis(),
            };
            let passed = sources.entry(key.clone()).or_default();
            let known = passed.len();
            let (mut verdicts, mut all_final) = judge_bucket(
                config,
                key,
                times,
                rows,
                topic_progress,
                passed,
                &mut findings,
            );
            if passed.len() > known {
                newly_passed.extend(
                    passed
                        .iter()
                        .filter(|&(_, &at)| at == times.now_ms)
                        .map(|(dc, &at)| (key.clone(), dc.clone(), at)),
                );
            }
            if now - q.changed_at < settle {
                // Verdicts judged before whose counts changed again wait until every tier
                // has had the chance to deliver its late counts.
                let before = verdicts.len();
                verdicts.retain(|c| existing.get(&c.key).is_none_or(|old| c.same_as(old)));
                all_final &= verdicts.len() == before;
            }
            report.judged += verdicts.len() as u64;
            computed.extend(verdicts);
            if all_final {
                done.push(key.clone());
            }
        }
        report.changed +=
            write_verdicts(&mut tx, computed, &existing, incidents, now, metrics).await?;
        delete_pending(&mut tx, &done).await?;
        store_sources_passed(&mut tx, &newly_passed).await?;
        tx.commit().await?;
        // Reported once committed (a rolled-back batch is judged again).
        notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .overflows(std::mem::take(&mut findings.overflows), metrics);
    }
    // Buckets of mismatched edges stay queued (within the lookback), so every pass sees every
    // mismatch that still holds.
    metrics
        .width_mismatches
        .set(findings.mismatches.len() as i64);
    notices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .widths(findings.mismatches);
    refresh_stale_instances(pool, config, now, &silence, metrics, notices).await?;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_pending")
        .fetch_one(pool)
        .await?;
    report.pending = u64::try_from(pending).unwrap_or(0);
    metrics.pending_buckets.set(pending);
    refresh_missing_gauge(pool, config, now, metrics).await?;
    let lagging: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconcile_verdicts WHERE status = 'lagging' AND partition = -1",
    )
    .fetch_one(pool)
    .await?;
    metrics.lagging_buckets.set(lagging);
    Ok(report)
}

/// Queues every bucket whose counts changed (taking the changes, see
/// [`evidence::take_changed_buckets`]) and forgets when producers passed buckets past the
/// lookback.
async fn enqueue(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> Result<u64, ReconcileError> {
    let oldest_end = now.timestamp_millis() - millis(config.lookback);
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    let changed =
        evidence::take_changed_buckets(&mut tx, &config.tier_like_patterns(), oldest_end).await?;
    let (topics, starts, widths) = BucketKey::columns(&changed);
    let queued = sqlx::query(
        "INSERT INTO reconcile_pending (topic, bucket_start_ms, bucket_width_ms, queued_at,
             first_queued_at)
         SELECT topic, start_ms, width_ms, $4::timestamptz, $4::timestamptz
           FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
         ON CONFLICT (topic, bucket_start_ms, bucket_width_ms)
         DO UPDATE SET queued_at = EXCLUDED.queued_at",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Buckets past the lookback are never judged again.
    sqlx::query(
        "DELETE FROM reconcile_sources_passed
          WHERE bucket_start_ms < $1 AND bucket_start_ms + bucket_width_ms < $1",
    )
    .bind(oldest_end)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(queued)
}

/// A queued bucket.
#[derive(Debug, Clone)]
struct Queued {
    key: BucketKey,
    /// When its counts last changed.
    changed_at: DateTime<Utc>,
    /// When it entered the queue.
    first_queued_at: DateTime<Utc>,
}

/// The next queued buckets after `after`.
async fn next_pending(
    tx: &mut Transaction<'_, Postgres>,
    after: Option<&BucketKey>,
    limit: usize,
) -> Result<Vec<Queued>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct PendingRow {
        topic: String,
        bucket_start_ms: i64,
        bucket_width_ms: i64,
        queued_at: DateTime<Utc>,
        first_queued_at: DateTime<Utc>,
    }
    let rows: Vec<PendingRow> = sqlx::query_as(
        "SELECT topic, bucket_start_ms, bucket_width_ms, queued_at, first_queued_at
           FROM reconcile_pending
          WHERE $1::bigint IS NULL
             OR (bucket_start_ms, topic, bucket_width_ms) > ($1, $2::text, $3::bigint)
          ORDER BY bucket_start_ms, topic, bucket_width_ms
          LIMIT $4",
    )
    .bind(after.map(|k| k.start))
    .bind(after.map(|k| k.topic.as_str()))
    .bind(after.map(|k| k.width))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Queued {
            key: BucketKey {
                topic: r.topic,
                start: r.bucket_start_ms,
                width: r.bucket_width_ms,
            },
            changed_at: r.queued_at,
            first_queued_at: r.first_queued_at,
        })
        .collect())
}

/// Every observer's progress in `topics`, per topic.
async fn load_progress(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    config: &ReconcileConfig,
    silence: &Silence<'_>,
) -> Result<HashMap<String, Vec<ProgressMark>>, sqlx::Error> {
    let marks = evidence::progress_marks(tx, topics, &config.tier_like_patterns(), silence).await?;
    let mut out: HashMap<String, Vec<ProgressMark>> = HashMap::new();
    for m in marks {
        out.entry(m.topic.clone()).or_default().push(m);
    }
    Ok(out)
}

async fn load_verdicts(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[BucketKey],
) -> Result<HashMap<VerdictKey, Existing>, ReconcileError> {
    let stored = query::bucket_verdicts(tx, keys).await?;
    Ok(stored
        .into_iter()
        .map(|v| {
            (
                VerdictKey {
                    edge: v.edge,
                    topic: v.topic,
                    datacenter: v.datacenter.unwrap_or_default(),
                    partition: v.partition.unwrap_or(-1),
                    start: v.bucket_start_ms,
                    width: v.bucket_width_ms,
                },
                Existing {
                    status: v.status,
                    expected: v.expected,
                    actual: v.actual,
                    silent_tier: v.silent_tier,
                    stale_instances: v.stale_instances,
                    incident_id: v.incident_id,
                },
            )
        })
        .collect())
}

/// When the producers of each datacenter passed each bucket, as far as already seen.
async fn load_sources_passed(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[BucketKey],
) -> Result<HashMap<BucketKey, SourcesPassed>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct PassedRow {
        topic: String,
        bucket_start_ms: i64,
        bucket_width_ms: i64,
        datacenter: String,
        passed_at_ms: i64,
    }
    let (topics, starts, widths) = BucketKey::columns(keys);
    let rows: Vec<PassedRow> = sqlx::query_as(
        "SELECT s.topic, s.bucket_start_ms, s.bucket_width_ms, s.datacenter, s.passed_at_ms
           FROM reconcile_sources_passed s
           JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
             ON s.topic = k.topic AND s.bucket_start_ms = k.start_ms
            AND s.bucket_width_ms = k.width_ms",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<BucketKey, SourcesPassed> = HashMap::new();
    for r in rows {
        let key = BucketKey {
            topic: r.topic,
            start: r.bucket_start_ms,
            width: r.bucket_width_ms,
        };
        out.entry(key)
            .or_default()
            .insert(r.datacenter, r.passed_at_ms);
    }
    Ok(out)
}

/// Remembers when the producers of a datacenter were first seen to have passed a bucket.
async fn store_sources_passed(
    tx: &mut Transaction<'_, Postgres>,
    passed: &[(BucketKey, String, i64)],
) -> Result<(), sqlx::Error> {
    if passed.is_empty() {
        return Ok(());
    }
    let keys: Vec<BucketKey> = passed.iter().map(|(k, _, _)| k.clone()).collect();
    let (topics, starts, widths) = BucketKey::columns(&keys);
    let datacenters: Vec<&str> = passed.iter().map(|(_, dc, _)| dc.as_str()).collect();
    let at: Vec<i64> = passed.iter().map(|&(_, _, at)| at).collect();
    sqlx::query(
        "INSERT INTO reconcile_sources_passed
             (topic, bucket_start_ms, bucket_width_ms, datacenter, passed_at_ms)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[])
         ON CONFLICT DO NOTHING",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .bind(datacenters)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn delete_pending(
    tx: &mut Transaction<'_, Postgres>,
    done: &[BucketKey],
) -> Result<(), sqlx::Error> {
    if done.is_empty() {
        return Ok(());
    }
    let (topics, starts, widths) = BucketKey::columns(done);
    sqlx::query(
        "DELETE FROM reconcile_pending p
          USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
          WHERE p.topic = k.topic AND p.bucket_start_ms = k.start_ms
            AND p.bucket_width_ms = k.width_ms",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes new and changed verdicts with their history, incidents and outbox events. Returns
/// how many verdicts were written.
async fn write_verdicts(
    tx: &mut Transaction<'_, Postgres>,
    computed: Vec<Computed>,
    existing: &HashMap<VerdictKey, Existing>,
    incidents: &dyn IncidentRecorder,
    now: DateTime<Utc>,
    metrics: &ReconcileMetrics,
) -> Result<u64, ReconcileError> {
    let mut changes: Vec<(Computed, Option<&Existing>)> = computed
        .into_iter()
        .filter_map(|c| match existing.get(&c.key) {
            Some(old) if c.same_as(old) => None,
            old => Some((c, old)),
        })
        .collect();
    // Buckets turning bad first, so that a bucket healing in the same pass as a neighbour
    // breaks does not resolve and reopen the incident they share.
    changes.sort_by(|(a, _), (b, _)| {
        (!a.status.is_bad(), a.key.start, &a.key.topic, &a.key.edge).cmp(&(
            !b.status.is_bad(),
            b.key.start,
            &b.key.topic,
            &b.key.edge,
        ))
    });
    let written = changes.len() as u64;
    for (c, old) in changes {
        let mut incident_id = old.and_then(|o| o.incident_id);
        if c.alert && c.key.partition == -1 {
            let change = ChangedVerdict {
                topic: &c.key.topic,
                edge: &c.key.edge,
                datacenter: &c.key.datacenter,
                from_tier: &c.from_tier,
                to_tier: &c.to_tier,
                status: c.status,
                silent_tier: c.silent_tier.as_deref(),
                bucket_start_ms: c.key.start,
                bucket_width_ms: c.key.width,
                expected: c.expected,
                actual: c.actual,
                was_bad: old.is_some_and(|o| o.status.is_bad()),
                incident_id: old.and_then(|o| o.incident_id),
            };
            incident_id = incidents
                .record(tx, &change, now)
                .await
                .map_err(ReconcileError::Incident)?;
        }
        // Judged counts and their differences fit (`judge_bucket`); saturating regardless.
        let difference = c.actual.saturating_sub(c.expected);
        let missing = c.expected.saturating_sub(c.actual).max(0);
        sqlx::query(
            "INSERT INTO reconcile_verdicts (edge, topic, datacenter, partition, bucket_start_ms,
                 bucket_width_ms, from_tier, to_tier, status, expected, actual, difference, missing,
                 silent_tier, final_reason, incident_id, revisions, first_judged_at, changed_at,
                 lag_ms, stale_instances, waiting_on)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, 0,
                 $17, $17, $18, $19, $20)
             ON CONFLICT (edge, topic, datacenter, partition, bucket_start_ms, bucket_width_ms)
             DO UPDATE SET status = EXCLUDED.status, expected = EXCLUDED.expected,
                 actual = EXCLUDED.actual, difference = EXCLUDED.difference,
                 missing = EXCLUDED.missing, silent_tier = EXCLUDED.silent_tier,
                 final_reason = EXCLUDED.final_reason, incident_id = EXCLUDED.incident_id,
                 revisions = reconcile_verdicts.revisions + 1, changed_at = EXCLUDED.changed_at,
                 lag_ms = EXCLUDED.lag_ms, stale_instances = EXCLUDED.stale_instances,
                 waiting_on = EXCLUDED.waiting_on",
        )
        .bind(&c.key.edge)
        .bind(&c.key.topic)
        .bind(&c.key.datacenter)
        .bind(c.key.partition)
        .bind(c.key.start)
        .bind(c.key.width)
        .bind(&c.from_tier)
        .bind(&c.to_tier)
        .bind(c.status.as_str())
        .bind(c.expected)
        .bind(c.actual)
        .bind(difference)
        .bind(missing)
        .bind(&c.silent_tier)
        .bind(c.finality.as_str())
        .bind(incident_id)
        .bind(now)
        .bind(c.lag_ms)
        .bind(&c.stale_instances)
        .bind(&c.waiting_on)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO reconcile_verdict_history (edge, topic, datacenter, partition,
                 bucket_start_ms, bucket_width_ms, old_status, status, expected, actual, difference,
                 silent_tier, final_reason, changed_at, lag_ms, stale_instances, waiting_on)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17)",
        )
        .bind(&c.key.edge)
        .bind(&c.key.topic)
        .bind(&c.key.datacenter)
        .bind(c.key.partition)
        .bind(c.key.start)
        .bind(c.key.width)
        .bind(old.map(|o| o.status.as_str()))
        .bind(c.status.as_str())
        .bind(c.expected)
        .bind(c.actual)
        .bind(difference)
        .bind(&c.silent_tier)
        .bind(c.finality.as_str())
        .bind(now)
        .bind(c.lag_ms)
        .bind(&c.stale_instances)
        .bind(&c.waiting_on)
        .execute(&mut **tx)
        .await?;
        metrics
            .verdicts
            .with_label_values(&[c.status.as_str()])
            .inc();
        if c.key.partition == -1 && !c.stale_instances.is_empty() {
            tracing::info!(
                topic = %c.key.topic, edge = %c.key.edge, bucket_start_ms = c.key.start,
                stale_instances = ?c.stale_instances, status = %c.status,
                "bucket judged without instances that stopped reporting"
            );
        }
        if c.status.is_bad() && c.key.partition == -1 {
            tracing::info!(
                topic = %c.key.topic, edge = %c.key.edge, datacenter = %c.key.datacenter,
                bucket_start_ms = c.key.start, status = %c.status, expected = c.expected,
                actual = c.actual, waiting_on = ?c.waiting_on, "bucket judged bad"
            );
        }
    }
    Ok(written)
}

/// Sets the stale-instances gauge and logs instances that became stale or recovered.
async fn refresh_stale_instances(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    silence: &Silence<'_>,
    metrics: &ReconcileMetrics,
    notices: &Mutex<Notices>,
) -> Result<(), sqlx::Error> {
    let since = now - chrono::Duration::milliseconds(millis(config.lookback));
    let stale =
        evidence::stale_observers(pool, &config.tier_like_patterns(), since, silence).await?;
    metrics.stale_instances.set(stale.len() as i64);
    notices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .stale(stale.into_iter().collect());
    Ok(())
}

/// Sets the missing-messages gauge from the topic-level verdicts of recent buckets.
async fn refresh_missing_gauge(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    metrics: &ReconcileMetrics,
) -> Result<(), sqlx::Error> {
    let since = now.timestamp_millis() - millis(config.missing_metric_window);
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, LEAST(sum(missing), 9223372036854775807)::bigint FROM reconcile_verdicts
          WHERE partition = -1 AND status = 'missing' AND bucket_start_ms >= $1
          GROUP BY topic ORDER BY 2 DESC, topic",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    metrics.missing_messages.reset();
    let cap = config.missing_metric_max_topics;
    let mut other = 0;
    for (i, (topic, missing)) in rows.into_iter().enumerate() {
        if i < cap {
            metrics
                .missing_messages
                .with_label_values(&[topic.as_str()])
                .set(missing);
        } else {
            other = i64::saturating_add(other, missing);
        }
    }
    if other > 0 {
        metrics
            .missing_messages
            .with_label_values(&["_other"])
            .set(other);
    }
    Ok(())
}
