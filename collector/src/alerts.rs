//! Alerts: incidents of bad verdicts, notified to webhooks through a transactional outbox.
//!
//! The reconciler records incidents and writes an event into `alert_events` through
//! [`Incidents`] (its [`crate::reconcile::IncidentRecorder`]), in the same transaction as the
//! verdict change that caused it. This module's
//! sender then
//! * fans events out into `alert_deliveries`, one per matching webhook, at most one `firing`
//!   and one `resolved` per webhook and incident (a `resolved` only where a `firing` went);
//! * locks each due delivery with `FOR UPDATE SKIP LOCKED` in a transaction of its own, POSTs
//!   it (signed with HMAC-SHA256 when the webhook has a secret, with an `Idempotency-Key`
//!   header that is the same on every retry) and commits it as sent right after the answer, or
//!   schedules a retry with capped exponential backoff. A crash or an unreachable receiver
//!   loses nothing: rows stay pending; a crash between an answer and its commit sends that one
//!   delivery again.
//! * parks a delivery the receiver refused (4xx other than 408 and 429) `max_attempts` times,
//!   or one still failing `max_age` after it was created: it is not tried again, and the API,
//!   the incident page and the metrics show it with the last status and error.
//!
//! * [`config`]: webhooks, filters, secrets, retry policy ([`AlertsConfig`]).
//! * [`client`]: each webhook's HTTPS client (rustls, `ca_file`) and URL redaction.
//! * [`payload`]: the JSON and Slack bodies.
//! * `sender`: fan-out and delivery.
//! * [`query`]: what the API serves ([`list_alerts`]).

pub mod client;
pub mod config;
pub mod incidents;
pub mod metrics;
pub mod payload;
pub mod query;
mod sender;

use std::time::Duration;

use anyhow::Context;
use chaperone_daemon_support::Clock;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::job::{First, Pace, Periodic};

pub use config::{AlertsConfig, Secret, WebhookConfig, WebhookFilters, WebhookFormat};

use crate::store::{Cutoff, Prune};

/// Retention of the alerts' tables: incidents resolved before the cutoff, their notifications
/// first (deliveries, then events), then the incidents themselves.
pub const PRUNE: &[Prune] = &[
    Prune::sql(
        "alert_deliveries",
        Cutoff::Touched,
        "DELETE FROM alert_deliveries WHERE id IN (SELECT d.id FROM alert_deliveries d
                JOIN alert_incidents i ON i.id = d.incident_id
               WHERE i.status <> 'open' AND i.resolved_at < $1 LIMIT $2)",
    ),
    Prune::sql(
        "alert_events",
        Cutoff::Touched,
        "DELETE FROM alert_events WHERE id IN (SELECT e.id FROM alert_events e
                JOIN alert_incidents i ON i.id = e.incident_id
               WHERE i.status <> 'open' AND i.resolved_at < $1
                 AND NOT EXISTS (SELECT 1 FROM alert_deliveries d WHERE d.event_id = e.id)
               LIMIT $2)",
    ),
    Prune::sql(
        "alert_incidents",
        Cutoff::Touched,
        "DELETE FROM alert_incidents WHERE id IN (SELECT i.id FROM alert_incidents i
               WHERE i.status <> 'open' AND i.resolved_at < $1
                 AND NOT EXISTS (SELECT 1 FROM alert_events e WHERE e.incident_id = i.id)
               LIMIT $2)",
    ),
];
pub use incidents::{IncidentError, Incidents};
pub use metrics::AlertMetrics;
pub use payload::{NotificationKind, SlackBody, WebhookBody};
pub use query::{Delivery, Incident, IncidentStatus, list_alerts};
pub use sender::{
    AlertError, ERROR_BODY_BYTES, EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SendReport,
    TIMESTAMP_HEADER, signature,
};

/// How much longer than `request_timeout` a stopping sender waits for its round to end.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Delivers outbox events to the configured webhooks.
#[derive(Debug)]
pub struct AlertSender {
    inner: sender::Sender,
}

