//! [`AuditedConsumer`] and [`AuditedStreamConsumer`]: rdkafka's `BaseConsumer` and
//! `StreamConsumer`, counting what the application processed.
//!
//! Adopting one is a one-line change: build it from the same [`ClientConfig`] and keep
//! calling `poll`/`recv`, `commit_message`, `store_offset`... (they implement rdkafka's
//! [`Consumer`] trait). A message is counted when the application says it was processed,
//! never when it is received:
//!
//! - storing or committing an offset past it (`store_offset`, `store_offset_from_message`,
//!   `store_offsets`, `commit`, `commit_message`, `commit_consumer_state`), or, with
//!   librdkafka's default `enable.auto.offset.store=true`, asking for the next message (the
//!   application is done with the previous one, as librdkafka would then store its offset);
//! - or [`AuditedConsumer::processed`]. With [`CountOn::Processed`] only that counts, so a
//!   message the application passes over (an error, a filter) is never counted and the audit
//!   shows it missing.
//!
//! Counts go into a [`Tracker`] per topic, partition and event-time bucket (the message
//! timestamp), with the latency from event time to processing, under the tier
//! `consumer:<group.id>` unless the application names one.
//!
//! The consumer's offsets move only after the counts of the messages below them are
//! durable, so counts are never short of what was processed:
//!
//! - **At-least-once** (default): every flush (each `flush_interval`, on a synchronous
//!   commit, when partitions are revoked, on close) drains the counts, sends them to the
//!   audit topic and waits for their acknowledgement, then commits the offsets the
//!   application stored or committed (librdkafka's own commits are turned off:
//!   `enable.auto.commit` and `enable.auto.offset.store` are forced to `false` and the
//!   application's values are carried out here), then sends one progress record per
//!   assigned partition. Counts not acknowledged are kept in memory and sent again with the
//!   same ids; offsets wait until they are. A `kill -9` can only add counts: the messages
//!   counted in the flush under way were acknowledged but their offsets not committed, so
//!   the next owner processes and counts them again.
//! - **Transactional** ([`ConsumerOptions::transactional`], with `enable.auto.commit=false`):
//!   the counts, the progress records and the consumed offsets commit in one Kafka
//!   transaction on the audited cluster, as chaperone-service does. A failed transaction is
//!   aborted and every assigned partition is read again from its committed offset.
//!
//! Flushes run on the thread that polls (inside `poll`/`recv` and the rebalance callback),
//! so what is drained and the offsets committed always match; `poll` wakes up for a flush
//! while idle, so a caught-up partition still reports progress.
//!
//! [`ledger`] keeps the per-partition bookkeeping, [`counted`] the counts since the last
//! flush, [`sink`] the audit producer.

pub mod counted;
pub mod ledger;
pub mod sink;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
    RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::groups::GroupList;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::bucket::BucketWidth;
use crate::config::{AuditConfig, ConfigError};
use crate::mapping::{Mapped, Mapping, MappingConfig, MappingKind};
use crate::metrics::AuditMetrics;
use crate::record::{AuditRecord, MAX_NAME_LEN, Observer, Progress, Tier};
use crate::reporter::{AuditError, Clock, SystemClock, audit_client_config};
use crate::sequence::SequenceIds;
use crate::spool::EncodedRecord;

use counted::Counted;
pub use ledger::CountOn;
use ledger::{Handle, Ledger, Waiting};
use sink::{Acks, TxnError};

/// Consumer-side options, next to the [`AuditConfig`] shared with producers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerOptions {
    /// The tier the consumer reports as. Unset: `AuditConfig::tier` unless it is the
    /// default `producer`, else `consumer:<group.id>`, so that every group is a tier.
    pub tier: Option<String>,
    /// What counts a message as processed.
    pub count_on: CountOn,
    /// Commit counts, progress and consumed offsets in one Kafka transaction on the audited
    /// cluster (the audit topic must live there). Needs `enable.auto.commit=false`.
    pub transactional: bool,
    /// `transactional.id` of the audit producer in transactional mode. Default
    /// `chaperone-audit:<group.id>:<host>:<instance>`: give a restarted member the same
    /// instance so that it fences the transaction its killed predecessor left open (otherwise
    /// that transaction holds the partition's offsets until `transaction_timeout`).
    pub transactional_id: Option<String>,
    /// librdkafka `transaction.timeout.ms` of the audit producer: how long a transaction
    /// left open by a killed member blocks its partitions' offsets.
    #[serde(with = "crate::duration")]
    pub transaction_timeout: Duration,
    /// Longest wait for one Kafka call of a flush (end offsets, committed offsets, commit).
    #[serde(with = "crate::duration")]
    pub kafka_timeout: Duration,
    /// How the topics read map to logical topics and source datacenters, as
    /// chaperone-service's `[mapping]`; `identity` unless `kind` says otherwise. A group
    /// reading MirrorMaker 2's `regional.orders` on the aggregate cluster sets
    /// `kind = "mirror"` and reports `orders` from datacenter `regional`, lined up with the
    /// tiers before it.
    pub mapping: MappingConfig,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            tier: None,
            count_on: CountOn::Offsets,
            transactional: false,
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
            kafka_timeout: Duration::from_secs(10),
            mapping: MappingConfig::default(),
        }
    }
}

fn bad(key: &str, reason: impl Into<String>) -> AuditError {
    AuditError::Config(ConfigError {
        key: key.to_owned(),
        reason: reason.into(),
    })
}

/// The tier of a consumer: see [`ConsumerOptions::tier`].
pub fn consumer_tier(options: &ConsumerOptions, audit: &AuditConfig, group_id: &str) -> String {
    match &options.tier {
        Some(t) => t.clone(),
        None if audit.tier != Tier::Producer.as_str() => audit.tier.clone(),
        None => format!("consumer:{group_id}"),
    }
}

fn bool_property(kafka: &ClientConfig, key: &str, default: bool) -> bool {
    kafka
        .get(key)
        .map_or(default, |v| v.trim().eq_ignore_ascii_case("true"))
}

