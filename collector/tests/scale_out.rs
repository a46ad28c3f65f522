//! Several collectors on one database: two real binaries share the audit topic's partitions
//! through the consumer group, the leader is killed with SIGKILL while batches are being
//! stored, a new one starts and takes partitions back. The stored totals must be exact, no
//! record may even reach the duplicate filter (a partition's writes are fenced by its
//! stored offset, so a record is never applied or offered twice), the reconciler must move
//! to the survivor within seconds, and the webhook must hear about the incident once.

mod ingest_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, Tier};
use chaperone_test_support::Receiver;
use ingest_support::*;

const RECORDS: usize = 30_000;

/// One collector binary and the port of its API.
struct Collector {
    binary: Binary,
    port: u16,
}

impl Collector {
    fn start(db: &TestDb, topics: &Topics, hook: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let base = config_toml(db, topics);
        let toml = base
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
            .replace(
                "[reconcile]\nenabled = false",
                "[reconcile]\ninterval = \"1s\"\nallowed_lateness = \"1s\"\nsettle = \"1s\"\n\
                 max_wait = \"2s\"\nloss_after = \"3s\"\nlookback = \"1d\"",
            )
            .replace(
                "[alerts]\nenabled = false",
                &format!(
                    "[alerts]\npoll_interval = \"200ms\"\n\n[[alerts.webhooks]]\nname = \"ops\"\nurl = \"{hook}\""
                ),
            );
        anyhow::ensure!(
            toml.contains("[[alerts.webhooks]]") && toml.contains("loss_after"),
            "the test configuration was not rewritten: {toml}"
        );
        Ok(Self {
            binary: Binary::spawn(&toml)?,
            port,
        })
    }

    /// The value of a metric without labels, or the sum over its label values; `None` while
    /// the collector does not answer.
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(metric_sum(&text, name, None))
    }
}

/// Counts of one bucket five minutes ago: 100 produced in dc1, 90 of them reached the
/// regional cluster. With no progress reported, the loss is judged `missing` once
/// `loss_after` has passed.
fn loss(topic: &str) -> Vec<AuditRecord> {
    let now = chrono::Utc::now().timestamp_millis();
    let bucket = (now / 60_000 - 5) * 60_000;
    let lat = |n: usize| vec![5i64; n];
    vec![
        AuditRecord::Counts(counts(
            &unique("loss-p"),
            topic,
            Some(0),
            bucket,
            observer(Tier::Producer, "dc1", "producer-1"),
            &lat(100),
        )),
        AuditRecord::Counts(counts(
            &unique("loss-r"),
            topic,
            Some(0),
            bucket,
            observer(Tier::Regional, "dc1", "svc-1"),
            &lat(90),
        )),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_share_ingest_and_survive_kill_9_of_the_leader() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(6).await?;
    let receiver = Receiver::start().await?;
    let loss_topic = unique("lossy");
    let first = mixed_records(&unique("scale"), RECORDS);
    let mut all = loss(&loss_topic);
    all.extend(first.iter().cloned());
    produce(&topics, &encode_all(&all)).await?;

    let mut a = Collector::start(&db, &topics, &receiver.url())?;
    let mut b = Collector::start(&db, &topics, &receiver.url())?;

    // Both read partitions, one leads, and the incident reaches the webhook.
    let leader = eventually(
        "both collectors to read partitions and one to lead",
        Duration::from_secs(60),
        || async {
            let (Some(pa), Some(pb), Some(la), Some(lb)) = (
                a.metric("chaperone_collector_assigned_partitions").await,
                b.metric("chaperone_collector_assigned_partitions").await,
                a.metric("chaperone_collector_leader").await,
                b.metric("chaperone_collector_leader").await,
            ) else {
                return Ok(None);
            };
            let ready = pa > 0.0 && pb > 0.0 && la + lb == 1.0;
            Ok(ready.then_some(if la == 1.0 { 'a' } else { 'b' }))
        },
    )
    .await?;
    eventually(
        "the incident's firing notification",
        Duration::from_secs(60),
        || async { Ok((!receiver.received().is_empty()).then_some(())) },
    )
    .await?;

    // Kill the leader while batches are being stored: more records arrive meanwhile.
    a.binary.assert_running()?;
    b.binary.assert_running()?;
    let (mut victim, survivor) = if leader == 'a' { (a, b) } else { (b, a) };
    let second = mixed_records(&unique("scale2"), RECORDS);
    let producing = {
        let topics = topics.clone();
        let payloads = encode_all(&second);
        tokio::spawn(async move { produce(&topics, &payloads).await })
    };
    let before: i64 = stored_offsets(&db.pool, &topics).await?.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        victim.binary.assert_running()?;
        let now: i64 = stored_offsets(&db.pool, &topics).await?.values().sum();
        if now > before {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing stored after the second produce"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    victim.binary.kill9()?;
    let killed = Instant::now();
    eventually("the survivor to lead", Duration::from_secs(15), || async {
        let l = survivor.metric("chaperone_collector_leader").await;
        Ok((l == Some(1.0)).then_some(()))
    })
    .await?;
    let takeover = killed.elapsed();
    producing.await??;

    // The survivor takes the dead collector's partitions once the group drops it; a new
    // collector then joins and partitions move to it.
    let mut third = Collector::start(&db, &topics, &receiver.url())?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(120)).await?;
    eventually(
        "the new collector to read partitions",
        Duration::from_secs(60),
        || async {
            let p = third
                .metric("chaperone_collector_assigned_partitions")
                .await;
            Ok(p.is_some_and(|p| p > 0.0).then_some(()))
        },
    )
    .await?;
    let third_records = mixed_records(&unique("scale3"), RECORDS / 3);
    produce(&topics, &encode_all(&third_records)).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(120)).await?;
    third.binary.assert_running()?;

    let mut produced = all.clone();
    produced.extend(second);
    produced.extend(third_records);
    let stored = stored_totals(&db.pool).await?;
    assert_eq!(
        stored,
        expected_totals(&produced),
        "counts, bytes and applied records per row"
    );
    for (name, c) in [("survivor", &survivor), ("new collector", &third)] {
        let dup = c
            .metric("chaperone_collector_records_duplicate_total")
            .await;
        assert_eq!(
            dup,
            Some(0.0),
            "the {name} was offered {dup:?} records already applied"
        );
    }
    let (samples, expected_samples) = latency_samples(&db.pool, &produced).await?;
    assert_eq!(
        samples, expected_samples,
        "latency values in the histograms"
    );

    // Each incident notified once, whoever led when.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut notified: BTreeMap<(String, String), usize> = BTreeMap::new();
    for n in receiver.received() {
        let body = n.json()?;
        let kind = n
            .headers
            .get("x-chaperone-event")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        *notified
            .entry((body["incident_id"].to_string(), kind))
            .or_default() += 1;
    }
    let incidents: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_incidents")
        .fetch_one(&db.pool)
        .await?;
    assert!(incidents > 0, "the loss opened no incident");
    assert!(
        notified.len() == incidents as usize
            && notified
                .iter()
                .all(|((_, kind), n)| kind == "firing" && *n == 1),
        "one firing notification per incident ({incidents}): {notified:?}"
    );
    println!(
        "leader killed: the survivor led after {} ms",
        takeover.as_millis()
    );
    drop(survivor);
    drop(third);
    db.drop_db().await
}
