//! One evaluation pass: queue the buckets whose counts changed, judge the ones that are final
//! and write verdicts, their history, incidents and outbox events, one transaction per batch
//! of buckets.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::config::{EdgeConfig, ReconcileConfig};
use super::metrics::ReconcileMetrics;
use super::verdict::{Finality, Side, VerdictStatus, finality, judge};
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
    watermark_ms: i64,
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
    finality: Finality,
    alert: bool,
}

impl Computed {
    fn same_as(&self, old: &Existing) -> bool {
        self.status == old.status
            && self.expected == old.expected
            && self.actual == old.actual
            && self.silent_tier == old.silent_tier
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
) -> Result<PassReport, ReconcileError> {
    let mut report = PassReport {
        queued: enqueue(pool, config, now).await?,
        ..PassReport::default()
    };
    let mut after: Option<BucketKey> = None;
    loop {
        let mut tx = pool.begin().await?;
        lock(&mut tx).await?;
        let keys = next_pending(&mut tx, after.as_ref(), config.batch_buckets).await?;
        let Some(last) = keys.last().cloned() else {
            tx.commit().await?;
            break;
        };
        after = Some(last);
        report.evaluated += keys.len() as u64;
        let counts = load_counts(&mut tx, &keys, &config.tiers).await?;
        let topics: Vec<String> = keys
            .iter()
            .map(|k| k.topic.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let progress = load_progress(&mut tx, &topics, &config.tiers).await?;
        let existing = load_verdicts(&mut tx, &keys).await?;

        let mut done = Vec::new();
        let mut computed = Vec::new();
        let no_progress = Vec::new();
        let oldest_end = now.timestamp_millis() - millis(config.lookback);
        for key in &keys {
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
            let (verdicts, all_final) = judge_bucket(config, now, key, rows, topic_progress);
            report.judged += verdicts.len() as u64;
            computed.extend(verdicts);
            if all_final {
                done.push(key.clone());
            }
        }
        report.changed += write_verdicts(&mut tx, computed, &existing, now, metrics).await?;
        delete_pending(&mut tx, &done).await?;
        tx.commit().await?;
    }
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_pending")
        .fetch_one(pool)
        .await?;
    report.pending = u64::try_from(pending).unwrap_or(0);
    metrics.pending_buckets.set(pending);
    refresh_missing_gauge(pool, config, now, metrics).await?;
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
        "INSERT INTO reconcile_pending (topic, bucket_start_ms, bucket_width_ms, queued_at)
         SELECT DISTINCT topic, bucket_start_ms, bucket_width_ms, $4::timestamptz
           FROM audit_count_changes
          WHERE change_seq > $1 AND change_seq <= $2 AND tier = ANY($3)
            AND bucket_start_ms + bucket_width_ms >= $5
         ON CONFLICT DO NOTHING",
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

async fn next_pending(
    tx: &mut Transaction<'_, Postgres>,
    after: Option<&BucketKey>,
    limit: usize,
) -> Result<Vec<BucketKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT topic, bucket_start_ms, bucket_width_ms FROM reconcile_pending
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
            Ok(BucketKey {
                topic: r.try_get(0)?,
                start: r.try_get(1)?,
                width: r.try_get(2)?,
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
) -> Result<HashMap<String, Vec<ProgressRow>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT topic, tier, datacenter, watermark_ms FROM audit_progress
          WHERE topic = ANY($1) AND tier = ANY($2)",
    )
    .bind(topics)
    .bind(tiers)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<String, Vec<ProgressRow>> = HashMap::new();
    for r in rows {
        out.entry(r.try_get(0)?).or_default().push(ProgressRow {
            tier: r.try_get(1)?,
            datacenter: r.try_get(2)?,
            watermark_ms: r.try_get(3)?,
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
                v.status, v.expected, v.actual, v.silent_tier, v.incident_id
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

/// Judges one bucket on every edge and scope that is final. Returns the verdicts and whether
/// every edge and scope was final.
fn judge_bucket(
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    key: &BucketKey,
    rows: &[CountRow],
    progress: &[ProgressRow],
) -> (Vec<Computed>, bool) {
    let end = key.start.saturating_add(key.width);
    let lateness = millis(config.allowed_lateness);
    let max_wait = millis(config.max_wait);
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
            let watermarks = |tier: &str| -> Vec<i64> {
                progress
                    .iter()
                    .filter(|p| p.tier == tier && in_scope(&p.datacenter))
                    .map(|p| p.watermark_ms)
                    .collect()
            };
            let up_wm = watermarks(&edge.from);
            let down_wm = watermarks(&edge.to);
            let sum = |tier: &str, partition: Option<i32>| -> i64 {
                on_edge
                    .iter()
                    .filter(|r| {
                        r.tier == tier
                            && in_scope(&r.datacenter)
                            && partition.is_none_or(|p| r.partition == p)
                    })
                    .map(|r| r.count)
                    .sum()
            };
            if up_wm.is_empty() && sum(&edge.from, None) == 0 {
                // The upstream tier never reported this topic here (for example producers
                // without the audit library): nothing to compare against.
                continue;
            }
            let Some(fin) = finality(end, lateness, max_wait, now_ms, &up_wm, &down_wm) else {
                all_final = false;
                continue;
            };
            let mut push = |partition: i32, expected: i64, actual: i64| {
                let j = judge(end, expected, actual, &up_wm, &down_wm);
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
                    expected,
                    actual,
                    silent_tier: j.silent.map(|s| silent_tier(edge, s)),
                    finality: fin,
                    alert: edge.alert,
                });
            };
            push(-1, sum(&edge.from, None), sum(&edge.to, None));
            if edge.partition_level {
                let in_scope_rows = on_edge.iter().filter(|r| in_scope(&r.datacenter));
                let unknown = in_scope_rows
                    .clone()
                    .any(|r| r.partition < 0 && r.count > 0);
                if unknown {
                    tracing::debug!(
                        topic = %key.topic, edge = %edge.name(),
                        "partition-level verdict skipped: a tier counted without partitions"
                    );
                    continue;
                }
                let partitions: BTreeSet<i32> = in_scope_rows
                    .map(|r| r.partition)
                    .filter(|&p| p >= 0)
                    .collect();
                for p in partitions {
                    push(p, sum(&edge.from, Some(p)), sum(&edge.to, Some(p)));
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
            incident_id = update_incident(tx, &c, old, now).await?;
        }
        let difference = c.actual - c.expected;
        let missing = (c.expected - c.actual).max(0);
        sqlx::query(
            "INSERT INTO reconcile_verdicts (edge, topic, datacenter, partition, bucket_start_ms,
                 bucket_width_ms, from_tier, to_tier, status, expected, actual, difference, missing,
                 silent_tier, final_reason, incident_id, revisions, first_judged_at, changed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, 0,
                 $17, $17)
             ON CONFLICT (edge, topic, datacenter, partition, bucket_start_ms, bucket_width_ms)
             DO UPDATE SET status = EXCLUDED.status, expected = EXCLUDED.expected,
                 actual = EXCLUDED.actual, difference = EXCLUDED.difference,
                 missing = EXCLUDED.missing, silent_tier = EXCLUDED.silent_tier,
                 final_reason = EXCLUDED.final_reason, incident_id = EXCLUDED.incident_id,
                 revisions = reconcile_verdicts.revisions + 1, changed_at = EXCLUDED.changed_at",
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
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO reconcile_verdict_history (edge, topic, datacenter, partition,
                 bucket_start_ms, bucket_width_ms, old_status, status, expected, actual, difference,
                 silent_tier, final_reason, changed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .execute(&mut **tx)
        .await?;
        metrics
            .verdicts
            .with_label_values(&[c.status.as_str()])
            .inc();
        if c.status.is_bad() && c.key.partition == -1 {
            tracing::info!(
                topic = %c.key.topic, edge = %c.key.edge, datacenter = %c.key.datacenter,
                bucket_start_ms = c.key.start, status = %c.status, expected = c.expected,
                actual = c.actual, "bucket judged bad"
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
            None => join_or_open(tx, c, missing, now).await?,
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

async fn join_or_open(
    tx: &mut Transaction<'_, Postgres>,
    c: &Computed,
    missing: i64,
    now: DateTime<Utc>,
) -> Result<IncidentRow, sqlx::Error> {
    let open: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM alert_incidents
          WHERE topic = $1 AND edge = $2 AND datacenter = $3 AND status = 'open'
          FOR UPDATE",
    )
    .bind(&c.key.topic)
    .bind(&c.key.edge)
    .bind(&c.key.datacenter)
    .fetch_optional(&mut **tx)
    .await?;
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
          WHERE i.status = 'resolved' AND i.resolved_at < $2 LIMIT $3)",
        "DELETE FROM alert_events WHERE id IN (SELECT e.id FROM alert_events e
           JOIN alert_incidents i ON i.id = e.incident_id
          WHERE i.status = 'resolved' AND i.resolved_at < $2
            AND NOT EXISTS (SELECT 1 FROM alert_deliveries d WHERE d.event_id = e.id)
          LIMIT $3)",
        "DELETE FROM alert_incidents WHERE id IN (SELECT i.id FROM alert_incidents i
          WHERE i.status = 'resolved' AND i.resolved_at < $2
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
