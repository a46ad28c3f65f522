//! `chaperone-collector`: consumes audit records from every cluster, stores them in
//! PostgreSQL exactly once, reconciles tiers bucket by bucket and raises alerts.
//!
//! # Layout
//!
//! Each module imports only modules listed above it; `tests/layering.rs` fails on an import
//! circle between the files of `src`, naming them.
//!
//! - [`model`]: the shared vocabulary ([`model::ConfigError`], [`model::VerdictStatus`],
//!   [`model::BucketKey`]); imports nothing of the crate.
//! - [`metrics`]: the Prometheus metrics of ingest, retention, leadership and the API, and the
//!   naming rule every stage's metrics follow.
//! - [`job`]: the one shape of a periodic job (pace, first run, shutdown, runs by result).
//! - [`leader`]: which instance runs the once-per-database jobs; holds an advisory lock, no
//!   table.
//! - [`store`]: the ingest tables (`audit_*`, `ingest_offsets`, `ingest_parked`): the
//!   exactly-once write path, what the reconciler judges from, the reads the API and the
//!   status page serve, and the retention job.
//! - [`ingest`]: Kafka consumers of the audit topics (a consumer group shared by every
//!   collector instance), decoding, the dead-letter topic and the batch writer.
//! - [`reconcile`]: per-edge, per-bucket verdicts (`reconcile_*`) from the stored counts and
//!   progress; hands each changed verdict of an alerting edge to an
//!   [`reconcile::IncidentRecorder`] in its transaction.
//! - [`alerts`]: incidents and the outbox (`alert_incidents`, `alert_events`,
//!   `alert_deliveries`): [`alerts::Incidents`] records them for the reconciler, and the
//!   webhook sender drains them.
//! - [`config`]: the daemon's TOML configuration (each stage's section), environment
//!   overrides and validation.
//! - [`api`]: the axum HTTP API, `/metrics`, `/healthz` and `/readyz`.
//! - [`web`]: the server-rendered status page on the API's server (`web_sessions`).
//!
//! [`run`] wires them together and [`router`] merges the API's and the status page's routes;
//! `main.rs` only loads the configuration, connects, migrates and calls `run`.

pub mod alerts;
pub mod api;
pub mod config;
pub mod ingest;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod store;
pub mod web;

use std::sync::Arc;

use anyhow::Context as _;
use prometheus::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// The source of "now" for everything that depends on wall-clock time (retention cutoffs,
/// default API ranges, verdicts), injectable in tests.
pub use chaperone_daemon_support::Clock;

/// What [`run`] needs from outside: injected so tests control them.
#[derive(Debug)]
pub struct Deps {
    /// Pool of the migrated database.
    pub pool: PgPool,
    /// Bound listener of the HTTP API.
    pub listener: TcpListener,
    /// Registry every metric is registered on and `/metrics` serves.
    pub registry: Registry,
    /// Wall clock.
    pub clock: Clock,
    /// Bearer token required on `/api/` routes, if any.
    pub api_token: Option<String>,
}

/// The HTTP server's routes: the API's (`/api/v1/…`, `/healthz`, `/readyz`, `/metrics`) and
/// the status page's (its sessions and failed logins in `login`), with the API's 404 and
/// request timing over all of them.
pub fn router(state: api::ApiState, login: web::session::Login) -> axum::Router {
    api::layered(
        api::routes(state.clone()).merge(web::router(state.clone(), login)),
        state,
    )
}

/// Applies the migrations in `migrations/` (embedded at build time), on a connection of
/// `pool` without `statement_timeout`: a migration may rewrite a large table. Its
/// `lock_timeout` stays, so that a migration waiting for another instance's (or for a table
/// in use) fails and is retried instead of queueing every other session behind it.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to apply database migrations")?;
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await
        .context("lifting the statement timeout for the migrations")?;
    let result = sqlx::migrate!("../migrations")
        .run(&mut *conn)
        .await
        .context("applying database migrations");
    // The session's settings changed: it does not go back to the pool.
    conn.close().await.ok();
    result
}

