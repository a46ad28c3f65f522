//! Memory of chaperone-service whatever CreateTimes producers write, against the real
//! regional broker (`dev/stack up`). Not a pass/fail test: it prints figures.
//!
//! `cargo bench -p chaperone-service --bench memory` runs three parts:
//!
//! 1. **cells**: `BENCH_CELLS` (default 100,000) open cells of one message each, in a child
//!    process each: held in audit-lib's `Tally` (a full 24 KiB histogram per cell, what the
//!    service held before) and in the service's `Tally` (sparse latencies). Prints the RSS
//!    each grew by with every cell open and once they were drained and encoded as counts
//!    records, and the ratio of the two.
//! 2. **buckets**: the binary (the release build `cargo bench` makes, or
//!    `BENCH_BASELINE_BIN` as well for a ratio) reads `BENCH_CELLS` messages in as many
//!    distinct one-minute buckets, all between two flushes (`flush_interval = "30s"`):
//!    the highest RSS until that flush committed (every cell open, then their records in the
//!    transaction), peak RSS, RSS after the flush, and whether the counts read back from the
//!    audit topic are exact.
//! 3. **hostile**: with the default configuration, a producer writes random CreateTimes from
//!    2000 to 2200 at `BENCH_RATE` msg/s (default 20,000) for `BENCH_SECONDS` (default 60)
//!    into 12 partitions: peak RSS, and the counts read back per partition and bucket,
//!    compared with what was produced.
//!
//! `BENCH_PARTS` (default `cells,buckets,hostile`) picks the parts. Topics are deleted at
//! the end. Environment: `CHAPERONE_REGIONAL_BOOTSTRAP`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, BucketWidth, Observer, Tier};
use chaperone_test_support::{create_topic, end_offsets, regional_bootstrap, unique};
use rand::Rng as _;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const YEAR_2000_MS: i64 = 946_684_800_000;
const YEAR_2200_MS: i64 = 7_258_118_400_000;
const WIDTH_MS: i64 = 60_000;
const PARTITIONS: i32 = 12;
const AUDIT_PARTITIONS: i32 = 3;
/// Set in the child processes of part 1: `old` or `new`.
const CHILD: &str = "MEMORY_BENCH_CHILD";

/// Counts per (partition, bucket start).
type Counts = BTreeMap<(i32, i64), u64>;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn random_time(rng: &mut impl rand::Rng) -> i64 {
    rng.random_range(YEAR_2000_MS..YEAR_2200_MS)
}

// ---- part 1: the cells alone -------------------------------------------------------------

/// In a child process: opens `n` cells of one message each in the old or new tally, then
/// drains and encodes them as the service does; prints `open_kib after_kib` (RSS growth).
fn child(kind: &str, n: usize) {
    let pid = std::process::id();
    let width = BucketWidth::from_duration(Duration::from_millis(WIDTH_MS as u64)).expect("width");
    let observer = Observer {
        tier: Tier::Regional,
        datacenter: "dc".into(),
        cluster: "regional".into(),
        host: "bench".into(),
        instance: "0".into(),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let mut rng = rand::rng();
    let before = status_kib(pid, "VmRSS:");
    let mut encoded = 0usize;
    let mut encode = |e: chaperone_audit::Entry, i: usize| {
        let c = e.into_counts(i.to_string(), "events".into(), width, observer.clone(), now);
        encoded += AuditRecord::Counts(c).encode().len();
    };
    let (open, after) = if kind == "old" {
        let mut t = chaperone_audit::Tally::new(width);
        for i in 0..n {
            t.record(
                "events",
                Some(i as i32 % PARTITIONS),
                random_time(&mut rng),
                100,
                now,
            );
        }
        let open = status_kib(pid, "VmRSS:");
        for (i, e) in t.drain().into_iter().enumerate() {
            encode(e, i);
        }
        drop(t);
        (open, status_kib(pid, "VmRSS:"))
    } else {
        let mut t = chaperone_service::tally::Tally::new(width);
        for i in 0..n {
            t.record(
                "events",
                Some(i as i32 % PARTITIONS),
                random_time(&mut rng),
                100,
                now,
            );
        }
        let open = status_kib(pid, "VmRSS:");
        eprintln!(
            "estimated {:.1} MiB for {n} cells",
            t.estimated_bytes() as f64 / 1048576.0
        );
        for (i, e) in t.drain().into_iter().enumerate() {
            encode(e.into_audit(), i);
        }
        drop(t);
        (open, status_kib(pid, "VmRSS:"))
    };
    eprintln!("{kind}: encoded {n} counts records, {encoded} bytes");
    println!("{} {}", open - before, after.saturating_sub(before));
}

fn run_child(kind: &str, n: usize) -> (u64, u64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env(CHILD, kind)
        .env("BENCH_CELLS", n.to_string())
        .output()
        .expect("child");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().expect("kib"));
    (it.next().expect("open"), it.next().expect("after"))
}

