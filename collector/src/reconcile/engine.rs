//! One evaluation pass: queue the buckets whose counts changed, judge the ones that are final
//! and write verdicts, their history, incidents and outbox events, one transaction per batch
//! of buckets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::config::{EdgeConfig, ReconcileConfig};
use super::metrics::ReconcileMetrics;
use super::verdict::{
    EdgeBucket, Finality, Mark, Rules, Side, VerdictStatus, evaluate_all, event_lag_ms, judge,
};
use crate::alerts::payload::EventData;

/// Advisory lock key (hashed by PostgreSQL) held by every reconciler transaction.
const LOCK_KEY: &str = "chaperone-reconcile";

/// Errors of one evaluation pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// PostgreSQL failed; the pass is retried at the next interval.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// An outbox payload could not be encoded.
    #[error("encoding an alert event: {0}")]
    Payload(#[from] serde_json::Error),
    /// A stored verdict holds a status this version does not know.
    #[error("stored verdict has unknown status `{0}`")]
    UnknownStatus(String),
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BucketKey {
    topic: String,
    start: i64,
    width: i64,
}

#[derive(Debug)]
struct CountRow {
    tier: String,
    datacenter: String,
    partition: i32,
    count: i64,
}

#[derive(Debug)]
struct ProgressRow {
    tier: String,
    datacenter: String,
    width: i64,
    mark: Mark,
}

/// What the reconciler has already logged, so that a lasting condition is logged when it
/// starts and ends, not on every pass.
#[derive(Debug, Default)]
pub(crate) struct Notices {
    stale: BTreeSet<String>,
    widths: BTreeSet<String>,
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
}

/// The staleness rule (docs/verdicts.md) on an observer's `last_seen`, the collector's time of
/// its latest progress, and `last_emitted`, that progress's own time: silent for
/// `instance_timeout` on the collector's clock (`$seen_before` binds `now - instance_timeout`)
/// and against the newest progress of any observer (`$timeout` binds it in ms), so that a
/// collector that lags behind its audit topics does not find everyone stale.
fn stale_sql(last_seen: &str, last_emitted: &str, seen_before: u8, timeout: u8) -> String {
    format!(
        "({last_seen} < ${seen_before} AND {last_emitted} < \
         (SELECT max(last_emitted_ms) FROM audit_progress) - ${timeout})"
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VerdictKey {
    edge: String,
    topic: String,
    datacenter: String,
    partition: i32,
    start: i64,
    width: i64,
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

#[derive(Debug, Clone)]
struct Computed {
    key: VerdictKey,
    from_tier: String,
    to_tier: String,
    status: VerdictStatus,
    expected: i64,
    actual: i64,
    silent_tier: Option<String>,
    lag_ms: Option<i64>,
    stale_instances: Vec<String>,
    waiting_on: Vec<String>,
    finality: Finality,
    alert: bool,
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

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
    metrics: &ReconcileMetrics,
    notices: &Mutex<Notices>,
) -> Result<PassReport, ReconcileError> {
    let mut report = PassReport {
        queued: enqueue(pool, config, now).await?,
        ..PassReport::default()
    };
    let mut after: Option<BucketKey> = None;
    let mut mismatches = BTreeSet::new();
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
        let counts = load_counts(&mut tx, &keys, &config.tiers).await?;
        let topics: Vec<String> = keys
            .iter()
            .map(|k| k.topic.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let progress = load_progress(&mut tx, &topics, &config.tiers, config, now).await?;
        let existing = load_verdicts(&mut tx, &keys).await?;
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
            let (mut verdicts, mut all_final) =
                judge_bucket(config, now, q, rows, topic_progress, &mut mismatches);
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
            write_verdicts(&mut tx, computed, &existing, config, now, metrics).await?;
        delete_pending(&mut tx, &done).await?;
        tx.commit().await?;
    }
    // Buckets of mismatched edges stay queued (within the lookback), so every pass sees every
    // mismatch that still holds.
    metrics.width_mismatches.set(mismatches.len() as i64);
    notices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .widths(mismatches);
    refresh_stale_instances(pool, config, now, metrics, notices).await?;
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

/// Queues every bucket with counts changed since the cursor and moves the cursor.
async fn enqueue(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> Result<u64, ReconcileError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    let cursor: i64 =
        sqlx::query_scalar("SELECT change_seq FROM reconcile_cursor WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    // Ingest makes change_seq values visible in increasing order, so everything up to the
    // highest value seen now is here; later changes get higher values.
    let high: Option<i64> =
        sqlx::query_scalar("SELECT max(change_seq) FROM audit_count_changes WHERE change_seq > $1")
            .bind(cursor)
            .fetch_one(&mut *tx)
            .await?;
    let Some(high) = high else {
        tx.commit().await?;
        return Ok(0);
    };
    let queued = sqlx::query(
        "INSERT INTO reconcile_pending (topic, bucket_start_ms, bucket_width_ms, queued_at,
             first_queued_at)
         SELECT DISTINCT topic, bucket_start_ms, bucket_width_ms, $4::timestamptz, $4::timestamptz
           FROM audit_count_changes
          WHERE change_seq > $1 AND change_seq <= $2 AND tier = ANY($3)
            AND bucket_start_ms + bucket_width_ms >= $5
         ON CONFLICT (topic, bucket_start_ms, bucket_width_ms)
         DO UPDATE SET queued_at = EXCLUDED.queued_at",
    )
    .bind(cursor)
    .bind(high)
    .bind(&config.tiers)
    .bind(now)
    .bind(now.timestamp_millis() - millis(config.lookback))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("UPDATE reconcile_cursor SET change_seq = $1 WHERE id = 1")
        .bind(high)
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
    let rows = sqlx::query(
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
    rows.iter()
        .map(|r| {
            Ok(Queued {
                key: BucketKey {
                    topic: r.try_get(0)?,
                    start: r.try_get(1)?,
                    width: r.try_get(2)?,
                },
                changed_at: r.try_get(3)?,
                first_queued_at: r.try_get(4)?,
            })
        })
        .collect()
}

fn key_arrays(keys: &[BucketKey]) -> (Vec<String>, Vec<i64>, Vec<i64>) {
    (
        keys.iter().map(|k| k.topic.clone()).collect(),
        keys.iter().map(|k| k.start).collect(),
        keys.iter().map(|k| k.width).collect(),
    )
}

async fn load_counts(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[BucketKey],
    tiers: &[String],
) -> Result<HashMap<BucketKey, Vec<CountRow>>, sqlx::Error> {
    let (topics, starts, widths) = key_arrays(keys);
    let rows = sqlx::query(
        "SELECT c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.partition,
                sum(c.count)::bigint
           FROM audit_counts c
           JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
             ON c.topic = k.topic AND c.bucket_start_ms = k.start_ms
            AND c.bucket_width_ms = k.width_ms
          WHERE c.tier = ANY($4)
          GROUP BY c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.partition",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .bind(tiers)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<BucketKey, Vec<CountRow>> = HashMap::new();
    for r in rows {
        let key = BucketKey {
            topic: r.try_get(0)?,
            start: r.try_get(1)?,
            width: r.try_get(2)?,
        };
        out.entry(key).or_default().push(CountRow {
            tier: r.try_get(3)?,
            datacenter: r.try_get(4)?,
            partition: r.try_get(5)?,
            count: r.try_get(6)?,
        });
    }
    Ok(out)
}

async fn load_progress(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    tiers: &[String],
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> Result<HashMap<String, Vec<ProgressRow>>, sqlx::Error> {
    let stale_before = now - chrono::Duration::milliseconds(millis(config.instance_timeout));
    let rows = sqlx::query(&format!(
        "SELECT topic, tier, datacenter, partition, host || '/' || instance, watermark_ms,
                last_emitted_ms, tier IN (SELECT tier FROM consumer_tiers), closing,
                {stale}, bucket_width_ms
           FROM audit_progress
          WHERE topic = ANY($1) AND tier = ANY($2)",
        stale = stale_sql("last_seen_at", "last_emitted_ms", 3, 4),
    ))
    .bind(topics)
    .bind(tiers)
    .bind(stale_before)
    .bind(millis(config.instance_timeout))
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<String, Vec<ProgressRow>> = HashMap::new();
    for r in rows {
        out.entry(r.try_get(0)?).or_default().push(ProgressRow {
            tier: r.try_get(1)?,
            datacenter: r.try_get(2)?,
            width: r.try_get(10)?,
            mark: Mark {
                partition: r.try_get(3)?,
                observer: r.try_get(4)?,
                watermark_ms: r.try_get(5)?,
                last_emitted_ms: r.try_get(6)?,
                consumer: r.try_get(7)?,
                closing: r.try_get(8)?,
                stale: r.try_get(9)?,
            },
        });
    }
    Ok(out)
}

async fn load_verdicts(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[BucketKey],
) -> Result<HashMap<VerdictKey, Existing>, ReconcileError> {
    let (topics, starts, widths) = key_arrays(keys);
    let rows = sqlx::query(
        "SELECT v.edge, v.topic, v.datacenter, v.partition, v.bucket_start_ms, v.bucket_width_ms,
                v.status, v.expected, v.actual, v.silent_tier, v.incident_id, v.stale_instances
           FROM reconcile_verdicts v
           JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS k (topic, start_ms, width_ms)
             ON v.topic = k.topic AND v.bucket_start_ms = k.start_ms
            AND v.bucket_width_ms = k.width_ms",
    )
    .bind(topics)
    .bind(starts)
    .bind(widths)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let status: String = r.try_get(6)?;
        let status = status
            .parse()
            .map_err(|_| ReconcileError::UnknownStatus(status))?;
        out.insert(
            VerdictKey {
                edge: r.try_get(0)?,
                topic: r.try_get(1)?,
                datacenter: r.try_get(2)?,
                partition: r.try_get(3)?,
                start: r.try_get(4)?,
                width: r.try_get(5)?,
            },
            Existing {
                status,
                expected: r.try_get(7)?,
                actual: r.try_get(8)?,
                silent_tier: r.try_get(9)?,
                stale_instances: r.try_get(11)?,
                incident_id: r.try_get(10)?,
            },
        );
    }
    Ok(out)
}

async fn delete_pending(
    tx: &mut Transaction<'_, Postgres>,
    done: &[BucketKey],
) -> Result<(), sqlx::Error> {
    if done.is_empty() {
        return Ok(());
    }
    let (topics, starts, widths) = key_arrays(done);
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

/// Judges one bucket on every edge and scope that is final (see [`evaluate`]). Returns the
/// verdicts and whether every edge and scope is settled (the bucket can leave the queue).
/// Edges whose tiers count the topic in different bucket widths are not compared; they are
/// added to `mismatches`.
fn judge_bucket(
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    queued: &Queued,
    rows: &[CountRow],
    progress: &[ProgressRow],
    mismatches: &mut BTreeSet<String>,
) -> (Vec<Computed>, bool) {
    let key = &queued.key;
    let end = key.start.saturating_add(key.width);
    let rules = Rules {
        lateness_ms: millis(config.allowed_lateness),
        max_wait_ms: millis(config.max_wait),
        loss_after_ms: millis(config.loss_after),
    };
    let now_ms = now.timestamp_millis();
    let mut all_final = true;
    let mut out = Vec::new();
    for edge in &config.edges {
        let on_edge: Vec<&CountRow> = rows
            .iter()
            .filter(|r| r.tier == edge.from || r.tier == edge.to)
            .collect();
        if on_edge.is_empty() {
            continue;
        }
        let scopes: BTreeSet<&str> = if edge.per_datacenter {
            on_edge.iter().map(|r| r.datacenter.as_str()).collect()
        } else {
            BTreeSet::from([""])
        };
        for scope in scopes {
            let in_scope = |dc: &str| scope.is_empty() || dc == scope;
            let scoped: Vec<&ProgressRow> = progress
                .iter()
                .filter(|p| in_scope(&p.datacenter))
                .collect();
            let widths = |tier: &str| -> BTreeSet<i64> {
                scoped
                    .iter()
                    .filter(|p| p.tier == tier && !p.mark.stale)
                    .map(|p| p.width)
                    .collect()
            };
            let (up_widths, down_widths) = (widths(&edge.from), widths(&edge.to));
            if !up_widths.is_empty()
                && !down_widths.is_empty()
                && up_widths.is_disjoint(&down_widths)
            {
                mismatches.insert(format!(
                    "topic `{}` on `{}`: {} counts in {:?} ms buckets, {} in {:?} ms",
                    key.topic,
                    edge.name(),
                    edge.from,
                    up_widths,
                    edge.to,
                    down_widths
                ));
                // Stays queued, so that the mismatch is seen again while it lasts.
                all_final = false;
                continue;
            }
            let by_partition = |tier: &str, dc: Option<&str>| -> BTreeMap<i32, i64> {
                let mut m = BTreeMap::new();
                for r in on_edge.iter().filter(|r| {
                    r.tier == tier
                        && in_scope(&r.datacenter)
                        && dc.is_none_or(|d| d == r.datacenter)
                }) {
                    *m.entry(r.partition).or_insert(0) += r.count;
                }
                m
            };
            let expected = by_partition(&edge.from, None);
            let actual = by_partition(&edge.to, None);
            if !scoped.iter().any(|p| p.tier == edge.from) && expected.values().all(|&n| n == 0) {
                // The upstream tier never reported this topic here (for example producers
                // without the audit library): nothing to compare against.
                continue;
            }
            // Every datacenter in scope must pass on its own: the same partition number of
            // two datacenters is two streams (docs/verdicts.md).
            let datacenters: BTreeSet<&str> = scoped
                .iter()
                .filter(|p| p.tier == edge.from || p.tier == edge.to)
                .map(|p| p.datacenter.as_str())
                .chain(
                    on_edge
                        .iter()
                        .filter(|r| in_scope(&r.datacenter))
                        .map(|r| r.datacenter.as_str()),
                )
                .collect();
            struct Part {
                up: Vec<Mark>,
                down: Vec<Mark>,
                expected: BTreeMap<i32, i64>,
                actual: BTreeMap<i32, i64>,
                event_lag_ms: i64,
            }
            let parts: Vec<Part> = datacenters
                .into_iter()
                .map(|dc| {
                    let marks = |tier: &str| -> Vec<Mark> {
                        scoped
                            .iter()
                            .filter(|p| p.tier == tier && p.datacenter == dc)
                            .map(|p| p.mark.clone())
                            .collect()
                    };
                    // Producers' event-time lag is a property of the datacenter's sources:
                    // every tier waits for it, whichever edge it is on.
                    let sources: Vec<Mark> = scoped
                        .iter()
                        .filter(|p| p.datacenter == dc)
                        .map(|p| p.mark.clone())
                        .collect();
                    Part {
                        up: marks(&edge.from),
                        down: marks(&edge.to),
                        expected: by_partition(&edge.from, Some(dc)),
                        actual: by_partition(&edge.to, Some(dc)),
                        event_lag_ms: event_lag_ms(&sources),
                    }
                })
                .filter(|p| {
                    // A datacenter where only the downstream reports, counting nothing, has
                    // nothing to prove.
                    !(p.up.is_empty()
                        && p.expected.values().all(|&n| n == 0)
                        && p.actual.values().all(|&n| n == 0))
                })
                .collect();
            let buckets: Vec<EdgeBucket<'_>> = parts
                .iter()
                .map(|p| EdgeBucket {
                    end_ms: end,
                    queued_ms: queued.first_queued_at.timestamp_millis(),
                    now_ms,
                    upstream: &p.up,
                    downstream: &p.down,
                    expected: &p.expected,
                    actual: &p.actual,
                    event_lag_ms: p.event_lag_ms,
                })
                .collect();
            let Some(outcome) = evaluate_all(&rules, &buckets) else {
                all_final = false;
                continue;
            };
            let waiting_on: Vec<String> = if outcome.finality == Finality::Progress {
                Vec::new()
            } else {
                let named = |tier: &str, who: &[String]| {
                    who.iter()
                        .map(|w| format!("{tier}:{w}"))
                        .collect::<Vec<_>>()
                };
                let mut w = named(&edge.from, &outcome.upstream.waiting_on);
                w.extend(named(&edge.to, &outcome.downstream.waiting_on));
                w
            };
            if !outcome.settled {
                all_final = false;
            }
            let mut push = |partition: i32, e: i64, a: i64| {
                let j = judge(&outcome, now_ms, e, a);
                out.push(Computed {
                    key: VerdictKey {
                        edge: edge.name(),
                        topic: key.topic.clone(),
                        datacenter: scope.to_owned(),
                        partition,
                        start: key.start,
                        width: key.width,
                    },
                    from_tier: edge.from.clone(),
                    to_tier: edge.to.clone(),
                    status: j.status,
                    expected: e,
                    actual: a,
                    silent_tier: j.silent.map(|s| silent_tier(edge, s)),
                    lag_ms: j.lag_ms,
                    stale_instances: outcome.upstream.stale.clone(),
                    waiting_on: waiting_on.clone(),
                    finality: outcome.finality,
                    alert: edge.alert,
                });
            };
            push(-1, expected.values().sum(), actual.values().sum());
            if edge.partition_level {
                if expected.contains_key(&-1) || actual.contains_key(&-1) {
                    tracing::debug!(
                        topic = %key.topic, edge = %edge.name(),
                        "partition-level verdict skipped: a tier counted without partitions"
                    );
                    continue;
                }
                let partitions: BTreeSet<i32> =
                    expected.keys().chain(actual.keys()).copied().collect();
                for p in partitions {
                    push(
                        p,
                        expected.get(&p).copied().unwrap_or(0),
                        actual.get(&p).copied().unwrap_or(0),
                    );
                }
            }
        }
    }
    (out, all_final)
}

fn silent_tier(edge: &EdgeConfig, side: Side) -> String {
    match side {
        Side::Upstream => edge.from.clone(),
        Side::Downstream => edge.to.clone(),
    }
}

/// Writes new and changed verdicts with their history, incidents and outbox events. Returns
/// how many verdicts were written.
async fn write_verdicts(
    tx: &mut Transaction<'_, Postgres>,
    computed: Vec<Computed>,
    existing: &HashMap<VerdictKey, Existing>,
    config: &ReconcileConfig,
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
            incident_id = update_incident(tx, &c, old, config, now).await?;
        }
        let difference = c.actual - c.expected;
        let missing = (c.expected - c.actual).max(0);
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

/// An incident row as the outbox payload needs it.
struct IncidentRow {
    id: i64,
    first: i64,
    last: i64,
    bad_buckets: i32,
    opened_at: DateTime<Utc>,
}

const INCIDENT_COLUMNS: &str =
    "id, first_bucket_start_ms, last_bucket_start_ms, bad_buckets, opened_at";

fn incident_row(r: &sqlx::postgres::PgRow) -> Result<IncidentRow, sqlx::Error> {
    Ok(IncidentRow {
        id: r.try_get(0)?,
        first: r.try_get(1)?,
        last: r.try_get(2)?,
        bad_buckets: r.try_get(3)?,
        opened_at: r.try_get(4)?,
    })
}

/// Opens, joins or resolves the incident of a changed topic-level verdict and writes the
/// outbox event, in the caller's transaction. Returns the verdict's incident id.
async fn update_incident(
    tx: &mut Transaction<'_, Postgres>,
    c: &Computed,
    old: Option<&Existing>,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> Result<Option<i64>, ReconcileError> {
    let was_bad = old.is_some_and(|o| o.status.is_bad());
    let old_incident = old.and_then(|o| o.incident_id);
    let missing = (c.expected - c.actual).max(0);
    if c.status.is_bad() {
        let row = match old_incident.filter(|_| was_bad) {
            // Still bad with other numbers: same incident.
            Some(id) => sqlx::query(&format!(
                "UPDATE alert_incidents SET max_missing = greatest(max_missing, $2)
                  WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(id)
            .bind(missing)
            .fetch_one(&mut **tx)
            .await
            .and_then(|r| incident_row(&r))?,
            None => join_or_open(tx, c, missing, config, now).await?,
        };
        insert_event(tx, "bad_bucket", c, &row, None, now).await?;
        return Ok(Some(row.id));
    }
    let Some(id) = old_incident.filter(|_| was_bad) else {
        return Ok(old_incident);
    };
    let row = sqlx::query(&format!(
        "UPDATE alert_incidents SET bad_buckets = bad_buckets - 1
          WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
    ))
    .bind(id)
    .fetch_one(&mut **tx)
    .await
    .and_then(|r| incident_row(&r))?;
    if row.bad_buckets <= 0 {
        sqlx::query(
            "UPDATE alert_incidents SET status = 'resolved', resolved_at = $2
              WHERE id = $1 AND status = 'open'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        tracing::info!(
            incident_id = id, topic = %c.key.topic, edge = %c.key.edge,
            "incident resolved"
        );
        insert_event(tx, "resolved", c, &row, Some(now), now).await?;
    }
    Ok(Some(id))
}

/// Joins the open incident of the verdict's topic, edge and datacenter, or opens one. An open
/// incident is superseded by a new one (which notifies) when this loss is much worse than any
/// of its buckets (`escalate_factor`) or comes `incident_gap` after its last bad bucket: an
/// open incident never mutes a topic for good.
async fn join_or_open(
    tx: &mut Transaction<'_, Postgres>,
    c: &Computed,
    missing: i64,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> Result<IncidentRow, sqlx::Error> {
    let open: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, last_bucket_start_ms, max_missing FROM alert_incidents
          WHERE topic = $1 AND edge = $2 AND datacenter = $3 AND status = 'open'
          FOR UPDATE",
    )
    .bind(&c.key.topic)
    .bind(&c.key.edge)
    .bind(&c.key.datacenter)
    .fetch_optional(&mut **tx)
    .await?;
    let open = match open {
        Some((id, last, max_missing)) => {
            let late = c.key.start > last.saturating_add(millis(config.incident_gap));
            let worse = max_missing > 0
                && missing >= max_missing.saturating_mul(i64::from(config.escalate_factor));
            if late || worse {
                sqlx::query(
                    "UPDATE alert_incidents SET status = 'superseded', resolved_at = $2
                      WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                tracing::warn!(
                    incident_id = id, topic = %c.key.topic, edge = %c.key.edge,
                    missing, max_missing, late, worse,
                    "open incident superseded by a new one"
                );
                None
            } else {
                Some(id)
            }
        }
        None => None,
    };
    let row = match open {
        Some(id) => {
            sqlx::query(&format!(
                "UPDATE alert_incidents
                    SET first_bucket_start_ms = least(first_bucket_start_ms, $2),
                        last_bucket_start_ms = greatest(last_bucket_start_ms, $2),
                        buckets = buckets + 1, bad_buckets = bad_buckets + 1,
                        max_missing = greatest(max_missing, $3)
                  WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(id)
            .bind(c.key.start)
            .bind(missing)
            .fetch_one(&mut **tx)
            .await?
        }
        None => {
            let row = sqlx::query(&format!(
                "INSERT INTO alert_incidents (topic, edge, datacenter, from_tier, to_tier, status,
                     bucket_width_ms, first_bucket_start_ms, last_bucket_start_ms, max_missing,
                     opened_at)
                 VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7, $8, $9)
                 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(&c.key.topic)
            .bind(&c.key.edge)
            .bind(&c.key.datacenter)
            .bind(&c.from_tier)
            .bind(&c.to_tier)
            .bind(c.key.width)
            .bind(c.key.start)
            .bind(missing)
            .bind(now)
            .fetch_one(&mut **tx)
            .await?;
            tracing::warn!(
                topic = %c.key.topic, edge = %c.key.edge, datacenter = %c.key.datacenter,
                bucket_start_ms = c.key.start, status = %c.status, "incident opened"
            );
            row
        }
    };
    incident_row(&row)
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    kind: &str,
    c: &Computed,
    incident: &IncidentRow,
    resolved_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), ReconcileError> {
    let data = EventData {
        incident_id: incident.id,
        topic: c.key.topic.clone(),
        edge: c.key.edge.clone(),
        from_tier: c.from_tier.clone(),
        to_tier: c.to_tier.clone(),
        datacenter: (!c.key.datacenter.is_empty()).then(|| c.key.datacenter.clone()),
        status: c.status,
        silent_tier: c.silent_tier.clone(),
        bucket_start_ms: c.key.start,
        bucket_width_ms: c.key.width,
        expected: c.expected,
        actual: c.actual,
        incident_first_bucket_start_ms: incident.first,
        incident_last_bucket_start_ms: incident.last,
        opened_at: incident.opened_at,
        resolved_at,
    };
    sqlx::query(
        "INSERT INTO alert_events (incident_id, kind, payload, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(incident.id)
    .bind(kind)
    .bind(serde_json::to_string(&data)?)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets the stale-instances gauge and logs instances that became stale or recovered.
async fn refresh_stale_instances(
    pool: &PgPool,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    metrics: &ReconcileMetrics,
    notices: &Mutex<Notices>,
) -> Result<(), sqlx::Error> {
    let stale_before = now - chrono::Duration::milliseconds(millis(config.instance_timeout));
    let since = now - chrono::Duration::milliseconds(millis(config.lookback));
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT tier || ':' || host || '/' || instance FROM audit_progress
          WHERE tier = ANY($3) AND tier NOT IN (SELECT tier FROM consumer_tiers)
          GROUP BY tier, host, instance
         HAVING NOT bool_and(closing) AND max(last_seen_at) >= $2 AND {stale}",
        stale = stale_sql("max(last_seen_at)", "max(last_emitted_ms)", 1, 4),
    ))
    .bind(stale_before)
    .bind(since)
    .bind(&config.tiers)
    .bind(millis(config.instance_timeout))
    .fetch_all(pool)
    .await?;
    metrics.stale_instances.set(rows.len() as i64);
    notices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .stale(rows.into_iter().map(|(s,)| s).collect());
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
        "SELECT topic, sum(missing)::bigint FROM reconcile_verdicts
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
            other += missing;
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

/// Rows deleted per retention statement.
const PRUNE_BATCH: i64 = 1_000;

/// Deletes verdicts of buckets that started before `now - retention_days`, history entries
/// older than that, and incidents resolved before it with their events and deliveries, in
/// batches of [`PRUNE_BATCH`]. Returns the rows deleted.
pub(crate) async fn prune(
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
                .bind(PRUNE_BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            deleted += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}
