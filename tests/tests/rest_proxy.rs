//! End to end through the REST proxy: HTTP callers -> chaperone-rest-proxy -> regional Kafka ->
//! MirrorMaker 2 -> aggregate Kafka, with a chaperone-service next to each cluster and the
//! collector.
//!
//! - The proxy's topic gets exact `complete` verdicts on both edges, counted in the producer
//!   tier by the proxy.
//! - A real loss, with no fault knob in the proxy: the regional chaperone-service of a second
//!   topic is stopped, records are produced through the proxy, some of them are deleted on
//!   regional with Kafka's own `kafka-delete-records` before anyone read them, and the service
//!   is started again. The exact number is found `missing` on `producer->regional` and
//!   notified, and nothing else is.
//! - The proxy process killed with SIGKILL mid-load and restarted on its spool as another
//!   instance: the counts it had not flushed are gone, so the verdicts may say
//!   `upstream_incomplete`, naming it, and never anything that notifies.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chaperone_test_support::{
    Receiver, TestDb, aggregate_bootstrap, create_topic, dev_stack, end_offsets, eventually,
    regional_bootstrap, unique, wait_for_topics,
};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec, create_audit_topic};
use chaperone_tests::programs::built;
use chaperone_tests::verdicts::{edge_totals, verdicts};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const REQUESTS: usize = 60;
const RECORDS_PER_REQUEST: usize = 25;
/// Requests to the lossy topic while its regional service runs, then while it is stopped.
const LOST_BEFORE: usize = 10;
const LOST_AFTER: usize = 20;
/// Records of those sent while the service was stopped that are deleted on regional.
const DELETED: i64 = 200;
const P2R: &str = "producer->regional";
const R2A: &str = "regional->aggregate";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxys_records_get_exact_verdicts_and_a_real_loss_is_notified() -> anyhow::Result<()> {
    let id = unique("e2e-proxy");
    let topic = format!("{id}-http");
    let lost = format!("{id}-lost");
    let killed = format!("{id}-killed");
    let audit_topic = format!("{id}-audit");
    create_topic(&regional_bootstrap(), &topic, 3).await?;
    create_topic(&regional_bootstrap(), &lost, 1).await?;
    create_topic(&regional_bootstrap(), &killed, 3).await?;
    create_audit_topic(&audit_topic).await?;
    wait_for_topics(
        &aggregate_bootstrap(),
        &[topic.as_str(), lost.as_str(), killed.as_str()].map(|t| format!("regional.{t}")),
        Duration::from_secs(120),
    )
    .await?;
    let db = TestDb::create().await?;
    let receiver = Receiver::start().await?;
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        topics_regex: format!("{topic}|{lost}|{killed}"),
        bucket_width: "10s".into(),
        // A killed proxy stops holding buckets back after `instance_timeout`.
        reconcile: "interval = \"1s\"\nallowed_lateness = \"2s\"\nsettle = \"2s\"\n\
                    max_wait = \"90s\"\ninstance_timeout = \"15s\""
            .into(),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"ops\"\nurl = \"{}\"\n",
            receiver.url()
        ),
        // The lossy topic's regional service is one of its own, stopped and started.
        regional_exclude: vec![format!("^{lost}$")],
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    let outcome = async {
        scenario(&db, &spec, &receiver, &topic, &lost).await?;
        killed_proxy(&db, &spec, &receiver, &killed).await
    }
    .await;
    pipeline.finish(outcome, db).await
}

