//! Messages per second through `AuditedConsumer` vs a bare rdkafka `BaseConsumer` reading
//! the same messages from the real regional broker, in the same run. Target: at least 0.95x.
//!
//! `cargo bench -p chaperone-audit --bench consumer` (needs `dev/stack up`). The messages
//! (`CHAPERONE_BENCH_MESSAGES`, default 5,000,000, of 100 B, on 3 partitions) are produced
//! once; each round reads all of them with a new group, counting every message
//! (`processed` on the audited side) and committing every 1,000 (`commit_message`, async).
//! `CHAPERONE_BENCH_ROUNDS` sets the rounds of each side (default 10),
//! `CHAPERONE_BENCH_KAFKA` adds librdkafka properties to both consumers,
//! `CHAPERONE_BENCH_SIDE=bare` or `audited` runs one side alone (to profile it), and
//! `CHAPERONE_BENCH_BARE_CLOCK_READS` gives the bare consumer that many clock reads per
//! message (to see what a known amount of work per message costs on the host).
//! Rounds alternate which consumer goes first; the summary shows the medians, the ratio, and
//! the CPU per message of the process and of the polling thread. Timings are never asserted.

use std::time::{Duration, Instant};

use chaperone_audit::{AuditConfig, AuditedConsumer};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PAYLOAD: usize = 100;
const PARTITIONS: i32 = 3;
const COMMIT_EVERY: usize = 1_000;

fn messages() -> usize {
    env_number("CHAPERONE_BENCH_MESSAGES", 5_000_000)
}

/// Rounds of each side (`CHAPERONE_BENCH_ROUNDS`, default 10).
fn rounds() -> usize {
    env_number("CHAPERONE_BENCH_ROUNDS", 10).max(1)
}

