//! Integration tests against the real stack (`dev/stack up`): regional Kafka at
//! 127.0.0.1:19092, aggregate Kafka at 127.0.0.1:29092, MirrorMaker 2 between them. Each test
//! uses its own random topics, consumer group and audit topic, so tests run in parallel with
//! each other and with other crates' tests. A missing stack fails the tests.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaperone_audit::Tier;
use common::*;
use rand::Rng as _;

const WIDTH_MS: i64 = 60_000;

/// Messages spread over `partitions` partitions and several one-minute buckets of the last
/// ten minutes, with known CreateTime timestamps.
fn known_messages(n: usize, partitions: i32, base: i64) -> Vec<Msg> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| Msg {
            partition: (i as i32) % partitions,
            timestamp: base - rng.random_range(0..600_000),
            payload: format!("{{\"n\":{i}}}").into_bytes(),
        })
        .collect()
}

/// The in-process service counts known messages across topics and partitions exactly,
/// picks up a topic created after it started, and serves metrics and readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_known_messages_exactly_per_topic_partition_bucket() {
    let prefix = unique("svc-known");
    let audit = format!("{prefix}-audit");
    let topics: Vec<String> = (0..3).map(|i| format!("{prefix}-t{i}")).collect();
    let bootstrap = regional();
    create_topic(&bootstrap, &audit, 3).await;
    for t in &topics {
        create_topic(&bootstrap, t, 3).await;
    }
    let base = now_ms();
    let producer = producer(&bootstrap);
    let mut expected = Expected::new();
    for (i, t) in topics.iter().enumerate() {
        let msgs = known_messages(500 + 250 * i, 3, base);
        produce(&producer, t, &msgs);
        expect(&mut expected, t, &msgs, WIDTH_MS);
    }

    let cfg = TestConfig::new(
        &bootstrap,
        "regional",
        "regional",
        "dc-test",
        &format!("{prefix}-g"),
        &audit,
        &format!("^{prefix}-t"),
    );
    let service = InProcess::start(cfg.parse("0")).await;
    let addr = service.addr;

    // Ready once the group assigned partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = http_get(addr, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    // A topic created after start-up is picked up without a restart.
    let late = format!("{prefix}-t9");
    create_topic(&bootstrap, &late, 2).await;
    let late_msgs = known_messages(300, 2, base);
    produce(&producer, &late, &late_msgs);
    expect(&mut expected, &late, &late_msgs, WIDTH_MS);

    let mut all_topics = topics.clone();
    all_topics.push(late.clone());
    let mut parts: Vec<(String, i32)> = topics.iter().map(|t| (t.clone(), 3)).collect();
    parts.push((late.clone(), 2));
    let ends = ends(&bootstrap, &parts);
    let mut reader = AuditReader::new(&bootstrap, &audit, 3, &all_topics);
    let b = tokio::task::spawn_blocking(move || {
        reader.wait_exact(&expected, &ends, Duration::from_secs(90), &|| String::new());
        reader
    });
    let reader = b.await.expect("reader");

    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let want_total: u64 = reader.total();
    let line = format!("chaperone_service_messages_total{{tier=\"regional\"}} {want_total}");
    assert!(body.contains(&line), "metrics lack `{line}`:\n{body}");
    assert!(body.contains("chaperone_service_transactions_total{result=\"committed\"}"));
    assert!(body.contains("chaperone_service_partition_consumer_lag_messages{"));

    for c in &reader.counts {
        assert_eq!(c.observer.tier, Tier::Regional);
        assert_eq!(c.observer.datacenter, "dc-test");
        assert_eq!(c.observer.cluster, "regional");
        assert_eq!(
            c.topic, c.physical_topic,
            "regional tier maps topics to themselves"
        );
        assert_eq!(c.no_timestamp, 0);
        assert!(
            c.latency.len() == c.count,
            "every timed message has a latency"
        );
    }
    assert!(reader.progress_records > 0);

    service.stop().await;
}

