//! Consuming audit topics into the store, exactly once, with any number of collectors.
//!
//! One consumer per configured cluster reads the cluster's audit topic as a member of a
//! consumer group (cooperative-sticky), so several collectors split its partitions between
//! them and take over those of one that stops or dies. Offsets live in PostgreSQL, not in
//! Kafka: when the group gives this collector a partition, it is assigned from the offset
//! stored with the records' effects. Each record is validated with the contract's strict
//! decoder. A single writer task batches what the consumers queue (size + linger) and makes
//! each batch durable: first the rejected records are acknowledged by the dead-letter
//! topic, then one SQL transaction applies the valid records and stores the next offsets
//! ([`crate::store::write_batch`]). A failed write keeps the batch and retries with capped
//! backoff; the bounded queue then fills and the consumers wait, so nothing is lost and
//! nothing is skipped. Offsets only move in PostgreSQL, together with their effects.
//!
//! A collector that lost a partition in a rebalance may still hold a batch of it. Each
//! write names the stored offset it continues from and is refused when another collector
//! has moved it since ([`crate::store::StoreError::Fenced`]): those records are dropped, the
//! partition is read again from the stored offset if it is still this collector's, and no
//! record is applied twice.
//!
//! A write PostgreSQL refuses because of the data itself (SQLSTATE class 22, such as a
//! count that no longer fits in `bigint` once added to the stored one) is not retried: the
//! batch is split in halves, in arrival order, until the records it refuses are alone. Each
//! of those goes to the dead-letter topic like a record the decoder rejects, every other
//! record is applied (each part in one transaction with the offsets that follow it), and
//! ingest goes on.
//!
//! One file per concern, each importing only those above it in this list:
//!
//! - `rate_limit`, `retry`: the rate-limited log line and the one retry loop of every write.
//! - `decode`: a message becomes a record or a rejection with a bounded reason.
//! - `reach`, `status`: which clusters answer, and the pipeline's health for `/readyz`.
//! - `consume`: a cluster's Kafka clients, the group's assignment from the stored offsets,
//!   the consume loop, and the probes of lag and reachability beside it.
//! - `dead_letter`: the dead-letter topic, and parking what it will not take.
//! - `write`: the writer: batches, the fenced write of records and offsets, splitting what
//!   PostgreSQL refuses for its data.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chaperone_daemon_support::Clock;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::IngestMetrics;
pub use config::{ClusterConfig, IngestConfig};

pub mod config;
mod consume;
mod dead_letter;
mod decode;
mod rate_limit;
mod reach;
mod retry;
mod status;
mod write;

use consume::{Event, Source, Stored};
use dead_letter::DeadLetters;
use rate_limit::RateLimit;
use retry::RetryPolicy;
use write::Writer;

pub use dead_letter::{DLQ_ERROR_HEADER, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER};
pub use decode::{REJECTION_REASONS, reason_label};
pub use reach::Reach;
pub use status::IngestStatus;

pub use crate::store::data_error_label;

/// Runs ingest until `shutdown` is cancelled and everything consumed has been stored (or
/// the writer gave up after `shutdown_grace`, leaving the rest to be read again).
///
/// Fails only when the Kafka clients cannot be created.
pub async fn run(
    clusters: &[ClusterConfig],
    config: &IngestConfig,
    pool: PgPool,
    metrics: IngestMetrics,
    status: Arc<IngestStatus>,
    clock: Clock,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sources: Vec<Arc<Source>> = clusters
        .iter()
        .enumerate()
        .map(|(i, c)| Source::new(i, c, config, &metrics).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    // Parked records are rare and alerted on by their increase: every series starts at 0, so
    // that the first one counts.
    for reason in REJECTION_REASONS {
        metrics.records_parked.with_label_values(&[reason]);
    }
    let (tx, rx) = mpsc::channel::<Event>(config.queue_capacity);
    let stored: Stored = Arc::default();
    let consumers = tokio_util::task::TaskTracker::new();
    for source in &sources {
        consumers.spawn(consume::probe(
            Arc::clone(source),
            status.reach.clone(),
            clock.clone(),
            shutdown.clone(),
        ));
        consumers.spawn(consume::refresh_loop(
            Arc::clone(source),
            Arc::clone(&stored),
            metrics.clone(),
            Arc::clone(&status),
            config.partition_refresh,
            shutdown.clone(),
        ));
        consumers.spawn(consume::consume(
            Arc::clone(source),
            pool.clone(),
            tx.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    consumers.close();
    let retry = RetryPolicy {
        min: config.retry_min,
        max: config.retry_max,
        grace: config.shutdown_grace,
        shutdown,
    };
    let letters = DeadLetters {
        sources: sources.clone(),
        pool: pool.clone(),
        metrics: metrics.clone(),
        retry: retry.clone(),
        park_after: config.dlq_park_after,
        missing_since: Mutex::default(),
    };
    let writer = Writer {
        sources,
        pool,
        metrics,
        status,
        stored,
        config: config.clone(),
        retry,
        letters,
        split_log: RateLimit::new(Duration::from_secs(10)),
    };
    writer.run(rx).await;
    consumers.wait().await;
    tracing::info!("ingest stopped");
    Ok(())
}
