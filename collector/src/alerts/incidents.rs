//! Incidents and the outbox, as the reconciler records them: for every changed topic-level
//! verdict of an alerting edge, inside the reconciler's transaction, the incident it opens,
//! joins or resolves and the event the sender will fan out to webhooks. [`Incidents`] is the
//! reconciler's [`IncidentRecorder`]; the sender reads what it wrote.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::payload::EventData;
use crate::reconcile::config::millis;
use crate::reconcile::{ChangedVerdict, IncidentRecorder, ReconcileConfig, Recording};
use crate::store::Prune;

/// Why an incident could not be recorded; the reconciler's transaction rolls back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IncidentError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox payload could not be encoded.
    #[error("encoding an alert event: {0}")]
    Payload(#[from] serde_json::Error),
}

/// The reconciler's [`IncidentRecorder`]: incidents and outbox events in `alert_*`.
#[derive(Debug, Clone, Copy)]
pub struct Incidents {
    policy: Policy,
}

impl Incidents {
    /// Incidents superseded as `config` says (`incident_gap`, `escalate_factor`,
    /// `escalate_min`).
    pub fn new(config: &ReconcileConfig) -> Self {
        Self {
            policy: Policy {
                incident_gap_ms: millis(config.incident_gap),
                escalate_factor: config.escalate_factor,
                escalate_min: i64::try_from(config.escalate_min).unwrap_or(i64::MAX),
            },
        }
    }
}

impl IncidentRecorder for Incidents {
    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        change: &'a ChangedVerdict<'a>,
        now: DateTime<Utc>,
    ) -> Recording<'a> {
        Box::pin(async move { Ok(record(conn, change, &self.policy, now).await?) })
    }

    fn prune(&self) -> &'static [Prune] {
        super::PRUNE
    }
}

/// When an open incident is superseded by a new one (which notifies), so that it never mutes
/// a topic for good.
#[derive(Debug, Clone, Copy)]
struct Policy {
    /// A loss whose bucket starts this long after the incident's last bad bucket, ms.
    incident_gap_ms: i64,
    /// A loss at least this many times the incident's largest.
    escalate_factor: u32,
    /// ... and at least this many messages.
    escalate_min: i64,
}

/// An incident row as the outbox payload needs it.
#[derive(sqlx::FromRow)]
struct IncidentRow {
    id: i64,
    first_bucket_start_ms: i64,
    last_bucket_start_ms: i64,
    bad_buckets: i32,
    opened_at: DateTime<Utc>,
}

const INCIDENT_COLUMNS: &str =
    "id, first_bucket_start_ms, last_bucket_start_ms, bad_buckets, opened_at";

