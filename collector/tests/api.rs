//! The HTTP API against the real stack: parameter errors, the bearer token, and latency
//! percentiles that are exact merges of every host's histogram.

mod ingest_support;

use std::time::Duration;

use chaperone_audit::{AuditRecord, Latency, Tier};
use ingest_support::*;
use serde_json::Value;

const TOKEN: &str = "test-token-7f3a";

async fn get(url: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_400_naming_them_and_the_token_is_required() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), Some(TOKEN)).await?;

    let cases = [
        ("/api/v1/topics/orders/buckets?from=yesterday", "from"),
        (
            "/api/v1/topics/orders/buckets?to=2025-13-45T00:00:00Z",
            "to",
        ),
        (
            "/api/v1/topics/orders/buckets?from=2000000&to=1000000",
            "from",
        ),
        (
            "/api/v1/topics/orders/buckets?from=0&to=1764067200000",
            "from",
        ),
        ("/api/v1/topics/orders/buckets?colour=red", "colour"),
        ("/api/v1/topics/orders/buckets?to=1&to=2", "to"),
        ("/api/v1/topics?limit=3", "limit"),
        ("/api/v1/verdicts?status=lost", "status"),
        ("/api/v1/verdicts?from=soon", "from"),
        ("/api/v1/alerts?limit=0", "limit"),
        ("/api/v1/alerts?status=maybe", "status"),
    ];
    for (path, param) in cases {
        let (status, body) = get(&collector.url(path), Some(TOKEN)).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["parameter"], param, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{param}`")), "{path}: {message}");
    }

    for path in [
        "/api/v1/topics",
        "/api/v1/topics/orders/buckets?from=2025-11-25T10:40:00Z&to=1764067260000",
        "/api/v1/verdicts?status=missing&from=1764067200000",
        "/api/v1/alerts?status=open&limit=10",
    ] {
        let (status, body) = get(&collector.url(path), Some(TOKEN)).await?;
        assert_eq!(status, 200, "{path}: {body}");
        let (status, _) = get(&collector.url(path), None).await?;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = get(&collector.url(path), Some("wrong")).await?;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    // Health and metrics stay open.
    for path in ["/healthz", "/metrics"] {
        let (status, _) = get(&collector.url(path), None).await?;
        assert_eq!(status, 200, "{path}");
    }
    let (status, _) = get(&collector.url("/nowhere"), None).await?;
    assert_eq!(status, 404);

    collector.stop().await?;
    db.drop_db().await
}

fn values(seed: u64, n: usize, base: i64, spread: i64) -> Vec<i64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            base + ((x >> 33) as i64 % spread)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentiles_are_exact_merges_across_hosts() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(2).await?;
    let topic = unique("latency");
    // Three hosts in two datacenters with very different latency, over three partitions,
    // each host's values split over several records sent in two rounds (so histograms are
    // merged both within a batch and with what is already stored).
    let hosts = [
        ("dc1", "fast", values(1, 3_000, 5, 20)),
        ("dc1", "medium", values(2, 400, 150, 100)),
        ("dc2", "slow", values(3, 60, 4_000, 3_000)),
    ];
    let mut rounds: [Vec<AuditRecord>; 2] = [Vec::new(), Vec::new()];
    let mut all = Vec::new();
    let mut per_host_p99 = Vec::new();
    for (dc, host, vals) in &hosts {
        let mut own = Latency::new();
        for (i, chunk) in vals.chunks(vals.len().div_ceil(6)).enumerate() {
            for &v in chunk {
                own.record(v);
                all.push(v);
            }
            rounds[i % 2].push(AuditRecord::Counts(counts(
                &format!("{topic}-{host}-{i}"),
                &topic,
                Some((i % 3) as i32),
                BUCKET,
                observer(Tier::Regional, dc, host),
                chunk,
            )));
        }
        per_host_p99.push(own.quantile(0.99).expect("values"));
    }
    // Another tier in the same bucket must not mix in.
    rounds[0].push(AuditRecord::Counts(counts(
        &format!("{topic}-producer"),
        &topic,
        Some(0),
        BUCKET,
        observer(Tier::Producer, "dc1", "app"),
        &[1, 2, 3],
    )));

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    produce(&topics, &encode_all(&rounds[0])).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;
    produce(&topics, &encode_all(&rounds[1])).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;

    let mut direct = Latency::new();
    for &v in &all {
        direct.record(v);
    }
    let url = collector.url(&format!(
        "/api/v1/topics/{topic}/buckets?from={BUCKET}&to={}",
        BUCKET + 60_000
    ));
    let (status, body) = get(&url, None).await?;
    assert_eq!(status, 200, "{body}");
    let buckets = body["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 1, "{body}");
    let tiers = buckets[0]["tiers"].as_array().expect("tiers");
    let regional = tiers
        .iter()
        .find(|t| t["tier"] == "regional")
        .expect("regional tier");
    assert_eq!(regional["count"], all.len() as u64);
    assert_eq!(regional["datacenters"], serde_json::json!(["dc1", "dc2"]));
    let lat = &regional["latency_ms"];
    assert_eq!(lat["samples"], all.len() as u64);
    assert_eq!(lat["p50"], direct.quantile(0.50).expect("p50"));
    assert_eq!(lat["p95"], direct.quantile(0.95).expect("p95"));
    assert_eq!(lat["p99"], direct.quantile(0.99).expect("p99"));
    assert_eq!(lat["max"], direct.max().expect("max"));
    // An average of the hosts' p99s would be far off the true p99.
    let averaged = per_host_p99.iter().sum::<u64>() / per_host_p99.len() as u64;
    assert_ne!(lat["p99"], averaged);
    let producer = tiers
        .iter()
        .find(|t| t["tier"] == "producer")
        .expect("producer tier");
    assert_eq!(producer["count"], 3);
    assert_eq!(producer["latency_ms"]["max"], 3);

    // The topic is listed.
    let (status, body) = get(&collector.url("/api/v1/topics"), None).await?;
    assert_eq!(status, 200);
    assert!(
        body["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .any(|t| t["topic"] == topic.as_str() && t["last_bucket_start_ms"] == BUCKET),
        "{body}"
    );
    let (_, metrics) = get(&collector.url("/metrics"), None).await?;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(metrics.contains("chaperone_collector_records_ingested_total{kind=\"counts\"}"));
    assert!(metrics.contains("chaperone_collector_batch_duration_seconds_bucket"));

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_the_database_on_connections_of_its_own() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    // The collector's pool: two connections, both of which the test takes below.
    let pool = pool_options().max_connections(2).connect(&db.url).await?;
    let collector = InProcess::start(config(&db, &topics), pool.clone(), None).await?;
    eventually(
        "the collector to be ready",
        Duration::from_secs(60),
        || async {
            let (status, _) = get(&collector.url("/readyz"), None).await?;
            Ok((status == 200).then_some(()))
        },
    )
    .await?;

    // Every connection of the pool is busy (long queries, a stalled batch): /readyz still
    // reaches the database.
    let held = eventually(
        "both connections of the collector's pool",
        Duration::from_secs(30),
        || async {
            let a = pool.try_acquire();
            let b = pool.try_acquire();
            Ok(a.zip(b))
        },
    )
    .await?;
    let (_, body) = get(&collector.url("/readyz"), None).await?;
    assert_ne!(
        body["reason"], "database unreachable",
        "/readyz waited for the busy pool: {body}"
    );
    drop(held);

    // A flood of probes meanwhile takes none of the pool: the records of a produce in the
    // middle of it are all stored.
    let flood: Vec<_> = (0..200)
        .map(|_| {
            let url = collector.url("/readyz");
            tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let records: Vec<AuditRecord> = mixed_records(&unique("flood"), 500);
    produce(&topics, &encode_all(&records)).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;
    for probe in flood {
        let status = probe.await??;
        assert!([200, 503].contains(&status), "/readyz answered {status}");
    }
    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&records));

    collector.stop().await?;
    pool.close().await;
    db.drop_db().await
}
