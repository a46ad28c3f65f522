//! PostgreSQL reads and writes of the ingest store (schema in `migrations/0001_*.sql`).
//!
//! [`write_batch`] is the heart of exactly-once ingest: in ONE transaction it inserts the
//! batch's record ids (keeping only those not seen before), adds the counts of the new
//! records, raises the progress marks and moves the consumed offsets. Either all of it
//! commits or none of it does, so replaying a batch after a crash changes nothing twice.
//!
//! Latency histograms are stored as V2-serialized HdrHistograms and merged in Rust with
//! HdrHistogram addition while the ingest lock is held, so stored percentiles are exact over
//! every record.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chaperone_audit::{AuditRecord, Counts, Latency, Progress};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use sha2::{Digest as _, Sha256};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Key of the advisory lock every ingest (and retention) transaction holds, so writers of
/// the counts tables are serialized and `change_seq` becomes visible in order.
pub const INGEST_LOCK: &str = "chaperone-ingest";

/// Partition stored for records that do not name one.
pub const NO_PARTITION: i32 = -1;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// PostgreSQL refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether the failure is likely to pass by itself (connection lost, server restarting,
    /// lock conflicts), as opposed to a bug or bad data.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => is_transient(e),
        }
    }
}

fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // connection exception, insufficient resources, operator intervention,
            // transaction rollback (serialization, deadlock), lock not available, system error
            ["08", "53", "57", "40", "58"]
                .iter()
                .any(|class| c.starts_with(class))
                || c == "55P03"
        }),
        _ => false,
    }
}

/// The next offset to read of one audit-topic partition, stored with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedOffset {
    /// Cluster alias from the collector's configuration.
    pub cluster: String,
    /// Audit topic.
    pub topic: String,
    /// Partition of the audit topic.
    pub partition: i32,
    /// Offset of the first record not yet applied.
    pub next_offset: i64,
}

/// What a committed batch changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Counts records applied.
    pub counts: usize,
    /// Progress records applied.
    pub progress: usize,
    /// Records skipped because their id was already stored (or repeated in the batch).
    pub duplicates: usize,
    /// Count rows inserted or updated.
    pub count_rows: usize,
}

/// Primary key of an `audit_counts` row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CountsKey {
    /// Logical topic.
    pub topic: String,
    /// Bucket start, epoch ms.
    pub bucket_start_ms: i64,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// Tier name.
    pub tier: String,
    /// Datacenter.
    pub datacenter: String,
    /// Cluster alias reported by the hop.
    pub cluster: String,
    /// Partition or [`NO_PARTITION`].
    pub partition: i32,
}

impl CountsKey {
    fn of(c: &Counts) -> Self {
        Self {
            topic: c.topic.clone(),
            bucket_start_ms: c.bucket_start_ms,
            bucket_width_ms: c.bucket_width.as_millis(),
            tier: c.observer.tier.as_str().to_owned(),
            datacenter: c.observer.datacenter.clone(),
            cluster: c.observer.cluster.clone(),
            partition: c.partition.unwrap_or(NO_PARTITION),
        }
    }
}

/// Primary key of an `audit_progress` row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ProgressKey {
    tier: String,
    cluster: String,
    datacenter: String,
    topic: String,
    physical_topic: String,
    partition: i32,
    host: String,
    instance: String,
}

impl ProgressKey {
    fn of(p: &Progress) -> Self {
        Self {
            tier: p.observer.tier.as_str().to_owned(),
            cluster: p.observer.cluster.clone(),
            datacenter: p.observer.datacenter.clone(),
            topic: p.topic.clone(),
            physical_topic: p.physical_topic.clone(),
            partition: p.partition.unwrap_or(NO_PARTITION),
            host: p.observer.host.clone(),
            instance: p.observer.instance.clone(),
        }
    }
}

/// The sum of the counts records of one key within a batch.
struct CountsSum<'a> {
    count: i64,
    bytes: i64,
    no_timestamp: i64,
    malformed: i64,
    min_event_ms: Option<i64>,
    max_event_ms: Option<i64>,
    records: i64,
    latencies: Vec<&'a Latency>,
}

