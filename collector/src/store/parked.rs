//! Records the dead-letter topic would not take, parked in PostgreSQL (`ingest_parked`,
//! migration 0018): what ingest does instead of retrying a dead letter forever, and what the
//! status page and `/api/v1/parked` show.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Most bytes of a parked record's key, and of its payload, that are kept.
pub const PARKED_BYTES: usize = 64 * 1024;

/// A record to park: where it was read, why it was rejected, why the dead-letter topic did not
/// take it, and its bytes as read.
#[derive(Debug, Clone)]
pub struct ParkedRecord<'a> {
    /// Alias of the cluster it was read from.
    pub cluster: &'a str,
    /// Audit topic it was read from.
    pub topic: &'a str,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Short reason it was rejected (the dead-letter reason label).
    pub reason: &'a str,
    /// The full rejection message.
    pub error: &'a str,
    /// Why the dead-letter topic did not take it.
    pub dlq_error: &'a str,
    /// Its key as read.
    pub key: Option<&'a [u8]>,
    /// Its payload as read.
    pub payload: Option<&'a [u8]>,
}

/// Parks `record`; a record already parked (read again after a restart) is left as it is.
pub async fn park(pool: &PgPool, record: &ParkedRecord<'_>) -> Result<(), StoreError> {
    fn cut(b: Option<&[u8]>) -> Option<&[u8]> {
        b.map(|b| &b[..b.len().min(PARKED_BYTES)])
    }
    fn len(b: Option<&[u8]>) -> Option<i32> {
        b.map(|b| i32::try_from(b.len()).unwrap_or(i32::MAX))
    }
    sqlx::query(
        "INSERT INTO ingest_parked \
             (cluster, topic, partition, \"offset\", reason, error, dlq_error, \
              key, key_len, payload, payload_len) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (cluster, topic, partition, \"offset\") DO NOTHING",
    )
    .bind(record.cluster)
    .bind(record.topic)
    .bind(record.partition)
    .bind(record.offset)
    .bind(record.reason)
    .bind(record.error)
    .bind(record.dlq_error)
    .bind(cut(record.key))
    .bind(len(record.key))
    .bind(cut(record.payload))
    .bind(len(record.payload))
    .execute(pool)
    .await?;
    Ok(())
}

/// A parked record as the API and the status page show it (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct ParkedRow {
    /// Alias of the cluster it was read from.
    pub cluster: String,
    /// Audit topic it was read from.
    pub topic: String,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Short reason it was rejected.
    pub reason: String,
    /// The full rejection message.
    pub error: String,
    /// Why the dead-letter topic did not take it.
    pub dlq_error: String,
    /// Its payload's whole length in bytes (the stored bytes stop at [`PARKED_BYTES`]).
    pub payload_len: Option<i32>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// How many records are parked, and the latest `limit` of them, newest first.
pub async fn list_parked(pool: &PgPool, limit: i64) -> Result<(i64, Vec<ParkedRow>), StoreError> {
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest_parked")
        .fetch_one(pool)
        .await?;
    let rows = sqlx::query_as::<_, ParkedRow>(
        "SELECT cluster, topic, partition, \"offset\", reason, error, dlq_error, payload_len, \
                parked_at \
         FROM ingest_parked ORDER BY parked_at DESC, cluster, topic, partition, \"offset\" \
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((total, rows))
}
