//! The outbox worker: turns events into per-webhook deliveries, then posts due deliveries with
//! retries and capped exponential backoff, each webhook independently of the others, and parks
//! the deliveries a receiver keeps refusing (or that fail for too long).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use chaperone_daemon_support::{Clock, backoff};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use super::client::request_error;
use super::config::{AlertsConfig, Secret, WebhookConfig, WebhookFormat};
use super::metrics::AlertMetrics;
use super::payload::{EventData, NotificationKind, json_body, slack_body};

/// Advisory lock serialising fan-out, so events are handled in order (a firing before its
/// resolved) even with several collectors.
const FANOUT_LOCK_KEY: &str = "chaperone-alert-fanout";

/// Events handled per fan-out transaction.
const FANOUT_BATCH: i64 = 500;

/// How much longer than `request_timeout` PostgreSQL keeps the transaction of a delivery in
/// flight (and its row lock) while it waits on the receiver.
const IN_FLIGHT_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Most bytes of a receiver's refusal kept in `last_error`.
pub const ERROR_BODY_BYTES: usize = 256;

/// A delivery neither sent nor parked (SQL over `alert_deliveries d`).
const PENDING: &str = "d.sent_at IS NULL AND d.parked_at IS NULL";

/// A pending delivery that may be posted: a `resolved` only once its `firing` is sent (or
/// parked, which parks the `resolved` too).
const DUE: &str = "d.sent_at IS NULL AND d.parked_at IS NULL
    AND NOT (d.kind = 'resolved' AND EXISTS (
        SELECT 1 FROM alert_deliveries f
         WHERE f.webhook = d.webhook AND f.incident_id = d.incident_id
           AND f.kind = 'firing' AND f.sent_at IS NULL AND f.parked_at IS NULL))";

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
    /// Delivery attempts that failed (refusals included).
    pub failed: u64,
    /// Of those, attempts the receiver refused (a 4xx other than 408 and 429).
    pub refused: u64,
    /// Deliveries parked: they will not be tried again.
    pub parked: u64,
}

impl SendReport {
    /// Adds what `other` did.
    pub fn add(&mut self, other: &SendReport) {
        self.events += other.events;
        self.created += other.created;
        self.sent += other.sent;
        self.failed += other.failed;
        self.refused += other.refused;
        self.parked += other.parked;
    }
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
    /// many deliveries were claimed. Once `stop` is cancelled no further POST starts.
    ///
    /// Each webhook has its own stream: its own transactions, claiming only its own
    /// deliveries (so its own retry and backoff state), posting them in order and waiting
    /// only on its own receiver. A receiver that accepts the connection and never answers
    /// holds up its own webhook until the request timeout, never another one: while some
    /// webhook is still waiting on its receiver, the others keep going, fanning out new
    /// events and sending what is due every `poll_interval`.
    pub async fn deliver_batch(
        &self,
        report: &mut SendReport,
        stop: &CancellationToken,
    ) -> Result<usize, AlertError> {
        let busy = AtomicUsize::new(0);
        let streams = self
            .hooks
            .iter()
            .map(|hook| self.hook_stream(hook, &busy, stop))
            .collect();
        let mut claimed = 0;
        let mut error = None;
        for (r, c, result) in join_all(streams).await {
            report.add(&r);
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
        stop: &CancellationToken,
    ) -> (SendReport, usize, Result<(), AlertError>) {
        let mut report = SendReport::default();
        let mut claimed = 0;
        let result = async {
            loop {
                if stop.is_cancelled() {
                    return Ok(());
                }
                let round = {
                    let _busy = Busy::enter(busy);
                    self.deliver_hook(hook, &mut report, stop).await?
                };
                claimed += round.claimed;
                if round.failed > 0 {
                    // Its receiver just failed: the rest of its deliveries wait for the
                    // backoff.
                    return Ok(());
                }
                if round.claimed > 0 {
                    // Some were handled: more may be due (a resolved behind its firing, a
                    // full batch).
                    continue;
                }
                if busy.load(Ordering::SeqCst) == 0 {
                    return Ok(());
                }
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
                self.fan_out(&mut report).await?;
            }
        }
        .await;
        (report, claimed, result)
    }

    /// Delivers up to one batch of the due deliveries of `hook`, in order, each in its own
    /// transaction, until one fails. A refusal (see [`Attempt::Refused`]) concerns that
    /// delivery only: the next ones go on. Any other failure schedules the retry of that
    /// delivery, defers the webhook's other pending deliveries to the same time and ends the
    /// batch.
    async fn deliver_hook(
        &self,
        hook: &Hook,
        report: &mut SendReport,
        stop: &CancellationToken,
    ) -> Result<HookRound, AlertError> {
        let webhook = hook.config.name.as_str();
        // Read without locks: each one is locked (and checked again) by its own transaction.
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT d.id FROM alert_deliveries d
              WHERE {DUE} AND d.next_attempt_at <= $1 AND d.webhook = $2
              ORDER BY d.id
              LIMIT $3"
        ))
        .bind(self.clock.now())
        .bind(webhook)
        .bind(i64::try_from(self.config.batch_size).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut round = HookRound {
            claimed: 0,
            failed: 0,
        };
        for id in ids {
            if stop.is_cancelled() {
                break;
            }
            match self.deliver_one(hook, id, report).await? {
                Handled::Skipped => {}
                Handled::Done => round.claimed += 1,
                Handled::Failed => {
                    round.claimed += 1;
                    round.failed += 1;
                    // Its receiver just failed: the rest waits for a later round, not now.
                    break;
                }
            }
        }
        Ok(round)
    }