/// The furthest marks of the progress records of one key within a batch.
struct ProgressMax<'a> {
    watermark_ms: i64,
    position: Option<i64>,
    high_watermark: Option<i64>,
    last_emitted_ms: i64,
    latest: &'a Progress,
}

fn opt_min(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn opt_max(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An empty histogram with the contract's bounds.
pub fn empty_histogram() -> Histogram<u64> {
    Latency::new().inner().clone()
}

/// Serializes a histogram to the stored form (HdrHistogram V2, raw bytes).
pub fn encode_histogram(h: &Histogram<u64>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    // Serializing into a Vec only fails on histograms too large to encode, which the
    // contract's bounds exclude; fall back to an empty histogram rather than panic.
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        buf.clear();
        let _ = V2Serializer::new().serialize(&empty_histogram(), &mut buf);
    }
    buf
}

/// Parses the stored form written by [`encode_histogram`].
pub fn decode_histogram(bytes: &[u8]) -> Result<Histogram<u64>, String> {
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("{e:?}"))
}

/// Adds every value of `from` into `into` (exact for histograms of the contract's bounds).
pub fn merge_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// The 128-bit key a record id is stored under in `audit_record_seen`: the id itself when it
/// is a UUID in canonical lowercase form (as audit-lib and chaperone-service write them),
/// otherwise the first 16 bytes of the SHA-256 of the id. `migrations/0013_*.sql` converts
/// stored ids with the same rule.
pub fn record_key(id: &str) -> Uuid {
    let canonical = id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    if canonical && let Ok(u) = Uuid::parse_str(id) {
        return u;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// Writes one batch of validated records and the offsets that follow them, in one
/// transaction. Records whose id is already stored (or that repeat an id earlier in the
/// batch) are skipped. On error nothing is written; the caller retries the same batch.
pub async fn write_batch(
    pool: &PgPool,
    records: &[AuditRecord],
    offsets: &[ConsumedOffset],
) -> Result<BatchOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    lock_ingest(&mut tx).await?;

    // First occurrence of every counts id in the batch. Progress records need no duplicate
    // filter: applying one twice changes nothing, every mark keeps its maximum.
    let mut seen = HashSet::with_capacity(records.len());
    // Each record with its id key; progress records have none.
    let mut first: Vec<(&AuditRecord, Option<Uuid>)> = Vec::with_capacity(records.len());
    let mut duplicates = 0;
    for r in records {
        match r {
            AuditRecord::Counts(c) => {
                let key = record_key(&c.id);
                if seen.insert(key) {
                    first.push((r, Some(key)));
                } else {
                    duplicates += 1;
                }
            }
            AuditRecord::Progress(_) => first.push((r, None)),
        }
    }
    let mut outcome = BatchOutcome {
        duplicates,
        ..BatchOutcome::default()
    };

    // The ingest lock keeps other writers out, so probing and then inserting only the new
    // ids is safe, and cheaper than ON CONFLICT DO NOTHING.
    let keys: Vec<Uuid> = first.iter().filter_map(|(_, k)| *k).collect();
    let stored: HashSet<Uuid> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar("SELECT id FROM audit_record_seen WHERE id = ANY($1)")
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    let fresh_keys: Vec<Uuid> = keys.into_iter().filter(|k| !stored.contains(k)).collect();
    if !fresh_keys.is_empty() {
        sqlx::query("INSERT INTO audit_record_seen (id) SELECT UNNEST($1::uuid[])")
            .bind(&fresh_keys)
            .execute(&mut *tx)
            .await?;
    }
    outcome.duplicates += stored.len();

    let mut counts: BTreeMap<CountsKey, CountsSum<'_>> = BTreeMap::new();
    let mut progress: BTreeMap<ProgressKey, ProgressMax<'_>> = BTreeMap::new();
    let mut topics: BTreeSet<&str> = BTreeSet::new();
    let fresh = first
        .iter()
        .filter(|(_, key)| key.is_none_or(|k| !stored.contains(&k)));
    for (r, _) in fresh {
        match r {
            AuditRecord::Counts(c) => {
                outcome.counts += 1;
                topics.insert(&c.topic);
                let sum = counts.entry(CountsKey::of(c)).or_insert_with(|| CountsSum {
                    count: 0,
                    bytes: 0,
                    no_timestamp: 0,
                    malformed: 0,
                    min_event_ms: None,
                    max_event_ms: None,
                    records: 0,
                    latencies: Vec::new(),
                });
                sum.count = sum.count.saturating_add(to_i64(c.count));
                sum.bytes = sum.bytes.saturating_add(to_i64(c.bytes));
                sum.no_timestamp = sum.no_timestamp.saturating_add(to_i64(c.no_timestamp));
                sum.malformed = sum.malformed.saturating_add(to_i64(c.malformed));
                sum.min_event_ms = opt_min(sum.min_event_ms, c.min_event_ms);
                sum.max_event_ms = opt_max(sum.max_event_ms, c.max_event_ms);
                sum.records += 1;
                if !c.latency.is_empty() {
                    sum.latencies.push(&c.latency);
                }
            }
            AuditRecord::Progress(p) => {
                outcome.progress += 1;
                topics.insert(&p.topic);
                let key = ProgressKey::of(p);
                match progress.get_mut(&key) {
                    None => {
                        progress.insert(
                            key,
                            ProgressMax {
                                watermark_ms: p.watermark_ms,
                                position: p.position,
                                high_watermark: p.high_watermark,
                                last_emitted_ms: p.emitted_at_ms,
                                latest: p,
                            },
                        );
                    }
                    Some(m) => {
                        m.watermark_ms = m.watermark_ms.max(p.watermark_ms);
                        m.position = opt_max(m.position, p.position);
                        m.high_watermark = opt_max(m.high_watermark, p.high_watermark);
                        if p.emitted_at_ms >= m.last_emitted_ms {
                            m.last_emitted_ms = p.emitted_at_ms;
                            m.latest = p;
                        }
                    }
                }
            }
        }
    }

    outcome.count_rows = counts.len();
    if !counts.is_empty() {
        upsert_counts(&mut tx, counts).await?;
    }
    if !progress.is_empty() {
        upsert_progress(&mut tx, progress).await?;
    }
    if !topics.is_empty() {
        let topics: Vec<&str> = topics.into_iter().collect();
        sqlx::query(
            "INSERT INTO audit_topics (topic) SELECT UNNEST($1::text[]) \
             ON CONFLICT (topic) DO UPDATE SET last_seen_at = now()",
        )
        .bind(&topics)
        .execute(&mut *tx)
        .await?;
    }
    if !offsets.is_empty() {
        let mut sorted: Vec<&ConsumedOffset> = offsets.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.cluster, &a.topic, a.partition).cmp(&(&b.cluster, &b.topic, b.partition))
        });
        let clusters: Vec<&str> = sorted.iter().map(|o| o.cluster.as_str()).collect();
        let topics: Vec<&str> = sorted.iter().map(|o| o.topic.as_str()).collect();
        let partitions: Vec<i32> = sorted.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = sorted.iter().map(|o| o.next_offset).collect();
        sqlx::query(
            "INSERT INTO ingest_offsets (cluster, topic, partition, next_offset) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[]) \
             ON CONFLICT (cluster, topic, partition) DO UPDATE \
             SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(&clusters)
        .bind(&topics)
        .bind(&partitions)
        .bind(&next)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Takes the ingest lock for the rest of `tx`, and lets `tx` commit without waiting for
/// its WAL flush: a commit lost in a PostgreSQL crash takes its consumed offsets with it, so
/// the records are read again from Kafka and applied again; nothing is lost or doubled.
async fn lock_ingest(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(INGEST_LOCK)
        .execute(&mut **tx)
        .await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Column arrays of a set of count keys, in key order.
#[derive(Default)]
struct KeyColumns<'a> {
    topic: Vec<&'a str>,
    bucket_start_ms: Vec<i64>,
    bucket_width_ms: Vec<i64>,
    tier: Vec<&'a str>,
    datacenter: Vec<&'a str>,
    cluster: Vec<&'a str>,
    partition: Vec<i32>,
}

impl<'a> KeyColumns<'a> {
    fn push(&mut self, k: &'a CountsKey) {
        self.topic.push(&k.topic);
        self.bucket_start_ms.push(k.bucket_start_ms);
        self.bucket_width_ms.push(k.bucket_width_ms);
        self.tier.push(&k.tier);
        self.datacenter.push(&k.datacenter);
        self.cluster.push(&k.cluster);
        self.partition.push(k.partition);
    }
}

#[derive(sqlx::FromRow)]
struct StoredLatency {
    topic: String,
    bucket_start_ms: i64,
    bucket_width_ms: i64,
    tier: String,
    datacenter: String,
    cluster: String,
    partition: i32,
    latency: Vec<u8>,
}

async fn upsert_counts(
    tx: &mut Transaction<'_, Postgres>,
    counts: BTreeMap<CountsKey, CountsSum<'_>>,
) -> Result<(), sqlx::Error> {
    let mut keys = KeyColumns::default();
    for k in counts.keys() {
        keys.push(k);
    }
    // Read the stored histograms. No row lock is needed: every writer of `audit_counts`
    // (ingest and retention) holds the ingest advisory lock for its whole transaction, so
    // nothing changes these rows, or inserts missing ones, before the upsert below.
    let stored: Vec<StoredLatency> = sqlx::query_as(
        "SELECT c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.cluster, \
                c.partition, c.latency \
         FROM audit_counts c \
         JOIN UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::int4[]) \
              AS k(topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
         USING (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
         ",
    )
    .bind(&keys.topic)
    .bind(&keys.bucket_start_ms)
    .bind(&keys.bucket_width_ms)
    .bind(&keys.tier)
    .bind(&keys.datacenter)
    .bind(&keys.cluster)
    .bind(&keys.partition)
    .fetch_all(&mut **tx)
    .await?;
    let mut existing: BTreeMap<CountsKey, Vec<u8>> = stored
        .into_iter()
        .map(|s| {
            (
                CountsKey {
                    topic: s.topic,
                    bucket_start_ms: s.bucket_start_ms,
                    bucket_width_ms: s.bucket_width_ms,
                    tier: s.tier,
                    datacenter: s.datacenter,
                    cluster: s.cluster,
                    partition: s.partition,
                },
                s.latency,
            )
        })
        .collect();

    let n = counts.len();
    let mut count = Vec::with_capacity(n);
    let mut bytes = Vec::with_capacity(n);
    let mut no_timestamp = Vec::with_capacity(n);
    let mut malformed = Vec::with_capacity(n);
    let mut min_event = Vec::with_capacity(n);
    let mut max_event = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let mut merges = Vec::with_capacity(n);
    for (key, sum) in &counts {
        count.push(sum.count);
        bytes.push(sum.bytes);
        no_timestamp.push(sum.no_timestamp);
        malformed.push(sum.malformed);
        min_event.push(sum.min_event_ms);
        max_event.push(sum.max_event_ms);
        records.push(sum.records);
        merges.push((key, existing.remove(key), sum.latencies.as_slice()));
    }
    let latency = merge_all(merges);

    sqlx::query(
        "INSERT INTO audit_counts AS c (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, \
             cluster, partition, count, bytes, no_timestamp, malformed, min_event_ms, max_event_ms, \
             latency, records) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
             $6::text[], $7::int4[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], \
             $12::int8[], $13::int8[], $14::bytea[], $15::int8[]) \
         ON CONFLICT (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
         DO UPDATE SET \
             count = c.count + EXCLUDED.count, \
             bytes = c.bytes + EXCLUDED.bytes, \
             no_timestamp = c.no_timestamp + EXCLUDED.no_timestamp, \
             malformed = c.malformed + EXCLUDED.malformed, \
             min_event_ms = LEAST(c.min_event_ms, EXCLUDED.min_event_ms), \
             max_event_ms = GREATEST(c.max_event_ms, EXCLUDED.max_event_ms), \
             latency = EXCLUDED.latency, \
             records = c.records + EXCLUDED.records, \
             updated_at = now(), \
             change_seq = nextval('audit_change_seq')",
    )
    .bind(&keys.topic)
    .bind(&keys.bucket_start_ms)
    .bind(&keys.bucket_width_ms)
    .bind(&keys.tier)
    .bind(&keys.datacenter)
    .bind(&keys.cluster)
    .bind(&keys.partition)
    .bind(&count)
    .bind(&bytes)
    .bind(&no_timestamp)
    .bind(&malformed)
    .bind(&min_event)
    .bind(&max_event)
    .bind(&latency)
    .bind(&records)
    .execute(&mut **tx)
    .await?;

    // Tell readers which buckets changed (see migrations/0013_*.sql).
    let changed: BTreeSet<(&str, i64, i64, &str)> = counts
        .keys()
        .map(|k| {
            (
                k.topic.as_str(),
                k.bucket_start_ms,
                k.bucket_width_ms,
                k.tier.as_str(),
            )
        })
        .collect();
    let mut topic = Vec::with_capacity(changed.len());
    let mut start = Vec::with_capacity(changed.len());
    let mut width = Vec::with_capacity(changed.len());
    let mut tier = Vec::with_capacity(changed.len());
    for (t, s, w, tr) in changed {
        topic.push(t);
        start.push(s);
        width.push(w);
        tier.push(tr);
    }
    sqlx::query(
        "INSERT INTO audit_count_changes (topic, bucket_start_ms, bucket_width_ms, tier) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[])",
    )
    .bind(&topic)
    .bind(&start)
    .bind(&width)
    .bind(&tier)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One row's histogram work: its key, the stored histogram, the batch's histograms.
type Merge<'a> = (&'a CountsKey, Option<Vec<u8>>, &'a [&'a Latency]);

/// [`merged_latency`] of every row, in order, spread over the available cores: decoding,
/// adding and encoding histograms is the CPU-heavy part of a batch, and PostgreSQL is idle
/// meanwhile, waiting for the upsert.
fn merge_all(merges: Vec<Merge<'_>>) -> Vec<Vec<u8>> {
    const MIN_PER_THREAD: usize = 256;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(merges.len() / MIN_PER_THREAD)
        .max(1);
    let one = |part: Vec<Merge<'_>>| -> Vec<Vec<u8>> {
        part.into_iter()
            .map(|(key, stored, new)| merged_latency(key, stored, new))
            .collect()
    };
    if threads == 1 {
        return one(merges);
    }
    let per = merges.len().div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = merges;
    while rest.len() > per {
        let tail = rest.split_off(per);
        parts.push(rest);
        rest = tail;
    }
    parts.push(rest);
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || one(part)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// The stored histogram of `key` plus every new one, serialized.
fn merged_latency(key: &CountsKey, stored: Option<Vec<u8>>, new: &[&Latency]) -> Vec<u8> {
    let base = stored.and_then(|bytes| match decode_histogram(&bytes) {
        Ok(h) => Some(h),
        Err(reason) => {
            tracing::error!(
                topic = %key.topic,
                bucket_start_ms = key.bucket_start_ms,
                tier = %key.tier,
                %reason,
                "stored latency histogram is unreadable; replacing it with the new values"
            );
            None
        }
    });
    match (base, new) {
        (Some(mut h), _) => {
            for l in new {
                merge_histogram(&mut h, l.inner());
            }
            encode_histogram(&h)
        }
        (None, []) => encode_histogram(&empty_histogram()),
        (None, [only]) => encode_histogram(only.inner()),
        (None, [head, rest @ ..]) => {
            let mut h = head.inner().clone();
            for l in rest {
                merge_histogram(&mut h, l.inner());
            }
            encode_histogram(&h)
        }
    }
}

async fn upsert_progress(
    tx: &mut Transaction<'_, Postgres>,
    progress: BTreeMap<ProgressKey, ProgressMax<'_>>,
) -> Result<(), sqlx::Error> {
    let n = progress.len();
    let mut tier = Vec::with_capacity(n);
    let mut cluster = Vec::with_capacity(n);
    let mut datacenter = Vec::with_capacity(n);
    let mut topic = Vec::with_capacity(n);
    let mut physical = Vec::with_capacity(n);
    let mut partition = Vec::with_capacity(n);
    let mut watermark = Vec::with_capacity(n);
    let mut position = Vec::with_capacity(n);
    let mut high = Vec::with_capacity(n);
    let mut width = Vec::with_capacity(n);
    let mut emitted = Vec::with_capacity(n);
    let mut host = Vec::with_capacity(n);
    let mut instance = Vec::with_capacity(n);
    let mut closing = Vec::with_capacity(n);
    for (k, m) in &progress {
        tier.push(k.tier.as_str());
        cluster.push(k.cluster.as_str());
        datacenter.push(k.datacenter.as_str());
        topic.push(k.topic.as_str());
        physical.push(k.physical_topic.as_str());
        partition.push(k.partition);
        watermark.push(m.watermark_ms);
        position.push(m.position);
        high.push(m.high_watermark);
        width.push(m.latest.bucket_width.as_millis());
        emitted.push(m.last_emitted_ms);
        host.push(k.host.as_str());
        instance.push(k.instance.as_str());
        closing.push(m.latest.closing);
    }
    sqlx::query(
        "INSERT INTO audit_progress AS p (tier, cluster, datacenter, topic, physical_topic, \
             partition, watermark_ms, position, high_watermark, bucket_width_ms, last_emitted_ms, \
             host, instance, closing) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int4[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], \
             $12::text[], $13::text[], $14::bool[]) \
         ON CONFLICT (tier, cluster, datacenter, topic, physical_topic, partition, host, instance) \
         DO UPDATE SET \
             watermark_ms = GREATEST(p.watermark_ms, EXCLUDED.watermark_ms), \
             position = GREATEST(p.position, EXCLUDED.position), \
             high_watermark = GREATEST(p.high_watermark, EXCLUDED.high_watermark), \
             bucket_width_ms = CASE WHEN EXCLUDED.last_emitted_ms >= p.last_emitted_ms \
                 THEN EXCLUDED.bucket_width_ms ELSE p.bucket_width_ms END, \
             closing = CASE WHEN EXCLUDED.last_emitted_ms >= p.last_emitted_ms \
                 THEN EXCLUDED.closing ELSE p.closing END, \
             last_emitted_ms = GREATEST(p.last_emitted_ms, EXCLUDED.last_emitted_ms), \
             last_seen_at = now(), \
             change_seq = nextval('audit_change_seq')",
    )
    .bind(&tier)
    .bind(&cluster)
    .bind(&datacenter)
    .bind(&topic)
    .bind(&physical)
    .bind(&partition)
    .bind(&watermark)
    .bind(&position)
    .bind(&high)
    .bind(&width)
    .bind(&emitted)
    .bind(&host)
    .bind(&instance)
    .bind(&closing)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The stored next offsets of one audit topic, by partition.
pub async fn load_offsets(
    pool: &PgPool,
    cluster: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, StoreError> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM ingest_offsets WHERE cluster = $1 AND topic = $2",
    )
    .bind(cluster)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Rows removed by one retention run, by table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// `audit_counts` rows.
    pub counts: u64,
    /// `audit_record_seen` rows (ids of applied counts records).
    pub record_ids: u64,
    /// `audit_count_changes` rows.
    pub changes: u64,
    /// `audit_progress` rows.
    pub progress: u64,
    /// `audit_topics` rows.
    pub topics: u64,
}

/// Deletes count rows of buckets that started before `cutoff_ms`, and record ids, bucket
/// changes, progress rows and topics last touched before `cutoff_at`, `batch` rows per
/// transaction.
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
    let out = RetentionOutcome {
        counts,
        record_ids,
        changes,
        progress,
        topics,
    };
    Ok(out)
}

