//! End to end: audited producers -> regional Kafka -> MirrorMaker 2 -> aggregate Kafka, with a
//! chaperone-service next to each cluster and a collector reconciling all three tiers in
//! PostgreSQL. A topic that lost messages between the producer and the regional cluster gets a
//! `missing` verdict with the exact count and one signed webhook; a healthy topic gets
//! `complete` on both edges and no alert.

use std::time::Duration;

use anyhow::Context as _;
use chaperone_test_support::{
    Receiver, TestDb, create_topic, eventually, regional_bootstrap, unique,
};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec, create_audit_topic};
use chaperone_tests::producer::{TestProducer, regional_client};
use chaperone_tests::verdicts::{edge_totals, unsent_notifications, verdicts};
use hmac::{Hmac, Mac};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::Sha256;

const MESSAGES_PER_TOPIC: usize = 3_000;
const LOST: usize = 25;
const SECRET: &str = "e2e-webhook-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loss_is_found_reported_once_and_healthy_topics_stay_quiet() -> anyhow::Result<()> {
    let id = unique("e2e");
    let secret_file = std::env::temp_dir().join(format!("{id}-secret"));
    std::fs::write(&secret_file, SECRET)?;
    let healthy = format!("{id}-healthy");
    let lossy = format!("{id}-lossy");
    let audit_topic = format!("{id}-audit");
    for t in [&healthy, &lossy] {
        create_topic(&regional_bootstrap(), t, 3).await?;
    }
    create_audit_topic(&audit_topic).await?;

    let db = TestDb::create().await?;
    let received = Receiver::start().await?;
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        // Topic names are lowercase hex and dashes: nothing to escape in the pattern.
        topics_regex: format!("{healthy}|{lossy}"),
        bucket_width: "10s".into(),
        reconcile:
            "interval = \"1s\"\nallowed_lateness = \"2s\"\nsettle = \"2s\"\nmax_wait = \"90s\""
                .into(),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"e2e\"\nurl = \"{}\"\nsecret_file = \"{}\"\n\
             [alerts.webhooks.filters]\ntopics = [\"{healthy}\", \"{lossy}\"]\n",
            received.url(),
            secret_file.display()
        ),
        regional_exclude: Vec::new(),
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    // Whatever the scenario's outcome, the daemons are stopped: a daemon left running would keep
    // the test process alive.
    let outcome = scenario(&db, &pipeline, &received, &healthy, &lossy, &audit_topic).await;
    let stopped = pipeline.stop().await;
    outcome?;
    stopped?;
    let _ = std::fs::remove_file(secret_file);
    db.drop_db().await
}

