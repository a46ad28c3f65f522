//! Sustained ingest of audit records into PostgreSQL, against a plain batched INSERT of the
//! same rows measured in the same run, for two workloads.
//!
//! Run with `cargo bench -p chaperone-collector --bench ingest` against the stack from
//! `dev/stack up`; `cargo bench -p chaperone-collector --bench ingest -- fleet` (or
//! `-- worst-case`) runs one workload only.
//!
//! **worst-case** (`BENCH_RECORDS` records, default 200000): almost every record hits its own
//! count row. The audit topic is created on the aggregate cluster, which MirrorMaker does not
//! copy. It prints:
//! - collector, end to end: records produced to a fresh audit topic beforehand, then the
//!   collector started, timed until every offset is stored (consume, validate, dedupe by id,
//!   upsert counts with exact histogram merges, progress, offsets, one transaction a batch);
//! - collector, store only: the same records, already decoded, through `store::write_batch`;
//! - baseline: one plain `INSERT ... SELECT FROM UNNEST` per batch of the same rows (one row
//!   per record, latency bytes included, no keys or constraints) into an empty table;
//!
//! and the ratios against the baseline.
//!
//! **fleet** (`BENCH_FLEET_TOPICS` topics, default 100; `BENCH_FLEET_FLUSHES` producer flushes,
//! default 12, i.e. 2 minutes of the fleet's time): what a deployment sends, many producer
//! instances reporting the same (topic, partition, bucket) plus the records of the
//! chaperone-services (see [`fleet_records`]). It prints the store-only rate through
//! `store::write_batch` and the end-to-end rate (as above) against the plain INSERT of the
//! same rows, the CPU the PostgreSQL backend and the collector spent storing, and where a
//! batch's time goes: the same batches through `write_batch` with only their counts records,
//! only their progress records, none (the fixed cost of a transaction), replayed (every id
//! already stored), and the duplicate filter's statement alone; and the end-to-end rate of
//! two collectors sharing the audit topic against one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chaperone_audit::{
    AuditRecord, BucketWidth, Counts, Latency, Observer, Progress, SequenceIds, Tier,
};
use chaperone_collector::config::{ClusterConfig, Config};
use chaperone_collector::store;
use chaperone_collector::{Clock, Deps};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 5_000;
const PARTITIONS: i32 = 8;
const BUCKET: i64 = 1_764_067_200_000;
const WIDTH_MS: i64 = 60_000;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// A histogram of `count` latencies between 5 and 904 ms, different for every `seed`.
fn latency(seed: usize, count: u64) -> Latency {
    let mut latency = Latency::new();
    for j in 0..count {
        latency.record(((seed as i64 * 7 + j as i64 * 13) % 900) + 5);
    }
    latency
}

/// Records as the worst case for aggregation: 40 topics x 12 partitions, producers in two
/// datacenters and the regional and aggregate tiers, over 10 buckets, each with a small
/// latency histogram; one in ten is a progress heartbeat.
fn worst_case_records(n: usize) -> Vec<AuditRecord> {
    (0..n)
        .map(|i| {
            let topic = format!("topic-{}", i % 40);
            let partition = ((i / 40) % 12) as i32;
            let tier = [Tier::Producer, Tier::Regional, Tier::Aggregate][(i / 480) % 3].clone();
            let observer = Observer {
                tier,
                datacenter: ["dc1", "dc2"][(i / 1_440) % 2].into(),
                cluster: "regional".into(),
                host: format!("host-{}", i % 17),
                instance: "1".into(),
            };
            let bucket = BUCKET + WIDTH_MS * ((i / 2_880) % 10) as i64;
            if i % 10 == 9 {
                return AuditRecord::Progress(Progress {
                    id: uuid::Uuid::now_v7().to_string(),
                    topic: topic.clone(),
                    physical_topic: topic,
                    partition: Some(partition),
                    observer,
                    position: Some(i as i64),
                    high_watermark: Some(i as i64 + 10),
                    watermark_ms: bucket,
                    bucket_width: BucketWidth::default(),
                    emitted_at_ms: bucket + 1_000,
                    closing: false,
                    at_least_once: false,
                });
            }
            let count = 20 + (i % 30) as u64;
            AuditRecord::Counts(Counts {
                // Ids that are not numbered (as before audit-lib numbered them, or from another
                // writer): each is filtered by its own stored key, the costlier filter.
                id: uuid::Uuid::now_v7().to_string(),
                topic: topic.clone(),
                physical_topic: topic,
                partition: Some(partition),
                bucket_start_ms: bucket,
                bucket_width: BucketWidth::default(),
                observer,
                count,
                bytes: count * 512,
                no_timestamp: 0,
                malformed: 0,
                min_event_ms: Some(bucket + 10),
                max_event_ms: Some(bucket + 59_000),
                latency: latency(i, count),
                emitted_at_ms: bucket + 61_000,
            })
        })
        .collect()
}

