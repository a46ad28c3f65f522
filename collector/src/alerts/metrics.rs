//! Prometheus metrics of the alert sender: `chaperone_collector_alerts_*`, see
//! [`crate::metrics`] for the naming rule.

use crate::metrics::{NAMESPACE, SUBSYSTEM};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The alert sender's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct AlertMetrics {
    /// Webhook delivery attempts by webhook name (from config, so bounded) and result
    /// (`sent` or `failed`).
    pub deliveries: IntCounterVec,
    /// Deliveries not yet sent and not parked.
    pub pending: IntGauge,
    /// Deliveries parked, by webhook: refused `max_attempts` times or still failing after
    /// `max_age`; never tried again.
    pub parked: IntCounterVec,
    /// Parked deliveries stored (until retention deletes their incident).
    pub parked_now: IntGauge,
    /// Rounds of the sender (fan-out and deliveries), by result (`ok`, `error`).
    pub rounds: IntCounterVec,
}

impl AlertMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "alerts_webhook_deliveries_total",
                "Webhook delivery attempts by webhook and result (sent or failed)",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
            &["webhook", "result"],
        )?;
        let pending = IntGauge::with_opts(
            Opts::new(
                "alerts_pending_deliveries",
                "Webhook notifications not yet delivered and not parked",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
        )?;
        let parked = IntCounterVec::new(
            Opts::new(
                "alerts_webhook_deliveries_parked_total",
                "Webhook notifications parked by webhook: refused max_attempts times or still \
                 failing after max_age, never tried again",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
            &["webhook"],
        )?;
        let parked_now = IntGauge::with_opts(
            Opts::new(
                "alerts_parked_deliveries",
                "Webhook notifications parked and still stored",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
        )?;
        let rounds = IntCounterVec::new(
            Opts::new(
                "alerts_rounds_total",
                "Rounds of the alert sender by result (ok or error)",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
            &["result"],
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(rounds.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(parked.clone()))?;
        registry.register(Box::new(parked_now.clone()))?;
        Ok(Self {
            deliveries,
            pending,
            parked,
            parked_now,
            rounds,
        })
    }
}