/// Deletes expired rows every `config.interval` until `shutdown`; does nothing when
/// `config.days` is 0. Failures are logged and retried at the next interval.
pub async fn run_retention(
    pool: PgPool,
    config: crate::config::RetentionConfig,
    clock: crate::Clock,
    metrics: crate::metrics::IngestMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if config.days == 0 {
        tracing::info!("retention disabled");
        return;
    }
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cutoff_at = clock.now() - chrono::Duration::days(i64::from(config.days));
        let cutoff_ms = cutoff_at.timestamp_millis();
        let run = delete_expired(&pool, cutoff_ms, cutoff_at, config.batch_size);
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = run => r,
        };
        match result {
            Ok(out) => {
                for (table, n) in [
                    ("audit_counts", out.counts),
                    ("audit_record_seen", out.record_ids),
                    ("audit_count_changes", out.changes),
                    ("audit_progress", out.progress),
                    ("audit_topics", out.topics),
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
                    changes = out.changes,
                    progress = out.progress,
                    topics = out.topics,
                    "retention run finished"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention run failed; retrying at the next interval")
            }
        }
    }
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
        lock_ingest(&mut tx).await?;
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
    pub fn of(h: &Histogram<u64>) -> Self {
        let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        Self {
            samples: h.len(),
            p50: q(0.50),
            p95: q(0.95),
            p99: q(0.99),
            max: (!h.is_empty()).then(|| h.max()),
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
        h: Histogram<u64>,
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
                latency_ms: LatencySummary::of(&empty_histogram()),
            },
            dcs: BTreeSet::new(),
            h: empty_histogram(),
        });
        acc.t.count = acc.t.count.saturating_add(r.count);
        acc.t.bytes = acc.t.bytes.saturating_add(r.bytes);
        acc.t.no_timestamp = acc.t.no_timestamp.saturating_add(r.no_timestamp);
        acc.t.malformed = acc.t.malformed.saturating_add(r.malformed);
        acc.t.min_event_ms = opt_min(acc.t.min_event_ms, r.min_event_ms);
        acc.t.max_event_ms = opt_max(acc.t.max_event_ms, r.max_event_ms);
        acc.dcs.insert(r.datacenter);
        match decode_histogram(&r.latency) {
            Ok(h) => merge_histogram(&mut acc.h, &h),
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
            latency: encode_histogram(latency.inner()),
        }
    }

    #[test]
    fn histogram_bytes_round_trip() {
        let l = hist(&[1, 5, 900, 40_000]);
        let back = decode_histogram(&encode_histogram(l.inner())).expect("decodes");
        assert_eq!(&back, l.inner());
        assert!(decode_histogram(b"junk").is_err());
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

    #[test]
    fn merged_latency_includes_stored_values() {
        let key = CountsKey {
            topic: "t".into(),
            bucket_start_ms: 0,
            bucket_width_ms: 60_000,
            tier: "producer".into(),
            datacenter: "dc".into(),
            cluster: "c".into(),
            partition: 0,
        };
        let stored = encode_histogram(hist(&[1, 2, 3]).inner());
        let a = hist(&[100]);
        let b = hist(&[1_000, 2_000]);
        let merged = decode_histogram(&merged_latency(&key, Some(stored), &[&a, &b])).expect("ok");
        assert_eq!(merged.len(), 6);
        let only = decode_histogram(&merged_latency(&key, None, &[&a])).expect("ok");
        assert_eq!(only.len(), 1);
        let corrupt =
            decode_histogram(&merged_latency(&key, Some(b"x".to_vec()), &[&b])).expect("ok");
        assert_eq!(corrupt.len(), 2);
        let empty = decode_histogram(&merged_latency(&key, None, &[])).expect("ok");
        assert!(empty.is_empty());
    }
}
