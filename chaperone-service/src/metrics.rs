//! Prometheus metrics of the service, registered on an explicit [`Registry`]: every name is
//! `chaperone_service_*` ([`NAMESPACE`], [`SUBSYSTEM`]), `_total` on counters only, base units
//! in the name, and the consumer lag named as in the collector (`consumer_lag_messages`).
//! Message counters are published per committed flush, never per message, so they agree with
//! what reached the audit topic.

use std::collections::HashSet;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub use chaperone_audit::metrics::NAMESPACE;
/// Subsystem of the service's metrics.
pub const SUBSYSTEM: &str = "service";

/// Every metric of the service.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Messages audited (committed), by tier.
    pub messages: IntCounterVec,
    /// Of those, messages without a usable event time.
    pub no_timestamp: IntCounterVec,
    /// Of those, messages whose payload could not be parsed.
    pub malformed: IntCounterVec,
    /// Payload bytes audited.
    pub bytes: IntCounterVec,
    /// Transactions by result (`committed`, `aborted`).
    pub transactions: IntCounterVec,
    /// Audit records written in committed transactions, by kind.
    pub records: IntCounterVec,
    /// Rebalance events by kind (`assign`, `revoke`, `lost`, `error`).
    pub rebalances: IntCounterVec,
    /// Consumer lag in messages per audited partition (capped, see `metrics.max_lag_series`).
    pub lag: IntGaugeVec,
    /// Consumer lag in messages over all assigned partitions.
    pub lag_total: IntGauge,
    /// Partitions currently assigned.
    pub assigned_partitions: IntGauge,
    /// Topics currently subscribed.
    pub subscribed_topics: IntGauge,
    /// Duration of each flush (produce + send offsets + commit).
    pub flush_duration: Histogram,
    /// Topics that use LogAppendTime (their record timestamps are not event times).
    pub log_append_time_topics: IntCounter,
    /// Flushes started before `flush_interval` was up because the open counts reached
    /// `open_cells_max_bytes`.
    pub early_flushes: IntCounter,
    /// Estimated memory of the open counts when the last flush drained them.
    pub open_cells_bytes: IntGauge,
    tier: String,
    max_lag_series: usize,
    lag_series: std::sync::Arc<std::sync::Mutex<HashSet<(String, i32)>>>,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(
        registry: &Registry,
        tier: &str,
        max_lag_series: usize,
    ) -> Result<Self, prometheus::Error> {
        let (ns, sub) = (NAMESPACE, SUBSYSTEM);
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help).namespace(ns).subsystem(sub), labels)
        };
        let m = Self {
            messages: counter("messages_total", "Messages audited, by tier", &["tier"])?,
            no_timestamp: counter(
                "no_timestamp_total",
                "Messages audited without a usable event time",
                &["tier"],
            )?,
            malformed: counter(
                "malformed_total",
                "Messages whose payload could not be parsed for an event time",
                &["tier"],
            )?,
            bytes: counter("bytes_total", "Payload bytes audited", &["tier"])?,
            transactions: counter(
                "transactions_total",
                "Kafka transactions by result",
                &["result"],
            )?,
            records: counter(
                "audit_records_total",
                "Audit records written in committed transactions",
                &["kind"],
            )?,
            rebalances: counter("rebalances_total", "Consumer group rebalances", &["kind"])?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "partition_consumer_lag_messages",
                    "Messages not yet audited per partition (capped number of series)",
                )
                .namespace(ns)
                .subsystem(sub),
                &["topic", "partition"],
            )?,
            lag_total: IntGauge::with_opts(
                Opts::new(
                    "consumer_lag_messages",
                    "Messages not yet audited, all assigned partitions",
                )
                .namespace(ns)
                .subsystem(sub),
            )?,
            assigned_partitions: IntGauge::with_opts(
                Opts::new(
                    "assigned_partitions",
                    "Partitions assigned to this instance",
                )
                .namespace(ns)
                .subsystem(sub),
            )?,
            subscribed_topics: IntGauge::with_opts(
                Opts::new("subscribed_topics", "Topics subscribed by this instance")
                    .namespace(ns)
                    .subsystem(sub),
            )?,
            flush_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "flush_duration_seconds",
                    "Duration of each flush transaction",
                )
                .namespace(ns)
                .subsystem(sub)
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            log_append_time_topics: IntCounter::with_opts(
                Opts::new(
                    "log_append_time_topics_total",
                    "Topics found to use LogAppendTime timestamps",
                )
                .namespace(ns)
                .subsystem(sub),
            )?,
            early_flushes: IntCounter::with_opts(
                Opts::new(
                    "early_flushes_total",
                    "Flushes started early because the open counts reached open_cells_max_bytes",
                )
                .namespace(ns)
                .subsystem(sub),
            )?,
            open_cells_bytes: IntGauge::with_opts(
                Opts::new(
                    "open_cells_bytes",
                    "Estimated memory of the open counts when the last flush drained them",
                )
                .namespace(ns)
                .subsystem(sub),
            )?,
            tier: tier.to_owned(),
            max_lag_series,
            lag_series: Default::default(),
        };
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.no_timestamp.clone()))?;
        registry.register(Box::new(m.malformed.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.transactions.clone()))?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.rebalances.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.lag_total.clone()))?;
        registry.register(Box::new(m.assigned_partitions.clone()))?;
        registry.register(Box::new(m.subscribed_topics.clone()))?;
        registry.register(Box::new(m.flush_duration.clone()))?;
        registry.register(Box::new(m.log_append_time_topics.clone()))?;
        registry.register(Box::new(m.early_flushes.clone()))?;
        registry.register(Box::new(m.open_cells_bytes.clone()))?;
        // Create the series up front so dashboards see zeros, not gaps.
        for result in ["committed", "aborted"] {
            m.transactions.with_label_values(&[result]);
        }
        for v in [&m.messages, &m.no_timestamp, &m.malformed, &m.bytes] {
            v.with_label_values(&[tier]);
        }
        Ok(m)
    }

    /// Publishes what one committed flush audited.
    pub fn committed(&self, messages: u64, bytes: u64, no_timestamp: u64, malformed: u64) {
        let t = [self.tier.as_str()];
        self.messages.with_label_values(&t).inc_by(messages);
        self.bytes.with_label_values(&t).inc_by(bytes);
        self.no_timestamp.with_label_values(&t).inc_by(no_timestamp);
        self.malformed.with_label_values(&t).inc_by(malformed);
    }

    /// Replaces the per-partition lag series with `lags`, keeping at most the configured
    /// number of series.
    pub fn set_lags(&self, lags: &[(String, i32, i64)]) {
        let mut series = match self.lag_series.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let keep: HashSet<(String, i32)> = lags
            .iter()
            .take(self.max_lag_series)
            .map(|(t, p, _)| (t.clone(), *p))
            .collect();
        for (t, p) in series.iter() {
            if !keep.contains(&(t.clone(), *p)) {
                let _ = self.lag.remove_label_values(&[t, &p.to_string()]);
            }
        }
        let mut total = 0i64;
        for (i, (t, p, lag)) in lags.iter().enumerate() {
            total = total.saturating_add(*lag);
            if i < self.max_lag_series {
                self.lag.with_label_values(&[t, &p.to_string()]).set(*lag);
            }
        }
        self.lag_total.set(total);
        *series = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder as _;

    #[test]
    fn lag_series_are_capped_and_removed() {
        let r = Registry::new();
        let m = Metrics::new(&r, "regional", 2).expect("metrics");
        m.set_lags(&[("a".into(), 0, 5), ("a".into(), 1, 7), ("b".into(), 0, 1)]);
        assert_eq!(m.lag_total.get(), 13);
        assert_eq!(m.lag.with_label_values(&["a", "1"]).get(), 7);
        m.set_lags(&[("b".into(), 0, 2)]);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .expect("encode");
        let text = String::from_utf8(buf).expect("utf8");
        assert!(text.contains(
            "chaperone_service_partition_consumer_lag_messages{partition=\"0\",topic=\"b\"} 2"
        ));
        assert!(
            text.contains("chaperone_service_consumer_lag_messages 2"),
            "{text}"
        );
        assert!(!text.contains("topic=\"a\""), "{text}");
    }
}
