//! The consumer tier end to end: two audited consumer groups (audit-lib's `AuditedConsumer`)
//! read a topic of the regional cluster that audited producers write, next to the pipeline's
//! chaperone-services and the collector, whose `[reconcile]` has one edge to `consumer:*`.
//!
//! - A group in transactional mode that processes everything: `complete` on its own edge,
//!   `regional->consumer:<group>`, with exactly what was produced. Another reads
//!   MirrorMaker 2's copy on the aggregate cluster, mapped back to the logical topic (a
//!   `mirror` mapping): the same.
//! - A group that passes over one message in a hundred (it never says they were processed):
//!   exactly those `missing` on its edge, notified; nothing else is.
//! - A third group, reading another topic only, gets no verdict on this one.
//! - A group that stops processing for longer than `max_wait` while producers go on is
//!   `lagging`, never `missing`, and `complete` once it catches up; nobody is notified.
//! - Two groups of three member processes through a join, a leave and a `kill -9`: the
//!   transactional one `complete`, exactly; the at-least-once one, replayed from the start,
//!   `redelivered` on every bucket and never `duplicated`; nobody is notified.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chaperone_audit::mapping::{MappingConfig, MappingKind};
use chaperone_audit::{AuditConfig, AuditedConsumer, ConsumerOptions, CountOn};
use chaperone_test_support::{
    Receiver, TestDb, TestProcess, aggregate_bootstrap, create_topic, end_offsets, eventually,
    regional_bootstrap, unique, wait_for_topics,
};
use chaperone_tests::group::{self, Member};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec, create_audit_topic, edges_to_consumers};
use chaperone_tests::producer::{TestProducer, regional_client};
use chaperone_tests::verdicts::{edge_totals, verdicts};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;

const MESSAGES: usize = 3_000;
const PARTITIONS: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_consumer_group_is_judged_on_what_it_processed() -> anyhow::Result<()> {
    let id = unique("e2e-consumer");
    let (topic, other) = (format!("{id}-orders"), format!("{id}-other"));
    let audit_topic = format!("{id}-audit");
    create_topic(&regional_bootstrap(), &topic, PARTITIONS).await?;
    create_topic(&regional_bootstrap(), &other, 1).await?;
    create_audit_topic(&audit_topic).await?;
    wait_for_topics(
        &aggregate_bootstrap(),
        &[format!("regional.{topic}"), format!("regional.{other}")],
        Duration::from_secs(120),
    )
    .await?;
    let db = TestDb::create().await?;
    let receiver = Receiver::start().await?;
    let spec = spec(
        &id,
        &audit_topic,
        &format!("{topic}|{other}"),
        90,
        &receiver,
    );
    let pipeline = Pipeline::start(&db, &spec).await?;
    let outcome = scenario(&db, &receiver, &id, &topic, &other, &audit_topic).await;
    pipeline.finish(outcome, db).await
}

/// A pipeline whose collector judges one edge from regional to every consumer group, with
/// `max_wait_s`, notifying `receiver`.
fn spec(
    id: &str,
    audit_topic: &str,
    topics_regex: &str,
    max_wait_s: u64,
    receiver: &Receiver,
) -> PipelineSpec {
    PipelineSpec {
        id: id.to_owned(),
        audit_topic: audit_topic.to_owned(),
        topics_regex: topics_regex.to_owned(),
        bucket_width: "10s".into(),
        reconcile: format!(
            r#"interval = "1s"
allowed_lateness = "2s"
settle = "2s"
max_wait = "{max_wait_s}s"
{edges}"#,
            edges = edges_to_consumers("regional")
        ),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"ops\"\nurl = \"{}\"\n",
            receiver.url()
        ),
        regional_exclude: Vec::new(),
    }
}

/// What one group did.
#[derive(Debug)]
struct Read {
    received: usize,
    passed_over: usize,
}

/// How one group reads.
#[derive(Debug, Clone)]
struct Group {
    name: String,
    topic: String,
    /// Messages to receive.
    expect: usize,
    transactional: bool,
    /// Offsets never said to be processed.
    skip: fn(i64) -> bool,
    /// After this many messages, stop polling for this long (a stalled application).
    pause: Option<(usize, Duration)>,
    /// Reads MirrorMaker 2's copy `regional.<topic>` on the aggregate cluster, mapped back to
    /// `<topic>` from datacenter `regional`.
    mirror: bool,
}

