//! A producer that writes any CreateTime it likes (the service accepts 2000 to 2200) opens a
//! cell per message. Against the real stack (`dev/stack up`): the service commits such cells
//! early, through its usual transactions, whenever they reach `open_cells_max_bytes`, and its
//! counts stay exact. Memory itself is measured by `benches/memory.rs`, not asserted here.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rand::Rng as _;

/// 2000-01-01T00:00:00Z and 2200-01-01T00:00:00Z, in epoch milliseconds.
const YEAR_2000_MS: i64 = 946_684_800_000;
const YEAR_2200_MS: i64 = 7_258_118_400_000;
const WIDTH_MS: i64 = 60_000;

/// Random CreateTimes over two centuries (a cell per message) after runs of recent times in
/// a few buckets (cells with enough distinct latencies to hold a full histogram), with
/// early flushes at the smallest `open_cells_max_bytes`: every message is counted once, in
/// its partition and bucket, and every counts record carries a latency per timed message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_create_times_are_counted_exactly_through_early_flushes() {
    const PARTITIONS: i32 = 3;
    const SCATTERED: usize = 24_000;
    const RECENT: usize = 6_000;
    let (prefix, audit, topic, bootstrap) =
        regional_topic("svc-create-times", "events", PARTITIONS).await;
    let now = now_ms();
    let mut rng = rand::rng();
    let mut msgs: Vec<Msg> = (0..SCATTERED + RECENT)
        .map(|i| {
            // Recent messages first, so that each partition reads them in one run.
            let timestamp = if i < RECENT {
                now - rng.random_range(0..600_000)
            } else {
                rng.random_range(YEAR_2000_MS..YEAR_2200_MS)
            };
            Msg {
                partition: rng.random_range(0..PARTITIONS),
                timestamp,
                payload: format!("{{\"n\":{i}}}").into_bytes(),
            }
        })
        .collect();
    // The first and last minutes of the range, exactly.
    for (i, timestamp) in [YEAR_2000_MS, YEAR_2200_MS - 1].into_iter().enumerate() {
        msgs.push(Msg {
            partition: i as i32,
            timestamp,
            payload: b"{}".to_vec(),
        });
    }
    let mut expected = Expected::new();
    expect(&mut expected, &topic, &msgs, WIDTH_MS);
    assert!(
        expected.len() > SCATTERED * 9 / 10,
        "the scattered messages open about one cell each: {} cells",
        expected.len()
    );
    // Kafka 4 brokers refuse CreateTimes more than an hour ahead by default; a topic can
    // accept them, as a producer's topic may.
    set_topic_config(
        &bootstrap,
        &topic,
        &[("message.timestamp.after.max.ms", &i64::MAX.to_string())],
    )
    .await;
    produce(&producer(&bootstrap), &topic, &msgs);
    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);
    assert_eq!(
        ends.values().sum::<i64>(),
        msgs.len() as i64,
        "every message is stored"
    );

    // A timed flush would come only after the whole backlog is read: what is committed
    // before is committed early.
    let mut cfg = regional_config(&prefix, &bootstrap, &audit, &topic).flush_interval("20s");
    cfg.toml = cfg
        .toml
        .replace("[topics]", "open_cells_max_bytes = 1048576\n\n[topics]");
    let service = InProcess::start(cfg.parse("0")).await;
    let addr = service.addr;

    let mut reader = AuditReader::new(&bootstrap, &audit, 3, std::slice::from_ref(&topic));
    let want = expected.clone();
    let reader = tokio::task::spawn_blocking(move || {
        reader.wait_exact(&want, &ends, Duration::from_secs(120), &|| String::new());
        reader
    })
    .await
    .expect("reader");

    // Exact per partition, and per bucket over all partitions.
    let got = reader.totals();
    let by = |t: &Expected, key: fn(&(String, i32, i64)) -> i64| {
        let mut m: BTreeMap<i64, u64> = BTreeMap::new();
        for (k, n) in t {
            *m.entry(key(k)).or_default() += n;
        }
        m
    };
    assert_eq!(
        by(&got, |k| i64::from(k.1)),
        by(&expected, |k| i64::from(k.1))
    );
    assert_eq!(by(&got, |k| k.2), by(&expected, |k| k.2));
    assert_eq!(reader.total(), msgs.len() as u64);
    for c in &reader.counts {
        assert_eq!(
            c.latency.len(),
            c.count,
            "a latency per timed message: {c:?}"
        );
        assert!(
            c.min_event_ms.is_some_and(|m| m >= c.bucket_start_ms)
                && c.max_event_ms
                    .is_some_and(|m| m < c.bucket_start_ms + WIDTH_MS),
            "event times inside the bucket: {c:?}"
        );
    }
    let dense = reader.counts.iter().filter(|c| c.count > 64).count();
    assert!(
        dense > 0,
        "some cells saw enough messages to hold a full histogram"
    );

    let (_, body) = http_get(addr, "/metrics").await;
    let early = metric_value(&body, "chaperone_service_early_flushes_total");
    assert!(
        early >= 10.0,
        "the backlog was committed in early flushes, saw {early}"
    );
    service.stop().await;
}