/// Partitions of every fleet topic, unless `BENCH_FLEET_PARTITIONS` says otherwise.
const FLEET_PARTITIONS: &str = "3";
/// Producer instances of every fleet topic, all writing to all its partitions.
const FLEET_INSTANCES: usize = 50;
/// audit-lib's default flush interval.
const PRODUCER_FLUSH_MS: i64 = 10_000;
/// chaperone-service's default flush interval.
const SERVICE_FLUSH_MS: i64 = 5_000;
/// Messages a producer instance sends to one partition per second.
const INSTANCE_RATE: i64 = 10;

/// One reporter of the fleet: a producer instance or a chaperone-service, flushing every
/// `interval_ms` (first at `BUCKET + phase_ms`) a counts record per partition and bucket it
/// counted messages in, then a progress record per partition.
struct Reporter {
    observer: Observer,
    interval_ms: i64,
    phase_ms: i64,
    /// Logical topic, physical topic, partition.
    partitions: Vec<(String, String, i32)>,
    /// Messages counted per partition per second.
    rate: i64,
}

impl Reporter {
    /// Its records over `[BUCKET, end_ms)`, each with the time it is flushed.
    fn records(&self, end_ms: i64, out: &mut Vec<(i64, AuditRecord)>) {
        let width = BucketWidth::default();
        // Counts ids as audit-lib and chaperone-service make them: numbered per topic.
        let mut ids = SequenceIds::new();
        let mut at = BUCKET + self.phase_ms;
        let mut flush = 0;
        while at < end_ms {
            let from = at - self.interval_ms;
            for (topic, physical, partition) in &self.partitions {
                // A flush covering a bucket boundary reports both buckets.
                let mut bucket = width.start_of(from);
                while bucket < at {
                    let span = (bucket + WIDTH_MS).min(at) - bucket.max(from);
                    let count = (self.rate * span / 1_000) as u64;
                    out.push((
                        at,
                        AuditRecord::Counts(Counts {
                            id: ids.next(topic),
                            topic: topic.clone(),
                            physical_topic: physical.clone(),
                            partition: Some(*partition),
                            bucket_start_ms: bucket,
                            bucket_width: width,
                            observer: self.observer.clone(),
                            count,
                            bytes: count * 512,
                            no_timestamp: 0,
                            malformed: 0,
                            min_event_ms: Some(bucket.max(from)),
                            max_event_ms: Some((bucket + WIDTH_MS).min(at) - 1),
                            latency: latency(out.len(), count),
                            emitted_at_ms: at,
                        }),
                    ));
                    bucket += WIDTH_MS;
                }
            }
            for (topic, physical, partition) in &self.partitions {
                let position = flush * self.rate * self.interval_ms / 1_000;
                out.push((
                    at,
                    AuditRecord::Progress(Progress {
                        id: uuid::Uuid::now_v7().to_string(),
                        topic: topic.clone(),
                        physical_topic: physical.clone(),
                        partition: Some(*partition),
                        observer: self.observer.clone(),
                        position: Some(position),
                        high_watermark: Some(position + 10),
                        watermark_ms: at - 1_000,
                        bucket_width: width,
                        emitted_at_ms: at,
                        closing: false,
                        at_least_once: false,
                    }),
                ));
            }
            at += self.interval_ms;
            flush += 1;
        }
    }
}

