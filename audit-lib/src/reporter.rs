//! Publishes what a [`Tracker`] counted to the audit topic, without losing it on the way.
//!
//! Every flush interval (and once more on shutdown) the reporter:
//! 1. asks the [`Watermarks`] source for each known topic-partition's event-time watermark
//!    (before draining, so every message below it is in the drained counts),
//! 2. drains the tracker into [`Counts`] records with fresh uuid v7 ids,
//! 3. writes them to the local [`Spool`] and fsyncs (write-ahead: from here on a crash
//!    cannot lose them; a restarted process re-sends them with the same ids),
//! 4. sends every record the spool holds, plus one [`Progress`] heartbeat per topic-partition
//!    counted since start, to the audit topic with `acks=all` and idempotence,
//! 5. removes what Kafka acknowledged from the spool. What failed stays there and is sent
//!    again on the next flush, by this process or, after a restart, by the next one.
//!
//! A record re-sent after a crash or a timed-out delivery may reach the topic twice with the
//! same id; readers keep each id once. Progress heartbeats are not spooled: the next flush
//! sends fresher ones.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bucket::BucketWidth;
use crate::config::{AuditConfig, ConfigError, FORCED_AUDIT_PROPERTIES};
use crate::metrics::AuditMetrics;
use crate::record::{AuditRecord, Counts, Observer, Progress};
use crate::spool::{Spool, SpoolError};
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
/// event time has been counted.
pub trait Watermarks: Send + Sync + std::fmt::Debug {
    /// The event-time watermark of `topic` at `now_ms`.
    fn watermark_ms(&self, topic: &str, now_ms: i64) -> i64;
}

/// Watermark of a hop that counts synchronously: everything up to now has been counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct NowWatermarks;

impl Watermarks for NowWatermarks {
    fn watermark_ms(&self, _topic: &str, now_ms: i64) -> i64 {
        now_ms
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
    /// Records (counts and progress) acknowledged by Kafka.
    pub sent: usize,
    /// Records whose delivery failed.
    pub failed: usize,
    /// Records left in the spool afterwards.
    pub spooled: usize,
    /// Records dropped because the spool was full.
    pub dropped: usize,
}

/// Builds the librdkafka configuration of the audit producer: `base` (or the config's
/// `kafka` map when it is not empty), then the delivery timeout, then the forced
/// safety settings, which win over anything the user set.
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
    fn drain_counts(&self, now_ms: i64) -> (u64, Vec<(String, Vec<u8>)>) {
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
        let records = drained
            .entries
            .into_iter()
            .map(|e| {
                if known.len() < self.max_known {
                    known.insert((e.topic.clone(), e.partition));
                }
                let id = uuid::Uuid::now_v7().to_string();
                let logical = e.topic.clone();
                let counts: Counts = e.into_counts(
                    id.clone(),
                    logical,
                    self.width,
                    self.observer.clone(),
                    now_ms,
                );
                (id, AuditRecord::Counts(counts).encode())
            })
            .collect();
        (messages, records)
    }

    fn progress(
        &self,
        watermarks: Vec<(String, Option<i32>, i64)>,
        now_ms: i64,
    ) -> Vec<(String, Vec<u8>)> {
        watermarks
            .into_iter()
            .map(|(topic, partition, watermark_ms)| {
                let id = uuid::Uuid::now_v7().to_string();
                let p = Progress {
                    id: id.clone(),
                    topic: topic.clone(),
                    physical_topic: topic,
                    partition,
                    observer: self.observer.clone(),
                    position: None,
                    high_watermark: None,
                    watermark_ms,
                    bucket_width: self.width,
                    emitted_at_ms: now_ms,
                    closing: false,
                };
                (id, AuditRecord::Progress(p).encode())
            })
            .collect()
    }

