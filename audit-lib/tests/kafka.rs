//! AuditedProducer and Reporter against the real regional Kafka of the dev stack.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chaperone_audit::{AuditRecord, AuditedProducer, BucketWidth, Reporter, Tracker};
use common::{
    audit_config, client, create_topic, read_audit_messages, read_audit_topic, regional_bootstrap,
    spool_file_ids, sum_counts, temp_dir, unique,
};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_topic_sums_equal_acknowledged_counts() -> anyhow::Result<()> {
    let topic = unique("audited");
    let audit_topic = unique("audit");
    create_topic(&topic, 3).await?;
    create_topic(&audit_topic, 2).await?;
    let spool = temp_dir("audit-spool");
    let registry = prometheus::Registry::new();
    let mut kafka = client(&regional_bootstrap());
    kafka
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    let producer =
        AuditedProducer::new(&kafka, audit_config(&audit_topic, spool.clone()), &registry)?;

    // Event times over exactly four one-minute buckets, ending at the last millisecond of the
    // previous minute (ending at now, a run in the first second of a minute would touch five).
    let width = BucketWidth::default();
    let end = width.start_of(chrono::Utc::now().timestamp_millis()) - 1;
    let payload = vec![b'x'; 64];
    let mut futures = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let key = (i % 97).to_string();
        let event = end - ((i % 4) as i64) * 60_000 - (i % 1_000) as i64;
        let mut record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .timestamp(event);
        let f = loop {
            match producer.send_result(record) {
                Ok(f) => break f,
                Err((e, r)) => {
                    // Queue full: wait for deliveries, like FutureProducer::send would.
                    anyhow::ensure!(
                        e == rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        ),
                        "send_result failed: {e}"
                    );
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        futures.push((event, f));
    }
    let mut expected: BTreeMap<(String, Option<i32>, i64), u64> = BTreeMap::new();
    let mut acked = 0u64;
    for (event, f) in futures {
        let delivery = f.await?.map_err(|(e, _)| e)?;
        acked += 1;
        *expected
            .entry((
                topic.clone(),
                Some(delivery.partition),
                width.start_of(event),
            ))
            .or_insert(0) += 1;
    }
    assert_eq!(acked, MESSAGES as u64);
    let stats = producer.shutdown().await;
    assert_eq!((stats.acked, stats.failed), (MESSAGES as u64, 0));

    let records = read_audit_topic(&audit_topic)?;
    let (sums, duplicates) = sum_counts(&records)?;
    assert_eq!(
        sums, expected,
        "audit sums per topic/partition/bucket equal the acked counts"
    );
    assert_eq!(duplicates, 0, "no record id appears twice");
    assert_eq!(expected.len(), 12, "3 partitions x 4 buckets");

    // Each record carries the configured identity, and every partition has progress.
    let mut progressed = HashSet::new();
    for r in &records {
        assert_eq!(r.observer().tier.as_str(), "producer");
        if let AuditRecord::Progress(p) = r {
            assert_eq!(p.physical_topic, topic);
            assert!(p.watermark_ms <= p.emitted_at_ms);
            progressed.insert(p.partition);
        }
        if let AuditRecord::Counts(c) = r {
            assert_eq!(
                c.latency.len(),
                c.count,
                "every timed message has a latency"
            );
            assert_eq!(c.bytes, c.count * 64);
        }
    }
    // Every partition, and the topic as a whole (announced before its first counts).
    assert_eq!(progressed, HashSet::from([None, Some(0), Some(1), Some(2)]));

    let text = metric(&registry, "chaperone_audit_messages_tracked_total");
    assert_eq!(text, Some(MESSAGES as f64));
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

fn metric(registry: &prometheus::Registry, name: &str) -> Option<f64> {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().map(|m| m.get_counter().get_value()))
}

/// Records that could not reach Kafka stay in the spool; the next process sends them with
/// their original ids, keyed by their topic like any other record (the spool file holds only
/// the records: the key is read back from them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_records_are_sent_by_the_next_process_with_their_ids() -> anyhow::Result<()> {
    let audit_topic = unique("audit");
    create_topic(&audit_topic, 1).await?;
    let spool = temp_dir("audit-spool");
    let width = BucketWidth::default();
    let now = chrono::Utc::now().timestamp_millis();

    // First process: Kafka unreachable, short delivery timeout.
    {
        let tracker = Arc::new(Tracker::new(width, 100));
        // Counted before the reporter starts, so its first flush drains them all at once.
        for i in 0..1_000 {
            tracker.record("orders", Some(i % 2), now - 1_000, 10, now);
        }
        tracker.record("orders", Some(5), now - 120_000, 10, now);
        let mut config = audit_config(&audit_topic, spool.clone());
        config.delivery_timeout = Duration::from_secs(1);
        config.shutdown_timeout = Duration::from_secs(3);
        let unreachable = client("127.0.0.1:1");
        let reporter = Reporter::start(
            &config,
            Arc::clone(&tracker),
            &unreachable,
            &prometheus::Registry::new(),
            &CancellationToken::new(),
        )?;
        reporter.shutdown().await;
    }
    let spooled_ids = spool_file_ids(&spool)?;
    assert_eq!(
        spooled_ids.len(),
        3,
        "one counts record per cell is spooled"
    );

    // Second process: Kafka reachable; it adopts the spool and sends the records.
    let tracker = Arc::new(Tracker::new(width, 100));
    let reporter = Reporter::start(
        &audit_config(&audit_topic, spool.clone()),
        tracker,
        &client(&regional_bootstrap()),
        &prometheus::Registry::new(),
        &CancellationToken::new(),
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reporter.spooled() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "spool not emptied in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reporter.shutdown().await;

    let messages = read_audit_messages(&audit_topic)?;
    for m in &messages {
        assert_eq!(
            m.key.as_deref(),
            Some("orders"),
            "re-sent records are keyed"
        );
    }
    let records: Vec<AuditRecord> = messages.into_iter().map(|m| m.record).collect();
    let sent_ids: HashSet<String> = records
        .iter()
        .filter(|r| matches!(r, AuditRecord::Counts(_)))
        .map(|r| r.id().to_owned())
        .collect();
    assert_eq!(
        sent_ids, spooled_ids,
        "the records arrive with the ids they were spooled with"
    );
    let (sums, _) = sum_counts(&records)?;
    let total: u64 = sums.values().sum();
    assert_eq!(total, 1_001);
    assert!(
        spool_file_ids(&spool)?.is_empty(),
        "nothing is left in the spool"
    );
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

/// Dropping the producer without `shutdown()` loses nothing: the counts are written to the
/// spool on drop and the reporter delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_without_shutdown_loses_no_counts() -> anyhow::Result<()> {
    let topic = unique("dropped");
    let audit_topic = unique("audit");
    create_topic(&topic, 1).await?;
    create_topic(&audit_topic, 1).await?;
    let spool = temp_dir("audit-spool");
    let mut config = audit_config(&audit_topic, spool.clone());
    // No periodic flush happens during the test: only the drop path can deliver the counts.
    config.flush_interval = Duration::from_secs(3_600);
    let producer = AuditedProducer::new(
        &client(&regional_bootstrap()),
        config,
        &prometheus::Registry::new(),
    )?;
    let payload = b"payload".to_vec();
    for _ in 0..100 {
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    drop(producer);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let records = read_audit_topic(&audit_topic)?;
        let (sums, _) = sum_counts(&records)?;
        let total: u64 = sums.values().sum();
        if total == 100 {
            break;
        }
        assert!(total < 100, "more counted than sent: {total}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of 100 counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}
