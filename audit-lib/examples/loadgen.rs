//! Chaperone's load generator: audited traffic at a chosen rate to chosen topics, with faults
//! injected on purpose.
//!
//! ```text
//! cargo run -p chaperone-audit --example loadgen -- \
//!     --topics orders,payments --rate 5000 --duration 30s \
//!     --skip-fraction 0.01 --duplicate-fraction 0.005
//! ```
//!
//! Every message goes through an `AuditedProducer`, so the producer tier reports what Kafka
//! acknowledged. Faults:
//! - `--skip-fraction F`: that fraction of messages is counted (as if acknowledged, on a
//!   partition picked by key hash) but never sent: downstream tiers see fewer messages than
//!   the producer tier reports.
//! - `--duplicate-fraction F`: that fraction of messages is sent a second time by a plain,
//!   unaudited producer: downstream tiers see more than the producer tier reports.
//!
//! At the end one JSON line is printed on stdout with what was acknowledged, failed, skipped
//! and duplicated per topic (logs go to stderr).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chaperone_audit::duration::parse as parse_duration;
use chaperone_audit::{AuditConfig, AuditedProducer, DeliveryFuture};
use clap::Parser;
use rand::Rng as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

#[derive(Debug, Parser)]
#[command(about = "Audited load generator with fault injection")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "CHAPERONE_REGIONAL_BOOTSTRAP",
        default_value = "127.0.0.1:19092"
    )]
    bootstrap: String,
    /// Comma-separated topics; messages are spread round-robin over them.
    #[arg(long, value_delimiter = ',', default_value = "loadgen")]
    topics: Vec<String>,
    /// Messages per second over all topics (0: as fast as possible).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Stop after this many messages (counted and skipped ones included).
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (such as 30s, 5m); default 10s when --count is not given.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Use only this many distinct keys, so that messages reach only the partitions those keys
    /// hash to (0: every message has a key of its own).
    #[arg(long, default_value_t = 0)]
    keys: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Event time = now minus this many milliseconds (0: the producer stamps now).
    #[arg(long, default_value_t = 0)]
    event_lag_ms: i64,
    /// Create missing topics with this many partitions.
    #[arg(long)]
    create_topics: Option<i32>,
    /// Fraction of messages counted but not sent.
    #[arg(long, default_value_t = 0.0)]
    skip_fraction: f64,
    /// Fraction of messages sent a second time, uncounted.
    #[arg(long, default_value_t = 0.0)]
    duplicate_fraction: f64,
    /// Audit topic.
    #[arg(long, default_value = chaperone_audit::config::DEFAULT_TOPIC)]
    audit_topic: String,
    /// Audit flush interval (such as 10s, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    flush_interval: Duration,
    /// Event-time bucket width of the audit counts (must match the other tiers').
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    bucket_width: Duration,
    /// Audit spool directory (default: `chaperone-loadgen-spool-<audit topic>` under the
    /// system temp dir).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Datacenter reported in audit records.
    #[arg(long, default_value = "regional")]
    datacenter: String,
    /// Cluster alias reported in audit records.
    #[arg(long, default_value = "regional")]
    cluster: String,
    /// Extra librdkafka property for the producer, `key=value`; repeatable.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct TopicTotals {
    acked: u64,
    failed: u64,
    skipped: u64,
    duplicates: u64,
}

