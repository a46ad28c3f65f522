//! A consumer group of audited consumers, each in a process of its own, through rebalances: a
//! member joins, a member leaves, a member is killed with `kill -9` and restarted, while a
//! producer goes on writing. Transactional mode counts exactly what was produced;
//! at-least-once mode counts at least that, and at most what the README says a kill adds.
//!
//! The member processes are this test binary run again: the `member_process` test, with the
//! member's settings in `CHAPERONE_TEST_MEMBER` (it fails when run without them). A member
//! stops cleanly when its stdin closes.

mod common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chaperone_audit::{AuditRecord, AuditedConsumer, ConsumerOptions};
use chaperone_test_support::TestProcess;
use common::{
    Sums, audit_config, client, create_topic, group_offsets, read_audit_messages,
    regional_bootstrap, sum_counts, temp_dir, unique,
};
use rdkafka::consumer::{CommitMode, Consumer};
use serde::{Deserialize, Serialize};

const PARTITIONS: i32 = 6;
const MEMBER_ENV: &str = "CHAPERONE_TEST_MEMBER";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    topic: String,
    audit_topic: String,
    group: String,
    instance: String,
    transactional: bool,
    /// The same for a killed member and its restart, so the restart fences what it left open.
    transactional_id: String,
}

/// Entry point of the member processes the tests below start.
#[test]
#[ignore = "a member process of the group tests, started by them with its settings"]
fn member_process() -> anyhow::Result<()> {
    let spec: Member = serde_json::from_str(
        &std::env::var(MEMBER_ENV).map_err(|_| anyhow::anyhow!("{MEMBER_ENV} is not set"))?,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stop2.store(true, Ordering::Relaxed);
    });
    let mut cc = client(&regional_bootstrap());
    cc.set("group.id", &spec.group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.queue.backoff.ms", "1");
    if spec.transactional {
        cc.set("enable.auto.commit", "false");
    }
    let mut audit = audit_config(&spec.audit_topic, temp_dir("unused-spool"));
    audit.instance = Some(spec.instance.clone());
    let options = ConsumerOptions {
        transactional: spec.transactional,
        transactional_id: Some(spec.transactional_id.clone()),
        transaction_timeout: Duration::from_secs(10),
        ..ConsumerOptions::default()
    };
    let consumer =
        AuditedConsumer::with_options(&cc, audit, options, &prometheus::Registry::new())?;
    consumer.subscribe(&[&spec.topic])?;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("member {}: consumer error: {e}", spec.instance);
                continue;
            }
            None => continue,
        };
        n += 1;
        if spec.transactional && n.is_multiple_of(200) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    if spec.transactional {
        consumer.commit_consumer_state(CommitMode::Async)?;
    }
    let stats = consumer.close();
    eprintln!("member {} stopped: {stats:?}", spec.instance);
    Ok(())
}

/// A member process.
fn start(spec: &Member) -> anyhow::Result<TestProcess> {
    TestProcess::start("member_process", (MEMBER_ENV, serde_json::to_string(spec)?))
}