/// Transactions that the broker rejects (here: audit records larger than the audit topic
/// accepts) are aborted while the loop keeps counting on the other thread; the aborted
/// counts and everything counted since are dropped and recounted from the committed offsets,
/// so once the topic accepts records again the totals are exact and no id repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_recounted_exactly_once() {
    const PARTITIONS: i32 = 3;
    // `local-*` topics are not mirrored (dev/kafka/mm2-*.properties): MirrorMaker would copy
    // the audit topic's size limit below to the aggregate cluster and stop on it.
    let (prefix, audit, topic, bootstrap) =
        regional_topic("local-svc-abort", "events", PARTITIONS).await;
    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic).flush_interval("200ms");
    let service = InProcess::start(cfg.parse("0")).await;
    let addr = service.addr;
    let metric = |series: &'static str| async move {
        let (_, body) = http_get(addr, "/metrics").await;
        metric_value(&body, series)
    };
    let committed = "chaperone_service_transactions_total{result=\"committed\"}";
    let aborted = "chaperone_service_transactions_total{result=\"aborted\"}";
    let counted = "chaperone_service_messages_total{tier=\"regional\"}";

    let base = now_ms();
    let p = producer(&bootstrap);
    let mut expected = Expected::new();
    let first = known_messages(3_000, PARTITIONS, base);
    produce(&p, &topic, &first);
    expect(&mut expected, &topic, &first, WIDTH_MS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(counted).await < 3_000.0 {
        assert!(Instant::now() < deadline, "first messages never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every audit record is now too large for the audit topic (transaction markers, about
    // 80 bytes, still fit: the broker must be able to finish the aborts).
    set_topic_config(&bootstrap, &audit, &[("max.message.bytes", "200")]).await;
    let second = known_messages(5_000, PARTITIONS, base);
    produce(&p, &topic, &second);
    expect(&mut expected, &topic, &second, WIDTH_MS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(aborted).await < 3.0 {
        assert!(Instant::now() < deadline, "no transaction was aborted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed_while_rejecting = metric(committed).await;
    assert_eq!(
        metric(counted).await,
        3_000.0,
        "nothing counted may be committed while the audit topic rejects records"
    );

    set_topic_config(&bootstrap, &audit, &[]).await;
    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);
    let mut reader = AuditReader::new(&bootstrap, &audit, 3, std::slice::from_ref(&topic));
    let reader = tokio::task::spawn_blocking(move || {
        reader.wait_exact(&expected, &ends, Duration::from_secs(90), &|| String::new());
        reader
    })
    .await
    .expect("reader");
    assert_eq!(reader.total(), 8_000);
    assert!(reader.duplicate_ids.is_empty());
    assert!(metric(committed).await > committed_while_rejecting);
    assert_eq!(metric(counted).await, 8_000.0);

    service.stop().await;
}

/// `kill -9` at random moments during a 200k-message run, restarting each time: every
/// message is still counted exactly once and no record id repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_and_restart_counts_every_message_exactly_once() {
    const TOTAL: usize = 200_000;
    const PARTITIONS: i32 = 6;
    let (prefix, audit, topic, bootstrap) = regional_topic("svc-kill", "events", PARTITIONS).await;

    let dir = TempDir::new("chaperone-kill");
    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic).flush_interval("500ms");
    let path = cfg.write(&dir.0);
    let log = dir.0.join("service.log");

    // Produce in the background while the service is killed and restarted.
    let base = now_ms();
    let msgs = known_messages(TOTAL, PARTITIONS, base);
    let mut expected = Expected::new();
    expect(&mut expected, &topic, &msgs, WIDTH_MS);
    let producing = {
        let bootstrap = bootstrap.clone();
        let topic = topic.clone();
        std::thread::spawn(move || {
            let p = producer(&bootstrap);
            for chunk in msgs.chunks(20_000) {
                produce(&p, &topic, chunk);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    let mut rng = rand::rng();
    let mut service = Service::spawn(&path, "0", log.clone());
    for round in 0..4 {
        let wait = Duration::from_millis(rng.random_range(1_500..5_000));
        std::thread::sleep(wait);
        service.assert_running();
        eprintln!("round {round}: kill -9 after {wait:?}");
        service.kill();
        service = Service::spawn(&path, "0", log.clone());
    }
    producing.join().expect("producer thread");

    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);
    let mut reader = AuditReader::new(&bootstrap, &audit, 3, std::slice::from_ref(&topic));
    let log_for_failure = log.clone();
    reader.wait_exact(&expected, &ends, Duration::from_secs(120), &move || {
        std::fs::read_to_string(&log_for_failure)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    });
    service.terminate();
    // Nothing more arrives after a clean stop.
    reader.poll_for(Duration::from_secs(2));
    assert_eq!(reader.total(), TOTAL as u64);
    assert!(reader.duplicate_ids.is_empty());
}

/// Two instances in one group split the partitions; one is stopped midway and the other
/// takes its partitions over: totals stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_stopped_midway_count_exactly() {
    const PARTITIONS: i32 = 6;
    let (prefix, audit, topic, bootstrap) = regional_topic("svc-pair", "events", PARTITIONS).await;
    let dir = TempDir::new("chaperone-pair");
    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic);
    let path = cfg.write(&dir.0);

    let base = now_ms();
    let msgs = known_messages(60_000, PARTITIONS, base);
    let mut expected = Expected::new();
    expect(&mut expected, &topic, &msgs, WIDTH_MS);
    let p = producer(&bootstrap);
    let (first, second) = msgs.split_at(30_000);
    produce(&p, &topic, first);

    let mut a = Service::spawn(&path, "a", dir.0.join("a.log"));
    let mut b = Service::spawn(&path, "b", dir.0.join("b.log"));

    // Wait until both instances own partitions (each has committed a record).
    let mut reader = AuditReader::new(&bootstrap, &audit, 3, std::slice::from_ref(&topic));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        reader.poll_for(Duration::from_millis(500));
        if reader.instances.len() == 2 {
            break;
        }
        a.assert_running();
        b.assert_running();
        assert!(
            Instant::now() < deadline,
            "both instances never owned partitions; a:\n{}\nb:\n{}",
            a.log_text(),
            b.log_text()
        );
    }
    produce(&p, &topic, &second[..10_000]);
    b.terminate();
    produce(&p, &topic, &second[10_000..]);

    let ends = ends(&bootstrap, &[(topic.clone(), PARTITIONS)]);
    reader.wait_exact(&expected, &ends, Duration::from_secs(90), &|| {
        format!("a:\n{}", a.log_text())
    });
    let by_instance: HashMap<String, u64> =
        reader.counts.iter().fold(HashMap::new(), |mut m, c| {
            *m.entry(c.observer.instance.clone()).or_default() += c.count;
            m
        });
    assert!(by_instance.get("a").copied().unwrap_or(0) > 0);
    assert!(by_instance.get("b").copied().unwrap_or(0) > 0);
    a.terminate();
}

/// With a JSON event-time field configured, garbage payloads are counted as malformed (and
/// without timestamp), never skipped; valid JSON in the same topic is dated by the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_payloads_are_counted_as_malformed() {
    let (prefix, audit, topic, bootstrap) = regional_topic("svc-garbage", "junk", 2).await;

    let base = now_ms();
    let mut rng = rand::rng();
    // Partition 0: garbage. Partition 1: JSON whose field dates it (in seconds).
    let garbage: Vec<Msg> = (0..400)
        .map(|i| Msg {
            partition: 0,
            timestamp: base,
            payload: match i % 4 {
                0 => (0..16).map(|_| rng.random::<u8>()).collect(),
                1 => b"{\"ts\": \"not a time\"}".to_vec(),
                2 => b"[1, 2, 3]".to_vec(),
                _ => format!("{{\"ts\": {}", base / 1000).into_bytes(),
            },
        })
        .collect();
    let event_s = (base - 3_600_000) / 1000;
    let dated: Vec<Msg> = (0..100)
        .map(|_| Msg {
            partition: 1,
            timestamp: base,
            payload: format!("{{\"id\": 1, \"ts\": {event_s}}}").into_bytes(),
        })
        .collect();
    let p = producer(&bootstrap);
    produce(&p, &topic, &garbage);
    produce(&p, &topic, &dated);

    let cfg = regional_config(&prefix, &bootstrap, &audit, &topic)
        .with("\n[event_time]\nsources = [\"json_field\", \"create_time\"]\njson_field = \"ts\"\n");
    let service = InProcess::start(cfg.parse("0")).await;

    let ends = ends(&bootstrap, &[(topic.clone(), 2)]);
    let topics = vec![topic.clone()];
    let reader = tokio::task::spawn_blocking(move || {
        let mut reader = AuditReader::new(&bootstrap, &audit, 3, &topics);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            reader.poll_for(Duration::from_millis(500));
            let at_end = ends
                .iter()
                .all(|(k, e)| reader.positions.get(k).copied().unwrap_or(-1) >= *e);
            if at_end && reader.total() >= 500 {
                break reader;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: counted {}",
                reader.total()
            );
        }
    })
    .await
    .expect("reader");
    service.stop().await;

    let p0: Vec<_> = reader
        .counts
        .iter()
        .filter(|c| c.partition == Some(0))
        .collect();
    let p1: Vec<_> = reader
        .counts
        .iter()
        .filter(|c| c.partition == Some(1))
        .collect();
    assert_eq!(p0.iter().map(|c| c.count).sum::<u64>(), 400);
    assert_eq!(p0.iter().map(|c| c.malformed).sum::<u64>(), 400);
    assert_eq!(p0.iter().map(|c| c.no_timestamp).sum::<u64>(), 400);
    assert_eq!(p1.iter().map(|c| c.count).sum::<u64>(), 100);
    assert_eq!(p1.iter().map(|c| c.malformed).sum::<u64>(), 0);
    let bucket = (event_s * 1000).div_euclid(WIDTH_MS) * WIDTH_MS;
    assert!(
        p1.iter().all(|c| c.bucket_start_ms == bucket),
        "dated by the JSON field, not CreateTime"
    );
}