/// How long a group goes on polling, caught up and idle, after its last message: past the end
/// of that message's 10 s bucket with the 2 s lateness and a flush, as a long-running
/// consumer would (a group that stops earlier is not judged on the bucket).
const LINGER: Duration = Duration::from_secs(14);

/// Reads as `g` until it received what it expects, counting each message as processed except
/// those it skips, committing every 500; goes on polling for [`LINGER`] after the last
/// message; then closes cleanly.
fn read_group(g: Group, audit_topic: &str) -> anyhow::Result<Read> {
    let Group {
        name: group,
        topic,
        expect,
        transactional,
        skip,
        mut pause,
        mirror,
    } = g;
    let (bootstrap, topic) = if mirror {
        (aggregate_bootstrap(), format!("regional.{topic}"))
    } else {
        (regional_bootstrap(), topic)
    };
    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", "1");
    let audit = AuditConfig {
        topic: audit_topic.to_owned(),
        flush_interval: Duration::from_secs(1),
        bucket_width: Duration::from_secs(10),
        spool_dir: std::env::temp_dir().join(unique("e2e-consumer-spool")),
        ..AuditConfig::default()
    };
    let options = ConsumerOptions {
        transactional,
        count_on: if transactional {
            CountOn::default()
        } else {
            CountOn::Processed
        },
        mapping: MappingConfig {
            kind: mirror.then_some(MappingKind::Mirror),
            ..MappingConfig::default()
        },
        ..ConsumerOptions::default()
    };
    let consumer =
        AuditedConsumer::with_options(&kafka, audit, options, &prometheus::Registry::new())?;
    consumer.subscribe(&[&topic])?;
    let mut read = Read {
        received: 0,
        passed_over: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut until = Instant::now();
    while read.received < expect || Instant::now() < until {
        if let Some((after, d)) = pause
            && read.received >= after
        {
            std::thread::sleep(d);
            pause = None;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{group}: only {} of {expect} received",
            read.received
        );
        let m = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("{group}: consumer error: {e}");
                continue;
            }
            None => continue,
        };
        anyhow::ensure!(
            read.received < expect,
            "{group}: more than {expect} messages"
        );
        read.received += 1;
        until = Instant::now() + LINGER;
        if skip(m.offset()) {
            read.passed_over += 1;
        } else if !transactional {
            consumer.processed(&m);
        }
        if read.received.is_multiple_of(500) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    consumer.close();
    Ok(read)
}

