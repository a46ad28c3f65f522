//! Prometheus metrics of the ingest pipeline, registered on an explicit [`Registry`].
//!
//! Other parts of the collector (reconciliation, alerts) register their own metric structs
//! on the same registry, which `/metrics` serves. Every name is `chaperone_collector_*`
//! ([`NAMESPACE`], [`SUBSYSTEM`]); the reconciler's and the alert sender's go on with their
//! stage (`chaperone_collector_reconcile_*`, `chaperone_collector_alerts_*`). `_total` is on
//! counters only, base units are in the name (durations `_duration_seconds`), and the consumer
//! lag is named as in chaperone-service (`consumer_lag_messages`).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub use chaperone_audit::metrics::NAMESPACE;
/// Subsystem of the collector's metrics.
pub const SUBSYSTEM: &str = "collector";

/// Metrics of consuming, validating and storing audit records.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Audit records applied to the store, by kind (`counts`, `progress`).
    pub records_ingested: IntCounterVec,
    /// Counts records skipped because their id was already applied.
    pub records_duplicate: IntCounter,
    /// Records that failed validation and went to the dead-letter topic, by reason.
    pub records_rejected: IntCounterVec,
    /// Rejected records the dead-letter topic did not take, parked in PostgreSQL
    /// (`ingest_parked`), by reason.
    pub records_parked: IntCounterVec,
    /// Batches committed to PostgreSQL.
    pub batches: IntCounter,
    /// Time from a batch being complete to its transaction committing (includes retries).
    pub batch_seconds: Histogram,
    /// Records per committed batch.
    pub batch_records: Histogram,
    /// Failed attempts to write a batch or its dead-letter records, by target
    /// (`postgres`, `dlq`).
    pub write_failures: IntCounterVec,
    /// Messages (audit records) in the audit topic not yet stored (high watermark minus
    /// stored offset), by cluster alias.
    pub lag_records: IntGaugeVec,
    /// Partitions of the audit topic being read, by cluster alias.
    pub partitions: IntGaugeVec,
    /// Errors reported by librdkafka, by cluster alias.
    pub kafka_errors: IntCounterVec,
    /// Records dropped unapplied because another collector had taken their audit partition
    /// over (that collector applies them).
    pub records_dropped: IntCounter,
    /// 1 while this instance leads (reconciles, sends alerts, applies retention).
    pub leader: IntGauge,
    /// Rows deleted by the retention job, by table.
    pub retention_deleted: IntCounterVec,
    /// Runs of the retention job, by result (`ok`, `error`).
    pub retention_runs: IntCounterVec,
    /// Checks of the leader's database session while leading, by result (`ok`, `error`:
    /// the session is lost and leadership ends).
    pub leader_checks: IntCounterVec,
    /// Time to run `/api` queries, by route.
    pub api_seconds: HistogramVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace(NAMESPACE)
        .subsystem(SUBSYSTEM)
}

fn hopts(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .subsystem(SUBSYSTEM)
        .buckets(buckets)
}

