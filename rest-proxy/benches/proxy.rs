//! `cargo bench -p chaperone-rest-proxy` (needs `dev/stack up`): the proxy against a bare
//! rdkafka producer, the audit's cost, and single-record requests at 64 connections. Prints
//! figures and ratios measured in the same run; it never passes or fails.
//!
//! - batches: 16 callers each send batches of 100 records of 100 B and wait for them, over
//!   keep-alive HTTP/1.1 to the proxy, or straight to a bare `FutureProducer`; alternating
//!   rounds of `ROUND` seconds, the median of each side reported.
//! - audit: the same load through a proxy with the audit on and one with it disabled.
//! - single: 64 connections each sending one-record requests; requests/s and latency
//!   percentiles.
//!
//! `PROXY_BENCH_ROUND` (seconds, default 3) and `PROXY_BENCH_ROUNDS` (default 3) tune it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use base64::Engine as _;
use chaperone_rest_proxy::{Config, Deps};
use chaperone_test_support::{create_topic, regional_bootstrap, unique};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BATCH: usize = 100;
const CALLERS: usize = 16;
const CONNECTIONS: usize = 64;
const PAYLOAD: usize = 100;

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn start_proxy(audit: bool) -> anyhow::Result<(String, CancellationToken)> {
    let audit_topic = unique("bench-proxy-audit");
    create_topic(&regional_bootstrap(), &audit_topic, 1).await?;
    let mut c = Config {
        bootstrap_servers: regional_bootstrap(),
        audit_disabled: !audit,
        ..Config::default()
    };
    c.audit.topic = audit_topic;
    c.audit.spool_dir = std::env::temp_dir().join(unique("bench-proxy-spool"));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let token = CancellationToken::new();
    let deps = Deps {
        listener: Some(listener),
        ..Deps::default()
    };
    tokio::spawn(chaperone_rest_proxy::run(c, deps, token.clone()));
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok((url, token));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the proxy did not become ready")
}

fn batch_body() -> String {
    let value = base64::engine::general_purpose::STANDARD.encode([b'x'; PAYLOAD]);
    let records: Vec<String> = (0..BATCH)
        .map(|_| format!("{{\"value\":\"{value}\"}}"))
        .collect();
    format!("{{\"records\":[{}]}}", records.join(","))
}

/// Records per second through the proxy at `url` for `round`.
async fn proxy_round(url: &str, topic: &str, round: Duration) -> f64 {
    let client = reqwest::Client::new();
    // Shared, never copied per request: the callers' cost stays out of the proxy's figure
    // as far as it can.
    let body = Bytes::from(batch_body());
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, body, done) = (client.clone(), body.clone(), Arc::clone(&done));
            let url = format!("{url}/topics/{topic}");
            tokio::spawn(async move {
                while start.elapsed() < round {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/vnd.kafka.binary.v2+json")
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        done.fetch_add(BATCH as u64, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Records per second through a bare producer, same callers and batches.
async fn bare_round(producer: &FutureProducer, topic: &str, round: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (producer, done, topic) = (producer.clone(), Arc::clone(&done), topic.to_owned());
            tokio::spawn(async move {
                let value = [b'x'; PAYLOAD];
                while start.elapsed() < round {
                    let futures: Vec<_> = (0..BATCH)
                        .filter_map(|_| {
                            producer
                                .send_result(FutureRecord::<(), _>::to(&topic).payload(&value[..]))
                                .ok()
                        })
                        .collect();
                    for f in futures {
                        if matches!(f.await, Ok(Ok(_))) {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Single-record requests over 64 connections: (requests/s, p50, p99 in ms).
async fn single_round(url: &str, topic: &str, round: Duration) -> (f64, f64, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .expect("client");
    let value = base64::engine::general_purpose::STANDARD.encode([b'x'; PAYLOAD]);
    let body = Bytes::from(format!("{{\"records\":[{{\"value\":\"{value}\"}}]}}"));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (client, body, stop) = (client.clone(), body.clone(), Arc::clone(&stop));
            let url = format!("{url}/topics/{topic}");
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < round {
                    let t0 = Instant::now();
                    let r = client
                        .post(&url)
                        .header("content-type", "application/vnd.kafka.binary.v2+json")
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    (all.len() as f64 / secs, pct(0.50), pct(0.99))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    let round = Duration::from_secs(env_num("PROXY_BENCH_ROUND", 3));
    let rounds = env_num("PROXY_BENCH_ROUNDS", 3) as usize;
    let topic = unique("bench-proxy");
    create_topic(&regional_bootstrap(), &topic, 3).await?;
    let bare: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let (audited, stop_audited) = start_proxy(true).await?;
    let (unaudited, stop_unaudited) = start_proxy(false).await?;
    // Warm up connections and metadata.
    proxy_round(&audited, &topic, Duration::from_millis(500)).await;
    proxy_round(&unaudited, &topic, Duration::from_millis(500)).await;
    bare_round(&bare, &topic, Duration::from_millis(500)).await;

    let (mut b, mut a, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let rb = bare_round(&bare, &topic, round).await;
        let ra = proxy_round(&audited, &topic, round).await;
        let ru = proxy_round(&unaudited, &topic, round).await;
        println!(
            "round {i}: bare {rb:.0} rec/s, proxy+audit {ra:.0} rec/s, proxy without audit {ru:.0} rec/s"
        );
        b.push(rb);
        a.push(ra);
        u.push(ru);
    }
    let (mb, ma, mu) = (median(&mut b), median(&mut a), median(&mut u));
    println!(
        "batches of {BATCH} x {PAYLOAD} B, {CALLERS} callers, median of {rounds} rounds of {round:?}:"
    );
    println!("  bare producer        {mb:>10.0} records/s");
    println!(
        "  proxy, audit on      {ma:>10.0} records/s   {:.3}x of bare",
        ma / mb
    );
    println!(
        "  proxy, audit off     {mu:>10.0} records/s   {:.3}x of bare",
        mu / mb
    );
    println!("  audit cost: proxy with audit / without = {:.3}x", ma / mu);

    let (rps, p50, p99) = single_round(&audited, &topic, round).await;
    println!(
        "single-record requests, {CONNECTIONS} connections, audit on: {rps:.0} requests/s, p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    stop_audited.cancel();
    stop_unaudited.cancel();
    Ok(())
}
