//! Binary entry point of `chaperone-rest-proxy`: parses flags, loads the configuration, starts
//! tracing and calls [`chaperone_rest_proxy::run`] until SIGTERM or SIGINT.

use std::net::SocketAddr;

use anyhow::Context as _;
use chaperone_daemon_support::process;
use chaperone_rest_proxy::{Config, Deps};
use clap::Parser;

/// A Confluent-compatible Kafka REST Proxy for producers, counting every acknowledged record
/// in the audit.
///
/// Settings come from the TOML file, then `CHAPERONE_PROXY_*` environment variables, then
/// flags. librdkafka properties can also be set as `CHAPERONE_PROXY_KAFKA__<PROPERTY>` (for
/// example `CHAPERONE_PROXY_KAFKA__SASL_PASSWORD` for `sasl.password`) or with
/// `--kafka key=value`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "CHAPERONE_PROXY_CONFIG")]
    config: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "CHAPERONE_PROXY_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// HTTP address of the API.
    #[arg(long, env = "CHAPERONE_PROXY_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Cluster id reported by v3 (default: Kafka's).
    #[arg(long, env = "CHAPERONE_PROXY_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Audit topic.
    #[arg(long, env = "CHAPERONE_PROXY_AUDIT_TOPIC")]
    audit_topic: Option<String>,
    /// Audit spool directory.
    #[arg(long, env = "CHAPERONE_PROXY_SPOOL_DIR")]
    spool_dir: Option<std::path::PathBuf>,
    /// Instance name reported in audit records.
    #[arg(long, env = "CHAPERONE_PROXY_INSTANCE")]
    instance: Option<String>,
    /// Audit flush interval, with a unit: "5s", "500ms".
    #[arg(long, env = "CHAPERONE_PROXY_FLUSH_INTERVAL")]
    flush_interval: Option<String>,
    /// librdkafka property of the producer, `key=value`; repeatable.
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
    if let Some(v) = args.bootstrap_servers {
        config.bootstrap_servers = v;
    }
    if let Some(v) = args.http_addr {
        config.http_addr = v;
    }
    if let Some(v) = args.cluster_id {
        config.cluster_id = v;
    }
    if let Some(v) = args.audit_topic {
        config.audit.topic = v;
    }
    if let Some(v) = args.spool_dir {
        config.audit.spool_dir = v;
    }
    if let Some(v) = args.instance {
        config.audit.instance = Some(v);
    }
    if let Some(d) = &args.flush_interval {
        config.audit.flush_interval = chaperone_audit::duration::parse(d).map_err(|e| {
            anyhow::anyhow!("invalid config key `audit.flush_interval` (--flush-interval): {e}")
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
    config.read_credentials()?;
    if let Some(tls) = &config.tls {
        chaperone_rest_proxy::serve::server_config(tls)?;
    }
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    process::init_tracing();
    let args = Args::parse();
    let check_only = args.check_config;
    let config = load(args)?;
    if check_only {
        println!(
            "configuration is valid: bootstrap {}, http {}, audit {}",
            config.bootstrap_servers,
            config.http_addr,
            if config.audit_disabled {
                "disabled"
            } else {
                "on"
            }
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let shutdown = process::shutdown_on_signal();
        let result = chaperone_rest_proxy::run(config, Deps::default(), shutdown).await;
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "chaperone-rest-proxy stopped");
        }
        result
    })
}