/// Produces to `topic` in batches until `stop`, event time = now; returns what went where.
fn produce_until(
    topic: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Sums>> {
    std::thread::spawn(move || {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = client(&regional_bootstrap())
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()?;
        let width = chaperone_audit::BucketWidth::default();
        let payload = vec![b'p'; 100];
        let mut sums = Sums::new();
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            let now = chrono::Utc::now().timestamp_millis();
            for _ in 0..200 {
                let partition = (i % i64::from(PARTITIONS)) as i32;
                i += 1;
                let mut record = BaseRecord::<(), [u8]>::to(&topic)
                    .partition(partition)
                    .payload(payload.as_slice())
                    .timestamp(now);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
                *sums
                    .entry((topic.clone(), Some(partition), width.start_of(now)))
                    .or_insert(0) += 1;
            }
            producer.flush(Duration::from_secs(30))?;
            // A steady stream of about 2,000 messages a second.
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(sums)
    })
}

/// A Kafka lookup that failed (a timeout on a loaded host) is logged and tried again.
fn retried<T>(r: anyhow::Result<T>) -> Option<T> {
    r.map_err(|e| eprintln!("lookup failed, trying again: {e:#}"))
        .ok()
}

/// Waits until the group's committed offsets pass `floor` in every partition.
async fn committed_past(
    group: &str,
    topic: &str,
    floor: &[i64],
    what: &str,
) -> anyhow::Result<Vec<i64>> {
    chaperone_test_support::eventually(what, Duration::from_secs(120), || {
        // A lookup that fails (a timeout on a loaded host) is tried again.
        let r = retried(group_offsets(group, topic, PARTITIONS))
            .and_then(|o| o.iter().zip(floor).all(|(c, f)| c > f).then_some(o));
        async move { Ok(r) }
    })
    .await
}

/// Waits until the member `instance` has counts on the audit topic (it owns partitions and
/// works).
async fn counted_by(audit_topic: &str, instance: &str) -> anyhow::Result<()> {
    let what = format!("counts from {instance}");
    chaperone_test_support::eventually(&what, Duration::from_secs(120), || {
        let r = retried(common::read_audit_topic(audit_topic)).and_then(|records| {
            records
                .iter()
                .any(|r| {
                    matches!(r, AuditRecord::Counts(c) if c.observer.instance == instance && c.count > 0)
                })
                .then_some(())
        });
        async move { Ok(r) }
    })
    .await
}

/// Runs the scenario and returns (what was produced, the audit records of the group's topic
/// in the order read).
async fn scenario(transactional: bool) -> anyhow::Result<(Sums, Vec<AuditRecord>)> {
    let topic = unique("group-consumed");
    let audit_topic = unique("audit");
    let group = unique("group");
    create_topic(&topic, PARTITIONS).await?;
    create_topic(&audit_topic, 2).await?;
    let spec = |instance: &str| Member {
        topic: topic.clone(),
        audit_topic: audit_topic.clone(),
        group: group.clone(),
        instance: instance.to_owned(),
        transactional,
        transactional_id: format!("{group}-{}", &instance[..2]),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce_until(topic.clone(), Arc::clone(&stop));
    let none = vec![-1; PARTITIONS as usize];

    let m1 = start(&spec("m1"))?;
    let m2 = start(&spec("m2"))?;
    let c = committed_past(&group, &topic, &none, "two members to commit").await?;
    counted_by(&audit_topic, "m2").await?;
    // A member joins.
    let m3 = start(&spec("m3"))?;
    counted_by(&audit_topic, "m3").await?;
    let c = committed_past(&group, &topic, &c, "commits after m3 joined").await?;
    // A member leaves.
    m2.stop()?;
    let c = committed_past(&group, &topic, &c, "commits after m2 left").await?;
    // A member is killed mid-stream, and restarted (transactional: with the same
    // transactional id, which fences what it left open).
    counted_by(&audit_topic, "m1").await?;
    m1.kill()?;
    let c = committed_past(&group, &topic, &c, "commits after m1 was killed").await?;
    let m1 = start(&spec("m1-restarted"))?;
    counted_by(&audit_topic, "m1-restarted").await?;
    committed_past(&group, &topic, &c, "commits after m1 restarted").await?;

    stop.store(true, Ordering::Relaxed);
    let produced = producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let ends = chaperone_test_support::eventually("end offsets", Duration::from_secs(60), || {
        let r = retried(chaperone_test_support::end_offsets(
            &regional_bootstrap(),
            &topic,
            PARTITIONS,
        ));
        async move { Ok(r) }
    })
    .await?;
    chaperone_test_support::eventually(
        "the group to commit every message",
        Duration::from_secs(120),
        || {
            let r = retried(group_offsets(&group, &topic, PARTITIONS))
                .and_then(|o| (o == ends).then_some(()));
            async move { Ok(r) }
        },
    )
    .await?;
    m1.stop()?;
    m3.stop()?;
    let records = read_audit_messages(&audit_topic)?
        .into_iter()
        .map(|m| m.record)
        .filter(|r| r.topic() == topic)
        .collect();
    Ok((produced, records))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_group_counts_exactly_through_join_leave_and_kill() -> anyhow::Result<()> {
    let (produced, records) = scenario(true).await?;
    let (sums, _) = sum_counts(&records)?;
    assert_eq!(sums, produced);
    Ok(())
}

/// Per partition, the counts the killed instance `m1` sent after its last progress record
/// of that partition: what the README says a `kill -9` can add.
fn kill_bound(records: &[AuditRecord]) -> BTreeMap<i32, u64> {
    let mut after: BTreeMap<i32, u64> = BTreeMap::new();
    for r in records {
        if r.observer().instance != "m1" {
            continue;
        }
        match r {
            AuditRecord::Counts(c) => {
                *after.entry(c.partition.unwrap_or(-1)).or_insert(0) += c.count
            }
            AuditRecord::Progress(p) => {
                after.insert(p.partition.unwrap_or(-1), 0);
            }
        }
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_group_counts_at_least_everything_and_a_kill_adds_at_most_its_last_flush()
-> anyhow::Result<()> {
    let (produced, records) = scenario(false).await?;
    let (sums, _) = sum_counts(&records)?;
    let bound = kill_bound(&records);
    let mut extra: BTreeMap<i32, u64> = BTreeMap::new();
    for (key, n) in &produced {
        let counted = sums.get(key).copied().unwrap_or(0);
        assert!(counted >= *n, "{key:?}: counted {counted} < produced {n}");
        *extra.entry(key.1.unwrap_or(-1)).or_insert(0) += counted - n;
    }
    assert!(
        sums.keys().all(|k| produced.contains_key(k)),
        "no counts of messages never produced"
    );
    for (p, e) in &extra {
        let b = bound.get(p).copied().unwrap_or(0);
        assert!(
            *e <= b,
            "partition {p}: {e} extra counts, more than the {b} of m1's last flush"
        );
    }
    eprintln!("extra counts per partition after kill -9: {extra:?} (bound {bound:?})");
    Ok(())
}