/// The proxy, running in this process.
struct Proxy {
    base: String,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    async fn start(audit_topic: &str) -> anyhow::Result<Self> {
        let mut config = chaperone_rest_proxy::Config {
            bootstrap_servers: regional_bootstrap(),
            ..chaperone_rest_proxy::Config::default()
        };
        config.audit.topic = audit_topic.to_owned();
        config.audit.flush_interval = Duration::from_secs(1);
        config.audit.bucket_width = Duration::from_secs(10);
        config.audit.spool_dir = std::env::temp_dir().join(unique("e2e-proxy-spool"));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chaperone_rest_proxy::run(
            config,
            chaperone_rest_proxy::Deps {
                listener: Some(listener),
                ..chaperone_rest_proxy::Deps::default()
            },
            shutdown.clone(),
        ));
        Ok(Self {
            base,
            shutdown,
            task,
        })
    }

    /// Sends `requests` v2 requests of [`RECORDS_PER_REQUEST`] records to `topic`, each once
    /// the previous one was answered, and checks that every record was acknowledged.
    /// Returns how many were.
    async fn produce(&self, topic: &str, requests: usize) -> anyhow::Result<i64> {
        let client = reqwest::Client::new();
        let url = format!("{}/topics/{topic}", self.base);
        let mut acked = 0i64;
        for i in 0..requests {
            let records: Vec<String> = (0..RECORDS_PER_REQUEST)
                .map(|j| {
                    let v = base64::engine::general_purpose::STANDARD.encode(format!("m-{i}-{j}"));
                    format!("{{\"value\":\"{v}\"}}")
                })
                .collect();
            let body = format!("{{\"records\":[{}]}}", records.join(","));
            let answer: serde_json::Value = eventually(
                "the proxy to take a request",
                Duration::from_secs(60),
                || {
                    let (client, url, body) = (client.clone(), url.clone(), body.clone());
                    async move {
                        let r = client
                            .post(url)
                            .header("content-type", "application/vnd.kafka.binary.v2+json")
                            .body(body)
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status().is_success() => Ok(Some(r.json().await?)),
                            _ => Ok(None),
                        }
                    }
                },
            )
            .await?;
            let offsets = answer["offsets"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                offsets.len() == RECORDS_PER_REQUEST
                    && offsets.iter().all(|o| o["error_code"].is_null()),
                "not every record acknowledged: {answer}"
            );
            acked += offsets.len() as i64;
        }
        Ok(acked)
    }

    /// A clean stop: the proxy's audit flushes its last counts and final progress records.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// The lossy topic's own regional chaperone-service, running in this process.
