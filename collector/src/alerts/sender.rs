//! The outbox worker: turns events into per-webhook deliveries, then posts due deliveries with
//! retries and capped exponential backoff, each webhook independently of the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use chaperone_daemon_support::backoff;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::{PgPool, Row};

use super::client::request_error;
use super::config::{AlertsConfig, Secret, WebhookConfig, WebhookFormat};
use super::metrics::AlertMetrics;
use super::payload::{EventData, NotificationKind, json_body, slack_body};
use crate::Clock;

/// Advisory lock serialising fan-out, so events are handled in order (a firing before its
/// resolved) even with several collectors.
const FANOUT_LOCK_KEY: &str = "chaperone-alert-fanout";

/// Events handled per fan-out transaction.
const FANOUT_BATCH: i64 = 500;

/// Header carrying `sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">` when a secret is
/// configured.
pub const SIGNATURE_HEADER: &str = "X-Chaperone-Signature";
/// Header carrying the time of the attempt, in seconds since the epoch; it is part of what the
/// signature covers, so a receiver can refuse replays of old requests.
pub const TIMESTAMP_HEADER: &str = "X-Chaperone-Timestamp";
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

/// `sha256=<hex>` signature of a request sent at `timestamp` (epoch seconds, the value of
/// [`TIMESTAMP_HEADER`]) with `body`: HMAC-SHA256 under `secret` of the bytes
/// `"{timestamp}.{body}"`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    mac_hex(secret, &[timestamp.to_string().as_bytes(), b".", body])
}

/// `sha256=<hex HMAC-SHA256 of the concatenated parts>`.
fn mac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac accepts any key");
    for part in parts {
        mac.update(part);
    }
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug)]
pub(crate) struct Hook {
    pub config: WebhookConfig,
    pub secret: Option<Secret>,
    /// Its own client: its `ca_file` decides whom it trusts.
    pub client: reqwest::Client,
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

