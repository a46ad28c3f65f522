//! Publishes what a [`Tracker`] counted to the audit topic, without losing it on the way.
//!
//! Every flush interval (and twice on shutdown) the reporter:
//! 1. asks the [`Watermarks`] source for the event-time watermark of each topic with a known
//!    topic-partition (before draining, so every message below it is in the drained counts),
//! 2. drains the tracker into [`Counts`] records with fresh uuid v7 ids,
//! 3. writes them to the local [`Spool`] and fsyncs (write-ahead: from here on a crash
//!    cannot lose them; a restarted process re-sends them with the same ids),
//! 4. sends every counts record the spool holds to the audit topic with `acks=all` and
//!    idempotence, waits for the acknowledgements and removes what Kafka acknowledged from
//!    the spool. What failed stays there and is sent again on the next flush, by this process
//!    or, after a restart, by the next one,
//! 5. then sends one [`Progress`] heartbeat per topic-partition counted since start, its
//!    watermark held back to the oldest bucket of the topic's counts still in the spool (a
//!    reader must not judge a bucket whose counts have not arrived).
//!
//! Every record is keyed by its logical topic, so all the records of a topic are on one
//! partition of the audit topic, in the order they were sent: the counts of a flush before
//! its progress.
//!
//! On shutdown a last flush is followed by a closing one: it re-sends what the spool still
//! holds, drains what arrived meanwhile and reports progress for every topic-partition known;
//! when every count has been delivered (the spool holds none) and nothing was counted since
//! the last flush, those progress records are final ([`Progress::closing`]): this instance
//! will send nothing more. Otherwise they are ordinary heartbeats and the reason is logged.
//!
//! A record re-sent after a crash or a timed-out delivery may reach the topic twice with the
//! same id; readers keep each id once. Progress heartbeats are not spooled: the next flush
//! sends fresher ones.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bucket::BucketWidth;
use crate::config::{AuditConfig, ConfigError, FORCED_AUDIT_PROPERTIES, redacted_properties};
use crate::metrics::AuditMetrics;
use crate::record::{AuditRecord, Counts, MIN_TIMESTAMP_MS, Observer, Progress};
use crate::sequence::SequenceIds;
use crate::spool::{EncodedRecord, Spool, SpoolError};
use crate::tracker::Tracker;

/// Source of the current time in epoch milliseconds; injected so tests control time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in epoch milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// Tells the reporter how far counting has got for a topic: every message with an earlier
/// event time that will ever be counted has been counted.
pub trait Watermarks: Send + Sync + std::fmt::Debug {
    /// The event-time watermark of each of `topics` at `now_ms`, in the same order. The
    /// reporter calls it exactly once per flush, before draining the tracker (even with no
    /// topics), so a source may treat the calls as the boundaries of flush intervals.
    fn watermarks_ms(&self, topics: &[&str], now_ms: i64) -> Vec<i64>;

    /// Topics first sent to since the last call. The reporter flushes as soon as
    /// [`Watermarks::new_topic_signal`] fires and from then on reports progress for each such
    /// topic as a whole (without a partition), so the collector knows this observer before
    /// any of its messages can be counted downstream, not only after its first counts.
    fn new_topics(&self) -> Vec<String> {
        Vec::new()
    }

    /// Fires when [`Watermarks::new_topics`] has something; `None` when it never will.
    fn new_topic_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

/// Watermark of a hop that counts synchronously: everything up to now has been counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct NowWatermarks;

impl Watermarks for NowWatermarks {
    fn watermarks_ms(&self, topics: &[&str], now_ms: i64) -> Vec<i64> {
        vec![now_ms; topics.len()]
    }
}

/// Why auditing could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A Kafka client could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The spool could not be opened or written.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What one flush did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Messages drained from the tracker.
    pub messages: u64,
    /// Counts records made from them.
    pub counts_records: usize,
    /// Progress records made.
    pub progress_records: usize,
    /// Records (counts and progress) acknowledged by Kafka.
    pub sent: usize,
    /// Records whose delivery failed.
    pub failed: usize,
    /// Records left in the spool afterwards.
    pub spooled: usize,
    /// Records dropped because the spool was full.
    pub dropped: usize,
    /// Whether its progress records were final ([`Progress::closing`]) and all delivered.
    pub closed: bool,
}