fn observer(tier: Tier, datacenter: &str, cluster: &str, host: String) -> Observer {
    Observer {
        tier,
        datacenter: datacenter.into(),
        cluster: cluster.into(),
        host,
        instance: "1".into(),
    }
}

/// The fleet workload, in the order the audit topics deliver it:
/// - `topics` topics of `partitions` partitions, half produced in datacenter dc1
///   (cluster `regional`), half in dc2 (`regional2`);
/// - per topic `FLEET_INSTANCES` producer instances (audit-lib), each flushing every 10 s
///   at its own phase a counts record per partition for the current 60 s bucket (two when
///   the flush covers a bucket boundary, one flush in six) and a progress record per
///   partition, so all instances of a topic report the same (topic, partition, bucket);
/// - a chaperone-service on each regional cluster (tier regional) and one on the aggregate
///   cluster (tier aggregate, reading the mirrored `<dc>.<topic>`), flushing every 5 s a
///   counts record per (topic, partition, bucket) and a progress record per partition;
/// - `flushes` producer flushes: `flushes` x 10 s of the fleet's time from a bucket start.
fn fleet_records(topics: usize, partition_count: i32, flushes: usize) -> Vec<AuditRecord> {
    let dcs = [("dc1", "regional"), ("dc2", "regional2")];
    let partitions = |t: usize, physical: &dyn Fn(&str) -> String| {
        let topic = format!("topic-{t}");
        (0..partition_count)
            .map(|p| (topic.clone(), physical(&topic), p))
            .collect::<Vec<_>>()
    };
    let mut reporters = Vec::new();
    for t in 0..topics {
        let (dc, cluster) = dcs[t % 2];
        for i in 0..FLEET_INSTANCES {
            reporters.push(Reporter {
                observer: observer(Tier::Producer, dc, cluster, format!("topic-{t}-app-{i}")),
                interval_ms: PRODUCER_FLUSH_MS,
                phase_ms: ((t * 7_919 + i * 104_729) as i64) % PRODUCER_FLUSH_MS,
                partitions: partitions(t, &|topic| topic.to_owned()),
                rate: INSTANCE_RATE,
            });
        }
    }
    let fleet_rate = INSTANCE_RATE * FLEET_INSTANCES as i64;
    for (i, (dc, cluster)) in dcs.into_iter().enumerate() {
        reporters.push(Reporter {
            observer: observer(Tier::Regional, dc, cluster, format!("service-{cluster}")),
            interval_ms: SERVICE_FLUSH_MS,
            phase_ms: 1_000 + 1_500 * i as i64,
            partitions: (i..topics)
                .step_by(2)
                .flat_map(|t| partitions(t, &|topic| topic.to_owned()))
                .collect(),
            rate: fleet_rate,
        });
        reporters.push(Reporter {
            observer: observer(Tier::Aggregate, dc, "aggregate", "service-aggregate".into()),
            interval_ms: SERVICE_FLUSH_MS,
            phase_ms: 4_000,
            partitions: (i..topics)
                .step_by(2)
                .flat_map(|t| partitions(t, &|topic| format!("{dc}.{topic}")))
                .collect(),
            rate: fleet_rate,
        });
    }
    let end_ms = BUCKET + flushes as i64 * PRODUCER_FLUSH_MS;
    let mut timed = Vec::new();
    for r in &reporters {
        r.records(end_ms, &mut timed);
    }
    timed.sort_by_key(|(at, _)| *at);
    timed.into_iter().map(|(_, r)| r).collect()
}

