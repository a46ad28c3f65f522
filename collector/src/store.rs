//! The store: the PostgreSQL tables of audit counts and progress (schema in `migrations/`),
//! one module per concern:
//!
//! * [`write`]: ingest's write path, exactly once ([`write_batch`]) and the offsets it keeps
//!   ([`load_offsets`]).
//! * [`sequence`]: the duplicate filter of numbered counts records, as applied ranges per
//!   stream.
//! * [`evidence`]: what the reconciler judges from: the buckets whose counts changed, counts
//!   summed per cell, progress marks with the staleness rule.
//! * [`read`]: what the API and the status page read: topics, count rows, bucket summaries
//!   with exact merged latency percentiles.
//! * [`parked`]: records the dead-letter topic would not take, parked instead of retried.
//! * [`retention`]: the one job that deletes what outlived its retention ([`run_retention`]),
//!   through the [`Prune`] statements each stage gives for its own tables.

pub mod evidence;
pub mod parked;
pub mod read;
pub mod retention;
pub mod sequence;
pub mod write;

pub use evidence::{CellCount, ProgressMark, Silence};
pub use parked::{PARKED_BYTES, ParkedRecord, ParkedRow, list_parked, park};
pub use read::{
    BucketSummary, CountsRow, LatencySummary, TierSummary, TopicRow, counts_rows, list_topics,
    summarize,
};
pub use retention::{
    Cutoff, Kept, PRUNE, Prune, RetentionOutcome, delete_expired, prune, run_retention,
};
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

/// What a failed store operation calls for: the crate's one reading of SQLSTATEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Likely to pass by itself (connection lost, server restarting, a timeout, lock
    /// conflicts, serialization failures): retry.
    Transient,
    /// Caused by the data written, with a short label (metric label and dead-letter
    /// reason): the same write fails however often it is retried, so the records at fault
    /// are isolated and dead-lettered. SQLSTATE classes 22 (data exception), 23 (integrity
    /// constraint, but for unique and exclusion violations, which concurrent writers cause)
    /// and 54 (program limit exceeded, such as an index row too large).
    Data(&'static str),
    /// Neither: a bug, a schema or permission problem, another collector's fence. Retried,
    /// and logged as an error while it lasts; never blamed on a record.
    Other,
}

impl StoreError {
    /// What this failure calls for.
    pub fn failure(&self) -> Failure {
        match self {
            StoreError::Database(e) => classify(e),
            StoreError::Fenced(_) => Failure::Other,
        }
    }

    /// The SQLSTATE PostgreSQL answered with, if it answered with one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Whether the failure is likely to pass by itself (connection lost, server restarting,
    /// lock conflicts), as opposed to a bug or bad data.
    pub fn is_transient(&self) -> bool {
        self.failure() == Failure::Transient
    }
}

/// Short, bounded label (metric label and dead-letter reason) when PostgreSQL refused a
/// write because of the data it was given ([`Failure::Data`]), `None` for any other failure.
pub fn data_error_label(e: &StoreError) -> Option<&'static str> {
    match e.failure() {
        Failure::Data(label) => Some(label),
        Failure::Transient | Failure::Other => None,
    }
}

fn classify(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Failure::Transient,
        sqlx::Error::Database(db) => db.code().map_or(Failure::Other, |c| classify_code(&c)),
        _ => Failure::Other,
    }
}

/// The label [`Failure::Data`] gives `code`, "" for a SQLSTATE that is not the data's fault.
#[cfg(test)]
pub(crate) fn classify_code_label(code: &str) -> &'static str {
    match classify_code(code) {
        Failure::Data(label) => label,
        Failure::Transient | Failure::Other => "",
    }
}

fn classify_code(code: &str) -> Failure {
    // connection exception, insufficient resources, operator intervention (including
    // `statement_timeout`), transaction rollback (serialization, deadlock), system error;
    // lock not available (`lock_timeout`), idle in transaction timeout, and the unique and
    // exclusion violations two writers racing on one key can cause.
    const TRANSIENT_CLASSES: [&str; 5] = ["08", "53", "57", "40", "58"];
    const TRANSIENT_CODES: [&str; 4] = ["55P03", "25P03", "23505", "23P01"];
    if TRANSIENT_CLASSES
        .iter()
        .any(|class| code.starts_with(class))
        || TRANSIENT_CODES.contains(&code)
    {
        return Failure::Transient;
    }
    match code {
        "22003" => Failure::Data("db_out_of_range"),
        "22021" => Failure::Data("db_invalid_text"),
        "22P05" => Failure::Data("db_untranslatable_character"),
        "54000" => Failure::Data("db_program_limit"),
        c if c.starts_with("22") => Failure::Data("db_data_exception"),
        c if c.starts_with("23") => Failure::Data("db_integrity"),
        c if c.starts_with("54") => Failure::Data("db_program_limit"),
        _ => Failure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_once() {
        for code in [
            "08006", "53200", "57014", "40001", "40P01", "58030", "55P03", "25P03",
        ] {
            assert_eq!(classify_code(code), Failure::Transient, "{code}");
        }
        assert_eq!(classify_code("23505"), Failure::Transient);
        assert_eq!(classify_code("22003"), Failure::Data("db_out_of_range"));
        assert_eq!(classify_code("22021"), Failure::Data("db_invalid_text"));
        assert_eq!(classify_code("22001"), Failure::Data("db_data_exception"));
        assert_eq!(classify_code("23514"), Failure::Data("db_integrity"));
        assert_eq!(classify_code("54000"), Failure::Data("db_program_limit"));
        assert_eq!(classify_code("54001"), Failure::Data("db_program_limit"));
        for code in ["42P01", "42501", "28P01", "XX000", "0A000"] {
            assert_eq!(classify_code(code), Failure::Other, "{code}");
        }
    }
}