async fn create_topics(bootstrap: &str, topics: &[String], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Partition counts per topic, waiting (with a deadline) for metadata. A broker that does not
/// answer in time (a busy or just-started one) is asked again until the deadline.
fn partition_counts(producer: &FutureProducer, topics: &[String]) -> anyhow::Result<Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    topics
        .iter()
        .map(|t| {
            loop {
                match producer
                    .client()
                    .fetch_metadata(Some(t), Duration::from_secs(5))
                {
                    Ok(md) => {
                        let n = md
                            .topics()
                            .iter()
                            .find(|m| m.name() == t)
                            .map_or(0, |m| m.partitions().len());
                        if n > 0 {
                            return Ok(n as i32);
                        }
                        anyhow::ensure!(Instant::now() < deadline, "topic {t} has no partitions");
                    }
                    Err(e) => {
                        if Instant::now() >= deadline {
                            anyhow::bail!("no metadata for topic {t}: {e}");
                        }
                        tracing::warn!(topic = %t, error = %e, "no metadata yet; asking again");
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(!args.topics.is_empty(), "--topics is empty");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.skip_fraction),
        "--skip-fraction must be in 0..=1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.duplicate_fraction),
        "--duplicate-fraction must be in 0..=1"
    );
    if let Some(p) = args.create_topics {
        create_topics(&args.bootstrap, &args.topics, p).await?;
    }
    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", &args.bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    for (k, v) in &args.properties {
        kafka.set(k, v);
    }
    let audit = AuditConfig {
        topic: args.audit_topic.clone(),
        flush_interval: args.flush_interval,
        bucket_width: args.bucket_width,
        datacenter: args.datacenter.clone(),
        cluster: args.cluster.clone(),
        // Stable per audit topic, so a restarted run re-sends what a killed one spooled.
        spool_dir: args.spool_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("chaperone-loadgen-spool-{}", args.audit_topic))
        }),
        ..AuditConfig::default()
    };
    let registry = prometheus::Registry::new();
    let producer = AuditedProducer::new(&kafka, audit, &registry).context("audited producer")?;
    // Duplicates go through a plain producer, so they are not counted.
    let plain: FutureProducer = kafka.create().context("plain producer")?;
    let partitions = partition_counts(&plain, &args.topics)?;

    let limit = args.count;
    let duration = match (args.count, args.duration) {
        (_, Some(d)) => Some(d),
        (None, None) => Some(Duration::from_secs(10)),
        (Some(_), None) => None,
    };
    let payload = vec![b'x'; args.payload_bytes];
    let mut totals: BTreeMap<String, TopicTotals> = BTreeMap::new();
    let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
    let mut duplicates: VecDeque<rdkafka::producer::DeliveryFuture> = VecDeque::new();
    let mut rng = rand::rng();
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        if limit.is_some_and(|l| n >= l) || duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if args.rate > 0 {
            let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
            if n >= due {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        let ti = (n % args.topics.len() as u64) as usize;
        let topic = &args.topics[ti];
        let key = if args.keys > 0 {
            format!("{}", n % args.keys)
        } else {
            format!("{n}")
        };
        let now = chrono::Utc::now().timestamp_millis();
        let event = now - args.event_lag_ms;
        n += 1;
        if rng.random_bool(args.skip_fraction) {
            // Counted as if Kafka had acknowledged it, but never sent.
            let partition = (fnv(key.as_bytes()) % partitions[ti] as u64) as i32;
            producer
                .tracker()
                .record(topic, Some(partition), event, payload.len() as u64, now);
            totals.entry(topic.clone()).or_default().skipped += 1;
            continue;
        }
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if args.event_lag_ms != 0 {
            record = record.timestamp(event);
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back((ti, f));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    settle(&mut pending, &args.topics, &mut totals, 1_000).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, "send failed");
                    totals.entry(topic.clone()).or_default().failed += 1;
                    break;
                }
            }
        }
        if rng.random_bool(args.duplicate_fraction) {
            let dup = FutureRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .timestamp(event);
            if let Ok(f) = plain.send_result(dup) {
                duplicates.push_back(f);
                totals.entry(topic.clone()).or_default().duplicates += 1;
            }
        }
        if pending.len() > 50_000 {
            settle(&mut pending, &args.topics, &mut totals, 10_000).await;
        }
        while duplicates.len() > 10_000 {
            if let Some(f) = duplicates.pop_front() {
                let _ = f.await;
            }
        }
    }
    let len = pending.len();
    settle(&mut pending, &args.topics, &mut totals, len).await;
    for f in duplicates {
        let _ = f.await;
    }
    let _ = plain.flush(Duration::from_secs(30));
    let stats = producer.shutdown().await;
    let elapsed = start.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "messages": n,
        "acked": stats.acked,
        "failed": stats.failed,
        "skipped": totals.values().map(|t| t.skipped).sum::<u64>(),
        "duplicates": totals.values().map(|t| t.duplicates).sum::<u64>(),
        "elapsed_s": elapsed,
        "rate": n as f64 / elapsed,
        "topics": totals,
    });
    println!("{summary}");
    Ok(())
}

/// Awaits the `n` oldest deliveries and adds them to the totals.
async fn settle(
    pending: &mut VecDeque<(usize, DeliveryFuture)>,
    topics: &[String],
    totals: &mut BTreeMap<String, TopicTotals>,
    n: usize,
) {
    for _ in 0..n {
        let Some((ti, f)) = pending.pop_front() else {
            return;
        };
        let t = totals.entry(topics[ti].clone()).or_default();
        match f.await {
            Ok(Ok(_)) => t.acked += 1,
            _ => t.failed += 1,
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