impl AlertSender {
    /// Builds a sender: validates `config`, reads the webhook secrets and builds each
    /// webhook's HTTP client. Fails naming the config key whose secret or CA file cannot be
    /// read.
    pub fn new(
        pool: PgPool,
        config: AlertsConfig,
        clock: Clock,
        metrics: AlertMetrics,
    ) -> anyhow::Result<Self> {
        config.validate().context("alerts configuration")?;
        let hooks = config
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Ok(sender::Hook {
                    config: w.clone(),
                    secret: w.load_secret(i)?,
                    client: client::build_client(&config, w, i)?,
                })
            })
            .collect::<Result<Vec<_>, crate::model::ConfigError>>()
            .context("alerts configuration")?;
        for hook in &hooks {
            // At 0 from the start, so that the first parking is an increase.
            metrics
                .parked
                .with_label_values(&[hook.config.name.as_str()]);
            tracing::info!(
                webhook = %hook.config.name,
                url = %client::redact_url(&hook.config.url),
                signed = hook.secret.is_some(),
                private_ca = hook.config.ca_file.is_some(),
                "webhook configured"
            );
        }
        Ok(Self {
            inner: sender::Sender {
                pool,
                config,
                hooks,
                clock,
                metrics,
            },
        })
    }

    /// One round: fans out every pending event, then sends due deliveries until none is left
    /// or none goes through (failed ones wait for their backoff).
    pub async fn run_once(&self) -> Result<SendReport, AlertError> {
        self.round(&CancellationToken::new()).await
    }

    /// [`Self::run_once`], starting no further POST once `stop` is cancelled: a POST in
    /// flight then ends with its answer (or the request timeout) and its outcome is committed.
    async fn round(&self, stop: &CancellationToken) -> Result<SendReport, AlertError> {
        let mut report = SendReport::default();
        self.inner.fan_out(&mut report).await?;
        // Keep going while deliveries go through: a sent firing may unblock its resolved.
        while !stop.is_cancelled() {
            let sent_before = report.sent;
            let claimed = self.inner.deliver_batch(&mut report, stop).await?;
            if claimed == 0 || report.sent == sent_before {
                break;
            }
        }
        self.inner.refresh_pending().await?;
        Ok(report)
    }
}

/// Runs the alert sender on the system clock until `shutdown` is cancelled.
pub async fn run(
    pool: PgPool,
    config: AlertsConfig,
    metrics: AlertMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(pool, config, Clock::system(), metrics, shutdown).await
}

/// Runs the alert sender on `clock` until `shutdown` is cancelled (for a leader, when its
/// leadership ends). Database or receiver failures are logged and retried. At shutdown no
/// further POST starts, and those in flight are given `request_timeout` and a margin to be
/// answered and committed, so that the next leader does not send them again; one still
/// unanswered or uncommitted after that is abandoned (it rolls back to pending and is sent
/// again, with the same idempotency key).
pub async fn run_with_clock(
    pool: PgPool,
    config: AlertsConfig,
    clock: Clock,
    metrics: AlertMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !config.enabled {
        config.validate().context("alerts configuration")?;
        tracing::info!("alerts disabled");
        shutdown.cancelled().await;
        return Ok(());
    }
    let poll: Duration = config.poll_interval;
    let sender = AlertSender::new(pool, config, clock, metrics)?;
    tracing::info!(
        webhooks = sender.inner.hooks.len(),
        poll_ms = poll.as_millis() as u64,
        "alert sender started"
    );
    let job = Periodic {
        failed: Some("alert round failed; retrying"),
        abandoned: "alert round still busy at shutdown; abandoned (a delivery in flight stays \
                    pending and is sent again)",
        pace: Pace::After(poll),
        first: First::Now,
        finish_within: Some(sender.inner.config.request_timeout + STOP_MARGIN),
        runs: Some(sender.inner.metrics.rounds.clone()),
    };
    let (sender, stop) = (&sender, &shutdown);
    job.run(&shutdown, move || async move {
        sender.round(stop).await.map(|_| ())
    })
    .await;
    tracing::info!("alert sender stopped");
    Ok(())
}
