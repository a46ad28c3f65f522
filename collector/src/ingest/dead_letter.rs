//! Dead letters: records ingest does not store go to their cluster's dead-letter topic, with
//! headers saying why and where they were read, and are acknowledged before the offsets past
//! them are stored. A dead letter the topic will not take is parked in PostgreSQL instead
//! (`ingest_parked`), so that no record holds ingest up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use sqlx::PgPool;

use super::consume::Source;
use super::decode::{Origin, Rejected};
use super::retry::{GaveUp, RetryPolicy};
use crate::metrics::IngestMetrics;
use crate::store;

/// Header of a dead-letter record holding the short rejection reason (the metric label).
pub const DLQ_REASON_HEADER: &str = "chaperone-dlq-reason";
/// Header of a dead-letter record holding the full validation error.
pub const DLQ_ERROR_HEADER: &str = "chaperone-dlq-error";
/// Header of a dead-letter record naming where it was read: `<cluster>/<topic>/<partition>/<offset>`.
pub const DLQ_SOURCE_HEADER: &str = "chaperone-dlq-source";

/// Why the dead-letter topic did not take a record, and whether sending it again can help.
#[derive(Debug)]
struct Refusal {
    permanent: bool,
    why: String,
}

/// Whether Kafka refused a dead letter for good: too large, no ACL, or a record or topic the
/// broker will never take (a topic that does not exist is [`DeadLetters::missing_for_good`]). Anything else (timeouts, a broker away, a leader
/// moving) may pass.
fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
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
pub(super) struct DeadLetter {
    pub(super) origin: Origin,
    pub(super) rejected: Rejected,
}

/// Sends dead letters and parks those the dead-letter topic does not take.
#[derive(Debug)]
pub(super) struct DeadLetters {
    pub(super) sources: Vec<Arc<Source>>,
    pub(super) pool: PgPool,
    pub(super) metrics: IngestMetrics,
    pub(super) retry: RetryPolicy,
    /// How long a dead letter is sent again before it is parked (`ingest.dlq_park_after`).
    pub(super) park_after: Duration,
    /// Per source: since when its dead-letter topic has been reported missing, until a dead
    /// letter reaches it.
    pub(super) missing_since: Mutex<HashMap<usize, Instant>>,
}

/// Whether Kafka says the topic does not exist (librdkafka after waiting for it to appear in
/// the metadata, or the broker).
fn unknown_topic(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
    )
}

impl DeadLetters {
    /// Whether a dead letter of `source` that Kafka refused with `e` is refused for good. A
    /// topic that does not exist may be being created (auto-creation, an operator answering
    /// the alert), so the first letter that finds it missing is sent again for
    /// `dlq_park_after`; once it has been missing that long, later letters are parked at
    /// once, until one reaches it.
    fn refused(&self, source: usize, e: &KafkaError, otherwise: bool) -> bool {
        if !unknown_topic(e) {
            return otherwise;
        }
        let mut missing = self.missing_since.lock().unwrap_or_else(|p| p.into_inner());
        missing.entry(source).or_insert_with(Instant::now).elapsed() >= self.park_after
    }

    /// Sends `letters` to their dead-letter topics and waits until each one is acknowledged
    /// or parked. A letter the dead-letter topic refuses outright (too large, no ACL, a topic
    /// missing for `dlq_park_after` already) is parked in PostgreSQL at once, with why; one Kafka does not acknowledge
    /// within `dlq_timeout` (librdkafka retrying all along) is sent again with backoff, and
    /// parked once `dlq_park_after` has passed. So no record holds ingest up for longer.
    pub(super) async fn send(
        &self,
        letters: Vec<DeadLetter>,
        shutdown_since: &mut Option<Instant>,
    ) -> Result<(), GaveUp> {
        let started = Instant::now();
        let mut retry = self.retry.start();
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
            let give_up = started.elapsed() >= self.park_after;
            pending = Vec::new();
            for (letter, refusal) in failed {
                if refusal.permanent || give_up {
                    self.park(&letter, &refusal.why, shutdown_since).await?;
                } else {
                    pending.push(letter);
                }
            }
            if !pending.is_empty() {
                if let Some(attempt) = retry.failed() {
                    tracing::warn!(
                        records = pending.len(),
                        attempt,
                        park_after = ?self.park_after,
                        "dead-letter topic did not acknowledge; retrying until they are parked"
                    );
                }
                retry.wait(shutdown_since).await?;
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
        let mut retry = self.retry.start();
        loop {
            match store::park(&self.pool, &parked).await {
                Ok(()) => break,
                Err(e) => {
                    self.metrics
                        .write_failures
                        .with_label_values(&["postgres"])
                        .inc();
                    if let Some(attempt) = retry.failed() {
                        tracing::warn!(error = %e, attempt, "cannot park a dead letter; retrying");
                    }
                    retry.wait(shutdown_since).await?;
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
                            permanent: self.refused(letter.origin.source, &e, true),
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
                    self.missing_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&letter.origin.source);
                    self.metrics
                        .records_rejected
                        .with_label_values(&[letter.rejected.reason])
                        .inc();
                }
                Ok(Err((e, _))) => {
                    let refusal = Refusal {
                        permanent: self.refused(letter.origin.source, &e, refused_for_good(&e)),
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