    fn watermarks(&self, now_ms: i64) -> Vec<(String, Option<i32>, i64)> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .iter()
            .map(|(t, p)| {
                (
                    t.clone(),
                    *p,
                    self.watermarks.watermark_ms(t, now_ms).min(now_ms),
                )
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

    /// Stops the reporter after a final flush (bounded by `shutdown_timeout`; whatever is
    /// not acknowledged by then stays in the spool for the next start).
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

impl Task {
    async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once: it re-sends what an earlier process spooled.
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.stop.cancelled() => break,
            }
            // A flush in progress runs to its end (bounded by the delivery timeout), so that
            // records it sent are not re-sent by the final flush.
            log_outcome(&self.flush().await);
        }
        // Final flush; what is not acknowledged in time stays in the spool. A flush reports
        // progress for the partitions known before its drain, so a second one follows: it
        // drains what arrived meanwhile and reports progress for the partitions the first one
        // learned (a producer that only ever flushed at shutdown would report none otherwise).
        let last_two = async {
            log_outcome(&self.flush().await);
            self.flush().await
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

    async fn flush(&self) -> FlushOutcome {
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
        let (mut batch, rejected): (Vec<(String, Vec<u8>)>, HashSet<String>) = match written {
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
                let held: HashSet<&String> = pending.iter().map(|(id, _)| id).collect();
                let rejected = counts
                    .iter()
                    .filter(|(id, _)| !held.contains(id))
                    .map(|(id, _)| id.clone())
                    .collect();
                (pending, rejected)
            }
        };
        let unspooled: Vec<(String, Vec<u8>)> = counts
            .into_iter()
            .filter(|(id, _)| rejected.contains(id))
            .collect();
        let unspooled_ids: HashSet<String> = unspooled.iter().map(|(id, _)| id.clone()).collect();
        batch.extend(unspooled);
        let progress_ids: HashSet<String>;
        {
            let progress = core.progress(watermarks, now);
            progress_ids = progress.iter().map(|(id, _)| id.clone()).collect();
            batch.extend(progress);
        }

        let mut futures = Vec::with_capacity(batch.len());
        let mut failed: Vec<(String, Vec<u8>)> = Vec::new();
        for (id, payload) in batch {
            let record: FutureRecord<'_, (), Vec<u8>> =
                FutureRecord::to(&self.topic).payload(&payload);
            match self.producer.send_result(record) {
                Ok(f) => futures.push((id, payload, f)),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "could not enqueue an audit record");
                    failed.push((id, payload));
                }
            }
        }
        let mut delivered = HashSet::new();
        for (id, payload, f) in futures {
            match f.await {
                Ok(Ok(_)) => {
                    delivered.insert(id);
                }
                Ok(Err((e, _))) => {
                    tracing::debug!(error = %e, "audit record delivery failed");
                    failed.push((id, payload));
                }
                Err(_) => failed.push((id, payload)),
            }
        }
        outcome.sent = delivered.len();
        outcome.failed = failed.len();
        core.metrics.records_sent.inc_by(delivered.len() as u64);
        core.metrics.send_failures.inc_by(failed.len() as u64);
        if !failed.is_empty() {
            tracing::warn!(
                records = failed.len(),
                "audit records not delivered: kept in the spool for the next flush"
            );
        }
        // Failed counts records that did not fit before get another chance at the spool.
        let failed_counts = failed
            .iter()
            .filter(|(id, _)| !progress_ids.contains(id))
            .count();
        let retry: Vec<(String, Vec<u8>)> = failed
            .into_iter()
            .filter(|(id, _)| unspooled_ids.contains(id) && !progress_ids.contains(id))
            .collect();
        let spool = Arc::clone(&core.spool);
        let result = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            spool.remove(&delivered)?;
            let dropped = spool.append(retry)?;
            Ok::<_, SpoolError>((dropped.len(), spool.len(), spool.bytes()))
        })
        .await;
        match result {
            Ok(Ok((dropped, held, bytes))) => {
                outcome.dropped = dropped;
                outcome.spooled = held;
                core.metrics.spool_bytes.set(bytes as i64);
                core.metrics.spool_records.set(held as i64);
                if dropped > 0 {
                    core.metrics.spool_overflow.inc_by(dropped as u64);
                    tracing::error!(
                        records = dropped,
                        "audit records lost: not delivered and the spool is full"
                    );
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "audit spool update failed"),
            Err(e) => tracing::error!(error = %e, "audit spool task failed"),
        }
        core.metrics
            .records_spooled
            .inc_by(failed_counts.saturating_sub(outcome.dropped) as u64);
        outcome
    }
}

fn log_outcome(o: &FlushOutcome) {
    tracing::debug!(
        messages = o.messages,
        counts = o.counts_records,
        sent = o.sent,
        failed = o.failed,
        spooled = o.spooled,
        "audit flush"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
