//! Consuming audit topics into the store, exactly once.
//!
//! One consumer task per configured cluster reads every partition of the cluster's audit
//! topic by manual assignment (no consumer group), starting from the offsets stored in
//! PostgreSQL, and validates each record with the contract's strict decoder. A single writer
//! task batches what the consumers queue (size + linger) and makes each batch durable:
//! first the rejected records are acknowledged by the dead-letter topic, then one SQL
//! transaction applies the valid records and stores the next offsets
//! ([`crate::store::write_batch`]). A failed write keeps the batch and retries with capped
//! backoff; the bounded queue then fills and the consumers wait, so nothing is lost and
//! nothing is skipped. Offsets only move in PostgreSQL, together with their effects.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, DecodeError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, IngestConfig};
use crate::metrics::IngestMetrics;
use crate::store::{self, ConsumedOffset};

/// Header of a dead-letter record holding the short rejection reason (the metric label).
pub const DLQ_REASON_HEADER: &str = "chaperone-dlq-reason";
/// Header of a dead-letter record holding the full validation error.
pub const DLQ_ERROR_HEADER: &str = "chaperone-dlq-error";
/// Header of a dead-letter record naming where it was read: `<cluster>/<topic>/<partition>/<offset>`.
pub const DLQ_SOURCE_HEADER: &str = "chaperone-dlq-source";

/// Timeout of the blocking metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
        DecodeError::Inconsistent { .. } => "inconsistent",
        DecodeError::Histogram(_) => "histogram",
        _ => "other",
    }
}

/// Shared view of the ingest pipeline's health, read by `/readyz`.
#[derive(Debug)]
pub struct IngestStatus {
    sources: Vec<AtomicBool>,
    store_ok: AtomicBool,
}

impl IngestStatus {
    /// Status for `clusters` sources, none ready yet.
    pub fn new(clusters: usize) -> Self {
        Self {
            sources: (0..clusters).map(|_| AtomicBool::new(false)).collect(),
            store_ok: AtomicBool::new(true),
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
        if let Some(suppressed) = self.limiter.allow() {
            tracing::warn!(cluster = %self.cluster, %error, reason, suppressed, "kafka client error");
        }
    }
}

impl ConsumerContext for KafkaContext {}

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
const FORCED_CONSUMER: [(&str, &str); 4] = [
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("isolation.level", "read_committed"),
    // An out-of-range stored offset means Kafka deleted records never stored: re-reading
    // from the earliest is safe (ids deduplicate), skipping to the end would lose data.
    ("auto.offset.reset", "earliest"),
];

/// Settings forced on every dead-letter producer after the user's overrides.
const FORCED_PRODUCER: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

fn client_config(
    cluster: &ClusterConfig,
    forced: &[(&str, &str)],
    extra: &[(&str, String)],
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &cluster.bootstrap);
    for (k, v) in &cluster.librdkafka {
        cfg.set(k, v);
    }
    for (k, v) in extra {
        if !cluster.librdkafka.contains_key(*k) {
            cfg.set(*k, v);
        }
    }
    for (k, v) in forced {
        if let Some(user) = cluster.librdkafka.get(*k).filter(|u| u.as_str() != *v) {
            tracing::warn!(cluster = %cluster.alias, key = k, configured = %user, forced = v,
                "overriding a librdkafka setting the collector's guarantees rely on");
        }
        cfg.set(*k, *v);
    }
    cfg
}

/// One cluster being read.
struct Source {
    index: usize,
    config: ClusterConfig,
    consumer: StreamConsumer<KafkaContext>,
    producer: FutureProducer<KafkaContext>,
    poison_log: RateLimit,
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
        let consumer: StreamConsumer<KafkaContext> = client_config(
            config,
            &FORCED_CONSUMER,
            &[("group.id", format!("chaperone-collector-{}", config.alias))],
        )
        .create_with_context(ctx())
        .with_context(|| format!("creating the consumer of cluster `{}`", config.alias))?;
        let producer: FutureProducer<KafkaContext> = client_config(
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
        })
    }
}

