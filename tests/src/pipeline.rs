//! The audited pipeline run in the test process: a collector and a chaperone-service next to
//! each cluster ([`Pipeline`]), or any other set of daemons ([`Daemons`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use chaperone_test_support::{
    TestDb, aggregate_bootstrap, create_topic, regional_bootstrap, regional2_bootstrap,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Daemons running in this process as tasks, stopped together.
#[derive(Debug, Default)]
pub struct Daemons {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Daemons {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a collector with `config` on `pool`, its HTTP API on a free port; returns that
    /// port's address.
    pub async fn collector(
        &mut self,
        config: chaperone_collector::Config,
        pool: &sqlx::PgPool,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let deps = chaperone_collector::Deps {
            pool: pool.clone(),
            listener,
            registry: prometheus::Registry::new(),
            clock: chaperone_collector::Clock::system(),
            api_token: None,
        };
        self.tasks.push(tokio::spawn(chaperone_collector::run(
            config,
            deps,
            self.shutdown.clone(),
        )));
        Ok(addr)
    }

    /// Starts a chaperone-service with `config` and `deps`, supervised as deploy/systemd's
    /// unit is (`Restart=on-failure`, `RestartSec=5s`): a run that fails is reported on
    /// stderr and started again 5 s later with the same configuration, on the same HTTP
    /// address and a fresh metrics registry.
    pub fn service(&mut self, config: chaperone_service::Config, deps: chaperone_service::Deps) {
        let shutdown = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            let addr = deps.listener.as_ref().map(|l| l.local_addr()).transpose()?;
            let mut deps = Some(deps);
            loop {
                let deps = match deps.take() {
                    Some(deps) => deps,
                    None => chaperone_service::Deps {
                        listener: match addr {
                            Some(addr) => Some(TcpListener::bind(addr).await?),
                            None => None,
                        },
                        ..chaperone_service::Deps::default()
                    },
                };
                let run = chaperone_service::run(config.clone(), deps, shutdown.clone()).await;
                match run {
                    Err(e) if !shutdown.is_cancelled() => {
                        eprintln!("chaperone-service failed, restarting it in 5 s: {e:#}");
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                    }
                    done => return done,
                }
            }
        }));
    }

    /// Stops every daemon, waiting up to 60 s for each, and reports the first one that failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let mut stopped = Ok(());
        for task in self.tasks {
            let r = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .context("a daemon did not stop within 60 s")
                .and_then(|joined| joined.context("a daemon panicked"))
                .and_then(|r| r);
            if stopped.is_ok() {
                stopped = r;
            }
        }
        stopped
    }
}

/// What differs between the pipelines the tests start.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// Names audit topics, consumer groups and service instances apart.
    pub id: String,
    /// Audit topic on both clusters.
    pub audit_topic: String,
    /// Regex of the regional topics the services audit, on both regional clusters (the
    /// aggregate service audits their `regional.` and `regional2.` copies).
    pub topics_regex: String,
    /// Bucket width of every tier, such as `10s`.
    pub bucket_width: String,
    /// Body of the collector's `[reconcile]` section.
    pub reconcile: String,
    /// The collector's `[[alerts.webhooks]]` entries (TOML), if any.
    pub webhooks: String,
    /// Regexes of topics the in-process service of the `regional` cluster leaves to another
    /// chaperone-service (their `regional.` copies stay with the aggregate one).
    pub regional_exclude: Vec<String>,
}

/// The daemons of one pipeline, running in this process.
#[derive(Debug)]
pub struct Pipeline {
    daemons: Daemons,
    /// Address of the collector's HTTP API.
    pub collector_addr: SocketAddr,
    /// `/metrics` of every daemon.
    pub scrape: Vec<String>,
}

/// Creates `audit_topic` (one partition) on every cluster of the stack, where a pipeline's
/// daemons and audited clients report.
pub async fn create_audit_topic(audit_topic: &str) -> anyhow::Result<()> {
    for bootstrap in [
        regional_bootstrap(),
        regional2_bootstrap(),
        aggregate_bootstrap(),
    ] {
        create_topic(&bootstrap, audit_topic, 1).await?;
    }
    Ok(())
}

impl PipelineSpec {
    /// A chaperone-service of the `regional` cluster of its own (`name` is its instance and
    /// names its consumer group), auditing the topics `include` matches: for topics the
    /// pipeline's service leaves out (`regional_exclude`), to stop and start on their own.
    pub fn regional_service(
        &self,
        name: &str,
        include: &str,
    ) -> anyhow::Result<chaperone_service::Config> {
        let bootstrap = regional_bootstrap();
        service_config(self, "regional", "regional", name, &bootstrap, include, &[])
    }
}

