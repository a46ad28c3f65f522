//! Prometheus metrics of in-producer auditing, registered in a registry the application
//! hands in (never the global one). All names start with `chaperone_audit_` ([`NAMESPACE`],
//! shared by every Chaperone crate, then [`SUBSYSTEM`]), follow Prometheus conventions
//! (`_total` on counters and only there, base units in the name) and are listed in the crate
//! README.
//!
//! Hot-path counts are kept in the tracker and published once per flush.

use prometheus::{IntCounter, IntGauge, Opts, Registry};

/// Namespace of every Chaperone metric, in every crate: names are
/// `chaperone_<component>_<what>[_<unit>][_total]`.
pub const NAMESPACE: &str = "chaperone";
/// Subsystem of the metrics of in-producer auditing.
pub const SUBSYSTEM: &str = "audit";

/// The metrics of one audited producer (or standalone reporter).
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    /// Messages counted (acknowledged by Kafka), published per flush.
    pub messages_tracked: IntCounter,
    /// Messages whose delivery failed (not counted in audit records).
    pub delivery_failures: IntCounter,
    /// Messages not counted because the open-cell cap was reached.
    pub cell_overflow: IntCounter,
    /// Audit records acknowledged by Kafka.
    pub records_sent: IntCounter,
    /// Audit records that could not be delivered and were kept in the spool.
    pub records_spooled: IntCounter,
    /// Audit record delivery attempts that failed.
    pub send_failures: IntCounter,
    /// Audit records dropped because the spool was full.
    pub spool_overflow: IntCounter,
    /// Spool files found corrupt and quarantined.
    pub spool_corrupt_files: IntCounter,
    /// Bytes currently held in this process's spool.
    pub spool_bytes: IntGauge,
    /// Records currently held in this process's spool.
    pub spool_records: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::with_opts(
        Opts::new(name, help)
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
    )?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::with_opts(
        Opts::new(name, help)
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM),
    )?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl AuditMetrics {
    /// Creates the metrics and registers them in `registry`. Fails when they are already
    /// registered there (use one registry, or a prefixed sub-registry, per audited producer).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            messages_tracked: counter(
                registry,
                "messages_tracked_total",
                "messages acknowledged by kafka and counted for audit",
            )?,
            delivery_failures: counter(
                registry,
                "delivery_failures_total",
                "messages whose delivery failed, not counted for audit",
            )?,
            cell_overflow: counter(
                registry,
                "cell_overflow_total",
                "messages not counted because the open-cell cap was reached",
            )?,
            records_sent: counter(
                registry,
                "records_sent_total",
                "audit records acknowledged by kafka",
            )?,
            records_spooled: counter(
                registry,
                "records_spooled_total",
                "audit records kept in the local spool after a failed delivery",
            )?,
            send_failures: counter(
                registry,
                "send_failures_total",
                "audit record delivery attempts that failed",
            )?,
            spool_overflow: counter(
                registry,
                "spool_overflow_total",
                "audit records dropped because the spool was full",
            )?,
            spool_corrupt_files: counter(
                registry,
                "spool_corrupt_files_total",
                "spool files found corrupt and quarantined",
            )?,
            spool_bytes: gauge(registry, "spool_bytes", "bytes held in the local spool")?,
            spool_records: gauge(
                registry,
                "spool_records",
                "audit records held in the local spool",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_the_chaperone_namespace() {
        let registry = Registry::new();
        let m = AuditMetrics::new(&registry).expect("registers");
        m.records_sent.inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert!(
            names.contains(&"chaperone_audit_records_sent_total".to_owned()),
            "{names:?}"
        );
        assert!(names.contains(&"chaperone_audit_spool_bytes".to_owned()));
        assert!(
            AuditMetrics::new(&registry).is_err(),
            "double registration is refused"
        );
    }
}
