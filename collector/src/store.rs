//! The store: the PostgreSQL tables of audit counts and progress (schema in `migrations/`),
//! one module per concern:
//!
//! * [`write`]: ingest's write path, exactly once ([`write_batch`]) and the offsets it keeps
//!   ([`load_offsets`]).
//! * [`sequence`]: the duplicate filter of numbered counts records, as applied ranges per
//!   stream.
//! * [`read`]: what the API and the status page read: topics, count rows, bucket summaries
//!   with exact merged latency percentiles.
//! * [`retention`]: the one job that deletes what outlived its retention, from counts and
//!   progress to verdicts and incidents ([`run_retention`]).

pub mod read;
pub mod retention;
pub mod sequence;
pub mod write;

pub use read::{
    BucketSummary, CountsRow, LatencySummary, TierSummary, TopicRow, counts_rows, list_topics,
    summarize,
};
pub use retention::{RetentionOutcome, delete_expired, delete_expired_verdicts, run_retention};
pub use write::{
    BatchOutcome, ConsumedOffset, CountsKey, FencedPartition, load_offsets, record_key, write_batch,
};

/// Partition stored for records that do not name one.
pub const NO_PARTITION: i32 = -1;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// PostgreSQL refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Another collector has stored records of these audit partitions since this one last
    /// did (it reads them now); nothing was written.
    #[error("audit partitions taken over by another collector: {0:?}")]
    Fenced(Vec<FencedPartition>),
}

impl StoreError {
    /// Whether the failure is likely to pass by itself (connection lost, server restarting,
    /// lock conflicts), as opposed to a bug or bad data.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => is_transient(e),
            StoreError::Fenced(_) => false,
        }
    }
}

fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // connection exception, insufficient resources, operator intervention (also
            // statement_timeout and idle_session_timeout), transaction rollback (serialization,
            // deadlock), lock not available (lock_timeout), system error, and a session ended
            // by idle_in_transaction_session_timeout
            ["08", "53", "57", "40", "58"]
                .iter()
                .any(|class| c.starts_with(class))
                || c == "55P03"
                || c == "25P03"
        }),
        _ => false,
    }
}
