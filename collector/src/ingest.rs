//! Consuming audit topics into the store, exactly once, with any number of collectors.
//!
//! One consumer per configured cluster reads the cluster's audit topic as a member of a
//! consumer group (cooperative-sticky), so several collectors split its partitions between
//! them and take over those of one that stops or dies. Offsets live in PostgreSQL, not in
//! Kafka: when the group gives this collector a partition, it is assigned from the offset
//! stored with the records' effects. Each record is validated with the contract's strict
//! decoder. A single writer task batches what the consumers queue (size + linger) and makes
//! each batch durable: first the rejected records are acknowledged by the dead-letter
//! topic, then one SQL transaction applies the valid records and stores the next offsets
//! ([`crate::store::write_batch`]). A failed write keeps the batch and retries with capped
//! backoff; the bounded queue then fills and the consumers wait, so nothing is lost and
//! nothing is skipped. Offsets only move in PostgreSQL, together with their effects.
//!
//! A collector that lost a partition in a rebalance may still hold a batch of it. Each
//! write names the stored offset it continues from and is refused when another collector
//! has moved it since ([`crate::store::StoreError::Fenced`]): those records are dropped, the
//! partition is read again from the stored offset if it is still this collector's, and no
//! record is applied twice.
//!
//! A write PostgreSQL refuses because of the data itself (SQLSTATE class 22, such as a
//! count that no longer fits in `bigint` once added to the stored one) is not retried: the
//! batch is split in halves, in arrival order, until the records it refuses are alone. Each
//! of those goes to the dead-letter topic like a record the decoder rejects, every other
//! record is applied (each part in one transaction with the offsets that follow it), and
//! ingest goes on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, Counts, DecodeError};
use chaperone_daemon_support::Backoff;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Clock;
use crate::config::{ClusterConfig, IngestConfig};
use crate::metrics::IngestMetrics;
use crate::store::{self, BatchOutcome, ConsumedOffset, StoreError};

mod reach;

pub use reach::Reach;

/// Header of a dead-letter record holding the short rejection reason (the metric label).
pub const DLQ_REASON_HEADER: &str = "chaperone-dlq-reason";
/// Header of a dead-letter record holding the full validation error.
pub const DLQ_ERROR_HEADER: &str = "chaperone-dlq-error";
/// Header of a dead-letter record naming where it was read: `<cluster>/<topic>/<partition>/<offset>`.
pub const DLQ_SOURCE_HEADER: &str = "chaperone-dlq-source";

/// Timeout of the blocking metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Every reason a record can be rejected for: the labels of [`reason_label`], `empty` (no
/// payload), and those of [`data_error_label`].
pub const REJECTION_REASONS: [&str; 22] = [
    "too_large",
    "json",
    "no_version",
    "unsupported_version",
    "unknown_kind",
    "missing_field",
    "unknown_field",
    "negative",
    "out_of_range",
    "timestamp",
    "string_length",
    "nul_character",
    "inconsistent",
    "histogram",
    "other",
    "empty",
    "db_out_of_range",
    "db_invalid_text",
    "db_untranslatable_character",
    "db_data_exception",
    "db_integrity",
    "db_program_limit",
];

/// Short, bounded label for a validation failure (used as metric label and DLQ header).
pub fn reason_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge(_) => "too_large",
        DecodeError::Json(_) => "json",
        DecodeError::NoVersion => "no_version",
        DecodeError::UnsupportedVersion(_) => "unsupported_version",
        DecodeError::UnknownKind(_) => "unknown_kind",
        DecodeError::MissingField(_) => "missing_field",
        DecodeError::UnknownField(_) => "unknown_field",
        DecodeError::Negative { .. } => "negative",
        DecodeError::OutOfRange { .. } => "out_of_range",
        DecodeError::Timestamp { .. } => "timestamp",
        DecodeError::StringLength { .. } => "string_length",
        DecodeError::NulCharacter { .. } => "nul_character",
        DecodeError::Inconsistent { .. } => "inconsistent",
        DecodeError::Histogram(_) => "histogram",
        _ => "other",
    }
}

pub use crate::store::data_error_label;

