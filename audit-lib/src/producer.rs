//! [`AuditedProducer`]: rdkafka's `FutureProducer` API, counting what Kafka acknowledged.
//!
//! Adopting it is a one-line change: build it from the same [`ClientConfig`] (every
//! librdkafka property passes through unchanged) and call [`AuditedProducer::send`] /
//! [`AuditedProducer::send_result`] with the same [`FutureRecord`]s. Each record's timestamp
//! is its event time: the one the caller set, or now when none was set (and the record is
//! stamped with it). A message is counted only when its delivery report says Kafka accepted
//! it, under the partition Kafka acknowledged; failed deliveries are counted separately. The
//! counting happens in the delivery callback, so it does not depend on the caller awaiting
//! the returned future.
//!
//! Like `FutureProducer`, it runs librdkafka on a `ThreadedProducer` with its own polling
//! thread; the delivery callback completes a tokio oneshot per message.
//!
//! The watermark of its progress records comes from [`ProducerWatermarks`]: the messages in
//! flight and how far its event times trail its clock (see [`crate::watermark`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage, Timestamp, ToBytes};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureRecord, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::AuditConfig;
use crate::metrics::AuditMetrics;
use crate::record::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use crate::reporter::{AuditError, Clock, Reporter, SystemClock};
use crate::tracker::Tracker;
use crate::watermark::ProducerWatermarks;

/// Per-message state carried through librdkafka to the delivery callback.
#[derive(Debug)]
pub struct Pending {
    event_ms: i64,
    tx: Option<oneshot::Sender<OwnedDeliveryResult>>,
}

/// The librdkafka context of an [`AuditedProducer`]: counts acknowledged deliveries.
#[derive(Debug)]
pub struct AuditContext {
    tracker: Arc<Tracker>,
    watermarks: Arc<ProducerWatermarks>,
    metrics: AuditMetrics,
    clock: Arc<dyn Clock>,
    acked: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for AuditContext {}

impl ProducerContext for AuditContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let now = self.clock.now_ms();
        let event_ms = pending.event_ms;
        let owned = match result {
            Ok(m) => {
                let bytes = m.payload_len() as u64;
                let timed = (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&event_ms);
                if timed {
                    self.tracker
                        .record(m.topic(), Some(m.partition()), event_ms, bytes, now);
                } else {
                    // An event time the audit contract cannot carry: counted as untimed.
                    self.tracker
                        .record_untimed(m.topic(), Some(m.partition()), bytes, now, false);
                }
                self.acked.fetch_add(1, Ordering::Relaxed);
                self.watermarks
                    .acknowledged(m.topic(), event_ms, now, timed);
                Ok(Delivery {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp(),
                })
            }
            Err((e, m)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.delivery_failures.inc();
                self.watermarks.not_delivered(m.topic(), event_ms);
                Err((e.clone(), m.detach()))
            }
        };
        if let Some(tx) = pending.tx {
            let _ = tx.send(owned);
        }
    }
}

/// The future returned by [`AuditedProducer::send_result`]: resolves with the delivery
/// result, or `Err(Canceled)` if the producer went away first. The message is counted
/// whether or not this future is awaited.
#[derive(Debug)]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<OwnedDeliveryResult>,
}

/// The producer was dropped before the delivery report arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the producer was dropped before the delivery report arrived")]
pub struct Canceled;

impl Future for DeliveryFuture {
    type Output = Result<OwnedDeliveryResult, Canceled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map_err(|_| Canceled)
    }
}

/// Delivery totals of an [`AuditedProducer`] since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryStats {
    /// Messages acknowledged by Kafka (and counted).
    pub acked: u64,
    /// Messages whose delivery failed.
    pub failed: u64,
}

