//! End to end through the REST proxy: HTTP callers -> chaperone-rest-proxy -> regional Kafka ->
//! MirrorMaker 2 -> aggregate Kafka, with a chaperone-service next to each cluster and the
//! collector: the proxy's topic gets exact `complete` verdicts on both edges, counted in the
//! producer tier by the proxy.

use std::time::Duration;

use base64::Engine as _;
use chaperone_test_support::{
    TestDb, aggregate_bootstrap, create_topic, eventually, regional_bootstrap, regional2_bootstrap,
    unique, wait_for_topics,
};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec};
use chaperone_tests::verdicts::{edge_totals, verdicts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const REQUESTS: usize = 60;
const RECORDS_PER_REQUEST: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_produced_through_the_proxy_get_complete_verdicts() -> anyhow::Result<()> {
    let id = unique("e2e-proxy");
    let topic = format!("{id}-http");
    let audit_topic = format!("{id}-audit");
    create_topic(&regional_bootstrap(), &topic, 3).await?;
    for bootstrap in [
        regional_bootstrap(),
        regional2_bootstrap(),
        aggregate_bootstrap(),
    ] {
        create_topic(&bootstrap, &audit_topic, 1).await?;
    }
    wait_for_topics(
        &aggregate_bootstrap(),
        &[format!("regional.{topic}")],
        Duration::from_secs(120),
    )
    .await?;
    let db = TestDb::create().await?;
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        topics_regex: topic.clone(),
        bucket_width: "10s".into(),
        reconcile:
            "interval = \"1s\"\nallowed_lateness = \"2s\"\nsettle = \"2s\"\nmax_wait = \"90s\""
                .into(),
        webhooks: String::new(),
        regional_exclude: Vec::new(),
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    let outcome = scenario(&db, &topic, &audit_topic).await;
    let stopped = pipeline.stop().await;
    outcome?;
    stopped?;
    db.drop_db().await
}

async fn scenario(db: &TestDb, topic: &str, audit_topic: &str) -> anyhow::Result<()> {
    let mut config = chaperone_rest_proxy::Config {
        bootstrap_servers: regional_bootstrap(),
        ..chaperone_rest_proxy::Config::default()
    };
    config.audit.topic = audit_topic.to_owned();
    config.audit.flush_interval = Duration::from_secs(1);
    config.audit.bucket_width = Duration::from_secs(10);
    config.audit.spool_dir = std::env::temp_dir().join(unique("e2e-proxy-spool"));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/topics/{topic}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(chaperone_rest_proxy::run(
        config,
        chaperone_rest_proxy::Deps {
            listener: Some(listener),
            ..chaperone_rest_proxy::Deps::default()
        },
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    let mut acked = 0i64;
    for i in 0..REQUESTS {
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
    // A clean stop: the proxy's audit flushes its last counts and final progress records.
    shutdown.cancel();
    proxy.await??;

    let (p2r, r2a) = ("producer->regional", "regional->aggregate");
    eventually(
        "final verdicts for the proxy's topic on both edges",
        Duration::from_secs(180),
        || async {
            let v = verdicts(&db.pool, topic).await?;
            Ok(
                (edge_totals(&v, p2r) == (acked, acked) && edge_totals(&v, r2a) == (acked, acked))
                    .then_some(v),
            )
        },
    )
    .await
    .and_then(|v| {
        anyhow::ensure!(
            v.iter().all(|r| r.1 == "complete"),
            "verdicts of the proxy's topic: {v:?}"
        );
        Ok(())
    })
}
