//! `chaperone-audit`: the audit record contract of the Chaperone pipeline, and the library
//! producers link to count what Kafka acknowledged.
//!
//! The contract:
//! - [`record`] defines [`AuditRecord`], the versioned JSON record every component reads and
//!   writes: count deltas per topic, partition and event-time bucket, and progress
//!   heartbeats. Its decoder is strict and reports problems by field name.
//! - [`bucket`] holds the epoch-aligned bucket arithmetic every hop shares.
//! - [`histogram`] holds the mergeable latency histogram carried in each record.
//! - [`tally`] accumulates messages into (topic, partition, bucket) cells between flushes.
//!
//! In-producer counting, built on the contract:
//! - [`producer`]: [`AuditedProducer`], a `FutureProducer` look-alike that counts every
//!   message Kafka acknowledges into a [`Tracker`] and runs a [`Reporter`].
//! - [`tracker`]: [`Tracker`], the sharded concurrent counter (no global lock on the hot
//!   path, bounded number of open cells).
//! - [`watermark`]: the producer's event-time watermark, from its messages in flight and how
//!   far its event times trail its clock.
//! - [`reporter`]: [`Reporter`], which drains the tracker every flush interval into audit
//!   records, writes them ahead to the [`spool`], sends them with `acks=all` and
//!   idempotence, and re-sends what failed (also after a restart) with the original ids.
//! - [`sequence`]: counts record ids that number each process's records per topic, so the
//!   collector remembers applied records as ranges.
//! - [`spool`]: the crash-safe, bounded local file store of undelivered records.
//! - [`config`]: [`AuditConfig`], serde configuration with validation naming the bad key.
//! - [`mapping`]: physical topic -> logical topic and source datacenter across mirrors, for
//!   chaperone-service and consumers reading mirrors.
//! - [`duration`]: the workspace's one duration syntax (a unit is required), also used by
//!   chaperone-service and the collector.
//! - [`metrics`]: [`AuditMetrics`], registered in a registry the application hands in.
//!
//! In-consumer counting, the consumer tier:
//! - [`consumer`]: [`AuditedConsumer`] and [`AuditedStreamConsumer`], rdkafka's
//!   `BaseConsumer` and `StreamConsumer` counting what the application processed; their
//!   offsets move only after the counts below them are on the audit topic (at-least-once),
//!   or in the same Kafka transaction (transactional mode).

pub mod bucket;
pub mod config;
pub mod consumer;
pub mod duration;
pub mod histogram;
pub mod mapping;
pub mod metrics;
pub mod producer;
// `record` was written for Rust 1.85, before this crate needed 1.89 (see Cargo.toml); it
// keeps its nested `if`s rather than let chains.
#[allow(clippy::collapsible_if)]
pub mod record;
pub mod reporter;
pub mod sequence;
pub mod spool;
pub mod tally;
pub mod tracker;
pub mod watermark;

pub use bucket::BucketWidth;
pub use config::{AuditConfig, ConfigError};
pub use consumer::{
    AuditedConsumer, AuditedStreamConsumer, ConsumerOptions, ConsumerStats, CountOn,
};
pub use histogram::Latency;
pub use metrics::AuditMetrics;
pub use producer::{AuditedProducer, DeliveryFuture, DeliveryStats};
pub use record::{AuditRecord, Counts, DecodeError, Observer, Progress, Tier};
pub use reporter::{AuditError, Clock, Reporter, SystemClock, Watermarks};
pub use sequence::{SequenceIds, SequencedId};
pub use spool::Spool;
pub use tally::{Cell, Entry, Tally};
pub use tracker::{Drained, Tracker};
