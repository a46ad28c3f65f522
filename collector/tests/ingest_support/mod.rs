//! What the collector's ingest, API and web tests share beyond `chaperone-test-support` (where
//! the stack's addresses, the database, topic creation and polling live): the database these
//! tests use, an audit topic per test, record builders, producing, and running the collector
//! in-process or as its real binary.
//!
//! Tests fail (never skip) when the stack from `dev/stack up` is not there.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chaperone_audit::{
    AuditRecord, BucketWidth, Counts, Latency, Observer, Progress, SequenceIds, Tier,
};
use chaperone_collector::config::{ClusterConfig, Config};
use chaperone_collector::{Clock, Deps};
use chaperone_test_support::{create_topic, regional_bootstrap};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

// The shared helpers every test of this module's family uses, for `use ingest_support::*`.
pub use chaperone_test_support::{TestDb, eventually, unique};

/// Start of the bucket most test records fall in.
pub const BUCKET: i64 = 1_764_067_200_000;

/// Pool settings of these tests: a short acquire timeout, so that the collector's writes fail
/// fast while PostgreSQL is stopped.
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
}

/// A migrated database of its own for one test (see [`pool_options`]); drop it with
/// [`TestDb::drop_db`] at the end of a test that passed.
pub async fn ingest_db() -> anyhow::Result<TestDb> {
    TestDb::create_with(pool_options()).await
}

/// An audit topic and its dead-letter topic, both new, on the cluster the collector calls
/// `alias`.
#[derive(Debug, Clone)]
pub struct Topics {
    pub audit: String,
    pub dlq: String,
    pub partitions: i32,
    pub alias: String,
    pub bootstrap: String,
}

impl Topics {
    /// On the regional cluster, alias `regional`.
    pub async fn create(partitions: i32) -> anyhow::Result<Self> {
        Self::create_on("regional", &regional_bootstrap(), partitions).await
    }

    pub async fn create_on(alias: &str, bootstrap: &str, partitions: i32) -> anyhow::Result<Self> {
        let t = Self {
            audit: unique("audit"),
            dlq: unique("audit-dlq"),
            partitions,
            alias: alias.into(),
            bootstrap: bootstrap.into(),
        };
        create_topic(bootstrap, &t.audit, partitions).await?;
        create_topic(bootstrap, &t.dlq, 1).await?;
        Ok(t)
    }

    pub fn cluster(&self) -> ClusterConfig {
        ClusterConfig {
            alias: self.alias.clone(),
            bootstrap: self.bootstrap.clone(),
            audit_topic: self.audit.clone(),
            dlq_topic: self.dlq.clone(),
            librdkafka: BTreeMap::new(),
        }
    }
}

/// A configuration reading `topics` into `db`, with small batches so tests exercise many.
pub fn config(db: &TestDb, topics: &Topics) -> Config {
    let mut c = Config::default();
    c.database.url = Some(db.url.clone());
    c.clusters = vec![topics.cluster()];
    c.ingest.batch_size = 500;
    c.ingest.linger = Duration::from_millis(50);
    c.ingest.partition_refresh = Duration::from_secs(2);
    c.ingest.retry_max = Duration::from_secs(1);
    c.api.listen = "127.0.0.1:0".parse().expect("address");
    // These tests are about ingest; reconciliation and alerts have their own.
    c.reconcile.enabled = false;
    c.alerts.enabled = false;
    // The records' buckets are older than any retention; a leader (again after a restart of
    // PostgreSQL) would delete them.
    c.retention.days = 0;
    c
}

/// The TOML form of [`config`], for the binary.
pub fn config_toml(db: &TestDb, topics: &Topics) -> String {
    config_toml_for(db, &[topics])
}

/// [`config_toml`] reading every cluster of `clusters`.
pub fn config_toml_for(db: &TestDb, clusters: &[&Topics]) -> String {
    let clusters: String = clusters
        .iter()
        .map(|t| {
            format!(
                r#"
[[clusters]]
alias = "{alias}"
bootstrap = "{bootstrap}"
audit_topic = "{audit}"
dlq_topic = "{dlq}"
"#,
                alias = t.alias,
                bootstrap = t.bootstrap,
                audit = t.audit,
                dlq = t.dlq,
            )
        })
        .collect();
    format!(
        r#"
[database]
url = "{url}"
{clusters}
[ingest]
batch_size = 500
linger = "50ms"
partition_refresh = "2s"
retry_max = "1s"

[api]
listen = "127.0.0.1:0"

[retention]
days = 0

[reconcile]
enabled = false

[alerts]
enabled = false
"#,
        url = db.url,
    )
}

