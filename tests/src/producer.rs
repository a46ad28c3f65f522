//! Audited producers as the end-to-end tests run them.

use std::path::PathBuf;
use std::time::Duration;

use chaperone_audit::{AuditConfig, AuditedProducer, DeliveryStats};
use chaperone_test_support::{regional_bootstrap, unique};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureRecord;

/// A client of the regional cluster as the tests' producers use one (5 ms linger).
pub fn regional_client() -> ClientConfig {
    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", regional_bootstrap())
        .set("linger.ms", "5");
    kafka
}

/// An [`AuditedProducer`] reporting to `audit_topic` in 10 s buckets flushed every second,
/// spooling into a directory of its own that goes with it.
#[derive(Debug)]
pub struct TestProducer {
    producer: AuditedProducer,
    spool: PathBuf,
}

impl TestProducer {
    /// A producer made of `kafka`, its metrics registered on `registry`.
    pub fn new(
        kafka: &ClientConfig,
        audit_topic: &str,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let spool = std::env::temp_dir().join(unique("e2e-spool"));
        let audit = AuditConfig {
            topic: audit_topic.to_owned(),
            flush_interval: Duration::from_secs(1),
            bucket_width: Duration::from_secs(10),
            spool_dir: spool.clone(),
            ..AuditConfig::default()
        };
        let producer = AuditedProducer::new(kafka, audit, registry)?;
        Ok(Self { producer, spool })
    }

    /// Sends messages `{"n":i}` keyed `i`, for `i` in `0..n`, to each of `topics` in turn;
    /// with `unsent` as `Some((topic, m))`, counts `m` more messages of `topic` (over its
    /// partitions 0 to 2) as acknowledged without sending them: a loss between the producer and
    /// Kafka. Returns once every message sent is acknowledged.
    pub async fn send_numbered(
        &self,
        topics: &[&str],
        n: usize,
        unsent: Option<(&str, usize)>,
    ) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(topics.len() * n);
        for i in 0..n {
            for topic in topics {
                let payload = format!("{{\"n\":{i}}}");
                let key = i.to_string();
                let record = FutureRecord::to(topic).key(&key).payload(&payload);
                pending.push(self.producer.send_result(record).map_err(|(e, _)| e)?);
            }
        }
        if let Some((topic, m)) = unsent {
            let now = chrono::Utc::now().timestamp_millis();
            for i in 0..m {
                self.producer
                    .tracker()
                    .record(topic, Some((i % 3) as i32), now, 10, now);
            }
        }
        for delivery in pending {
            delivery.await?.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Flushes the last counts to the audit topic, stops and removes the spool.
    pub async fn shutdown(self) -> DeliveryStats {
        let stats = self.producer.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.spool);
        stats
    }
}
