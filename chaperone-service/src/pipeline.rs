//! The consume-count-commit loop, run on a dedicated thread.
//!
//! Messages are counted into a [`Tally`] in memory. Every flush interval, or as soon as the
//! tally's estimated memory reaches `open_cells_max_bytes` (an early flush), the tally is
//! drained together with the consumer's positions into one Kafka transaction on the audited
//! cluster (see [`crate::transaction`]): a `counts` record per drained cell and a `progress`
//! record per assigned partition (its watermark decided by [`crate::watermark`]) go to the
//! audit topic, the positions are added with `send_offsets_to_transaction`, and it commits.
//! Counts and offsets therefore become visible together or not at all. The transaction runs
//! on the committer thread while this loop counts on; one is in flight at a time. An early
//! flush takes the same path as a timed one; when the tally is full while a transaction is
//! still in flight, the loop stops counting until that one has ended, so the open counts
//! outgrow their limit by one message at most. On partition revocation and on shutdown,
//! [`Core::flush`] waits for the transaction in flight and commits what is left before
//! returning.
//!
//! When a transaction fails it is aborted, its counts and everything counted since are
//! discarded and every assigned partition is rewound to its committed offset, so those
//! messages are counted again. When partitions are revoked, the open counts are flushed and
//! committed before they go; when the assignment was lost instead, the counts are discarded
//! and the new owner recounts them.
//! A fatal producer error (for example being fenced by a newer instance with the same
//! transactional id) stops the service: its restart resumes from the committed offsets.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chaperone_audit::record::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use chaperone_audit::{AuditRecord, BucketWidth, Observer, Progress, SequenceIds, Tier};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::message::{BorrowedMessage, Message as _, Timestamp};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

pub use crate::error::PipelineError;
use crate::error::fatal;
use crate::event_time::{Dater, EventTime};
use crate::http::Health;
use crate::metrics::Metrics;
use crate::subscription::Selector;
use crate::tally::Tally;
use crate::transaction::{Batch, Committer, Outcome, Totals};
use crate::watermark::{self, Committed, Ends, Key, Marks};
use chaperone_audit::mapping::{Mapped, Mapping};

/// The wall clock, read in epoch milliseconds; injected so tests can control time.
pub use chaperone_daemon_support::Clock;

/// Settings of the pipeline that do not change at run time.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tier, cluster, host and instance; the datacenter comes from the topic mapping.
    pub tier: Tier,
    /// Alias of the audited cluster.
    pub cluster: String,
    /// Host name reported.
    pub host: String,
    /// Instance name reported.
    pub instance: String,
    /// Audit topic on the audited cluster.
    pub audit_topic: String,
    /// Bucket width.
    pub width: BucketWidth,
    /// Flush interval.
    pub flush_interval: Duration,
    /// Estimated memory of the open counts at which they are committed early.
    pub open_cells_max_bytes: usize,
    /// Timeout of each transactional call.
    pub kafka_timeout: Duration,
    /// Subtracted from event-time watermarks.
    pub watermark_lateness: Duration,
    /// Metadata refresh interval.
    pub refresh_interval: Duration,
    /// Whether partitions without a committed offset start at their end.
    pub reset_to_end: bool,
}

