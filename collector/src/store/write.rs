//! Ingest's write path. [`write_batch`] is the heart of exactly-once ingest: in ONE
//! transaction it checks that the batch's audit partitions are still this writer's, keeps
//! only the counts records not applied before (numbered records by their stream's applied
//! ranges, [`super::sequence`]; others by inserting their ids), adds the counts of the new
//! records, raises the progress marks and moves the consumed offsets. Either all of it
//! commits or none of it does, so replaying a batch after a crash changes nothing twice.
//!
//! Latency histograms are stored as V2-serialized HdrHistograms (audit-lib's
//! [`Latency::to_bytes`]) and merged in Rust with HdrHistogram addition while the row is
//! locked, so stored percentiles are exact over every record.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chaperone_audit::sequence::canonical_uuid;
use chaperone_audit::{AuditRecord, Counts, Latency, Progress, SequencedId};
use sha2::{Digest as _, Sha256};
use sqlx::postgres::PgArguments;
use sqlx::{PgPool, Postgres, Row as _, Transaction};
use uuid::Uuid;

use super::{NO_PARTITION, StoreError, sequence};

/// How [`write_batch`] tells a new record from one applied before.
enum Filter<'a> {
    /// A progress record, read through the cluster named (when known): applying it again
    /// changes nothing.
    Progress(Option<&'a str>),
    /// A counts record filtered by its id's key in `audit_record_seen`.
    Id(Uuid),
    /// A numbered counts record: (topic, stream, number), filtered by the stream's ranges.
    Sequence(&'a str, i64, i64),
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
    /// The next offset stored when this writer last stored or loaded it (0 when none was):
    /// the batch is written only if it is still the stored one, that is if no other
    /// collector has written this partition since. See [`write_batch`].
    pub stored_offset: i64,
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
    /// The cluster the batch's last record of this key was read from.
    source: Option<&'a str>,
}

pub(super) fn opt_min(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

pub(super) fn opt_max(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The 128-bit key a record id is stored under in `audit_record_seen`: the id itself when it
/// is a UUID in canonical lowercase form (as audit-lib and chaperone-service write them),
/// otherwise the first 16 bytes of the SHA-256 of the id. `migrations/0013_*.sql` converts
/// stored ids with the same rule.
pub fn record_key(id: &str) -> Uuid {
    if let Some(u) = canonical_uuid(id) {
        return u;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// Writes one batch of validated records and the offsets that follow them, in one
/// transaction. Counts records applied before (or repeated in the batch) are skipped:
/// numbered ones by their stream's applied ranges, others by their stored id. On error
/// nothing is written; the caller retries the same batch.
///
/// No lock is global: collectors write concurrently, each the audit partitions it reads.
/// The offset rows of the batch's partitions are locked first, and the batch is refused
/// with [`StoreError::Fenced`] (nothing written) when one of them is no longer the
/// `stored_offset` the writer continues from: another collector has taken the partition
/// over (a consumer group rebalance) and stored records of it since. The records are then
/// the other collector's to apply, so none is applied twice.
///
/// `sources` names, record by record, the alias of the cluster each record was read from;
/// it may be shorter than `records` (empty from tools and tests that do not read a cluster),
/// and a record without one is stored with no source.
pub async fn write_batch(
    pool: &PgPool,
    records: &[AuditRecord],
    sources: &[&str],
    offsets: &[ConsumedOffset],
) -> Result<BatchOutcome, StoreError> {
    let offsets = OffsetColumns::of(offsets);
    let mut tx = pool.begin().await?;
    relax_commit(&mut tx).await?;
    if !offsets.partition.is_empty() {
        claim_offsets(&mut tx, &offsets).await?;
    }

    // How each record is filtered: progress records need none (applying one twice changes
    // nothing, every mark keeps its maximum); numbered counts records by their stream's
    // applied ranges (see [`super::sequence`]); other counts records by their id, whose first
    // occurrence in the batch is kept here.
    let mut seen = HashSet::with_capacity(records.len());
    let mut first: Vec<(&AuditRecord, Filter<'_>)> = Vec::with_capacity(records.len());
    let mut claims = sequence::Claims::new();
    let mut duplicates = 0;
    for (i, r) in records.iter().enumerate() {
        match r {
            AuditRecord::Counts(c) => match SequencedId::parse(&c.id) {
                Some(s) => {
                    let (stream, n) = (s.stream as i64, s.sequence as i64);
                    claims.entry((&c.topic, stream)).or_default().push(n);
                    first.push((r, Filter::Sequence(&c.topic, stream, n)));
                }
                None => {
                    let key = record_key(&c.id);
                    if seen.insert(key) {
                        first.push((r, Filter::Id(key)));
                    } else {
                        duplicates += 1;
                    }
                }
            },
            AuditRecord::Progress(_) => {
                first.push((r, Filter::Progress(sources.get(i).copied())));
            }
        }
    }
    let mut outcome = BatchOutcome {
        duplicates,
        ..BatchOutcome::default()
    };

    // The ids inserted now are the new records; an id stored before, or by a concurrent
    // writer (which this insert waits for), is not returned.
    let keys: Vec<Uuid> = first
        .iter()
        .filter_map(|(_, f)| match f {
            Filter::Id(k) => Some(*k),
            _ => None,
        })
        .collect();
    let fresh_ids: HashSet<Uuid> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar(
            "INSERT INTO audit_record_seen (id) SELECT UNNEST($1::uuid[]) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };
    outcome.duplicates += keys.len() - fresh_ids.len();
    let mut fresh_numbers = if claims.is_empty() {
        HashSet::new()
    } else {
        sequence::claim(&mut tx, &claims).await?
    };
    let fresh: Vec<(&AuditRecord, Option<&str>)> = first
        .into_iter()
        .filter_map(|(r, f)| {
            let source = match f {
                Filter::Progress(source) => source,
                _ => None,
            };
            let new = match f {
                Filter::Progress(_) => true,
                Filter::Id(k) => fresh_ids.contains(&k),
                // Taken out of the set: a number repeated in the batch is applied once.
                Filter::Sequence(topic, stream, n) => fresh_numbers.remove(&(topic, stream, n)),
            };
            if !new {
                outcome.duplicates += matches!(f, Filter::Sequence(..)) as usize;
            }
            new.then_some((r, source))
        })
        .collect();

    let mut counts: BTreeMap<CountsKey, CountsSum<'_>> = BTreeMap::new();
    let mut progress: BTreeMap<ProgressKey, ProgressMax<'_>> = BTreeMap::new();
    let mut topics: BTreeSet<&str> = BTreeSet::new();
    for (r, source) in fresh {
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
                                source,
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
                        m.source = source.or(m.source);
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
    if !offsets.partition.is_empty() {
        sqlx::query(
            "INSERT INTO ingest_offsets (cluster, topic, partition, next_offset) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[]) \
             ON CONFLICT (cluster, topic, partition) DO UPDATE \
             SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(&offsets.cluster)
        .bind(&offsets.topic)
        .bind(&offsets.partition)
        .bind(&offsets.next)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Lets `tx` commit without waiting for its WAL flush: a commit lost in a PostgreSQL crash
/// takes its consumed offsets with it, so the records are read again from Kafka and applied
/// again; nothing is lost or doubled.
pub(super) async fn relax_commit(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A partition whose stored offset another writer has moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedPartition {
    /// Cluster alias.
    pub cluster: String,
    /// Audit topic.
    pub topic: String,
    /// Partition of the audit topic.
    pub partition: i32,
    /// The next offset stored now.
    pub stored_offset: i64,
}

/// A batch's offsets as column arrays, in (cluster, topic, partition) order: the order their
/// rows are locked in, so that two writers never deadlock on them.
#[derive(Default)]
struct OffsetColumns<'a> {
    cluster: Vec<&'a str>,
    topic: Vec<&'a str>,
    partition: Vec<i32>,
    stored: Vec<i64>,
    next: Vec<i64>,
}

impl<'a> OffsetColumns<'a> {
    fn of(offsets: &'a [ConsumedOffset]) -> Self {
        let mut sorted: Vec<&ConsumedOffset> = offsets.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.cluster, &a.topic, a.partition).cmp(&(&b.cluster, &b.topic, b.partition))
        });
        let mut cols = Self::default();
        for o in sorted {
            cols.cluster.push(&o.cluster);
            cols.topic.push(&o.topic);
            cols.partition.push(o.partition);
            cols.stored.push(o.stored_offset);
            cols.next.push(o.next_offset);
        }
        cols
    }

    /// The stored offset the writer continues from for a partition of the batch.
    fn stored_offset(&self, cluster: &str, topic: &str, partition: i32) -> Option<i64> {
        (0..self.partition.len())
            .find(|&i| {
                self.cluster[i] == cluster
                    && self.topic[i] == topic
                    && self.partition[i] == partition
            })
            .map(|i| self.stored[i])
    }
}

/// Locks the offset rows of `offsets` (creating missing ones at 0) until the end of `tx`,
/// and fails with [`StoreError::Fenced`] when one is not the writer's `stored_offset`.
async fn claim_offsets(
    tx: &mut Transaction<'_, Postgres>,
    offsets: &OffsetColumns<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ingest_offsets (cluster, topic, partition, next_offset) \
         SELECT c, t, p, 0 FROM UNNEST($1::text[], $2::text[], $3::int4[]) AS u(c, t, p) \
         ON CONFLICT (cluster, topic, partition) DO NOTHING",
    )
    .bind(&offsets.cluster)
    .bind(&offsets.topic)
    .bind(&offsets.partition)
    .execute(&mut **tx)
    .await?;
    let stored: Vec<(String, String, i32, i64)> = sqlx::query_as(
        "SELECT o.cluster, o.topic, o.partition, o.next_offset FROM ingest_offsets o \
         JOIN UNNEST($1::text[], $2::text[], $3::int4[]) AS u(cluster, topic, partition) \
         USING (cluster, topic, partition) \
         ORDER BY 1, 2, 3 FOR UPDATE OF o",
    )
    .bind(&offsets.cluster)
    .bind(&offsets.topic)
    .bind(&offsets.partition)
    .fetch_all(&mut **tx)
    .await?;
    let fenced: Vec<FencedPartition> = stored
        .into_iter()
        .filter(|(c, t, p, next)| offsets.stored_offset(c, t, *p).is_some_and(|s| s != *next))
        .map(
            |(cluster, topic, partition, stored_offset)| FencedPartition {
                cluster,
                topic,
                partition,
                stored_offset,
            },
        )
        .collect();
    if fenced.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Fenced(fenced))
    }
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

impl StoredLatency {
    fn into_entry(self) -> (CountsKey, Vec<u8>) {
        (
            CountsKey {
                topic: self.topic,
                bucket_start_ms: self.bucket_start_ms,
                bucket_width_ms: self.bucket_width_ms,
                tier: self.tier,
                datacenter: self.datacenter,
                cluster: self.cluster,
                partition: self.partition,
            },
            self.latency,
        )
    }
}

/// The stored histograms of the rows of `keys` that exist, each row locked until the end of
/// `tx` (in key order, so that two writers of the same rows never deadlock).
async fn lock_stored(
    tx: &mut Transaction<'_, Postgres>,
    keys: &KeyColumns<'_>,
) -> Result<BTreeMap<CountsKey, Vec<u8>>, sqlx::Error> {
    let stored: Vec<StoredLatency> = sqlx::query_as(
        "SELECT c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, c.cluster, \
                c.partition, c.latency \
         FROM audit_counts c \
         JOIN UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::int4[]) \
              AS k(topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
         USING (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
         ORDER BY 1, 2, 3, 4, 5, 6, 7 \
         FOR UPDATE OF c",
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
    Ok(stored.into_iter().map(StoredLatency::into_entry).collect())
}

/// Column arrays of count rows to write: their keys, the batch's sums and the merged
/// histograms.
#[derive(Default)]
struct RowColumns<'a> {
    keys: KeyColumns<'a>,
    count: Vec<i64>,
    bytes: Vec<i64>,
    no_timestamp: Vec<i64>,
    malformed: Vec<i64>,
    min_event: Vec<Option<i64>>,
    max_event: Vec<Option<i64>>,
    records: Vec<i64>,
    latency: Vec<Vec<u8>>,
}

impl<'a> RowColumns<'a> {
    /// The rows of `keys`, each with its histogram merged onto the stored one in `stored`.
    fn of(
        keys: &[&'a CountsKey],
        counts: &'a BTreeMap<CountsKey, CountsSum<'a>>,
        stored: &mut BTreeMap<CountsKey, Vec<u8>>,
    ) -> Self {
        let mut rows = RowColumns::default();
        let mut merges = Vec::with_capacity(keys.len());
        for &key in keys {
            let sum = &counts[key];
            rows.keys.push(key);
            rows.count.push(sum.count);
            rows.bytes.push(sum.bytes);
            rows.no_timestamp.push(sum.no_timestamp);
            rows.malformed.push(sum.malformed);
            rows.min_event.push(sum.min_event_ms);
            rows.max_event.push(sum.max_event_ms);
            rows.records.push(sum.records);
            merges.push((key, stored.remove(key), sum.latencies.as_slice()));
        }
        rows.latency = merge_all(merges);
        rows
    }

    fn bind<'q>(&'q self, sql: &'q str) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        sqlx::query(sql)
            .bind(&self.keys.topic)
            .bind(&self.keys.bucket_start_ms)
            .bind(&self.keys.bucket_width_ms)
            .bind(&self.keys.tier)
            .bind(&self.keys.datacenter)
            .bind(&self.keys.cluster)
            .bind(&self.keys.partition)
            .bind(&self.count)
            .bind(&self.bytes)
            .bind(&self.no_timestamp)
            .bind(&self.malformed)
            .bind(&self.min_event)
            .bind(&self.max_event)
            .bind(&self.latency)
            .bind(&self.records)
    }
}

/// The count rows of a batch as one UNNEST, in [`RowColumns::bind`] order.
const ROWS: &str = "UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
    $6::text[], $7::int4[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], \
    $13::int8[], $14::bytea[], $15::int8[]) \
    AS u(topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition, count, \
         bytes, no_timestamp, malformed, min_event_ms, max_event_ms, latency, records)";

/// Adds the batch's sums to `audit_counts`. Histograms are merged in Rust, so each row is
/// read and locked first; a row is normally written by one collector (its topic's records
/// come through one audit partition), and the lock keeps the merge exact when another
/// collector writes the same row at the same time all the same.
async fn upsert_counts(
    tx: &mut Transaction<'_, Postgres>,
    counts: BTreeMap<CountsKey, CountsSum<'_>>,
) -> Result<(), sqlx::Error> {
    let mut keys = KeyColumns::default();
    for k in counts.keys() {
        keys.push(k);
    }
    let mut stored = lock_stored(tx, &keys).await?;

    // New rows. One that another writer inserted since the read above is not inserted
    // again: it is locked, read and added to like a stored one.
    let new: Vec<&CountsKey> = counts.keys().filter(|k| !stored.contains_key(*k)).collect();
    let mut known: Vec<&CountsKey> = counts.keys().filter(|k| stored.contains_key(*k)).collect();
    if !new.is_empty() {
        let rows = RowColumns::of(&new, &counts, &mut BTreeMap::new());
        let sql = format!(
            "INSERT INTO audit_counts (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, \
                 cluster, partition, count, bytes, no_timestamp, malformed, min_event_ms, \
                 max_event_ms, latency, records) \
             SELECT u.* FROM {ROWS} \
             ON CONFLICT (topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition) \
             DO NOTHING \
             RETURNING topic, bucket_start_ms, bucket_width_ms, tier, datacenter, cluster, partition"
        );
        let inserted: BTreeSet<CountsKey> = rows
            .bind(&sql)
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(|r| {
                Ok(CountsKey {
                    topic: r.try_get(0)?,
                    bucket_start_ms: r.try_get(1)?,
                    bucket_width_ms: r.try_get(2)?,
                    tier: r.try_get(3)?,
                    datacenter: r.try_get(4)?,
                    cluster: r.try_get(5)?,
                    partition: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let raced: Vec<&CountsKey> = new.into_iter().filter(|k| !inserted.contains(*k)).collect();
        if !raced.is_empty() {
            let mut raced_keys = KeyColumns::default();
            for k in &raced {
                raced_keys.push(k);
            }
            stored.extend(lock_stored(tx, &raced_keys).await?);
            known.extend(raced);
            known.sort();
        }
    }

    // Stored rows: add the sums, replace the histograms with the merged ones.
    if !known.is_empty() {
        let rows = RowColumns::of(&known, &counts, &mut stored);
        let sql = format!(
            "UPDATE audit_counts AS c SET \
                 count = c.count + u.count, \
                 bytes = c.bytes + u.bytes, \
                 no_timestamp = c.no_timestamp + u.no_timestamp, \
                 malformed = c.malformed + u.malformed, \
                 min_event_ms = LEAST(c.min_event_ms, u.min_event_ms), \
                 max_event_ms = GREATEST(c.max_event_ms, u.max_event_ms), \
                 latency = u.latency, \
                 records = c.records + u.records, \
                 updated_at = now(), \
                 change_seq = nextval('audit_change_seq') \
             FROM {ROWS} \
             WHERE (c.topic, c.bucket_start_ms, c.bucket_width_ms, c.tier, c.datacenter, \
                    c.cluster, c.partition) \
                 = (u.topic, u.bucket_start_ms, u.bucket_width_ms, u.tier, u.datacenter, \
                    u.cluster, u.partition)"
        );
        rows.bind(&sql).execute(&mut **tx).await?;
    }

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
    let base = stored.and_then(|bytes| match Latency::from_bytes(&bytes) {
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
                h.merge(l);
            }
            h.to_bytes()
        }
        (None, []) => Latency::new().to_bytes(),
        (None, [only]) => only.to_bytes(),
        (None, [head, rest @ ..]) => {
            let mut h = (*head).clone();
            for l in rest {
                h.merge(l);
            }
            h.to_bytes()
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
    let mut at_least_once = Vec::with_capacity(n);
    let mut source = Vec::with_capacity(n);
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
        at_least_once.push(m.latest.at_least_once);
        source.push(m.source);
    }
    sqlx::query(
        "INSERT INTO audit_progress AS p (tier, cluster, datacenter, topic, physical_topic, \
             partition, watermark_ms, position, high_watermark, bucket_width_ms, last_emitted_ms, \
             host, instance, closing, source, at_least_once) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int4[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], \
             $12::text[], $13::text[], $14::bool[], $15::text[], $16::bool[]) \
         ON CONFLICT (tier, cluster, datacenter, topic, physical_topic, partition, host, instance) \
         DO UPDATE SET \
             watermark_ms = GREATEST(p.watermark_ms, EXCLUDED.watermark_ms), \
             position = GREATEST(p.position, EXCLUDED.position), \
             high_watermark = GREATEST(p.high_watermark, EXCLUDED.high_watermark), \
             bucket_width_ms = CASE WHEN EXCLUDED.last_emitted_ms >= p.last_emitted_ms \
                 THEN EXCLUDED.bucket_width_ms ELSE p.bucket_width_ms END, \
             closing = CASE WHEN EXCLUDED.last_emitted_ms >= p.last_emitted_ms \
                 THEN EXCLUDED.closing ELSE p.closing END, \
             at_least_once = CASE WHEN EXCLUDED.last_emitted_ms >= p.last_emitted_ms \
                 THEN EXCLUDED.at_least_once ELSE p.at_least_once END, \
             last_emitted_ms = GREATEST(p.last_emitted_ms, EXCLUDED.last_emitted_ms), \
             last_seen_at = now(), \
             source = COALESCE(EXCLUDED.source, p.source), \
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
    .bind(&source)
    .bind(&at_least_once)
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
        let stored = hist(&[1, 2, 3]).to_bytes();
        let a = hist(&[100]);
        let b = hist(&[1_000, 2_000]);
        let merged =
            Latency::from_bytes(&merged_latency(&key, Some(stored), &[&a, &b])).expect("ok");
        assert_eq!(merged.len(), 6);
        let only = Latency::from_bytes(&merged_latency(&key, None, &[&a])).expect("ok");
        assert_eq!(only.len(), 1);
        let corrupt =
            Latency::from_bytes(&merged_latency(&key, Some(b"x".to_vec()), &[&b])).expect("ok");
        assert_eq!(corrupt.len(), 2);
        let empty = Latency::from_bytes(&merged_latency(&key, None, &[])).expect("ok");
        assert!(empty.is_empty());
    }
}