/// Builds the librdkafka configuration of the audit producer: `base` (or the config's
/// `kafka` map when it is not empty), then the delivery timeout, then the forced
/// safety settings, which win over anything the user set. The result is logged at DEBUG,
/// secrets redacted ([`redacted_properties`]).
pub fn audit_client_config(base: &ClientConfig, config: &AuditConfig) -> ClientConfig {
    let mut cc = if config.kafka.is_empty() {
        let mut cc = base.clone();
        // The audit producer is never part of the application's transactions.
        cc.remove("transactional.id");
        cc
    } else {
        let mut cc = ClientConfig::new();
        for (k, v) in &config.kafka {
            cc.set(k, v);
        }
        cc
    };
    cc.set(
        "message.timeout.ms",
        config.delivery_timeout.as_millis().to_string(),
    );
    for (k, v) in FORCED_AUDIT_PROPERTIES {
        if let Some(old) = cc.get(k)
            && old != v
        {
            tracing::warn!(
                property = k,
                from = old,
                to = v,
                "forcing audit producer property"
            );
        }
        cc.set(k, v);
    }
    let effective = cc.config_map();
    tracing::debug!(
        properties = ?redacted_properties(&effective),
        "audit producer kafka properties"
    );
    cc
}

/// Everything a flush needs, shared between the reporter task and synchronous paths
/// (such as `Drop`) that spool the last counts.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) spool: Arc<Mutex<Spool>>,
    pub(crate) metrics: AuditMetrics,
    pub(crate) clock: Arc<dyn Clock>,
    watermarks: Arc<dyn Watermarks>,
    observer: Observer,
    width: BucketWidth,
    max_known: usize,
    known: Mutex<BTreeSet<(String, Option<i32>)>>,
    /// Ids of counts records: numbered per topic ([`crate::sequence`]).
    ids: Mutex<SequenceIds>,
    /// Set once counts records were lost (spool full or unwritable): this instance can no
    /// longer say that every count it made was delivered.
    lost_counts: AtomicBool,
}

/// The watermark of one topic-partition.
type Watermark = (String, Option<i32>, i64);

/// Caps each watermark at the oldest bucket of its topic's counts still in the spool (a
/// reader must not judge a bucket before its counts arrive) and at `now_ms`, and keeps it
/// within the timestamps a record may carry: no counted message has an earlier bucket.
fn held_back(
    watermarks: Vec<Watermark>,
    spooled: &BTreeMap<String, i64>,
    now_ms: i64,
) -> Vec<Watermark> {
    watermarks
        .into_iter()
        .map(|(topic, partition, w)| {
            let cap = spooled.get(&topic).copied().unwrap_or(i64::MAX);
            let w = w.min(now_ms).min(cap).max(MIN_TIMESTAMP_MS);
            (topic, partition, w)
        })
        .collect()
}

/// Why the progress of a closing flush cannot be final, if it cannot: counts of the instance
/// wait in the spool (`spooled`, per topic) or were lost, or `drained` messages were counted
/// since the last flush (the instance is still counting, more may come).
fn not_final_because(
    spooled: &BTreeMap<String, i64>,
    lost: bool,
    drained: u64,
) -> Option<&'static str> {
    if !spooled.is_empty() {
        Some("audit counts wait in the spool")
    } else if lost {
        Some("audit counts were lost")
    } else if drained > 0 {
        Some("messages were counted during shutdown")
    } else {
        None
    }
}

