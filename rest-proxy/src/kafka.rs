//! The proxy's one Kafka producer and its view of cluster metadata.
//!
//! [`Producer`] is audit-lib's [`AuditedProducer`] (a bare librdkafka producer only when the
//! audit is disabled for a benchmark), built with `acks=all`, idempotence and
//! `message.timeout.ms = produce_timeout` forced after the user's properties. [`Metadata`]
//! caches the cluster's topics and brokers, refreshed when older than `metadata_max_age` or
//! when a produce names a topic it does not know.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chaperone_audit::AuditedProducer;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use crate::config::Config;

/// The librdkafka properties of the proxy's producer: the user's, then the forced ones.
pub fn producer_config(config: &Config) -> ClientConfig {
    let timeout_ms = config.produce_timeout.as_millis().to_string();
    chaperone_daemon_support::kafka::client_config(
        "producer",
        &config.audit.cluster,
        &[
            ("bootstrap.servers", config.bootstrap_servers.clone()),
            ("linger.ms", "5".to_owned()),
            ("client.id", "chaperone-rest-proxy".to_owned()),
        ],
        &[&config.kafka],
        &[
            ("acks", "all".to_owned()),
            ("enable.idempotence", "true".to_owned()),
            ("message.timeout.ms", timeout_ms),
        ],
    )
}

/// One record to produce, already decoded from its request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutRecord {
    /// Partition asked for, or none (the partitioner decides by key).
    pub partition: Option<i32>,
    /// Key bytes, or none.
    pub key: Option<Vec<u8>>,
    /// Value bytes, or none (a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in order; a header's value may be null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// CreateTime in epoch milliseconds; none means now.
    pub timestamp_ms: Option<i64>,
}

impl OutRecord {
    /// Key and value bytes, the size the in-flight bound and metrics count.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Where Kafka stored an acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition Kafka acknowledged.
    pub partition: i32,
    /// Offset in it.
    pub offset: i64,
    /// The record's timestamp as stored, when known.
    pub timestamp_ms: Option<i64>,
}

/// Why a record was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Confluent's code: 50003 when a retry may succeed, 40101/40301 when Kafka refused the
    /// proxy's credentials or rights, 50002 otherwise.
    pub code: u32,
    /// A description safe to show to the caller: librdkafka's name of the error code, never
    /// an address or an internal message.
    pub message: String,
}

impl Refused {
    fn from_kafka(e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(code) => Self {
                message: describe(code),
                code: match code {
                    C::SaslAuthenticationFailed | C::Authentication => 40101,
                    C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => 40301,
                    c if is_retriable(c) => 50003,
                    _ => 50002,
                },
            },
            None => Self::interrupted("the record's delivery was interrupted"),
        }
    }

    fn interrupted(message: &str) -> Self {
        Self {
            code: 50003,
            message: message.to_owned(),
        }
    }
}

/// librdkafka's description of `code` ("Broker: Message size too large"), without the name
/// of the enum variant its `Display` puts first.
fn describe(code: RDKafkaErrorCode) -> String {
    let s = code.to_string();
    match s.split_once(" (") {
        Some((_, d)) => d.strip_suffix(')').unwrap_or(d).to_owned(),
        None => s,
    }
}

/// Errors after which a new attempt may succeed: timeouts, unavailable leaders or brokers,
/// full queues. Everything else (too large, authorization, invalid record...) is final.
pub fn is_retriable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut
            | C::QueueFull
            | C::RequestTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::ReplicaNotAvailable
            | C::KafkaStorageError
            | C::CoordinatorLoadInProgress
            | C::NotCoordinator
            | C::OutOfOrderSequenceNumber
            | C::UnknownTopicOrPartition
            | C::OperationTimedOut
            | C::Retry
            | C::PurgeQueue
            | C::PurgeInflight
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
            | C::OffsetNotAvailable
            | C::PreferredLeaderNotAvailable
            | C::ThrottlingQuotaExceeded
    )
}

/// A delivery report to wait for (a future resolving to the record's [`Ack`] or why it was
/// [`Refused`]).
pub enum Delivery {
    /// Enqueued on the audited producer.
    Audited(chaperone_audit::DeliveryFuture),
    /// Enqueued on the bare producer.
    Bare(rdkafka::producer::DeliveryFuture),
    /// Not enqueued (taken when the future resolves).
    Refused(Option<Refused>),
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Audited(d) => f.debug_tuple("Audited").field(d).finish(),
            Self::Bare(_) => f.write_str("Bare"),
            Self::Refused(r) => f.debug_tuple("Refused").field(r).finish(),
        }
    }
}