    /// Sends due deliveries, every webhook independently of the others, and returns how
    /// many deliveries were claimed.
    ///
    /// Each webhook has its own stream: its own transactions, claiming only its own
    /// deliveries (so its own retry and backoff state), posting them in order and waiting
    /// only on its own receiver. A receiver that accepts the connection and never answers
    /// holds up its own webhook until the request timeout, never another one: while some
    /// webhook is still waiting on its receiver, the others keep going, fanning out new
    /// events and sending what is due every `poll_interval`.
    pub async fn deliver_batch(&self, report: &mut SendReport) -> Result<usize, AlertError> {
        let busy = AtomicUsize::new(0);
        let streams = self
            .hooks
            .iter()
            .map(|hook| self.hook_stream(hook, &busy))
            .collect();
        let mut claimed = 0;
        let mut error = None;
        for (r, c, result) in join_all(streams).await {
            report.events += r.events;
            report.created += r.created;
            report.sent += r.sent;
            report.failed += r.failed;
            claimed += c;
            if let Err(e) = result {
                error.get_or_insert(e);
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(claimed),
        }
    }

    /// One webhook's stream: delivers until a delivery fails (the rest waits for the
    /// backoff) or nothing of it is due; in the latter case, while another webhook is still
    /// busy, it keeps polling. Returns what it did, how many deliveries it claimed and how it
    /// ended.
    async fn hook_stream(
        &self,
        hook: &Hook,
        busy: &AtomicUsize,
    ) -> (SendReport, usize, Result<(), AlertError>) {
        let mut report = SendReport::default();
        let mut claimed = 0;
        let result = async {
            loop {
                let round = {
                    let _busy = Busy::enter(busy);
                    self.deliver_hook(hook, &mut report).await?
                };
                claimed += round.claimed;
                if round.failed > 0 {
                    // Its receiver just failed: the rest of its deliveries wait for the
                    // backoff.
                    return Ok(());
                }
                if round.claimed > 0 {
                    // All went through: more may be due (a resolved behind its firing, a
                    // full batch).
                    continue;
                }
                if busy.load(Ordering::SeqCst) == 0 {
                    return Ok(());
                }
                tokio::time::sleep(self.config.poll_interval).await;
                self.fan_out(&mut report).await?;
            }
        }
        .await;
        (report, claimed, result)
    }

    /// Claims up to one batch of the due deliveries of `hook`, posts them in order until one
    /// fails and records the outcome, in one transaction. A failure schedules the retry of
    /// that delivery and defers the webhook's other pending deliveries to the same time.
    async fn deliver_hook(
        &self,
        hook: &Hook,
        report: &mut SendReport,
    ) -> Result<HookRound, AlertError> {
        let now = self.clock.now();
        let webhook = hook.config.name.as_str();
        let mut tx = self.pool.begin().await?;
        // Rows stay locked until the outcome is committed: another collector skips them, and
        // a crash before the commit leaves them pending (sent again with the same
        // idempotency key).
        let rows = sqlx::query(
            "SELECT d.id, d.kind, d.idempotency_key, d.content_type, d.body, d.attempts
               FROM alert_deliveries d
              WHERE d.sent_at IS NULL AND d.next_attempt_at <= $1 AND d.webhook = $2
                AND NOT (d.kind = 'resolved' AND EXISTS (
                    SELECT 1 FROM alert_deliveries f
                     WHERE f.webhook = d.webhook AND f.incident_id = d.incident_id
                       AND f.kind = 'firing' AND f.sent_at IS NULL))
              ORDER BY d.id
              LIMIT $3
              FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(now)
        .bind(webhook)
        .bind(i64::try_from(self.config.batch_size).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        let mut round = HookRound {
            claimed: rows.len(),
            failed: 0,
        };
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let kind: String = row.try_get(1)?;
            let key: String = row.try_get(2)?;
            let content_type: String = row.try_get(3)?;
            let body: String = row.try_get(4)?;
            let attempts: i32 = row.try_get(5)?;
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
                        .with_label_values(&[webhook, "sent"])
                        .inc();
                    report.sent += 1;
                    tracing::info!(%webhook, %kind, delivery_id = id, "webhook notified");
                }
                Err(error) => {
                    let delay = backoff::delay(
                        self.config.initial_backoff,
                        self.config.max_backoff,
                        u32::try_from(attempts).unwrap_or(0),
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
                    // The webhook's other pending deliveries wait as long: a receiver that is
                    // down or hangs is tried once per backoff, not once per notification.
                    sqlx::query(
                        "UPDATE alert_deliveries SET next_attempt_at = $2
                          WHERE id IN (SELECT id FROM alert_deliveries
                                        WHERE webhook = $1 AND sent_at IS NULL
                                          AND next_attempt_at < $2
                                          FOR UPDATE SKIP LOCKED)",
                    )
                    .bind(webhook)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                    self.metrics
                        .deliveries
                        .with_label_values(&[webhook, "failed"])
                        .inc();
                    report.failed += 1;
                    round.failed += 1;
                    tracing::warn!(
                        %webhook, %kind, delivery_id = id, attempts = attempts + 1,
                        retry_in_ms = delay.as_millis() as u64, %error,
                        "webhook delivery failed; will retry"
                    );
                    // Its receiver just failed: the rest waits for a later round, not now.
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(round)
    }

    async fn post(
        &self,
        hook: &Hook,
        kind: &str,
        key: &str,
        content_type: &str,
        body: String,
    ) -> Result<(), String> {
        let url = hook.config.url.as_str();
        // Stamped per attempt: a retry is a new request, signed anew.
        let timestamp = self.clock.now().timestamp();
        let mut request = hook
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(IDEMPOTENCY_HEADER, key)
            .header(EVENT_HEADER, kind)
            .header(TIMESTAMP_HEADER, timestamp);
        if let Some(secret) = &hook.secret {
            request = request.header(
                SIGNATURE_HEADER,
                signature(secret.expose(), timestamp, body.as_bytes()),
            );
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {}", request_error(url, e)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "POST {}: receiver answered {status}",
                super::client::redact_url(url)
            ))
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

/// What one transaction of one webhook did.
#[derive(Debug, Clone, Copy)]
struct HookRound {
    /// Deliveries claimed.
    claimed: usize,
    /// Deliveries that failed (at most one: the webhook stops at its first failure).
    failed: usize,
}

/// Counts a webhook stream as busy (talking to PostgreSQL or its receiver) while alive.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn enter(busy: &'a AtomicUsize) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        Self(busy)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `futures` concurrently on the current task; their outputs, in order. Dropping the
/// returned future drops every one still running.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn join_all_runs_futures_together_and_keeps_their_order() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        // The first waits for the second: one after the other, they would never finish.
        let waits: Pin<Box<dyn Future<Output = u32> + Send>> =
            Box::pin(async move { rx.await.expect("sent") + 1 });
        let sends: Pin<Box<dyn Future<Output = u32> + Send>> = Box::pin(async move {
            tokio::task::yield_now().await;
            tx.send(41).expect("receiver alive");
            7
        });
        let out = tokio::time::timeout(Duration::from_secs(5), join_all(vec![waits, sends]))
            .await
            .expect("both finish");
        assert_eq!(out, vec![42, 7]);
        assert!(
            join_all(Vec::<std::future::Ready<()>>::new())
                .await
                .is_empty()
        );
    }

    #[test]
    fn busy_counts_while_alive() {
        let busy = AtomicUsize::new(0);
        let a = Busy::enter(&busy);
        let b = Busy::enter(&busy);
        assert_eq!(busy.load(Ordering::SeqCst), 2);
        drop(a);
        drop(b);
        assert_eq!(busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn signature_is_hmac_sha256_hex_of_timestamp_dot_body() {
        // RFC 4231 test case 2, split in parts.
        assert_eq!(
            mac_hex(b"Jefe", &[b"what do ya ", b"want for nothing?"]),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            signature(b"k", 1_767_225_600, b"{}"),
            mac_hex(b"k", &[b"1767225600.{}"])
        );
        assert_ne!(
            signature(b"k", 1_767_225_600, b"{}"),
            signature(b"k", 1_767_225_601, b"{}"),
            "the timestamp is signed"
        );
    }
}