impl Core {
    fn lock_spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_spool_size(&self, spool: &Spool) {
        self.metrics.spool_bytes.set(spool.bytes() as i64);
        self.metrics.spool_records.set(spool.len() as i64);
    }

    /// Drains the tracker into counts records (and remembers their topic-partitions).
    fn drain_counts(&self, now_ms: i64) -> (u64, Vec<EncodedRecord>) {
        let drained = self.tracker.drain();
        let messages = drained.messages();
        self.metrics.messages_tracked.inc_by(messages);
        if drained.overflowed > 0 {
            self.metrics.cell_overflow.inc_by(drained.overflowed);
            tracing::error!(
                messages = drained.overflowed,
                "messages not counted: the open-cell cap (max_open_cells) was reached"
            );
        }
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let records = drained
            .entries
            .into_iter()
            .map(|e| {
                if known.len() < self.max_known {
                    known.insert((e.topic.clone(), e.partition));
                }
                let id = ids.next(&e.topic);
                let logical = e.topic.clone();
                let counts: Counts =
                    e.into_counts(id, logical, self.width, self.observer.clone(), now_ms);
                EncodedRecord::new(&AuditRecord::Counts(counts))
            })
            .collect();
        (messages, records)
    }

    fn progress(
        &self,
        watermarks: Vec<Watermark>,
        now_ms: i64,
        closing: bool,
    ) -> Vec<EncodedRecord> {
        watermarks
            .into_iter()
            .map(|(topic, partition, watermark_ms)| {
                let p = Progress {
                    id: uuid::Uuid::now_v7().to_string(),
                    topic: topic.clone(),
                    physical_topic: topic,
                    partition,
                    observer: self.observer.clone(),
                    position: None,
                    high_watermark: None,
                    watermark_ms,
                    bucket_width: self.width,
                    emitted_at_ms: now_ms,
                    closing,
                    at_least_once: false,
                };
                EncodedRecord::new(&AuditRecord::Progress(p))
            })
            .collect()
    }

    /// The watermark of every known topic-partition, from the watermark source (asked once,
    /// per topic).
    fn watermarks(&self, now_ms: i64) -> Vec<Watermark> {
        let known: Vec<(String, Option<i32>)> = {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            for topic in self.watermarks.new_topics() {
                if known.len() < self.max_known {
                    known.insert((topic, None));
                }
            }
            known.iter().cloned().collect()
        };
        let mut topics: Vec<&str> = known.iter().map(|(t, _)| t.as_str()).collect();
        topics.dedup(); // `known` is sorted by topic
        let marks = self.watermarks.watermarks_ms(&topics, now_ms);
        let by_topic: HashMap<&str, i64> = topics.iter().copied().zip(marks).collect();
        known
            .iter()
            .map(|(t, p)| {
                // A source that answers for fewer topics than asked promises nothing.
                let w = by_topic
                    .get(t.as_str())
                    .copied()
                    .unwrap_or(MIN_TIMESTAMP_MS);
                (t.clone(), *p, w.min(now_ms))
            })
            .collect()
    }

    /// Drains the tracker straight into the spool, without the network: used when the
    /// producer is dropped without `shutdown()`. The next start re-sends the records.
    pub(crate) fn spool_now(&self) -> Result<usize, SpoolError> {
        let now = self.clock.now_ms();
        let (_, records) = self.drain_counts(now);
        let n = records.len();
        let mut spool = self.lock_spool();
        let rejected = spool.append(records)?;
        self.publish_spool_size(&spool);
        if !rejected.is_empty() {
            self.lost_counts.store(true, Ordering::Relaxed);
            self.metrics.spool_overflow.inc_by(rejected.len() as u64);
            tracing::error!(
                records = rejected.len(),
                "audit records lost: the spool is full"
            );
        }
        Ok(n - rejected.len())
    }
}

