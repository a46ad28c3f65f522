//! The outbox worker: turns events into per-webhook deliveries, then posts due deliveries with
//! retries and capped exponential backoff.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::{PgPool, Row};

use super::config::{AlertsConfig, Secret, WebhookConfig, WebhookFormat};
use super::metrics::AlertMetrics;
use super::payload::{EventData, NotificationKind, json_body, slack_body};
use crate::Clock;

/// Advisory lock serialising fan-out, so events are handled in order (a firing before its
/// resolved) even with several collectors.
const FANOUT_LOCK_KEY: &str = "chaperone-alert-fanout";

/// Events handled per fan-out transaction.
const FANOUT_BATCH: i64 = 500;

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>` when a secret is configured.
pub const SIGNATURE_HEADER: &str = "X-Chaperone-Signature";
/// Header carrying the delivery's idempotency key (the same on every retry).
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Header carrying `firing` or `resolved`.
pub const EVENT_HEADER: &str = "X-Chaperone-Event";

/// Errors of the alert sender.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AlertError {
    /// PostgreSQL failed; retried at the next poll.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// An outbox event could not be read or a body could not be encoded.
    #[error("alert payload: {0}")]
    Payload(#[from] serde_json::Error),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// `sha256=<hex>` signature of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac accepts any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug)]
pub(crate) struct Hook {
    pub config: WebhookConfig,
    pub secret: Option<Secret>,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Outbox events turned into deliveries.
    pub events: u64,
    /// Deliveries created.
    pub created: u64,
    /// Deliveries that reached their webhook.
    pub sent: u64,
    /// Delivery attempts that failed (to be retried).
    pub failed: u64,
}

#[derive(Debug)]
pub(crate) struct Sender {
    pub pool: PgPool,
    pub config: AlertsConfig,
    pub hooks: Vec<Hook>,
    pub clock: Clock,
    pub metrics: AlertMetrics,
    pub client: reqwest::Client,
}

impl Sender {
    /// Creates the deliveries of pending events, in event order.
    pub async fn fan_out(&self, report: &mut SendReport) -> Result<(), AlertError> {
        loop {
            let now = self.clock.now();
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(FANOUT_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
            let rows = sqlx::query(
                "SELECT id, incident_id, kind, payload FROM alert_events
                  WHERE fanned_out_at IS NULL ORDER BY id LIMIT $1",
            )
            .bind(FANOUT_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            let n = rows.len();
            for row in rows {
                let event_id: i64 = row.try_get(0)?;
                let incident_id: i64 = row.try_get(1)?;
                let kind: String = row.try_get(2)?;
                let payload: String = row.try_get(3)?;
                let data: EventData = serde_json::from_str(&payload)?;
                for hook in &self.hooks {
                    let name = hook.config.name.as_str();
                    let kind = if kind == "resolved" {
                        let fired: bool = sqlx::query_scalar(
                            "SELECT EXISTS (SELECT 1 FROM alert_deliveries
                              WHERE webhook = $1 AND incident_id = $2 AND kind = 'firing')",
                        )
                        .bind(name)
                        .bind(incident_id)
                        .fetch_one(&mut *tx)
                        .await?;
                        if !fired {
                            continue;
                        }
                        NotificationKind::Resolved
                    } else {
                        let f = &hook.config.filters;
                        if !f.matches(&data.topic, data.status, data.expected, data.actual) {
                            continue;
                        }
                        NotificationKind::Firing
                    };
                    let public_url = self.config.public_url.as_deref();
                    let (content_type, body) = match hook.config.format {
                        WebhookFormat::Json => (
                            "application/json",
                            serde_json::to_string(&json_body(kind, &data, public_url))?,
                        ),
                        WebhookFormat::Slack => (
                            "application/json",
                            serde_json::to_string(&slack_body(kind, &data, public_url))?,
                        ),
                    };
                    // At most one firing and one resolved per webhook and incident.
                    let created = sqlx::query(
                        "INSERT INTO alert_deliveries (webhook, incident_id, event_id, kind,
                             idempotency_key, content_type, body, next_attempt_at, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
                         ON CONFLICT (webhook, incident_id, kind) DO NOTHING",
                    )
                    .bind(name)
                    .bind(incident_id)
                    .bind(event_id)
                    .bind(kind.as_str())
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind(content_type)
                    .bind(body)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    report.created += created;
                }
                sqlx::query("UPDATE alert_events SET fanned_out_at = $2 WHERE id = $1")
                    .bind(event_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                report.events += 1;
            }
            tx.commit().await?;
            if n < FANOUT_BATCH as usize {
                return Ok(());
            }
        }
    }

    /// Claims up to one batch of due deliveries, posts them and records the outcome.
    /// Returns how many were claimed.
    pub async fn deliver_batch(&self, report: &mut SendReport) -> Result<usize, AlertError> {
        let now = self.clock.now();
        let names: Vec<&str> = self.hooks.iter().map(|h| h.config.name.as_str()).collect();
        let by_name: HashMap<&str, &Hook> = self
            .hooks
            .iter()
            .map(|h| (h.config.name.as_str(), h))
            .collect();
        let mut tx = self.pool.begin().await?;
        // Rows stay locked until the outcome is committed: another collector skips them, and
        // a crash before the commit leaves them pending (sent again with the same
        // idempotency key).
        let rows = sqlx::query(
            "SELECT d.id, d.webhook, d.kind, d.idempotency_key, d.content_type, d.body, d.attempts
               FROM alert_deliveries d
              WHERE d.sent_at IS NULL AND d.next_attempt_at <= $1 AND d.webhook = ANY($2)
                AND NOT (d.kind = 'resolved' AND EXISTS (
                    SELECT 1 FROM alert_deliveries f
                     WHERE f.webhook = d.webhook AND f.incident_id = d.incident_id
                       AND f.kind = 'firing' AND f.sent_at IS NULL))
              ORDER BY d.id
              LIMIT $3
              FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(now)
        .bind(&names)
        .bind(i64::try_from(self.config.batch_size).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        let claimed = rows.len();
        let mut failing: HashSet<String> = HashSet::new();
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let webhook: String = row.try_get(1)?;
            let kind: String = row.try_get(2)?;
            let key: String = row.try_get(3)?;
            let content_type: String = row.try_get(4)?;
            let body: String = row.try_get(5)?;
            let attempts: i32 = row.try_get(6)?;
            if failing.contains(&webhook) {
                // Its receiver just failed: try again after the backoff, not now.
                continue;
            }
            let Some(hook) = by_name.get(webhook.as_str()) else {
                continue;
            };
            match self.post(hook, &kind, &key, &content_type, body).await {
                Ok(()) => {
                    sqlx::query(
                        "UPDATE alert_deliveries
                            SET sent_at = $2, attempts = attempts + 1, last_error = NULL
                          WHERE id = $1",
                    )
                    .bind(id)
                    .bind(self.clock.now())
                    .execute(&mut *tx)
                    .await?;
                    self.metrics
                        .deliveries
                        .with_label_values(&[webhook.as_str(), "sent"])
                        .inc();
                    report.sent += 1;
                    tracing::info!(%webhook, %kind, delivery_id = id, "webhook notified");
                }
                Err(error) => {
                    let delay = backoff(
                        self.config.initial_backoff,
                        self.config.max_backoff,
                        attempts,
                    );
                    let next = self.clock.now()
                        + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                    sqlx::query(
                        "UPDATE alert_deliveries
                            SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3
                          WHERE id = $1",
                    )
                    .bind(id)
                    .bind(next)
                    .bind(&error)
                    .execute(&mut *tx)
                    .await?;
                    self.metrics
                        .deliveries
                        .with_label_values(&[webhook.as_str(), "failed"])
                        .inc();
                    report.failed += 1;
                    tracing::warn!(
                        %webhook, %kind, delivery_id = id, attempts = attempts + 1,
                        retry_in_ms = delay.as_millis() as u64, %error,
                        "webhook delivery failed; will retry"
                    );
                    failing.insert(webhook);
                }
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn post(
        &self,
        hook: &Hook,
        kind: &str,
        key: &str,
        content_type: &str,
        body: String,
    ) -> Result<(), String> {
        let mut request = self
            .client
            .post(&hook.config.url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(IDEMPOTENCY_HEADER, key)
            .header(EVENT_HEADER, kind);
        if let Some(secret) = &hook.secret {
            request = request.header(
                SIGNATURE_HEADER,
                signature(secret.expose(), body.as_bytes()),
            );
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {status}"))
        }
    }

    /// Updates the pending-deliveries gauge.
    pub async fn refresh_pending(&self) -> Result<(), AlertError> {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM alert_deliveries WHERE sent_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        self.metrics.pending.set(pending);
        Ok(())
    }
}

/// Delay after the `attempts`+1-th failure: `initial * 2^attempts`, at most `max`.
pub(crate) fn backoff(initial: Duration, max: Duration, attempts: i32) -> Duration {
    let factor = 2u32.saturating_pow(u32::try_from(attempts).unwrap_or(0).min(30));
    initial.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(1), s(60), 0), s(1));
        assert_eq!(backoff(s(1), s(60), 1), s(2));
        assert_eq!(backoff(s(1), s(60), 5), s(32));
        assert_eq!(backoff(s(1), s(60), 6), s(60));
        assert_eq!(backoff(s(1), s(60), 10_000), s(60));
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