/// A record that failed validation, as read.
#[derive(Debug)]
struct Rejected {
    reason: &'static str,
    error: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// One message taken from an audit topic.
#[derive(Debug)]
struct Consumed {
    source: usize,
    partition: i32,
    offset: i64,
    record: Result<AuditRecord, Rejected>,
}

/// Next offsets made durable, shared between the writer and the lag measurement.
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
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sources: Vec<Arc<Source>> = clusters
        .iter()
        .enumerate()
        .map(|(i, c)| Source::new(i, c, config, &metrics).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let stored: Stored = Arc::default();
    let consumers = tokio_util::task::TaskTracker::new();
    for source in &sources {
        consumers.spawn(refresh_loop(
            Arc::clone(source),
            pool.clone(),
            Arc::clone(&stored),
            metrics.clone(),
            Arc::clone(&status),
            config.partition_refresh,
            shutdown.clone(),
        ));
        consumers.spawn(consume(
            Arc::clone(source),
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
    };
    writer.run(rx).await;
    consumers.wait().await;
    tracing::info!("ingest stopped");
    Ok(())
}

/// Lists the audit topic's partitions every `refresh`, assigns new ones and publishes the
/// lag. Runs beside [`consume`] so a slow broker answer never delays reading.
async fn refresh_loop(
    source: Arc<Source>,
    pool: PgPool,
    stored: Stored,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    refresh: Duration,
    shutdown: CancellationToken,
) {
    let alias = source.config.alias.clone();
    let mut assigned: BTreeMap<i32, i64> = BTreeMap::new();
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
            r = refresh_partitions(&source, &pool, &mut assigned, &stored) => r,
        };
        match result {
            Ok(lag) => {
                status.sources[source.index].store(true, Ordering::Relaxed);
                metrics
                    .partitions
                    .with_label_values(&[&alias])
                    .set(assigned.len() as i64);
                metrics.lag_records.with_label_values(&[&alias]).set(lag);
                tracing::debug!(cluster = %alias, lag, took_ms = started.elapsed().as_millis() as u64, "audit partitions refreshed");
            }
            Err(e) => {
                tracing::warn!(cluster = %alias, error = %e, "cannot refresh the audit topic's partitions");
            }
        }
    }
}

/// How long one wait for a message lasts before it is started again. librdkafka only
/// signals a queue that goes from empty to non-empty, and a wake-up can be missed when
/// other events are served from the same queue; polling again periodically makes a missed
/// wake-up cost at most this much.
const RECV_REPOLL: Duration = Duration::from_millis(250);

async fn consume(
    source: Arc<Source>,
    tx: mpsc::Sender<Consumed>,
    metrics: IngestMetrics,
    shutdown: CancellationToken,
) {
    let alias = source.config.alias.clone();
    let error_log = RateLimit::new(Duration::from_secs(10));
    loop {
        let msg = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout(RECV_REPOLL, source.consumer.recv()) => match r {
                Ok(m) => m,
                Err(_) => continue,
            },
        };
        let consumed = match msg {
            Ok(m) => decode(&source, &m),
            Err(e) => {
                metrics.kafka_errors.with_label_values(&[&alias]).inc();
                if let Some(suppressed) = error_log.allow() {
                    tracing::warn!(cluster = %alias, error = %e, suppressed, "cannot read the audit topic");
                }
                continue;
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            sent = tx.send(consumed) => if sent.is_err() { break },
        }
    }
    tracing::debug!(cluster = %alias, "consumer stopped");
}

fn decode(source: &Source, m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
    let record = match m.payload() {
        None => Err(Rejected {
            reason: "empty",
            error: "record has no payload".to_owned(),
            key: m.key().map(<[u8]>::to_vec),
            payload: None,
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
                key: m.key().map(<[u8]>::to_vec),
                payload: Some(p.to_vec()),
            }
        }),
    };
    Consumed {
        source: source.index,
        partition: m.partition(),
        offset: m.offset(),
        record,
    }
}

/// Assigns partitions of the audit topic not read yet, from their stored offsets, and
/// returns the ingest lag in records.
async fn refresh_partitions(
    source: &Arc<Source>,
    pool: &PgPool,
    assigned: &mut BTreeMap<i32, i64>,
    stored: &Stored,
) -> anyhow::Result<i64> {
    let topic = source.config.audit_topic.clone();
    let s = Arc::clone(source);
    let partitions: Vec<i32> = tokio::task::spawn_blocking(move || {
        let md = s.consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
        let parts = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect::<Vec<_>>();
        Ok::<_, KafkaError>(parts)
    })
    .await??;
    let new: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| !assigned.contains_key(p))
        .collect();
    if !new.is_empty() {
        let offsets =
            store::load_offsets(pool, &source.config.alias, &source.config.audit_topic).await?;
        let mut tpl = TopicPartitionList::new();
        for &p in &new {
            let offset = match offsets.get(&p) {
                Some(&o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&source.config.audit_topic, p, offset)?;
        }
        source.consumer.incremental_assign(&tpl)?;
        for &p in &new {
            assigned.insert(p, offsets.get(&p).copied().unwrap_or(0));
        }
        tracing::info!(
            cluster = %source.config.alias,
            topic = %source.config.audit_topic,
            partitions = ?new,
            stored_offsets = ?offsets,
            "reading audit partitions"
        );
    }
    // Lag: high watermark minus the next offset made durable (or the offset we started at).
    let done: Vec<(i32, i64)> = {
        let stored = stored.lock().unwrap_or_else(|p| p.into_inner());
        assigned
            .iter()
            .map(|(&p, &start)| (p, stored.get(&(source.index, p)).copied().unwrap_or(start)))
            .collect()
    };
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
    Ok(lag)
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
}

