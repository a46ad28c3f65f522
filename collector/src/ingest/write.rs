//! Writing: the single writer batches what the consume loops queue (size + linger) and makes
//! each batch durable. The rejected records go to the dead-letter topic first, then one SQL
//! transaction applies the valid records and stores the next offsets, each fenced by the
//! stored offset it continues from ([`crate::store::write_batch`]). A write PostgreSQL
//! refuses for its data is split until the records at fault are alone, and those are
//! dead-lettered; any other failure is retried.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, Counts};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::config::IngestConfig;
use super::consume::{Event, Source, Stored};
use super::dead_letter::{DeadLetter, DeadLetters};
use super::decode::{Consumed, Origin, Rejected};
use super::rate_limit::RateLimit;
use super::retry::{GaveUp, RetryPolicy};
use super::status::IngestStatus;
use crate::metrics::IngestMetrics;
use crate::store::{self, BatchOutcome, ConsumedOffset, StoreError, data_error_label};

/// Batches consumed records and makes each batch durable.
pub(super) struct Writer {
    pub(super) sources: Vec<Arc<Source>>,
    pub(super) pool: PgPool,
    pub(super) metrics: IngestMetrics,
    pub(super) status: Arc<IngestStatus>,
    pub(super) stored: Stored,
    pub(super) config: IngestConfig,
    pub(super) retry: RetryPolicy,
    pub(super) letters: DeadLetters,
    /// Limits the warnings about batches split to find records the store refuses.
    pub(super) split_log: RateLimit,
}

/// Next offsets by (source, partition).
type NextOffsets = BTreeMap<(usize, i32), i64>;

/// Raises `next` past every message of `arrivals` (source, partition, offset).
fn raise_offsets(next: &mut NextOffsets, arrivals: &[(usize, i32, i64)]) {
    for &(source, partition, offset) in arrivals {
        let n = next.entry((source, partition)).or_insert(offset + 1);
        *n = (*n).max(offset + 1);
    }
}

fn add_outcome(total: &mut BatchOutcome, o: BatchOutcome) {
    total.counts += o.counts;
    total.progress += o.progress;
    total.duplicates += o.duplicates;
    total.count_rows += o.count_rows;
}

/// The reason and message of a write PostgreSQL refused because of its data.
fn refusal(e: &StoreError) -> Option<Rejected> {
    let reason = data_error_label(e)?;
    let code = e.sqlstate();
    Some(Rejected {
        reason,
        error: format!(
            "PostgreSQL refused the record (SQLSTATE {}): {e}",
            code.as_deref().unwrap_or("?")
        ),
    })
}

/// Whether the counts records of `records` that [`store::write_batch`] adds into one row
/// sum past `i64::MAX` in some column. `write_batch` adds up a batch's records in Rust with
/// saturating additions before PostgreSQL sees them, so such a batch would store a clipped
/// total instead of failing; it is split like a batch PostgreSQL refuses. One record never
/// overflows by itself (the contract caps each total at 2^53).
fn sums_overflow(records: &[AuditRecord]) -> bool {
    const MAX: u128 = i64::MAX as u128;
    let totals = |c: &Counts| [c.count, c.bytes, c.no_timestamp, c.malformed].map(u128::from);
    // Cheap test first: when the totals over all rows fit, so does every row's.
    let mut grand = [0u128; 4];
    for r in records {
        if let AuditRecord::Counts(c) = r {
            for (g, v) in grand.iter_mut().zip(totals(c)) {
                *g += v;
            }
        }
    }
    if grand.iter().all(|&g| g <= MAX) {
        return false;
    }
    // Per row, each id once, as `write_batch` sums them.
    type Row<'a> = (&'a str, i64, i64, &'a str, &'a str, &'a str, Option<i32>);
    let mut ids: HashSet<&str> = HashSet::new();
    let mut rows: HashMap<Row<'_>, [u128; 4]> = HashMap::new();
    for r in records {
        let AuditRecord::Counts(c) = r else { continue };
        if !ids.insert(c.id.as_str()) {
            continue;
        }
        let row = rows
            .entry((
                c.topic.as_str(),
                c.bucket_start_ms,
                c.bucket_width.as_millis(),
                c.observer.tier.as_str(),
                c.observer.datacenter.as_str(),
                c.observer.cluster.as_str(),
                c.partition,
            ))
            .or_default();
        for (sum, v) in row.iter_mut().zip(totals(c)) {
            *sum += v;
            if *sum > MAX {
                return true;
            }
        }
    }
    false
}