/// Publishes a tracker's counts to the audit topic every flush interval. See the module
/// documentation.
#[derive(Debug)]
pub struct Reporter {
    core: Arc<Core>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Reporter {
    /// Starts a reporter for `tracker` on the current tokio runtime. It publishes with a
    /// producer built from `kafka` (or the config's `kafka` map, see
    /// [`audit_client_config`]), registers its metrics in `registry`, and stops (after a
    /// final flush) when `shutdown` is cancelled or [`Reporter::shutdown`] is called.
    pub fn start(
        config: &AuditConfig,
        tracker: Arc<Tracker>,
        kafka: &ClientConfig,
        registry: &prometheus::Registry,
        shutdown: &CancellationToken,
    ) -> Result<Self, AuditError> {
        let metrics = AuditMetrics::new(registry)?;
        Self::start_with(
            config,
            tracker,
            kafka,
            metrics,
            Arc::new(SystemClock),
            Arc::new(NowWatermarks),
            shutdown,
        )
    }

    /// Like [`Reporter::start`] with injected metrics, clock and watermark source.
    pub fn start_with(
        config: &AuditConfig,
        tracker: Arc<Tracker>,
        kafka: &ClientConfig,
        metrics: AuditMetrics,
        clock: Arc<dyn Clock>,
        watermarks: Arc<dyn Watermarks>,
        shutdown: &CancellationToken,
    ) -> Result<Self, AuditError> {
        config.validate()?;
        let width = config.width()?;
        let producer: FutureProducer = audit_client_config(kafka, config).create()?;
        let (spool, report) = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
        if report.adopted_records > 0 || !report.quarantined.is_empty() {
            tracing::info!(
                records = report.adopted_records,
                files = report.adopted_files,
                quarantined = report.quarantined.len(),
                "adopted audit records left in the spool by an earlier process"
            );
        }
        metrics
            .spool_corrupt_files
            .inc_by(report.quarantined.len() as u64);
        let core = Arc::new(Core {
            tracker,
            spool: Arc::new(Mutex::new(spool)),
            metrics,
            clock,
            watermarks,
            observer: config.observer(),
            width,
            max_known: config.max_open_cells,
            known: Mutex::new(BTreeSet::new()),
            ids: Mutex::new(SequenceIds::new()),
            lost_counts: AtomicBool::new(false),
        });
        core.publish_spool_size(&core.lock_spool());
        let stop = shutdown.child_token();
        let tasks = TaskTracker::new();
        let task = Task {
            core: Arc::clone(&core),
            producer,
            topic: config.topic.clone(),
            interval: config.flush_interval,
            shutdown_timeout: config.shutdown_timeout,
            stop: stop.clone(),
        };
        tasks.spawn(task.run());
        tasks.close();
        Ok(Self { core, stop, tasks })
    }

    /// The tracker this reporter drains.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.core.tracker
    }

    /// Records currently held in the spool.
    pub fn spooled(&self) -> usize {
        self.core.lock_spool().len()
    }

    /// Stops the reporter after a last flush and a closing one (together bounded by
    /// `shutdown_timeout`; whatever is not acknowledged by then stays in the spool for the
    /// next start). When the spool holds no counts after the closing flush, and nothing was
    /// counted since the last one, the closing flush's progress records are final: one per
    /// topic-partition known, with `closing` set.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    pub(crate) fn cancel(&self) {
        self.stop.cancel();
    }
}

struct Task {
    core: Arc<Core>,
    producer: FutureProducer,
    topic: String,
    interval: Duration,
    shutdown_timeout: Duration,
    stop: CancellationToken,
}

/// Whether a flush is the closing one of a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    No,
    Yes,
}

