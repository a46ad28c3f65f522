//! AuditedConsumer and AuditedStreamConsumer against the real regional Kafka of the dev stack:
//! the audit topic's counts equal what the application processed.

mod common;

use std::time::Duration;

use chaperone_audit::{
    AuditRecord, AuditedConsumer, AuditedStreamConsumer, ConsumerOptions, CountOn, Tier,
};
use common::{
    audit_config, client, create_topic, group_offsets, produce_spread, progress_of,
    read_audit_topic, regional_bootstrap, sum_counts, temp_dir, unique,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;

const PARTITIONS: i32 = 3;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn consumer_config(group: &str) -> ClientConfig {
    init_tracing();
    let mut cc = client(&regional_bootstrap());
    cc.set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", "1");
    cc
}

/// Reads the audit topic until `check` accepts it.
async fn audit_until(
    audit_topic: &str,
    what: &str,
    check: impl Fn(&[AuditRecord]) -> bool,
) -> anyhow::Result<Vec<AuditRecord>> {
    chaperone_test_support::eventually(what, Duration::from_secs(60), || {
        // A read that fails (a timeout on a loaded host) is tried again.
        let ok = read_audit_topic(audit_topic)
            .map_err(|e| eprintln!("audit topic not read, trying again: {e:#}"))
            .ok()
            .and_then(|r| check(&r).then_some(r));
        async move { Ok(ok) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_counts_equal_what_was_processed() -> anyhow::Result<()> {
    const N: usize = 30_000;
    let topic = unique("consumed");
    let audit_topic = unique("audit");
    let group = unique("group");
    create_topic(&topic, PARTITIONS).await?;
    create_topic(&audit_topic, 2).await?;
    let expected = produce_spread(&topic, PARTITIONS, N)?;

    // Default librdkafka settings: auto commit, auto offset store. A message counts when the
    // application asks for the next one.
    let audit = audit_config(&audit_topic, temp_dir("unused-spool"));
    let registry = prometheus::Registry::new();
    let (t, g) = (topic.clone(), group.clone());
    let stats = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let consumer = AuditedConsumer::new(&consumer_config(&g), audit, &registry)?;
        consumer.subscribe(&[&t])?;
        let mut received = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while received < N {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "only {received} received"
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(_)) => received += 1,
                // Consumer errors are events (a broker connection went down): carry on.
                Some(Err(e)) => eprintln!("consumer error: {e}"),
                None => {}
            }
        }
        // Receiving the last message counted nothing yet.
        assert_eq!(consumer.stats().counted, N as u64 - 1);
        Ok(consumer.close())
    })
    .await??;
    assert_eq!(stats.counted, N as u64);
    assert_eq!(stats.passed_over, 0);

    let records = read_audit_topic(&audit_topic)?;
    let (sums, _) = sum_counts(&records)?;
    assert_eq!(sums, expected);
    for r in &records {
        assert_eq!(r.observer().tier, Tier::from(format!("consumer:{group}")));
    }
    // The offsets are committed, and each partition's last progress record is final, at its
    // end offset.
    let ends = chaperone_test_support::end_offsets(&regional_bootstrap(), &topic, PARTITIONS)?;
    assert_eq!(group_offsets(&group, &topic, PARTITIONS)?, ends);
    for p in 0..PARTITIONS {
        let last = progress_of(&records, &topic)
            .filter(|r| r.partition == Some(p))
            .last()
            .expect("progress of every partition");
        assert!(last.closing, "partition {p}: {last:?}");
        assert_eq!(last.position, Some(ends[p as usize]), "partition {p}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_passed_over_are_not_counted() -> anyhow::Result<()> {
    const N: usize = 9_000;
    let topic = unique("consumed");
    let audit_topic = unique("audit");
    let group = unique("group");
    create_topic(&topic, PARTITIONS).await?;
    create_topic(&audit_topic, 2).await?;
    let mut expected = produce_spread(&topic, PARTITIONS, N)?;

    let audit = audit_config(&audit_topic, temp_dir("unused-spool"));
    let options = ConsumerOptions {
        count_on: CountOn::Processed,
        ..ConsumerOptions::default()
    };
    let registry = prometheus::Registry::new();
    let (t, g) = (topic.clone(), group.clone());
    let (stats, skipped) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut cc = consumer_config(&g);
        cc.set("enable.auto.commit", "false");
        let consumer = AuditedConsumer::with_options(&cc, audit, options, &registry)?;
        consumer.subscribe(&[&t])?;
        let width = chaperone_audit::BucketWidth::default();
        let mut skipped = common::Sums::new();
        let mut received = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while received < N {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "only {received} received"
            );
            let m = match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    eprintln!("consumer error: {e}");
                    continue;
                }
                None => continue,
            };
            received += 1;
            // One message in a hundred fails and is passed over.
            if m.offset() % 100 == 7 {
                let event = m.timestamp().to_millis().expect("timestamp");
                *skipped
                    .entry((t.clone(), Some(m.partition()), width.start_of(event)))
                    .or_insert(0) += 1;
            } else {
                assert!(consumer.processed(&m));
                assert!(!consumer.processed(&m), "counted once");
            }
            if received.is_multiple_of(1_000) {
                consumer.commit_message(&m, CommitMode::Async)?;
            }
        }
        consumer.commit_consumer_state(CommitMode::Sync)?;
        Ok((consumer.close(), skipped))
    })
    .await??;
    let n_skipped: u64 = skipped.values().sum();
    assert!(n_skipped > 0);
    assert_eq!(stats.passed_over, n_skipped);
    assert_eq!(stats.counted, N as u64 - n_skipped);
    for (k, n) in skipped {
        *expected.get_mut(&k).expect("bucket produced") -= n;
    }
    expected.retain(|_, n| *n > 0);
    let (sums, _) = sum_counts(&read_audit_topic(&audit_topic)?)?;
    assert_eq!(sums, expected);
    // The group still moved past them.
    let ends = chaperone_test_support::end_offsets(&regional_bootstrap(), &topic, PARTITIONS)?;
    assert_eq!(group_offsets(&group, &topic, PARTITIONS)?, ends);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_consumer_in_transactional_mode_counts_exactly() -> anyhow::Result<()> {
    const N: usize = 12_000;
    let topic = unique("consumed");
    let audit_topic = unique("audit");
    let group = unique("group");
    create_topic(&topic, PARTITIONS).await?;
    create_topic(&audit_topic, 2).await?;
    let expected = produce_spread(&topic, PARTITIONS, N)?;

    let mut cc = consumer_config(&group);
    cc.set("enable.auto.commit", "false");
    let options = ConsumerOptions {
        transactional: true,
        tier: Some("warehouse-loader".into()),
        ..ConsumerOptions::default()
    };
    let registry = prometheus::Registry::new();
    let consumer = AuditedStreamConsumer::with_options(
        &cc,
        audit_config(&audit_topic, temp_dir("unused-spool")),
        options,
        &registry,
    )?;
    consumer.subscribe(&[&topic])?;
    let mut received = 0;
    while received < N {
        let m = match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await? {
            Ok(m) => m,
            Err(e) => {
                eprintln!("consumer error: {e}");
                continue;
            }
        };
        received += 1;
        if received.is_multiple_of(500) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    let stats = consumer.close();
    assert_eq!(stats.counted, N as u64);
    assert_eq!(stats.aborted, 0);

    let records = read_audit_topic(&audit_topic)?;
    let (sums, duplicates) = sum_counts(&records)?;
    assert_eq!(sums, expected);
    assert_eq!(duplicates, 0);
    assert!(
        records
            .iter()
            .all(|r| r.observer().tier == Tier::from("warehouse-loader"))
    );
    let ends = chaperone_test_support::end_offsets(&regional_bootstrap(), &topic, PARTITIONS)?;
    assert_eq!(group_offsets(&group, &topic, PARTITIONS)?, ends);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_caught_up_consumer_still_makes_progress() -> anyhow::Result<()> {
    let topic = unique("consumed");
    let audit_topic = unique("audit");
    let group = unique("group");
    create_topic(&topic, 1).await?;
    create_topic(&audit_topic, 1).await?;
    produce_spread(&topic, 1, 100)?;

    let registry = prometheus::Registry::new();
    let audit = audit_config(&audit_topic, temp_dir("unused-spool"));
    let (t, g) = (topic.clone(), group.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let worker = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let consumer = AuditedConsumer::new(&consumer_config(&g), audit, &registry)?;
        consumer.subscribe(&[&t])?;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                eprintln!("consumer error: {e}");
            }
        }
        Ok(consumer.close())
    });
    // Once every message was read, nothing arrives; the watermark goes on past the time the
    // last one was read (the messages' event times are all minutes older).
    let read_all_at = chaperone_test_support::eventually(
        "the group to commit every message",
        Duration::from_secs(60),
        || {
            let done = group_offsets(&group, &topic, 1)
                .map_err(|e| eprintln!("offsets not read, trying again: {e:#}"))
                .ok()
                .and_then(|o| (o[0] == 100).then(|| chrono::Utc::now().timestamp_millis()));
            async move { Ok(done) }
        },
    )
    .await?;
    audit_until(
        &audit_topic,
        "an idle watermark past the last read",
        |records| {
            progress_of(records, &topic).any(|p| {
                p.watermark_ms > read_all_at
                    && p.position == Some(100)
                    && p.high_watermark == Some(100)
            })
        },
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stats = worker.await??;
    assert_eq!(stats.counted, 100);
    Ok(())
}
