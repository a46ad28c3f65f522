//! The status page in a real browser: the audited pipeline (tests/src/pipeline.rs) runs with
//! one topic losing messages between the producer and the regional cluster; then headless
//! Chromium (Debian's `chromium`, installed by `dev/test`) loads `/`, the lossy topic's page
//! and its incident from the running collector, dumps their DOM and takes screenshots into
//! `target/screenshots/`. The lossy topic must show the exact missing count, the healthy one
//! none. The test fails, never skips, when Chromium is not installed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chaperone_test_support::{
    Receiver, TestDb, aggregate_bootstrap, create_topic, eventually, regional_bootstrap, unique,
    wait_for_topics,
};
use chaperone_tests::pipeline::{Pipeline, PipelineSpec};
use chaperone_tests::producer::{TestProducer, regional_client};
use chaperone_tests::verdicts::{edge_totals, unsent_notifications, verdicts};

const MESSAGES_PER_TOPIC: usize = 600;
const LOST: usize = 17;

/// The `chromium` binary, or an error saying how to install it.
fn chromium() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
        .context(
            "chromium is not installed: `dev/test` installs it, or \
             `apt-get install -y --no-install-recommends chromium`",
        )
}

/// Where screenshots go: `target/screenshots/` of the workspace.
fn screenshot_dir() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs headless Chromium on `url` with `args`; returns its standard output.
async fn headless(url: &str, args: &[String]) -> anyhow::Result<String> {
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium()?)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("chromium did not finish within 90 s")?
    .context("running chromium")?;
    let _ = std::fs::remove_dir_all(profile);
    ensure!(
        out.status.success(),
        "chromium failed on {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The DOM of `url` after Chromium loaded it, and a screenshot of it saved as `name`.
async fn load(url: &str, name: &str) -> anyhow::Result<String> {
    let dom = headless(url, &["--dump-dom".to_owned()]).await?;
    ensure!(dom.contains("</html>"), "no document from {url}: {dom}");
    let shot = screenshot_dir()?.join(name);
    let _ = std::fs::remove_file(&shot);
    headless(
        url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1400".to_owned(),
        ],
    )
    .await?;
    let size = std::fs::metadata(&shot)
        .with_context(|| format!("no screenshot at {}", shot.display()))?
        .len();
    ensure!(size > 1_000, "screenshot {} is empty", shot.display());
    Ok(dom)
}

fn unescape(s: &str) -> String {
    s.replace("&gt;", ">")
        .replace("&lt;", "<")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The element of `dom` whose start tag is `<{name}` and holds `marker`: its start tag and
/// its text (tags removed, entities decoded).
fn element(dom: &str, name: &str, marker: &str) -> anyhow::Result<(String, String)> {
    let open = format!("<{name} ");
    let close = format!("</{name}>");
    let mut from = 0;
    while let Some(i) = dom[from..].find(&open) {
        let start = from + i;
        let tag_end = start + dom[start..].find('>').context("unclosed tag")?;
        let tag = &dom[start..=tag_end];
        if unescape(tag).contains(marker) {
            let end = tag_end + dom[tag_end..].find(&close).context("unclosed element")?;
            let mut text = String::new();
            let mut in_tag = false;
            for c in dom[tag_end + 1..end].chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => {
                        in_tag = false;
                        text.push(' ');
                    }
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            let text = unescape(&text)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            return Ok((unescape(tag), text));
        }
        from = tag_end;
    }
    bail!("no <{name}> with {marker} in the page:\n{dom}")
}

/// What marks a topic's row on `/`.
fn topic_row(topic: &str) -> String {
    format!("class=\"topic\" data-topic=\"{topic}\"")
}

/// Value of attribute `name` in start tag `tag`.
fn attr(tag: &str, name: &str) -> anyhow::Result<String> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key).with_context(|| format!("{name} in {tag}"))? + key.len();
    let len = tag[i..].find('"').context("unterminated attribute")?;
    Ok(tag[i..i + len].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lossy_topic_shows_its_exact_loss_in_chromium() -> anyhow::Result<()> {
    // Before anything runs: without a browser this test cannot pass.
    chromium()?;
    let id = unique("web");
    let healthy = format!("{id}-healthy");
    let lossy = format!("{id}-lossy");
    let audit_topic = format!("{id}-audit");
    for t in [&healthy, &lossy] {
        create_topic(&regional_bootstrap(), t, 3).await?;
    }
    create_topic(&regional_bootstrap(), &audit_topic, 1).await?;
    create_topic(&aggregate_bootstrap(), &audit_topic, 1).await?;
    // MirrorMaker picks new topics up on its refresh interval: start once the copies exist,
    // so the aggregate tier is not judged silent while the mirror has not started.
    let copies = [format!("regional.{healthy}"), format!("regional.{lossy}")];
    wait_for_topics(&aggregate_bootstrap(), &copies, Duration::from_secs(300)).await?;
    let db = TestDb::create().await?;
    let received = Receiver::start().await?;
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        topics_regex: format!("{healthy}|{lossy}"),
        bucket_width: "10s".into(),
        reconcile: "interval = \"1s\"\nallowed_lateness = \"3s\"\nsettle = \"2s\"\n\
                    max_wait = \"90s\"\ninstance_timeout = \"45s\""
            .into(),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"browser\"\nurl = \"{}\"\n\
             [alerts.webhooks.filters]\ntopics = [\"{lossy}\"]\n",
            received.url()
        ),
        regional_exclude: Vec::new(),
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    let outcome = scenario(&db, &pipeline, &healthy, &lossy, &audit_topic).await;
    pipeline.finish(outcome, db).await
}