impl Future for Delivery {
    type Output = Result<Ack, Refused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Audited(f) => Pin::new(f).poll(cx).map(settle),
            Self::Bare(f) => Pin::new(f).poll(cx).map(settle),
            Self::Refused(r) => Poll::Ready(Err(r
                .take()
                .unwrap_or_else(|| Refused::interrupted("the record was not enqueued")))),
        }
    }
}

/// The proxy's producer: audited, or bare when the audit is disabled.
pub enum Producer {
    /// Every acknowledged record counted in the producer tier.
    Audited(AuditedProducer),
    /// Nothing counted (benchmarks only).
    Bare(FutureProducer),
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Audited(p) => f.debug_tuple("Audited").field(p).finish(),
            Self::Bare(_) => f.write_str("Bare"),
        }
    }
}

fn settle(r: Result<OwnedDeliveryResult, impl std::fmt::Debug>) -> Result<Ack, Refused> {
    match r {
        Ok(Ok(d)) => Ok(Ack {
            partition: d.partition,
            offset: d.offset,
            timestamp_ms: d.timestamp.to_millis(),
        }),
        Ok(Err((e, _))) => Err(Refused::from_kafka(&e)),
        Err(_) => Err(Refused::interrupted(
            "the proxy stopped before Kafka acknowledged the record",
        )),
    }
}

impl Producer {
    /// Creates the producer (inside a tokio runtime: the audit reporter starts on it).
    pub fn new(config: &Config, registry: &prometheus::Registry) -> anyhow::Result<Self> {
        let kafka = producer_config(config);
        if config.audit_disabled {
            tracing::warn!("audit disabled: records produced through this proxy are not counted");
            let p: FutureProducer = kafka.create().context("cannot create the kafka producer")?;
            return Ok(Self::Bare(p));
        }
        // With `audit.kafka` empty, the audit producer takes this producer's properties.
        let p = AuditedProducer::new(&kafka, config.audit.clone(), registry)
            .context("cannot create the audited kafka producer")?;
        Ok(Self::Audited(p))
    }

    /// Enqueues one record and returns its delivery report. While librdkafka's queue is full
    /// it retries until `deadline`; then the record is refused as retriable.
    pub async fn enqueue(&self, topic: &str, r: &OutRecord, deadline: Instant) -> Delivery {
        let headers = (!r.headers.is_empty()).then(|| {
            r.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: v.as_deref(),
                })
            })
        });
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            rec.partition = r.partition;
            rec.key = r.key.as_deref();
            rec.payload = r.value.as_deref();
            rec.timestamp = r.timestamp_ms;
            rec.headers = headers.clone();
            let sent = match self {
                Self::Audited(p) => p
                    .send_result(rec)
                    .map(Delivery::Audited)
                    .map_err(|(e, _)| e),
                Self::Bare(p) => p.send_result(rec).map(Delivery::Bare).map_err(|(e, _)| e),
            };
            match sent {
                Ok(d) => return d,
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Delivery::Refused(Some(Refused::from_kafka(&e))),
            }
        }
    }

    /// Reads cluster metadata (blocking; call from a blocking thread).
    fn fetch_metadata(&self, timeout: Duration) -> Result<Snapshot, KafkaError> {
        let md = match self {
            Self::Audited(p) => p.inner().client().fetch_metadata(None, timeout)?,
            Self::Bare(p) => p.client().fetch_metadata(None, timeout)?,
        };
        let mut brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
        brokers.sort_unstable();
        let mut topics = BTreeMap::new();
        for t in md.topics() {
            if t.error().is_some() {
                continue;
            }
            let mut parts: Vec<PartitionInfo> = t
                .partitions()
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id(),
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                    isr: p.isr().to_vec(),
                })
                .collect();
            parts.sort_by_key(|p| p.partition);
            topics.insert(t.name().to_owned(), parts);
        }
        Ok(Snapshot {
            fetched: Instant::now(),
            brokers,
            topics,
        })
    }

    /// Kafka's cluster id (blocking).
    fn fetch_cluster_id(&self, timeout: Duration) -> Option<String> {
        match self {
            Self::Audited(p) => p.inner().client().fetch_cluster_id(timeout),
            Self::Bare(p) => p.client().fetch_cluster_id(timeout),
        }
    }

    /// Flushes, then (audited) makes the audit library's last flushes.
    pub async fn shutdown(self) {
        match self {
            Self::Audited(p) => {
                let stats = p.shutdown().await;
                tracing::info!(
                    acked = stats.acked,
                    failed = stats.failed,
                    "producer stopped"
                );
            }
            Self::Bare(p) => {
                let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30))).await;
            }
        }
    }
}

