//! The audited pipeline run in the test process: a collector and a chaperone-service next to
//! each cluster, plus a webhook receiver that records what a person would be sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{TestDb, aggregate_bootstrap, regional_bootstrap, regional2_bootstrap};

/// One request the webhook receiver got, with when it arrived.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Arrival time.
    pub at: DateTime<Utc>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

impl Notification {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("notification body is not JSON")
    }
}

/// A webhook receiver on 127.0.0.1 recording every POST to `/hook`.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// URL to configure as the webhook.
    pub url: String,
    received: Arc<Mutex<Vec<Notification>>>,
}

impl Receiver {
    /// Starts on a free port; runs until the test process ends.
    pub async fn start() -> anyhow::Result<Self> {
        let received: Arc<Mutex<Vec<Notification>>> = Arc::default();
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State(r): State<Arc<Mutex<Vec<Notification>>>>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        r.lock().expect("receiver lock").push(Notification {
                            at: Utc::now(),
                            headers,
                            body,
                        });
                        "ok"
                    },
                ),
            )
            .with_state(received.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, received })
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Notification> {
        self.received.lock().expect("receiver lock").clone()
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
    shutdown: CancellationToken,
    daemons: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Address of the collector's HTTP API.
    pub collector_addr: SocketAddr,
    /// `/metrics` of every daemon.
    pub scrape: Vec<String>,
}

/// A chaperone-service of `tier` next to `cluster` (which is also its datacenter: one
/// regional cluster per datacenter).
fn service_config(
    spec: &PipelineSpec,
    tier: &str,
    cluster: &str,
    bootstrap: &str,
    include: &str,
    exclude: &[String],
) -> anyhow::Result<chaperone_service::Config> {
    let toml = format!(
        r#"
tier = "{tier}"
cluster = "{cluster}"
datacenter = "{cluster}"
instance = "{cluster}-1"
bootstrap_servers = "{bootstrap}"
group_id = "{id}-{cluster}"
audit_topic = "{audit}"
bucket_width = "{width}"
flush_interval = "1s"
http_addr = "127.0.0.1:0"

[topics]
include = ['{include}']
exclude = {exclude:?}
refresh_interval = "2s"
"#,
        id = spec.id,
        audit = spec.audit_topic,
        width = spec.bucket_width,
    );
    Ok(chaperone_service::Config::from_toml(&toml)?)
}

fn collector_config(
    spec: &PipelineSpec,
    db_url: &str,
) -> anyhow::Result<chaperone_collector::Config> {
    let toml = format!(
        r#"
[database]
url = "{db_url}"

[[clusters]]
alias = "regional"
bootstrap = "{regional}"
audit_topic = "{audit}"
dlq_topic = "{audit}-dlq"

[[clusters]]
alias = "regional2"
bootstrap = "{regional2}"
audit_topic = "{audit}"
dlq_topic = "{audit}-dlq"

[[clusters]]
alias = "aggregate"
bootstrap = "{aggregate}"
audit_topic = "{audit}"
dlq_topic = "{audit}-dlq"

[ingest]
linger = "200ms"

[reconcile]
{reconcile}

[alerts]
poll_interval = "500ms"

{webhooks}
"#,
        regional = regional_bootstrap(),
        regional2 = regional2_bootstrap(),
        aggregate = aggregate_bootstrap(),
        audit = spec.audit_topic,
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
        let shutdown = CancellationToken::new();
        let mut daemons = Vec::new();
        let collector = collector_config(spec, &db.url()?)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let collector_addr = listener.local_addr()?;
        let mut scrape = vec![format!("http://{collector_addr}/metrics")];
        let deps = chaperone_collector::Deps {
            pool: db.pool.clone(),
            listener,
            registry: prometheus::Registry::new(),
            clock: chaperone_collector::Clock::system(),
            api_token: None,
        };
        daemons.push(tokio::spawn(chaperone_collector::run(
            collector,
            deps,
            shutdown.clone(),
        )));
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
            let config = service_config(spec, tier, cluster, &bootstrap, &include, exclude)?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            scrape.push(format!("http://{}/metrics", listener.local_addr()?));
            let deps = chaperone_service::Deps {
                listener: Some(listener),
                ..chaperone_service::Deps::default()
            };
            daemons.push(tokio::spawn(chaperone_service::run(
                config,
                deps,
                shutdown.clone(),
            )));
        }
        Ok(Self {
            shutdown,
            daemons,
            collector_addr,
            scrape,
        })
    }

    /// Stops every daemon and reports the first one that failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for d in self.daemons {
            tokio::time::timeout(Duration::from_secs(60), d)
                .await
                .context("a daemon did not stop within 60 s")???;
        }
        Ok(())
    }
}
