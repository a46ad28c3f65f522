//! The consumer tier end to end: two audited consumer groups (audit-lib's `AuditedConsumer`)
//! read a topic of the regional cluster that audited producers write, next to the pipeline's
//! chaperone-services and the collector, whose `[reconcile]` has one edge to `consumer:*`.
//!
//! - A group in transactional mode that processes everything: `complete` on its own edge,
//!   `regional->consumer:<group>`, with exactly what was produced.
//! - A group that passes over one message in a hundred (it never says they were processed):
//!   exactly those `missing` on its edge, notified; nothing else is.
//! - A third group, reading another topic only, gets no verdict on this one.

use std::time::{Duration, Instant};

use chaperone_audit::{AuditConfig, AuditedConsumer, ConsumerOptions, CountOn};
use chaperone_test_support::{
    Receiver, TestDb, aggregate_bootstrap, create_topic, eventually, regional_bootstrap, unique,
    wait_for_topics,
};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec, create_audit_topic};
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
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        topics_regex: format!("{topic}|{other}"),
        bucket_width: "10s".into(),
        reconcile: r#"interval = "1s"
allowed_lateness = "2s"
settle = "2s"
max_wait = "90s"
tiers = ["producer", "regional", "aggregate", "consumer:*"]
[[reconcile.edges]]
from = "producer"
to = "regional"
per_datacenter = true
[[reconcile.edges]]
from = "regional"
to = "aggregate"
[[reconcile.edges]]
from = "regional"
to = "consumer:*""#
            .into(),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"ops\"\nurl = \"{}\"\n",
            receiver.url()
        ),
        regional_exclude: Vec::new(),
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    let outcome = scenario(&db, &receiver, &id, &topic, &other, &audit_topic).await;
    let stopped = pipeline.stop().await;
    outcome?;
    stopped?;
    db.drop_db().await
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
}

/// Reads as `g` until it received what it expects, counting each message as processed except
/// those it skips, committing every 500; goes on polling (caught up, idle) until `until`, as a
/// long-running consumer would past the end of the messages' bucket; then closes cleanly.
fn read_group(g: Group, audit_topic: &str, until: Instant) -> anyhow::Result<Read> {
    let Group {
        name: group,
        topic,
        expect,
        transactional,
        skip,
    } = g;
    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", regional_bootstrap())
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
        ..ConsumerOptions::default()
    };
    let consumer =
        AuditedConsumer::with_options(&kafka, audit, options, &prometheus::Registry::new())?;
    consumer.subscribe(&[&topic])?;
    let mut read = Read {
        received: 0,
        passed_over: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while read.received < expect || Instant::now() < until {
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
    // The messages' 10 s bucket is over, with the 2 s lateness and a flush, by then.
    let until = Instant::now() + Duration::from_secs(14);

    let group = |suffix: &str, topic: &str, expect: usize, transactional: bool| Group {
        name: format!("{id}-{suffix}"),
        topic: topic.to_owned(),
        expect,
        transactional,
        skip: |_| false,
    };
    let groups = [
        group("clean", topic, MESSAGES, true),
        Group {
            skip: |offset| offset % 100 == 7,
            ..group("lossy", topic, MESSAGES, false)
        },
        group("elsewhere", other, 100, false),
    ];
    let mut reads = Vec::new();
    for g in groups {
        let audit = audit_topic.to_owned();
        reads.push(tokio::task::spawn_blocking(move || {
            read_group(g, &audit, until)
        }));
    }
    let mut passed_over = 0;
    for r in reads {
        passed_over += r.await??.passed_over as i64;
    }
    anyhow::ensure!(passed_over > 0, "the lossy group passed nothing over");

    let n = MESSAGES as i64;
    let (clean, lossy, elsewhere) = (
        format!("regional->consumer:{id}-clean"),
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
    let o = verdicts(&db.pool, other).await?;
    anyhow::ensure!(
        edge_totals(&o, &elsewhere) == (100, 100),
        "the group reading {other}: {o:?}"
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
