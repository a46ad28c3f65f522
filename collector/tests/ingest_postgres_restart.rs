//! PostgreSQL restarted while records arrive: ingestion pauses, retries, catches up and
//! loses nothing. This stops the stack's PostgreSQL for a few seconds (and always starts it
//! again), so it is the only test that does.

mod ingest_support;

use std::time::Duration;

use chaperone_test_support::dev_stack;
use ingest_support::*;

/// Starts PostgreSQL again when dropped, whatever happened in between.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = dev_stack(&["start-postgres"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_ingest_loses_nothing() -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:.1}s] {what}", t0.elapsed().as_secs_f64());
    let db = ingest_db().await?;
    let topics = Topics::create(3).await?;
    let records = mixed_records(&unique("pg"), 9_000);
    let (before, rest) = records.split_at(3_000);
    let (during, after) = rest.split_at(3_000);
    let producer = producer()?;
    produce_with(&producer, &topics, &encode_all(before), 0).await?;

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;

    phase("first third stored");
    let guard = Restart;
    dev_stack(&["stop-postgres"])?;
    phase("postgres stopped");
    produce_with(&producer, &topics, &encode_all(during), 3_000).await?;
    // The writer must hit the outage (and keep the batch) before PostgreSQL comes back.
    eventually(
        "a failed write while PostgreSQL is down",
        Duration::from_secs(30),
        || async {
            Ok((metric(
                &collector.registry,
                "chaperone_collector_write_failures_total",
                Some(("target", "postgres")),
            ) >= 2.0)
                .then_some(()))
        },
    )
    .await?;
    let ready = reqwest::get(collector.url("/readyz")).await?;
    assert_eq!(ready.status(), 503, "not ready while PostgreSQL is down");
    phase("writes failing");
    dev_stack(&["start-postgres"])?;
    drop(guard);
    phase("postgres started");
    produce_with(&producer, &topics, &encode_all(after), 6_000).await?;

    wait_caught_up(&db.pool, &topics, Duration::from_secs(120)).await?;
    phase("caught up");
    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&records));
    let ids = applied_records(&db.pool).await?;
    assert_eq!(ids, 9_000);
    eventually(
        "readiness after the restart",
        Duration::from_secs(30),
        || async {
            let r = reqwest::get(collector.url("/readyz")).await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await?;

    collector.stop().await?;
    db.drop_db().await
}
