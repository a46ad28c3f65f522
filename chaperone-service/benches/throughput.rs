//! Throughput and memory benchmark against the real regional broker (`dev/stack up`).
//!
//! `cargo bench -p chaperone-service --bench throughput` fills a fresh topic with 5M small
//! messages, then measures in one run, alternating for `BENCH_ROUNDS` rounds:
//! - a bare rdkafka `BaseConsumer` (read_committed and fetch tuning like the service)
//!   reading the topic,
//! - chaperone-service (in process, the real pipeline with transactions, 100 ms flushes)
//!   auditing it, its rate taken from committed counts,
//!
//! and prints the medians and the service/bare ratio, then Kafka's own `ConsumerPerformance`
//! for reference when the stack's jars are present. It then spawns the real binary over
//! 100 topics x 12 partitions and reports its resident memory. Topics are deleted at the end.
//! Not a pass/fail test. Environment: `BENCH_MESSAGES` (default 5000000; a 2M read takes
//! about a second here, too short next to the flush cadence), `BENCH_ROUNDS` (default 3),
//! `BENCH_FLUSH` (default `100ms`), `BENCH_RSS_TOPICS` (default 100),
//! `CHAPERONE_REGIONAL_BOOTSTRAP`.

use std::time::{Duration, Instant};

use chaperone_test_support::{create_topics as create_topics_on, regional_bootstrap, unique};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 6;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client")
}

async fn create_topics(bootstrap: &str, names: &[String], partitions: i32) {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", bootstrap);
    for chunk in names.chunks(50) {
        let topics: Vec<(&str, i32)> = chunk.iter().map(|n| (n.as_str(), partitions)).collect();
        create_topics_on(&client, &topics)
            .await
            .expect("create topics (is `dev/stack up` running?)");
    }
}

async fn delete_topics(bootstrap: &str, names: &[String]) {
    let admin = admin(bootstrap);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for chunk in refs.chunks(50) {
        let _ = admin.delete_topics(chunk, &opts).await;
    }
}

fn fill(bootstrap: &str, topic: &str, partitions: i32, per_partition: usize) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .expect("producer");
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..per_partition {
        for part in 0..partitions {
            let payload = format!("{{\"id\":{i},\"ts\":{now},\"v\":\"abcdefghijklmnop\"}}");
            let mut rec = BaseRecord::<(), String>::to(topic)
                .partition(part)
                .timestamp(now - (i as i64 % 600) * 1000)
                .payload(&payload);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        p.poll(Duration::from_millis(5));
                    }
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// Messages/s of a bare consumer between 10 % and 100 % of `total`.
fn bare(bootstrap: &str, topic: &str, total: u64) -> f64 {
    let (backoff_key, backoff) = chaperone_service::kafka::FETCH_QUEUE_BACKOFF;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("bench-bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // The same fetch tuning as the service, so the two read equally fast.
        .set(backoff_key, backoff)
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let mut n = 0u64;
    let mut bytes = 0usize;
    let mut t10 = None;
    let tenth = total / 10;
    let deadline = Instant::now() + Duration::from_secs(300);
    while n < total && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            bytes += m.payload().map_or(0, <[u8]>::len);
            n += 1;
            if n == tenth {
                t10 = Some(Instant::now());
            }
        }
    }
    std::hint::black_box(bytes);
    let t10 = t10.expect("reached 10 %");
    (total - tenth) as f64 / t10.elapsed().as_secs_f64()
}

fn metric(registry: &prometheus::Registry, name: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().get_value() as u64)
        })
        .sum()
}

