//! Binary entry point of `chaperone-collector`: loads the configuration, starts tracing,
//! connects to PostgreSQL, applies the migrations, binds the API and calls
//! [`chaperone_collector::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chaperone_collector::{Clock, Config, Deps};
use chaperone_daemon_support::{Backoff, process};
use clap::Parser;
use sqlx::postgres::PgPoolOptions;

/// Stores audit records in PostgreSQL exactly once, reconciles tiers and raises alerts.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML). DATABASE_URL, CHAPERONE_COLLECTOR_LISTEN and
    /// CHAPERONE_COLLECTOR_API_TOKEN override it.
    #[arg(long, env = "CHAPERONE_COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, read the secret and CA files it names, print one line and
    /// exit (non-zero, naming the key, when something is wrong). Connects to nothing.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    process::init_tracing();
    let config = Config::load(args.config.as_deref())?;
    if args.check_config {
        // Reads what start-up reads (secret files, CA files); connects to nothing.
        config.check(|k| std::env::var(k).ok())?;
        println!(
            "configuration is valid: {} cluster(s), {} webhook(s)",
            config.clusters.len(),
            config.alerts.webhooks.len()
        );
        return Ok(());
    }
    config.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(start(config))
}

async fn start(config: Config) -> anyhow::Result<()> {
    let shutdown = process::shutdown_on_signal();
    let url = config.database.resolve_url()?;
    let token = config.api.resolve_token(|k| std::env::var(k).ok())?;
    // Every pooled session starts with the configured statement, lock and
    // idle-in-transaction timeouts (`[database]`).
    let pool = PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(config.database.acquire_timeout)
        .connect_lazy_with(config.database.connect_options(&url)?);
    // PostgreSQL may still be starting: retry the migrations until they apply.
    let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match chaperone_collector::migrate(&pool).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot migrate the database; retrying"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = retry.wait() => {}
                }
            }
        }
    }
    tracing::info!("database migrated");
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("binding the api to {}", config.api.listen))?;
    let deps = Deps {
        pool,
        listener,
        registry: prometheus::Registry::new(),
        clock: Clock::system(),
        api_token: token,
    };
    chaperone_collector::run(config, deps, shutdown).await
}
