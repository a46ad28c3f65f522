//! Prometheus metrics of the reconciler: `chaperone_collector_reconcile_*`, see
//! [`crate::metrics`] for the naming rule.

use crate::metrics::{NAMESPACE, SUBSYSTEM};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The reconciler's metrics; cheap to clone (every metric is shared).
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    /// Verdicts written (first judgements and changes), by new status.
    pub verdicts: IntCounterVec,
    /// Messages missing per topic in topic-level verdicts of recent buckets (capped topics).
    pub missing_messages: IntGaugeVec,
    /// Buckets waiting to be final.
    pub pending_buckets: IntGauge,
    /// Evaluation passes, by result (`ok` or `error`).
    pub passes: IntCounterVec,
    /// Duration of one evaluation pass.
    pub pass_seconds: Histogram,
    /// Producer instances that stopped reporting without a clean shutdown (within the
    /// lookback): they no longer hold buckets back, and their counts may be incomplete.
    pub stale_instances: IntGauge,
    /// Topic-level verdicts currently `lagging`.
    pub lagging_buckets: IntGauge,
    /// (topic, edge) pairs whose tiers report different bucket widths: not compared.
    pub width_mismatches: IntGauge,
    /// Cells (edge, topic, scope, bucket) not judged because their counts sum past the
    /// largest 64-bit integer, each counted once.
    pub count_overflows: IntCounter,
}

impl ReconcileMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace(NAMESPACE)
                .subsystem(SUBSYSTEM)
        };
        let verdicts = IntCounterVec::new(
            opts(
                "reconcile_verdicts_total",
                "Verdicts written (first judgements and changes) by status",
            ),
            &["status"],
        )?;
        let missing_messages = IntGaugeVec::new(
            opts(
                "reconcile_missing_messages",
                "Messages missing per topic in topic-level verdicts of recent buckets \
                 (topics beyond the cap are summed under _other)",
            ),
            &["topic"],
        )?;
        let pending_buckets = IntGauge::with_opts(opts(
            "reconcile_pending_buckets",
            "Buckets whose counts changed and that still wait for a final verdict",
        ))?;
        let passes = IntCounterVec::new(
            opts("reconcile_passes_total", "Evaluation passes by result"),
            &["result"],
        )?;
        let pass_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "reconcile_pass_duration_seconds",
                "Duration of one evaluation pass",
            )
            .namespace(NAMESPACE)
            .subsystem(SUBSYSTEM)
            .buckets(vec![0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0]),
        )?;
        let stale_instances = IntGauge::with_opts(opts(
            "reconcile_stale_instances",
            "Producer instances silent for longer than reconcile.instance_timeout without a \
             clean shutdown: no longer waited for, their counts may be incomplete",
        ))?;
        let lagging_buckets = IntGauge::with_opts(opts(
            "reconcile_lagging_buckets",
            "Topic-level verdicts that are lagging: the downstream tier has not shown it read \
             past the bucket by max_wait",
        ))?;
        let width_mismatches = IntGauge::with_opts(opts(
            "reconcile_width_mismatches",
            "Topic and edge pairs not compared because their tiers count in different bucket \
             widths",
        ))?;
        let count_overflows = IntCounter::with_opts(opts(
            "reconcile_count_overflows_total",
            "Cells (edge, topic, scope, bucket) not judged because their counts sum past the \
             largest 64-bit integer",
        ))?;
        registry.register(Box::new(count_overflows.clone()))?;
        registry.register(Box::new(stale_instances.clone()))?;
        registry.register(Box::new(lagging_buckets.clone()))?;
        registry.register(Box::new(width_mismatches.clone()))?;
        registry.register(Box::new(verdicts.clone()))?;
        registry.register(Box::new(missing_messages.clone()))?;
        registry.register(Box::new(pending_buckets.clone()))?;
        registry.register(Box::new(passes.clone()))?;
        registry.register(Box::new(pass_seconds.clone()))?;
        Ok(Self {
            verdicts,
            missing_messages,
            pending_buckets,
            passes,
            pass_seconds,
            stale_instances,
            lagging_buckets,
            width_mismatches,
            count_overflows,
        })
    }
}
