//! A leader cut off from PostgreSQL in the middle of a reconcile pass: two real collector
//! binaries share one database and the audit topic's partitions; the leader's connections go
//! through a proxy that freezes right after the leader has taken the reconciler's lock in an
//! open transaction. PostgreSQL then sees open, silent sessions (a network partition), and
//! the leader process is killed, so that Kafka hands its partitions over as it would for a
//! host that dropped off the network.
//!
//! Without session timeouts the frozen transaction would hold the reconciler's lock (and any
//! row locks of its ingest batch) until TCP gave the connection up, about 2 h, and the new
//! leader's reconcile, and the alerts that follow from it, would wait as long. With
//! `idle_in_transaction_session_timeout` (3 s in this test) PostgreSQL ends the frozen
//! sessions, and the survivor must lead, judge a new loss, notify the webhook of it and store
//! every record produced after the cut, within the deadlines below.

mod ingest_support;

use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, Tier};
use chaperone_test_support::{FreezingProxy, Receiver};
use ingest_support::*;
use sqlx::postgres::PgConnectOptions;

const RECORDS: usize = 3_000;

/// Session timeouts of the test's collectors: short, so that the cut-off leader's
/// transaction ends within seconds.
const SESSION_TIMEOUTS: &str = "statement_timeout = \"5s\"\nlock_timeout = \"1s\"\n\
                                idle_in_transaction_session_timeout = \"3s\"\n";

/// How long the survivor may take to lead, judge, notify and ingest after the cut: the
/// leader lease (10 s), the idle-in-transaction timeout (3 s), Kafka's session timeout (6 s)
/// and the reconcile timings, with room for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(90);

struct Collector {
    binary: Binary,
    port: u16,
}

impl Collector {
    /// A collector binary storing into `url` (the test database, perhaps through a proxy).
    fn start(db: &TestDb, url: &str, topics: &Topics, hook: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let toml = config_toml(db, topics)
            .replace(
                &format!("url = \"{}\"\n", db.url),
                &format!("url = \"{url}\"\n{SESSION_TIMEOUTS}"),
            )
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
            .replace(
                &format!("dlq_topic = \"{}\"\n", topics.dlq),
                &format!(
                    "dlq_topic = \"{}\"\n[clusters.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n",
                    topics.dlq
                ),
            )
            .replace(
                "[reconcile]\nenabled = false",
                "[reconcile]\ninterval = \"1s\"\nallowed_lateness = \"1s\"\nsettle = \"1s\"\n\
                 max_wait = \"2s\"\nloss_after = \"3s\"\nlookback = \"1d\"",
            )
            .replace(
                "[alerts]\nenabled = false",
                &format!(
                    "[alerts]\npoll_interval = \"200ms\"\nrequest_timeout = \"2s\"\n\n\
                     [[alerts.webhooks]]\nname = \"ops\"\nurl = \"{hook}\""
                ),
            );
        for part in [
            "idle_in_transaction_session_timeout",
            "session.timeout.ms",
            "[[alerts.webhooks]]",
            "loss_after",
            &format!("127.0.0.1:{port}"),
        ] {
            anyhow::ensure!(
                toml.contains(part),
                "the test configuration was not rewritten ({part}): {toml}"
            );
        }
        Ok(Self {
            binary: Binary::spawn(&toml)?,
            port,
        })
    }

    /// The value of a metric, summed over its labels; `None` while the collector does not
    /// answer.
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
/// regional cluster. With no progress reported, the bucket is judged bad (the regional tier
/// is silent about it) once `max_wait` has passed.
fn loss(topic: &str) -> Vec<AuditRecord> {
    let now = chrono::Utc::now().timestamp_millis();
    let bucket = (now / 60_000 - 5) * 60_000;
    [
        (Tier::Producer, "producer-1", 100),
        (Tier::Regional, "svc-1", 90),
    ]
    .into_iter()
    .map(|(tier, host, n)| {
        AuditRecord::Counts(counts(
            &unique("loss"),
            topic,
            Some(0),
            bucket,
            observer(tier, "dc1", host),
            &vec![5i64; n],
        ))
    })
    .collect()
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let options: PgConnectOptions = url.parse()?;
    let server = format!("@{}:{}/", options.get_host(), options.get_port());
    anyhow::ensure!(url.contains(&server), "no `{server}` in the database URL");
    Ok(url.replacen(&server, &format!("@{addr}/"), 1))
}

/// Sessions of `ports` (clients of the proxy) that sit in an open transaction holding an
/// advisory lock.
async fn frozen_lock_holders(db: &TestDb, ports: &[u16]) -> anyhow::Result<i64> {
    let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT a.pid) FROM pg_stat_activity a
           JOIN pg_locks l ON l.pid = a.pid
          WHERE a.client_port = ANY($1) AND a.state LIKE 'idle in transaction%'
            AND l.locktype = 'advisory' AND l.granted",
    )
    .bind(&ports)
    .fetch_one(&db.pool)
    .await?)
}