fn env_number(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

/// CPU time (user and system) in clock ticks (1/100 s on Linux) from a `stat` file of
/// `/proc`; 0 where unavailable.
fn ticks(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
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

/// CPU time of the whole process (librdkafka's threads included) and of the polling thread,
/// in clock ticks.
#[derive(Clone, Copy)]
struct Cpu {
    process: u64,
    thread: u64,
}

impl Cpu {
    fn now() -> Self {
        Self {
            process: ticks("/proc/self/stat"),
            thread: ticks("/proc/thread-self/stat"),
        }
    }
}

/// One side's figures in one round.
#[derive(Clone, Copy)]
struct Run {
    /// Messages per second.
    rate: f64,
    /// CPU µs per message, whole process.
    cpu: f64,
    /// CPU µs per message, polling thread.
    thread_cpu: f64,
}

impl Run {
    /// `n` messages in `elapsed` seconds, CPU from `since`.
    fn new(n: usize, elapsed: f64, since: Cpu) -> Self {
        let now = Cpu::now();
        let us = |a: u64, b: u64| (b - a) as f64 * 10_000.0 / n as f64;
        Self {
            rate: (n - 1) as f64 / elapsed,
            cpu: us(since.process, now.process),
            thread_cpu: us(since.thread, now.thread),
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.0} msg/s, cpu-us/msg {:.2} (polling thread {:.2})",
            self.rate, self.cpu, self.thread_cpu
        )
    }
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

/// Reads `n` messages of `topic` with a bare consumer (`CHAPERONE_BENCH_BARE_CLOCK_READS`:
/// that many reads of the clock per message, work of a known cost).
fn bare(topic: &str, n: usize) -> anyhow::Result<Run> {
    let consumer: BaseConsumer =
        consumer_config(&chaperone_test_support::unique("bench-bare")).create()?;
    consumer.subscribe(&[topic])?;
    let extra_clock_reads = env_number("CHAPERONE_BENCH_BARE_CLOCK_READS", 0);
    let mut bytes = 0usize;
    let mut received = 0usize;
    let mut start = None;
    while received < n {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if start.is_none() {
            start = Some((Instant::now(), Cpu::now()));
        }
        bytes += m.payload_len();
        for _ in 0..extra_clock_reads {
            std::hint::black_box(Instant::now());
        }
        received += 1;
        if received.is_multiple_of(COMMIT_EVERY) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    let (start, cpu) = start.expect("messages were read");
    let run = Run::new(n, start.elapsed().as_secs_f64(), cpu);
    anyhow::ensure!(bytes == n * PAYLOAD, "payload bytes");
    Ok(run)
}

/// Reads `n` messages of `topic` with an audited consumer, each marked processed.
fn audited(topic: &str, audit_topic: &str, n: usize) -> anyhow::Result<Run> {
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
    while received < n {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if start.is_none() {
            start = Some((Instant::now(), Cpu::now()));
        }
        consumer.processed(&m);
        received += 1;
        if received.is_multiple_of(COMMIT_EVERY) {
            consumer.commit_message(&m, CommitMode::Async)?;
        }
    }
    let (start, cpu) = start.expect("messages were read");
    let run = Run::new(n, start.elapsed().as_secs_f64(), cpu);
    let stats = consumer.close();
    anyhow::ensure!(
        stats.counted == n as u64,
        "counted {} of {n}",
        stats.counted
    );
    Ok(run)
}

/// Creates the topics and produces `n` messages; returns (topic, audit topic).
fn setup(n: usize) -> anyhow::Result<(String, String)> {
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
    Ok((topic, audit_topic))
}

/// Runs one side alone (`CHAPERONE_BENCH_SIDE`), for a profiler.
fn alone(side: &str, n: usize) -> anyhow::Result<()> {
    let (topic, audit_topic) = setup(n)?;
    for round in 0..rounds() {
        let run = if side == "bare" {
            bare(&topic, n)?
        } else {
            audited(&topic, &audit_topic, n)?
        };
        println!("round {round:>2}: {side} {run}");
    }
    Ok(())
}

/// `CHAPERONE_BENCH_SIDE`: `Some("bare")` or `Some("audited")` to run only that side.
fn side() -> anyhow::Result<Option<String>> {
    match std::env::var("CHAPERONE_BENCH_SIDE") {
        Err(_) => Ok(None),
        Ok(s) if s == "bare" || s == "audited" => Ok(Some(s)),
        Ok(s) => anyhow::bail!("CHAPERONE_BENCH_SIDE is {s:?}: expected bare or audited"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n = messages();
    if let Some(side) = side()? {
        return alone(&side, n);
    }
    let (topic, audit_topic) = setup(n)?;
    let rounds = rounds();
    let mut pairs: Vec<(Run, Run)> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (b, a) = if round % 2 == 0 {
            let b = bare(&topic, n)?;
            (b, audited(&topic, &audit_topic, n)?)
        } else {
            let a = audited(&topic, &audit_topic, n)?;
            (bare(&topic, n)?, a)
        };
        println!(
            "round {round:>2}: bare {b}\n          audited {a}, ratio {:.3}",
            a.rate / b.rate
        );
        pairs.push((b, a));
    }
    let med = |f: &dyn Fn(&(Run, Run)) -> f64| median(pairs.iter().map(f).collect());
    let (rb, ra) = (med(&|p| p.0.rate), med(&|p| p.1.rate));
    let (cb, ca) = (med(&|p| p.0.cpu), med(&|p| p.1.cpu));
    let (tb, ta) = (med(&|p| p.0.thread_cpu), med(&|p| p.1.thread_cpu));
    println!(
        "\n{n} messages x {rounds} rounds each, extra properties {:?} (medians)",
        extra_properties()
    );
    println!("  bare BaseConsumer:  {rb:>9.0} msg/s, cpu-us/msg {cb:.3} (polling thread {tb:.3})");
    println!("  AuditedConsumer:    {ra:>9.0} msg/s, cpu-us/msg {ca:.3} (polling thread {ta:.3})");
    println!("  ratio of medians:   {:.3}x (target >= 0.95x)", ra / rb);
    println!(
        "  median round ratio: {:.3}x",
        med(&|p| p.1.rate / p.0.rate)
    );
    println!(
        "  cpu per message:    {:.3}x of bare (polling thread {:.3}x, +{:.3} us)",
        ca / cb,
        ta / tb,
        ta - tb
    );
    Ok(())
}
