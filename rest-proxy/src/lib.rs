//! `chaperone-rest-proxy`: a Kafka REST Proxy that speaks the Confluent REST Proxy's v2 and v3
//! produce APIs, so existing HTTP clients work unchanged, and that counts every record Kafka
//! acknowledged in audit-lib's producer tier: the audit point of services that link no Kafka
//! client.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`kafka`]: the producer (audit-lib's `AuditedProducer`, `acks=all` and idempotence
//!   forced) and the cached cluster metadata.
//! - [`api`]: the HTTP endpoints, Confluent's JSON shapes and error codes, authentication,
//!   the in-flight bound and the `Idempotency-Key` window.
//! - [`metrics`]: `chaperone_rest_proxy_*` metrics.
//! - [`serve`]: plain HTTP, or HTTPS through rustls when `[tls]` names a certificate.
//!
//! [`run`] wires them together; `main.rs` only parses flags and starts tracing.

pub mod api;
pub mod config;
pub mod kafka;
pub mod metrics;
pub mod serve;

use std::sync::Arc;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What [`run`] takes from its caller instead of creating it, so tests can inject it.
pub struct Deps {
    /// HTTP listener; when `None`, `config.http_addr` is bound.
    pub listener: Option<TcpListener>,
    /// Registry the metrics are registered on.
    pub registry: Registry,
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
        }
    }
}

/// Runs the proxy until `shutdown` is cancelled. Shutdown is ordered: stop accepting
/// requests and finish those under way, then flush the producer and make the audit's last
/// flushes.
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let credentials = config.read_credentials()?;
    let tls = config.tls.as_ref().map(serve::server_config).transpose()?;
    let metrics = metrics::Metrics::new(&deps.registry).context("cannot register metrics")?;
    let producer = Arc::new(kafka::Producer::new(&config, &deps.registry)?);
    let metadata = kafka::Metadata::new(Arc::clone(&producer), &config)?;
    let cluster_id = if config.cluster_id.is_empty() {
        metadata
            .cluster_id()
            .await
            .context("cannot read the kafka cluster id (set cluster_id to start without it)")?
    } else {
        config.cluster_id.clone()
    };
    let listener = match deps.listener {
        Some(l) => l,
        None => TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_addr))?,
    };
    let addr = listener.local_addr().context("listener address")?;
    if !credentials.required() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the API listens beyond loopback and no client credentials are configured: anyone who reaches it can produce");
    }
    let window = api::idempotency::Window::new(config.idempotency.clone(), Some(metrics.clone()));
    let state = api::AppState::new(api::Shared {
        producer: Arc::clone(&producer),
        metadata,
        metrics,
        registry: deps.registry.clone(),
        cluster_id: cluster_id.clone(),
        window,
        in_flight: Arc::new(Semaphore::new(config.max_in_flight_bytes)),
        credentials,
        config: config.clone(),
    });
    tracing::info!(%addr, cluster_id, audit = !config.audit_disabled, tls = tls.is_some(), "rest proxy listening");
    serve::serve(listener, api::router(state), tls, shutdown.clone()).await?;
    tracing::info!("http server stopped; flushing the producer");
    // Request tasks finish after their connections close; wait for the last to let go of
    // the producer (bounded), so its shutdown makes the audit's last and closing flushes.
    let mut producer = producer;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Arc::try_unwrap(producer) {
            Ok(p) => {
                p.shutdown().await;
                break;
            }
            Err(p) if std::time::Instant::now() < deadline => {
                producer = p;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "requests still running at shutdown: the audit counts left are spooled when they end"
                );
                break;
            }
        }
    }
    Ok(())
}