/// Everything the consume loop and the rebalance callback share.
pub struct Core {
    settings: Settings,
    committer: Committer,
    tally: Tally,
    dater: Dater,
    mapping: Mapping,
    mapped: HashMap<String, Mapped>,
    /// Ids of counts records: numbered per logical topic ([`chaperone_audit::sequence`]).
    ids: SequenceIds,
    marks: Marks,
    ends: HashMap<Key, Ends>,
    log_append_warned: HashSet<String>,
    malformed_warned: HashMap<String, Instant>,
    metrics: Metrics,
    health: Health,
    clock: Clock,
    /// The clock as last read; see [`Core::read_clock`].
    now_ms: i64,
    assigned_once: bool,
    closing: bool,
    fatal: Option<PipelineError>,
    /// Set once a fatal error stopped the loop: nothing may be committed any more, since
    /// positions may be ahead of what was counted.
    poisoned: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("settings", &self.settings)
            .field("open_cells", &self.tally.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A core committing through `committer`.
    pub fn new(
        settings: Settings,
        committer: Committer,
        dater: Dater,
        mapping: Mapping,
        metrics: Metrics,
        health: Health,
        clock: Clock,
    ) -> Self {
        Self {
            tally: Tally::new(settings.width),
            settings,
            committer,
            dater,
            mapping,
            mapped: HashMap::new(),
            marks: Marks::default(),
            ends: HashMap::new(),
            log_append_warned: HashSet::new(),
            malformed_warned: HashMap::new(),
            metrics,
            health,
            now_ms: clock.now_ms(),
            clock,
            assigned_once: false,
            ids: SequenceIds::new(),
            closing: false,
            fatal: None,
            poisoned: false,
        }
    }

    /// Reads the clock that [`Core::count`] uses as the arrival time. Reading it for every
    /// message costs more than the rest of the counting, so the consume loop reads it after
    /// any wait and every few dozen messages: arrival times are then off by microseconds.
    pub fn read_clock(&mut self) {
        self.now_ms = self.clock.now_ms();
    }

    /// Counts one consumed message, arrived at the time of the last [`Core::read_clock`].
    #[inline]
    pub fn count(&mut self, m: &BorrowedMessage<'_>) {
        let topic = m.topic();
        let partition = m.partition();
        let timestamp = m.timestamp();
        if let Timestamp::LogAppendTime(_) = timestamp {
            self.warn_log_append_time(topic);
        }
        let payload = m.payload();
        let bytes = payload.map_or(0, <[u8]>::len) as u64;
        let now = self.now_ms;
        match self.dater.date(timestamp, payload) {
            EventTime::Timed(ms) => self.tally.record(topic, Some(partition), ms, bytes, now),
            EventTime::Untimed => {
                self.tally
                    .record_untimed(topic, Some(partition), bytes, now, false)
            }
            EventTime::Malformed => {
                self.tally
                    .record_untimed(topic, Some(partition), bytes, now, true);
                self.warn_malformed(topic, partition, m.offset());
            }
        }
    }

    fn warn_log_append_time(&mut self, topic: &str) {
        if !self.log_append_warned.contains(topic) {
            self.log_append_warned.insert(topic.to_owned());
            self.metrics.log_append_time_topics.inc();
            tracing::warn!(
                topic,
                "topic uses LogAppendTime: record timestamps are broker times, not event times"
            );
        }
    }

    fn warn_malformed(&mut self, topic: &str, partition: i32, offset: i64) {
        let now = Instant::now();
        let due = self
            .malformed_warned
            .get(topic)
            .is_none_or(|last| now.duration_since(*last) >= Duration::from_secs(60));
        if due {
            self.malformed_warned.insert(topic.to_owned(), now);
            tracing::warn!(
                topic,
                partition,
                offset,
                "payload has no parsable event time: counted as malformed (logged once a minute per topic)"
            );
        }
    }

    /// Updates cached end offsets from client statistics (those that are fresh).
    fn update_ends(&mut self, stats: &Statistics) {
        let now = self.clock.now_ms();
        for (key, ends) in watermark::ends_from_stats(stats, now) {
            self.ends.insert(key, ends);
        }
    }

    /// Looks up the committed offsets of assigned partitions that have read nothing since
    /// assignment (or the last rewind) and whose committed offset is not known yet. Only
    /// partitions the consumer has started fetching since assignment (end offsets arrived):
    /// their committed offsets are stable by then (librdkafka waits for that with
    /// `read_committed`), so the lookup does not wait on another instance's transaction.
    fn look_up_committed<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        positions: &TopicPartitionList,
    ) {
        let mut wanted = TopicPartitionList::new();
        for el in positions.elements() {
            let key: Key = (el.topic().to_owned(), el.partition());
            if !matches!(el.offset(), Offset::Offset(n) if n >= 0)
                && self.ends.contains_key(&key)
                && self.marks.committed(&key) == Committed::Unknown
            {
                wanted.add_partition(el.topic(), el.partition());
            }
        }
        if wanted.count() == 0 {
            return;
        }
        let timeout = self.settings.kafka_timeout.min(COMMITTED_LOOKUP_TIMEOUT);
        match consumer.committed_offsets(wanted, timeout) {
            Ok(found) => {
                for el in found.elements() {
                    let committed = match el.offset() {
                        Offset::Offset(n) if n >= 0 => Committed::At(n),
                        Offset::Invalid => Committed::None,
                        _ => continue,
                    };
                    self.marks
                        .set_committed(&(el.topic().to_owned(), el.partition()), committed);
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read committed offsets: partitions that read nothing yet report no position"
            ),
        }
    }

    fn mapped(&mut self, physical: &str) -> Mapped {
        if let Some(m) = self.mapped.get(physical) {
            return m.clone();
        }
        let m = self.mapping.map(physical);
        self.mapped.insert(physical.to_owned(), m.clone());
        m
    }

    fn observer(&self, datacenter: String) -> Observer {
        Observer {
            tier: self.settings.tier.clone(),
            datacenter,
            cluster: self.settings.cluster.clone(),
            host: self.settings.host.clone(),
            instance: self.settings.instance.clone(),
        }
    }

    /// Commits everything counted so far together with the consumer positions, in one
    /// transaction, and waits for it (after waiting for the batch already in flight). On
    /// failure the transaction is aborted, the counts are discarded and the partitions are
    /// rewound (unless `rewind` is false because they are being revoked). Returns `Err` only
    /// for fatal errors.
    pub fn flush<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        rewind: bool,
    ) -> Result<(), PipelineError> {
        if let Some(outcome) = self.committer.wait()
            && !self.settle(outcome, consumer, rewind)?
        {
            // Nothing counted since the aborted batch is left, and the positions are
            // (or, when revoked, no longer matter) back at the committed offsets.
            return Ok(());
        }
        if let Some(batch) = self.prepare(consumer)? {
            self.committer.submit(batch);
            if let Some(outcome) = self.committer.wait() {
                self.settle(outcome, consumer, rewind)?;
            }
        }
        Ok(())
    }