struct LoneService {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl LoneService {
    async fn start(spec: &PipelineSpec, topic: &str) -> anyhow::Result<Self> {
        let config = spec.regional_service("regional-lost", &format!("^{topic}$"))?;
        let deps = chaperone_service::Deps {
            listener: Some(TcpListener::bind("127.0.0.1:0").await?),
            ..chaperone_service::Deps::default()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chaperone_service::run(config, deps, shutdown.clone()));
        Ok(Self { shutdown, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Runs `dev/stack` off the async threads.
async fn stack(args: &[&str]) -> anyhow::Result<()> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dev_stack(&args)
    })
    .await?
}

async fn scenario(
    db: &TestDb,
    spec: &PipelineSpec,
    receiver: &Receiver,
    topic: &str,
    lost: &str,
) -> anyhow::Result<()> {
    let proxy = Proxy::start(&spec.audit_topic).await?;
    let service = LoneService::start(spec, lost).await?;
    let acked = proxy.produce(topic, REQUESTS).await?;

    // The lossy topic: counted on regional and copied to aggregate while everything runs.
    let before = proxy.produce(lost, LOST_BEFORE).await?;
    eventually(
        "the lossy topic's first records counted on regional and copied",
        Duration::from_secs(120),
        || async {
            let counted: Vec<i64> = sqlx::query_scalar(
                "SELECT coalesce(sum(count), 0)::bigint FROM audit_counts
                  WHERE topic = $1 AND tier = ANY('{regional,aggregate}')
                  GROUP BY tier",
            )
            .bind(lost)
            .fetch_all(&db.pool)
            .await?;
            Ok((counted == [before, before]).then_some(()))
        },
    )
    .await?;
    // Its regional service stops, and so does the mirror (which would otherwise copy the
    // records before they are deleted: the aggregate would then have more than regional).
    service.stop().await?;
    stack(&["stop-mirror", "regional"]).await?;
    let after = proxy.produce(lost, LOST_AFTER).await?;
    let end = end_offsets(&regional_bootstrap(), lost, 1)?[0];
    anyhow::ensure!(end == before + after, "{lost} ends at {end}");
    // Everything before this offset goes: the first DELETED records the service never read.
    let cut = (end - after + DELETED).to_string();
    stack(&["delete-records", "regional", lost, "0", &cut])
        .await
        .context("kafka-delete-records")?;
    let service = LoneService::start(spec, lost).await?;
    stack(&["start-mirror", "regional"]).await?;
    proxy.stop().await?;

    let judged = eventually(
        "final verdicts for the proxy's topics",
        Duration::from_secs(240),
        || async {
            let clean = verdicts(&db.pool, topic).await?;
            let lossy = verdicts(&db.pool, lost).await?;
            let total = before + after;
            let done = edge_totals(&clean, P2R) == (acked, acked)
                && edge_totals(&clean, R2A) == (acked, acked)
                && edge_totals(&lossy, P2R) == (total, total - DELETED)
                && edge_totals(&lossy, R2A) == (total - DELETED, total - DELETED);
            Ok(done.then_some((clean, lossy)))
        },
    )
    .await;
    let stopped = service.stop().await;
    let (clean, lossy) = judged?;
    stopped?;
    anyhow::ensure!(
        clean.iter().all(|r| r.1 == "complete"),
        "verdicts of the proxy's clean topic: {clean:?}"
    );
    anyhow::ensure!(
        lossy
            .iter()
            .all(|r| r.1 == "complete" || (r.0 == P2R && r.1 == "missing")),
        "verdicts of the lossy topic: {lossy:?}"
    );

    // What a person receives: the loss, and nothing else.
    eventually("the loss notified", Duration::from_secs(60), || async {
        Ok(receiver
            .received()
            .iter()
            .any(|n| n.json().is_ok_and(|j| j["topic"] == lost))
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent: Vec<serde_json::Value> = receiver
        .received()
        .iter()
        .map(|n| n.json())
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        sent.iter().all(|j| j["topic"] == lost
            && j["edge"] == P2R
            && j["event"] == "firing"
            && j["status"] == "missing"
            && j["difference"]
                .as_i64()
                .is_some_and(|d| (-DELETED..0).contains(&d))),
        "notifications: {sent:#?}"
    );
    Ok(())
}

/// The proxy binary, as a process.
fn spawn_proxy(config: &std::path::Path, instance: &str) -> anyhow::Result<Child> {
    Command::new(built(
        "chaperone-rest-proxy",
        "cargo build -p chaperone-rest-proxy",
    )?)
    .arg("--config")
    .arg(config)
    .arg("--instance")
    .arg(instance)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .context("starting chaperone-rest-proxy")
}

async fn ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    eventually("the proxy to be ready", Duration::from_secs(60), || async {
        let up = client.get(format!("{base}/readyz")).send().await;
        Ok(up.is_ok_and(|r| r.status().is_success()).then_some(()))
    })
    .await
}

/// One v2 request of [`RECORDS_PER_REQUEST`] records; whether all were acknowledged.
async fn post(client: &reqwest::Client, url: &str) -> anyhow::Result<bool> {
    let records: Vec<String> = (0..RECORDS_PER_REQUEST)
        .map(|j| format!("{{\"value\":{}}}", serde_json::json!({ "n": j })))
        .collect();
    let r = client
        .post(url)
        .header("content-type", "application/vnd.kafka.json.v2+json")
        .body(format!("{{\"records\":[{}]}}", records.join(",")))
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    Ok(r.status().is_success())
}

/// Phase 3: the proxy killed with SIGKILL under load, restarted on its spool as another
/// instance, then stopped cleanly.
async fn killed_proxy(
    db: &TestDb,
    spec: &PipelineSpec,
    receiver: &Receiver,
    topic: &str,
) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}/topics/{topic}");
    let spool = std::env::temp_dir().join(unique("e2e-killed-proxy-spool"));
    let config = spool.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "bootstrap_servers = \"{}\"\nhttp_addr = \"127.0.0.1:{port}\"\n[audit]\n\
             topic = \"{}\"\nflush_interval = \"1s\"\nbucket_width = \"10s\"\n\
             spool_dir = \"{}\"\n",
            regional_bootstrap(),
            spec.audit_topic,
            spool.display()
        ),
    )?;
    let (first, second) = (unique("killed"), unique("restarted"));
    let client = reqwest::Client::new();
    let mut proxy = spawn_proxy(&config, &first)?;
    ready(&client, &base).await?;
    // Two callers send until the proxy is gone.
    let acked = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, acked) = (client.clone(), url.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                while let Ok(true) = post(&client, &url).await {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    eventually(
        "100 acknowledged requests, some of them counted",
        Duration::from_secs(120),
        || async {
            let counted: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(count), 0)::bigint FROM audit_counts
                  WHERE topic = $1 AND tier = 'producer'",
            )
            .bind(topic)
            .fetch_one(&db.pool)
            .await?;
            Ok((acked.load(Ordering::Relaxed) >= 100 && counted > 0).then_some(()))
        },
    )
    .await?;
    proxy.start_kill()?;
    proxy.wait().await?;
    for c in callers {
        c.await?;
    }
    // Restarted on the same spool, as another instance: more traffic, then a clean stop.
    let mut proxy = spawn_proxy(&config, &second)?;
    ready(&client, &base).await?;
    for _ in 0..50 {
        anyhow::ensure!(
            post(&client, &url).await?,
            "a request to the restarted proxy"
        );
    }
    let pid = proxy.id().context("the restarted proxy's pid")?;
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(term.success(), "kill -TERM {pid}: {term}");
    let status = tokio::time::timeout(Duration::from_secs(60), proxy.wait()).await??;
    anyhow::ensure!(
        status.success(),
        "the restarted proxy stopped with {status}"
    );
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&spool);

    // Everything in Kafka is counted on regional and aggregate alike; the producer tier may
    // lack what the killed instance had not flushed.
    let in_kafka: i64 = end_offsets(&regional_bootstrap(), topic, 3)?.iter().sum();
    let judged = eventually(
        "final verdicts for the killed proxy's topic",
        Duration::from_secs(180),
        || async {
            let v = verdicts(&db.pool, topic).await?;
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM reconcile_pending WHERE topic = $1")
                    .bind(topic)
                    .fetch_one(&db.pool)
                    .await?;
            let done = pending == 0
                && edge_totals(&v, P2R).1 == in_kafka
                && edge_totals(&v, R2A) == (in_kafka, in_kafka);
            Ok(done.then_some(v))
        },
    )
    .await?;
    let (counted, _) = edge_totals(&judged, P2R);
    anyhow::ensure!(
        counted <= in_kafka,
        "{counted} counted, {in_kafka} in Kafka"
    );
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT status, stale_instances FROM reconcile_verdicts
          WHERE topic = $1 AND edge = $2 AND partition = -1 AND expected <> actual",
    )
    .bind(topic)
    .bind(P2R)
    .fetch_all(&db.pool)
    .await?;
    anyhow::ensure!(
        (counted == in_kafka || !rows.is_empty())
            && rows
                .iter()
                .all(|(status, stale)| status == "upstream_incomplete"
                    && stale.iter().any(|s| s.ends_with(&format!("/{first}")))),
        "the buckets the killed proxy lost counts of: {rows:?} (verdicts {judged:?})"
    );
    let ever: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconcile_verdict_history
          WHERE topic = $1 AND status IN ('missing', 'duplicated', 'tier_silent')",
    )
    .bind(topic)
    .fetch_one(&db.pool)
    .await?;
    anyhow::ensure!(
        ever == 0,
        "{ever} verdicts of the killed proxy's topic would notify"
    );
    let notified = receiver
        .received()
        .iter()
        .filter(|n| n.json().is_ok_and(|j| j["topic"] == topic))
        .count();
    anyhow::ensure!(notified == 0, "{notified} notifications about {topic}");
    Ok(())
}