/// A batch could not be made durable before the shutdown grace period ended.
#[derive(Debug)]
struct GaveUp;

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Consumed>) {
        let mut batch = Vec::with_capacity(self.config.batch_size);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let deadline = tokio::time::Instant::now() + self.config.linger;
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(c)) => batch.push(c),
                    Ok(None) | Err(_) => break,
                }
            }
            if self.commit(std::mem::take(&mut batch)).await.is_err() {
                tracing::warn!(
                    "shutdown grace period over with a batch not stored; it will be read again at the next start"
                );
                return;
            }
        }
    }

    /// Waits before retrying; `Err` when shutting down for longer than the grace period.
    async fn backoff(
        &self,
        delay: &mut Duration,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        if self.shutdown.is_cancelled() {
            let since = *shutdown_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.config.shutdown_grace {
                return Err(GaveUp);
            }
        }
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(self.config.retry_max);
        Ok(())
    }

    async fn commit(&self, batch: Vec<Consumed>) -> Result<(), GaveUp> {
        let started = Instant::now();
        let size = batch.len();
        let mut records = Vec::with_capacity(size);
        let mut rejected: Vec<(usize, i32, i64, Rejected)> = Vec::new();
        let mut next: BTreeMap<(usize, i32), i64> = BTreeMap::new();
        for c in batch {
            let n = next.entry((c.source, c.partition)).or_insert(c.offset + 1);
            *n = (*n).max(c.offset + 1);
            match c.record {
                Ok(r) => records.push(r),
                Err(r) => rejected.push((c.source, c.partition, c.offset, r)),
            }
        }
        let offsets: Vec<ConsumedOffset> = next
            .iter()
            .map(|(&(s, p), &o)| ConsumedOffset {
                cluster: self.sources[s].config.alias.clone(),
                topic: self.sources[s].config.audit_topic.clone(),
                partition: p,
                next_offset: o,
            })
            .collect();

        let mut delay = self.config.retry_min;
        let mut shutdown_since = None;
        let mut failures = 0u32;
        // 1. Dead letters first: their offsets are stored with the batch below.
        let mut pending = rejected;
        while !pending.is_empty() {
            pending = self.send_dead_letters(pending).await;
            if !pending.is_empty() {
                self.metrics
                    .write_failures
                    .with_label_values(&["dlq"])
                    .inc();
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(
                        records = pending.len(),
                        attempt = failures,
                        "dead-letter topic did not acknowledge; retrying"
                    );
                }
                self.backoff(&mut delay, &mut shutdown_since).await?;
            }
        }
        // 2. One transaction: records, counts, progress and offsets.
        let mut delay = self.config.retry_min;
        let mut failures = 0u32;
        let outcome = loop {
            match store::write_batch(&self.pool, &records, &offsets).await {
                Ok(o) => break o,
                Err(e) => {
                    self.status.store_ok.store(false, Ordering::Relaxed);
                    self.metrics
                        .write_failures
                        .with_label_values(&["postgres"])
                        .inc();
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        if e.is_transient() && started.elapsed() < Duration::from_secs(60) {
                            tracing::warn!(error = %e, attempt = failures, records = size, "cannot store the batch; retrying");
                        } else {
                            tracing::error!(error = %e, attempt = failures, records = size, transient = e.is_transient(), "cannot store the batch; ingestion is paused until it succeeds");
                        }
                    }
                    self.backoff(&mut delay, &mut shutdown_since).await?;
                }
            }
        };
        if failures > 0 {
            tracing::info!(attempts = failures + 1, "batch stored after retries");
        }
        self.status.store_ok.store(true, Ordering::Relaxed);
        {
            let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
            for (k, o) in &next {
                stored.insert(*k, *o);
            }
        }
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
        m.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Sends dead letters and waits for their acknowledgement; returns those not
    /// acknowledged. Counts the acknowledged ones by reason.
    async fn send_dead_letters(
        &self,
        rejected: Vec<(usize, i32, i64, Rejected)>,
    ) -> Vec<(usize, i32, i64, Rejected)> {
        let mut inflight: Vec<(DeliveryFuture, (usize, i32, i64, Rejected))> =
            Vec::with_capacity(rejected.len());
        let mut failed = Vec::new();
        for item in rejected {
            loop {
                let sent = {
                    let (s, p, o, r) = &item;
                    let source = &self.sources[*s];
                    let origin = format!(
                        "{}/{}/{}/{}",
                        source.config.alias, source.config.audit_topic, p, o
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
                            value: Some(&origin),
                        });
                    let mut rec: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(&source.config.dlq_topic).headers(headers);
                    if let Some(k) = &r.key {
                        rec = rec.key(k.as_slice());
                    }
                    if let Some(pl) = &r.payload {
                        rec = rec.payload(pl.as_slice());
                    }
                    source.producer.send_result(rec).map_err(|(e, _)| e)
                };
                match sent {
                    Ok(f) => {
                        inflight.push((f, item));
                        break;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        // librdkafka's queue is full: give the in-flight records time to go.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot enqueue a dead-letter record");
                        failed.push(item);
                        break;
                    }
                }
            }
        }
        for (fut, item) in inflight {
            match fut.await {
                Ok(Ok(_)) => {
                    self.metrics
                        .records_rejected
                        .with_label_values(&[item.3.reason])
                        .inc();
                }
                Ok(Err((e, _))) => {
                    tracing::debug!(error = %e, "dead-letter record not acknowledged");
                    failed.push(item);
                }
                Err(_) => failed.push(item),
            }
        }
        failed
    }
}
