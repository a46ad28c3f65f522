//! Messages per second through `AuditedConsumer` vs a bare rdkafka `BaseConsumer` reading
//! the same messages from the real regional broker, in the same run. Target: at least 0.95x.
//!
//! `cargo bench -p chaperone-audit --bench consumer` (needs `dev/stack up`). The messages
//! (`CHAPERONE_BENCH_MESSAGES`, default 5,000,000, of 100 B, on 3 partitions) are produced
//! once; each round reads all of them with a new group, counting every message
//! (`processed` on the audited side) and committing every 1,000 (`commit_message`, async).
//! `CHAPERONE_BENCH_KAFKA` adds librdkafka properties to both consumers.
//! Rounds alternate which consumer goes first; the summary shows the median of each and the
//! ratio. Timings are never asserted.

use std::time::{Duration, Instant};

use chaperone_audit::{AuditConfig, AuditedConsumer};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PAYLOAD: usize = 100;
const PARTITIONS: i32 = 3;
const ROUNDS: usize = 3;
const COMMIT_EVERY: usize = 1_000;

fn messages() -> usize {
    std::env::var("CHAPERONE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}

fn kafka() -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set(
        "bootstrap.servers",
        chaperone_test_support::regional_bootstrap(),
    );
    cc
}

fn consumer_config(group: &str) -> ClientConfig {
    let mut cc = kafka();
    cc.set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", "1");
    for (key, value) in extra_properties() {
        cc.set(key, value);
    }
    cc
}

/// `CHAPERONE_BENCH_KAFKA`: more librdkafka properties for both consumers, as
/// `key=value,key=value` (for example `queued.min.messages=10000`).
fn extra_properties() -> Vec<(String, String)> {
    std::env::var("CHAPERONE_BENCH_KAFKA")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// CPU time of the whole process (every thread, librdkafka's included), in clock ticks
/// (1/100 s on Linux), from `/proc/self/stat`; 0 where unavailable.
fn cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn produce(topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: BaseProducer = kafka()
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let payload = vec![b'x'; PAYLOAD];
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..n {
        let mut record = BaseRecord::<(), [u8]>::to(topic)
            .partition((i as i32) % PARTITIONS)
            .payload(payload.as_slice())
            .timestamp(now - (i % 120_000) as i64);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        if i % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Reads `n` messages of `topic` with a bare consumer; returns (msgs/s, CPU µs/msg).
fn bare(topic: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let consumer: BaseConsumer =
        consumer_config(&chaperone_test_support::unique("bench-bare")).create()?;
    consumer.subscribe(&[topic])?;
    let mut bytes = 0usize;
    let mut received = 0usize;
    let mut start = None;
    let mut cpu = 0;
    while received < n {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if start.is_none() {
            start = Some(Instant::now());
            cpu = cpu_ticks();
        }
        bytes += m.payload_len();
        received += 1;
        if received.is_multiple_of(COMMIT_EVERY) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    anyhow::ensure!(bytes == n * PAYLOAD, "payload bytes");
    Ok((
        (n - 1) as f64 / elapsed,
        (cpu_ticks() - cpu) as f64 * 10_000.0 / n as f64,
    ))
}

/// Reads `n` messages of `topic` with an audited consumer, each marked processed; returns
/// (msgs/s, CPU µs/msg).
fn audited(topic: &str, audit_topic: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    // The default flush interval (10 s).
    let audit = AuditConfig {
        topic: audit_topic.to_owned(),
        ..AuditConfig::default()
    };
    let consumer = AuditedConsumer::new(
        &consumer_config(&chaperone_test_support::unique("bench-audited")),
        audit,
        &prometheus::Registry::new(),
    )?;
    consumer.subscribe(&[topic])?;
    let mut received = 0usize;
    let mut start = None;
    let mut cpu = 0;
    while received < n {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if start.is_none() {
            start = Some(Instant::now());
            cpu = cpu_ticks();
        }
        consumer.processed(&m);
        received += 1;
        if received.is_multiple_of(COMMIT_EVERY) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    let elapsed = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let cpu_us = (cpu_ticks() - cpu) as f64 * 10_000.0 / n as f64;
    let stats = consumer.close();
    anyhow::ensure!(
        stats.counted == n as u64,
        "counted {} of {n}",
        stats.counted
    );
    Ok(((n - 1) as f64 / elapsed, cpu_us))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n = messages();
    let topic = chaperone_test_support::unique("bench-consumed");
    let audit_topic = chaperone_test_support::unique("bench-audit");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        chaperone_test_support::create_topic(
            &chaperone_test_support::regional_bootstrap(),
            &topic,
            PARTITIONS,
        )
        .await?;
        chaperone_test_support::create_topic(
            &chaperone_test_support::regional_bootstrap(),
            &audit_topic,
            1,
        )
        .await
    })?;
    let t = Instant::now();
    produce(&topic, n)?;
    println!(
        "produced {n} messages of {PAYLOAD} B in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (mut b, mut a, mut bc, mut ac) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS * 2 {
        let (rb, cb, ra, ca) = if round % 2 == 0 {
            let (rb, cb) = bare(&topic, n)?;
            let (ra, ca) = audited(&topic, &audit_topic, n)?;
            (rb, cb, ra, ca)
        } else {
            let (ra, ca) = audited(&topic, &audit_topic, n)?;
            let (rb, cb) = bare(&topic, n)?;
            (rb, cb, ra, ca)
        };
        println!(
            "round {round:>2}: bare {rb:>9.0} msg/s {cb:>5.2} cpu-us/msg, audited {ra:>9.0} msg/s {ca:>5.2} cpu-us/msg, ratio {:.3}",
            ra / rb
        );
        b.push(rb);
        a.push(ra);
        bc.push(cb);
        ac.push(ca);
    }
    let ratios: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a / b).collect();
    let (mb, ma) = (median(b), median(a));
    let (mbc, mac) = (median(bc), median(ac));
    println!(
        "\n{n} messages x {} rounds each, extra properties {:?}",
        ROUNDS * 2,
        extra_properties()
    );
    println!("  bare BaseConsumer:  {mb:>9.0} msg/s  {mbc:.3} cpu-us/msg (median)");
    println!("  AuditedConsumer:    {ma:>9.0} msg/s  {mac:.3} cpu-us/msg (median)");
    println!("  ratio of medians:   {:.3}x (target >= 0.95x)", ma / mb);
    println!("  median round ratio: {:.3}x", median(ratios));
    println!("  cpu per message:    {:.3}x of bare", mac / mbc);
    Ok(())
}