/// Messages/s of the service between the commits that reach 10 % and 100 % of `total`.
async fn service(bootstrap: &str, topic: &str, total: u64) -> f64 {
    let registry = prometheus::Registry::new();
    let config = chaperone_service::Config::from_toml(&format!(
        r#"
cluster = "regional"
datacenter = "bench"
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
audit_topic = "{topic}-audit"
audit_topic_partitions = 3
flush_interval = "{flush}"
http_addr = "127.0.0.1:0"
[topics]
include = ['^{topic}$']
"#,
        group = unique("bench-svc"),
        flush = std::env::var("BENCH_FLUSH").unwrap_or_else(|_| "100ms".into()),
    ))
    .expect("config");
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let task = tokio::spawn(chaperone_service::run(
        config,
        chaperone_service::Deps {
            listener: Some(listener),
            registry: registry.clone(),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let tenth = total / 10;
    let mut t10 = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let rate = loop {
        let n = metric(&registry, "chaperone_service_messages_total");
        if t10.is_none() && n >= tenth {
            t10 = Some((Instant::now(), n));
        }
        if n >= total {
            let (t, n10) = t10.expect("10 % seen");
            break (n - n10) as f64 / t.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "service counted only {n}");
        // Gathering the registry costs CPU the service would use; commits are ~1 s apart.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (flushes, flush_secs) = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "chaperone_service_flush_duration_seconds")
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_histogram().clone()))
        .map(|h| (h.get_sample_count(), h.get_sample_sum()))
        .fold((0, 0.0), |(c, s), (c2, s2)| (c + c2, s + s2));
    println!(
        "service flushes: {flushes}, mean {:.1} ms",
        flush_secs * 1000.0 / flushes.max(1) as f64
    );
    shutdown.cancel();
    task.await.expect("task").expect("service");
    rate
}

/// Kafka's ConsumerPerformance, when the stack's jars are there.
fn kafka_perf(bootstrap: &str, topic: &str, total: u64) -> Option<f64> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let libs = root.join(".cache/kafka/libs");
    if !libs.is_dir() {
        return None;
    }
    let out = std::process::Command::new("java")
        .arg("-Xmx512m")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("org.apache.kafka.tools.ConsumerPerformance")
        .args(["--bootstrap-server", bootstrap, "--topic", topic])
        .args(["--messages", &total.to_string()])
        .args(["--group", &unique("bench-perf")])
        .arg("--hide-header")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, ...
    let line = text.lines().rev().find(|l| l.contains(','))?;
    line.split(',').nth(5)?.trim().parse().ok()
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Spawns the binary over `topics` x 12 partitions and returns (RSS, peak RSS) in MiB once
/// every message is committed.
async fn rss(bootstrap: &str, topics: usize) -> (f64, f64) {
    let prefix = unique("bench-rss");
    let names: Vec<String> = (0..topics).map(|i| format!("{prefix}-{i:03}")).collect();
    create_topics(bootstrap, &names, 12).await;
    for name in &names {
        fill(bootstrap, name, 12, 50);
    }
    let want = (topics * 12 * 50) as u64;
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("service.toml");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    std::fs::write(
        &cfg,
        format!(
            r#"
cluster = "regional"
datacenter = "bench"
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-g"
audit_topic = "{prefix}-audit"
http_addr = "127.0.0.1:{port}"
flush_interval = "1s"
[topics]
include = ['^{prefix}-\d+$']
"#
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone-service"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(body) = reqwest_free_get(port, "/metrics").await {
            seen = body
                .lines()
                .find(|l| l.starts_with("chaperone_service_messages_total{"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if seen >= want {
                break;
            }
        }
    }
    // Let a few more flushes with 1200 progress records each run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = rss_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let peak = rss_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    println!("rss run counted {seen} of {want} messages over {topics} topics x 12 partitions");
    let mut all = names.clone();
    all.push(format!("{prefix}-audit"));
    delete_topics(bootstrap, &all).await;
    let _ = std::fs::remove_dir_all(&dir);
    (now, peak)
}

async fn reqwest_free_get(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bootstrap = regional_bootstrap();
        let total = env_num("BENCH_MESSAGES", 5_000_000) as u64;
        let topic = unique("bench-throughput");
        create_topics(&bootstrap, std::slice::from_ref(&topic), PARTITIONS).await;
        let started = Instant::now();
        {
            let (b, t) = (bootstrap.clone(), topic.clone());
            let per = (total as usize).div_ceil(PARTITIONS as usize);
            tokio::task::spawn_blocking(move || fill(&b, &t, PARTITIONS, per))
                .await
                .expect("fill");
        }
        let total = total.div_ceil(PARTITIONS as u64) * PARTITIONS as u64;
        println!(
            "filled {topic} with {total} messages in {:.1}s",
            started.elapsed().as_secs_f64()
        );

        // Alternate the two readers so that load changes on the shared machine hit both;
        // compare the medians.
        let rounds = env_num("BENCH_ROUNDS", 3).max(1);
        let (mut bare_rates, mut service_rates) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let (b, t) = (bootstrap.clone(), topic.clone());
            let bare_rate = tokio::task::spawn_blocking(move || bare(&b, &t, total))
                .await
                .expect("bare");
            let service_rate = service(&bootstrap, &topic, total).await;
            println!(
                "round {round}: bare {bare_rate:>10.0} msg/s, service {service_rate:>10.0} msg/s ({:.2}x)",
                service_rate / bare_rate
            );
            bare_rates.push(bare_rate);
            service_rates.push(service_rate);
        }
        let (bare_rate, service_rate) = (median(&mut bare_rates), median(&mut service_rates));
        println!("bare rdkafka consumer: {bare_rate:>12.0} msg/s (median of {rounds})");
        println!("chaperone-service:     {service_rate:>12.0} msg/s (median of {rounds})");
        println!("ratio service/bare:    {:>12.2}x", service_rate / bare_rate);
        let (b, t) = (bootstrap.clone(), topic.clone());
        match tokio::task::spawn_blocking(move || kafka_perf(&b, &t, total))
            .await
            .expect("perf")
        {
            Some(r) => println!("kafka ConsumerPerformance (reference): {r:>12.0} msg/s"),
            None => println!("kafka ConsumerPerformance: not available"),
        }
        delete_topics(&bootstrap, &[topic.clone(), format!("{topic}-audit")]).await;

        let topics = env_num("BENCH_RSS_TOPICS", 100);
        if topics == 0 {
            return;
        }
        let (now, peak) = rss(&bootstrap, topics).await;
        println!("RSS at {topics} topics x 12 partitions: {now:.1} MiB (peak {peak:.1} MiB)");
    });
}