/// Shared view of the ingest pipeline's health, read by `/readyz`.
#[derive(Debug)]
pub struct IngestStatus {
    sources: Vec<AtomicBool>,
    store_ok: AtomicBool,
    /// Which clusters answer now, and since when.
    pub reach: Reach,
}

impl IngestStatus {
    /// Status for `clusters` sources, none ready yet.
    pub fn new(clusters: usize) -> Self {
        Self {
            sources: (0..clusters).map(|_| AtomicBool::new(false)).collect(),
            store_ok: AtomicBool::new(true),
            reach: Reach::default(),
        }
    }

    /// Whether every cluster has listed its audit partitions and the last write to the
    /// store succeeded.
    pub fn is_ready(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
            && self.sources.iter().all(|s| s.load(Ordering::Relaxed))
    }
}

/// librdkafka callbacks: count and log client errors (never blocking).
#[derive(Debug)]
struct KafkaContext {
    cluster: String,
    errors: prometheus::IntCounter,
    limiter: RateLimit,
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.inc();
        let Some(suppressed) = self.limiter.allow() else {
            return;
        };
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            // Retrying will not cure it: nothing is read from this cluster until an operator
            // fixes its settings (the other clusters are read on).
            tracing::error!(
                cluster = %self.cluster,
                %error,
                reason,
                suppressed,
                "kafka cluster refused the connection: check its SASL and TLS settings and secrets"
            );
        } else {
            tracing::warn!(cluster = %self.cluster, %error, reason, suppressed, "kafka client error");
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// Partition changes the group made that the consume loop has not acted on yet, and what
/// librdkafka is fetching.
#[derive(Debug, Default)]
struct Rebalances {
    /// Partitions the group gave this collector, to be assigned from their stored offsets.
    to_assign: BTreeSet<i32>,
    /// Partitions taken away since the consume loop last looked.
    revoked: BTreeSet<i32>,
    /// Partitions assigned to the consumer.
    assigned: BTreeSet<i32>,
    /// The consume loop has stopped: partitions given from now on are assigned at once (and
    /// never read), so that closing the consumer can complete the rebalance.
    closing: bool,
}

/// The audit consumer's context: the client callbacks, and rebalances that leave the
/// assignment of new partitions to the consume loop, which first reads their stored
/// offsets from PostgreSQL (the callback cannot wait for a query). Revoked partitions are
/// unassigned at once, as the protocol requires.
#[derive(Debug)]
struct AuditConsumerContext {
    client: KafkaContext,
    topic: String,
    rebalances: Arc<Mutex<Rebalances>>,
}

impl ClientContext for AuditConsumerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.client.error(error, reason);
    }
}

impl ConsumerContext for AuditConsumerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let mut r = self.rebalances.lock().unwrap_or_else(|p| p.into_inner());
        let revoke = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if partitions.is_empty() || r.closing {
                    // Nothing to read first (or nothing will be read): complete the
                    // rebalance now.
                    if let Err(e) = consumer.incremental_assign(tpl) {
                        tracing::warn!(cluster = %self.client.cluster, error = %e, "cannot complete a rebalance");
                    }
                    r.assigned.extend(partitions);
                } else {
                    tracing::info!(cluster = %self.client.cluster, ?partitions, "audit partitions given by the group");
                    r.to_assign.extend(partitions);
                }
                return;
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => partitions,
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(cluster = %self.client.cluster, error = %code, "rebalance failed; giving up every audit partition");
                r.assigned.iter().copied().collect()
            }
        };
        let mut unassign = TopicPartitionList::new();
        for p in revoke {
            r.to_assign.remove(&p);
            if r.assigned.remove(&p) {
                unassign.add_partition(&self.topic, p);
            }
            r.revoked.insert(p);
        }
        if unassign.count() > 0 {
            tracing::info!(cluster = %self.client.cluster, partitions = ?r.revoked, "audit partitions taken away by the group");
            if let Err(e) = consumer.incremental_unassign(&unassign) {
                tracing::warn!(cluster = %self.client.cluster, error = %e, "cannot unassign revoked audit partitions");
            }
        }
    }
}

