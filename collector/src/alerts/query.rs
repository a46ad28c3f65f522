//! Read side of incidents and deliveries, for the HTTP API.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Whether an incident is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    /// Some of its buckets are still bad.
    Open,
    /// Every bucket is complete again.
    Resolved,
    /// A new incident of the same topic took over while some of its buckets were still bad:
    /// a much worse loss arrived, or a loss long after its last bad bucket.
    Superseded,
}

impl IncidentStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::Open => "open",
            IncidentStatus::Resolved => "resolved",
            IncidentStatus::Superseded => "superseded",
        }
    }
}

impl fmt::Display for IncidentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not an incident status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown incident status `{0}` (expected open, resolved or superseded)")]
pub struct UnknownIncidentStatus(pub String);

impl FromStr for IncidentStatus {
    type Err = UnknownIncidentStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(IncidentStatus::Open),
            "resolved" => Ok(IncidentStatus::Resolved),
            "superseded" => Ok(IncidentStatus::Superseded),
            _ => Err(UnknownIncidentStatus(s.to_owned())),
        }
    }
}

/// One incident as `/api/v1/alerts` and the incident page show it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Incident {
    /// Incident id (also in webhook bodies).
    pub id: i64,
    /// Logical topic.
    pub topic: String,
    /// Edge name.
    pub edge: String,
    /// Datacenter compared, '' when the edge sums over datacenters.
    pub datacenter: String,
    /// Upstream tier.
    pub from_tier: String,
    /// Downstream tier.
    pub to_tier: String,
    /// `open`, `resolved` or `superseded`.
    pub status: String,
    /// Bucket width, ms.
    pub bucket_width_ms: i64,
    /// First bucket that joined the incident, epoch ms.
    pub first_bucket_start_ms: i64,
    /// Last bucket that joined the incident, epoch ms.
    pub last_bucket_start_ms: i64,
    /// Buckets that joined.
    pub buckets: i32,
    /// Buckets still bad.
    pub bad_buckets: i32,
    /// Largest missing count of one bucket.
    pub max_missing: i64,
    /// When opened (reconciler clock).
    pub opened_at: DateTime<Utc>,
    /// When resolved or superseded.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Webhook notifications delivered for this incident.
    pub notifications_sent: i64,
    /// Webhook notifications still waiting to be delivered.
    pub notifications_pending: i64,
    /// Webhook notifications parked: refused `alerts.max_attempts` times or still failing
    /// after `alerts.max_age`, never tried again (see each delivery's `last_error`).
    pub notifications_parked: i64,
    /// Each notification of this incident, oldest first: where it stands, and why the last
    /// attempt failed.
    #[sqlx(skip)]
    pub deliveries: Vec<Delivery>,
}

/// One notification of an incident to one webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Delivery {
    /// Incident notified.
    #[serde(skip)]
    pub incident_id: i64,
    /// Webhook name (from the configuration).
    pub webhook: String,
    /// `firing` or `resolved`.
    pub kind: String,
    /// `pending`, `sent` or `parked`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Of those, attempts the receiver refused (a 4xx other than 408 and 429).
    pub refusals: i32,
    /// When the receiver accepted it; null while pending or parked.
    pub sent_at: Option<DateTime<Utc>>,
    /// When a pending notification is tried next (meaningless once sent or parked).
    pub next_attempt_at: DateTime<Utc>,
    /// When it was parked: it is never tried again.
    pub parked_at: Option<DateTime<Utc>>,
    /// HTTP status of the last failed attempt's answer; null when there was none (no
    /// connection, a timeout) or once sent.
    pub last_status: Option<i32>,
    /// Why the last attempt failed (the webhook's URL shown as scheme, host and port only,
    /// then the receiver's answer, cut after its first 256 bytes); null once sent.
    pub last_error: Option<String>,
    /// When the notification was created.
    #[serde(skip)]
    pub created_at: DateTime<Utc>,
}

const INCIDENT_COLUMNS: &str = "i.id, i.topic, i.edge, i.datacenter, i.from_tier, i.to_tier, \
     i.status, i.bucket_width_ms, i.first_bucket_start_ms, i.last_bucket_start_ms, i.buckets, \
     i.bad_buckets, i.max_missing, i.opened_at, i.resolved_at, \
     (SELECT count(*) FROM alert_deliveries d \
       WHERE d.incident_id = i.id AND d.sent_at IS NOT NULL) AS notifications_sent, \
     (SELECT count(*) FROM alert_deliveries d \
       WHERE d.incident_id = i.id AND d.sent_at IS NULL \
         AND d.parked_at IS NULL) AS notifications_pending, \
     (SELECT count(*) FROM alert_deliveries d \
       WHERE d.incident_id = i.id AND d.parked_at IS NOT NULL) AS notifications_parked";

/// Incidents, newest first, optionally of one status, at most `limit` (capped at 10 000),
/// each with its notifications.
pub async fn list_alerts(
    pool: &PgPool,
    status: Option<IncidentStatus>,
    limit: i64,
) -> Result<Vec<Incident>, sqlx::Error> {
    let incidents: Vec<Incident> = sqlx::query_as(&format!(
        "SELECT {INCIDENT_COLUMNS}
           FROM alert_incidents i
          WHERE ($1::text IS NULL OR i.status = $1)
          ORDER BY i.id DESC
          LIMIT $2"
    ))
    .bind(status.map(IncidentStatus::as_str))
    .bind(limit.clamp(0, 10_000))
    .fetch_all(pool)
    .await?;
    with_deliveries(pool, incidents).await
}

/// Incident `id` with its notifications, if there is one.
pub async fn incident(pool: &PgPool, id: i64) -> Result<Option<Incident>, sqlx::Error> {
    let incident: Option<Incident> = sqlx::query_as(&format!(
        "SELECT {INCIDENT_COLUMNS} FROM alert_incidents i WHERE i.id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(with_deliveries(pool, incident.into_iter().collect())
        .await?
        .pop())
}

/// `incidents` with their notifications filled in.
async fn with_deliveries(
    pool: &PgPool,
    mut incidents: Vec<Incident>,
) -> Result<Vec<Incident>, sqlx::Error> {
    let ids: Vec<i64> = incidents.iter().map(|a| a.id).collect();
    let deliveries: Vec<Delivery> = sqlx::query_as(
        "SELECT incident_id, webhook, kind,
                CASE WHEN sent_at IS NOT NULL THEN 'sent'
                     WHEN parked_at IS NOT NULL THEN 'parked'
                     ELSE 'pending' END AS state,
                attempts, refusals, sent_at, next_attempt_at, parked_at, last_status, last_error,
                created_at
           FROM alert_deliveries
          WHERE incident_id = ANY($1)
          ORDER BY incident_id, id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    for delivery in deliveries {
        if let Some(incident) = incidents.iter_mut().find(|a| a.id == delivery.incident_id) {
            incident.deliveries.push(delivery);
        }
    }
    Ok(incidents)
}
