//! A sink at the end of the path: an audited consumer group that reads a topic and writes its
//! records into a PostgreSQL table, as a warehouse loader would. A record counts as processed
//! once its row is written (`count_on = "processed"`), so what the sink fails to write is what
//! the collector finds missing on the group's edge.
//!
//! ```text
//! cargo run -p chaperone-audit --example sink -- \
//!     --bootstrap 127.0.0.1:29092 --topic regional.orders --mirror --group warehouse \
//!     --database-url postgres://chaperone:chaperone@127.0.0.1:55432/chaperone
//! ```
//!
//! - `--mirror`: the topic is MirrorMaker 2's copy on the aggregate cluster; its counts are
//!   reported under the logical topic and source datacenter (`orders` from `regional`).
//! - `--drop-fraction F`: a faulty sink that drops about that fraction of its writes (every
//!   `1/F`-th offset of each partition): they are never written nor said to be processed.
//!
//! Rows go to the table `sink_rows` (group, topic, partition, offset, value), created when
//! missing; a record written again after a restart replaces nothing. The sink stops after
//! `--idle-exit` without a record (once it read one) or after `--duration`, closing its
//! consumer cleanly, and prints one JSON line: records read, written and dropped (and dropped
//! in a bucket that starts at or after `--since-ms`).

use std::time::{Duration, Instant};

use chaperone_audit::duration::parse as parse_duration;
use chaperone_audit::mapping::{MappingConfig, MappingKind};
use chaperone_audit::{AuditConfig, AuditedConsumer, ConsumerOptions, CountOn};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};

#[derive(Debug, Parser)]
#[command(about = "Audited consumer group writing a topic into PostgreSQL")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:29092")]
    bootstrap: String,
    /// Topic to read.
    #[arg(long)]
    topic: String,
    /// The topic is a MirrorMaker 2 copy: report it under its logical topic and source
    /// datacenter.
    #[arg(long)]
    mirror: bool,
    /// Consumer group (the audit tier is `consumer:<group>`).
    #[arg(long)]
    group: String,
    /// PostgreSQL to write into.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Fraction of records dropped instead of written.
    #[arg(long, default_value_t = 0.0)]
    drop_fraction: f64,
    /// Audit topic (on the cluster read).
    #[arg(long, default_value = chaperone_audit::config::DEFAULT_TOPIC)]
    audit_topic: String,
    /// Audit flush interval.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    flush_interval: Duration,
    /// Audit bucket width.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    bucket_width: Duration,
    /// Stop after this long without a record, once one was read.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    idle_exit: Duration,
    /// Stop after this long in any case.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    duration: Duration,
    /// Also report the records dropped whose bucket starts at or after this (epoch ms), as
    /// `dropped_since`: what a run can compare with the verdicts of its own buckets.
    #[arg(long, default_value_t = 0)]
    since_ms: i64,
}

/// Records written per statement.
const BATCH: usize = 500;

async fn write(
    pool: &sqlx::PgPool,
    group: &str,
    rows: &[BorrowedMessage<'_>],
) -> Result<(), sqlx::Error> {
    let topics: Vec<&str> = rows.iter().map(|m| m.topic()).collect();
    let partitions: Vec<i32> = rows.iter().map(|m| m.partition()).collect();
    let offsets: Vec<i64> = rows.iter().map(|m| m.offset()).collect();
    let values: Vec<String> = rows
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
        .collect();
    sqlx::query(
        "INSERT INTO sink_rows (grp, topic, partition, \"offset\", value)
         SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&values)
    .execute(pool)
    .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        (0.0..1.0).contains(&args.drop_fraction),
        "--drop-fraction must be in [0, 1)"
    );
    let drop_every = (args.drop_fraction > 0.0).then(|| (1.0 / args.drop_fraction).round() as i64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pool = rt.block_on(sqlx::PgPool::connect(&args.database_url))?;
    // Two sinks starting together would both try to create the table: one at a time.
    rt.block_on(async {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sink_rows'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS sink_rows (
                 grp text, topic text, partition integer, \"offset\" bigint, value text,
                 PRIMARY KEY (grp, topic, partition, \"offset\"))",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })?;

    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // A batch is written after several polls: with librdkafka's automatic offset store,
        // each poll would pass over the records of the batch not yet marked processed.
        .set("enable.auto.offset.store", "false")
        .set("fetch.queue.backoff.ms", "1");
    let audit = AuditConfig {
        topic: args.audit_topic.clone(),
        flush_interval: args.flush_interval,
        bucket_width: args.bucket_width,
        ..AuditConfig::default()
    };
    let options = ConsumerOptions {
        count_on: CountOn::Processed,
        mapping: MappingConfig {
            kind: args.mirror.then_some(MappingKind::Mirror),
            ..MappingConfig::default()
        },
        ..ConsumerOptions::default()
    };
    let consumer =
        AuditedConsumer::with_options(&kafka, audit, options, &prometheus::Registry::new())?;
    // A mirror's copy appears on MirrorMaker's refresh interval: wait for the topic.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !consumer
        .fetch_metadata(Some(&args.topic), Duration::from_secs(5))
        .is_ok_and(|md| {
            md.topics()
                .iter()
                .any(|t| t.error().is_none() && !t.partitions().is_empty())
        })
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "topic {} does not exist",
            args.topic
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    consumer.subscribe(&[&args.topic])?;

    let width_ms = i64::try_from(args.bucket_width.as_millis())?.max(1);
    let (mut read, mut written, mut dropped, mut dropped_since) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut last = None::<Instant>;
    while started.elapsed() < args.duration && last.is_none_or(|l| l.elapsed() < args.idle_exit) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut seen = Vec::with_capacity(BATCH);
        let before = read;
        let mut wait = Duration::from_millis(200);
        while batch.len() < BATCH {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    read += 1;
                    seen.push((m.topic().to_owned(), m.partition(), m.offset()));
                    if drop_every.is_some_and(|n| m.offset() % n == 0) {
                        dropped += 1;
                        if m.timestamp()
                            .to_millis()
                            .is_some_and(|t| t - t.rem_euclid(width_ms) >= args.since_ms)
                        {
                            dropped_since += 1;
                        }
                    } else {
                        batch.push(m);
                    }
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        if read > before {
            last = Some(Instant::now());
        }
        if seen.is_empty() {
            continue;
        }
        // Processed once written: a write that fails leaves the records unprocessed, and
        // the group reads them again after a restart.
        if !batch.is_empty() {
            rt.block_on(write(&pool, &args.group, &batch))?;
        }
        for m in &batch {
            consumer.processed(m);
        }
        written += batch.len() as u64;
        // Then the group moves past everything read, the dropped records included: those
        // were never marked processed, so they are passed over uncounted.
        for (topic, partition, offset) in &seen {
            consumer.store_offset(topic, *partition, *offset)?;
        }
        consumer.commit_consumer_state(CommitMode::Async)?;
    }
    let stats = consumer.close();
    tracing::info!(?stats, "sink stopped");
    println!(
        r#"{{"read":{read},"written":{written},"dropped":{dropped},"dropped_since":{dropped_since}}}"#
    );
    Ok(())
}