impl IngestMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            records_ingested: IntCounterVec::new(
                opts(
                    "records_ingested_total",
                    "Audit records applied to the store",
                ),
                &["kind"],
            )?,
            records_duplicate: IntCounter::with_opts(opts(
                "records_duplicate_total",
                "Counts records ignored because their id was already applied",
            ))?,
            records_rejected: IntCounterVec::new(
                opts(
                    "records_rejected_total",
                    "Audit records that failed validation and were sent to the dead-letter topic",
                ),
                &["reason"],
            )?,
            records_parked: IntCounterVec::new(
                opts(
                    "records_parked_total",
                    "Rejected audit records the dead-letter topic did not take, parked in PostgreSQL",
                ),
                &["reason"],
            )?,
            batches: IntCounter::with_opts(opts(
                "batches_total",
                "Ingest batches committed to PostgreSQL",
            ))?,
            batch_seconds: Histogram::with_opts(hopts(
                "batch_duration_seconds",
                "Time to make a batch durable, retries included",
                prometheus::exponential_buckets(0.001, 2.0, 16)?,
            ))?,
            batch_records: Histogram::with_opts(hopts(
                "batch_records",
                "Records per committed ingest batch",
                prometheus::exponential_buckets(1.0, 4.0, 9)?,
            ))?,
            write_failures: IntCounterVec::new(
                opts(
                    "write_failures_total",
                    "Failed attempts to make an ingest batch durable",
                ),
                &["target"],
            )?,
            lag_records: IntGaugeVec::new(
                opts(
                    "consumer_lag_messages",
                    "Audit records in the audit topic not yet stored in PostgreSQL",
                ),
                &["cluster"],
            )?,
            partitions: IntGaugeVec::new(
                opts(
                    "assigned_partitions",
                    "Partitions of the audit topic being read",
                ),
                &["cluster"],
            )?,
            kafka_errors: IntCounterVec::new(
                opts("kafka_errors_total", "Errors reported by librdkafka"),
                &["cluster"],
            )?,
            records_dropped: IntCounter::with_opts(opts(
                "records_dropped_total",
                "Audit records dropped unapplied because another collector took their audit partition over",
            ))?,
            leader: IntGauge::with_opts(opts(
                "leader",
                "1 while this collector reconciles, sends alerts and applies retention",
            ))?,
            retention_deleted: IntCounterVec::new(
                opts(
                    "retention_deleted_rows_total",
                    "Rows deleted by the retention job",
                ),
                &["table"],
            )?,
            retention_runs: IntCounterVec::new(
                opts(
                    "retention_runs_total",
                    "Runs of the retention job by result (ok or error)",
                ),
                &["result"],
            )?,
            leader_checks: IntCounterVec::new(
                opts(
                    "leader_checks_total",
                    "Checks of the leader's database session while leading, by result (ok, or \
                     error: leadership ends)",
                ),
                &["result"],
            )?,
            api_seconds: HistogramVec::new(
                hopts(
                    "api_request_duration_seconds",
                    "Time to answer API requests",
                    prometheus::exponential_buckets(0.001, 2.0, 14)?,
                ),
                &["route"],
            )?,
        };
        registry.register(Box::new(m.records_ingested.clone()))?;
        registry.register(Box::new(m.records_duplicate.clone()))?;
        registry.register(Box::new(m.records_rejected.clone()))?;
        registry.register(Box::new(m.records_parked.clone()))?;
        registry.register(Box::new(m.batches.clone()))?;
        registry.register(Box::new(m.batch_seconds.clone()))?;
        registry.register(Box::new(m.batch_records.clone()))?;
        registry.register(Box::new(m.write_failures.clone()))?;
        registry.register(Box::new(m.lag_records.clone()))?;
        registry.register(Box::new(m.partitions.clone()))?;
        registry.register(Box::new(m.kafka_errors.clone()))?;
        registry.register(Box::new(m.records_dropped.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.retention_deleted.clone()))?;
        registry.register(Box::new(m.retention_runs.clone()))?;
        registry.register(Box::new(m.leader_checks.clone()))?;
        registry.register(Box::new(m.api_seconds.clone()))?;
        Ok(m)
    }
}

/// Renders every metric of `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder as _;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_the_namespace() {
        let registry = Registry::new();
        let m = IngestMetrics::register(&registry).expect("registers");
        m.records_rejected.with_label_values(&["json"]).inc();
        m.records_ingested.with_label_values(&["counts"]).inc_by(3);
        let text = render(&registry);
        assert!(text.contains("chaperone_collector_records_rejected_total{reason=\"json\"} 1"));
        assert!(text.contains("chaperone_collector_records_ingested_total{kind=\"counts\"} 3"));
        assert!(
            IngestMetrics::register(&registry).is_err(),
            "double registration fails"
        );
    }
}
