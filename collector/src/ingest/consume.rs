//! Reading one cluster's audit topic: the Kafka clients of a source (the consumer and the
//! dead-letter producer, with the settings forced on them), the group's assignment taken
//! from the offsets stored in PostgreSQL, the consume loop that hands decoded messages to
//! the writer, and the probes beside it (ingest lag, the cluster's reachability).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaperone_daemon_support::Clock;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{ClusterConfig, IngestConfig};
use super::decode::{Consumed, decode};
use super::rate_limit::RateLimit;
use super::reach::{PROBE_INTERVAL, PROBE_TIMEOUT, Reach};
use super::status::IngestStatus;
use crate::job::{First, Pace, Periodic};
use crate::metrics::IngestMetrics;
use crate::store;

/// Timeout of the blocking metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka callbacks: count and log client errors (never blocking).
#[derive(Debug)]
pub(super) struct KafkaContext {
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
pub(super) struct AuditConsumerContext {
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
pub(super) struct Source {
    pub(super) index: usize,
    pub(super) config: ClusterConfig,
    pub(super) consumer: StreamConsumer<AuditConsumerContext>,
    pub(super) producer: FutureProducer<KafkaContext>,
    pub(super) poison_log: RateLimit,
    rebalances: Arc<Mutex<Rebalances>>,
    /// Partitions whose writes were refused because another collector moved their stored
    /// offsets: read again from there if still assigned.
    pub(super) resync: Mutex<BTreeSet<i32>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("alias", &self.config.alias)
            .finish_non_exhaustive()
    }
}

impl Source {
    pub(super) fn new(
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

/// What a consume loop sends the writer, in the order it happened.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "nearly every event is a message; boxing them would allocate once per record"
)]
pub(super) enum Event {
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

/// The partitions this collector reads, each with the next offset stored in PostgreSQL (what
/// its next write continues from), shared between the writer and the lag measurement.
pub(super) type Stored = Arc<Mutex<HashMap<(usize, i32), i64>>>;

/// Publishes the ingest lag of the partitions this collector reads every `refresh`. Runs
/// beside [`consume`] so a slow broker answer never delays reading.
pub(super) async fn refresh_loop(
    source: Arc<Source>,
    stored: Stored,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    refresh: Duration,
    shutdown: CancellationToken,
) {
    let alias = &source.config.alias;
    let job = Periodic {
        failed: None,
        abandoned: "ingest lag measurement abandoned at shutdown",
        pace: Pace::Every(refresh),
        first: First::Now,
        finish_within: None,
        runs: None,
    };
    let (source, stored, metrics, status) = (&source, &stored, &metrics, &status);
    job.run(&shutdown, move || async move {
        let started = Instant::now();
        match measure_lag(source, stored).await {
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
        Ok::<_, Infallible>(())
    })
    .await;
}

/// Probes `source` every [`PROBE_INTERVAL`] until `shutdown`, recording the answers in `reach`.
pub(super) async fn probe(
    source: Arc<Source>,
    reach: Reach,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let alias = &source.config.alias;
    let job = Periodic {
        failed: None,
        abandoned: "reachability probe abandoned at shutdown",
        pace: Pace::Every(PROBE_INTERVAL),
        first: First::Now,
        // The probe's metadata request ends by itself within PROBE_TIMEOUT: let it.
        finish_within: Some(PROBE_TIMEOUT),
        runs: None,
    };
    let (source, reach, clock) = (&source, &reach, &clock);
    job.run(&shutdown, move || async move {
        let s = Arc::clone(source);
        let answer = tokio::task::spawn_blocking(move || {
            let topic = &s.config.audit_topic;
            let metadata = s
                .consumer
                .fetch_metadata(Some(topic), PROBE_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| format!("the audit topic {topic} is not in the metadata"))?;
            if let Some(e) = t.error() {
                return Err(format!("the audit topic {topic}: {e:?}"));
            }
            match t.partitions().iter().find(|p| p.leader() < 0) {
                Some(p) => Err(format!("partition {} of {topic} has no leader", p.id())),
                None if t.partitions().is_empty() => Err(format!("{topic} has no partitions")),
                None => Ok(()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let was = reach.reachable(alias);
        match answer {
            Ok(()) => {
                reach.answered(alias, clock.now());
                if was == Some(false) {
                    tracing::info!(cluster = %alias, "cluster reachable again: its observers' silence counts from now");
                }
            }
            Err(error) => {
                reach.lost(alias);
                if was != Some(false) {
                    tracing::warn!(cluster = %alias, %error, "cluster unreachable: the silence of observers reporting through it does not count until it answers again");
                }
            }
        }
        Ok::<_, Infallible>(())
    })
    .await;
}

/// How long one wait for a message lasts before it is started again. librdkafka only
/// signals a queue that goes from empty to non-empty, and a wake-up can be missed when
/// other events are served from the same queue; polling again periodically makes a missed
/// wake-up cost at most this much. Rebalances are acted on between waits.
const RECV_REPOLL: Duration = Duration::from_millis(250);

/// The channel to the writer is closed: the writer has stopped.
struct WriterGone;

pub(super) async fn consume(
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
    // (fetched from an earlier position) is dropped, unless the partition's log now ends
    // before it (see `log_restarted`).
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
            Some(next) => {
                if !log_restarted(&source, m.partition(), *next).await {
                    continue;
                }
                tracing::error!(
                    cluster = %alias,
                    topic = %source.config.audit_topic,
                    partition = m.partition(),
                    stored_offset = *next,
                    offset = m.offset(),
                    "the audit partition's log ends before the offset stored for it (the topic was deleted and created again, or the cluster rebuilt): reading it from its start; what was stored before is recognised by its ids"
                );
                *next = m.offset() + 1;
            }
            None => continue,
        }
        let consumed = decode(source.index, &source.config.alias, &source.poison_log, &m);
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

/// Whether the log of an audit partition now ends before `stored`, the next offset stored for
/// it: then librdkafka's `auto.offset.reset` took the consumer back to the start of a log
/// that restarted (a topic deleted and created again, a cluster rebuilt), and its records are
/// new. Otherwise a message below `stored` is one fetched before a seek, already stored.
async fn log_restarted(source: &Arc<Source>, partition: i32, stored: i64) -> bool {
    let s = Arc::clone(source);
    let high = tokio::task::spawn_blocking(move || {
        s.consumer
            .fetch_watermarks(&s.config.audit_topic, partition, METADATA_TIMEOUT)
            .map(|(_, high)| high)
    })
    .await;
    matches!(high, Ok(Ok(high)) if high < stored)
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
