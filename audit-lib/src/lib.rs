//! `chaperone-audit`: the audit record contract of the Chaperone pipeline, and the library
//! producers link to count what Kafka acknowledged.
//!
//! - [`record`] defines [`AuditRecord`], the versioned JSON record every component reads and
//!   writes: count deltas per topic, partition and event-time bucket, and progress
//!   heartbeats. Its decoder is strict and reports problems by field name.
//! - [`bucket`] holds the epoch-aligned bucket arithmetic every hop shares.
//! - [`histogram`] holds the mergeable latency histogram carried in each record.
//! - [`tally`] accumulates messages into (topic, partition, bucket) cells between flushes.

pub mod bucket;
pub mod histogram;
pub mod record;
pub mod tally;

pub use bucket::BucketWidth;
pub use histogram::Latency;
pub use record::{AuditRecord, Counts, DecodeError, Observer, Progress, Tier};
pub use tally::{Cell, Entry, Tally};
