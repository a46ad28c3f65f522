//! Where an audited consumer's records go: the audit topic, through a producer that either
//! waits for each record's acknowledgement (at-least-once mode) or writes the records and
//! the consumed offsets in one Kafka transaction (transactional mode).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext,
    PurgeConfig,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

use crate::spool::EncodedRecord;

/// Records the outcome of each audit record sent, by its index in the batch.
#[derive(Debug, Default)]
pub struct Acks {
    delivered: Mutex<Vec<usize>>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        if result.is_ok() {
            self.delivered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(index);
        }
    }
}

/// Sends `records` (keyed by their logical topic) and waits up to `timeout` for their
/// acknowledgements; returns the ones not acknowledged, in order.
pub fn send_acked(
    producer: &BaseProducer<Acks>,
    audit_topic: &str,
    records: Vec<EncodedRecord>,
    timeout: Duration,
) -> Vec<EncodedRecord> {
    if records.is_empty() {
        return records;
    }
    let deadline = Instant::now() + timeout;
    producer
        .context()
        .delivered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    for (i, r) in records.iter().enumerate() {
        let mut record = BaseRecord::with_opaque_to(audit_topic, i)
            .key(r.topic.as_str())
            .payload(r.bytes.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, "audit record not enqueued");
                    break;
                }
            }
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if let Err(e) = producer.flush(left) {
        tracing::warn!(error = %e, "audit records not all acknowledged in time");
    }
    let delivered = std::mem::take(
        &mut *producer
            .context()
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut ok = vec![false; records.len()];
    for i in delivered {
        if let Some(o) = ok.get_mut(i) {
            *o = true;
        }
    }
    records
        .into_iter()
        .zip(ok)
        .filter_map(|(r, ok)| (!ok).then_some(r))
        .collect()
}

/// How a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Aborted (or never committed): nothing of it is visible.
    #[error("audit transaction aborted while {action}: {source}")]
    Aborted {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: KafkaError,
    },
    /// The producer cannot go on (fenced by a newer instance with the same transactional id,
    /// for example).
    #[error("audit transaction failed fatally while {action}: {source}")]
    Fatal {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: KafkaError,
    },
}

/// Aborts the open transaction. librdkafka's abort waits until every outstanding record is
/// reported, and a `BaseProducer` reports them only when polled (its `commit_transaction`
/// polls, its `abort_transaction` does not): what is queued or in flight is purged and the
/// reports served first, or the abort times out ("the event queue must be polled") on every
/// attempt.
fn abort(producer: &BaseProducer<DefaultProducerContext>, timeout: Duration) -> KafkaResult<()> {
    producer.purge(PurgeConfig::default().queue().inflight());
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
    producer.abort_transaction(Timeout::After(
        deadline.saturating_duration_since(Instant::now()),
    ))
}

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.is_fatal())
}

/// Runs one transaction: the records, then the consumed offsets, then the commit. On a
/// failure that is not fatal the transaction is aborted.
pub fn commit_transaction(
    producer: &BaseProducer<DefaultProducerContext>,
    abort_pending: &mut bool,
    audit_topic: &str,
    records: &[EncodedRecord],
    offsets: &TopicPartitionList,
    group: Option<&ConsumerGroupMetadata>,
    timeout: Duration,
) -> Result<(), TxnError> {
    // An abort that did not finish in time is resumed (librdkafka refuses anything else
    // until it has).
    if *abort_pending {
        match abort(producer, timeout) {
            Ok(()) => *abort_pending = false,
            Err(e) if is_fatal(&e) => {
                return Err(TxnError::Fatal {
                    action: "aborting",
                    source: e,
                });
            }
            Err(e) => {
                return Err(TxnError::Aborted {
                    action: "aborting",
                    source: e,
                });
            }
        }
    }
    let aborted_ok = std::cell::Cell::new(true);
    let fail = |action: &'static str, source: KafkaError| {
        if is_fatal(&source) {
            return TxnError::Fatal { action, source };
        }
        if let Err(e) = abort(producer, timeout) {
            if is_fatal(&e) {
                return TxnError::Fatal {
                    action: "aborting",
                    source: e,
                };
            }
            aborted_ok.set(false);
            tracing::warn!(error = %e, "aborting the audit transaction failed: resumed on the next flush");
        }
        TxnError::Aborted { action, source }
    };
    let result = (|| -> Result<(), TxnError> {
        producer.begin_transaction().map_err(|e| {
            if is_fatal(&e) {
                TxnError::Fatal {
                    action: "beginning",
                    source: e,
                }
            } else {
                TxnError::Aborted {
                    action: "beginning",
                    source: e,
                }
            }
        })?;
        let deadline = Instant::now() + timeout;
        for r in records {
            let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(audit_topic)
                .key(r.topic.as_str())
                .payload(r.bytes.as_slice());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(fail("producing", e)),
                }
            }
        }
        if offsets.count() > 0 {
            let Some(group) = group else {
                return Err(fail(
                    "adding offsets",
                    KafkaError::ConsumerCommit(RDKafkaErrorCode::State),
                ));
            };
            producer
                .send_offsets_to_transaction(offsets, group, Timeout::After(timeout))
                .map_err(|e| fail("adding offsets", e))?;
        }
        producer
            .commit_transaction(Timeout::After(timeout))
            .map_err(|e| fail("committing", e))
    })();
    if !aborted_ok.get() {
        *abort_pending = true;
    }
    result
}

/// librdkafka properties that only mean something to a consumer: left out of the audit
/// producer's configuration (taken from the consumer's) so librdkafka does not warn about
/// them.
pub const CONSUMER_ONLY_PROPERTIES: [&str; 22] = [
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.queue.backoff.ms",
];

/// The consumer's properties less the consumer-only ones, as the base of the audit producer's.
pub fn producer_base(consumer: &ClientConfig) -> ClientConfig {
    let mut cc = consumer.clone();
    for k in CONSUMER_ONLY_PROPERTIES {
        cc.remove(k);
    }
    let extra: Vec<String> = cc
        .config_map()
        .keys()
        .filter(|k| k.starts_with("fetch.") || k.starts_with("consume."))
        .map(|k| k.to_string())
        .collect();
    for k in extra {
        cc.remove(&k);
    }
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_producer_does_not_inherit_consumer_properties() {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", "b:1")
            .set("group.id", "g")
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", "1000")
            .set("security.protocol", "SSL");
        let p = producer_base(&cc);
        assert_eq!(p.get("bootstrap.servers"), Some("b:1"));
        assert_eq!(p.get("security.protocol"), Some("SSL"));
        for k in ["group.id", "enable.auto.commit", "fetch.message.max.bytes"] {
            assert_eq!(p.get(k), None, "{k}");
        }
    }
}