/// Opens, joins or resolves the incident of a changed topic-level verdict and writes the
/// outbox event, in the caller's transaction. Returns the verdict's incident id (the one it
/// had when it does not belong to one now).
async fn record(
    conn: &mut PgConnection,
    c: &ChangedVerdict<'_>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<Option<i64>, IncidentError> {
    let (was_bad, old_incident) = (c.was_bad, c.incident_id);
    let missing = (c.expected - c.actual).max(0);
    if c.status.is_bad() {
        let row = match old_incident.filter(|_| was_bad) {
            // Still bad with other numbers: same incident.
            Some(id) => {
                sqlx::query_as(&format!(
                    "UPDATE alert_incidents SET max_missing = greatest(max_missing, $2)
                  WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
                ))
                .bind(id)
                .bind(missing)
                .fetch_one(&mut *conn)
                .await?
            }
            None => join_or_open(conn, c, missing, policy, now).await?,
        };
        insert_event(conn, "bad_bucket", c, &row, None, now).await?;
        return Ok(Some(row.id));
    }
    let Some(id) = old_incident.filter(|_| was_bad) else {
        return Ok(old_incident);
    };
    let row: IncidentRow = sqlx::query_as(&format!(
        "UPDATE alert_incidents SET bad_buckets = bad_buckets - 1
          WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if row.bad_buckets <= 0 {
        sqlx::query(
            "UPDATE alert_incidents SET status = 'resolved', resolved_at = $2
              WHERE id = $1 AND status = 'open'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        tracing::info!(
            incident_id = id, topic = %c.topic, edge = %c.edge,
            "incident resolved"
        );
        insert_event(conn, "resolved", c, &row, Some(now), now).await?;
    }
    Ok(Some(id))
}

/// Joins the open incident of the verdict's topic, edge and datacenter, or opens one. An open
/// incident is superseded by a new one (which notifies) when this loss is much worse than any
/// of its buckets (`escalate_factor`, and at least `escalate_min`) or comes `incident_gap` after its last bad bucket: an
/// open incident never mutes a topic for good.
async fn join_or_open(
    conn: &mut PgConnection,
    c: &ChangedVerdict<'_>,
    missing: i64,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<IncidentRow, sqlx::Error> {
    let open: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, last_bucket_start_ms, max_missing FROM alert_incidents
          WHERE topic = $1 AND edge = $2 AND datacenter = $3 AND status = 'open'
          FOR UPDATE",
    )
    .bind(c.topic)
    .bind(c.edge)
    .bind(c.datacenter)
    .fetch_optional(&mut *conn)
    .await?;
    let open = match open {
        Some((id, last, max_missing)) => {
            let late = c.bucket_start_ms > last.saturating_add(policy.incident_gap_ms);
            let worse = max_missing > 0
                && missing >= policy.escalate_min
                && missing >= max_missing.saturating_mul(i64::from(policy.escalate_factor));
            if late || worse {
                sqlx::query(
                    "UPDATE alert_incidents SET status = 'superseded', resolved_at = $2
                      WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                tracing::warn!(
                    incident_id = id, topic = %c.topic, edge = %c.edge,
                    missing, max_missing, late, worse,
                    "open incident superseded by a new one"
                );
                None
            } else {
                Some(id)
            }
        }
        None => None,
    };
    let row = match open {
        Some(id) => {
            sqlx::query_as(&format!(
                "UPDATE alert_incidents
                    SET first_bucket_start_ms = least(first_bucket_start_ms, $2),
                        last_bucket_start_ms = greatest(last_bucket_start_ms, $2),
                        buckets = buckets + 1, bad_buckets = bad_buckets + 1,
                        max_missing = greatest(max_missing, $3)
                  WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(id)
            .bind(c.bucket_start_ms)
            .bind(missing)
            .fetch_one(&mut *conn)
            .await?
        }
        None => {
            let row = sqlx::query_as(&format!(
                "INSERT INTO alert_incidents (topic, edge, datacenter, from_tier, to_tier, status,
                     bucket_width_ms, first_bucket_start_ms, last_bucket_start_ms, max_missing,
                     opened_at)
                 VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7, $8, $9)
                 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(c.topic)
            .bind(c.edge)
            .bind(c.datacenter)
            .bind(c.from_tier)
            .bind(c.to_tier)
            .bind(c.bucket_width_ms)
            .bind(c.bucket_start_ms)
            .bind(missing)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?;
            tracing::warn!(
                topic = %c.topic, edge = %c.edge, datacenter = %c.datacenter,
                bucket_start_ms = c.bucket_start_ms, status = %c.status, "incident opened"
            );
            row
        }
    };
    Ok(row)
}

async fn insert_event(
    conn: &mut PgConnection,
    kind: &str,
    c: &ChangedVerdict<'_>,
    incident: &IncidentRow,
    resolved_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), IncidentError> {
    let data = EventData {
        incident_id: incident.id,
        topic: c.topic.to_owned(),
        edge: c.edge.to_owned(),
        from_tier: c.from_tier.to_owned(),
        to_tier: c.to_tier.to_owned(),
        datacenter: (!c.datacenter.is_empty()).then(|| c.datacenter.to_owned()),
        status: c.status,
        silent_tier: c.silent_tier.map(str::to_owned),
        bucket_start_ms: c.bucket_start_ms,
        bucket_width_ms: c.bucket_width_ms,
        expected: c.expected,
        actual: c.actual,
        incident_first_bucket_start_ms: incident.first_bucket_start_ms,
        incident_last_bucket_start_ms: incident.last_bucket_start_ms,
        opened_at: incident.opened_at,
        resolved_at,
    };
    sqlx::query(
        "INSERT INTO alert_events (incident_id, kind, payload, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(incident.id)
    .bind(kind)
    .bind(serde_json::to_string(&data)?)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
