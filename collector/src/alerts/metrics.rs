//! Prometheus metrics of the alert sender (namespace `chaperone`, subsystem `alerts`).

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
                "webhook_deliveries_total",
                "Webhook delivery attempts by webhook and result (sent or failed)",
            )
            .namespace("chaperone")
            .subsystem("alerts"),
            &["webhook", "result"],
        )?;
        let pending = IntGauge::with_opts(
            Opts::new(
                "pending_deliveries",
                "Webhook notifications not yet delivered",
            )
            .namespace("chaperone")
            .subsystem("alerts"),
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Self {
            deliveries,
            pending,
        })
    }
}
