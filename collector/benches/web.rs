//! The status page at 1,000 topics, against the JSON API over the same data, measured in the
//! same run.
//!
//! Run with `cargo bench -p chaperone-collector --bench web` against the PostgreSQL of
//! `dev/stack up` (`BENCH_TOPICS` sets the number of topics, default 1000; `BENCH_ROUNDS` the
//! requests per route, default 30). It seeds a database of its own with every topic counted
//! by three tiers over 60 buckets, judged on two edges (one topic in ten with a loss and an
//! open incident) and progress of every tier, serves the collector's router on 127.0.0.1 and
//! prints, per route, the median time of a request (read, render, transfer) and its ratio to
//! the baseline `GET /api/v1/topics`, which reads the same topics and latest verdicts and
//! answers JSON.

#[path = "../tests/ingest_support/mod.rs"]
mod ingest_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use chaperone_collector::Clock;
use chaperone_collector::api::{self, ApiState};
use chaperone_collector::ingest::IngestStatus;
use chaperone_collector::metrics::IngestMetrics;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const BUCKETS: i64 = 60;
const WIDTH: i64 = 60_000;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every table the pages read, filled for `topics` topics ending at `now_ms`.
async fn seed(pool: &PgPool, topics: usize, now_ms: i64) -> anyhow::Result<()> {
    let first = now_ms - now_ms % WIDTH - BUCKETS * WIDTH;
    let n = i64::try_from(topics)? - 1;
    sqlx::query(
        "INSERT INTO audit_topics (topic)
         SELECT 'topic-' || lpad(g::text, 4, '0') FROM generate_series(0, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO audit_counts (topic, bucket_start_ms, bucket_width_ms, tier, datacenter,
             cluster, partition, count, latency, records)
         SELECT 'topic-' || lpad(g::text, 4, '0'), $2 + b * $3, $3, t, 'dc1', t, 0, 1000,
                ''::bytea, 1
           FROM generate_series(0, $1) g, generate_series(0, $4 - 1) b,
                unnest(ARRAY['producer', 'regional', 'aggregate']) t",
    )
    .bind(n)
    .bind(first)
    .bind(WIDTH)
    .bind(BUCKETS)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO reconcile_verdicts (edge, topic, datacenter, partition, bucket_start_ms,
             bucket_width_ms, from_tier, to_tier, status, expected, actual, difference, missing,
             final_reason, first_judged_at, changed_at)
         SELECT e.edge, 'topic-' || lpad(g::text, 4, '0'), e.dc, -1, $2 + b * $3, $3, e.f, e.t,
                CASE WHEN g % 10 = 0 AND e.f = 'producer' THEN 'missing' ELSE 'complete' END,
                1000, CASE WHEN g % 10 = 0 AND e.f = 'producer' THEN 990 ELSE 1000 END,
                CASE WHEN g % 10 = 0 AND e.f = 'producer' THEN -10 ELSE 0 END,
                CASE WHEN g % 10 = 0 AND e.f = 'producer' THEN 10 ELSE 0 END,
                'progress', now(), now()
           FROM generate_series(0, $1) g, generate_series(0, $4 - 1) b,
                (VALUES ('producer->regional', 'dc1', 'producer', 'regional'),
                        ('regional->aggregate', '', 'regional', 'aggregate')) e(edge, dc, f, t)",
    )
    .bind(n)
    .bind(first)
    .bind(WIDTH)
    .bind(BUCKETS)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO alert_incidents (topic, edge, datacenter, from_tier, to_tier, status,
             bucket_width_ms, first_bucket_start_ms, last_bucket_start_ms, max_missing, opened_at)
         SELECT 'topic-' || lpad(g::text, 4, '0'), 'producer->regional', 'dc1', 'producer',
                'regional', 'open', $3, $2, $2, 10, now()
           FROM generate_series(0, $1, 10) g",
    )
    .bind(n)
    .bind(first)
    .bind(WIDTH)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO audit_progress (tier, cluster, datacenter, topic, physical_topic, partition,
             watermark_ms, bucket_width_ms, last_emitted_ms, host, instance, position)
         SELECT t, t, 'dc1', 'topic-' || lpad(g::text, 4, '0'), 'topic-' || lpad(g::text, 4, '0'),
                p, $2, $3, $2, 'host', '1', CASE WHEN t = 'producer' THEN NULL ELSE 0 END
           FROM generate_series(0, $1) g, generate_series(0, 2) p,
                unnest(ARRAY['producer', 'regional', 'aggregate']) t",
    )
    .bind(n)
    .bind(now_ms - 5_000)
    .bind(WIDTH)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// Median time of `rounds` GETs of `url` (after one warm-up), and the body size.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    rounds: usize,
) -> anyhow::Result<(Duration, usize)> {
    let warm = client.get(url).send().await?;
    ensure!(warm.status() == 200, "{url}: {}", warm.status());
    let size = warm.bytes().await?.len();
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let resp = client.get(url).send().await?.error_for_status()?;
        resp.bytes().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], size))
}

async fn bench() -> anyhow::Result<()> {
    let topics = env_or("BENCH_TOPICS", 1_000);
    let rounds = env_or("BENCH_ROUNDS", 30).max(1);
    let db = ingest_support::TestDb::create().await?;
    let now = chrono::Utc::now();
    let started = Instant::now();
    seed(&db.pool, topics, now.timestamp_millis()).await?;
    println!(
        "seeded {topics} topics x {BUCKETS} buckets x 3 tiers in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let registry = prometheus::Registry::new();
    let state = ApiState {
        health_pool: api::health_pool(&db.pool),
        pool: db.pool.clone(),
        registry: registry.clone(),
        token: None,
        status: Arc::new(IngestStatus::new(1)),
        clock: Clock::system(),
        metrics: IngestMetrics::register(&registry)?,
        max_range: Duration::from_secs(7 * 86_400),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve(
        listener,
        chaperone_collector::router(state, Default::default()),
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();

    let (baseline, baseline_size) =
        measure(&client, &format!("{base}/api/v1/topics"), rounds).await?;
    println!(
        "baseline  GET /api/v1/topics ({topics} topics, JSON)  {:>8.2} ms  {:>9} bytes",
        baseline.as_secs_f64() * 1e3,
        baseline_size
    );
    let last_page = topics.div_ceil(100).max(1);
    for (label, path) in [
        ("page 1 (worst first)", "/".to_owned()),
        ("last page", format!("/?page={last_page}")),
        ("status=missing", "/?status=missing".to_owned()),
        ("q=topic-09", "/?q=topic-09".to_owned()),
        ("topic, last hour", "/topics/topic-0000".to_owned()),
        ("incident", "/incidents/1".to_owned()),
    ] {
        let (t, size) = measure(&client, &format!("{base}{path}"), rounds).await?;
        println!(
            "page      GET {path:<22} {label:<22} {:>8.2} ms  {:>9} bytes  ratio {:.2}",
            t.as_secs_f64() * 1e3,
            size,
            t.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    shutdown.cancel();
    server.await??;
    db.drop_db().await
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick exit.
    if !std::env::args().any(|a| a == "--bench") {
        println!("web benchmark: run with `cargo bench -p chaperone-collector --bench web`");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}