fn cells(n: usize) {
    let (old_open, old_after) = run_child("old", n);
    let (new_open, new_after) = run_child("new", n);
    println!("cells: {n} open cells of one message each (RSS growth of the process)");
    println!(
        "  one full histogram per cell (before): {:>8.1} MiB open, {:>8.1} MiB after drain and encode",
        mib(old_open),
        mib(old_after)
    );
    println!(
        "  sparse until busy (now):              {:>8.1} MiB open, {:>8.1} MiB after drain and encode",
        mib(new_open),
        mib(new_after)
    );
    println!(
        "  ratio now/before, open: {:.3}x",
        new_open as f64 / old_open.max(1) as f64
    );
}

// ---- parts 2 and 3: the binary ------------------------------------------------------------

async fn topic_accepting_any_time(bootstrap: &str, name: &str, partitions: i32) {
    create_topic(bootstrap, name, partitions)
        .await
        .expect("create topic (is `dev/stack up` running?)");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let max = i64::MAX.to_string();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(name))
        .set("message.timestamp.after.max.ms", &max);
    for r in admin
        .alter_configs([&alter], &AdminOptions::new())
        .await
        .expect("alter configs")
    {
        r.expect("topic config");
    }
}

async fn delete_topics(bootstrap: &str, names: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .expect("producer")
}

fn send(p: &BaseProducer, topic: &str, partition: i32, timestamp: i64, payload: &[u8]) {
    let mut rec = BaseRecord::<(), [u8]>::to(topic)
        .partition(partition)
        .timestamp(timestamp)
        .payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                p.poll(Duration::from_millis(5));
            }
        }
    }
}

fn bucket(ts: i64) -> i64 {
    ts.div_euclid(WIDTH_MS) * WIDTH_MS
}

/// Reads the counts records of `topic` from `audit` (read_committed) until they add up to
/// `want` or `within` passes.
fn read_counts(bootstrap: &str, audit: &str, topic: &str, want: u64, within: Duration) -> Counts {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("bench-audit-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("audit reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..AUDIT_PARTITIONS {
        tpl.add_partition_offset(audit, p, Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + within;
    let mut got = Counts::new();
    let mut total = 0u64;
    while total < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200))
            && let Ok(AuditRecord::Counts(r)) = AuditRecord::decode(m.payload().unwrap_or_default())
            && r.physical_topic == topic
        {
            total += r.count;
            *got.entry((r.partition.unwrap_or(-1), r.bucket_start_ms))
                .or_default() += r.count;
        }
    }
    got
}