/// Sessions of `ports` that sit in an open transaction, or hold or wait for any lock. (Idle
/// sessions outside a transaction hold nothing; PostgreSQL keeps those until TCP gives up.)
async fn sessions_holding_on(db: &TestDb, ports: &[u16]) -> anyhow::Result<i64> {
    let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a
          WHERE a.client_port = ANY($1)
            AND (a.xact_start IS NOT NULL
                 OR EXISTS (SELECT 1 FROM pg_locks l
                             WHERE l.pid = a.pid AND l.locktype <> 'virtualxid'))",
    )
    .bind(&ports)
    .fetch_one(&db.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_mid_pass_does_not_hold_the_new_leader_back() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(4).await?;
    let receiver = Receiver::start().await?;
    let proxy = FreezingProxy::start(&{
        let o: PgConnectOptions = db.url.parse()?;
        format!("{}:{}", o.get_host(), o.get_port())
    })
    .await?;

    // The first collector, through the proxy, leads; the second joins the group.
    let mut a = Collector::start(
        &db,
        &through(&db.url, proxy.addr())?,
        &topics,
        &receiver.url(),
    )?;
    eventually("the first collector to lead", DEADLINE, || async {
        Ok((a.metric("chaperone_collector_leader").await == Some(1.0)).then_some(()))
    })
    .await?;
    let mut b = Collector::start(&db, &db.url, &topics, &receiver.url())?;
    eventually("both collectors to read partitions", DEADLINE, || async {
        let (Some(pa), Some(pb)) = (
            a.metric("chaperone_collector_assigned_partitions").await,
            b.metric("chaperone_collector_assigned_partitions").await,
        ) else {
            return Ok(None);
        };
        Ok((pa > 0.0 && pb > 0.0).then_some(()))
    })
    .await?;
    let first = mixed_records(&unique("before"), RECORDS);
    produce(&topics, &encode_all(&first)).await?;
    wait_caught_up(&db.pool, &topics, DEADLINE).await?;

    // Cut the leader off right after PostgreSQL granted it the reconciler's lock (the lock's
    // key is sent with every reconcile transaction), more records arriving meanwhile.
    proxy.freeze_after(b"chaperone-reconcile");
    let second = mixed_records(&unique("during"), RECORDS);
    let producing = {
        let topics = topics.clone();
        let payloads = encode_all(&second);
        tokio::spawn(async move { produce(&topics, &payloads).await })
    };
    eventually("the leader's next reconcile pass", DEADLINE, || async {
        Ok(proxy.is_frozen().then_some(()))
    })
    .await?;
    let cut = Instant::now();
    let ports = proxy.upstream_ports();
    eventually(
        "a frozen session holding the reconciler's lock in an open transaction",
        Duration::from_secs(10),
        || async { Ok((frozen_lock_holders(&db, &ports).await? > 0).then_some(())) },
    )
    .await?;
    a.binary.assert_running()?;
    b.binary.assert_running()?;
    a.binary.kill9()?;
    producing.await??;

    // A loss that only the survivor can ingest, judge and notify.
    let lossy = unique("lossy");
    let third = loss(&lossy);
    produce(&topics, &encode_all(&third)).await?;

    eventually("the survivor to lead", DEADLINE, || async {
        Ok((b.metric("chaperone_collector_leader").await == Some(1.0)).then_some(()))
    })
    .await?;
    let judged: String = eventually("the survivor's verdict on the loss", DEADLINE, || async {
        Ok(sqlx::query_scalar(
            "SELECT status FROM reconcile_verdicts
              WHERE topic = $1 AND partition = -1 AND edge = 'producer->regional'",
        )
        .bind(&lossy)
        .fetch_optional(&db.pool)
        .await?)
    })
    .await?;
    let judged_after = cut.elapsed();
    eventually("the webhook to hear about the loss", DEADLINE, || async {
        Ok(receiver
            .received()
            .iter()
            .any(|n| n.json().is_ok_and(|j| j["topic"] == lossy.as_str()))
            .then_some(()))
    })
    .await?;
    let notified_after = cut.elapsed();
    wait_caught_up(&db.pool, &topics, DEADLINE).await?;
    let stored_after = cut.elapsed();
    b.binary.assert_running()?;

    let mut produced = first;
    produced.extend(second);
    produced.extend(third);
    assert_eq!(
        stored_totals(&db.pool).await?,
        expected_totals(&produced),
        "counts, bytes and applied records per row"
    );
    assert!(
        ["missing", "tier_silent"].contains(&judged.as_str()),
        "the loss was judged {judged}"
    );
    // PostgreSQL ended the cut-off leader's transactions (the proxy still holds their
    // connections open).
    assert_eq!(
        sessions_holding_on(&db, &ports).await?,
        0,
        "sessions of the cut-off leader still in a transaction or holding locks"
    );
    println!(
        "leader cut off mid-pass: the survivor judged the new loss after {} ms, notified it \
         after {} ms and had stored every record after {} ms",
        judged_after.as_millis(),
        notified_after.as_millis(),
        stored_after.as_millis()
    );
    drop(b);
    drop(proxy);
    db.drop_db().await
}
