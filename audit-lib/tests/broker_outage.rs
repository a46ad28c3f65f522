//! The regional broker stops in the middle of a run and comes back: audit records that could
//! not be delivered wait in the spool, and the totals on the audit topic still equal what
//! Kafka acknowledged.
//!
//! This stops the shared regional broker for a few seconds (`dev/stack stop-kafka regional`),
//! so it is the only test in this file and restarts the broker even when it fails.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chaperone_audit::{AuditedProducer, BucketWidth, DeliveryFuture};
use common::{
    audit_config, client, create_topic, read_audit_topic, regional_bootstrap, sum_counts, temp_dir,
    unique,
};
use rdkafka::producer::FutureRecord;

fn stack() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dev/stack")
}

fn run_stack(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(stack()).args(args).status()?;
    anyhow::ensure!(status.success(), "dev/stack {args:?} failed: {status}");
    Ok(())
}

/// Restarts the regional broker when dropped, unless already restarted.
struct Outage {
    started: Instant,
    restarted: bool,
}

impl Outage {
    fn begin() -> anyhow::Result<Self> {
        let started = Instant::now();
        run_stack(&["stop-kafka", "regional"])?;
        Ok(Self {
            started,
            restarted: false,
        })
    }

    fn end(&mut self) -> anyhow::Result<Duration> {
        self.restarted = true;
        run_stack(&["start-kafka", "regional"])?;
        Ok(self.started.elapsed())
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.restarted {
            let _ = run_stack(&["start-kafka", "regional"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_survive_a_regional_broker_outage() -> anyhow::Result<()> {
    let topic = unique("outage");
    let audit_topic = unique("audit-outage");
    create_topic(&topic, 2).await?;
    create_topic(&audit_topic, 1).await?;
    let spool = temp_dir("audit-spool");
    let mut kafka = client(&regional_bootstrap());
    kafka
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Data messages outlive the outage; audit records time out sooner and are spooled.
        .set("message.timeout.ms", "120000")
        .set("reconnect.backoff.max.ms", "500");
    let mut config = audit_config(&audit_topic, spool.clone());
    config.delivery_timeout = Duration::from_secs(2);
    config.shutdown_timeout = Duration::from_secs(60);
    let producer = Arc::new(AuditedProducer::new(
        &kafka,
        config,
        &prometheus::Registry::new(),
    )?);

    // Produce steadily (about 2000 messages/s) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let producer = Arc::clone(&producer);
        let stop = Arc::clone(&stop);
        let topic = topic.clone();
        tokio::spawn(async move {
            let payload = vec![b'p'; 32];
            let mut sent: Vec<(i64, DeliveryFuture)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    let key = (i % 13).to_string();
                    let event = chrono::Utc::now().timestamp_millis();
                    let record = FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .timestamp(event);
                    match producer.send_result(record) {
                        Ok(f) => sent.push((event, f)),
                        Err((e, _)) => anyhow::bail!("enqueue failed: {e}"),
                    }
                    i += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(sent)
        })
    };

    let wait_acked = |n: u64, what: &'static str| {
        let producer = Arc::clone(&producer);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while producer.stats().acked < n {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{what}: only {} acked",
                    producer.stats().acked
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    wait_acked(5_000, "before the outage").await?;

    let mut outage = tokio::task::spawn_blocking(Outage::begin).await??;
    // Keep producing while the broker is down, until an audit flush has failed and its
    // records wait in the spool.
    let deadline = Instant::now() + Duration::from_secs(15);
    while producer.spooled() == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no audit record was spooled during the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked_during_outage = producer.stats().acked;
    let (outage, length) = tokio::task::spawn_blocking(move || {
        let length = outage.end();
        (outage, length)
    })
    .await?;
    let length = length?;
    drop(outage);
    eprintln!("regional broker was down for {length:?}");
    wait_acked(acked_during_outage + 5_000, "after the outage").await?;
    stop.store(true, Ordering::Relaxed);

    let sent = sender.await??;
    let width = BucketWidth::default();
    let mut expected: BTreeMap<(String, Option<i32>, i64), u64> = BTreeMap::new();
    let mut acked = 0u64;
    for (event, f) in sent {
        if let Ok(delivery) = f.await? {
            acked += 1;
            *expected
                .entry((
                    topic.clone(),
                    Some(delivery.partition),
                    width.start_of(event),
                ))
                .or_insert(0) += 1;
        }
    }
    let producer = Arc::into_inner(producer).expect("the sender task is done");
    let stats = producer.shutdown().await;
    assert_eq!(stats.acked, acked);

    let records = read_audit_topic(&audit_topic)?;
    // `sum_counts` fails if two copies of one id differ; identical copies (a record re-sent
    // after a delivery timed out) are counted once, as the collector does.
    let (sums, duplicates) = sum_counts(&records)?;
    eprintln!(
        "acked {acked} messages ({} failed), {} audit records, {duplicates} duplicate copies",
        stats.failed,
        records.len()
    );
    assert_eq!(
        sums, expected,
        "audit totals per topic/partition/bucket equal the acked counts"
    );
    assert_eq!(sums.values().sum::<u64>(), acked);
    std::fs::remove_dir_all(spool).ok();
    Ok(())
}
