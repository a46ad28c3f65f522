//! Alerts: incidents of bad verdicts, notified to webhooks through a transactional outbox.
//!
//! The reconciler records incidents and writes an event into `alert_events` through
//! `incidents`, in the same transaction as the verdict change that caused it. This module's
//! sender then
//! * fans events out into `alert_deliveries`, one per matching webhook, at most one `firing`
//!   and one `resolved` per webhook and incident (a `resolved` only where a `firing` went);
//! * claims due deliveries with `FOR UPDATE SKIP LOCKED`, POSTs them (signed with
//!   HMAC-SHA256 when the webhook has a secret, with an `Idempotency-Key` header that is the
//!   same on every retry) and marks them sent, or schedules a retry with capped exponential
//!   backoff. A crash or an unreachable receiver loses nothing: rows stay pending.
//!
//! * [`config`]: webhooks, filters, secrets, retry policy ([`AlertsConfig`]).
//! * [`client`]: each webhook's HTTPS client (rustls, `ca_file`) and URL redaction.
//! * [`payload`]: the JSON and Slack bodies.
//! * `sender`: fan-out and delivery.
//! * [`query`]: what the API serves ([`list_alerts`]).

pub mod client;
pub mod config;
pub(crate) mod incidents;
pub mod metrics;
pub mod payload;
pub mod query;
mod sender;

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::{AlertsConfig, Secret, WebhookConfig, WebhookFilters, WebhookFormat};
pub use metrics::AlertMetrics;
pub use payload::{NotificationKind, SlackBody, WebhookBody};
pub use query::{Alert, Delivery, IncidentStatus, list_alerts};
pub use sender::{
    AlertError, EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SendReport, TIMESTAMP_HEADER,
    signature,
};

use crate::Clock;

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
            .collect::<Result<Vec<_>, crate::reconcile::ConfigError>>()
            .context("alerts configuration")?;
        for hook in &hooks {
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
        let mut report = SendReport::default();
        self.inner.fan_out(&mut report).await?;
        // Keep going while deliveries go through: a sent firing may unblock its resolved.
        loop {
            let sent_before = report.sent;
            let claimed = self.inner.deliver_batch(&mut report).await?;
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

/// Runs the alert sender on `clock` until `shutdown` is cancelled. Database or receiver
/// failures are logged and retried; a round in progress at shutdown is abandoned (claimed
/// deliveries roll back to pending).
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
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            result = sender.run_once() => {
                if let Err(error) = result {
                    tracing::warn!(%error, "alert round failed; retrying");
                }
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(poll) => {}
        }
    }
    tracing::info!("alert sender stopped");
    Ok(())
}
