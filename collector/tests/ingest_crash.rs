//! Exactly-once ingest across `kill -9`: the real binary is killed with SIGKILL twice while it
//! is storing batches, restarted, and the stored totals must equal what was produced, with
//! every record applied exactly once.

mod ingest_support;

use std::time::{Duration, Instant};

use ingest_support::*;

const RECORDS: usize = 40_000;

/// Waits until the stored offsets have moved past `after` records in total, then returns the
/// total; fails if the collector exits or nothing moves in time.
async fn wait_progress(
    db: &TestDb,
    topics: &Topics,
    collector: &mut Binary,
    after: i64,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        collector.assert_running()?;
        let sum: i64 = stored_offsets(&db.pool, topics).await?.values().sum();
        if sum > after {
            return Ok(sum);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "stored offsets stuck at {sum} (waiting for more than {after})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_are_exact_after_kill_9_mid_batch_and_restart() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(4).await?;
    let records = mixed_records(&unique("crash"), RECORDS);
    produce(&topics, &encode_all(&records)).await?;
    let toml = config_toml(&db, &topics);

    // First run: killed as soon as the first batches are stored.
    let mut first = Binary::spawn(&toml)?;
    let at_first_kill = wait_progress(&db, &topics, &mut first, 0).await?;
    first.kill9()?;
    // Second run: starts from the stored offsets, killed after it made progress.
    let mut second = Binary::spawn(&toml)?;
    let at_second_kill = wait_progress(&db, &topics, &mut second, at_first_kill + 1_000).await?;
    second.kill9()?;
    let stored_at_kill: i64 = stored_offsets(&db.pool, &topics).await?.values().sum();
    assert!(
        stored_at_kill < RECORDS as i64,
        "the second kill came after everything was stored ({at_second_kill}); the test proves nothing"
    );

    // Third run catches up.
    let mut third = Binary::spawn(&toml)?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(120)).await?;
    third.assert_running()?;

    let stored = stored_totals(&db.pool).await?;
    let expected = expected_totals(&records);
    assert_eq!(stored.len(), expected.len());
    assert_eq!(
        stored, expected,
        "counts, bytes and applied records per row"
    );
    let ids = applied_records(&db.pool).await?;
    assert_eq!(ids, RECORDS as i64);
    // Every latency value is in the stored histograms exactly once.
    let (samples, expected_samples) = latency_samples(&db.pool, &records).await?;
    assert_eq!(samples, expected_samples);

    drop(third);
    db.drop_db().await
}