    /// Locks delivery `id` if it is still due and nobody else holds it, posts it and commits
    /// the outcome right after the receiver's answer, all in one transaction of its own. The
    /// row lock keeps another collector (a second leader for a moment) from posting it at the
    /// same time; the commit right after the answer keeps it from being posted again once
    /// this one has it. A crash or a lost database connection between the answer and the
    /// commit leaves it pending: it is posted again, with the same idempotency key.
    async fn deliver_one(
        &self,
        hook: &Hook,
        id: i64,
        report: &mut SendReport,
    ) -> Result<Handled, AlertError> {
        let webhook = hook.config.name.as_str();
        let mut tx = self.pool.begin().await?;
        // The transaction waits on the receiver: PostgreSQL keeps it (and the row lock) for
        // the request timeout and a margin, and ends it (releasing the lock) if this
        // collector goes silent longer than that, whatever the pool's own setting.
        let in_flight = self.config.request_timeout + IN_FLIGHT_MARGIN;
        sqlx::query(&format!(
            "SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
            in_flight.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT d.kind, d.idempotency_key, d.content_type, d.body, d.attempts, d.refusals,
                    d.created_at, d.incident_id,
                    d.kind = 'resolved' AND EXISTS (
                        SELECT 1 FROM alert_deliveries f
                         WHERE f.webhook = d.webhook AND f.incident_id = d.incident_id
                           AND f.kind = 'firing' AND f.parked_at IS NOT NULL) AS firing_parked
               FROM alert_deliveries d
              WHERE d.id = $1 AND {DUE} AND d.next_attempt_at <= $2
              FOR UPDATE OF d SKIP LOCKED"
        ))
        .bind(id)
        .bind(self.clock.now())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Sent, parked or held by another sender meanwhile.
            return Ok(Handled::Skipped);
        };
        let kind: String = row.try_get(0)?;
        let key: String = row.try_get(1)?;
        let content_type: String = row.try_get(2)?;
        let body: String = row.try_get(3)?;
        let attempts: i32 = row.try_get(4)?;
        let refusals: i32 = row.try_get(5)?;
        let created_at: DateTime<Utc> = row.try_get(6)?;
        let incident_id: i64 = row.try_get(7)?;
        let firing_parked: bool = row.try_get(8)?;
        if firing_parked {
            // The receiver never got the firing: a resolved alone would be news of an
            // incident it does not know.
            self.park(
                &mut tx,
                id,
                None,
                "not sent: the firing notification of this incident was parked",
            )
            .await?;
            tx.commit().await?;
            tracing::warn!(
                %webhook, %kind, delivery_id = id, incident_id,
                "webhook delivery parked: its firing was parked"
            );
            self.parked(webhook, report);
            return Ok(Handled::Done);
        }
        let attempt = self.post(hook, &kind, &key, &content_type, body).await;
        let now = self.clock.now();
        let outcome = match attempt {
            Attempt::Sent => {
                sqlx::query(
                    "UPDATE alert_deliveries
                        SET sent_at = $2, attempts = attempts + 1, last_error = NULL,
                            last_status = NULL
                      WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                self.metrics
                    .deliveries
                    .with_label_values(&[webhook, "sent"])
                    .inc();
                report.sent += 1;
                tracing::info!(%webhook, %kind, delivery_id = id, "webhook notified");
                return Ok(Handled::Done);
            }
            Attempt::Refused { status, error } => Failure {
                status: Some(status),
                refused: true,
                error,
            },
            Attempt::Failed { status, error } => Failure {
                status,
                refused: false,
                error,
            },
        };
        let attempts = attempts.saturating_add(1);
        let refusals = refusals.saturating_add(i32::from(outcome.refused));
        let max_age =
            chrono::Duration::from_std(self.config.max_age).unwrap_or(chrono::Duration::MAX);
        let too_old = now - created_at >= max_age;
        let refused_enough =
            outcome.refused && u32::try_from(refusals).unwrap_or(0) >= self.config.max_attempts;
        let status = outcome.status.map(i32::from);
        self.metrics
            .deliveries
            .with_label_values(&[webhook, "failed"])
            .inc();
        report.failed += 1;
        report.refused += u64::from(outcome.refused);
        let delay = backoff::delay(
            self.config.initial_backoff,
            self.config.max_backoff,
            u32::try_from(attempts - 1).unwrap_or(0),
        );
        let next = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        let park = refused_enough || too_old;
        sqlx::query(
            "UPDATE alert_deliveries
                SET attempts = $2, refusals = $3, next_attempt_at = $4, last_error = $5,
                    last_status = $6, parked_at = CASE WHEN $7 THEN $8 END
              WHERE id = $1",
        )
        .bind(id)
        .bind(attempts)
        .bind(refusals)
        .bind(next)
        .bind(&outcome.error)
        .bind(status)
        .bind(park)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut others: Vec<i64> = Vec::new();
        if !outcome.refused {
            if let Some(cutoff) = now.checked_sub_signed(max_age).filter(|_| too_old) {
                // The receiver fails as a whole: whatever of it has waited as long goes too.
                others = sqlx::query_scalar(&format!(
                    "UPDATE alert_deliveries
                        SET parked_at = $2, last_status = $3,
                            last_error = 'not delivered within alerts.max_age: ' || $4
                      WHERE id IN (SELECT d.id FROM alert_deliveries d
                                    WHERE d.webhook = $1 AND {PENDING} AND d.created_at <= $5
                                    FOR UPDATE SKIP LOCKED)
                      RETURNING id"
                ))
                .bind(webhook)
                .bind(now)
                .bind(status)
                .bind(&outcome.error)
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
            }
            // The webhook's other pending deliveries wait as long: a receiver that is down or
            // hangs is tried once per backoff, not once per notification. A refusal concerns
            // its own delivery only: the receiver is up, the next ones go on.
            sqlx::query(&format!(
                "UPDATE alert_deliveries SET next_attempt_at = $2
                  WHERE id IN (SELECT d.id FROM alert_deliveries d
                                WHERE d.webhook = $1 AND {PENDING} AND d.next_attempt_at < $2
                                  FOR UPDATE SKIP LOCKED)"
            ))
            .bind(webhook)
            .bind(next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if park {
            let why = if refused_enough {
                "refused alerts.max_attempts times"
            } else {
                "still failing after alerts.max_age"
            };
            tracing::error!(
                %webhook, %kind, delivery_id = id, incident_id, attempts, status,
                error = %outcome.error, why,
                "webhook delivery parked: it will not be tried again"
            );
            let n = 1 + others.len() as u64;
            if n > 1 {
                tracing::error!(
                    %webhook, parked = n - 1, why,
                    "the webhook's other notifications as old are parked too"
                );
            }
            self.metrics.parked.with_label_values(&[webhook]).inc_by(n);
            report.parked += n;
        } else {
            tracing::warn!(
                %webhook, %kind, delivery_id = id, attempts, refusals, status,
                retry_in_ms = delay.as_millis() as u64, error = %outcome.error,
                "webhook delivery failed; will retry"
            );
        }
        Ok(if outcome.refused {
            Handled::Done
        } else {
            Handled::Failed
        })
    }

    /// Marks delivery `id` parked now, with why.
    async fn park(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        id: i64,
        status: Option<i32>,
        error: &str,
    ) -> Result<(), AlertError> {
        sqlx::query(
            "UPDATE alert_deliveries SET parked_at = $2, last_status = $3, last_error = $4
              WHERE id = $1",
        )
        .bind(id)
        .bind(self.clock.now())
        .bind(status)
        .bind(error)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Counts a committed parking of one delivery.
    fn parked(&self, webhook: &str, report: &mut SendReport) {
        self.metrics.parked.with_label_values(&[webhook]).inc();
        report.parked += 1;
    }

    async fn post(
        &self,
        hook: &Hook,
        kind: &str,
        key: &str,
        content_type: &str,
        body: String,
    ) -> Attempt {
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
        let mut response = match request.body(body).send().await {
            Ok(response) => response,
            Err(e) => {
                return Attempt::Failed {
                    status: None,
                    error: format!("request failed: {}", request_error(url, e)),
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Sent;
        }
        // Why, in the receiver's words: the start of its answer.
        let mut excerpt = Vec::new();
        let mut more = false;
        while let Ok(Some(chunk)) = response.chunk().await {
            excerpt.extend_from_slice(&chunk);
            if excerpt.len() > ERROR_BODY_BYTES {
                more = true;
                break;
            }
        }
        let error = answer_error(url, status, &excerpt, more);
        if refusal(status) {
            Attempt::Refused {
                status: status.as_u16(),
                error,
            }
        } else {
            Attempt::Failed {
                status: Some(status.as_u16()),
                error,
            }
        }
    }

    /// Updates the pending- and parked-deliveries gauges.
    pub async fn refresh_pending(&self) -> Result<(), AlertError> {
        let (pending, parked): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE parked_at IS NULL),
                    count(*) FILTER (WHERE parked_at IS NOT NULL)
               FROM alert_deliveries WHERE sent_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        self.metrics.pending.set(pending);
        self.metrics.parked_now.set(parked);
        Ok(())
    }
}

/// What one attempt of one delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// A 2xx answer.
    Sent,
    /// A 4xx answer other than 408 (Request Timeout) and 429 (Too Many Requests): the
    /// receiver got this request and turned it down. Counted against `max_attempts`.
    Refused { status: u16, error: String },
    /// No answer (connection, TLS, timeout) or any other status: the receiver may be down or
    /// busy, so its other deliveries wait for the backoff too.
    Failed { status: Option<u16>, error: String },
}

/// A failed attempt, as stored.
struct Failure {
    status: Option<u16>,
    refused: bool,
    error: String,
}

/// Whether `status` refuses the delivery itself rather than saying "not now".
fn refusal(status: reqwest::StatusCode) -> bool {
    status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// `POST <redacted url>: receiver answered <status>: <first bytes of its answer>`, on one line,
/// the webhook URL's credentials and path replaced by `***` should the answer repeat them.
fn answer_error(url: &str, status: reqwest::StatusCode, excerpt: &[u8], more: bool) -> String {
    let mut error = format!(
        "POST {}: receiver answered {status}",
        super::client::redact_url(url)
    );
    let cut = &excerpt[..excerpt.len().min(ERROR_BODY_BYTES)];
    let text = String::from_utf8_lossy(cut);
    let mut text = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if let Ok(parsed) = reqwest::Url::parse(url) {
        let path = parsed.path().trim_end_matches('/');
        for secret in [Some(parsed.username()), parsed.password(), Some(path)]
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 3)
        {
            text = text.replace(secret, "***");
        }
    }
    if !text.is_empty() {
        error.push_str(": ");
        error.push_str(&text);
        if more || cut.len() < excerpt.len() {
            error.push('…');
        }
    }
    error
}

/// What [`Sender::deliver_one`] did with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Not due any more, or held by another sender.
    Skipped,
    /// Sent, refused (and retried later or parked) or parked.
    Done,
    /// Failed as a whole receiver fails: the webhook's other deliveries wait.
    Failed,
}

/// What one batch of one webhook did.
#[derive(Debug, Clone, Copy)]
struct HookRound {
    /// Deliveries handled.
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
    fn only_4xx_other_than_408_and_429_is_a_refusal() {
        use reqwest::StatusCode;
        for code in [400, 401, 403, 404, 410, 413, 422] {
            assert!(refusal(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504, 302] {
            assert!(!refusal(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn a_refusal_is_shown_on_one_line_cut_and_without_the_url_secrets() {
        let url = "https://bot:pa55word@hooks.internal/services/T0/B1/secret-path";
        let status = reqwest::StatusCode::NOT_FOUND;
        let answer = b"no_service\r\n\tpath /services/T0/B1/secret-path unknown; bot:pa55word";
        assert_eq!(
            answer_error(url, status, answer, false),
            "POST https://***@hooks.internal/…: receiver answered 404 Not Found: \
             no_service path *** unknown; ***:***"
        );
        assert_eq!(
            answer_error(url, status, b"", false),
            "POST https://***@hooks.internal/…: receiver answered 404 Not Found"
        );
        // Cut after ERROR_BODY_BYTES, inside a character if need be.
        let long = "é".repeat(ERROR_BODY_BYTES);
        let shown = answer_error(url, status, long.as_bytes(), true);
        let text = shown.split_once("Not Found: ").unwrap().1;
        assert!(text.ends_with('…'), "{shown}");
        assert!(text.len() <= ERROR_BODY_BYTES + '�'.len_utf8() + '…'.len_utf8());
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
