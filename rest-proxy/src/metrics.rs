//! Prometheus metrics of the proxy, registered on an explicit [`Registry`]: every name is
//! `chaperone_rest_proxy_*` ([`NAMESPACE`], [`SUBSYSTEM`]), `_total` on counters only, base
//! units in the name. Labels are bounded: `endpoint` is one of the routes' fixed names, never a
//! topic, and `code` an HTTP status. The audit library's own `chaperone_audit_*` metrics are
//! registered on the same registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub use chaperone_audit::metrics::NAMESPACE;
/// Subsystem of the proxy's metrics.
pub const SUBSYSTEM: &str = "rest_proxy";

/// Every metric of the proxy.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests answered, by endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Time from a request's arrival to its answer, by endpoint.
    pub request_duration: HistogramVec,
    /// Records by outcome: `acked` (Kafka acknowledged them), `failed` (refused or timed out).
    pub records: IntCounterVec,
    /// Payload bytes (key and value) of acknowledged records.
    pub acked_bytes: IntCounter,
    /// Requests refused before producing, by reason (`in_flight_bytes`, `too_large`,
    /// `unauthorized`).
    pub rejected: IntCounterVec,
    /// Bytes of requests being produced now (bounded by `max_in_flight_bytes`).
    pub in_flight_bytes: IntGauge,
    /// Requests answered from the idempotency window without producing.
    pub idempotent_replays: IntCounter,
    /// Keys held in the idempotency window.
    pub idempotency_keys: IntGauge,
    /// Bytes held by the idempotency window (responses plus bookkeeping).
    pub idempotency_bytes: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let (ns, sub) = (NAMESPACE, SUBSYSTEM);
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(ns).subsystem(sub);
        let m = Self {
            requests: IntCounterVec::new(
                opts(
                    "requests_total",
                    "Requests answered, by endpoint and HTTP status",
                ),
                &["endpoint", "code"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Time from a request's arrival to its answer, by endpoint",
                )
                .namespace(ns)
                .subsystem(sub)
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
                &["endpoint"],
            )?,
            records: IntCounterVec::new(
                opts(
                    "records_total",
                    "Records produced, by outcome (acked, failed)",
                ),
                &["result"],
            )?,
            acked_bytes: IntCounter::with_opts(opts(
                "acked_bytes_total",
                "Key and value bytes of the records Kafka acknowledged",
            ))?,
            rejected: IntCounterVec::new(
                opts(
                    "rejected_requests_total",
                    "Requests refused before producing, by reason",
                ),
                &["reason"],
            )?,
            in_flight_bytes: IntGauge::with_opts(opts(
                "in_flight_bytes",
                "Bytes of requests being produced now",
            ))?,
            idempotent_replays: IntCounter::with_opts(opts(
                "idempotent_replays_total",
                "Requests answered from the idempotency window without producing",
            ))?,
            idempotency_keys: IntGauge::with_opts(opts(
                "idempotency_keys",
                "Keys held in the idempotency window",
            ))?,
            idempotency_bytes: IntGauge::with_opts(opts(
                "idempotency_bytes",
                "Bytes held by the idempotency window",
            ))?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.acked_bytes.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.in_flight_bytes.clone()))?;
        registry.register(Box::new(m.idempotent_replays.clone()))?;
        registry.register(Box::new(m.idempotency_keys.clone()))?;
        registry.register(Box::new(m.idempotency_bytes.clone()))?;
        for result in ["acked", "failed"] {
            m.records.with_label_values(&[result]);
        }
        for reason in ["in_flight_bytes", "too_large", "unauthorized"] {
            m.rejected.with_label_values(&[reason]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_chaperone_rest_proxy() {
        let registry = Registry::new();
        let _m = Metrics::new(&registry).unwrap();
        let families = registry.gather();
        assert!(!families.is_empty());
        for f in families {
            assert!(
                f.name().starts_with("chaperone_rest_proxy_"),
                "{}",
                f.name()
            );
        }
    }
}