async fn scenario(
    db: &TestDb,
    pipeline: &Pipeline,
    healthy: &str,
    lossy: &str,
    audit_topic: &str,
) -> anyhow::Result<()> {
    let producer = TestProducer::new(
        &regional_client(),
        audit_topic,
        &prometheus::Registry::new(),
    )?;
    // LOST messages of the lossy topic counted as acknowledged that never reach Kafka.
    producer
        .send_numbered(&[healthy, lossy], MESSAGES_PER_TOPIC, Some((lossy, LOST)))
        .await?;
    producer.shutdown().await;

    let produced = MESSAGES_PER_TOPIC as i64;
    let expected_lossy = produced + LOST as i64;
    eventually(
        "final verdicts of both topics on both edges, the notification sent",
        Duration::from_secs(180),
        || async {
            let unsent = unsent_notifications(&db.pool).await?;
            let (h, l) = (
                verdicts(&db.pool, healthy).await?,
                verdicts(&db.pool, lossy).await?,
            );
            Ok(
                (edge_totals(&h, "producer->regional") == (produced, produced)
                    && edge_totals(&h, "regional->aggregate") == (produced, produced)
                    && edge_totals(&l, "producer->regional") == (expected_lossy, produced)
                    && edge_totals(&l, "regional->aggregate") == (produced, produced)
                    && unsent == 0
                    && !received_nothing(pipeline).await?)
                    .then_some(()),
            )
        },
    )
    .await?;

    let base = format!("http://{}", pipeline.collector_addr);
    // `/`: the lossy topic first with its open incident and the exact loss of its worst
    // bucket; the healthy one with no incident and nothing missing.
    let index = load(&format!("{base}/"), "index.png").await?;
    let (lossy_row, lossy_text) = element(&index, "tr", &topic_row(lossy))?;
    let (healthy_row, healthy_text) = element(&index, "tr", &topic_row(healthy))?;
    ensure!(
        index.find(&topic_row(lossy)) < index.find(&topic_row(healthy)),
        "the lossy topic is not listed first"
    );
    ensure!(
        attr(&lossy_row, "data-open-incidents")? == "1",
        "lossy row: {lossy_row}"
    );
    ensure!(
        lossy_text.contains(&format!("worst bucket {LOST} missing")),
        "lossy row text: {lossy_text}"
    );
    ensure!(
        attr(&healthy_row, "data-open-incidents")? == "0"
            && attr(&healthy_row, "data-missing")? == "0",
        "healthy row: {healthy_row}"
    );
    ensure!(
        !healthy_text.contains("missing") && !healthy_text.contains("duplicated"),
        "healthy row text: {healthy_text}"
    );
    let (incident_row, _) = element(
        &index,
        "tr",
        &format!("data-topic=\"{lossy}\" data-max-missing"),
    )?;
    ensure!(
        attr(&incident_row, "data-max-missing")? == LOST.to_string(),
        "incident row: {incident_row}"
    );
    let incident_id = attr(&incident_row, "data-id")?;

    // The lossy topic's page: the exact count on the edge that lost it, none on the other.
    let page = load(&format!("{base}/topics/{lossy}"), "topic-lossy.png").await?;
    let (summary, text) = element(
        &page,
        "tr",
        "class=\"edge-summary\" data-edge=\"producer->regional\"",
    )?;
    ensure!(
        attr(&summary, "data-missing")? == LOST.to_string(),
        "summary: {summary}"
    );
    ensure!(
        text.contains(&format!("{LOST} missing")),
        "summary text: {text}"
    );
    let (mirror, text) = element(
        &page,
        "tr",
        "class=\"edge-summary\" data-edge=\"regional->aggregate\"",
    )?;
    ensure!(
        attr(&mirror, "data-missing")? == "0" && text.contains("none missing"),
        "mirror summary: {mirror} {text}"
    );
    let (mark, mark_text) = element(&page, "g", "class=\"mark missing\"")?;
    ensure!(
        attr(&mark, "data-difference")? == format!("-{LOST}") && mark_text == format!("-{LOST}"),
        "chart mark: {mark} {mark_text}"
    );

    // The healthy topic's page: nothing missing anywhere, no marked bucket.
    let page = load(&format!("{base}/topics/{healthy}"), "topic-healthy.png").await?;
    ensure!(
        !page.contains("class=\"mark "),
        "a bucket of the healthy topic is marked"
    );
    ensure!(
        !page.contains("err missing-count"),
        "the healthy topic shows missing messages"
    );
    ensure!(page.matches("none missing").count() >= 2, "healthy summary");

    // The incident: the exact loss and the notification delivered.
    let page = load(&format!("{base}/incidents/{incident_id}"), "incident.png").await?;
    let (facts, _) = element(&page, "dl", "id=\"incident\"")?;
    ensure!(
        attr(&facts, "data-missing")? == LOST.to_string()
            && attr(&facts, "data-notifications-sent")? == "1",
        "incident facts: {facts}"
    );
    Ok(())
}

/// Whether the collector has sent no notification yet (its API lists the incident's
/// deliveries).
async fn received_nothing(pipeline: &Pipeline) -> anyhow::Result<bool> {
    let url = format!("http://{}/api/v1/alerts", pipeline.collector_addr);
    let alerts: serde_json::Value = reqwest::get(&url).await?.error_for_status()?.json().await?;
    Ok(!alerts["alerts"]
        .as_array()
        .is_some_and(|a| a.iter().any(|a| a["notifications_sent"].as_i64() > Some(0))))
}