/// One partition as metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition id.
    pub partition: i32,
    /// Leader broker id (-1 when none).
    pub leader: i32,
    /// Replica broker ids.
    pub replicas: Vec<i32>,
    /// In-sync replica broker ids.
    pub isr: Vec<i32>,
}

/// The cluster's topics and brokers at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    fetched: Instant,
    /// Broker ids, ascending.
    pub brokers: Vec<i32>,
    /// Topics and their partitions, by name.
    pub topics: BTreeMap<String, Vec<PartitionInfo>>,
}

/// Cached cluster metadata shared by every request.
#[derive(Debug)]
pub struct Metadata {
    producer: Arc<Producer>,
    admin: AdminClient<DefaultClientContext>,
    timeout: Duration,
    max_age: Duration,
    current: RwLock<Option<Arc<Snapshot>>>,
    refresh: tokio::sync::Mutex<()>,
}

/// Metadata could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read cluster metadata: {0}")]
pub struct MetadataError(String);

impl Metadata {
    /// Creates the cache over `producer`'s connections.
    pub fn new(producer: Arc<Producer>, config: &Config) -> anyhow::Result<Self> {
        let admin: AdminClient<DefaultClientContext> = producer_config(config)
            .create()
            .context("cannot create the kafka admin client")?;
        Ok(Self {
            producer,
            admin,
            timeout: config.metadata_timeout,
            max_age: config.metadata_max_age,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self) -> Option<Arc<Snapshot>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// A snapshot no older than `metadata_max_age`.
    pub async fn get(&self) -> Result<Arc<Snapshot>, MetadataError> {
        let fresh_after = Instant::now()
            .checked_sub(self.max_age)
            .unwrap_or_else(Instant::now);
        self.newer_than(fresh_after).await
    }

    /// A snapshot fetched at or after `after` (concurrent callers share one fetch).
    pub async fn newer_than(&self, after: Instant) -> Result<Arc<Snapshot>, MetadataError> {
        if let Some(s) = self.cached().filter(|s| s.fetched >= after) {
            return Ok(s);
        }
        let _guard = self.refresh.lock().await;
        if let Some(s) = self.cached().filter(|s| s.fetched >= after) {
            return Ok(s);
        }
        let producer = Arc::clone(&self.producer);
        let timeout = self.timeout;
        let snapshot = tokio::task::spawn_blocking(move || producer.fetch_metadata(timeout))
            .await
            .map_err(|e| MetadataError(e.to_string()))?
            .map_err(|e| MetadataError(e.to_string()))?;
        let snapshot = Arc::new(snapshot);
        if let Ok(mut c) = self.current.write() {
            *c = Some(Arc::clone(&snapshot));
        }
        Ok(snapshot)
    }

    /// The partitions of `topic`, refreshing the snapshot once when it does not know the
    /// topic; `None` when the topic does not exist.
    pub async fn topic(&self, topic: &str) -> Result<Option<Vec<PartitionInfo>>, MetadataError> {
        let asked = Instant::now();
        let s = self.get().await?;
        if let Some(p) = s.topics.get(topic) {
            return Ok(Some(p.clone()));
        }
        let s = self.newer_than(asked).await?;
        Ok(s.topics.get(topic).cloned())
    }

    /// Kafka's cluster id.
    pub async fn cluster_id(&self) -> Option<String> {
        let producer = Arc::clone(&self.producer);
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || producer.fetch_cluster_id(timeout))
            .await
            .ok()
            .flatten()
    }

    /// The topic's configuration (every entry with a value), as `GET /topics/{t}` shows it.
    pub async fn topic_configs(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<String, String>, MetadataError> {
        let opts = AdminOptions::new().request_timeout(Some(self.timeout));
        let res = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
            .map_err(|e| MetadataError(e.to_string()))?;
        let mut out = BTreeMap::new();
        for r in res {
            let r = r.map_err(|e| MetadataError(e.to_string()))?;
            for e in r.entries {
                if let Some(v) = e.value {
                    out.insert(e.name, v);
                }
            }
        }
        Ok(out)
    }
}