impl Task {
    async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let new_topic = self.core.watermarks.new_topic_signal();
        // The first tick completes at once: it re-sends what an earlier process spooled.
        loop {
            // A permit stored by `notify_one` while no one waits is not lost.
            let announced = async {
                match &new_topic {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ticker.tick() => {}
                () = announced => {}
                () = self.stop.cancelled() => break,
            }
            // A flush in progress runs to its end (bounded by twice the delivery timeout: the
            // counts, then the progress), so that records it sent are not re-sent by the
            // final flush.
            log_outcome(&self.flush(Closing::No).await);
        }
        // A last flush, then the closing one: it re-sends what the last left in the spool,
        // drains what arrived meanwhile and reports progress for every partition known,
        // including those the last flush learned (a producer that only ever flushed at
        // shutdown would report none otherwise); that progress is final when every count has
        // been delivered. What is not acknowledged in time stays in the spool.
        let last_two = async {
            log_outcome(&self.flush(Closing::No).await);
            self.flush(Closing::Yes).await
        };
        match tokio::time::timeout(self.shutdown_timeout, last_two).await {
            Ok(outcome) => log_outcome(&outcome),
            Err(_) => tracing::warn!(
                spooled = self.core.lock_spool().len(),
                "audit flush on shutdown timed out: records stay in the spool for the next start"
            ),
        }
        let producer = self.producer.clone();
        let timeout = self.shutdown_timeout;
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }

    /// Sends records to the audit topic, each keyed by its logical topic, and waits for their
    /// delivery reports: returns the ids delivered and the records that were not.
    async fn send(&self, records: Vec<EncodedRecord>) -> (HashSet<String>, Vec<EncodedRecord>) {
        let mut futures = Vec::with_capacity(records.len());
        let mut failed = Vec::new();
        for r in records {
            let record = FutureRecord::to(&self.topic)
                .key(&r.topic)
                .payload(&r.bytes);
            match self.producer.send_result(record) {
                Ok(f) => futures.push((r, f)),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "could not enqueue an audit record");
                    failed.push(r);
                }
            }
        }
        let mut delivered = HashSet::new();
        for (r, f) in futures {
            match f.await {
                Ok(Ok(_)) => {
                    delivered.insert(r.id);
                }
                Ok(Err((e, _))) => {
                    tracing::debug!(error = %e, "audit record delivery failed");
                    failed.push(r);
                }
                Err(_) => failed.push(r),
            }
        }
        self.core
            .metrics
            .records_sent
            .inc_by(delivered.len() as u64);
        self.core.metrics.send_failures.inc_by(failed.len() as u64);
        (delivered, failed)
    }

    async fn flush(&self, closing: Closing) -> FlushOutcome {
        let core = &self.core;
        let now = core.clock.now_ms();
        let watermarks = core.watermarks(now);
        let (messages, counts) = core.drain_counts(now);
        let mut outcome = FlushOutcome {
            messages,
            counts_records: counts.len(),
            ..FlushOutcome::default()
        };
        // Write-ahead into the spool; records that do not fit, or all of them when the
        // spool cannot be written, are still sent.
        let spool = Arc::clone(&core.spool);
        let to_spool = counts.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            let rejected = spool.append(to_spool)?;
            Ok::<_, SpoolError>((spool.pending(), rejected))
        })
        .await;
        let (mut batch, rejected): (Vec<EncodedRecord>, HashSet<String>) = match written {
            Ok(Ok((pending, rejected))) => (pending, rejected.into_iter().collect()),
            failed => {
                match failed {
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "audit spool write failed: sending without write-ahead")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "audit spool task failed: sending without write-ahead")
                    }
                    Ok(Ok(_)) => {}
                }
                let pending = core.lock_spool().pending();
                let held: HashSet<&String> = pending.iter().map(|r| &r.id).collect();
                let rejected = counts
                    .iter()
                    .filter(|r| !held.contains(&r.id))
                    .map(|r| r.id.clone())
                    .collect();
                (pending, rejected)
            }
        };
        let unspooled: Vec<EncodedRecord> = counts
            .into_iter()
            .filter(|r| rejected.contains(&r.id))
            .collect();
        let unspooled_ids: HashSet<String> = unspooled.iter().map(|r| r.id.clone()).collect();
        batch.extend(unspooled);

        // The counts first, all of them acknowledged or failed before any progress is sent.
        let (delivered, failed) = self.send(batch).await;
        outcome.sent = delivered.len();
        outcome.failed = failed.len();
        if !failed.is_empty() {
            tracing::warn!(
                records = failed.len(),
                "audit records not delivered: kept in the spool for the next flush"
            );
        }
        // Failed counts records that did not fit before get another chance at the spool.
        let failed_counts = failed.len();
        let retry: Vec<EncodedRecord> = failed
            .into_iter()
            .filter(|r| unspooled_ids.contains(&r.id))
            .collect();
        let spool = Arc::clone(&core.spool);
        let result = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            let updated = spool.remove(&delivered).and_then(|()| spool.append(retry));
            (updated, spool.len(), spool.bytes(), spool.oldest_counts())
        })
        .await;
        let held = match result {
            Ok((updated, len, bytes, held)) => {
                outcome.spooled = len;
                core.metrics.spool_bytes.set(bytes as i64);
                core.metrics.spool_records.set(len as i64);
                match &updated {
                    Ok(dropped) if !dropped.is_empty() => {
                        outcome.dropped = dropped.len();
                        core.lost_counts.store(true, Ordering::Relaxed);
                        core.metrics.spool_overflow.inc_by(dropped.len() as u64);
                        tracing::error!(
                            records = dropped.len(),
                            "audit records lost: not delivered and the spool is full"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Failed records that were not in the spool may not be in it now.
                        core.lost_counts.store(true, Ordering::Relaxed);
                        tracing::error!(error = %e, "audit spool update failed");
                    }
                }
                held
            }
            Err(e) => {
                core.lost_counts.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "audit spool task failed");
                core.lock_spool().oldest_counts()
            }
        };
        core.metrics
            .records_spooled
            .inc_by(failed_counts.saturating_sub(outcome.dropped) as u64);

        // Then the progress, held back by the counts still waiting in the spool.
        let closing = closing == Closing::Yes && {
            let why_not =
                not_final_because(&held, core.lost_counts.load(Ordering::Relaxed), messages);
            if let Some(reason) = why_not {
                tracing::info!(
                    spooled = outcome.spooled,
                    "{reason}: progress records not marked final"
                );
            }
            why_not.is_none()
        };
        let progress = core.progress(held_back(watermarks, &held, now), now, closing);
        outcome.progress_records = progress.len();
        let (delivered, failed) = self.send(progress).await;
        outcome.sent += delivered.len();
        outcome.failed += failed.len();
        outcome.closed = closing && failed.is_empty();
        if closing && !failed.is_empty() {
            tracing::info!(
                records = failed.len(),
                "final audit progress records not delivered"
            );
        }
        outcome
    }
}