/// A `FutureProducer` look-alike that counts acknowledged messages and reports the counts
/// to the audit topic. See the module documentation.
pub struct AuditedProducer {
    producer: ThreadedProducer<AuditContext>,
    reporter: Option<Reporter>,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for AuditedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditedProducer")
            .field("stats", &self.stats())
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl AuditedProducer {
    /// Creates the producer from `kafka` (any librdkafka property) and starts its reporter
    /// on the current tokio runtime, registering metrics in `registry`.
    ///
    /// Must be called from within a tokio runtime.
    pub fn new(
        kafka: &ClientConfig,
        audit: AuditConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, AuditError> {
        let metrics = AuditMetrics::new(registry)?;
        Self::with_parts(
            kafka,
            audit,
            metrics,
            Arc::new(SystemClock),
            &CancellationToken::new(),
        )
    }

    /// Like [`AuditedProducer::new`] with injected metrics and clock; the reporter also stops
    /// (after a final flush) when `shutdown` is cancelled.
    pub fn with_parts(
        kafka: &ClientConfig,
        audit: AuditConfig,
        metrics: AuditMetrics,
        clock: Arc<dyn Clock>,
        shutdown: &CancellationToken,
    ) -> Result<Self, AuditError> {
        audit.validate()?;
        let width = audit.width()?;
        let tracker = Arc::new(Tracker::new(width, audit.max_open_cells));
        let watermarks = Arc::new(ProducerWatermarks::new(width));
        let context = AuditContext {
            tracker: Arc::clone(&tracker),
            watermarks: Arc::clone(&watermarks),
            metrics: metrics.clone(),
            clock: Arc::clone(&clock),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        };
        let producer: ThreadedProducer<AuditContext> = kafka.create_with_context(context)?;
        let reporter =
            Reporter::start_with(&audit, tracker, kafka, metrics, clock, watermarks, shutdown)?;
        Ok(Self {
            producer,
            reporter: Some(reporter),
            shutdown_timeout: audit.shutdown_timeout,
        })
    }

    fn context(&self) -> &AuditContext {
        self.producer.context()
    }

    fn prepare<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
        tx: oneshot::Sender<OwnedDeliveryResult>,
    ) -> BaseRecord<'a, K, P, Box<Pending>>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let event_ms = record
            .timestamp
            .unwrap_or_else(|| self.context().clock.now_ms());
        self.context().watermarks.sent(record.topic, event_ms);
        BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: Some(event_ms),
            headers: record.headers,
            delivery_opaque: Box::new(Pending {
                event_ms,
                tx: Some(tx),
            }),
        }
    }

    /// Given up enqueueing: undo the in-flight mark and count a failed delivery.
    fn abandon(&self, topic: &str, event_ms: i64) {
        let ctx = self.context();
        ctx.watermarks.not_delivered(topic, event_ms);
        ctx.failed.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.delivery_failures.inc();
    }

    /// Sends a message and waits for its delivery report, like `FutureProducer::send`:
    /// while librdkafka's queue is full it retries for up to `queue_timeout`.
    pub async fn send<K, P, T>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: T,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
        T: Into<Timeout>,
    {
        let start = Instant::now();
        let queue_timeout = queue_timeout.into();
        let can_retry = || match queue_timeout {
            Timeout::Never => true,
            Timeout::After(t) => start.elapsed() < t,
        };
        let (tx, rx) = oneshot::channel();
        let mut base = self.prepare(record, tx);
        loop {
            match self.producer.send(base) {
                Ok(()) => {
                    return match rx.await {
                        Ok(r) => r,
                        Err(_) => Err((
                            KafkaError::Canceled,
                            OwnedMessage::new(
                                None,
                                None,
                                String::new(),
                                Timestamp::NotAvailable,
                                -1,
                                -1,
                                None,
                            ),
                        )),
                    };
                }
                Err((e, b))
                    if e == KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                        && can_retry() =>
                {
                    base = b;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((e, b)) => {
                    self.abandon(b.topic, b.delivery_opaque.event_ms);
                    let owned = OwnedMessage::new(
                        b.payload.map(|p| p.to_bytes().to_vec()),
                        b.key.map(|k| k.to_bytes().to_vec()),
                        b.topic.to_owned(),
                        b.timestamp
                            .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
                        b.partition.unwrap_or(-1),
                        0,
                        b.headers,
                    );
                    return Err((e, owned));
                }
            }
        }
    }

    /// Enqueues a message without waiting, like `FutureProducer::send_result`. The message is
    /// counted when Kafka acknowledges it even if the returned future is dropped.
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let had_timestamp = record.timestamp;
        let (tx, rx) = oneshot::channel();
        let base = self.prepare(record, tx);
        match self.producer.send(base) {
            Ok(()) => Ok(DeliveryFuture { rx }),
            Err((e, b)) => {
                // Not enqueued: the caller gets the record back (to retry, typically), so
                // this is not a failed delivery.
                self.context()
                    .watermarks
                    .not_delivered(b.topic, b.delivery_opaque.event_ms);
                Err((
                    e,
                    FutureRecord {
                        topic: b.topic,
                        partition: b.partition,
                        payload: b.payload,
                        key: b.key,
                        timestamp: had_timestamp,
                        headers: b.headers,
                    },
                ))
            }
        }
    }

    /// Waits until every enqueued message has been delivered or has failed.
    pub fn flush<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        self.producer.flush(timeout)
    }

    /// Messages enqueued but not yet delivered.
    pub fn in_flight_count(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// The underlying librdkafka producer (for metadata, transactions, ...).
    pub fn inner(&self) -> &ThreadedProducer<AuditContext> {
        &self.producer
    }

    /// The tracker counting acknowledged messages.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.context().tracker
    }

    /// Acknowledged and failed deliveries since start.
    pub fn stats(&self) -> DeliveryStats {
        let ctx = self.context();
        DeliveryStats {
            acked: ctx.acked.load(Ordering::Relaxed),
            failed: ctx.failed.load(Ordering::Relaxed),
        }
    }

    /// Audit records currently held in the spool (not yet acknowledged by Kafka).
    pub fn spooled(&self) -> usize {
        self.reporter.as_ref().map_or(0, Reporter::spooled)
    }

    /// Flushes the producer (so every message is acknowledged and counted), then stops the
    /// reporter after a final flush of the counts to the audit topic. Counts that cannot be
    /// delivered within `shutdown_timeout` stay in the spool for the next start; when all
    /// were delivered, the last progress records are final (see [`Reporter::shutdown`]).
    pub async fn shutdown(mut self) -> DeliveryStats {
        let producer = self.producer.clone();
        let timeout = self.shutdown_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!(
                "producer flush on shutdown did not complete: unacknowledged messages are not counted"
            );
        }
        if let Some(reporter) = self.reporter.take() {
            reporter.shutdown().await;
        }
        self.stats()
    }
}

impl Drop for AuditedProducer {
    /// Without [`AuditedProducer::shutdown`]: waits (blocking, at most 5 s) for in-flight
    /// deliveries, writes the remaining counts to the spool (fsync'd; the next start sends
    /// them) and stops the reporter.
    fn drop(&mut self) {
        let Some(reporter) = self.reporter.take() else {
            return;
        };
        if self.producer.in_flight_count() > 0 {
            let _ = self
                .producer
                .flush(self.shutdown_timeout.min(Duration::from_secs(5)));
        }
        match reporter.core().spool_now() {
            Ok(n) if n > 0 => tracing::info!(
                records = n,
                "audit counts spooled on drop: the next start sends them"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "audit counts lost on drop: spool write failed"),
        }
        reporter.cancel();
    }
}