async fn scenario(
    db: &TestDb,
    receiver: &Receiver,
    id: &str,
    topic: &str,
    other: &str,
    audit_topic: &str,
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let producer = TestProducer::new(&regional_client(), audit_topic, &registry)?;
    producer.send_numbered(&[topic], MESSAGES, None).await?;
    producer.send_numbered(&[other], 100, None).await?;
    producer.shutdown().await;

    let group = |suffix: &str, topic: &str, expect: usize, transactional: bool| Group {
        name: format!("{id}-{suffix}"),
        topic: topic.to_owned(),
        expect,
        transactional,
        skip: |_| false,
        pause: None,
        mirror: false,
    };
    let groups = [
        group("clean", topic, MESSAGES, true),
        Group {
            mirror: true,
            ..group("mirror", topic, MESSAGES, true)
        },
        Group {
            skip: |offset| offset % 100 == 7,
            ..group("lossy", topic, MESSAGES, false)
        },
        group("elsewhere", other, 100, false),
    ];
    let mut reads = Vec::new();
    for g in groups {
        let audit = audit_topic.to_owned();
        reads.push(tokio::task::spawn_blocking(move || read_group(g, &audit)));
    }
    let mut passed_over = 0;
    for r in reads {
        passed_over += r.await??.passed_over as i64;
    }
    anyhow::ensure!(passed_over > 0, "the lossy group passed nothing over");

    let n = MESSAGES as i64;
    let (clean, mirror, lossy, elsewhere) = (
        format!("regional->consumer:{id}-clean"),
        format!("regional->consumer:{id}-mirror"),
        format!("regional->consumer:{id}-lossy"),
        format!("regional->consumer:{id}-elsewhere"),
    );
    let v = eventually(
        "the consumer groups' verdicts",
        Duration::from_secs(180),
        || async {
            let v = verdicts(&db.pool, topic).await?;
            let done = edge_totals(&v, "producer->regional") == (n, n)
                && edge_totals(&v, &clean) == (n, n)
                && edge_totals(&v, &mirror) == (n, n)
                && edge_totals(&v, &lossy) == (n, n - passed_over);
            Ok(done.then_some(v))
        },
    )
    .await?;
    anyhow::ensure!(
        v.iter()
            .all(|r| r.0 == lossy && r.1 == "missing" || r.1 == "complete"),
        "verdicts of {topic}: {v:?}"
    );
    anyhow::ensure!(
        edge_totals(&v, &elsewhere) == (0, 0),
        "a group that never read {topic} was judged on it: {v:?}"
    );
    // Its verdict is judged on its own progress, which may arrive after the others'.
    let o = eventually(
        &format!("the verdict of the group reading {other}"),
        Duration::from_secs(60),
        || async {
            let o = verdicts(&db.pool, other).await?;
            Ok((edge_totals(&o, &elsewhere) == (100, 100)).then_some(o))
        },
    )
    .await;
    anyhow::ensure!(
        o.is_ok(),
        "the group reading {other}: {:?}",
        verdicts(&db.pool, other).await?
    );

    eventually("the loss notified", Duration::from_secs(60), || async {
        Ok((!receiver.received().is_empty()).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in receiver.received() {
        let j = n.json()?;
        anyhow::ensure!(
            j["topic"] == topic && j["edge"] == lossy.as_str() && j["status"] == "missing",
            "a notification other than the lossy group's loss: {j:#}"
        );
    }
    Ok(())
}

/// One topic of `partitions` on regional (and its copy on aggregate), an audit topic, a test
/// database, a webhook receiver and a pipeline judging with `max_wait_s`.
struct Setup {
    id: String,
    topic: String,
    audit_topic: String,
    db: TestDb,
    receiver: Receiver,
    pipeline: Pipeline,
}

impl Setup {
    async fn start(prefix: &str, partitions: i32, max_wait_s: u64) -> anyhow::Result<Self> {
        let id = unique(prefix);
        let topic = format!("{id}-orders");
        let audit_topic = format!("{id}-audit");
        create_topic(&regional_bootstrap(), &topic, partitions).await?;
        create_audit_topic(&audit_topic).await?;
        wait_for_topics(
            &aggregate_bootstrap(),
            &[format!("regional.{topic}")],
            Duration::from_secs(120),
        )
        .await?;
        let db = TestDb::create().await?;
        let receiver = Receiver::start().await?;
        let spec = spec(&id, &audit_topic, &topic, max_wait_s, &receiver);
        let pipeline = Pipeline::start(&db, &spec).await?;
        Ok(Self {
            id,
            topic,
            audit_topic,
            db,
            receiver,
            pipeline,
        })
    }
}

/// Verdicts of `topic` that were ever something that notifies.
async fn alarming(db: &TestDb, topic: &str) -> anyhow::Result<Vec<AlarmingRow>> {
    Ok(sqlx::query_as(
        "SELECT edge, partition, bucket_start_ms, old_status, status, expected, actual,
                final_reason, changed_at::text
           FROM reconcile_verdict_history
          WHERE topic = $1 AND status IN ('missing', 'duplicated', 'tier_silent')
          ORDER BY id",
    )
    .bind(topic)
    .fetch_all(&db.pool)
    .await?)
}

/// A verdict history row that notifies: (edge, partition, bucket start, old status, status,
/// expected, actual, final reason, changed at), printed whole when a test finds one.
type AlarmingRow = (
    String,
    i32,
    i64,
    Option<String>,
    String,
    i64,
    i64,
    String,
    String,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_stopped_past_max_wait_is_lagging_until_it_catches_up() -> anyhow::Result<()> {
    const ROUNDS: usize = 30;
    const PER_ROUND: usize = 40;
    let Setup {
        id,
        topic,
        audit_topic,
        db,
        receiver,
        pipeline,
    } = Setup::start("e2e-stalled", PARTITIONS, 15).await?;
    let outcome = async {
        // Producers write for 30 s; the group stops for 30 s after its first 200 messages.
        let total = ROUNDS * PER_ROUND;
        let g = Group {
            name: format!("{id}-stalled"),
            topic: topic.clone(),
            expect: total,
            transactional: false,
            skip: |_| false,
            pause: Some((200, Duration::from_secs(30))),
            mirror: false,
        };
        let audit = audit_topic.clone();
        let reader = tokio::task::spawn_blocking(move || read_group(g, &audit));
        let registry = prometheus::Registry::new();
        let producer = TestProducer::new(&regional_client(), &audit_topic, &registry)?;
        for _ in 0..ROUNDS {
            producer.send_numbered(&[&topic], PER_ROUND, None).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        producer.shutdown().await;
        let edge = format!("regional->consumer:{id}-stalled");
        reader.await??;
        let n = total as i64;
        let v = eventually("the group's verdicts", Duration::from_secs(180), || async {
            let v = verdicts(&db.pool, &topic).await?;
            Ok((edge_totals(&v, &edge) == (n, n)).then_some(v))
        })
        .await?;
        anyhow::ensure!(
            v.iter().all(|r| r.1 == "complete"),
            "verdicts of {topic}: {v:?}"
        );
        let lagging: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reconcile_verdict_history
              WHERE edge = $1 AND partition = -1 AND status = 'lagging'",
        )
        .bind(&edge)
        .fetch_one(&db.pool)
        .await?;
        anyhow::ensure!(lagging > 0, "never lagging while stopped");
        let alarming = alarming(&db, &topic).await?;
        anyhow::ensure!(alarming.is_empty(), "verdicts that notify: {alarming:?}");
        anyhow::ensure!(
            receiver.received().is_empty(),
            "notified: {:?}",
            receiver.received()
        );
        anyhow::Ok(())
    }
    .await;
    pipeline.finish(outcome, db).await
}

/// Entry point of the member processes [`groups_through_rebalances_are_exact_or_redelivered`]
/// starts (see `chaperone_tests::group`).
#[test]
#[ignore = "a member process of the group test, started by it with its settings"]
fn member_process() -> anyhow::Result<()> {
    group::run_member()
}

const GROUP_PARTITIONS: i32 = 6;

/// Each group's committed offsets, a lookup that fails (a timeout on a loaded host) read as
/// none.
async fn committed_of(groups: &[String], topic: &str) -> Vec<Vec<i64>> {
    let (groups, topic) = (groups.to_vec(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        groups
            .iter()
            .map(|g| {
                group::committed(g, &topic, GROUP_PARTITIONS)
                    .unwrap_or_else(|_| vec![-1; GROUP_PARTITIONS as usize])
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Waits until every group committed past `floor` in every partition; returns the offsets.
async fn committed_past(
    groups: &[String],
    topic: &str,
    floor: &[Vec<i64>],
    what: &str,
) -> anyhow::Result<Vec<Vec<i64>>> {
    eventually(what, Duration::from_secs(120), || async {
        let c = committed_of(groups, topic).await;
        let past = c.len() == floor.len()
            && c.iter()
                .zip(floor)
                .all(|(c, f)| c.iter().zip(f).all(|(c, f)| c > f));
        Ok(past.then_some(c))
    })
    .await
}

/// Waits until every group committed exactly `ends`.
async fn committed_all(groups: &[String], topic: &str, ends: &[i64]) -> anyhow::Result<()> {
    eventually(
        "the groups to commit every message",
        Duration::from_secs(120),
        || async {
            let c = committed_of(groups, topic).await;
            Ok(c.iter().all(|c| c == ends).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_through_rebalances_are_exact_or_redelivered() -> anyhow::Result<()> {
    let Setup {
        id,
        topic,
        audit_topic,
        db,
        receiver,
        pipeline,
    } = Setup::start("e2e-group", GROUP_PARTITIONS, 90).await?;
    let outcome = rebalances(&db, &receiver, &id, &topic, &audit_topic).await;
    pipeline.finish(outcome, db).await
}

/// Two groups of three member processes read `topic` while producers write it: `exact` in
/// transactional mode, `redo` at-least-once. In both, a member joins, one leaves, one is
/// killed with `kill -9` and restarted. Then `redo` is replayed from the start, as an operator
/// would with `kafka-consumer-groups --reset-offsets`: every message is processed twice.
///
/// `exact` is `complete` with exactly what was produced; every verdict of `redo` is
/// `redelivered`, with at least twice that; no verdict notifies and nobody is notified.
async fn rebalances(
    db: &TestDb,
    receiver: &Receiver,
    id: &str,
    topic: &str,
    audit_topic: &str,
) -> anyhow::Result<()> {
    let (exact, redo) = (format!("{id}-exact"), format!("{id}-redo"));
    let groups = [exact.clone(), redo.clone()];
    let member = |group: &str, slot: &str, instance: &str| Member {
        topic: topic.to_owned(),
        audit_topic: audit_topic.to_owned(),
        group: group.to_owned(),
        instance: instance.to_owned(),
        slot: slot.to_owned(),
        transactional: group == exact,
    };
    let start = |slot: &str, instance: &str| -> anyhow::Result<Vec<TestProcess>> {
        groups
            .iter()
            .map(|g| member(g, slot, instance).start())
            .collect()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let writing = Arc::clone(&stop);
    let (topic_w, audit_w) = (topic.to_owned(), audit_topic.to_owned());
    let producer = tokio::spawn(async move {
        let registry = prometheus::Registry::new();
        let p = TestProducer::new(&regional_client(), &audit_w, &registry)?;
        let mut sent = 0;
        while !writing.load(Ordering::Relaxed) {
            p.send_numbered(&[&topic_w], 60, None).await?;
            sent += 60;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        p.shutdown().await;
        anyhow::Ok(sent)
    });

    let none = vec![vec![-1; GROUP_PARTITIONS as usize]; 2];
    let m1 = start("m1", "m1")?;
    let m2 = start("m2", "m2")?;
    let c = committed_past(&groups, topic, &none, "two members to commit").await?;
    let m3 = start("m3", "m3")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = committed_past(&groups, topic, &c, "commits after m3 joined").await?;
    for m in m2 {
        m.stop()?;
    }
    let c = committed_past(&groups, topic, &c, "commits after m2 left").await?;
    for m in m1 {
        m.kill()?;
    }
    let c = committed_past(&groups, topic, &c, "commits after m1 was killed").await?;
    let m1 = start("m1", "m1-restarted")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    committed_past(&groups, topic, &c, "commits after m1 restarted").await?;
    stop.store(true, Ordering::Relaxed);
    let n: i64 = producer.await??;

    let t = topic.to_owned();
    let ends = tokio::task::spawn_blocking(move || {
        end_offsets(&regional_bootstrap(), &t, GROUP_PARTITIONS)
    })
    .await??;
    committed_all(&groups, topic, &ends).await?;
    // Caught up and idle past the last bucket, as a long-running group would be.
    tokio::time::sleep(LINGER).await;
    for m in m1.into_iter().chain(m3) {
        m.stop()?;
    }

    let (g, t) = (redo.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || group::reset_offsets(&g, &t, GROUP_PARTITIONS, 0))
        .await??;
    let replay = member(&redo, "replay", "replay").start()?;
    committed_all(std::slice::from_ref(&redo), topic, &ends).await?;
    tokio::time::sleep(LINGER).await;
    replay.stop()?;

    let (exact_edge, redo_edge) = (
        format!("regional->consumer:{exact}"),
        format!("regional->consumer:{redo}"),
    );
    let v = eventually("the groups' verdicts", Duration::from_secs(180), || async {
        let v = verdicts(&db.pool, topic).await?;
        let (e, a) = edge_totals(&v, &redo_edge);
        let done = edge_totals(&v, "producer->regional") == (n, n)
            && edge_totals(&v, &exact_edge) == (n, n)
            && e == n
            && a >= 2 * n
            && v.iter()
                .filter(|r| r.0 == redo_edge)
                .all(|r| r.1 == "redelivered");
        Ok(done.then_some(v))
    })
    .await?;
    eprintln!("{n} produced; verdicts of {topic}: {v:?}");
    anyhow::ensure!(
        v.iter()
            .all(|r| r.1 == "complete" || r.0 == redo_edge && r.1 == "redelivered"),
        "verdicts of {topic}: {v:?}"
    );
    let alarming = alarming(db, topic).await?;
    anyhow::ensure!(alarming.is_empty(), "verdicts that notify: {alarming:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(
        receiver.received().is_empty(),
        "notified: {:?}",
        receiver.received()
    );
    Ok(())
}