/// What an audited consumer did since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// Messages counted as processed.
    pub counted: u64,
    /// Messages passed over without being counted ([`CountOn::Processed`]).
    pub passed_over: u64,
    /// Flushes whose counts and offsets were committed.
    pub flushes: u64,
    /// Transactions aborted (their messages are read and counted again).
    pub aborted: u64,
}

enum Out {
    AtLeastOnce {
        producer: BaseProducer<Acks>,
        /// Counts records not acknowledged yet: sent again, with their ids, before any
        /// offset moves.
        unsent: Vec<EncodedRecord>,
    },
    Transactional {
        producer: BaseProducer<DefaultProducerContext>,
        /// An abort did not finish in time: the next flush resumes it first.
        abort_pending: bool,
    },
}

/// Why a flush runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The flush interval passed.
    Timed,
    /// The application committed synchronously.
    Commit,
    /// Partitions are being revoked.
    Revoke,
    /// The consumer closes: its progress records are final.
    Close,
}

/// The state shared by the consumer and its rebalance callback.
struct Core {
    /// Physical topic -> logical topic and source datacenter.
    mapping: Mapping,
    /// The ledger and the counts, under one lock.
    books: Mutex<Books>,
    out: Mutex<Out>,
    ids: Mutex<SequenceIds>,
    observer: Observer,
    width: BucketWidth,
    audit_topic: String,
    clock: Arc<dyn Clock>,
    metrics: AuditMetrics,
    count_on: CountOn,
    auto_store: bool,
    transactional: bool,
    kafka_timeout: Duration,
    flush_interval: Duration,
    next_flush: Mutex<Instant>,
    closed: AtomicBool,
    fatal: Mutex<Option<KafkaError>>,
    failed: AtomicBool,
    /// The clock, read at most every [`READ_CLOCK_EVERY`] polls while messages arrive
    /// without waiting, and on every poll that waits (reading it is most of the cost of a
    /// message on some virtual machines).
    now_ms: AtomicI64,
    polls: AtomicU32,
    /// A poll found no message waiting since the last flush: only then can a partition be
    /// caught up, and only then does a flush ask for end offsets.
    idled: AtomicBool,
    flushes: AtomicU64,
    aborted: AtomicU64,
}

/// What a consumer knows about its partitions and what it counted since the last flush:
/// one lock for both, taken once for each message received and each one processed.
struct Books {
    ledger: Ledger,
    counted: Counted,
}

/// The librdkafka context of an audited consumer: counts, flushes, and hands partitions over
/// on rebalance. Public because rdkafka's types name it; it has nothing to call.
pub struct AuditConsumerContext {
    core: Core,
}

impl std::fmt::Debug for AuditConsumerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConsumerContext")
            .field("tier", &self.core.observer.tier)
            .field("transactional", &self.core.transactional)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ClientContext for AuditConsumerContext {}