fn compare(want: &Counts, got: &Counts) -> String {
    if want == got {
        let total: u64 = want.values().sum();
        return format!("exact ({total} messages in {} cells)", want.len());
    }
    let missing = want.iter().filter(|(k, v)| got.get(k) != Some(v)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    format!(
        "NOT EXACT: {missing} cells differ, {extra} unexpected (want {}, got {})",
        want.values().sum::<u64>(),
        got.values().sum::<u64>()
    )
}

/// A running binary with its HTTP port.
struct Service {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Service {
    fn spawn(bin: &Path, prefix: &str, bootstrap: &str, topic: &str, extra: &str) -> Self {
        let dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&dir).expect("dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let cfg = dir.join("service.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
cluster = "regional"
datacenter = "bench"
instance = "{prefix}"
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-g"
audit_topic = "{prefix}-audit"
audit_topic_partitions = {AUDIT_PARTITIONS}
http_addr = "127.0.0.1:{port}"
{extra}
[topics]
include = ['^{topic}$']
refresh_interval = "1s"
"#
            ),
        )
        .expect("config");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn");
        Self { child, port, dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn messages(&self) -> u64 {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return 0;
        };
        use std::io::{Read as _, Write as _};
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find(|l| l.starts_with("chaperone_service_messages_total{"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Samples the RSS of `pid` every 100 ms until `stop`; returns the highest sample.
fn sampler(pid: u32, stop: Arc<AtomicBool>, last: Arc<AtomicU64>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            let rss = status_kib(pid, "VmRSS:");
            last.store(rss, Ordering::Relaxed);
            max = max.max(rss);
            std::thread::sleep(Duration::from_millis(100));
        }
        max
    })
}

/// Part 2 with one binary: (RSS with every cell open, peak, RSS after the flush, verdict).
async fn buckets_with(bin: &Path, bootstrap: &str, n: usize) -> (u64, u64, u64, String) {
    let prefix = unique("bench-mem-buckets");
    let topic = format!("{prefix}-events");
    topic_accepting_any_time(bootstrap, &topic, PARTITIONS).await;
    create_topic(bootstrap, &format!("{prefix}-audit"), AUDIT_PARTITIONS)
        .await
        .expect("audit topic");
    // Distinct one-minute buckets, spread over the partitions.
    let mut want = Counts::new();
    {
        let p = producer(bootstrap);
        let mut rng = rand::rng();
        let mut i = 0;
        while want.len() < n {
            let ts = random_time(&mut rng);
            let part = i % PARTITIONS;
            if want.contains_key(&(part, bucket(ts))) {
                continue;
            }
            want.insert((part, bucket(ts)), 1);
            send(&p, &topic, part, ts, b"{\"v\":\"abcdefghijklmnop\"}");
            i += 1;
        }
        p.flush(Duration::from_secs(60)).expect("flush");
    }
    let stored: i64 = end_offsets(bootstrap, &topic, PARTITIONS)
        .expect("ends")
        .iter()
        .sum();
    assert_eq!(stored, n as i64, "every message stored");
    let svc = Service::spawn(
        bin,
        &prefix,
        bootstrap,
        &topic,
        "flush_interval = \"30s\"\ntransaction_timeout = \"60s\"",
    );
    let pid = svc.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let sampling = sampler(pid, stop.clone(), last.clone());
    // The first flush commits every cell: until it has committed, the highest RSS is that
    // of the open cells, then of their records in the transaction.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut open = 0;
    while svc.messages() == 0 && Instant::now() < deadline {
        open = open.max(last.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = status_kib(pid, "VmRSS:");
    let peak = status_kib(pid, "VmHWM:");
    stop.store(true, Ordering::Relaxed);
    let _ = sampling.join();
    let (b, a, t) = (
        bootstrap.to_owned(),
        format!("{prefix}-audit"),
        topic.clone(),
    );
    let got = tokio::task::spawn_blocking(move || {
        read_counts(&b, &a, &t, n as u64, Duration::from_secs(120))
    })
    .await
    .expect("read");
    svc.stop();
    delete_topics(bootstrap, &[topic, format!("{prefix}-audit")]).await;
    (open, peak, after, compare(&want, &got))
}

async fn buckets(bootstrap: &str, n: usize) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_chaperone-service"));
    let (open, peak, after, verdict) = buckets_with(&bin, bootstrap, n).await;
    println!("buckets: {n} messages in {n} distinct (partition, bucket) cells, one flush");
    println!(
        "  this build: {:>8.1} MiB until the flush committed, peak {:>8.1} MiB, {:>8.1} MiB after the flush; counts {verdict}",
        mib(open),
        mib(peak),
        mib(after)
    );
    if let Ok(base) = std::env::var("BENCH_BASELINE_BIN") {
        let (b_open, b_peak, b_after, b_verdict) =
            buckets_with(Path::new(&base), bootstrap, n).await;
        println!(
            "  baseline:   {:>8.1} MiB until the flush committed, peak {:>8.1} MiB, {:>8.1} MiB after the flush; counts {b_verdict}",
            mib(b_open),
            mib(b_peak),
            mib(b_after)
        );
        println!(
            "  ratio this/baseline: open {:.3}x, peak {:.3}x",
            open as f64 / b_open.max(1) as f64,
            peak as f64 / b_peak.max(1) as f64
        );
    }
}

async fn hostile(bootstrap: &str, rate: usize, seconds: usize) {
    let prefix = unique("bench-mem-hostile");
    let topic = format!("{prefix}-events");
    topic_accepting_any_time(bootstrap, &topic, PARTITIONS).await;
    create_topic(bootstrap, &format!("{prefix}-audit"), AUDIT_PARTITIONS)
        .await
        .expect("audit topic");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_chaperone-service"));
    let svc = Service::spawn(&bin, &prefix, bootstrap, &topic, "");
    let pid = svc.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let sampling = sampler(pid, stop.clone(), last.clone());
    // Started, subscribed and assigned, before any message.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = status_kib(pid, "VmRSS:");

    let (b, t) = (bootstrap.to_owned(), topic.clone());
    let (want, produced_in) = tokio::task::spawn_blocking(move || {
        let p = producer(&b);
        let mut rng = rand::rng();
        let mut want = Counts::new();
        let started = Instant::now();
        let total = rate * seconds;
        for i in 0..total {
            // Paced: message i goes out at i / rate seconds.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                p.poll(wait);
            }
            let ts = random_time(&mut rng);
            let part = rng.random_range(0..PARTITIONS);
            *want.entry((part, bucket(ts))).or_default() += 1;
            send(&p, &t, part, ts, b"{\"v\":\"abcdefghijklmnop\"}");
        }
        p.flush(Duration::from_secs(60)).expect("flush");
        (want, started.elapsed())
    })
    .await
    .expect("producer");
    let total: u64 = want.values().sum();
    let stored: i64 = end_offsets(bootstrap, &topic, PARTITIONS)
        .expect("ends")
        .iter()
        .sum();
    let (b, a, t) = (
        bootstrap.to_owned(),
        format!("{prefix}-audit"),
        topic.clone(),
    );
    let got = tokio::task::spawn_blocking(move || {
        read_counts(&b, &a, &t, total, Duration::from_secs(180))
    })
    .await
    .expect("read");
    let peak = status_kib(pid, "VmHWM:");
    let now = status_kib(pid, "VmRSS:");
    stop.store(true, Ordering::Relaxed);
    let sampled = sampling.join().unwrap_or(0);
    svc.stop();
    delete_topics(bootstrap, &[topic, format!("{prefix}-audit")]).await;
    println!(
        "hostile: {total} messages ({stored} stored) of random CreateTimes 2000..2200 at {rate} msg/s for {:.1} s, 12 partitions, default configuration",
        produced_in.as_secs_f64()
    );
    println!(
        "  RSS idle {:>6.1} MiB, peak {:>6.1} MiB (highest 100 ms sample {:.1} MiB), {:>6.1} MiB at the end; counts {}",
        mib(idle),
        mib(peak),
        mib(sampled),
        mib(now),
        compare(&want, &got)
    );
}

fn main() {
    let n = env_num("BENCH_CELLS", 100_000);
    if let Ok(kind) = std::env::var(CHILD) {
        child(&kind, n);
        return;
    }
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "cells,buckets,hostile".into());
    if parts.contains("cells") {
        cells(n);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bootstrap = regional_bootstrap();
        if parts.contains("buckets") {
            buckets(&bootstrap, n).await;
        }
        if parts.contains("hostile") {
            hostile(
                &bootstrap,
                env_num("BENCH_RATE", 20_000),
                env_num("BENCH_SECONDS", 60),
            )
            .await;
        }
    });
}
