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
    /// Deliveries not yet sent.
    pub pending: IntGauge,
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
                "Webhook notifications not yet delivered",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Self {
            deliveries,
            pending,
        })
    }
}
