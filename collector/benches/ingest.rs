//! Sustained ingest of audit records into PostgreSQL, against a plain batched INSERT of the
//! same rows measured in the same run.
//!
//! Run with `cargo bench -p chaperone-collector --bench ingest` against the stack from
//! `dev/stack up` (`BENCH_RECORDS` sets the number of records, default 200000; the audit
//! topic is created on the aggregate cluster, which MirrorMaker does not copy). It prints:
//! - collector, end to end: records produced to a fresh audit topic beforehand, then the
//!   collector started, timed until every offset is stored (consume, validate, dedupe by id,
//!   upsert counts with exact histogram merges, progress, offsets, one transaction a batch);
//! - collector, store only: the same records, already decoded, through `store::write_batch`;
//! - baseline: one plain `INSERT ... SELECT FROM UNNEST` per batch of the same rows (one row
//!   per record, latency bytes included, no keys or constraints) into an empty table;
//!
//! and the ratios against the baseline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chaperone_audit::{AuditRecord, BucketWidth, Counts, Latency, Observer, Progress, Tier};
use chaperone_collector::config::{ClusterConfig, Config};
use chaperone_collector::store;
use chaperone_collector::{Clock, Deps};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 5_000;
const PARTITIONS: i32 = 8;
const BUCKET: i64 = 1_764_067_200_000;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Records as a fleet sends them: 40 topics x 12 partitions, producers in two datacenters
/// and the regional and aggregate tiers, over 10 buckets, each with a small latency
/// histogram; one in ten is a progress heartbeat.
fn records(n: usize) -> Vec<AuditRecord> {
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
            let bucket = BUCKET + 60_000 * ((i / 2_880) % 10) as i64;
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
                });
            }
            let mut latency = Latency::new();
            let count = 20 + (i % 30) as u64;
            for j in 0..count {
                latency.record(((i as i64 * 7 + j as i64 * 13) % 900) + 5);
            }
            AuditRecord::Counts(Counts {
                // Ids as audit-lib and chaperone-service make them.
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
                latency,
                emitted_at_ms: bucket + 61_000,
            })
        })
        .collect()
}

async fn create_database(admin_url: &str) -> anyhow::Result<(String, PgPool)> {
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
    Ok((name, pool))
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
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        (0..PARTITIONS)
            .map(|p| {
                let (_, high) = c.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
                Ok((p, high))
            })
            .collect()
    })
    .await?
}

/// End to end: records already in Kafka, collector started, timed until all are stored.
async fn collector_end_to_end(
    pool: &PgPool,
    bootstrap: &str,
    payloads: &[Vec<u8>],
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
    let deps = Deps {
        pool: pool.clone(),
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        registry: prometheus::Registry::new(),
        clock: Clock::system(),
        api_token: None,
    };
    let started = Instant::now();
    let task = tokio::spawn(chaperone_collector::run(config, deps, shutdown.clone()));
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
        if Instant::now() > deadline || task.is_finished() {
            bail!("collector did not store everything in time");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    task.await??;
    Ok(elapsed)
}

/// Store only: decoded records through `write_batch`, one transaction a batch.
async fn collector_store_only(pool: &PgPool, records: &[AuditRecord]) -> anyhow::Result<Duration> {
    // A fresh database state for this phase: the end-to-end phase stored the same ids.
    sqlx::query(
        "TRUNCATE audit_record_seen, audit_count_changes, audit_counts, audit_progress, audit_topics, \
         ingest_offsets",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    for (i, chunk) in records.chunks(BATCH).enumerate() {
        let offsets = [store::ConsumedOffset {
            cluster: "bench".into(),
            topic: "store-only".into(),
            partition: 0,
            next_offset: ((i + 1) * BATCH) as i64,
        }];
        store::write_batch(pool, chunk, &offsets).await?;
    }
    Ok(started.elapsed())
}

/// Baseline: the same rows, one plain INSERT per batch into a table without keys.
async fn plain_insert(pool: &PgPool, records: &[AuditRecord]) -> anyhow::Result<Duration> {
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

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn bench() -> anyhow::Result<()> {
    let n: usize = env_or("BENCH_RECORDS", "200000").parse()?;
    let admin_url = env_or(
        "DATABASE_URL",
        "postgres://chaperone:chaperone@127.0.0.1:55432/chaperone",
    );
    // The aggregate cluster: MirrorMaker copies regional topics, and copying the benchmark's
    // records would compete for the CPU being measured.
    let bootstrap = env_or("CHAPERONE_AGGREGATE_BOOTSTRAP", "127.0.0.1:29092");
    let records = records(n);
    let payloads: Vec<Vec<u8>> = records.iter().map(AuditRecord::encode).collect();
    let started = Instant::now();
    for p in &payloads {
        AuditRecord::decode(p)?;
    }
    let decode = started.elapsed();
    let (name, pool) = create_database(&admin_url).await?;
    let result = async {
        let e2e = collector_end_to_end(&pool, &bootstrap, &payloads).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_counts")
            .fetch_one(&pool)
            .await?;
        let store_only = collector_store_only(&pool, &records).await?;
        let plain = plain_insert(&pool, &records).await?;
        Ok::<_, anyhow::Error>((e2e, store_only, plain, rows))
    }
    .await;
    pool.close().await;
    drop_database(&admin_url, &name).await?;
    let (e2e, store_only, plain, rows) = result?;
    let base = rate(n, plain);
    println!("ingest benchmark: {n} audit records, batches of {BATCH}, {rows} count rows");
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
        rate(n, store_only),
        store_only.as_secs_f64(),
        rate(n, store_only) / base
    );
    println!(
        "  collector end to end (Kafka -> PG): {:>9.0} records/s ({:.2} s)  ratio {:.2}x",
        rate(n, e2e),
        e2e.as_secs_f64(),
        rate(n, e2e) / base
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick exit.
    if !std::env::args().any(|a| a == "--bench") {
        println!("ingest benchmark: run with `cargo bench -p chaperone-collector --bench ingest`");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}