    /// Whether the open counts have reached their memory limit (`open_cells_max_bytes`).
    #[inline]
    fn tally_full(&self) -> bool {
        self.tally.estimated_bytes() >= self.settings.open_cells_max_bytes
    }

    /// Collects the outcome of the batch in flight, if it has ended, and, when `due` and no
    /// batch is in flight, hands the counts so far to the committer without waiting.
    /// When the tally is full, the flush is due whatever `due` says, and a batch in flight
    /// is waited for first (counting stops meanwhile). Returns whether the flush was started
    /// (or had nothing to do).
    fn tick<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        due: bool,
    ) -> Result<bool, PipelineError> {
        if let Some(outcome) = self.committer.try_outcome() {
            self.settle(outcome, consumer, true)?;
        }
        if self.tally_full()
            && let Some(outcome) = self.committer.wait()
        {
            // After an abort the tally is empty again and the partitions are rewound.
            self.settle(outcome, consumer, true)?;
        }
        let early = !due && self.tally_full();
        if !(due || early) || self.committer.in_flight() {
            return Ok(false);
        }
        if early {
            self.metrics.early_flushes.inc();
        }
        if let Some(batch) = self.prepare(consumer)? {
            self.committer.submit(batch);
        }
        Ok(true)
    }

    /// Acts on how a batch ended. Returns whether it was committed. After an abort, the
    /// counts made since that batch are discarded too, and the partitions are rewound to
    /// their committed offsets when `rewind`.
    fn settle<C: ConsumerContext>(
        &mut self,
        outcome: Outcome,
        consumer: &BaseConsumer<C>,
        rewind: bool,
    ) -> Result<bool, PipelineError> {
        match outcome {
            Outcome::Committed => {
                self.marks.commit();
                Ok(true)
            }
            Outcome::Fatal(e) => Err(e),
            Outcome::Aborted { discarded } => {
                // Back to the watermarks of the last committed batch: the counts are made
                // again after the rewind.
                self.marks.abort();
                let since: u64 = self.tally.drain().iter().map(|e| e.cell.count).sum();
                tracing::warn!(
                    discarded = discarded + since,
                    "transaction aborted: its counts and those made since are discarded and will be recounted"
                );
                if rewind {
                    self.rewind(consumer)?;
                }
                Ok(false)
            }
        }
    }

    /// Drains the tally into a batch together with the consumer positions (which are
    /// exactly past the messages counted in it). `None` when there is nothing to commit.
    fn prepare<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<Option<Batch>, PipelineError> {
        let started = Instant::now();
        let assignment = consumer
            .assignment()
            .map_err(|e| fatal("reading the assignment", e))?;
        let positions = if assignment.count() == 0 {
            TopicPartitionList::new()
        } else {
            consumer
                .position()
                .map_err(|e| fatal("reading consumer positions", e))?
        };
        if self.tally.is_empty() && positions.count() == 0 {
            return Ok(None);
        }
        self.look_up_committed(consumer, &positions);
        self.metrics
            .open_cells_bytes
            .set(i64::try_from(self.tally.estimated_bytes()).unwrap_or(i64::MAX));
        let entries = self.tally.drain();
        let now = self.clock.now_ms();
        let width = self.settings.width;
        let mut totals = Totals::default();
        let mut records: Vec<(String, Vec<u8>)> =
            Vec::with_capacity(entries.len() + positions.count());
        for e in entries {
            // One cell at a time becomes a full histogram and is encoded at once.
            let e = e.into_audit();
            totals.messages += e.cell.count;
            totals.bytes += e.cell.bytes;
            totals.no_timestamp += e.cell.no_timestamp;
            totals.malformed += e.cell.malformed;
            let partition = e.partition.unwrap_or(-1);
            if let Some(max) = e.cell.max_event_ms {
                self.marks.see(&(e.topic.clone(), partition), max);
            }
            let mapped = self.mapped(&e.topic);
            let key = record_key(&mapped);
            let observer = self.observer(mapped.datacenter);
            let counts = e.into_counts(
                self.ids.next(&mapped.topic),
                mapped.topic,
                width,
                observer,
                now,
            );
            records.push((key, AuditRecord::Counts(counts).encode()));
        }
        let mut lags = Vec::with_capacity(positions.count());
        let lateness = i64::try_from(self.settings.watermark_lateness.as_millis()).unwrap_or(0);
        let mut offsets = TopicPartitionList::with_capacity(positions.count());
        for el in positions.elements() {
            let topic = el.topic();
            let partition = el.partition();
            let consumed = match el.offset() {
                Offset::Offset(n) if n >= 0 => Some(n),
                _ => None,
            };
            let key: Key = (topic.to_owned(), partition);
            if let Some(p) = consumed {
                offsets
                    .add_partition_offset(topic, partition, Offset::Offset(p))
                    .map_err(|e| fatal("building the offsets to commit", e))?;
                self.marks.stage_offset(&key, p);
            }
            let mapped = self.mapped(topic);
            let decision = watermark::decide(
                &watermark::Input {
                    consumed,
                    committed: self.marks.committed(&key),
                    reset_to_end: self.settings.reset_to_end,
                    ends: self.ends.get(&key).copied(),
                    seen_ms: self.marks.seen(&key),
                    mirrored: mapped.mirrored,
                    claimed_ms: self.marks.claimed(&key),
                },
                now,
                lateness,
            );
            if let Some(l) = decision.lag {
                lags.push((topic.to_owned(), partition, l));
            }
            self.marks.claim(&key, decision.watermark_ms);
            let record_key = record_key(&mapped);
            let progress = Progress {
                id: uuid::Uuid::now_v7().to_string(),
                topic: mapped.topic,
                physical_topic: topic.to_owned(),
                partition: Some(partition),
                observer: self.observer(mapped.datacenter),
                position: decision.position,
                high_watermark: decision.high_watermark,
                watermark_ms: decision.watermark_ms,
                bucket_width: width,
                emitted_at_ms: now.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
                closing: false,
                at_least_once: false,
            };
            records.push((record_key, AuditRecord::Progress(progress).encode()));
        }
        let n_counts = records.len() - positions.count();
        let group = if offsets.count() > 0 {
            consumer.group_metadata()
        } else {
            None
        };
        Ok(Some(Batch {
            records,
            n_counts,
            offsets,
            group,
            totals,
            lags,
            started,
        }))
    }

    /// Seeks every assigned partition back to its committed offset.
    fn rewind<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), PipelineError> {
        let timeout = self.settings.kafka_timeout;
        let committed = consumer
            .committed(timeout)
            .map_err(|e| fatal("reading committed offsets to rewind", e))?;
        for el in committed.elements() {
            let target = match el.offset() {
                Offset::Offset(n) => Offset::Offset(n),
                _ if self.settings.reset_to_end => Offset::End,
                _ => Offset::Beginning,
            };
            let known = match el.offset() {
                Offset::Offset(n) if n >= 0 => Committed::At(n),
                Offset::Invalid => Committed::None,
                _ => Committed::Unknown,
            };
            self.marks
                .set_committed(&(el.topic().to_owned(), el.partition()), known);
            consumer
                .seek(el.topic(), el.partition(), target, timeout)
                .map_err(|e| fatal("rewinding a partition to its committed offset", e))?;
            tracing::info!(
                topic = el.topic(),
                partition = el.partition(),
                offset = ?target,
                "rewound partition to its committed offset"
            );
        }
        Ok(())
    }

    /// Drops uncommitted counts (their partitions were lost to another instance).
    /// Waits for the batch in flight first: whether it commits or aborts, its partitions
    /// resume from what the broker has committed.
    fn discard(&mut self) -> Result<(), PipelineError> {
        match self.committer.wait() {
            Some(Outcome::Fatal(e)) => return Err(e),
            Some(Outcome::Committed) => self.marks.commit(),
            Some(Outcome::Aborted { .. }) => self.marks.abort(),
            None => {}
        }
        let dropped: u64 = self.tally.drain().iter().map(|e| e.cell.count).sum();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "assignment lost: uncommitted counts discarded, the new owner recounts them"
            );
        }
        Ok(())
    }
}

