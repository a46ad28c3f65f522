//! `chaperone-service`: the daemon that runs alongside one Kafka cluster (regional or
//! aggregate), reads every audited topic and emits audit records for its tier, exactly once.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`subscription`]: which topics are audited (include/exclude patterns plus topics that
//!   are never counted), re-evaluated periodically so new topics are picked up.
//! - [`event_time`]: how a message is dated (CreateTime, a JSON field, or its arrival).
//! - [`kafka`]: client configurations with forced safety settings, audit topic creation.
//! - [`tally`] and [`latency`]: the open counts between two flushes, kept small (sparse
//!   latencies) and measured, so the loop can commit early before they outgrow their limit.
//! - [`pipeline`]: the consume loop, counting into a tally and committing counts together
//!   with consumer offsets in Kafka transactions.
//! - [`transaction`]: the thread that runs those transactions while the loop counts on.
//! - [`watermark`]: the event-time watermark each progress record claims, decided by a pure
//!   function from positions, end offsets and event times, kept across flushes once committed.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//!
//! [`run`] wires them together; `main.rs` only parses flags and starts tracing.

pub mod config;
pub mod error;
pub mod event_time;
pub mod http;
pub mod kafka;
pub mod latency;
pub mod metrics;
pub mod pipeline;
pub mod subscription;
pub mod tally;
pub mod transaction;
pub mod watermark;

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use prometheus::Registry;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use pipeline::Clock;
use pipeline::{Core, PipelineContext, Settings};

/// What [`run`] takes from its caller instead of creating it, so tests can inject it.
pub struct Deps {
    /// HTTP listener; when `None`, `config.http_addr` is bound.
    pub listener: Option<TcpListener>,
    /// Registry the metrics are registered on.
    pub registry: Registry,
    /// Wall clock in epoch milliseconds.
    pub clock: Clock,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Default for Deps {
    fn default() -> Self {
        Self {
            listener: None,
            registry: Registry::new(),
            clock: Clock::system(),
        }
    }
}

/// Runs the service until `shutdown` is cancelled or a fatal error occurs. Shutdown is
/// ordered: stop consuming, flush and commit the open counts, then stop HTTP.
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let metrics = metrics::Metrics::new(
        &deps.registry,
        config.tier().as_str(),
        config.metrics.max_lag_series,
    )
    .context("cannot register metrics")?;
    let health = http::Health::default();

    let listener = match deps.listener {
        Some(l) => l,
        None => TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot bind http_addr {}", config.http_addr))?,
    };
    let addr = listener.local_addr().context("http listener address")?;
    tracing::info!(%addr, "http server listening");
    let tracker = TaskTracker::new();
    let http_stop = CancellationToken::new();
    {
        let app = http::router(deps.registry.clone(), health.clone());
        let stop = http_stop.clone();
        tracker.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
    }

    let result = start_pipeline(&config, deps.clock, metrics, health, shutdown).await;

    http_stop.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn start_pipeline(
    config: &Config,
    clock: Clock,
    metrics: metrics::Metrics,
    health: http::Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    kafka::ensure_audit_topic(config).await?;

    let selector = subscription::Selector::new(
        &config.topics.include,
        &config.topics.exclude,
        &config.audit_topic,
        &config.mapping.separator,
    )
    .context("invalid topic patterns")?;
    let mapping = config.mapping_rule().context("invalid [mapping]")?;
    let dater = event_time::Dater::new(
        config.event_time.sources.clone(),
        config.event_time.json_field.clone(),
    );
    let settings = Settings {
        tier: config.tier(),
        cluster: config.cluster.clone(),
        host: config.host.clone(),
        instance: config.instance.clone(),
        audit_topic: config.audit_topic.clone(),
        width: config.width(),
        flush_interval: config.flush_interval,
        open_cells_max_bytes: usize::try_from(config.open_cells_max_bytes).unwrap_or(usize::MAX),
        kafka_timeout: config.kafka_timeout,
        watermark_lateness: config.event_time.watermark_lateness,
        refresh_interval: config.topics.refresh_interval,
        reset_to_end: kafka::resets_to_end(config),
    };
    let producer_cfg = kafka::producer_config(config);
    let consumer_cfg = kafka::consumer_config(config);
    let kafka_timeout = config.kafka_timeout;
    tracing::info!(
        tier = %settings.tier,
        cluster = %settings.cluster,
        group = %config.group_id,
        audit_topic = %settings.audit_topic,
        "starting"
    );

    let handle = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let producer: BaseProducer<DefaultProducerContext> = producer_cfg
            .create()
            .context("cannot create the transactional producer")?;
        producer.init_transactions(kafka_timeout).context(
            "cannot initialise transactions (is another instance using the same transactional id?)",
        )?;
        let committer = transaction::Committer::spawn(
            producer,
            settings.audit_topic.clone(),
            kafka_timeout,
            metrics.clone(),
        )
        .context("cannot start the transaction thread")?;
        let core = Arc::new(Mutex::new(Core::new(
            settings.clone(),
            committer,
            dater,
            mapping,
            metrics.clone(),
            health.clone(),
            clock,
        )));
        let context = PipelineContext::new(core, metrics.clone());
        let consumer: BaseConsumer<PipelineContext> = consumer_cfg
            .create_with_context(context)
            .context("cannot create the consumer")?;
        let result = pipeline::consume(
            &consumer, &selector, &settings, &metrics, &health, &shutdown,
        );
        health.set_alive(false);
        drop(consumer);
        result.map_err(anyhow::Error::from)
    });
    handle.await.context("the consume loop panicked")?
}