impl ConsumerContext for AuditConsumerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let core = &self.core;
        match rebalance {
            Rebalance::Revoke(tpl) => {
                if core.closed.load(Ordering::Acquire) {
                    return;
                }
                if consumer.assignment_lost() {
                    tracing::warn!(
                        partitions = tpl.count(),
                        "assignment lost: uncommitted counts discarded, the new owner counts them"
                    );
                    core.discard(consumer);
                } else {
                    tracing::info!(
                        partitions = tpl.count(),
                        "partitions revoked: committing their counts"
                    );
                    // Only a poll runs this callback: the application is done with the
                    // message it had.
                    core.before_poll();
                    core.flush(consumer, Why::Revoke);
                }
                let ledger = &mut lock(&core.books).ledger;
                for el in tpl.elements() {
                    ledger.revoke(el.topic(), el.partition());
                }
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                let committed = consumer
                    .committed_offsets((*tpl).clone(), core.kafka_timeout)
                    .map_err(|e| tracing::warn!(error = %e, "cannot read committed offsets"))
                    .ok();
                let ledger = &mut lock(&core.books).ledger;
                for el in tpl.elements() {
                    let c = committed.as_ref().and_then(|c| {
                        c.find_partition(el.topic(), el.partition())
                            .and_then(|e| e.offset().to_raw())
                            .filter(|o| *o >= 0)
                    });
                    ledger.assign(el.topic(), el.partition(), c);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

/// Where the ledger finds a message's partition fast (see [`ledger::Handle`]).
#[inline]
fn handle(m: &BorrowedMessage<'_>) -> Handle {
    Handle {
        topic: m.topic_ptr() as usize,
        partition: m.partition(),
    }
}

/// Polls between two reads of the clock (and checks of the flush deadline) while messages
/// arrive without waiting.
const READ_CLOCK_EVERY: u32 = 64;

impl Core {
    /// The clock as last read.
    #[inline]
    fn now(&self) -> i64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    fn read_clock(&self) {
        self.now_ms.store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// A poll found no message waiting.
    fn idle(&self) {
        self.idled.store(true, Ordering::Relaxed);
        self.read_clock();
    }

    /// Counts a poll that found a message waiting; every [`READ_CLOCK_EVERY`] of them, reads
    /// the clock and returns `true` (time to check the flush deadline).
    #[inline]
    fn quick_poll(&self) -> bool {
        // Not a read-modify-write: polls from several threads at once may lose a count,
        // which only delays a clock read.
        let n = self.polls.load(Ordering::Relaxed);
        self.polls.store(n.wrapping_add(1), Ordering::Relaxed);
        if n.is_multiple_of(READ_CLOCK_EVERY) {
            self.read_clock();
            true
        } else {
            false
        }
    }

    /// Runs `f` on the ledger and the counts, with the time messages are processed at.
    #[inline]
    fn with_books<R>(&self, f: impl FnOnce(&mut Ledger, &mut Counted, i64) -> R) -> R {
        let now = self.now();
        let mut books = lock(&self.books);
        let Books { ledger, counted } = &mut *books;
        f(ledger, counted, now)
    }

    /// Before the application asks for a message: the previous one is done when
    /// librdkafka's auto offset store is what the application relies on.
    #[inline]
    fn before_poll(&self) {
        if self.auto_store {
            self.with_books(|ledger, counted, now| {
                ledger.store_last_received(self.count_on, &mut counted.at(now))
            });
        }
    }

    /// A message is handed to the application; with librdkafka's auto offset store, the
    /// previous one is done (as in [`Core::before_poll`], under the same lock).
    #[inline]
    fn received(&self, m: &BorrowedMessage<'_>) {
        let w = Waiting::new(
            m.offset(),
            m.timestamp().to_millis(),
            m.payload_len() as u64,
        );
        self.with_books(|ledger, counted, now| {
            if self.auto_store {
                ledger.store_last_received(self.count_on, &mut counted.at(now));
            }
            ledger.received_by(handle(m), || m.topic(), w);
        })
    }

    #[inline]
    fn processed(&self, m: &BorrowedMessage<'_>) -> bool {
        self.with_books(|ledger, counted, now| {
            ledger.processed_by(
                handle(m),
                || m.topic(),
                m.offset(),
                self.count_on,
                &mut counted.at(now),
            )
        })
    }

    /// Stores the offset after `m`.
    #[inline]
    fn store_after(&self, m: &BorrowedMessage<'_>) -> bool {
        self.with_books(|ledger, counted, now| {
            ledger.store_by(
                handle(m),
                || m.topic(),
                m.offset() + 1,
                self.count_on,
                &mut counted.at(now),
            )
        })
    }

    fn store(&self, topic: &str, partition: i32, next: i64) -> bool {
        self.with_books(|ledger, counted, now| {
            ledger.store(topic, partition, next, self.count_on, &mut counted.at(now))
        })
    }

    fn store_all_received(&self) {
        self.with_books(|ledger, counted, now| {
            ledger.store_all_received(self.count_on, &mut counted.at(now))
        });
    }

    fn until_flush(&self) -> Duration {
        lock(&self.next_flush).saturating_duration_since(Instant::now())
    }

    #[inline]
    fn take_fatal(&self) -> Option<KafkaError> {
        if !self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.fatal_error()
    }

    #[cold]
    fn fatal_error(&self) -> Option<KafkaError> {
        lock(&self.fatal).clone()
    }

    /// Flushes when due.
    fn tick<K: Consumer<AuditConsumerContext>>(&self, consumer: &K) {
        if self.until_flush().is_zero() {
            self.flush(consumer, Why::Timed);
        }
    }

    /// An assignment was lost: the counts not committed go (their offsets were not committed
    /// either, so the new owner counts them) and the partitions still assigned are read again
    /// from their committed offsets.
    fn discard(&self, consumer: &BaseConsumer<AuditConsumerContext>) {
        let (dropped, rewind) = {
            let mut books = lock(&self.books);
            (books.counted.drain().messages(), books.ledger.rewind())
        };
        if dropped > 0 {
            tracing::warn!(dropped, "uncommitted counts discarded");
        }
        if matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        ) {
            self.seek_back(consumer, rewind);
        }
    }

    fn seek_back<K: Consumer<AuditConsumerContext>>(
        &self,
        consumer: &K,
        rewind: Vec<(String, i32, i64)>,
    ) {
        let mut tpl = TopicPartitionList::new();
        for (t, p, from) in rewind {
            if let Err(e) = tpl.add_partition_offset(&t, p, Offset::Offset(from)) {
                tracing::warn!(error = %e, topic = t, partition = p, "cannot rewind");
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.seek_partitions(tpl, self.kafka_timeout) {
            Ok(result) => {
                for el in result.elements() {
                    if let Err(e) = el.error() {
                        tracing::error!(error = %e, topic = el.topic(), partition = el.partition(), "cannot rewind a partition: its uncommitted messages may not be counted");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rewind partitions: their uncommitted messages may not be counted")
            }
        }
    }

    /// End offsets of the partitions that received nothing left uncounted (the only ones that
    /// can be caught up), read now: (topic, partition) -> (high watermark, read at).
    fn end_offsets<K: Consumer<AuditConsumerContext>>(
        &self,
        consumer: &K,
    ) -> Vec<((String, i32), (i64, i64))> {
        let candidates: Vec<(String, i32)> = {
            let ledger = &lock(&self.books).ledger;
            ledger
                .partitions()
                .into_iter()
                .filter(|(t, p)| ledger.get(t, *p).is_some_and(|x| x.nothing_waiting()))
                .collect()
        };
        if candidates.is_empty() {
            return Vec::new();
        }
        // One ListOffsets request for all of them (the latest offset: timestamp -1).
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &candidates {
            if let Err(e) = tpl.add_partition_offset(t, *p, Offset::End) {
                tracing::debug!(error = %e, topic = t, partition = p, "no end offset");
            }
        }
        let at = self.clock.now_ms();
        match consumer.offsets_for_times(tpl, self.kafka_timeout) {
            Ok(ends) => ends
                .elements()
                .iter()
                .filter(|el| el.error().is_ok())
                .filter_map(|el| {
                    let high = el.offset().to_raw().filter(|o| *o >= 0)?;
                    Some(((el.topic().to_owned(), el.partition()), (high, at)))
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "no end offsets");
                Vec::new()
            }
        }
    }

    /// The observer, for messages that originated in `datacenter`.
    fn observer_in(&self, datacenter: String) -> Observer {
        Observer {
            datacenter,
            ..self.observer.clone()
        }
    }

    fn progress_record(
        &self,
        end: &PartitionEnd,
        position: Option<i64>,
        watermark_ms: i64,
        now: i64,
        closing: bool,
    ) -> EncodedRecord {
        EncodedRecord::new(&AuditRecord::Progress(Progress {
            id: uuid::Uuid::now_v7().to_string(),
            topic: end.mapped.topic.clone(),
            physical_topic: end.topic.clone(),
            partition: Some(end.partition),
            observer: self.observer_in(end.mapped.datacenter.clone()),
            position,
            high_watermark: end.high.map(|h| position.map_or(h, |p| h.max(p))),
            watermark_ms,
            bucket_width: self.width,
            emitted_at_ms: now,
            closing,
            at_least_once: !self.transactional,
        }))
    }

    /// Drains the counts, makes them durable, commits the offsets stored so far, and reports
    /// progress: see the module documentation. Errors are logged; a fatal one is returned by
    /// the next `poll`.
    fn flush<K: Consumer<AuditConsumerContext>>(&self, consumer: &K, why: Why) {
        let started = Instant::now();
        self.read_clock();
        if self.take_fatal().is_some() {
            return;
        }
        // A consumer that never waited for a message since the last flush is not caught up.
        let ends = if self.idled.swap(false, Ordering::Relaxed) || why != Why::Timed {
            self.end_offsets(consumer)
        } else {
            Vec::new()
        };
        let ends_ms = started.elapsed().as_millis();
        let positions = consumer.position().ok();
        let now = self.clock.now_ms();

        // Drain and read the offsets together: nothing is counted on this thread meanwhile.
        let mut books = lock(&self.books);
        let drained = books.counted.drain();
        let ledger = &mut books.ledger;
        let offsets = ledger.to_commit();
        let messages = drained.messages();
        self.metrics.messages_tracked.inc_by(messages);
        if drained.overflowed > 0 {
            self.metrics.cell_overflow.inc_by(drained.overflowed);
            tracing::error!(
                messages = drained.overflowed,
                "messages not counted: the open-cell cap (max_open_cells) was reached"
            );
        }
        let counts: Vec<EncodedRecord> = {
            let mut ids = lock(&self.ids);
            drained
                .entries
                .into_iter()
                .map(|e| {
                    let id = ids.next(&e.topic);
                    let mapped = self.mapping.map(&e.topic);
                    let c = e.into_counts(
                        id,
                        mapped.topic,
                        self.width,
                        self.observer_in(mapped.datacenter),
                        now,
                    );
                    EncodedRecord::new(&AuditRecord::Counts(c))
                })
                .collect()
        };
        // Per partition: whether it is caught up (everything in its log when its end offset
        // was read was received, and everything received is counted in this flush or
        // before; never for a mirror), and its end offset.
        let ends_now: Vec<PartitionEnd> = ledger
            .partitions()
            .into_iter()
            .map(|(t, p)| {
                let end = ends
                    .iter()
                    .find(|((et, ep), _)| *et == t && *ep == p)
                    .map(|(_, v)| *v);
                let pos = positions
                    .as_ref()
                    .and_then(|l| l.find_partition(&t, p))
                    .and_then(|e| e.offset().to_raw());
                let nothing_waiting = ledger.get(&t, p).is_some_and(|x| x.nothing_waiting());
                // Having read a mirror to its end says nothing about what is still upstream
                // of the mirror maker: its watermark stays an event time.
                let mapped = self.mapping.map(&t);
                let caught_up = match (end, pos) {
                    (Some((high, at)), Some(pos))
                        if nothing_waiting && pos >= high && !mapped.mirrored =>
                    {
                        Some(at)
                    }
                    _ => None,
                };
                PartitionEnd {
                    topic: t,
                    mapped,
                    partition: p,
                    high: end.map(|(h, _)| h),
                    caught_up,
                }
            })
            .collect();
        let closing = why == Why::Close;
        let mut out = lock(&self.out);
        let rewind = match &mut *out {
            Out::AtLeastOnce { producer, unsent } => {
                unsent.extend(counts);
                let n = unsent.len();
                let left = sink::send_acked(
                    producer,
                    &self.audit_topic,
                    std::mem::take(unsent),
                    self.kafka_timeout,
                );
                self.metrics.records_sent.inc_by((n - left.len()) as u64);
                self.metrics.send_failures.inc_by(left.len() as u64);
                let delivered = left.is_empty();
                *unsent = left;
                if delivered {
                    if !offsets.is_empty() {
                        match commit_sync(consumer, &offsets) {
                            Ok(()) => ledger.committed(&offsets),
                            Err(e) => {
                                tracing::warn!(error = %e, "offset commit failed: the messages since the last commit are processed and counted again if their partition moves")
                            }
                        }
                    }
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::warn!(
                        records = unsent.len(),
                        "audit counts not acknowledged: offsets wait, the counts are sent again"
                    );
                }
                let mut claims = Vec::with_capacity(ends_now.len());
                let mut records = Vec::with_capacity(ends_now.len());
                for e in &ends_now {
                    let Some(part) = ledger.get(&e.topic, e.partition) else {
                        continue;
                    };
                    let watermark = if delivered {
                        ledger::decide(e.caught_up, part.counted_max_event_ms, part.claimed_ms, now)
                    } else {
                        ledger::decide(None, None, part.claimed_ms, now)
                    };
                    claims.push((e.topic.clone(), e.partition, watermark));
                    records.push(self.progress_record(
                        e,
                        part.committed,
                        watermark,
                        now,
                        closing && delivered,
                    ));
                }
                let n = records.len();
                let left =
                    sink::send_acked(producer, &self.audit_topic, records, self.kafka_timeout);
                self.metrics.records_sent.inc_by((n - left.len()) as u64);
                if !left.is_empty() && closing {
                    tracing::info!(
                        records = left.len(),
                        "final audit progress records not delivered"
                    );
                }
                for (t, p, w) in claims {
                    ledger.claim(&t, p, w);
                }
                None
            }
            Out::Transactional {
                producer,
                abort_pending,
            } => {
                let mut records = counts;
                let n_counts = records.len();
                let mut claims = Vec::with_capacity(ends_now.len());
                for e in &ends_now {
                    let Some(part) = ledger.get(&e.topic, e.partition) else {
                        continue;
                    };
                    let watermark = ledger::decide(
                        e.caught_up,
                        part.counted_max_event_ms,
                        part.claimed_ms,
                        now,
                    );
                    claims.push((e.topic.clone(), e.partition, watermark));
                    records.push(self.progress_record(e, part.position(), watermark, now, closing));
                }
                let mut tpl = TopicPartitionList::new();
                for (t, p, o) in &offsets {
                    if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
                        tracing::warn!(error = %e, topic = t, partition = p, "offset left out of the transaction");
                    }
                }
                let group = consumer.group_metadata();
                match sink::commit_transaction(
                    producer,
                    abort_pending,
                    &self.audit_topic,
                    &records,
                    &tpl,
                    group.as_ref(),
                    self.kafka_timeout,
                ) {
                    Ok(()) => {
                        self.metrics.records_sent.inc_by(records.len() as u64);
                        ledger.committed(&offsets);
                        for (t, p, w) in claims {
                            ledger.claim(&t, p, w);
                        }
                        self.flushes.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    Err(TxnError::Aborted { action, source }) => {
                        self.aborted.fetch_add(1, Ordering::Relaxed);
                        self.metrics.send_failures.inc_by(n_counts as u64);
                        tracing::warn!(error = %source, action, messages, "audit transaction aborted: its partitions are read again from their committed offsets");
                        Some(ledger.rewind())
                    }
                    Err(TxnError::Fatal { action, source }) => {
                        tracing::error!(error = %source, action, "audit transactions cannot go on: the consumer stops");
                        *lock(&self.fatal) = Some(source);
                        self.failed.store(true, Ordering::Relaxed);
                        None
                    }
                }
            }
        };
        drop(out);
        drop(books);
        // The next one an interval after this one ended, however long it took.
        *lock(&self.next_flush) = Instant::now() + self.flush_interval;
        tracing::debug!(
            ?why,
            messages,
            offsets = offsets.len(),
            ends_ms,
            took_ms = started.elapsed().as_millis(),
            "audit flush"
        );
        if let Some(rewind) = rewind {
            self.seek_back(consumer, rewind);
        }
    }
}

/// What a flush knows about the end of one assigned partition.
#[derive(Debug)]
struct PartitionEnd {
    topic: String,
    /// The topic's logical name and source datacenter.
    mapped: Mapped,
    partition: i32,
    /// End offset, when read.
    high: Option<i64>,
    /// When the partition was caught up, if it was.
    caught_up: Option<i64>,
}

fn commit_sync<K: Consumer<AuditConsumerContext>>(
    consumer: &K,
    offsets: &[(String, i32, i64)],
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    for (t, p, o) in offsets {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)
}

/// Builds the context and the consumer configuration.
fn prepare(
    kafka: &ClientConfig,
    audit: AuditConfig,
    options: ConsumerOptions,
    metrics: AuditMetrics,
    clock: Arc<dyn Clock>,
) -> Result<(ClientConfig, AuditConsumerContext), AuditError> {
    audit.validate()?;
    let width = audit.width()?;
    let group = kafka
        .get("group.id")
        .filter(|g| !g.is_empty())
        .ok_or_else(|| bad("group.id", "an audited consumer needs a consumer group"))?
        .to_owned();
    let tier = consumer_tier(&options, &audit, &group);
    if tier.is_empty() || tier.len() > MAX_NAME_LEN || tier.contains('\0') {
        return Err(bad(
            "tier",
            format!("`{tier}` must be 1 to {MAX_NAME_LEN} bytes (UTF-8) without NUL"),
        ));
    }
    let auto_commit = bool_property(kafka, "enable.auto.commit", true);
    let auto_store = bool_property(kafka, "enable.auto.offset.store", true);
    if options.transactional && auto_commit {
        return Err(bad(
            "enable.auto.commit",
            "transactional mode commits offsets in its transactions: set it to false",
        ));
    }
    let mut observer = audit.observer();
    observer.tier = Tier::from(tier);
    let mapping = options
        .mapping
        .rule(MappingKind::Identity, &observer.datacenter)
        .map_err(|e| bad(&format!("mapping.{}", e.key), e.reason))?;

    let base = sink::producer_base(kafka);
    let mut pc = audit_client_config(&base, &audit);
    let out = if options.transactional {
        let id = options.transactional_id.clone().unwrap_or_else(|| {
            format!(
                "chaperone-audit:{group}:{}:{}",
                observer.host, observer.instance
            )
        });
        let txn_ms = options.transaction_timeout.as_millis().max(1_000);
        let delivery_ms = audit.delivery_timeout.as_millis().min(txn_ms);
        pc.set("transactional.id", &id)
            .set("transaction.timeout.ms", txn_ms.to_string())
            .set("message.timeout.ms", delivery_ms.to_string());
        let producer: BaseProducer<DefaultProducerContext> = pc.create()?;
        producer.init_transactions(options.kafka_timeout)?;
        tracing::info!(
            transactional_id = id,
            "audited consumer in transactional mode"
        );
        Out::Transactional {
            producer,
            abort_pending: false,
        }
    } else {
        Out::AtLeastOnce {
            producer: pc.create_with_context(Acks::default())?,
            unsent: Vec::new(),
        }
    };

    let mut cc = kafka.clone();
    for (key, value) in [
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
    ] {
        if cc.get(key) != Some(value) {
            tracing::info!(
                property = key,
                "offsets are committed by the audit after their counts: librdkafka's own {key} is turned off"
            );
        }
        cc.set(key, value);
    }
    let core = Core {
        mapping,
        books: Mutex::new(Books {
            ledger: Ledger::default(),
            counted: Counted::new(width, audit.max_open_cells),
        }),
        out: Mutex::new(out),
        ids: Mutex::new(SequenceIds::new()),
        observer,
        width,
        audit_topic: audit.topic.clone(),
        now_ms: AtomicI64::new(clock.now_ms()),
        clock,
        metrics,
        count_on: options.count_on,
        auto_store,
        transactional: options.transactional,
        kafka_timeout: options.kafka_timeout,
        flush_interval: audit.flush_interval,
        next_flush: Mutex::new(Instant::now() + audit.flush_interval),
        closed: AtomicBool::new(false),
        fatal: Mutex::new(None),
        failed: AtomicBool::new(false),
        polls: AtomicU32::new(0),
        idled: AtomicBool::new(true),
        flushes: AtomicU64::new(0),
        aborted: AtomicU64::new(0),
    };
    Ok((cc, AuditConsumerContext { core }))
}

/// Implements rdkafka's [`Consumer`] trait for a wrapper with an `inner` consumer: offsets
/// stored or committed go through the audit, everything else to the inner consumer.
macro_rules! audited_consumer_trait {
    ($ty:ty, $inner_ty:ty) => {
        impl Consumer<AuditConsumerContext> for $ty {
            fn client(&self) -> &Client<AuditConsumerContext> {
                self.inner.client()
            }
            fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
                self.inner.group_metadata()
            }
            fn subscribe(&self, topics: &[&str]) -> KafkaResult<()> {
                self.inner.subscribe(topics)
            }
            fn unsubscribe(&self) {
                self.inner.unsubscribe()
            }
            fn assign(&self, assignment: &TopicPartitionList) -> KafkaResult<()> {
                self.forget_handles();
                self.inner.assign(assignment)
            }
            fn unassign(&self) -> KafkaResult<()> {
                self.forget_handles();
                self.inner.unassign()
            }
            fn incremental_assign(&self, assignment: &TopicPartitionList) -> KafkaResult<()> {
                self.forget_handles();
                self.inner.incremental_assign(assignment)
            }
            fn incremental_unassign(&self, assignment: &TopicPartitionList) -> KafkaResult<()> {
                self.forget_handles();
                self.inner.incremental_unassign(assignment)
            }
            fn seek<T: Into<Timeout>>(
                &self,
                topic: &str,
                partition: i32,
                offset: Offset,
                timeout: T,
            ) -> KafkaResult<()> {
                self.inner.seek(topic, partition, offset, timeout)
            }
            fn seek_partitions<T: Into<Timeout>>(
                &self,
                tpl: TopicPartitionList,
                timeout: T,
            ) -> KafkaResult<TopicPartitionList> {
                self.inner.seek_partitions(tpl, timeout)
            }
            /// Counts the messages below the offsets (see the module documentation);
            /// `Sync` flushes now, `Async` leaves the commit to the next flush.
            fn commit(&self, tpl: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
                for el in tpl.elements() {
                    if let Some(o) = el.offset().to_raw().filter(|o| *o >= 0) {
                        self.core().store(el.topic(), el.partition(), o);
                    }
                }
                self.commit_now(mode)
            }
            fn commit_consumer_state(&self, mode: CommitMode) -> KafkaResult<()> {
                self.core().store_all_received();
                self.commit_now(mode)
            }
            fn commit_message(
                &self,
                message: &BorrowedMessage<'_>,
                mode: CommitMode,
            ) -> KafkaResult<()> {
                self.core().store_after(message);
                self.commit_now(mode)
            }
            /// Like librdkafka's, `offset` is the last message processed.
            fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
                self.core().store(topic, partition, offset + 1);
                Ok(())
            }
            fn store_offset_from_message(&self, message: &BorrowedMessage<'_>) -> KafkaResult<()> {
                self.core().store_after(message);
                Ok(())
            }
            fn store_offsets(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
                for el in tpl.elements() {
                    if let Some(o) = el.offset().to_raw().filter(|o| *o >= 0) {
                        self.core().store(el.topic(), el.partition(), o);
                    }
                }
                Ok(())
            }
            fn subscription(&self) -> KafkaResult<TopicPartitionList> {
                self.inner.subscription()
            }
            fn assignment(&self) -> KafkaResult<TopicPartitionList> {
                self.inner.assignment()
            }
            fn assignment_lost(&self) -> bool {
                self.inner.assignment_lost()
            }
            fn committed<T>(&self, timeout: T) -> KafkaResult<TopicPartitionList>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.committed(timeout)
            }
            fn committed_offsets<T>(
                &self,
                tpl: TopicPartitionList,
                timeout: T,
            ) -> KafkaResult<TopicPartitionList>
            where
                T: Into<Timeout>,
            {
                self.inner.committed_offsets(tpl, timeout)
            }
            fn offsets_for_timestamp<T>(
                &self,
                timestamp: i64,
                timeout: T,
            ) -> KafkaResult<TopicPartitionList>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.offsets_for_timestamp(timestamp, timeout)
            }
            fn offsets_for_times<T>(
                &self,
                timestamps: TopicPartitionList,
                timeout: T,
            ) -> KafkaResult<TopicPartitionList>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.offsets_for_times(timestamps, timeout)
            }
            fn position(&self) -> KafkaResult<TopicPartitionList> {
                self.inner.position()
            }
            fn fetch_metadata<T>(&self, topic: Option<&str>, timeout: T) -> KafkaResult<Metadata>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.fetch_metadata(topic, timeout)
            }
            fn fetch_watermarks<T>(
                &self,
                topic: &str,
                partition: i32,
                timeout: T,
            ) -> KafkaResult<(i64, i64)>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.fetch_watermarks(topic, partition, timeout)
            }
            fn fetch_group_list<T>(&self, group: Option<&str>, timeout: T) -> KafkaResult<GroupList>
            where
                T: Into<Timeout>,
                Self: Sized,
            {
                self.inner.fetch_group_list(group, timeout)
            }
            fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
                self.inner.pause(partitions)
            }
            fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
                self.inner.resume(partitions)
            }
            fn rebalance_protocol(&self) -> RebalanceProtocol {
                self.inner.rebalance_protocol()
            }
        }

        impl $ty {
            fn core(&self) -> &Core {
                &self.inner.context().core
            }

            /// The assignment changes outside a rebalance callback: see [`ledger::Handle`].
            fn forget_handles(&self) {
                lock(&self.core().books).ledger.forget_handles();
            }

            /// Marks `message` processed and counts it (see [`CountOn`]). Returns whether it
            /// was counted now (`false`: counted or passed over before).
            pub fn processed(&self, message: &BorrowedMessage<'_>) -> bool {
                self.core().processed(message)
            }

            /// What the consumer counted and committed since it started.
            pub fn stats(&self) -> ConsumerStats {
                let core = self.core();
                let books = lock(&core.books);
                ConsumerStats {
                    counted: books.counted.total,
                    passed_over: books.ledger.passed_over,
                    flushes: core.flushes.load(Ordering::Relaxed),
                    aborted: core.aborted.load(Ordering::Relaxed),
                }
            }

            /// The wrapped rdkafka consumer. Offsets committed through it directly bypass the
            /// audit (and may run ahead of the counts).
            pub fn inner(&self) -> &$inner_ty {
                &self.inner
            }
        }
    };
}

