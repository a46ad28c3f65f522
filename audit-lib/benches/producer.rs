//! Messages per second through `AuditedProducer` vs a bare rdkafka `FutureProducer`, against
//! the real regional broker, on the same topic in the same run. Target: at least 0.95x.
//!
//! `cargo bench -p chaperone-audit --bench producer` (needs `dev/stack up`). Rounds alternate
//! which producer goes first; the table shows the median of each and the ratio. Timings
//! are never asserted.

use std::time::{Duration, Instant};

use chaperone_audit::{AuditConfig, AuditedProducer};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

const MESSAGES: usize = 100_000;
const ROUNDS: usize = 15;
const PAYLOAD: usize = 100;

fn kafka() -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set(
        "bootstrap.servers",
        chaperone_test_support::regional_bootstrap(),
    )
    .set("linger.ms", "5")
    .set("enable.idempotence", "true");
    cc
}

fn is_queue_full(e: &KafkaError) -> bool {
    *e == KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
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
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Sends `MESSAGES` messages, waiting for every delivery; returns (msgs/s, CPU µs/msg).
macro_rules! run {
    ($producer:expr, $topic:expr, $payload:expr) => {{
        let cpu = cpu_ticks();
        let start = Instant::now();
        let mut futures = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let key = (i % 1_024).to_string();
            let mut record = FutureRecord::to($topic).key(&key).payload($payload);
            loop {
                match $producer.send_result(record) {
                    Ok(f) => {
                        futures.push(f);
                        break;
                    }
                    Err((e, r)) if is_queue_full(&e) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => panic!("send failed: {e}"),
                }
            }
        }
        let mut ok = 0usize;
        for f in futures {
            if matches!(f.await, Ok(Ok(_))) {
                ok += 1;
            }
        }
        assert_eq!(ok, MESSAGES, "every message is delivered");
        let rate = MESSAGES as f64 / start.elapsed().as_secs_f64();
        let cpu_us = (cpu_ticks() - cpu) as f64 * 10_000.0 / MESSAGES as f64;
        (rate, cpu_us)
    }};
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench() -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("bench-producer-{id}");
    let audit_topic = format!("bench-audit-{id}");
    let admin: AdminClient<DefaultClientContext> = kafka().create()?;
    for r in admin
        .create_topics(
            &[
                NewTopic::new(&topic, 3, TopicReplication::Fixed(1)),
                NewTopic::new(&audit_topic, 1, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e} (is dev/stack up?)"))?;
    }
    let bare: FutureProducer = kafka().create()?;
    let audit = AuditConfig {
        topic: audit_topic.clone(),
        spool_dir: std::env::temp_dir().join(format!("bench-spool-{id}")),
        ..AuditConfig::default()
    };
    let audited = AuditedProducer::new(&kafka(), audit, &prometheus::Registry::new())?;
    let payload = vec![b'b'; PAYLOAD];
    // Warm up both (connections, metadata).
    for _ in 0..2 {
        let _ = bare
            .send(
                FutureRecord::<(), _>::to(&topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await;
        let _ = audited
            .send(
                FutureRecord::<(), _>::to(&topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await;
    }
    let (mut b, mut a) = (Vec::new(), Vec::new());
    let (mut bc, mut ac) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (rb, ra) = if round % 2 == 0 {
            let rb = run!(bare, &topic, &payload);
            (rb, run!(audited, &topic, &payload))
        } else {
            let ra = run!(audited, &topic, &payload);
            (run!(bare, &topic, &payload), ra)
        };
        println!(
            "round {round:>2}: bare {:>8.0} msg/s {:>5.2} cpu-us/msg, audited {:>8.0} msg/s {:>5.2} cpu-us/msg",
            rb.0, rb.1, ra.0, ra.1
        );
        b.push(rb.0);
        bc.push(rb.1);
        a.push(ra.0);
        ac.push(ra.1);
    }
    let stats = audited.shutdown().await;
    let pairwise = median(a.iter().zip(&b).map(|(a, b)| a / b).collect());
    let (mb, ma) = (median(b), median(a));
    let (cb, ca) = (bc.iter().sum::<f64>(), ac.iter().sum::<f64>());
    println!();
    println!(
        "producer throughput, {MESSAGES} x {PAYLOAD} B messages per round, {ROUNDS} rounds, median"
    );
    println!(
        "  bare FutureProducer:  {mb:>9.0} msg/s  {:.2} cpu-us/msg (mean)",
        cb / ROUNDS as f64
    );
    println!(
        "  AuditedProducer:      {ma:>9.0} msg/s  {:.2} cpu-us/msg (mean)",
        ca / ROUNDS as f64
    );
    println!("  ratio of medians:     {:.3}x (target >= 0.95x)", ma / mb);
    println!("  median round ratio:   {pairwise:.3}x (each round runs both back to back)");
    println!(
        "  cpu per message:      {:.3}x of bare (less sensitive to other load on the host)",
        ca / cb
    );
    println!(
        "  audited acked {} messages, {} failed",
        stats.acked, stats.failed
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo test --benches` runs bench binaries with `--bench` absent; only measure when
    // asked to.
    if !std::env::args().any(|a| a == "--bench") {
        println!("producer bench: run with `cargo bench -p chaperone-audit --bench producer`");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}