/// Allows one event per period and counts the ones suppressed in between.
#[derive(Debug)]
struct RateLimit {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last allowed event)` when an event may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.period => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Settings forced on every consumer after the user's overrides.
const FORCED_CONSUMER: [(&str, &str); 5] = [
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("isolation.level", "read_committed"),
    // Partitions a rebalance leaves in place keep being read, and the assignment of new
    // ones is completed by the consume loop (from the stored offsets), outside the
    // rebalance callback: both need the incremental protocol.
    ("partition.assignment.strategy", "cooperative-sticky"),
    // An out-of-range stored offset means Kafka deleted records never stored: re-reading
    // from the earliest is safe (ids deduplicate), skipping to the end would lose data.
    ("auto.offset.reset", "earliest"),
];

/// Settings forced on every dead-letter producer after the user's overrides.
const FORCED_PRODUCER: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

/// The cluster's configuration: `bootstrap` and `defaults`, then its `librdkafka`
/// properties, then `forced` (see [`chaperone_daemon_support::kafka`]).
fn client_config(
    client: &str,
    cluster: &ClusterConfig,
    forced: &[(&str, &str)],
    defaults: &[(&str, String)],
) -> ClientConfig {
    let mut base = vec![("bootstrap.servers", cluster.bootstrap.clone())];
    base.extend(defaults.iter().cloned());
    let forced: Vec<_> = forced.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    chaperone_daemon_support::kafka::client_config(
        client,
        &cluster.alias,
        &base,
        &[&cluster.librdkafka],
        &forced,
    )
}

/// One cluster being read.
struct Source {
    index: usize,
    config: ClusterConfig,
    consumer: StreamConsumer<AuditConsumerContext>,
    producer: FutureProducer<KafkaContext>,
    poison_log: RateLimit,
    rebalances: Arc<Mutex<Rebalances>>,
    /// Partitions whose writes were refused because another collector moved their stored
    /// offsets: read again from there if still assigned.
    resync: Mutex<BTreeSet<i32>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("alias", &self.config.alias)
            .finish_non_exhaustive()
    }
}

impl Source {
    fn new(
        index: usize,
        config: &ClusterConfig,
        ingest: &IngestConfig,
        metrics: &IngestMetrics,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let ctx = || KafkaContext {
            cluster: config.alias.clone(),
            errors: metrics.kafka_errors.with_label_values(&[&config.alias]),
            limiter: RateLimit::new(Duration::from_secs(10)),
        };
        let rebalances = Arc::new(Mutex::new(Rebalances::default()));
        let consumer: StreamConsumer<AuditConsumerContext> = client_config(
            "audit consumer",
            config,
            &FORCED_CONSUMER,
            &[
                (
                    "group.id",
                    format!(
                        "chaperone-collector-{}-{}",
                        config.alias, config.audit_topic
                    ),
                ),
                // Partitions added to the audit topic are read within this.
                (
                    "topic.metadata.refresh.interval.ms",
                    ingest.partition_refresh.as_millis().to_string(),
                ),
            ],
        )
        .create_with_context(AuditConsumerContext {
            client: ctx(),
            topic: config.audit_topic.clone(),
            rebalances: Arc::clone(&rebalances),
        })
        .with_context(|| format!("creating the consumer of cluster `{}`", config.alias))?;
        let producer: FutureProducer<KafkaContext> = client_config(
            "dead-letter producer",
            config,
            &FORCED_PRODUCER,
            &[(
                "message.timeout.ms",
                ingest.dlq_timeout.as_millis().to_string(),
            )],
        )
        .create_with_context(ctx())
        .with_context(|| {
            format!(
                "creating the dead-letter producer of cluster `{}`",
                config.alias
            )
        })?;
        consumer
            .subscribe(&[config.audit_topic.as_str()])
            .with_context(|| {
                format!(
                    "subscribing to the audit topic of cluster `{}`",
                    config.alias
                )
            })?;
        tracing::info!(
            cluster = %config.alias,
            audit_topic = %config.audit_topic,
            dlq_topic = %config.dlq_topic,
            forced_consumer = ?FORCED_CONSUMER,
            forced_producer = ?FORCED_PRODUCER,
            "kafka clients created"
        );
        Ok(Self {
            index,
            config: config.clone(),
            consumer,
            producer,
            poison_log: RateLimit::new(Duration::from_secs(10)),
            rebalances,
            resync: Mutex::new(BTreeSet::new()),
        })
    }
}

/// Why a record is not stored.
#[derive(Debug)]
struct Rejected {
    /// Short label: [`reason_label`] or [`data_error_label`].
    reason: &'static str,
    /// The full message.
    error: String,
}

/// Where a message was read, and its bytes as read (what a dead letter carries).
#[derive(Debug, Clone)]
struct Origin {
    source: usize,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// One message taken from an audit topic.
#[derive(Debug)]
struct Consumed {
    origin: Origin,
    record: Result<AuditRecord, Rejected>,
}

/// What a consume loop sends the writer, in the order it happened.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "nearly every event is a message; boxing them would allocate once per record"
)]
enum Event {
    /// A message read.
    Message(Consumed),
    /// The partition is read from `from`, the next offset stored in PostgreSQL: records of
    /// it before this event (from an earlier assignment) are not this writer's any more.
    Assigned {
        source: usize,
        partition: i32,
        from: i64,
    },
    /// The partition was taken away: records of it after this event are dropped.
    Revoked { source: usize, partition: i32 },
}

/// Why the dead-letter topic did not take a record, and whether sending it again can help.
#[derive(Debug)]
struct Refusal {
    permanent: bool,
    why: String,
}

/// Whether Kafka refused a dead letter for good: too large, no such topic, no ACL, or a record
/// or topic the broker will never take. Anything else (timeouts, a broker away, a leader
/// moving) may pass.
fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::UnknownTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRecord
                | C::PolicyViolation
                | C::InvalidMessage
        )
    )
}

/// A record on its way to the dead-letter topic.
#[derive(Debug)]
struct DeadLetter {
    origin: Origin,
    rejected: Rejected,
}

/// The partitions this collector reads, each with the next offset stored in PostgreSQL (what
/// its next write continues from), shared between the writer and the lag measurement.
type Stored = Arc<Mutex<HashMap<(usize, i32), i64>>>;

/// Runs ingest until `shutdown` is cancelled and everything consumed has been stored (or
/// the writer gave up after `shutdown_grace`, leaving the rest to be read again).
///
/// Fails only when the Kafka clients cannot be created.
pub async fn run(
    clusters: &[ClusterConfig],
    config: &IngestConfig,
    pool: PgPool,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    clock: Clock,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sources: Vec<Arc<Source>> = clusters
        .iter()
        .enumerate()
        .map(|(i, c)| Source::new(i, c, config, &metrics).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    // Parked records are rare and alerted on by their increase: every series starts at 0, so
    // that the first one counts.
    for reason in REJECTION_REASONS {
        metrics.records_parked.with_label_values(&[reason]);
    }
    let (tx, rx) = mpsc::channel::<Event>(config.queue_capacity);
    let stored: Stored = Arc::default();
    let consumers = tokio_util::task::TaskTracker::new();
    for source in &sources {
        consumers.spawn(reach::probe(
            Arc::clone(source),
            status.reach.clone(),
            clock.clone(),
            shutdown.clone(),
        ));
        consumers.spawn(refresh_loop(
            Arc::clone(source),
            Arc::clone(&stored),
            metrics.clone(),
            Arc::clone(&status),
            config.partition_refresh,
            shutdown.clone(),
        ));
        consumers.spawn(consume(
            Arc::clone(source),
            pool.clone(),
            tx.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    consumers.close();
    let writer = Writer {
        sources,
        pool,
        metrics,
        status,
        stored,
        config: config.clone(),
        shutdown,
        split_log: RateLimit::new(Duration::from_secs(10)),
    };
    writer.run(rx).await;
    consumers.wait().await;
    tracing::info!("ingest stopped");
    Ok(())
}

/// Publishes the ingest lag of the partitions this collector reads every `refresh`. Runs
/// beside [`consume`] so a slow broker answer never delays reading.
async fn refresh_loop(
    source: Arc<Source>,
    stored: Stored,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    refresh: Duration,
    shutdown: CancellationToken,
) {
    let alias = source.config.alias.clone();
    let mut ticker = tokio::time::interval(refresh);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = measure_lag(&source, &stored) => r,
        };
        match result {
            Ok((partitions, lag)) => {
                status.sources[source.index].store(true, Ordering::Relaxed);
                metrics
                    .partitions
                    .with_label_values(&[&alias])
                    .set(partitions as i64);
                metrics.lag_records.with_label_values(&[&alias]).set(lag);
                tracing::debug!(cluster = %alias, partitions, lag, took_ms = started.elapsed().as_millis() as u64, "ingest lag measured");
            }
            Err(e) => {
                tracing::warn!(cluster = %alias, error = %e, "cannot measure the ingest lag");
            }
        }
    }
}

/// How long one wait for a message lasts before it is started again. librdkafka only
/// signals a queue that goes from empty to non-empty, and a wake-up can be missed when
/// other events are served from the same queue; polling again periodically makes a missed
/// wake-up cost at most this much. Rebalances are acted on between waits.
const RECV_REPOLL: Duration = Duration::from_millis(250);

/// The channel to the writer is closed: the writer has stopped.
struct WriterGone;

async fn consume(
    source: Arc<Source>,
    pool: PgPool,
    tx: mpsc::Sender<Event>,
    metrics: IngestMetrics,
    shutdown: CancellationToken,
) {
    let alias = source.config.alias.clone();
    let error_log = RateLimit::new(Duration::from_secs(10));
    let store_log = RateLimit::new(Duration::from_secs(10));
    // The partitions read, each with the next offset accepted: a message from before it
    // (fetched from an earlier position) is dropped.
    let mut reading: HashMap<i32, i64> = HashMap::new();
    loop {
        let synced = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = sync_assignment(&source, &pool, &tx, &mut reading, &store_log) => r,
        };
        if synced.is_err() {
            break;
        }
        let msg = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout(RECV_REPOLL, source.consumer.recv()) => match r {
                Ok(m) => m,
                Err(_) => continue,
            },
        };
        let m = match msg {
            Ok(m) => m,
            Err(e) => {
                metrics.kafka_errors.with_label_values(&[&alias]).inc();
                if let Some(suppressed) = error_log.allow() {
                    tracing::warn!(cluster = %alias, error = %e, suppressed, "cannot read the audit topic");
                }
                continue;
            }
        };
        match reading.get_mut(&m.partition()) {
            Some(next) if m.offset() >= *next => *next = m.offset() + 1,
            _ => continue,
        }
        let consumed = decode(&source, &m);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            sent = tx.send(Event::Message(consumed)) => if sent.is_err() { break },
        }
    }
    // Partitions the group gave and the loop has not assigned yet keep the rebalance open,
    // and closing the consumer would wait for it forever: complete it (nothing more is read).
    let pending: Vec<i32> = {
        let mut r = source.rebalances.lock().unwrap_or_else(|p| p.into_inner());
        let pending = std::mem::take(&mut r.to_assign);
        r.assigned.extend(&pending);
        r.closing = true;
        pending.into_iter().collect()
    };
    if !pending.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for &p in &pending {
            tpl.add_partition(&source.config.audit_topic, p);
        }
        if let Err(e) = source.consumer.incremental_assign(&tpl) {
            tracing::debug!(cluster = %alias, error = %e, "cannot complete the last rebalance");
        }
    }
    tracing::debug!(cluster = %alias, "consumer stopped");
}

/// Acts on what the group changed since the last call: tells the writer about revoked
/// partitions, assigns new ones from their stored offsets, and reads again from the stored
/// offset the partitions whose writes another collector fenced off. What fails (PostgreSQL
/// unreachable) is tried again at the next call.
async fn sync_assignment(
    source: &Arc<Source>,
    pool: &PgPool,
    tx: &mpsc::Sender<Event>,
    reading: &mut HashMap<i32, i64>,
    store_log: &RateLimit,
) -> Result<(), WriterGone> {
    let (revoked, to_assign) = {
        let mut r = source.rebalances.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut r.revoked), r.to_assign.clone())
    };
    let resync: BTreeSet<i32> = {
        let mut r = source.resync.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *r)
    };
    for partition in revoked {
        reading.remove(&partition);
        tx.send(Event::Revoked {
            source: source.index,
            partition,
        })
        .await
        .map_err(|_| WriterGone)?;
    }
    let resync: Vec<i32> = resync
        .into_iter()
        .filter(|p| reading.contains_key(p))
        .collect();
    if to_assign.is_empty() && resync.is_empty() {
        return Ok(());
    }
    let alias = &source.config.alias;
    let topic = &source.config.audit_topic;
    let offsets = match store::load_offsets(pool, alias, topic).await {
        Ok(o) => o,
        Err(e) => {
            if let Some(suppressed) = store_log.allow() {
                tracing::warn!(cluster = %alias, error = %e, suppressed, "cannot read the stored offsets of audit partitions; retrying");
            }
            source
                .resync
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(resync);
            return Ok(());
        }
    };
    let from = |p: i32| offsets.get(&p).copied().unwrap_or(0);
    let mut started = Vec::new();
    if !to_assign.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for &p in &to_assign {
            let offset = offsets
                .get(&p)
                .map_or(Offset::Beginning, |&o| Offset::Offset(o));
            if let Err(e) = tpl.add_partition_offset(topic, p, offset) {
                tracing::warn!(cluster = %alias, partition = p, error = %e, "cannot assign an audit partition");
            }
        }
        match source.consumer.incremental_assign(&tpl) {
            Ok(()) => {
                let mut r = source.rebalances.lock().unwrap_or_else(|p| p.into_inner());
                for p in &to_assign {
                    r.to_assign.remove(p);
                    r.assigned.insert(*p);
                }
                started.extend(to_assign.iter().copied());
                tracing::info!(cluster = %alias, %topic, partitions = ?to_assign, stored_offsets = ?offsets, "reading audit partitions");
            }
            Err(e) => {
                tracing::warn!(cluster = %alias, error = %e, "cannot assign audit partitions; retrying");
            }
        }
    }
    for p in resync {
        let s = Arc::clone(source);
        let offset = from(p);
        let sought = tokio::task::spawn_blocking(move || {
            s.consumer.seek(
                &s.config.audit_topic,
                p,
                Offset::Offset(offset),
                METADATA_TIMEOUT,
            )
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match sought {
            Ok(()) => {
                tracing::info!(cluster = %alias, partition = p, offset, "reading an audit partition again from its stored offset");
                started.push(p);
            }
            Err(error) => {
                tracing::warn!(cluster = %alias, partition = p, %error, "cannot seek an audit partition; retrying");
                source
                    .resync
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(p);
            }
        }
    }
    for partition in started {
        reading.insert(partition, from(partition));
        tx.send(Event::Assigned {
            source: source.index,
            partition,
            from: from(partition),
        })
        .await
        .map_err(|_| WriterGone)?;
    }
    Ok(())
}

fn decode(source: &Source, m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
    // The bytes are kept with valid records too: the store may still refuse one (see
    // `Writer::store`), and its dead letter carries the record as read.
    let origin = Origin {
        source: source.index,
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
    };
    let record = match &origin.payload {
        None => Err(Rejected {
            reason: "empty",
            error: "record has no payload".to_owned(),
        }),
        Some(p) => AuditRecord::decode(p).map_err(|e| {
            if let Some(suppressed) = source.poison_log.allow() {
                tracing::warn!(
                    cluster = %source.config.alias,
                    partition = m.partition(),
                    offset = m.offset(),
                    error = %e,
                    suppressed,
                    "invalid audit record sent to the dead-letter topic"
                );
            }
            Rejected {
                reason: reason_label(&e),
                error: e.to_string(),
            }
        }),
    };
    Consumed { origin, record }
}

/// The number of partitions this collector reads and their ingest lag in records: the high
/// watermark minus the next offset stored.
async fn measure_lag(source: &Arc<Source>, stored: &Stored) -> anyhow::Result<(usize, i64)> {
    let done: Vec<(i32, i64)> = {
        let stored = stored.lock().unwrap_or_else(|p| p.into_inner());
        stored
            .iter()
            .filter(|((s, _), _)| *s == source.index)
            .map(|(&(_, p), &next)| (p, next))
            .collect()
    };
    let n = done.len();
    let s = Arc::clone(source);
    let lag = tokio::task::spawn_blocking(move || {
        let mut lag = 0i64;
        for (p, next) in done {
            let (low, high) =
                s.consumer
                    .fetch_watermarks(&s.config.audit_topic, p, METADATA_TIMEOUT)?;
            lag += (high - next.max(low)).max(0);
        }
        Ok::<_, KafkaError>(lag)
    })
    .await??;
    Ok((n, lag))
}

/// Batches consumed records and makes each batch durable.
struct Writer {
    sources: Vec<Arc<Source>>,
    pool: PgPool,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    stored: Stored,
    config: IngestConfig,
    shutdown: CancellationToken,
    /// Limits the warnings about batches split to find records the store refuses.
    split_log: RateLimit,
}

/// A batch could not be made durable before the shutdown grace period ended.
#[derive(Debug)]
struct GaveUp;

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
    let code = match e {
        StoreError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
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
    async fn run(self, mut rx: mpsc::Receiver<Event>) {
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

    /// Waits before retrying; `Err` when shutting down for longer than the grace period.
    async fn backoff(
        &self,
        delay: &mut Backoff,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        if self.shutdown.is_cancelled() {
            let since = *shutdown_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.config.shutdown_grace {
                return Err(GaveUp);
            }
        }
        delay.wait().await;
        Ok(())
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
        self.dead_letter(rejected, &mut attempt.shutdown_since)
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
                    self.dead_letter(vec![letter], &mut attempt.shutdown_since)
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
        let mut delay = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut failures = 0u32;
        loop {
            let (owned_records, sources, offsets) = self.owned(records, origins, next);
            let e = match store::write_batch(&self.pool, &owned_records, &sources, &offsets).await {
                Ok(o) => {
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "batch stored after retries");
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
            failures += 1;
            if failures == 1 || failures.is_power_of_two() {
                let size = attempt.size;
                if e.is_transient() && attempt.started.elapsed() < Duration::from_secs(60) {
                    tracing::warn!(error = %e, attempt = failures, records = size, "cannot store the batch; retrying");
                } else {
                    tracing::error!(error = %e, attempt = failures, records = size, transient = e.is_transient(), "cannot store the batch; ingestion is paused until it succeeds");
                }
            }
            self.backoff(&mut delay, &mut attempt.shutdown_since)
                .await?;
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

    /// Sends `letters` to their dead-letter topics and waits until each one is acknowledged
    /// or parked. A letter the dead-letter topic refuses outright (too large, no such topic,
    /// no ACL) is parked in PostgreSQL at once, with why; one Kafka does not acknowledge
    /// within `dlq_timeout` (librdkafka retrying all along) is sent again with backoff, and
    /// parked once `dlq_park_after` has passed. So no record holds ingest up for longer.
    async fn dead_letter(
        &self,
        letters: Vec<DeadLetter>,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        let started = Instant::now();
        let mut delay = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut failures = 0u32;
        let mut pending = letters;
        while !pending.is_empty() {
            let failed = self.send_dead_letters(pending).await;
            if failed.is_empty() {
                break;
            }
            self.metrics
                .write_failures
                .with_label_values(&["dlq"])
                .inc();
            let give_up = started.elapsed() >= self.config.dlq_park_after;
            pending = Vec::new();
            for (letter, refusal) in failed {
                if refusal.permanent || give_up {
                    self.park(&letter, &refusal.why, shutdown_since).await?;
                } else {
                    pending.push(letter);
                }
            }
            if !pending.is_empty() {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(
                        records = pending.len(),
                        attempt = failures,
                        park_after = ?self.config.dlq_park_after,
                        "dead-letter topic did not acknowledge; retrying until they are parked"
                    );
                }
                self.backoff(&mut delay, shutdown_since).await?;
            }
        }
        Ok(())
    }

    /// Parks a dead letter the dead-letter topic did not take, retrying while PostgreSQL
    /// cannot be written.
    async fn park(
        &self,
        letter: &DeadLetter,
        dlq_error: &str,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        let DeadLetter {
            origin: o,
            rejected: r,
        } = letter;
        let source = &self.sources[o.source];
        // Messages quote what they found, which may hold a NUL `text` cannot store.
        let error = r.error.replace('\0', "\\0");
        let dlq_error = dlq_error.replace('\0', "\\0");
        let parked = store::ParkedRecord {
            cluster: &source.config.alias,
            topic: &source.config.audit_topic,
            partition: o.partition,
            offset: o.offset,
            reason: r.reason,
            error: &error,
            dlq_error: &dlq_error,
            key: o.key.as_deref(),
            payload: o.payload.as_deref(),
        };
        let mut delay = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut failures = 0u32;
        loop {
            match store::park(&self.pool, &parked).await {
                Ok(()) => break,
                Err(e) => {
                    self.metrics
                        .write_failures
                        .with_label_values(&["postgres"])
                        .inc();
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, attempt = failures, "cannot park a dead letter; retrying");
                    }
                    self.backoff(&mut delay, shutdown_since).await?;
                }
            }
        }
        tracing::error!(
            cluster = %source.config.alias,
            partition = o.partition,
            offset = o.offset,
            reason = r.reason,
            dlq_topic = %source.config.dlq_topic,
            dlq_error = %dlq_error,
            "the dead-letter topic did not take a rejected audit record; parked it in PostgreSQL (ingest_parked)"
        );
        self.metrics
            .records_parked
            .with_label_values(&[r.reason])
            .inc();
        Ok(())
    }

    /// Sends dead letters and waits for their acknowledgement; returns those not
    /// acknowledged, each with why. Counts the acknowledged ones by reason.
    async fn send_dead_letters(&self, letters: Vec<DeadLetter>) -> Vec<(DeadLetter, Refusal)> {
        let mut inflight: Vec<(DeliveryFuture, DeadLetter)> = Vec::with_capacity(letters.len());
        let mut failed = Vec::new();
        for letter in letters {
            loop {
                let sent = {
                    let DeadLetter {
                        origin: o,
                        rejected: r,
                    } = &letter;
                    let source = &self.sources[o.source];
                    let from = format!(
                        "{}/{}/{}/{}",
                        source.config.alias, source.config.audit_topic, o.partition, o.offset
                    );
                    let headers = OwnedHeaders::new()
                        .insert(Header {
                            key: DLQ_REASON_HEADER,
                            value: Some(r.reason),
                        })
                        .insert(Header {
                            key: DLQ_ERROR_HEADER,
                            value: Some(&r.error),
                        })
                        .insert(Header {
                            key: DLQ_SOURCE_HEADER,
                            value: Some(&from),
                        });
                    let mut rec: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(&source.config.dlq_topic).headers(headers);
                    if let Some(k) = &o.key {
                        rec = rec.key(k.as_slice());
                    }
                    if let Some(pl) = &o.payload {
                        rec = rec.payload(pl.as_slice());
                    }
                    source.producer.send_result(rec).map_err(|(e, _)| e)
                };
                match sent {
                    Ok(f) => {
                        inflight.push((f, letter));
                        break;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        // librdkafka's queue is full: give the in-flight records time to go.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => {
                        let refusal = Refusal {
                            permanent: true,
                            why: format!("not accepted by the producer: {e}"),
                        };
                        failed.push((letter, refusal));
                        break;
                    }
                }
            }
        }
        for (fut, letter) in inflight {
            match fut.await {
                Ok(Ok(_)) => {
                    self.metrics
                        .records_rejected
                        .with_label_values(&[letter.rejected.reason])
                        .inc();
                }
                Ok(Err((e, _))) => {
                    let refusal = Refusal {
                        permanent: refused_for_good(&e),
                        why: format!("not acknowledged: {e}"),
                    };
                    failed.push((letter, refusal));
                }
                Err(_) => failed.push((
                    letter,
                    Refusal {
                        permanent: false,
                        why: "the producer was dropped".to_owned(),
                    },
                )),
            }
        }
        failed
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

    #[test]
    fn every_rejection_label_is_listed() {
        let decode = [
            DecodeError::TooLarge(0),
            DecodeError::NoVersion,
            DecodeError::NulCharacter { field: "host" },
            DecodeError::Histogram(chaperone_audit::histogram::HistogramError::TooLarge(0)),
        ];
        for e in &decode {
            assert!(REJECTION_REASONS.contains(&reason_label(e)), "{e}");
        }
        for code in ["22003", "22021", "22P05", "22001", "23514", "54000"] {
            let label = store::classify_code_label(code);
            assert!(REJECTION_REASONS.contains(&label), "{code}");
        }
    }

    #[test]
    fn only_data_exceptions_are_data_errors() {
        assert_eq!(
            data_error_label(&StoreError::Database(sqlx::Error::PoolClosed)),
            None
        );
        assert_eq!(
            reason_label(&DecodeError::NulCharacter { field: "host" }),
            "nul_character"
        );
    }
}