async fn create_database(admin_url: &str) -> anyhow::Result<(String, String, PgPool)> {
    let name = format!("chaperone_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL (is `dev/stack up` running?)")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let url = match admin_url.rfind('/') {
        Some(i) => format!("{}/{name}", &admin_url[..i]),
        None => bail!("DATABASE_URL has no database name"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    chaperone_collector::migrate(&pool).await?;
    Ok((name, url, pool))
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

async fn produce(bootstrap: &str, topic: &str, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()?;
    let mut inflight = std::collections::VecDeque::new();
    for (i, p) in payloads.iter().enumerate() {
        let partition = (i % PARTITIONS as usize) as i32;
        loop {
            let rec = FutureRecord::<(), [u8]>::to(topic)
                .payload(p.as_slice())
                .partition(partition);
            match producer.send_result(rec) {
                Ok(f) => {
                    inflight.push_back(f);
                    break;
                }
                Err(_) => match inflight.pop_front() {
                    Some(f) => {
                        f.await?.map_err(|(e, _)| e)?;
                    }
                    None => bail!("cannot produce"),
                },
            }
        }
    }
    for f in inflight {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn end_offsets(bootstrap: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    let ends = tokio::task::spawn_blocking(move || {
        chaperone_test_support::end_offsets(&bootstrap, &topic, PARTITIONS)
    })
    .await??;
    Ok((0..).zip(ends).collect())
}

/// End to end: records already in Kafka, collector started, timed until all are stored.
async fn collector_end_to_end(
    pool: &PgPool,
    bootstrap: &str,
    payloads: &[Vec<u8>],
    instances: usize,
) -> anyhow::Result<Duration> {
    let topic = format!("bench-audit-{}", uuid::Uuid::new_v4().simple());
    produce(bootstrap, &topic, payloads).await?;
    let end = end_offsets(bootstrap, &topic).await?;
    let mut config = Config {
        clusters: vec![ClusterConfig {
            alias: "bench".into(),
            bootstrap: bootstrap.to_owned(),
            audit_topic: topic.clone(),
            dlq_topic: format!("{topic}-dlq"),
            librdkafka: BTreeMap::new(),
        }],
        ..Config::default()
    };
    config.ingest.batch_size = BATCH;
    config.retention.days = 0;
    config.reconcile.enabled = false;
    config.alerts.enabled = false;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(instances);
    for _ in 0..instances {
        let deps = Deps {
            pool: pool.clone(),
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            registry: prometheus::Registry::new(),
            clock: Clock::system(),
            api_token: None,
        };
        tasks.push(tokio::spawn(chaperone_collector::run(
            config.clone(),
            deps,
            shutdown.clone(),
        )));
    }
    let deadline = started + Duration::from_secs(600);
    loop {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM ingest_offsets WHERE cluster = 'bench' AND topic = $1",
        )
        .bind(&topic)
        .fetch_all(pool)
        .await?;
        let stored: BTreeMap<i32, i64> = rows.into_iter().collect();
        if end.iter().all(|(p, e)| stored.get(p) == Some(e)) {
            break;
        }
        if Instant::now() > deadline || tasks.iter().any(|t| t.is_finished()) {
            bail!("collector did not store everything in time");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    for task in tasks {
        task.await??;
    }
    Ok(elapsed)
}

/// User + system CPU seconds of a process so far (`/proc/<pid>/stat`, in the kernel's fixed
/// USER_HZ of 100 ticks a second); `None` where there is no such process.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is the first, utime the 12th, stime the 13th.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The one connection every timed `write_batch` runs on, and the pid of its PostgreSQL
/// backend when the server runs on this machine (so its CPU can be read).
struct Store {
    pool: PgPool,
    backend: Option<String>,
}

impl Store {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .connect(url)
            .await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
        let backend = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.starts_with("postgres"))
            .then(|| pid.to_string());
        Ok(Self { pool, backend })
    }

    /// A fresh database state: no ids, counts, progress or offsets stored.
    async fn truncate(&self) -> anyhow::Result<()> {
        sqlx::query(
            "TRUNCATE audit_record_seen, audit_record_ranges, audit_count_changes, audit_counts, \
             audit_progress, audit_topics, ingest_offsets",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn cpu(&self) -> (Option<f64>, Option<f64>) {
        (
            self.backend.as_deref().and_then(cpu_seconds),
            cpu_seconds("self"),
        )
    }

    /// Decoded records through `write_batch`, one transaction a batch, as the writer does.
    async fn write<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a [AuditRecord]>,
    ) -> anyhow::Result<Timed> {
        let (server, client) = self.cpu();
        let started = Instant::now();
        let mut stored = store::load_offsets(&self.pool, "bench", "store-only")
            .await?
            .get(&0)
            .copied()
            .unwrap_or(0);
        for batch in batches {
            let next_offset = stored + batch.len().max(1) as i64;
            let offsets = [store::ConsumedOffset {
                cluster: "bench".into(),
                topic: "store-only".into(),
                partition: 0,
                stored_offset: stored,
                next_offset,
            }];
            store::write_batch(&self.pool, batch, &[], &offsets).await?;
            stored = next_offset;
        }
        let wall = started.elapsed();
        let (server_end, client_end) = self.cpu();
        Ok(Timed {
            wall,
            server_cpu: server.zip(server_end).map(|(a, b)| b - a),
            client_cpu: client.zip(client_end).map(|(a, b)| b - a),
        })
    }
}

/// Wall time of a timed run, and the CPU seconds the PostgreSQL backend and this process
/// (the collector's code: summing, histogram merges, encoding) spent meanwhile.
struct Timed {
    wall: Duration,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
}

impl Timed {
    fn cpu(&self) -> String {
        let secs = |s: Option<f64>| s.map_or("n/a".to_owned(), |s| format!("{s:.2} s"));
        format!(
            "PostgreSQL backend CPU {}, collector CPU {}, wall {:.2} s",
            secs(self.server_cpu),
            secs(self.client_cpu),
            self.wall.as_secs_f64()
        )
    }
}

/// Baseline: the same rows, one plain INSERT per batch into a table without keys.
async fn plain_insert(pool: &PgPool, records: &[AuditRecord]) -> anyhow::Result<Duration> {
    sqlx::query("DROP TABLE IF EXISTS bench_plain")
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_plain (id text, kind text, topic text, bucket_start_ms bigint, \
         bucket_width_ms bigint, tier text, datacenter text, cluster text, partition int, \
         count bigint, bytes bigint, watermark_ms bigint, latency bytea)",
    )
    .execute(pool)
    .await?;
    // Rows are built before timing: the baseline measures only the database.
    struct Cols {
        id: Vec<String>,
        kind: Vec<&'static str>,
        topic: Vec<String>,
        bucket: Vec<Option<i64>>,
        width: Vec<i64>,
        tier: Vec<String>,
        dc: Vec<String>,
        cluster: Vec<String>,
        partition: Vec<i32>,
        count: Vec<Option<i64>>,
        bytes: Vec<Option<i64>>,
        watermark: Vec<Option<i64>>,
        latency: Vec<Option<Vec<u8>>>,
    }
    let batches: Vec<Cols> = records
        .chunks(BATCH)
        .map(|chunk| {
            let mut c = Cols {
                id: vec![],
                kind: vec![],
                topic: vec![],
                bucket: vec![],
                width: vec![],
                tier: vec![],
                dc: vec![],
                cluster: vec![],
                partition: vec![],
                count: vec![],
                bytes: vec![],
                watermark: vec![],
                latency: vec![],
            };
            for r in chunk {
                let o = r.observer();
                c.id.push(r.id().to_owned());
                c.tier.push(o.tier.to_string());
                c.dc.push(o.datacenter.clone());
                c.cluster.push(o.cluster.clone());
                match r {
                    AuditRecord::Counts(x) => {
                        c.kind.push("counts");
                        c.topic.push(x.topic.clone());
                        c.bucket.push(Some(x.bucket_start_ms));
                        c.width.push(x.bucket_width.as_millis());
                        c.partition.push(x.partition.unwrap_or(-1));
                        c.count.push(Some(x.count as i64));
                        c.bytes.push(Some(x.bytes as i64));
                        c.watermark.push(None);
                        c.latency.push(Some(x.latency.to_bytes()));
                    }
                    AuditRecord::Progress(x) => {
                        c.kind.push("progress");
                        c.topic.push(x.topic.clone());
                        c.bucket.push(None);
                        c.width.push(x.bucket_width.as_millis());
                        c.partition.push(x.partition.unwrap_or(-1));
                        c.count.push(None);
                        c.bytes.push(None);
                        c.watermark.push(Some(x.watermark_ms));
                        c.latency.push(None);
                    }
                }
            }
            c
        })
        .collect();
    let started = Instant::now();
    for c in &batches {
        sqlx::query(
            "INSERT INTO bench_plain SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], \
             $4::int8[], $5::int8[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[], \
             $11::int8[], $12::int8[], $13::bytea[])",
        )
        .bind(&c.id)
        .bind(&c.kind)
        .bind(&c.topic)
        .bind(&c.bucket)
        .bind(&c.width)
        .bind(&c.tier)
        .bind(&c.dc)
        .bind(&c.cluster)
        .bind(&c.partition)
        .bind(&c.count)
        .bind(&c.bytes)
        .bind(&c.watermark)
        .bind(&c.latency)
        .execute(pool)
        .await?;
    }
    Ok(started.elapsed())
}

/// The duplicate filter alone, as `write_batch` runs it (insert the batch's counts ids, keep
/// those returned as new), on an empty copy of `audit_record_seen`, in one transaction: what
/// de-duplication by id costs the batches, without the commit.
async fn id_filter(pool: &PgPool, batches: &[&[AuditRecord]]) -> anyhow::Result<Duration> {
    sqlx::query("CREATE TABLE bench_seen (LIKE audit_record_seen INCLUDING ALL)")
        .execute(pool)
        .await?;
    let keys: Vec<Vec<uuid::Uuid>> = batches
        .iter()
        .map(|b| b.iter().map(|r| store::record_key(r.id())).collect())
        .collect();
    let mut tx = pool.begin().await?;
    let started = Instant::now();
    for k in &keys {
        let fresh: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO bench_seen (id) SELECT UNNEST($1::uuid[]) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(k)
        .fetch_all(&mut *tx)
        .await?;
        if fresh.len() != k.len() {
            bail!("fresh ids found stored");
        }
    }
    let elapsed = started.elapsed();
    tx.commit().await?;
    Ok(elapsed)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn rows_in(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?)
}

/// The worst case for aggregation, end to end and store only; returns the store-only rate.
async fn worst_case(pool: &PgPool, store: &Store, bootstrap: &str) -> anyhow::Result<f64> {
    let n: usize = env_or("BENCH_RECORDS", "200000").parse()?;
    let records = worst_case_records(n);
    let payloads: Vec<Vec<u8>> = records.iter().map(AuditRecord::encode).collect();
    let started = Instant::now();
    for p in &payloads {
        AuditRecord::decode(p)?;
    }
    let decode = started.elapsed();
    let e2e = collector_end_to_end(pool, bootstrap, &payloads, 1).await?;
    let rows = rows_in(pool, "audit_counts").await?;
    // A fresh database state: the end-to-end phase stored the same ids.
    store.truncate().await?;
    let store_only = store.write(records.chunks(BATCH)).await?;
    let plain = plain_insert(pool, &records).await?;
    let base = rate(n, plain);
    let stored = rate(n, store_only.wall);
    println!("worst-case: {n} audit records, batches of {BATCH}, {rows} count rows");
    println!(
        "  AuditRecord::decode, one thread:    {:>9.0} records/s ({:.2} s)",
        rate(n, decode),
        decode.as_secs_f64()
    );
    println!(
        "  baseline plain batched INSERT:      {:>9.0} records/s ({:.2} s)",
        base,
        plain.as_secs_f64()
    );
    println!(
        "  collector store only (write_batch): {:>9.0} records/s ({:.2} s)  ratio {:.2}x",
        stored,
        store_only.wall.as_secs_f64(),
        stored / base
    );
    println!("      {}", store_only.cpu());
    println!(
        "  collector end to end (Kafka -> PG): {:>9.0} records/s ({:.2} s)  ratio {:.2}x",
        rate(n, e2e),
        e2e.as_secs_f64(),
        rate(n, e2e) / base
    );
    Ok(stored)
}

/// `r` with a version 7 UUID as id when it is a counts record (not numbered).
fn unnumbered(r: &AuditRecord) -> AuditRecord {
    let mut r = r.clone();
    if let AuditRecord::Counts(c) = &mut r {
        c.id = uuid::Uuid::now_v7().to_string();
    }
    r
}

/// The fleet workload through `write_batch`, against a plain INSERT of the same rows and,
/// when it ran, the worst case's store-only rate; then where a batch's time goes.
async fn fleet(
    pool: &PgPool,
    store: &Store,
    bootstrap: &str,
    worst: Option<f64>,
) -> anyhow::Result<()> {
    let topics: usize = env_or("BENCH_FLEET_TOPICS", "100").parse()?;
    let flushes: usize = env_or("BENCH_FLEET_FLUSHES", "12").parse()?;
    let partitions: i32 = env_or("BENCH_FLEET_PARTITIONS", FLEET_PARTITIONS).parse()?;
    let mut records = fleet_records(topics, partitions, flushes);
    // Counts records first within each batch, so that a batch's counts and its progress
    // records can be written alone below; the order inside a batch changes nothing stored.
    for chunk in records.chunks_mut(BATCH) {
        chunk.sort_by_key(|r| matches!(r, AuditRecord::Progress(_)));
    }
    let batches: Vec<&[AuditRecord]> = records.chunks(BATCH).collect();
    let split: Vec<(&[AuditRecord], &[AuditRecord])> = batches
        .iter()
        .map(|b| b.split_at(b.partition_point(|r| matches!(r, AuditRecord::Counts(_)))))
        .collect();
    let n = records.len();
    let n_counts: usize = split.iter().map(|(c, _)| c.len()).sum();

    let payloads: Vec<Vec<u8>> = records.iter().map(AuditRecord::encode).collect();
    let e2e = collector_end_to_end(pool, bootstrap, &payloads, 1).await?;
    let e2e_two = collector_end_to_end(pool, bootstrap, &payloads, 2).await?;
    drop(payloads);
    // Numbered ids against one stored key per id: each written twice on emptied tables, in
    // alternation starting with the latter, so that neither gains from its place in the run;
    // the faster of each pair counts.
    let unnumbered: Vec<AuditRecord> = records.iter().map(unnumbered).collect();
    let mut by_id = Vec::new();
    let mut numbered = Vec::new();
    let mut replay = None;
    let (mut count_rows, mut progress_rows) = (0, 0);
    for _ in 0..2 {
        store.truncate().await?;
        by_id.push(store.write(unnumbered.chunks(BATCH)).await?);
        store.truncate().await?;
        numbered.push(store.write(batches.iter().copied()).await?);
        if replay.is_none() {
            count_rows = rows_in(pool, "audit_counts").await?;
            progress_rows = rows_in(pool, "audit_progress").await?;
            replay = Some(store.write(batches.iter().copied()).await?);
        }
    }
    drop(unnumbered);
    let faster = |v: Vec<Timed>| v.into_iter().min_by_key(|t| t.wall).expect("two runs");
    let (full, by_id) = (faster(numbered), faster(by_id));
    let replay = replay.expect("a replay");
    store.truncate().await?;
    let counts_only = store.write(split.iter().map(|(c, _)| *c)).await?;
    store.truncate().await?;
    let progress_only = store.write(split.iter().map(|(_, p)| *p)).await?;
    let empty = store.write(batches.iter().map(|_| &[][..])).await?;
    let counts: Vec<&[AuditRecord]> = split.iter().map(|(c, _)| *c).collect();
    let ids = id_filter(pool, &counts).await?;
    let plain = plain_insert(pool, &records).await?;

    let base = rate(n, plain);
    let stored = rate(n, full.wall);
    let per_batch = |d: Duration| d.as_secs_f64() * 1_000.0 / batches.len() as f64;
    println!(
        "fleet: {topics} topics x {partitions} partitions, {FLEET_INSTANCES} producer \
         instances a topic (flush {} s), regional and aggregate services (flush {} s), \
         {} s buckets, {} s of fleet time",
        PRODUCER_FLUSH_MS / 1_000,
        SERVICE_FLUSH_MS / 1_000,
        WIDTH_MS / 1_000,
        flushes as i64 * PRODUCER_FLUSH_MS / 1_000
    );
    println!(
        "  {n} audit records ({n_counts} counts, {} progress), {} batches of {BATCH}, \
         {count_rows} count rows, {progress_rows} progress rows",
        n - n_counts,
        batches.len()
    );
    println!(
        "  baseline plain batched INSERT:      {:>9.0} records/s ({:.2} s)",
        base,
        plain.as_secs_f64()
    );
    print!(
        "  collector store only (write_batch): {:>9.0} records/s ({:.2} s)  ratio {:.2}x",
        stored,
        full.wall.as_secs_f64(),
        stored / base
    );
    match worst {
        Some(w) => println!(", {:.2}x the worst case's store only", stored / w),
        None => println!(),
    }
    println!("      {}", full.cpu());
    println!(
        "  same, ids not numbered (one key each): {:>6.0} records/s ({:.2} s)  numbered ids {:.2}x this (best of two each)",
        rate(n, by_id.wall),
        by_id.wall.as_secs_f64(),
        stored / rate(n, by_id.wall)
    );
    println!(
        "  collector end to end (Kafka -> PG): {:>9.0} records/s ({:.2} s)  ratio {:.2}x",
        rate(n, e2e),
        e2e.as_secs_f64(),
        rate(n, e2e) / base
    );
    println!(
        "  two collectors end to end:          {:>9.0} records/s ({:.2} s)  {:.2}x one collector",
        rate(n, e2e_two),
        e2e_two.as_secs_f64(),
        rate(n, e2e_two) / rate(n, e2e)
    );
    println!("  a batch's time, each the same batches through write_batch unless said:");
    let line = |what: &str, t: &Timed| {
        println!(
            "    {what:<44} {:>6.1} ms/batch  ({})",
            per_batch(t.wall),
            t.cpu()
        );
    };
    line("whole batches", &full);
    line("counts records only", &counts_only);
    line("progress records only", &progress_only);
    line("no records (offset check, offsets, commit)", &empty);
    line("replayed (every counts id already stored)", &replay);
    println!(
        "    {:<44} {:>6.1} ms/batch",
        "one stored key per id alone (insert, no commit)",
        per_batch(ids)
    );
    Ok(())
}

async fn bench(filters: &[String]) -> anyhow::Result<()> {
    let runs = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let admin_url = env_or(
        "DATABASE_URL",
        "postgres://chaperone:chaperone@127.0.0.1:55432/chaperone",
    );
    // The aggregate cluster: MirrorMaker copies regional topics, and copying the benchmark's
    // records would compete for the CPU being measured.
    let bootstrap = env_or("CHAPERONE_AGGREGATE_BOOTSTRAP", "127.0.0.1:29092");
    let (name, url, pool) = create_database(&admin_url).await?;
    let result = async {
        let store = Store::connect(&url).await?;
        let worst = if runs("worst-case") {
            Some(worst_case(&pool, &store, &bootstrap).await?)
        } else {
            None
        };
        if runs("fleet") {
            fleet(&pool, &store, &bootstrap, worst).await?;
        }
        store.pool.close().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    pool.close().await;
    drop_database(&admin_url, &name).await?;
    result
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick exit. Other arguments select workloads by name.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("ingest benchmark: run with `cargo bench -p chaperone-collector --bench ingest`");
        return Ok(());
    }
    let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(&filters))
}