async fn scenario(
    db: &TestDb,
    pipeline: &Pipeline,
    received: &Receiver,
    healthy: &str,
    lossy: &str,
    audit_topic: &str,
) -> anyhow::Result<()> {
    // Producers: every message of both topics through the audited producer; on the lossy topic
    // LOST more messages are counted as acknowledged but never reach Kafka.
    let kafka = regional_client();
    let registry = prometheus::Registry::new();
    let producer = TestProducer::new(&kafka, audit_topic, &registry)?;
    producer
        .send_numbered(&[healthy, lossy], MESSAGES_PER_TOPIC, Some((lossy, LOST)))
        .await?;
    // A record that is not an audit record on the audit topic: dead-lettered, never stored.
    let plain: FutureProducer = kafka.create()?;
    plain
        .send(
            FutureRecord::<(), _>::to(audit_topic).payload("not an audit record"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let stats = producer.shutdown().await;
    anyhow::ensure!(
        stats.acked == 2 * MESSAGES_PER_TOPIC as u64,
        "not every message was acknowledged: {stats:?}"
    );

    let producer_regional = "producer->regional";
    let regional_aggregate = "regional->aggregate";
    let expected_lossy = (MESSAGES_PER_TOPIC + LOST) as i64;
    let produced = MESSAGES_PER_TOPIC as i64;
    eventually(
        "final verdicts for both topics on both edges",
        Duration::from_secs(180),
        || async {
            let h = verdicts(&db.pool, healthy).await?;
            let l = verdicts(&db.pool, lossy).await?;
            Ok((edge_totals(&h, producer_regional) == (produced, produced)
                && edge_totals(&h, regional_aggregate) == (produced, produced)
                && edge_totals(&l, producer_regional) == (expected_lossy, produced)
                && edge_totals(&l, regional_aggregate) == (produced, produced))
                .then_some(()))
        },
    )
    .await?;

    let healthy_verdicts = verdicts(&db.pool, healthy).await?;
    anyhow::ensure!(
        healthy_verdicts.iter().all(|r| r.1 == "complete"),
        "healthy topic has bad verdicts: {healthy_verdicts:?}"
    );
    let lossy_verdicts = verdicts(&db.pool, lossy).await?;
    let bad: Vec<_> = lossy_verdicts
        .iter()
        .filter(|r| r.1 != "complete")
        .collect();
    anyhow::ensure!(
        bad.len() == 1
            && bad[0].0 == producer_regional
            && bad[0].1 == "missing"
            && bad[0].3 - bad[0].4 == LOST as i64,
        "lossy topic: expected one missing verdict of {LOST} on {producer_regional}, got {lossy_verdicts:?}"
    );

    // One firing for the lossy topic, signed; nothing for the healthy one.
    eventually(
        "the webhook delivered and marked sent",
        Duration::from_secs(60),
        || async {
            let unsent = unsent_notifications(&db.pool).await?;
            let got = received.received().len();
            Ok((unsent == 0 && got > 0).then_some(()))
        },
    )
    .await?;
    let all = received.received();
    anyhow::ensure!(
        all.len() == 1,
        "expected exactly one notification, got {}",
        all.len()
    );
    let (headers, body) = (&all[0].headers, &all[0].body);
    let json = all[0].json()?;
    anyhow::ensure!(
        json["topic"] == serde_json::json!(lossy) && json["event"] == serde_json::json!("firing"),
        "notification: {json}"
    );
    let difference = json["expected"].as_i64().context("expected")?
        - json["actual"].as_i64().context("actual")?;
    anyhow::ensure!(
        difference == LOST as i64,
        "notification reports {difference} missing: {json}"
    );
    let signature = headers
        .get("x-chaperone-signature")
        .context("signature header")?
        .to_str()?;
    // Signed: the timestamp, a dot, the body (a receiver rejects stale timestamps).
    let timestamp = headers
        .get("x-chaperone-timestamp")
        .context("timestamp header")?
        .to_str()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes())?;
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    anyhow::ensure!(
        signature == format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
        "bad signature {signature}"
    );

    // The API serves the same story.
    let api = format!("http://{}/api/v1/alerts", pipeline.collector_addr);
    let alerts: serde_json::Value = reqwest::get(&api).await?.error_for_status()?.json().await?;
    anyhow::ensure!(alerts.to_string().contains(lossy), "alerts API: {alerts}");

    // The bad record went to the dead-letter topic; every metric the daemons dashboard charts is
    // exported by some part of the pipeline.
    let exposition = eventually(
        "the rejected record counted",
        Duration::from_secs(30),
        || async {
            let mut text = prometheus::TextEncoder::new().encode_to_string(&registry.gather())?;
            for url in &pipeline.scrape {
                text.push_str(&reqwest::get(url).await?.error_for_status()?.text().await?);
            }
            Ok(text
                .contains("chaperone_collector_records_rejected_total{")
                .then_some(text))
        },
    )
    .await?;
    let dashboard = include_str!("../../dashboards/daemons.json");
    let unknown: Vec<String> = metric_names(dashboard)
        .into_iter()
        .filter(|name| {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            !exposition.contains(&format!("# TYPE {family} "))
        })
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "dashboards/daemons.json charts metrics nobody exports: {unknown:?}"
    );
    Ok(())
}

/// Names of the `chaperone_*` metrics an expression text refers to.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("chaperone_"))
        .map(str::to_owned)
        .collect()
}