/// Runs the collector until `shutdown` is cancelled, then stops in order: consumers stop,
/// the last batch is stored, background jobs end, and finally the HTTP API stops.
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let Deps {
        pool,
        listener,
        registry,
        clock,
        api_token,
    } = deps;
    let metrics =
        metrics::IngestMetrics::register(&registry).context("registering the ingest metrics")?;
    let reconcile_metrics =
        reconcile::ReconcileMetrics::new(&registry).context("registering the reconcile metrics")?;
    let alert_metrics =
        alerts::AlertMetrics::new(&registry).context("registering the alert metrics")?;
    let status = Arc::new(ingest::IngestStatus::new(config.clusters.len()));

    let http_shutdown = CancellationToken::new();
    let state = api::ApiState {
        health_pool: api::health_pool(&pool),
        pool: pool.clone(),
        registry: registry.clone(),
        token: api_token.map(Arc::from),
        status: Arc::clone(&status),
        clock: clock.clone(),
        metrics: metrics.clone(),
        max_range: config.api.max_range,
    };
    let login = web::session::Login::new(web::session::LoginLimits {
        session_ttl: config.api.session_ttl,
        max_failures: config.api.login_max_failures,
        window: config.api.login_window,
        secure: config.alerts.public_url.as_deref().is_some_and(|u| {
            u.get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        }),
    });
    let addr = listener.local_addr().context("reading the API address")?;
    tracing::info!(%addr, "api listening");
    if state.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the API and status page listen beyond loopback with no token: anyone who can \
             reach this address can read them (set {} or api.token_file)",
            config::ENV_API_TOKEN
        );
    }
    let http = tokio::spawn({
        let http_shutdown = http_shutdown.clone();
        let shutdown = shutdown.clone();
        async move {
            let result = api::serve(listener, router(state, login), http_shutdown).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "api server failed; shutting down");
                shutdown.cancel();
            }
            result
        }
    });

    // Every instance ingests; the leader also reconciles, sends alerts and applies
    // retention. A failure of reconciliation or alerts stops the collector.
    let jobs = TaskTracker::new();
    jobs.spawn(leader::run(
        pool.clone(),
        metrics.leader.clone(),
        metrics.leader_checks.clone(),
        shutdown.clone(),
        {
            let pool = pool.clone();
            let shutdown = shutdown.clone();
            let metrics = metrics.clone();
            let retention = config.retention.clone();
            let reconcile_config = config.reconcile.clone();
            let alerts_config = config.alerts.clone();
            let clock = clock.clone();
            let reach = status.reach.clone();
            move |stop| {
                let led = TaskTracker::new();
                // Each stage's tables, in an order that deletes what refers to a row first.
                let kept = vec![
                    store::Kept {
                        days: retention.days,
                        prune: store::PRUNE,
                    },
                    store::Kept {
                        days: reconcile_config.retention_days,
                        prune: reconcile::PRUNE,
                    },
                    store::Kept {
                        days: reconcile_config.retention_days,
                        prune: alerts::PRUNE,
                    },
                ];
                led.spawn(store::run_retention(
                    pool.clone(),
                    retention.clone(),
                    kept,
                    clock.clone(),
                    metrics.clone(),
                    stop.clone(),
                ));
                for job in [
                    tokio::spawn(reconcile::run_with_clock(
                        pool.clone(),
                        reconcile_config.clone(),
                        clock.clone(),
                        reach.clone(),
                        Arc::new(alerts::Incidents::new(&reconcile_config)),
                        reconcile_metrics.clone(),
                        stop.clone(),
                    )),
                    tokio::spawn(alerts::run_with_clock(
                        pool.clone(),
                        alerts_config.clone(),
                        clock.clone(),
                        alert_metrics.clone(),
                        stop.clone(),
                    )),
                ] {
                    let shutdown = shutdown.clone();
                    led.spawn(async move {
                        match job.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    "background job failed; shutting down"
                                );
                                shutdown.cancel();
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "background job panicked; shutting down");
                                shutdown.cancel();
                            }
                        }
                    });
                }
                led
            }
        },
    ));

    let ingested = ingest::run(
        &config.clusters,
        &config.ingest,
        pool.clone(),
        metrics,
        Arc::clone(&status),
        clock.clone(),
        shutdown.clone(),
    )
    .await;
    if let Err(e) = &ingested {
        tracing::error!(error = %e, "ingest failed; shutting down");
    }
    shutdown.cancel();
    jobs.close();
    jobs.wait().await;
    http_shutdown.cancel();
    http.await
        .context("api task panicked")?
        .context("serving the api")?;
    ingested
}