/// The consumer context: rebalance handling and statistics, sharing the [`Core`].
pub struct PipelineContext {
    core: Arc<Mutex<Core>>,
    metrics: Metrics,
}

impl std::fmt::Debug for PipelineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineContext").finish_non_exhaustive()
    }
}

impl PipelineContext {
    /// A context sharing `core`.
    pub fn new(core: Arc<Mutex<Core>>, metrics: Metrics) -> Self {
        Self { core, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    match core.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ClientContext for PipelineContext {
    fn stats(&self, statistics: Statistics) {
        self.lock().update_ends(&statistics);
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut core = self.lock();
                if core.fatal.is_some() || core.poisoned {
                    return;
                }
                if consumer.assignment_lost() {
                    self.metrics.rebalances.with_label_values(&["lost"]).inc();
                    tracing::warn!(partitions = tpl.count(), "assignment lost");
                    if let Err(e) = core.discard() {
                        core.fatal = Some(e);
                    } else if matches!(
                        consumer.rebalance_protocol(),
                        RebalanceProtocol::Cooperative
                    ) && let Err(e) = core.rewind(consumer)
                    {
                        core.fatal = Some(e);
                    }
                } else {
                    self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                    tracing::info!(
                        partitions = tpl.count(),
                        "partitions revoked: committing their counts"
                    );
                    if core.closing && core.tally.is_empty() {
                        return;
                    }
                    let cooperative = matches!(
                        consumer.rebalance_protocol(),
                        RebalanceProtocol::Cooperative
                    );
                    if let Err(e) = core.flush(consumer, cooperative) {
                        core.fatal = Some(e);
                    }
                }
                for el in tpl.elements() {
                    core.marks.revoke(&(el.topic().to_owned(), el.partition()));
                }
                core.health.set_ready(false);
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                let mut core = self.lock();
                for el in tpl.elements() {
                    let key: Key = (el.topic().to_owned(), el.partition());
                    // End offsets from before are stale; fresh ones also tell that the
                    // consumer started fetching the partition.
                    core.ends.remove(&key);
                    core.marks.assign(&key);
                }
            }
            Rebalance::Error(e) => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let count = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(count as i64);
        if let Rebalance::Assign(_) = rebalance {
            let mut core = self.lock();
            core.assigned_once = true;
            core.health.set_ready(true);
        }
    }
}

/// Messages between two checks of the shutdown token, the flush and refresh deadlines and
/// the transaction in flight (also checked whenever the consumer is idle).
const CHECK_EVERY: u32 = 256;

/// Longest wait for the committed offsets of partitions that read nothing yet (they only
/// give such partitions a position and a watermark; the next flush tries again).
const COMMITTED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages between two reads of the clock while messages arrive without waiting.
const READ_CLOCK_EVERY: u32 = 64;

/// The consume loop. Returns when `shutdown` is cancelled (after a final flush) or on a
/// fatal error.
pub fn consume(
    consumer: &BaseConsumer<PipelineContext>,
    selector: &Selector,
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    let core = consumer.context().core.clone();
    let mut subscribed: BTreeSet<String> = BTreeSet::new();
    let mut next_refresh = Instant::now();
    let mut next_flush = Instant::now() + settings.flush_interval;
    let mut since_check = CHECK_EVERY;
    let mut clock_stale = true;
    let mut last_poll_error: Option<Instant> = None;
    health.set_alive(true);
    loop {
        since_check += 1;
        if since_check >= CHECK_EVERY {
            since_check = 0;
            if shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if now >= next_refresh {
                refresh(
                    consumer,
                    selector,
                    settings,
                    metrics,
                    health,
                    &mut subscribed,
                );
                next_refresh = now + settings.refresh_interval;
            }
            let due = now >= next_flush;
            let mut guard = lock(&core);
            match guard.tick(consumer, due) {
                // A due flush waits while the previous one is still committing.
                Ok(true) => next_flush = now + settings.flush_interval,
                Ok(false) => {}
                Err(e) => {
                    guard.poisoned = true;
                    health.set_alive(false);
                    return Err(e);
                }
            }
            drop(guard);
            clock_stale = true;
        }
        // Take what is queued without waiting; wait only when nothing is.
        let polled = match consumer.poll(Duration::ZERO) {
            Some(polled) => Some(polled),
            None => {
                clock_stale = true;
                consumer.poll(Duration::from_millis(100))
            }
        };
        let mut guard = lock(&core);
        match polled {
            Some(Ok(m)) => {
                if clock_stale || since_check.is_multiple_of(READ_CLOCK_EVERY) {
                    guard.read_clock();
                    clock_stale = false;
                }
                guard.count(&m);
                if guard.tally_full() {
                    // Flush now rather than after the next few hundred messages.
                    since_check = CHECK_EVERY;
                }
            }
            Some(Err(e)) => {
                since_check = CHECK_EVERY;
                if last_poll_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_poll_error = Some(Instant::now());
                    tracing::warn!(error = %e, "consumer error");
                }
            }
            None => since_check = CHECK_EVERY,
        }
        if let Some(e) = guard.fatal.take() {
            guard.poisoned = true;
            health.set_alive(false);
            return Err(e);
        }
        drop(guard);
    }
    tracing::info!("stopping: flushing and committing open counts");
    let result = {
        let mut core = lock(&core);
        core.closing = true;
        let result = core.flush(consumer, false);
        if result.is_err() {
            core.poisoned = true;
        }
        result
    };
    health.set_ready(false);
    result
}

/// Re-reads cluster metadata and re-subscribes when the audited topic set changed.
fn refresh(
    consumer: &BaseConsumer<PipelineContext>,
    selector: &Selector,
    settings: &Settings,
    metrics: &Metrics,
    health: &Health,
    subscribed: &mut BTreeSet<String>,
) {
    let metadata = match consumer.fetch_metadata(None, settings.kafka_timeout) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read cluster metadata; keeping the current subscription");
            return;
        }
    };
    let selected = selector.select(metadata.topics().iter().map(|t| t.name()));
    if &selected == subscribed {
        return;
    }
    let added: Vec<&String> = selected.difference(subscribed).collect();
    let removed: Vec<&String> = subscribed.difference(&selected).collect();
    tracing::info!(
        ?added,
        ?removed,
        topics = selected.len(),
        "audited topics changed"
    );
    if selected.is_empty() {
        consumer.unsubscribe();
        health.set_ready(true);
    } else {
        let names: Vec<&str> = selected.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&names) {
            tracing::warn!(error = %e, "cannot subscribe");
            return;
        }
    }
    metrics.subscribed_topics.set(selected.len() as i64);
    *subscribed = selected;
}

/// The key of an audit record about a partition of a topic mapped to `mapped`: its logical
/// topic, so that every record of one topic (all its partitions, its mirrors from every
/// source) is on one audit-topic partition, in the order written.
fn record_key(mapped: &Mapped) -> String {
    mapped.topic.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug 6: records were keyed by physical topic and partition, so one logical topic's
    /// records (its partitions, its mirrors from several sources) spread over the audit
    /// topic's partitions and lost their order.
    #[test]
    fn records_are_keyed_by_logical_topic() {
        let mapping = chaperone_audit::mapping::MappingConfig::default()
            .rule(chaperone_audit::mapping::MappingKind::Mirror, "dc1")
            .expect("valid mapping");
        for physical in ["regional.orders", "eu.orders", "orders"] {
            assert_eq!(record_key(&mapping.map(physical)), "orders", "{physical}");
        }
    }
}