/// The valid records of a batch, in arrival order, with where each was read.
struct Batch<'a> {
    records: &'a [AuditRecord],
    origins: &'a [Origin],
    /// Index in `arrivals` of each record.
    arrived: &'a [usize],
    /// (source, partition, offset) of every message of the batch, rejected ones included.
    arrivals: &'a [(usize, i32, i64)],
}

/// What writing one part of a batch came to.
enum Written {
    Stored(BatchOutcome),
    /// PostgreSQL refused the data; nothing was written.
    Refused(Rejected),
}

/// Retry context of one batch.
struct Attempt {
    started: Instant,
    size: usize,
    shutdown_since: Option<Instant>,
}

impl Writer {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Event>) {
        let mut batch = Vec::with_capacity(self.config.batch_size);
        while let Some(first) = rx.recv().await {
            // A change of assignment ends the batch: the records before it are written
            // under the assignment they were read in.
            let mut change = None;
            match first {
                Event::Message(c) => batch.push(c),
                other => change = Some(other),
            }
            if change.is_none() {
                let deadline = tokio::time::Instant::now() + self.config.linger;
                while batch.len() < self.config.batch_size {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(Event::Message(c))) => batch.push(c),
                        Ok(Some(other)) => {
                            change = Some(other);
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() && self.commit(std::mem::take(&mut batch)).await.is_err() {
                tracing::warn!(
                    "shutdown grace period over with a batch not stored; it will be read again at the next start"
                );
                return;
            }
            let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
            match change {
                Some(Event::Assigned {
                    source,
                    partition,
                    from,
                }) => {
                    stored.insert((source, partition), from);
                }
                Some(Event::Revoked { source, partition }) => {
                    stored.remove(&(source, partition));
                }
                Some(Event::Message(_)) | None => {}
            }
        }
    }

    async fn commit(&self, batch: Vec<Consumed>) -> Result<(), GaveUp> {
        let mut attempt = Attempt {
            started: Instant::now(),
            size: batch.len(),
            shutdown_since: None,
        };
        let size = batch.len();
        let mut records = Vec::with_capacity(size);
        let mut origins = Vec::with_capacity(size);
        let mut arrived = Vec::with_capacity(size);
        let mut arrivals = Vec::with_capacity(size);
        let mut rejected = Vec::new();
        for c in batch {
            arrivals.push((c.origin.source, c.origin.partition, c.origin.offset));
            match c.record {
                Ok(r) => {
                    records.push(r);
                    origins.push(c.origin);
                    arrived.push(arrivals.len() - 1);
                }
                Err(r) => rejected.push(DeadLetter {
                    origin: c.origin,
                    rejected: r,
                }),
            }
        }

        // 1. Dead letters first: their offsets are stored with the records after them.
        self.letters
            .send(rejected, &mut attempt.shutdown_since)
            .await?;
        // 2. Records, counts, progress and offsets: one transaction, unless PostgreSQL
        // refuses some of the records.
        let batch = Batch {
            records: &records,
            origins: &origins,
            arrived: &arrived,
            arrivals: &arrivals,
        };
        let outcome = self.store(&batch, &mut attempt).await?;
        self.status.store_ok.store(true, Ordering::Relaxed);
        let m = &self.metrics;
        m.records_ingested
            .with_label_values(&["counts"])
            .inc_by(outcome.counts as u64);
        m.records_ingested
            .with_label_values(&["progress"])
            .inc_by(outcome.progress as u64);
        m.records_duplicate.inc_by(outcome.duplicates as u64);
        m.batches.inc();
        m.batch_records.observe(size as f64);
        m.batch_seconds
            .observe(attempt.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Applies the batch's records and stores the offsets of all its messages; returns what
    /// was applied.
    ///
    /// Normally this is one transaction. When PostgreSQL refuses the data (or the batch would
    /// overflow a row by itself, see [`sums_overflow`]), the batch is split in halves, the
    /// earlier half first, until each refused record is alone: that record is dead-lettered
    /// and every other one applied, each part in one transaction together with the offsets of
    /// every message that arrived before the part's end. Applying the parts in arrival order
    /// gives the same result as applying the records one at a time; offsets only move
    /// forward, so a restart in between re-reads exactly what is not applied yet, and a
    /// refused record's offset is stored only once its dead letter is acknowledged.
    async fn store(
        &self,
        batch: &Batch<'_>,
        attempt: &mut Attempt,
    ) -> Result<BatchOutcome, GaveUp> {
        let n = batch.records.len();
        let mut total = BatchOutcome::default();
        // Offsets stored so far, and how many messages they cover.
        let mut next = NextOffsets::new();
        let mut covered = 0;
        // Parts still to write, the earliest last.
        let mut parts: Vec<Range<usize>> = Vec::new();
        parts.push(0..n);
        let mut split = false;
        while let Some(part) = parts.pop() {
            let end = batch
                .arrived
                .get(part.end)
                .copied()
                .unwrap_or(batch.arrivals.len());
            let mut part_next = next.clone();
            raise_offsets(&mut part_next, &batch.arrivals[covered..end]);
            match self
                .write(
                    &batch.records[part.clone()],
                    &batch.origins[part.clone()],
                    &part_next,
                    attempt,
                )
                .await?
            {
                Written::Stored(o) => {
                    add_outcome(&mut total, o);
                    next = part_next;
                    covered = end;
                }
                Written::Refused(why) if part.len() > 1 => {
                    if !split {
                        split = true;
                        if let Some(suppressed) = self.split_log.allow() {
                            tracing::warn!(
                                records = n,
                                reason = why.reason,
                                error = %why.error,
                                suppressed,
                                "the store refused the data of a batch; splitting it to find the records at fault"
                            );
                        }
                    }
                    let mid = part.start + part.len() / 2;
                    parts.push(mid..part.end);
                    parts.push(part.start..mid);
                }
                Written::Refused(why) => {
                    let origin = &batch.origins[part.start];
                    let source = &self.sources[origin.source];
                    if let Some(suppressed) = source.poison_log.allow() {
                        tracing::warn!(
                            cluster = %source.config.alias,
                            partition = origin.partition,
                            offset = origin.offset,
                            reason = why.reason,
                            error = %why.error,
                            suppressed,
                            "audit record refused by the store sent to the dead-letter topic"
                        );
                    }
                    let letter = DeadLetter {
                        origin: origin.clone(),
                        rejected: why,
                    };
                    self.letters
                        .send(vec![letter], &mut attempt.shutdown_since)
                        .await?;
                    if part.end == n {
                        // The last record: store the offsets past it on their own.
                        parts.push(n..n);
                    }
                }
            }
        }
        Ok(total)
    }

    /// Writes `records` (read at `origins`) with the offsets `next` in one transaction,
    /// retrying with backoff while it fails for any reason but the data. Only the records
    /// and offsets of partitions this collector still reads are written; a partition
    /// another collector fenced off is dropped from the write (and read again from its
    /// stored offset if the group still gives it to this collector).
    async fn write(
        &self,
        records: &[AuditRecord],
        origins: &[Origin],
        next: &NextOffsets,
        attempt: &mut Attempt,
    ) -> Result<Written, GaveUp> {
        if records.len() > 1 && sums_overflow(records) {
            return Ok(Written::Refused(Rejected {
                reason: "db_out_of_range",
                error: "the counts of one row add up to more than a bigint holds".to_owned(),
            }));
        }
        let mut retry = self.retry.start();
        loop {
            let (owned_records, sources, offsets) = self.owned(records, origins, next);
            let e = match store::write_batch(&self.pool, &owned_records, &sources, &offsets).await {
                Ok(o) => {
                    if retry.failures() > 0 {
                        tracing::info!(
                            attempts = retry.failures() + 1,
                            "batch stored after retries"
                        );
                    }
                    let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
                    for ((s, p), o) in next {
                        if let Some(v) = stored.get_mut(&(*s, *p)) {
                            *v = *o;
                        }
                    }
                    return Ok(Written::Stored(o));
                }
                Err(StoreError::Fenced(fenced)) => {
                    self.fenced(&fenced);
                    continue;
                }
                Err(e) => e,
            };
            // Without records only offsets are written: nothing there to dead-letter.
            if !records.is_empty()
                && let Some(why) = refusal(&e)
            {
                return Ok(Written::Refused(why));
            }
            self.status.store_ok.store(false, Ordering::Relaxed);
            self.metrics
                .write_failures
                .with_label_values(&["postgres"])
                .inc();
            if let Some(attempt_no) = retry.failed() {
                let size = attempt.size;
                if e.is_transient() && attempt.started.elapsed() < Duration::from_secs(60) {
                    tracing::warn!(error = %e, attempt = attempt_no, records = size, "cannot store the batch; retrying");
                } else {
                    tracing::error!(error = %e, attempt = attempt_no, records = size, transient = e.is_transient(), "cannot store the batch; ingestion is paused until it succeeds");
                }
            }
            retry.wait(&mut attempt.shutdown_since).await?;
        }
    }

    /// The records of `records` and the offsets of `next` that belong to partitions this
    /// collector reads, each offset with the stored offset it continues from.
    /// The records of `records` (read at `origins`) from partitions this collector still
    /// reads, the alias of the cluster each was read from, and the offsets to store.
    fn owned<'r>(
        &'r self,
        records: &'r [AuditRecord],
        origins: &[Origin],
        next: &NextOffsets,
    ) -> (
        std::borrow::Cow<'r, [AuditRecord]>,
        Vec<&'r str>,
        Vec<ConsumedOffset>,
    ) {
        let stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        let offsets = next
            .iter()
            .filter_map(|(&(s, p), &o)| {
                let from = *stored.get(&(s, p))?;
                Some(ConsumedOffset {
                    cluster: self.sources[s].config.alias.clone(),
                    topic: self.sources[s].config.audit_topic.clone(),
                    partition: p,
                    stored_offset: from,
                    next_offset: o,
                })
            })
            .collect();
        let mine = |o: &Origin| stored.contains_key(&(o.source, o.partition));
        let alias = |o: &Origin| self.sources[o.source].config.alias.as_str();
        let records = if origins.iter().all(mine) {
            std::borrow::Cow::Borrowed(records)
        } else {
            let kept: Vec<AuditRecord> = records
                .iter()
                .zip(origins)
                .filter(|(_, o)| mine(o))
                .map(|(r, _)| r.clone())
                .collect();
            self.metrics
                .records_dropped
                .inc_by((records.len() - kept.len()) as u64);
            std::borrow::Cow::Owned(kept)
        };
        let sources = origins.iter().filter(|o| mine(o)).map(alias).collect();
        (records, sources, offsets)
    }

    /// Stops writing partitions another collector has written since this one did, and asks
    /// their consume loops to read them again from the stored offset.
    fn fenced(&self, fenced: &[store::FencedPartition]) {
        let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        for f in fenced {
            let Some(source) = self
                .sources
                .iter()
                .find(|s| s.config.alias == f.cluster && s.config.audit_topic == f.topic)
            else {
                continue;
            };
            stored.remove(&(source.index, f.partition));
            tracing::warn!(
                cluster = %f.cluster,
                topic = %f.topic,
                partition = f.partition,
                stored_offset = f.stored_offset,
                "another collector has written this audit partition since; dropping what was read of it and reading it again from the stored offset"
            );
            source
                .resync
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(f.partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use chaperone_audit::record::MAX_TOTAL;
    use chaperone_audit::{BucketWidth, Latency, Observer, Tier};

    use super::*;

    fn row(id: &str, topic: &str, count: u64, bytes: u64) -> AuditRecord {
        AuditRecord::Counts(Counts {
            id: id.into(),
            topic: topic.into(),
            physical_topic: topic.into(),
            partition: Some(0),
            bucket_start_ms: 1_764_067_200_000,
            bucket_width: BucketWidth::default(),
            observer: Observer {
                tier: Tier::Producer,
                datacenter: "dc1".into(),
                cluster: "regional".into(),
                host: "h".into(),
                instance: "1".into(),
            },
            count,
            bytes,
            no_timestamp: 0,
            malformed: 0,
            min_event_ms: None,
            max_event_ms: None,
            latency: Latency::new(),
            emitted_at_ms: 1_764_067_270_000,
        })
    }

    #[test]
    fn sums_overflow_only_within_one_row() {
        let max = MAX_TOTAL as u64;
        let fill = |topic: &str, n: usize, count: u64, bytes: u64| -> Vec<AuditRecord> {
            (0..n)
                .map(|i| row(&format!("{topic}-{i}"), topic, count, bytes))
                .collect()
        };
        // 1023 x 2^53 is the most of them a bigint holds.
        assert!(!sums_overflow(&fill("a", 1023, max, 1)));
        assert!(sums_overflow(&fill("a", 1024, max, 1)));
        assert!(sums_overflow(&fill("a", 1024, 1, max)));
        // Spread over two rows: every row fits.
        let mut two = fill("a", 1000, max, 1);
        two.extend(fill("b", 1000, max, 1));
        assert!(!sums_overflow(&two));
        // A repeated id is applied once.
        let mut repeated = fill("a", 1023, max, 1);
        repeated.push(repeated[0].clone());
        assert!(!sums_overflow(&repeated));
        assert!(!sums_overflow(&[]));
    }

    #[test]
    fn offsets_move_past_every_message() {
        let mut next = NextOffsets::new();
        raise_offsets(&mut next, &[(0, 0, 5), (0, 1, 9), (0, 0, 6)]);
        raise_offsets(&mut next, &[(1, 0, 0), (0, 0, 7)]);
        let expected: NextOffsets = [((0, 0), 8), ((0, 1), 10), ((1, 0), 1)].into();
        assert_eq!(next, expected);
    }
}