/// A chaperone-service of `tier` next to `cluster` (which is also its datacenter: one
/// regional cluster per datacenter), whose instance and consumer group are named after `name`.
fn service_config(
    spec: &PipelineSpec,
    tier: &str,
    cluster: &str,
    name: &str,
    bootstrap: &str,
    include: &str,
    exclude: &[String],
) -> anyhow::Result<chaperone_service::Config> {
    let toml = format!(
        r#"
tier = "{tier}"
cluster = "{cluster}"
datacenter = "{cluster}"
instance = "{name}-1"
bootstrap_servers = "{bootstrap}"
group_id = "{id}-{name}"
audit_topic = "{audit}"
bucket_width = "{width}"
flush_interval = "1s"
http_addr = "127.0.0.1:0"

[topics]
include = ['{include}']
exclude = {exclude:?}
refresh_interval = "2s"

[kafka_consumer]
# A cluster outage longer than the session loses the group's assignment, and the service
# rejoins about one session after the cluster answers again: that must stay well inside
# reconcile.instance_timeout (docs/verdicts.md).
"session.timeout.ms" = "20000"
"#,
        id = spec.id,
        audit = spec.audit_topic,
        width = spec.bucket_width,
    );
    Ok(chaperone_service::Config::from_toml(&toml)?)
}

/// `[reconcile]` lines for the default edges (`producer->regional` per datacenter,
/// `regional->aggregate`) and one from `from` to every consumer group (`consumer:*`).
pub fn edges_to_consumers(from: &str) -> String {
    format!(
        r#"tiers = ["producer", "regional", "aggregate", "consumer:*"]
[[reconcile.edges]]
from = "producer"
to = "regional"
per_datacenter = true
[[reconcile.edges]]
from = "regional"
to = "aggregate"
[[reconcile.edges]]
from = "{from}"
to = "consumer:*""#
    )
}

/// The start of a collector's TOML configuration: its database and a `[[clusters]]` entry per
/// `(alias, bootstrap)`, each reading `audit_topic` and dead-lettering to `<audit_topic>-dlq`.
/// What follows may add a `[clusters.librdkafka]` table to the last cluster.
pub fn collector_toml(db_url: &str, clusters: &[(&str, &str)], audit_topic: &str) -> String {
    let mut toml = format!("\n[database]\nurl = \"{db_url}\"\n");
    for (alias, bootstrap) in clusters {
        toml.push_str(&format!(
            "\n[[clusters]]\nalias = \"{alias}\"\nbootstrap = \"{bootstrap}\"\n\
             audit_topic = \"{audit_topic}\"\ndlq_topic = \"{audit_topic}-dlq\"\n"
        ));
    }
    toml
}

fn collector_config(
    spec: &PipelineSpec,
    db_url: &str,
) -> anyhow::Result<chaperone_collector::Config> {
    let clusters = collector_toml(
        db_url,
        &[
            ("regional", &regional_bootstrap()),
            ("regional2", &regional2_bootstrap()),
            ("aggregate", &aggregate_bootstrap()),
        ],
        &spec.audit_topic,
    );
    let toml = format!(
        r#"{clusters}
[ingest]
linger = "200ms"

[reconcile]
{reconcile}

[alerts]
poll_interval = "500ms"

{webhooks}
"#,
        reconcile = spec.reconcile,
        webhooks = spec.webhooks,
    );
    Ok(chaperone_collector::Config::from_toml(&toml)?)
}

impl Pipeline {
    /// Starts the collector on `db` and a chaperone-service next to each cluster: `regional`
    /// and `regional2` (two datacenters) and `aggregate`, which both feed.
    pub async fn start(db: &TestDb, spec: &PipelineSpec) -> anyhow::Result<Self> {
        // The daemons' logs, at `RUST_LOG` (default warnings), in the test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let mut daemons = Daemons::new();
        let collector = collector_config(spec, &db.url)?;
        let collector_addr = daemons.collector(collector, &db.pool).await?;
        let mut scrape = vec![format!("http://{collector_addr}/metrics")];
        let regex = &spec.topics_regex;
        for (tier, cluster, bootstrap, include) in [
            (
                "regional",
                "regional",
                regional_bootstrap(),
                format!("^({regex})$"),
            ),
            (
                "regional",
                "regional2",
                regional2_bootstrap(),
                format!("^({regex})$"),
            ),
            (
                "aggregate",
                "aggregate",
                aggregate_bootstrap(),
                format!("^(regional|regional2)\\.({regex})$"),
            ),
        ] {
            let exclude: &[String] = if cluster == "regional" {
                &spec.regional_exclude
            } else {
                &[]
            };
            let config =
                service_config(spec, tier, cluster, cluster, &bootstrap, &include, exclude)?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            scrape.push(format!("http://{}/metrics", listener.local_addr()?));
            let deps = chaperone_service::Deps {
                listener: Some(listener),
                ..chaperone_service::Deps::default()
            };
            daemons.service(config, deps);
        }
        Ok(Self {
            daemons,
            collector_addr,
            scrape,
        })
    }

    /// Stops every daemon and reports the first one that failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.daemons.stop().await
    }

    /// Ends a test: stops the daemons whatever `outcome` was, returns the outcome's error
    /// first (it says more than a failed stop), then the stop's, and drops `db` only after a
    /// test that passed (a failed one leaves it to look at).
    pub async fn finish(self, outcome: anyhow::Result<()>, db: TestDb) -> anyhow::Result<()> {
        let stopped = self.stop().await;
        outcome?;
        stopped?;
        db.drop_db().await
    }
}
