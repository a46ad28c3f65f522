//! Progress records against the real regional Kafka of the dev stack: how audit records are
//! keyed and ordered, how far the watermark promises, and the final records of a clean
//! shutdown.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chaperone_audit::{AuditRecord, AuditedProducer, BucketWidth, Progress, Reporter, Tracker};
use common::{
    AuditMessage, audit_config, client, create_topic, read_audit_messages, regional_bootstrap,
    spool_file_ids, sum_counts, temp_dir, unique,
};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

fn progress(m: &AuditMessage) -> Option<&Progress> {
    match &m.record {
        AuditRecord::Progress(p) => Some(p),
        AuditRecord::Counts(_) => None,
    }
}

/// Every record is keyed by its logical topic, so one topic's records share a partition of a
/// multi-partition audit topic, and the counts of a flush are stored before its progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_topic_share_a_partition_and_counts_precede_their_progress()
-> anyhow::Result<()> {
    let topics: Vec<String> = (0..3).map(|_| unique("keyed")).collect();
    for t in &topics {
        create_topic(t, 2).await?;
    }
    let audit_topic = unique("audit-keyed");
    create_topic(&audit_topic, 6).await?;
    let spool = temp_dir("audit-spool");
    let mut config = audit_config(&audit_topic, spool.clone());
    config.flush_interval = Duration::from_millis(200);
    let producer = AuditedProducer::new(
        &client(&regional_bootstrap()),
        config,
        &prometheus::Registry::new(),
    )?;
    // Traffic over a dozen flushes: unkeyed records of one topic would be spread over the
    // audit topic's partitions.
    for _ in 0..15 {
        for t in &topics {
            for _ in 0..4 {
                producer
                    .send(
                        FutureRecord::<(), _>::to(t).payload("v"),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = producer.shutdown().await;
    assert_eq!(stats.acked, 15 * 3 * 4);

    let messages = read_audit_messages(&audit_topic)?;
    let mut partitions: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
    for m in &messages {
        assert_eq!(
            m.key.as_deref(),
            Some(m.record.topic()),
            "keyed by logical topic"
        );
        partitions
            .entry(m.record.topic())
            .or_default()
            .insert(m.partition);
    }
    assert_eq!(
        partitions.len(),
        3,
        "records of every topic: {partitions:?}"
    );
    for (topic, on) in &partitions {
        assert_eq!(on.len(), 1, "{topic} is on partitions {on:?}");
    }
    // Counts and progress of one flush share `emitted_at_ms`.
    let mut paired = 0;
    for p in messages.iter().filter(|m| progress(m).is_some()) {
        let pr = progress(p).expect("progress");
        for c in &messages {
            if let AuditRecord::Counts(counts) = &c.record
                && counts.topic == pr.topic
                && counts.emitted_at_ms == pr.emitted_at_ms
            {
                assert!(
                    c.partition == p.partition && c.offset < p.offset,
                    "counts at {}/{} after the progress of their flush at {}/{}",
                    c.partition,
                    c.offset,
                    p.partition,
                    p.offset
                );
                paired += 1;
            }
        }
    }
    assert!(paired > 0, "some flushes sent counts and progress together");
    let flushes_with_counts: HashSet<i64> = messages
        .iter()
        .filter_map(|m| match &m.record {
            AuditRecord::Counts(c) => Some(c.emitted_at_ms),
            AuditRecord::Progress(_) => None,
        })
        .collect();
    assert!(
        flushes_with_counts.len() >= 5,
        "the run spans several flushes: {}",
        flushes_with_counts.len()
    );
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

/// A producer whose event times trail its clock by 90 s (skew, a backfill) never claims a
/// watermark less than 90 s behind the time of its progress record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_of_a_producer_trails_its_clock_as_its_event_times_do() -> anyhow::Result<()>
{
    let topic = unique("lagging");
    let audit_topic = unique("audit-lagging");
    create_topic(&topic, 2).await?;
    create_topic(&audit_topic, 1).await?;
    let spool = temp_dir("audit-spool");
    let mut config = audit_config(&audit_topic, spool.clone());
    config.flush_interval = Duration::from_millis(200);
    let producer = AuditedProducer::new(
        &client(&regional_bootstrap()),
        config,
        &prometheus::Registry::new(),
    )?;
    for _ in 0..10 {
        for _ in 0..5 {
            let event = chrono::Utc::now().timestamp_millis() - 90_000;
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic)
                        .payload("v")
                        .timestamp(event),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.shutdown().await;

    let messages = read_audit_messages(&audit_topic)?;
    let heartbeats: Vec<&Progress> = messages.iter().filter_map(progress).collect();
    assert!(heartbeats.len() >= 2, "progress of several flushes");
    for p in heartbeats {
        assert!(
            p.emitted_at_ms - p.watermark_ms >= 90_000,
            "watermark {} only {} ms behind its record",
            p.watermark_ms,
            p.emitted_at_ms - p.watermark_ms
        );
    }
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

/// A clean shutdown leaves one final progress record per partition, after all the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_ends_with_final_progress_after_all_counts() -> anyhow::Result<()> {
    let topic = unique("closing");
    let audit_topic = unique("audit-closing");
    create_topic(&topic, 2).await?;
    create_topic(&audit_topic, 3).await?;
    let spool = temp_dir("audit-spool");
    let config = audit_config(&audit_topic, spool.clone());
    let instance = config.instance.clone().expect("instance");
    let producer = AuditedProducer::new(
        &client(&regional_bootstrap()),
        config,
        &prometheus::Registry::new(),
    )?;
    let mut futures = Vec::new();
    for i in 0..200 {
        futures.push(
            producer
                .send_result(
                    FutureRecord::<(), _>::to(&topic)
                        .payload("v")
                        .partition(i % 2),
                )
                .map_err(|(e, _)| e)?,
        );
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    let stats = producer.shutdown().await;
    assert_eq!((stats.acked, stats.failed), (200, 0));

    let messages = read_audit_messages(&audit_topic)?;
    assert!(
        messages
            .iter()
            .all(|m| m.record.observer().instance == instance)
    );
    let records: Vec<AuditRecord> = messages.iter().map(|m| m.record.clone()).collect();
    let (sums, _) = sum_counts(&records)?;
    assert_eq!(sums.values().sum::<u64>(), 200);
    let finals: Vec<&AuditMessage> = messages
        .iter()
        .filter(|m| progress(m).is_some_and(|p| p.closing))
        .collect();
    let mut final_partitions: Vec<Option<i32>> = finals
        .iter()
        .filter_map(|m| progress(m).map(|p| p.partition))
        .collect();
    final_partitions.sort();
    assert_eq!(
        final_partitions,
        vec![None, Some(0), Some(1)],
        "one final record per partition, and one for the topic as a whole"
    );
    let audit_partition = finals[0].partition;
    let first_final = finals.iter().map(|m| m.offset).min().expect("finals");
    for m in &messages {
        assert_eq!(m.partition, audit_partition, "one topic, one partition");
        if !progress(m).is_some_and(|p| p.closing) {
            assert!(
                m.offset < first_final,
                "{:?} after the final records",
                m.record
            );
        }
    }
    for m in finals {
        let p = progress(m).expect("progress");
        assert!(p.watermark_ms <= p.emitted_at_ms);
    }
    assert!(spool_file_ids(&spool)?.is_empty());
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

/// Counts that cannot be delivered hold back their topic's watermark (and only theirs) and
/// keep the shutdown from saying it is final. Here a counts record is too large for the audit
/// producer's `message.max.bytes` (a permanent failure, unlike an outage) while the progress
/// records fit, so the progress can be read while the counts wait in the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_waiting_in_the_spool_hold_back_the_watermark_and_the_final_records()
-> anyhow::Result<()> {
    let audit_topic = unique("audit-held");
    create_topic(&audit_topic, 2).await?;
    let spool = temp_dir("audit-spool");
    let width = BucketWidth::default();
    let now = chrono::Utc::now().timestamp_millis();
    let old_bucket = width.start_of(now - 10 * 60_000);
    let tracker = Arc::new(Tracker::new(width, 100));
    // About 600 distinct latencies: a histogram of well over 1000 bytes.
    for i in 0..600 {
        let latency = 1.03f64.powi(i) as i64;
        tracker.record("big", Some(0), old_bucket + 1, 10, old_bucket + 1 + latency);
    }
    tracker.record("small", Some(0), now, 10, now);
    let mut config = audit_config(&audit_topic, spool.clone());
    config
        .kafka
        .insert("bootstrap.servers".into(), regional_bootstrap());
    config
        .kafka
        .insert("message.max.bytes".into(), "1000".into());
    let reporter = Reporter::start(
        &config,
        Arc::clone(&tracker),
        &client("127.0.0.1:1"), // unused: the config's own properties win
        &prometheus::Registry::new(),
        &CancellationToken::new(),
    )?;
    // Wait for progress of both topics (from the second flush on).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let messages = read_audit_messages(&audit_topic)?;
        let topics: HashSet<&str> = messages
            .iter()
            .filter_map(progress)
            .map(|p| p.topic.as_str())
            .collect();
        if topics.contains("big") && topics.contains("small") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress of both topics in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reporter.spooled(), 1, "the large counts record waits");
    reporter.shutdown().await;

    let messages = read_audit_messages(&audit_topic)?;
    let mut counts_topics = HashSet::new();
    for m in &messages {
        match &m.record {
            AuditRecord::Counts(c) => {
                counts_topics.insert(c.topic.clone());
            }
            AuditRecord::Progress(p) => {
                assert!(!p.closing, "a final record with counts in the spool: {p:?}");
                if p.topic == "big" {
                    assert_eq!(
                        p.watermark_ms, old_bucket,
                        "held back to the bucket of the counts in the spool"
                    );
                } else {
                    assert_eq!(p.watermark_ms, p.emitted_at_ms, "other topics are not");
                }
            }
        }
    }
    assert_eq!(counts_topics, HashSet::from(["small".to_owned()]));
    assert_eq!(spool_file_ids(&spool)?.len(), 1);
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}

/// A producer whose audit cluster is unreachable at shutdown sends no final record: its
/// counts wait in the spool, the next process delivers them, and no final record ever
/// appears for the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_audit_topic_at_shutdown_means_no_final_records() -> anyhow::Result<()> {
    let topic = unique("unreachable");
    let audit_topic = unique("audit-unreachable");
    create_topic(&topic, 1).await?;
    create_topic(&audit_topic, 1).await?;
    let spool = temp_dir("audit-spool");
    let mut config = audit_config(&audit_topic, spool.clone());
    config
        .kafka
        .insert("bootstrap.servers".into(), "127.0.0.1:1".into());
    config.delivery_timeout = Duration::from_secs(1);
    config.shutdown_timeout = Duration::from_secs(4);
    let instance = config.instance.clone().expect("instance");
    let producer = AuditedProducer::new(
        &client(&regional_bootstrap()),
        config,
        &prometheus::Registry::new(),
    )?;
    for _ in 0..20 {
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload("v"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let stats = producer.shutdown().await;
    assert_eq!(stats.acked, 20);
    assert!(
        !spool_file_ids(&spool)?.is_empty(),
        "the counts wait in the spool"
    );

    // The audit cluster is back: the next process delivers the counts.
    let reporter = Reporter::start(
        &audit_config(&audit_topic, spool.clone()),
        Arc::new(Tracker::new(BucketWidth::default(), 100)),
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
    let records: Vec<AuditRecord> = messages.iter().map(|m| m.record.clone()).collect();
    let (sums, _) = sum_counts(&records)?;
    assert_eq!(sums.values().sum::<u64>(), 20);
    assert!(
        records
            .iter()
            .all(|r| r.observer().instance == instance && !matches!(r, AuditRecord::Progress(_))),
        "only the first producer's counts: {records:?}"
    );
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}