/// rdkafka's `BaseConsumer`, counting what the application processed. See the module
/// documentation.
pub struct AuditedConsumer {
    inner: BaseConsumer<AuditConsumerContext>,
}

impl std::fmt::Debug for AuditedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditedConsumer")
            .field("context", self.inner.context())
            .field("stats", &self.stats())
            .finish()
    }
}

audited_consumer_trait!(AuditedConsumer, BaseConsumer<AuditConsumerContext>);

impl AuditedConsumer {
    /// Creates the consumer from `kafka` (any librdkafka property; `group.id` is required)
    /// with default [`ConsumerOptions`], registering metrics in `registry`.
    pub fn new(
        kafka: &ClientConfig,
        audit: AuditConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, AuditError> {
        Self::with_options(kafka, audit, ConsumerOptions::default(), registry)
    }

    /// Like [`AuditedConsumer::new`] with consumer options.
    pub fn with_options(
        kafka: &ClientConfig,
        audit: AuditConfig,
        options: ConsumerOptions,
        registry: &prometheus::Registry,
    ) -> Result<Self, AuditError> {
        let metrics = AuditMetrics::new(registry)?;
        Self::with_parts(kafka, audit, options, metrics, Arc::new(SystemClock))
    }

    /// Like [`AuditedConsumer::with_options`] with injected metrics and clock.
    pub fn with_parts(
        kafka: &ClientConfig,
        audit: AuditConfig,
        options: ConsumerOptions,
        metrics: AuditMetrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        let (cc, context) = prepare(kafka, audit, options, metrics, clock)?;
        Ok(Self {
            inner: cc.create_with_context(context)?,
        })
    }

    /// Polls for a message, like `BaseConsumer::poll`. Receiving does not count it. A flush
    /// that falls due runs here, also while waiting for messages.
    pub fn poll<T: Into<Timeout>>(&self, timeout: T) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        let core = self.core();
        if let Some(e) = core.take_fatal() {
            return Some(Err(e));
        }
        // A message already waiting: no clock read, no wait (the common case under load).
        // The previous message is stored as done when the next one is received, under the
        // same lock, or before a flush or a wait.
        if core.quick_poll() {
            core.before_poll();
            core.tick(&self.inner);
        }
        if let Some(r) = self.inner.poll(Duration::ZERO) {
            if let Ok(m) = &r {
                core.received(m);
            }
            return Some(r);
        }
        core.before_poll();
        core.idle();
        core.tick(&self.inner);
        let deadline = match timeout.into() {
            Timeout::Never => None,
            Timeout::After(d) => Some(Instant::now() + d),
        };
        loop {
            let mut slice = core.until_flush();
            if let Some(d) = deadline {
                slice = slice.min(d.saturating_duration_since(Instant::now()));
            }
            match self.inner.poll(slice) {
                Some(Ok(m)) => {
                    core.received(&m);
                    return Some(Ok(m));
                }
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    core.idle();
                    core.tick(&self.inner);
                    if let Some(e) = core.take_fatal() {
                        return Some(Err(e));
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return None;
                    }
                }
            }
        }
    }

    /// Flushes if one is due (`poll` does this on its own).
    pub fn tick(&self) {
        self.core().tick(&self.inner);
    }

    fn commit_now(&self, mode: CommitMode) -> KafkaResult<()> {
        let core = self.core();
        match mode {
            CommitMode::Sync => core.flush(&self.inner, Why::Commit),
            CommitMode::Async => core.tick(&self.inner),
        }
        core.take_fatal().map_or(Ok(()), Err)
    }

    /// Shuts down cleanly: commits what was processed (after its counts), sends final
    /// progress records for the assigned partitions, and leaves the group.
    pub fn close(self) -> ConsumerStats {
        self.close_now();
        self.stats()
    }

    fn close_now(&self) {
        let core = self.core();
        if core.closed.load(Ordering::Acquire) {
            return;
        }
        core.before_poll();
        core.flush(&self.inner, Why::Close);
        core.closed.store(true, Ordering::Release);
        self.inner.unsubscribe();
    }
}

