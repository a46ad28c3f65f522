//! Binary entry point of `chaperone-service`: parses flags, loads the configuration, starts
//! tracing and calls [`chaperone_service::run`] until SIGTERM or SIGINT.

use std::net::SocketAddr;

use anyhow::Context as _;
use chaperone_daemon_support::process;
use chaperone_service::{Config, Deps};
use clap::Parser;

/// Tallies every audited topic of one Kafka cluster, exactly once, into audit records.
///
/// Settings come from the TOML file, then `CHAPERONE_*` environment variables, then flags.
/// librdkafka properties can also be set as `CHAPERONE_KAFKA__<PROPERTY>` (for example
/// `CHAPERONE_KAFKA__SASL_PASSWORD` for `sasl.password`) or with `--kafka key=value`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "CHAPERONE_CONFIG")]
    config: Option<String>,
    /// Kafka bootstrap servers of the audited cluster.
    #[arg(long, env = "CHAPERONE_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Tier reported: regional, aggregate or a custom name.
    #[arg(long, env = "CHAPERONE_TIER")]
    tier: Option<String>,
    /// Alias of the audited cluster.
    #[arg(long, env = "CHAPERONE_CLUSTER")]
    cluster: Option<String>,
    /// Datacenter of topics that are not mirrored copies.
    #[arg(long, env = "CHAPERONE_DATACENTER")]
    datacenter: Option<String>,
    /// Host name reported.
    #[arg(long, env = "CHAPERONE_HOST")]
    host: Option<String>,
    /// Instance name (stable and unique per group member).
    #[arg(long, env = "CHAPERONE_INSTANCE")]
    instance: Option<String>,
    /// Consumer group.
    #[arg(long, env = "CHAPERONE_GROUP_ID")]
    group_id: Option<String>,
    /// Audit topic on the audited cluster.
    #[arg(long, env = "CHAPERONE_AUDIT_TOPIC")]
    audit_topic: Option<String>,
    /// HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CHAPERONE_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Flush interval, with a unit: "5s", "500ms".
    #[arg(long, env = "CHAPERONE_FLUSH_INTERVAL")]
    flush_interval: Option<String>,
    /// librdkafka property for both clients, `key=value`; repeatable.
    #[arg(long = "kafka", value_name = "KEY=VALUE")]
    kafka: Vec<String>,
    /// Validate the configuration (flags and environment included), read the secret files it
    /// names, print one line and exit (non-zero, naming the key, when something is wrong).
    /// Connects to nothing.
    #[arg(long)]
    check_config: bool,
}

fn load(args: Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_kafka_env(std::env::vars());
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = args.$field { config.$field = v; }
        )*};
    }
    set!(
        bootstrap_servers,
        tier,
        cluster,
        datacenter,
        host,
        instance,
        group_id,
        audit_topic,
        http_addr
    );
    if let Some(d) = &args.flush_interval {
        config.flush_interval = chaperone_audit::duration::parse(d).map_err(|e| {
            anyhow::anyhow!("invalid config key `flush_interval` (--flush-interval): {e}")
        })?;
    }
    for kv in &args.kafka {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--kafka expects key=value, got {kv:?}"))?;
        config.kafka.insert(k.trim().to_owned(), v.to_owned());
    }
    config.resolve_secret_refs(|k| std::env::var(k).ok())?;
    config.validate()?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    process::init_tracing();
    let args = Args::parse();
    let check_only = args.check_config;
    let config = load(args)?;
    if check_only {
        println!(
            "configuration is valid: tier {}, cluster {}, bootstrap {}",
            config.tier, config.cluster, config.bootstrap_servers
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let shutdown = process::shutdown_on_signal();
        let result = chaperone_service::run(config, Deps::default(), shutdown).await;
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "chaperone-service stopped");
        }
        result
    })
}