/// The aggregate tier audits MirrorMaker 2's copies: counts land under the logical topic and
/// the source datacenter, with exact totals. Read to its end, a mirror says nothing about what
/// is still upstream of MirrorMaker: its watermark is the latest event time read (the messages
/// are an hour old), never the wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_tier_maps_mirrored_topics_to_logical_topic_and_source() {
    let prefix = unique("svc-mirror");
    let topic = format!("{prefix}-orders");
    let mirrored = format!("regional.{topic}");
    let audit = format!("{prefix}-audit");
    let regional_bootstrap = regional();
    let aggregate_bootstrap = aggregate();
    create_topic(&regional_bootstrap, &topic, 2).await;
    create_topic(&aggregate_bootstrap, &audit, 3).await;

    let base = now_ms() - 3_600_000;
    let msgs = known_messages(2_000, 2, base);
    let mut max_event: HashMap<i32, i64> = HashMap::new();
    for m in &msgs {
        let e = max_event.entry(m.partition).or_insert(m.timestamp);
        *e = (*e).max(m.timestamp);
    }
    let mut expected = Expected::new();
    expect(&mut expected, &mirrored, &msgs, WIDTH_MS);
    produce(&producer(&regional_bootstrap), &topic, &msgs);

    let cfg = TestConfig::new(
        &aggregate_bootstrap,
        "aggregate",
        "aggregate",
        "dc-aggregate",
        &format!("{prefix}-g"),
        &audit,
        &format!("^regional\\.{prefix}-"),
    );
    let service = InProcess::start(cfg.parse("0")).await;

    let topics = vec![mirrored.clone()];
    let reader = tokio::task::spawn_blocking(move || {
        let mut reader = AuditReader::new(&aggregate_bootstrap, &audit, 3, &topics);
        let want: u64 = expected.values().sum();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            reader.poll_for(Duration::from_millis(500));
            let got = reader.total();
            assert!(
                got <= want,
                "over-counted {got} > {want}\n{}",
                diff(&expected, &reader.totals())
            );
            for p in &reader.progress {
                let part = p.partition.expect("partition");
                assert!(
                    p.watermark_ms <= max_event[&part],
                    "mirrored partition {part} claims {} ms past its latest event time: {p:?}",
                    p.watermark_ms - max_event[&part]
                );
            }
            let final_watermarks = (0..2).all(|part| {
                reader
                    .progress
                    .iter()
                    .rev()
                    .find(|p| p.partition == Some(part))
                    .is_some_and(|p| p.watermark_ms == max_event[&part])
            });
            if got == want && final_watermarks {
                assert_eq!(reader.totals(), expected, "per-cell totals differ");
                break reader;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: counted {got} of {want} (is MirrorMaker running?)\n{}",
                diff(&expected, &reader.totals())
            );
        }
    })
    .await
    .expect("reader");
    service.stop().await;

    for c in &reader.counts {
        assert_eq!(c.topic, topic, "logical topic");
        assert_eq!(c.physical_topic, mirrored);
        assert_eq!(
            c.observer.datacenter, "regional",
            "source datacenter from the mirror prefix"
        );
        assert_eq!(c.observer.tier, Tier::Aggregate);
        assert_eq!(c.observer.cluster, "aggregate");
    }
    assert!(reader.duplicate_ids.is_empty());
}