impl Drop for AuditedConsumer {
    /// Without [`AuditedConsumer::close`]: closes the same way.
    fn drop(&mut self) {
        self.close_now();
    }
}

/// rdkafka's `StreamConsumer`, counting what the application processed. See the module
/// documentation. Its flushes block the task that awaits [`AuditedStreamConsumer::recv`]
/// (in `block_in_place` on a multi-threaded runtime).
pub struct AuditedStreamConsumer {
    inner: StreamConsumer<AuditConsumerContext>,
}

impl std::fmt::Debug for AuditedStreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditedStreamConsumer")
            .field("context", self.inner.context())
            .field("stats", &self.stats())
            .finish()
    }
}

audited_consumer_trait!(AuditedStreamConsumer, StreamConsumer<AuditConsumerContext>);

/// Runs blocking Kafka work from async code without stalling a multi-threaded runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl AuditedStreamConsumer {
    /// Creates the consumer (see [`AuditedConsumer::new`]). Must be called within a tokio
    /// runtime.
    pub fn new(
        kafka: &ClientConfig,
        audit: AuditConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, AuditError> {
        Self::with_options(kafka, audit, ConsumerOptions::default(), registry)
    }

    /// Like [`AuditedStreamConsumer::new`] with consumer options.
    pub fn with_options(
        kafka: &ClientConfig,
        audit: AuditConfig,
        options: ConsumerOptions,
        registry: &prometheus::Registry,
    ) -> Result<Self, AuditError> {
        let metrics = AuditMetrics::new(registry)?;
        Self::with_parts(kafka, audit, options, metrics, Arc::new(SystemClock))
    }

    /// Like [`AuditedStreamConsumer::with_options`] with injected metrics and clock.
    pub fn with_parts(
        kafka: &ClientConfig,
        audit: AuditConfig,
        options: ConsumerOptions,
        metrics: AuditMetrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        let (cc, context) = blocking(|| prepare(kafka, audit, options, metrics, clock))?;
        Ok(Self {
            inner: cc.create_with_context(context)?,
        })
    }

    /// Receives the next message, like `StreamConsumer::recv`. Receiving does not count it.
    /// A flush that falls due runs here, also while waiting for messages.
    pub async fn recv(&self) -> KafkaResult<BorrowedMessage<'_>> {
        let core = self.core();
        if let Some(e) = core.take_fatal() {
            return Err(e);
        }
        core.read_clock();
        // The previous message is stored as done when the next one is received, or before a
        // flush (see `AuditedConsumer::poll`).
        if core.until_flush().is_zero() {
            core.before_poll();
            blocking(|| core.tick(&self.inner));
        }
        loop {
            let wait = core.until_flush();
            match tokio::time::timeout(wait, self.inner.recv()).await {
                Ok(Ok(m)) => {
                    core.received(&m);
                    return Ok(m);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    core.before_poll();
                    core.idle();
                    blocking(|| core.tick(&self.inner));
                    if let Some(e) = core.take_fatal() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn commit_now(&self, mode: CommitMode) -> KafkaResult<()> {
        let core = self.core();
        match mode {
            CommitMode::Sync => blocking(|| core.flush(&self.inner, Why::Commit)),
            CommitMode::Async => blocking(|| core.tick(&self.inner)),
        }
        core.take_fatal().map_or(Ok(()), Err)
    }

    /// Shuts down cleanly, like [`AuditedConsumer::close`].
    pub fn close(self) -> ConsumerStats {
        self.close_now();
        self.stats()
    }

    fn close_now(&self) {
        let core = self.core();
        if core.closed.load(Ordering::Acquire) {
            return;
        }
        core.before_poll();
        blocking(|| core.flush(&self.inner, Why::Close));
        core.closed.store(true, Ordering::Release);
        self.inner.unsubscribe();
    }
}

impl Drop for AuditedStreamConsumer {
    /// Without [`AuditedStreamConsumer::close`]: closes the same way.
    fn drop(&mut self) {
        self.close_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_defaults_to_the_group() {
        let audit = AuditConfig::default();
        let options = ConsumerOptions::default();
        assert_eq!(
            consumer_tier(&options, &audit, "billing"),
            "consumer:billing"
        );
        let named = AuditConfig {
            tier: "warehouse".into(),
            ..AuditConfig::default()
        };
        assert_eq!(consumer_tier(&options, &named, "billing"), "warehouse");
        let explicit = ConsumerOptions {
            tier: Some("consumer:search".into()),
            ..ConsumerOptions::default()
        };
        assert_eq!(
            consumer_tier(&explicit, &named, "billing"),
            "consumer:search"
        );
        // The record contract accepts the name as it is.
        let mut observer = audit.observer();
        observer.tier = Tier::from(consumer_tier(&options, &audit, "billing"));
        let p = Progress {
            id: "p".into(),
            topic: "t".into(),
            physical_topic: "t".into(),
            partition: Some(0),
            observer,
            position: Some(1),
            high_watermark: Some(2),
            watermark_ms: 1_764_067_200_000,
            bucket_width: BucketWidth::default(),
            emitted_at_ms: 1_764_067_200_000,
            closing: true,
            at_least_once: true,
        };
        let back =
            AuditRecord::decode(&AuditRecord::Progress(p.clone()).encode()).expect("decodes");
        assert_eq!(back, AuditRecord::Progress(p));
    }

    #[test]
    fn options_read_from_toml_and_refuse_unknown_keys() {
        let o: ConsumerOptions = serde_json::from_str(
            r#"{"transactional":true,"count_on":"processed","transaction_timeout":"10s"}"#,
        )
        .expect("parses");
        assert!(o.transactional);
        assert_eq!(o.count_on, CountOn::Processed);
        assert_eq!(o.transaction_timeout, Duration::from_secs(10));
        assert!(serde_json::from_str::<ConsumerOptions>(r#"{"transactionl":true}"#).is_err());
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let metrics = || AuditMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let mut kafka = ClientConfig::new();
        kafka.set("bootstrap.servers", "127.0.0.1:1");
        let err = |kafka: &ClientConfig, options: ConsumerOptions| match prepare(
            kafka,
            AuditConfig::default(),
            options,
            metrics(),
            Arc::new(SystemClock),
        ) {
            Err(AuditError::Config(e)) => e.key,
            other => panic!("expected a config error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(err(&kafka, ConsumerOptions::default()), "group.id");
        kafka.set("group.id", "g".repeat(300));
        assert_eq!(err(&kafka, ConsumerOptions::default()), "tier");
        kafka.set("group.id", "g");
        let txn = ConsumerOptions {
            transactional: true,
            ..ConsumerOptions::default()
        };
        assert_eq!(err(&kafka, txn), "enable.auto.commit");
        let regex = ConsumerOptions {
            mapping: MappingConfig {
                kind: Some(MappingKind::Regex),
                pattern: Some("^(?P<topic>.+)$".into()),
                ..MappingConfig::default()
            },
            ..ConsumerOptions::default()
        };
        assert_eq!(err(&kafka, regex), "mapping.pattern");
    }

    #[test]
    fn a_mirror_mapping_reads_from_toml() {
        let o: ConsumerOptions = serde_json::from_str(
            r#"{"mapping":{"kind":"mirror","sources":["regional","regional2"]}}"#,
        )
        .expect("parses");
        let m = o
            .mapping
            .rule(MappingKind::Identity, "aggregate")
            .expect("valid");
        let mapped = m.map("regional2.orders");
        assert_eq!(
            (
                mapped.topic.as_str(),
                mapped.datacenter.as_str(),
                mapped.mirrored
            ),
            ("orders", "regional2", true)
        );
        let unset = ConsumerOptions::default()
            .mapping
            .rule(MappingKind::Identity, "aggregate")
            .expect("valid");
        assert_eq!(unset.map("regional.orders").topic, "regional.orders");
    }
}