fn log_outcome(o: &FlushOutcome) {
    tracing::debug!(
        messages = o.messages,
        counts = o.counts_records,
        progress = o.progress_records,
        sent = o.sent,
        failed = o.failed,
        spooled = o.spooled,
        closed = o.closed,
        "audit flush"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const NOW: i64 = 1_764_067_270_000;

    /// A watermark source that answers `now - 1 min` and remembers what it was asked.
    #[derive(Debug, Default)]
    struct Recording(Mutex<Vec<Vec<String>>>);

    impl Watermarks for Recording {
        fn watermarks_ms(&self, topics: &[&str], now_ms: i64) -> Vec<i64> {
            self.0
                .lock()
                .expect("lock")
                .push(topics.iter().map(|t| (*t).to_owned()).collect());
            vec![now_ms - MIN; topics.len()]
        }
    }

    #[derive(Debug)]
    struct FixedClock;

    impl Clock for FixedClock {
        fn now_ms(&self) -> i64 {
            NOW
        }
    }

    fn core(spool_dir: &std::path::Path, watermarks: Arc<dyn Watermarks>) -> Core {
        let config = AuditConfig::default();
        let (spool, _) = Spool::open(spool_dir, 1 << 20).expect("spool");
        Core {
            tracker: Arc::new(Tracker::new(BucketWidth::default(), 100)),
            spool: Arc::new(Mutex::new(spool)),
            metrics: AuditMetrics::new(&prometheus::Registry::new()).expect("metrics"),
            clock: Arc::new(FixedClock),
            watermarks,
            observer: config.observer(),
            width: BucketWidth::default(),
            max_known: 100,
            known: Mutex::new(BTreeSet::new()),
            ids: Mutex::new(SequenceIds::new()),
            lost_counts: AtomicBool::new(false),
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "chaperone-reporter-test-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ))
    }

    #[test]
    fn spooled_counts_hold_back_their_topics_watermark() {
        let marks = vec![
            ("orders".to_owned(), Some(0), NOW - 5_000),
            ("orders".to_owned(), Some(1), NOW - 5_000),
            ("payments".to_owned(), Some(0), NOW - 5_000),
            ("refunds".to_owned(), None, NOW - 5_000),
        ];
        let spooled = BTreeMap::from([
            ("orders".to_owned(), NOW - 10 * MIN),
            ("payments".to_owned(), NOW - 1_000),
            ("shipments".to_owned(), NOW - 60 * MIN),
        ]);
        assert_eq!(
            held_back(marks, &spooled, NOW),
            vec![
                ("orders".to_owned(), Some(0), NOW - 10 * MIN),
                ("orders".to_owned(), Some(1), NOW - 10 * MIN),
                // Counts in the spool later than the watermark change nothing.
                ("payments".to_owned(), Some(0), NOW - 5_000),
                ("refunds".to_owned(), None, NOW - 5_000),
            ]
        );
        // Never past now, never before what a record can carry.
        let marks = vec![
            ("a".to_owned(), None, NOW + MIN),
            ("b".to_owned(), None, i64::MIN),
        ];
        assert_eq!(
            held_back(marks, &BTreeMap::new(), NOW),
            vec![
                ("a".to_owned(), None, NOW),
                ("b".to_owned(), None, MIN_TIMESTAMP_MS)
            ]
        );
    }

    #[test]
    fn progress_is_final_only_when_every_count_was_delivered() {
        let none = BTreeMap::new();
        assert_eq!(not_final_because(&none, false, 0), None);
        let waiting = BTreeMap::from([("orders".to_owned(), NOW - MIN)]);
        assert_eq!(
            not_final_because(&waiting, false, 0),
            Some("audit counts wait in the spool")
        );
        assert_eq!(
            not_final_because(&none, true, 0),
            Some("audit counts were lost")
        );
        assert_eq!(
            not_final_because(&none, false, 3),
            Some("messages were counted during shutdown")
        );
        // Counts dropped because the spool is full are remembered.
        let dir = temp_dir("lost");
        let mut core = core(&dir, Arc::new(NowWatermarks));
        let (tiny, _) = Spool::open(&dir.join("tiny"), 10).expect("spool");
        core.spool = Arc::new(Mutex::new(tiny));
        assert!(!core.lost_counts.load(Ordering::Relaxed));
        core.tracker.record("orders", Some(0), NOW, 1, NOW);
        assert_eq!(core.spool_now().expect("spool_now"), 0);
        assert!(core.lost_counts.load(Ordering::Relaxed));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_watermark_source_is_asked_once_per_flush_for_each_topic() {
        let dir = temp_dir("once");
        let source = Arc::new(Recording::default());
        let core = core(&dir, Arc::clone(&source) as Arc<dyn Watermarks>);
        assert!(core.watermarks(NOW).is_empty());
        for p in [0, 1, 2] {
            core.tracker.record("orders", Some(p), NOW - 1_000, 1, NOW);
        }
        core.tracker.record("payments", None, NOW - 1_000, 1, NOW);
        let (messages, records) = core.drain_counts(NOW);
        assert_eq!((messages, records.len()), (4, 4));
        assert!(records.iter().all(|r| r.bucket_start_ms.is_some()));
        assert_eq!(
            core.watermarks(NOW),
            vec![
                ("orders".to_owned(), Some(0), NOW - MIN),
                ("orders".to_owned(), Some(1), NOW - MIN),
                ("orders".to_owned(), Some(2), NOW - MIN),
                ("payments".to_owned(), None, NOW - MIN),
            ]
        );
        // Asked even with nothing known (the producer's event-time lag counts flushes).
        assert_eq!(
            *source.0.lock().expect("lock"),
            vec![vec![], vec!["orders".to_owned(), "payments".to_owned()]]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn progress_is_held_back_by_counts_spooled_and_keyed_by_topic() {
        let dir = temp_dir("held");
        let core = core(&dir, Arc::new(NowWatermarks));
        let old = BucketWidth::default().start_of(NOW - 30 * MIN);
        core.tracker.record("orders", Some(0), old + 5, 1, NOW);
        core.tracker.record("orders", Some(0), NOW - 1_000, 1, NOW);
        core.tracker
            .record("payments", Some(0), NOW - 1_000, 1, NOW);
        // Counts that could not be sent (here: written on drop) wait in the spool.
        assert_eq!(core.spool_now().expect("spooled"), 3);
        let held = core.lock_spool().oldest_counts();
        let progress = core.progress(held_back(core.watermarks(NOW), &held, NOW), NOW, true);
        let decoded: Vec<(String, i64, bool)> = progress
            .iter()
            .map(|r| {
                let AuditRecord::Progress(p) = AuditRecord::decode(&r.bytes).expect("decodes")
                else {
                    panic!("not progress");
                };
                assert_eq!(
                    (&*r.id, &*r.topic, r.bucket_start_ms),
                    (&*p.id, &*p.topic, None)
                );
                (p.topic, p.watermark_ms, p.closing)
            })
            .collect();
        assert_eq!(
            decoded,
            vec![
                ("orders".to_owned(), old, true),
                (
                    "payments".to_owned(),
                    BucketWidth::default().start_of(NOW - 1_000),
                    true
                ),
            ]
        );
        // Once delivered, nothing holds them back.
        let all: HashSet<String> = core
            .lock_spool()
            .pending()
            .into_iter()
            .map(|r| r.id)
            .collect();
        core.lock_spool().remove(&all).expect("removed");
        let held = core.lock_spool().oldest_counts();
        assert!(
            held_back(core.watermarks(NOW), &held, NOW)
                .iter()
                .all(|(_, _, w)| *w == NOW)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn safety_settings_win_over_user_properties() {
        let mut config = AuditConfig {
            delivery_timeout: Duration::from_secs(7),
            ..AuditConfig::default()
        };
        config
            .kafka
            .insert("bootstrap.servers".into(), "a:1".into());
        config.kafka.insert("acks".into(), "0".into());
        config
            .kafka
            .insert("enable.idempotence".into(), "false".into());
        config.kafka.insert("message.timeout.ms".into(), "1".into());
        let cc = audit_client_config(&ClientConfig::new(), &config);
        assert_eq!(cc.get("bootstrap.servers"), Some("a:1"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("message.timeout.ms"), Some("7000"));
    }

    #[test]
    fn audit_producer_inherits_the_audited_clients_properties_but_not_its_transactions() {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", "b:2")
            .set("transactional.id", "app-tx")
            .set("security.protocol", "SASL_SSL")
            .set("acks", "1");
        let cc = audit_client_config(&base, &AuditConfig::default());
        assert_eq!(cc.get("bootstrap.servers"), Some("b:2"));
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("transactional.id"), None);
        assert_eq!(cc.get("acks"), Some("all"));
    }
}