/// A free port on 127.0.0.1 for a collector binary's API.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The sum of metric `name`'s samples in the Prometheus exposition `text`, over every label
/// value or, with `label` (such as `reason="too_large"`), over the samples holding it.
pub fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| label.is_none_or(|lv| l.contains(lv)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A collector running in this process.
pub struct InProcess {
    pub shutdown: CancellationToken,
    pub addr: std::net::SocketAddr,
    pub registry: prometheus::Registry,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub async fn start(config: Config, pool: PgPool, token: Option<&str>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let registry = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let deps = Deps {
            pool,
            listener,
            registry: registry.clone(),
            clock: Clock::system(),
            api_token: token.map(str::to_owned),
        };
        let task = tokio::spawn(chaperone_collector::run(config, deps, shutdown.clone()));
        Ok(Self {
            shutdown,
            addr,
            registry,
            task,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("collector did not stop within 30 s")??
    }
}

/// The collector binary, started with a configuration file.
pub struct Binary {
    pub child: std::process::Child,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file deleted on drop.
    #[derive(Debug)]
    pub struct TempPath(pub std::path::PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Binary {
    pub fn spawn(toml: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("collector-config")));
        std::fs::write(&path, toml)?;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone-collector"))
            .arg("--config")
            .arg(&path)
            .env_remove("DATABASE_URL")
            .env_remove("CHAPERONE_COLLECTOR_LISTEN")
            .env_remove("CHAPERONE_COLLECTOR_API_TOKEN")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("spawning chaperone-collector")?;
        Ok(Self {
            child,
            _config: tempfile_path::TempPath(path),
        })
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Fails if the process exited.
    pub fn assert_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("collector exited unexpectedly: {status}");
        }
        Ok(())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn observer(tier: Tier, dc: &str, host: &str) -> Observer {
    Observer {
        tier,
        datacenter: dc.into(),
        cluster: "regional".into(),
        host: host.into(),
        instance: "1".into(),
    }
}

/// A counts record with `latencies` (ms) as its latency values and count.
pub fn counts(
    id: &str,
    topic: &str,
    partition: Option<i32>,
    bucket_start_ms: i64,
    observer: Observer,
    latencies: &[i64],
) -> Counts {
    let mut latency = Latency::new();
    for &l in latencies {
        latency.record(l);
    }
    let n = latencies.len() as u64;
    Counts {
        id: id.into(),
        topic: topic.into(),
        physical_topic: topic.into(),
        partition,
        bucket_start_ms,
        bucket_width: BucketWidth::default(),
        observer,
        count: n,
        bytes: n * 100,
        no_timestamp: 0,
        malformed: 0,
        min_event_ms: (n > 0).then_some(bucket_start_ms + 1),
        max_event_ms: (n > 0).then_some(bucket_start_ms + 59_000),
        latency,
        emitted_at_ms: bucket_start_ms + 70_000,
    }
}

pub fn progress(
    id: &str,
    topic: &str,
    partition: i32,
    watermark_ms: i64,
    position: i64,
) -> Progress {
    Progress {
        id: id.into(),
        topic: topic.into(),
        physical_topic: topic.into(),
        partition: Some(partition),
        observer: observer(Tier::Regional, "dc1", "svc-1"),
        position: Some(position),
        high_watermark: Some(position),
        watermark_ms,
        bucket_width: BucketWidth::default(),
        emitted_at_ms: watermark_ms + 1_000,
        closing: false,
        at_least_once: false,
    }
}

/// A producer to the regional cluster.
pub fn producer() -> anyhow::Result<FutureProducer> {
    producer_on(&regional_bootstrap())
}

pub fn producer_on(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?)
}

/// Produces `payloads` to `topic`, payload `i` to partition `i % partitions`, and waits for
/// every acknowledgement.
pub async fn produce(topic: &Topics, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
    let producer = producer_on(&topic.bootstrap)?;
    produce_with(&producer, topic, payloads, 0).await
}

/// Produces `payloads` in order to one partition of the audit topic and waits for every
/// acknowledgement.
pub async fn produce_to(
    topic: &Topics,
    partition: i32,
    payloads: &[Vec<u8>],
) -> anyhow::Result<()> {
    let producer = producer_on(&topic.bootstrap)?;
    for p in payloads {
        let rec = FutureRecord::<(), [u8]>::to(&topic.audit)
            .payload(p.as_slice())
            .partition(partition);
        producer
            .send(rec, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

pub async fn produce_with(
    producer: &FutureProducer,
    topic: &Topics,
    payloads: &[Vec<u8>],
    first_index: usize,
) -> anyhow::Result<()> {
    let mut inflight = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let partition = ((first_index + i) % topic.partitions as usize) as i32;
        loop {
            let rec = FutureRecord::<(), [u8]>::to(&topic.audit)
                .payload(p.as_slice())
                .partition(partition);
            match producer.send_result(rec) {
                Ok(f) => {
                    inflight.push(f);
                    break;
                }
                Err((e, _)) => {
                    if inflight.is_empty() {
                        bail!("cannot produce: {e}");
                    }
                    let f = inflight.remove(0);
                    f.await?.map_err(|(e, _)| e)?;
                }
            }
        }
    }
    for f in inflight {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Encodes records.
pub fn encode_all(records: &[AuditRecord]) -> Vec<Vec<u8>> {
    records.iter().map(AuditRecord::encode).collect()
}

/// End offsets (high watermarks) of every partition of the audit topic.
pub async fn end_offsets(topic: &Topics) -> anyhow::Result<BTreeMap<i32, i64>> {
    let t = topic.clone();
    let ends = tokio::task::spawn_blocking(move || {
        chaperone_test_support::end_offsets(&t.bootstrap, &t.audit, t.partitions)
    })
    .await??;
    Ok((0..).zip(ends).collect())
}

/// Stored next offsets of the test's audit topic.
pub async fn stored_offsets(pool: &PgPool, topic: &Topics) -> anyhow::Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM ingest_offsets WHERE cluster = $1 AND topic = $2",
    )
    .bind(&topic.alias)
    .bind(&topic.audit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Waits until the stored offsets reach the end of every partition.
pub async fn wait_caught_up(
    pool: &PgPool,
    topic: &Topics,
    timeout: Duration,
) -> anyhow::Result<()> {
    let end = end_offsets(topic).await?;
    eventually(
        "the collector to store every audit record",
        timeout,
        || async {
            let stored = match stored_offsets(pool, topic).await {
                Ok(s) => s,
                Err(_) => return Ok(None), // PostgreSQL may be restarting
            };
            Ok(end
                .iter()
                .all(|(p, &e)| e == 0 || stored.get(p).copied() == Some(e))
                .then_some(()))
        },
    )
    .await
}

/// (topic, bucket start, tier, datacenter, partition).
pub type TotalsKey = (String, i64, String, String, i32);
/// (count, bytes, records).
pub type Totals = BTreeMap<TotalsKey, (i64, i64, i64)>;
type TotalsRow = (String, i64, String, String, i32, i64, i64, i64);

/// Latency values in the stored histograms, and in the counts records of `records`: equal
/// when every record's histogram was merged exactly once.
pub async fn latency_samples(pool: &PgPool, records: &[AuditRecord]) -> anyhow::Result<(u64, u64)> {
    let stored: u64 = sqlx::query_scalar::<_, Vec<u8>>("SELECT latency FROM audit_counts")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|h| Latency::from_bytes(h).map(|h| h.len()))
        .sum::<Result<u64, _>>()
        .map_err(anyhow::Error::msg)?;
    let sent = records
        .iter()
        .map(|r| match r {
            AuditRecord::Counts(c) => c.latency.len(),
            AuditRecord::Progress(_) => 0,
        })
        .sum();
    Ok((stored, sent))
}

/// Totals per (topic, bucket, tier, datacenter, partition) as stored.
pub async fn stored_totals(pool: &PgPool) -> anyhow::Result<Totals> {
    let rows: Vec<TotalsRow> = sqlx::query_as(
        "SELECT topic, bucket_start_ms, tier, datacenter, partition, count, bytes, records \
         FROM audit_counts",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, b, tier, dc, p, c, by, r)| ((t, b, tier, dc, p), (c, by, r)))
        .collect())
}

/// Expected totals of `records` (each id once).
pub fn expected_totals(records: &[AuditRecord]) -> Totals {
    let mut seen = std::collections::HashSet::new();
    let mut out: BTreeMap<_, (i64, i64, i64)> = BTreeMap::new();
    for r in records {
        if !seen.insert(r.id().to_owned()) {
            continue;
        }
        if let AuditRecord::Counts(c) = r {
            let e = out
                .entry((
                    c.topic.clone(),
                    c.bucket_start_ms,
                    c.observer.tier.to_string(),
                    c.observer.datacenter.clone(),
                    c.partition.unwrap_or(-1),
                ))
                .or_default();
            e.0 += c.count as i64;
            e.1 += c.bytes as i64;
            e.2 += 1;
        }
    }
    out
}

/// Records of several topics, tiers, datacenters, partitions and buckets. The producer
/// tier's records carry numbered ids, a stream per host and topic, as audit-lib writes them
/// (filtered by `audit_record_ranges`); the others ids `<prefix>-<i>` (filtered by
/// `audit_record_seen`).
pub fn mixed_records(prefix: &str, n: usize) -> Vec<AuditRecord> {
    let mut numbered: HashMap<String, SequenceIds> = HashMap::new();
    (0..n)
        .map(|i| {
            let tier = if i % 3 == 0 {
                Tier::Producer
            } else {
                Tier::Regional
            };
            let dc = if i % 2 == 0 { "dc1" } else { "dc2" };
            let host = format!("host-{}", i % 6);
            let topic = format!("orders-{}", i % 3);
            let id = if tier == Tier::Producer {
                numbered.entry(host.clone()).or_default().next(&topic)
            } else {
                format!("{prefix}-{i}")
            };
            let lat: Vec<i64> = (0..(i % 7 + 1) as i64).map(|j| j * 13 + i as i64).collect();
            AuditRecord::Counts(counts(
                &id,
                &topic,
                if i % 5 == 0 {
                    None
                } else {
                    Some((i % 4) as i32)
                },
                BUCKET + 60_000 * (i % 4) as i64,
                observer(tier, dc, &host),
                &lat,
            ))
        })
        .collect()
}

/// How many distinct counts records the duplicate filters hold: ids in `audit_record_seen`
/// and sequence numbers in `audit_record_ranges`.
pub async fn applied_records(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM audit_record_seen) \
              + (SELECT COALESCE(sum(upper(r) - lower(r)), 0)::int8 \
                   FROM audit_record_ranges, unnest(ranges) AS r)",
    )
    .fetch_one(pool)
    .await?)
}

/// Sum of a counter (optionally of one label value) in `registry`.
pub fn metric(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| match label {
            None => true,
            Some((k, v)) => m
                .get_label()
                .iter()
                .any(|l| l.name() == k && l.value() == v),
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// One record of a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub error: String,
    pub source: String,
    pub payload: Vec<u8>,
}

/// Reads the dead-letter topic of `topics` until it holds `n` records, failing after
/// `timeout`; then checks for `quiet` that no further one arrives.
pub async fn dead_letters(
    topics: &Topics,
    n: usize,
    timeout: Duration,
    quiet: Duration,
) -> anyhow::Result<Vec<DeadLetter>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &topics.bootstrap)
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[&topics.dlq])?;
    let header = |m: &rdkafka::message::BorrowedMessage<'_>, key: &str| {
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == key))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let wait = if out.len() < n {
            tokio::time::timeout_at(deadline, consumer.recv()).await
        } else {
            tokio::time::timeout(quiet, consumer.recv()).await
        };
        let m = match wait {
            Ok(m) => m?,
            Err(_) if out.len() < n => {
                bail!("only {} of {n} dead letters after {timeout:?}", out.len())
            }
            Err(_) => return Ok(out),
        };
        out.push(DeadLetter {
            reason: header(&m, "chaperone-dlq-reason"),
            error: header(&m, "chaperone-dlq-error"),
            source: header(&m, "chaperone-dlq-source"),
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
}
