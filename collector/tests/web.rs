//! The status pages against the real stack: counts produced to Kafka and stored by the
//! collector's ingest, judged by the reconciler and notified by the alert sender; every page
//! is rendered by the running collector and its numbers are checked against the JSON API.
//! Also: the login when a token is set, open pages without one, 404s and 400s naming the bad
//! parameter.

mod ingest_support;
mod reconcile_support;

use std::collections::BTreeMap;
use std::time::Duration;

use chaperone_audit::{AuditRecord, BucketWidth, Progress, Tier};
use chaperone_collector::alerts::{AlertMetrics, AlertSender, AlertsConfig, WebhookConfig};
use chaperone_test_support::{Receiver, TestDb, eventually, unique};
use ingest_support::{BUCKET, InProcess, Topics, counts, ingest_db, observer};
use reqwest::redirect::Policy;
use serde_json::Value;

const TOKEN: &str = "web-test-token-51c2";
const WIDTH: i64 = 60_000;
const B0: i64 = BUCKET;
const B1: i64 = BUCKET + WIDTH;

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("http client")
}

/// One start tag: its name and attributes, entities decoded.
#[derive(Debug, Clone)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
}

impl Tag {
    fn get(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }

    fn has_class(&self, class: &str) -> bool {
        self.get("class").split(' ').any(|c| c == class)
    }
}

fn unescape(s: &str) -> String {
    s.replace("&gt;", ">")
        .replace("&lt;", "<")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Every start tag of `html`, in order (maud escapes `>` inside attribute values).
fn tags(html: &str) -> Vec<Tag> {
    let tag = regex::Regex::new(r"<([a-zA-Z][a-zA-Z0-9]*)((?:\s[^>]*)?)>").expect("regex");
    let attr = regex::Regex::new(r#"([a-zA-Z_:][-a-zA-Z0-9_:.]*)(?:="([^"]*)")?"#).expect("regex");
    tag.captures_iter(html)
        .map(|c| Tag {
            name: c[1].to_owned(),
            attrs: attr
                .captures_iter(&c[2])
                .map(|a| {
                    (
                        a[1].to_owned(),
                        unescape(a.get(2).map_or("", |m| m.as_str())),
                    )
                })
                .collect(),
        })
        .collect()
}

fn with_class<'a>(tags: &'a [Tag], name: &str, class: &str) -> Vec<&'a Tag> {
    tags.iter()
        .filter(|t| t.name == name && t.has_class(class))
        .collect()
}

/// `null` as the pages write a missing number.
fn num(v: &Value) -> String {
    match v {
        Value::Null => "–".to_owned(),
        other => other.to_string().trim_matches('"').to_owned(),
    }
}

/// A session on a collector: the login cookie, if any.
struct Session {
    base: String,
    cookie: Option<String>,
}

impl Session {
    async fn page(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut req = client().get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    async fn ok_page(&self, path: &str) -> anyhow::Result<Vec<Tag>> {
        let (status, body) = self.page(path).await?;
        anyhow::ensure!(status == 200, "{path}: {status}: {body}");
        Ok(tags(&body))
    }

    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let mut req = client().get(format!("{}{path}", self.base));
        req = req.bearer_auth(TOKEN);
        let resp = req.send().await?;
        anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
        Ok(resp.json().await?)
    }
}

/// Logs in through the form; returns the cookie to send.
async fn login(base: &str, token: &str, next: &str) -> anyhow::Result<reqwest::Response> {
    Ok(client()
        .post(format!("{base}/login"))
        .form(&[("token", token), ("next", next)])
        .send()
        .await?)
}

fn progress(topic: &str, tier: Tier, partition: Option<i32>, watermark_ms: i64) -> AuditRecord {
    let consumer = tier != Tier::Producer;
    AuditRecord::Progress(Progress {
        id: unique("progress"),
        topic: topic.into(),
        physical_topic: topic.into(),
        partition,
        observer: observer(tier, "dc1", "host"),
        position: consumer.then_some(1_000),
        high_watermark: consumer.then_some(1_000),
        watermark_ms,
        bucket_width: BucketWidth::default(),
        emitted_at_ms: watermark_ms,
        closing: false,
        at_least_once: false,
    })
}

/// Two buckets of `topic` on two partitions counted by all three tiers, with `lost` messages
/// of partition 1 of the first bucket never reaching the regional cluster; every tier past
/// both buckets.
fn records(topic: &str, lost: usize) -> Vec<AuditRecord> {
    let lat = |n: usize, base: i64| -> Vec<i64> { (0..n as i64).map(|i| base + i * 7).collect() };
    let mut out = Vec::new();
    for (tier, base) in [
        (Tier::Producer, 3),
        (Tier::Regional, 40),
        (Tier::Aggregate, 900),
    ] {
        let seen_p1 = if tier == Tier::Producer {
            40
        } else {
            40 - lost
        };
        for (bucket, partition, n) in [(B0, 0, 60), (B0, 1, seen_p1), (B1, 0, 50)] {
            out.push(AuditRecord::Counts(counts(
                &unique("counts"),
                topic,
                Some(partition),
                bucket,
                observer(tier.clone(), "dc1", "host"),
                &lat(n, base),
            )));
        }
        // Caught up as of the reconciler's clock (`seed`).
        let past = B1 + WIDTH + 10 * reconcile_support::LATENESS;
        if tier == Tier::Producer {
            out.push(progress(topic, tier, None, past));
        } else {
            for p in [0, 1] {
                out.push(progress(topic, tier.clone(), Some(p), past));
            }
        }
    }
    out
}

fn webhook(name: &str, url: String) -> WebhookConfig {
    toml::from_str(&format!("name = \"{name}\"\nurl = \"{url}\"\n")).expect("webhook")
}

/// Seeds `lossy` (12 lost) and `healthy` through Kafka and ingest, judges them and sends the
/// notifications: one webhook that answers, one that is down.
async fn seed(db: &TestDb, topics: &Topics, lossy: &str, healthy: &str) -> anyhow::Result<()> {
    let mut all = records(lossy, 12);
    all.extend(records(healthy, 0));
    ingest_support::produce(topics, &ingest_support::encode_all(&all)).await?;
    ingest_support::wait_caught_up(&db.pool, topics, Duration::from_secs(60)).await?;

    let mut config = reconcile_support::config();
    for edge in &mut config.edges {
        edge.partition_level = edge.from == "producer";
    }
    let (r, clock) = reconcile_support::reconciler(
        &db.pool,
        config,
        B1 + WIDTH + 10 * reconcile_support::LATENESS,
    );
    eventually("the loss judged", Duration::from_secs(30), || async {
        reconcile_support::rejudge(&r, &clock).await;
        let v = reconcile_support::verdict(&db.pool, lossy, "producer->regional", B0).await;
        let h = reconcile_support::verdict(&db.pool, healthy, "regional->aggregate", B1).await;
        Ok((v.is_some_and(|v| v.missing == 12) && h.is_some()).then_some(()))
    })
    .await?;

    let receiver = Receiver::start().await?;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let down = format!("http://{}/hook", closed.local_addr()?);
    drop(closed);
    let config = AlertsConfig {
        request_timeout: Duration::from_secs(2),
        webhooks: vec![webhook("ops", receiver.url()), webhook("down", down)],
        ..AlertsConfig::default()
    };
    let metrics = AlertMetrics::new(&prometheus::Registry::new())?;
    let sender = AlertSender::new(db.pool.clone(), config, clock.clock(), metrics)?;
    let report = sender.run_once().await?;
    anyhow::ensure!(report.sent == 1, "one notification sent: {report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_the_same_numbers_as_the_api() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(2).await?;
    let lossy = unique("web-lossy");
    let healthy = unique("web-healthy");
    let collector = InProcess::start(
        ingest_support::config(&db, &topics),
        db.pool.clone(),
        Some(TOKEN),
    )
    .await?;
    seed(&db, &topics, &lossy, &healthy).await?;

    let base = collector.url("");
    let resp = login(&base, TOKEN, "/").await?;
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let s = Session { base, cookie };

    // `/`: the latest verdict per topic and edge as `/api/v1/topics`, open incidents as
    // `/api/v1/alerts?status=open`, the lossy topic first.
    let index = s.ok_page("/").await?;
    let api_topics = s.api("/api/v1/topics").await?;
    let open = s.api("/api/v1/alerts?status=open").await?;
    let rows = with_class(&index, "tr", "topic");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].get("data-topic"), lossy, "worst first");
    let mut current = String::new();
    let mut shown: BTreeMap<(String, String, String), &Tag> = BTreeMap::new();
    for t in &index {
        if t.name == "tr" && t.has_class("topic") {
            current = t.get("data-topic").to_owned();
        } else if t.name == "div" && t.has_class("verdict") {
            let key = (
                current.clone(),
                t.get("data-edge").to_owned(),
                t.get("data-datacenter").to_owned(),
            );
            shown.insert(key, t);
        }
    }
    let mut compared = 0;
    for topic in api_topics["topics"].as_array().expect("topics") {
        let name = topic["topic"].as_str().expect("name");
        let row = rows
            .iter()
            .find(|r| r.get("data-topic") == name)
            .expect("topic row");
        let incidents = open["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["topic"] == name)
            .count();
        assert_eq!(
            row.get("data-open-incidents"),
            incidents.to_string(),
            "{name}"
        );
        for v in topic["latest_verdicts"].as_array().expect("verdicts") {
            let key = (
                name.to_owned(),
                num(&v["edge"]),
                v["datacenter"].as_str().unwrap_or("").to_owned(),
            );
            let tag = shown.get(&key).unwrap_or_else(|| panic!("{key:?} shown"));
            for (attr, field) in [
                ("data-status", "status"),
                ("data-expected", "expected"),
                ("data-actual", "actual"),
                ("data-missing", "missing"),
                ("data-bucket", "bucket_start_ms"),
            ] {
                assert_eq!(tag.get(attr), num(&v[field]), "{key:?} {field}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 4, "two edges of two topics");
    assert_eq!(shown.len(), 4);
    let lossy_row = rows[0];
    assert_eq!(lossy_row.get("data-open-incidents"), "1");
    assert_eq!(rows[1].get("data-open-incidents"), "0");
    assert_eq!(rows[1].get("data-missing"), "0");
    for tier in ["producer", "regional", "aggregate"] {
        assert!(
            index
                .iter()
                .any(|t| t.has_class("lag") && t.get("data-tier") == tier),
            "watermark lag of {tier}"
        );
    }

    // `/topics/{topic}`: buckets as `/buckets`, verdicts as `/verdicts`, over the same range.
    let range = format!("from={B0}&to={}", B1 + WIDTH);
    let page = s.ok_page(&format!("/topics/{lossy}?{range}")).await?;
    let buckets = s
        .api(&format!("/api/v1/topics/{lossy}/buckets?{range}"))
        .await?;
    let cells = with_class(&page, "tr", "bucket-tier");
    let mut n = 0;
    for b in buckets["buckets"].as_array().expect("buckets") {
        for t in b["tiers"].as_array().expect("tiers") {
            let row = cells
                .iter()
                .find(|c| {
                    c.get("data-bucket") == num(&b["bucket_start_ms"])
                        && c.get("data-tier") == num(&t["tier"])
                })
                .expect("bucket row");
            assert_eq!(row.get("data-count"), num(&t["count"]));
            for q in ["p50", "p95", "p99", "max"] {
                assert_eq!(
                    row.get(&format!("data-{q}")),
                    num(&t["latency_ms"][q]),
                    "{q}"
                );
            }
            n += 1;
        }
    }
    assert_eq!((n, cells.len()), (6, 6), "two buckets, three tiers");
    let verdicts = s.api(&format!("/api/v1/verdicts?{range}")).await?;
    let rows = with_class(&page, "tr", "verdict");
    let mut n = 0;
    for v in verdicts["verdicts"].as_array().expect("verdicts") {
        if v["topic"] != lossy.as_str() {
            continue;
        }
        let partition = v["partition"].as_i64().unwrap_or(-1).to_string();
        let datacenter = v["datacenter"].as_str().unwrap_or("");
        let row = rows
            .iter()
            .find(|r| {
                r.get("data-edge") == num(&v["edge"])
                    && r.get("data-datacenter") == datacenter
                    && r.get("data-partition") == partition
                    && r.get("data-bucket") == num(&v["bucket_start_ms"])
            })
            .unwrap_or_else(|| panic!("verdict row {v}"));
        for f in [
            "status",
            "expected",
            "actual",
            "difference",
            "missing",
            "revisions",
        ] {
            assert_eq!(row.get(&format!("data-{f}")), num(&v[f]), "{f} of {v}");
        }
        n += 1;
    }
    assert_eq!(n, rows.len(), "every verdict row is one of the API's");
    let partition_1: Vec<_> = rows
        .iter()
        .filter(|r| r.get("data-partition") == "1" && r.get("data-bucket") == B0.to_string())
        .collect();
    assert_eq!(partition_1.len(), 1, "partition-level verdict: {rows:?}");
    assert_eq!(partition_1[0].get("data-missing"), "12");
    let summary = with_class(&page, "tr", "edge-summary");
    let lost = summary
        .iter()
        .find(|r| r.get("data-edge") == "producer->regional")
        .expect("summary of producer->regional");
    assert_eq!(lost.get("data-missing"), "12");
    let marks = with_class(&page, "g", "mark");
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].get("data-difference"), "-12");
    assert_eq!(marks[0].get("data-bucket"), B0.to_string());
    let latency = with_class(&page, "tr", "tier-latency");
    assert_eq!(latency.len(), 3);
    let producer = latency
        .iter()
        .find(|r| r.get("data-tier") == "producer")
        .expect("producer latency");
    assert_eq!(producer.get("data-count"), "150");
    assert_eq!(producer.get("data-samples"), "150");
    let healthy_page = s.ok_page(&format!("/topics/{healthy}?{range}")).await?;
    assert!(with_class(&healthy_page, "g", "mark").is_empty());
    for r in with_class(&healthy_page, "tr", "edge-summary") {
        assert_eq!(r.get("data-missing"), "0", "{r:?}");
    }

    // `/incidents/{id}`: as `/api/v1/alerts`, with one notification sent and one pending.
    let alerts = s.api("/api/v1/alerts").await?;
    let alert = alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .find(|a| a["topic"] == lossy.as_str())
        .expect("the lossy topic's incident")
        .clone();
    let page = s.ok_page(&format!("/incidents/{}", alert["id"])).await?;
    let facts = page
        .iter()
        .find(|t| t.get("id") == "incident")
        .expect("incident facts");
    for (attr, field) in [
        ("data-status", "status"),
        ("data-buckets", "buckets"),
        ("data-bad-buckets", "bad_buckets"),
        ("data-max-missing", "max_missing"),
        ("data-notifications-sent", "notifications_sent"),
        ("data-notifications-pending", "notifications_pending"),
        ("data-notifications-parked", "notifications_parked"),
    ] {
        assert_eq!(facts.get(attr), num(&alert[field]), "{field}");
    }
    assert_eq!(facts.get("data-missing"), "12");
    assert_eq!(
        (
            facts.get("data-notifications-sent"),
            facts.get("data-notifications-pending")
        ),
        ("1", "1")
    );
    let deliveries = with_class(&page, "tr", "delivery");
    let states: Vec<(&str, &str)> = deliveries
        .iter()
        .map(|d| (d.get("data-webhook"), d.get("data-state")))
        .collect();
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(states.contains(&("ops", "sent")), "{states:?}");
    assert!(states.contains(&("down", "pending")), "{states:?}");
    let buckets = with_class(&page, "tr", "verdict");
    assert_eq!(buckets.len(), 1);
    assert_eq!(
        (
            buckets[0].get("data-expected"),
            buckets[0].get("data-actual")
        ),
        ("100", "88")
    );

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_the_token_when_one_is_set() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    let collector = InProcess::start(
        ingest_support::config(&db, &topics),
        db.pool.clone(),
        Some(TOKEN),
    )
    .await?;
    let base = collector.url("");
    for (path, next) in [
        ("/", "%2F"),
        ("/topics/orders?from=1", "%2Ftopics%2Forders%3Ffrom%3D1"),
        ("/incidents/1", "%2Fincidents%2F1"),
    ] {
        let resp = client().get(format!("{base}{path}")).send().await?;
        assert_eq!(resp.status().as_u16(), 303, "{path}");
        assert_eq!(
            resp.headers()["location"].to_str()?,
            format!("/login?next={next}"),
            "{path}"
        );
        // A wrong cookie or bearer token is no better, nor the token itself as a cookie.
        for cookie in [
            format!("chaperone_session={}", "ab".repeat(32)),
            format!("chaperone_session={}", hex::encode(TOKEN)),
            format!("chaperone_token={}", hex::encode(TOKEN)),
        ] {
            let resp = client()
                .get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            assert_eq!(resp.status().as_u16(), 303, "{path} with {cookie}");
        }
        let resp = client()
            .get(format!("{base}{path}"))
            .bearer_auth("nope")
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 303, "{path} with a wrong bearer");
    }
    let form = client()
        .get(format!("{base}/login?next=%2F"))
        .send()
        .await?;
    assert_eq!(form.status().as_u16(), 200);
    assert!(form.text().await?.contains("name=\"token\""));

    let wrong = login(&base, "not-the-token", "/").await?;
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    assert!(wrong.text().await?.contains("not this collector"));

    let right = login(&base, TOKEN, "/topics/orders").await?;
    assert_eq!(right.status().as_u16(), 303);
    assert_eq!(right.headers()["location"], "/topics/orders");
    let set = right.headers()["set-cookie"].to_str()?.to_owned();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    for a in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=43200"] {
        assert!(attrs.contains(&a), "{a} in {set}");
    }
    assert!(!attrs.contains(&"Secure"), "plain http: {set}");
    let cookie = attrs[0].to_owned();
    let id = session_id(&cookie);
    // The cookie is a random id, not the token nor anything computed from it: another login
    // with the same token gets another id, and the store keeps only the id's hash.
    assert!(
        !id.contains(&hex::encode(TOKEN)) && !id.contains(TOKEN),
        "{cookie}"
    );
    // No open redirect.
    let away = login(&base, TOKEN, "//elsewhere.example/").await?;
    assert_eq!(away.headers()["location"], "/");
    let other = away.headers()["set-cookie"].to_str()?.to_owned();
    assert_ne!(session_id(&other), id, "two logins, two ids");
    assert_eq!(stored_sessions(&db, &id).await?, (1, 0));

    let s = Session {
        base: base.clone(),
        cookie: Some(cookie),
    };
    let (status, body) = s.page("/").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Log out"));
    let resp = client()
        .get(format!("{base}/"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    // The cookie opens the pages, not the API.
    let resp = client()
        .get(format!("{base}/api/v1/topics"))
        .header("cookie", s.cookie.clone().expect("cookie"))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    // Logging out deletes the session: the same cookie no longer opens a page.
    let out = client()
        .post(format!("{base}/logout"))
        .header("cookie", s.cookie.clone().expect("cookie"))
        .send()
        .await?;
    assert_eq!(out.status().as_u16(), 303);
    assert_eq!(out.headers()["location"], "/login");
    let cleared = out.headers()["set-cookie"].to_str()?;
    assert!(
        cleared.starts_with("chaperone_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert_eq!(stored_sessions(&db, &id).await?, (0, 0));
    let (status, _) = s.page("/").await?;
    assert_eq!(status, 303, "a revoked session is refused");

    collector.stop().await?;
    db.drop_db().await
}

/// The session id in a `Set-Cookie` or `Cookie` value: 64 hex digits.
fn session_id(cookie: &str) -> String {
    let pair = cookie.split(';').next().expect("pair");
    let id = pair
        .strip_prefix("chaperone_session=")
        .unwrap_or_else(|| panic!("{cookie}"));
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{cookie}"
    );
    id.to_owned()
}

/// Stored sessions whose id hashes to `id`'s SHA-256, and rows holding `id` itself.
async fn stored_sessions(db: &TestDb, id: &str) -> anyhow::Result<(i64, i64)> {
    use sha2::Digest as _;
    let raw = hex::decode(id)?;
    let hashed = sha2::Sha256::digest(&raw).to_vec();
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE id_sha256 = $1), count(*) FILTER (WHERE id_sha256 = $2) \
         FROM web_sessions",
    )
    .bind(hashed)
    .bind(raw)
    .fetch_one(&db.pool)
    .await?)
}

/// A wall clock moved forward by what the test adds.
#[derive(Clone, Default)]
struct Ahead(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl Ahead {
    fn clock(&self) -> chaperone_collector::Clock {
        let ahead = self.clone();
        chaperone_collector::Clock::from_fn(move || {
            chrono::Utc::now()
                + chrono::Duration::milliseconds(ahead.0.load(std::sync::atomic::Ordering::SeqCst))
        })
    }

    fn add(&self, d: Duration) {
        self.0.fetch_add(
            i64::try_from(d.as_millis()).expect("ms"),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

/// The collector in process with `token` and the clock `ahead`; the status page's public URL
/// is https.
async fn start_https(
    db: &TestDb,
    topics: &Topics,
    token: &str,
    ahead: &Ahead,
) -> anyhow::Result<InProcess> {
    let mut config = ingest_support::config(db, topics);
    config.alerts.public_url = Some("https://status.chaperone.test".into());
    config.api.session_ttl = Duration::from_secs(600);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let registry = prometheus::Registry::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let deps = chaperone_collector::Deps {
        pool: db.pool.clone(),
        listener,
        registry: registry.clone(),
        clock: ahead.clock(),
        api_token: Some(token.to_owned()),
    };
    let task = tokio::spawn(chaperone_collector::run(config, deps, shutdown.clone()));
    Ok(InProcess {
        shutdown,
        addr,
        registry,
        task,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_secure_behind_https_expire_and_end_with_the_token() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    let ahead = Ahead::default();
    let collector = start_https(&db, &topics, TOKEN, &ahead).await?;
    let base = collector.url("");

    let right = login(&base, TOKEN, "/").await?;
    assert_eq!(right.status().as_u16(), 303);
    let set = right.headers()["set-cookie"].to_str()?.to_owned();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    assert!(attrs.contains(&"Secure"), "public_url is https: {set}");
    assert!(attrs.contains(&"Max-Age=600"), "{set}");
    let id = session_id(&set);
    let s = Session {
        base: base.clone(),
        cookie: Some(attrs[0].to_owned()),
    };
    assert_eq!(s.page("/").await?.0, 200);
    let out = client().post(format!("{base}/logout")).send().await?;
    assert!(
        out.headers()["set-cookie"].to_str()?.contains("Secure"),
        "the cleared cookie matches"
    );

    // Past api.session_ttl the session is refused and its row deleted.
    ahead.add(Duration::from_secs(599));
    assert_eq!(s.page("/").await?.0, 200, "not expired yet");
    ahead.add(Duration::from_secs(2));
    assert_eq!(s.page("/").await?.0, 303, "expired");
    assert_eq!(stored_sessions(&db, &id).await?, (0, 0));

    // A new API token ends the sessions opened with the old one.
    let fresh = login(&base, TOKEN, "/").await?;
    let fresh = Session {
        base: base.clone(),
        cookie: Some(format!(
            "chaperone_session={}",
            session_id(fresh.headers()["set-cookie"].to_str()?)
        )),
    };
    assert_eq!(fresh.page("/").await?.0, 200);
    collector.stop().await?;
    let rotated = start_https(&db, &topics, "web-test-token-rotated", &ahead).await?;
    let fresh = Session {
        base: rotated.url(""),
        cookie: fresh.cookie,
    };
    assert_eq!(fresh.page("/").await?.0, 303, "opened with the old token");

    rotated.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_client() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    let ahead = Ahead::default();
    let collector = start_https(&db, &topics, TOKEN, &ahead).await?;
    let base = collector.url("");

    for n in 1..=5 {
        let wrong = login(&base, &format!("guess-{n}"), "/").await?;
        assert_eq!(wrong.status().as_u16(), 401, "failure {n}");
        assert!(wrong.headers().get("retry-after").is_none());
    }
    // The sixth within the minute is refused without being checked, the right token too:
    // a locked-out client waits for the end of its window.
    for token in ["guess-6", TOKEN] {
        let refused = login(&base, token, "/").await?;
        assert_eq!(refused.status().as_u16(), 429);
        assert!(refused.headers().get("set-cookie").is_none());
        let retry: u64 = refused.headers()["retry-after"].to_str()?.parse()?;
        assert!((1..=60).contains(&retry), "Retry-After: {retry}");
        assert!(refused.text().await?.contains("Too many failed logins"));
    }
    // The bearer token still opens the pages.
    let resp = client()
        .get(format!("{base}/"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);

    // Once the window has passed, the right token logs in.
    ahead.add(Duration::from_secs(61));
    let right = login(&base, TOKEN, "/").await?;
    assert_eq!(right.status().as_u16(), 303);
    session_id(right.headers()["set-cookie"].to_str()?);

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_open_without_a_token_and_bad_requests_are_named() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(1).await?;
    let collector =
        InProcess::start(ingest_support::config(&db, &topics), db.pool.clone(), None).await?;
    let topic = unique("web-open");
    let mut seeded = records(&topic, 0);
    seeded.truncate(3);
    ingest_support::produce(&topics, &ingest_support::encode_all(&seeded)).await?;
    ingest_support::wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;
    let s = Session {
        base: collector.url(""),
        cookie: None,
    };
    let index = s.ok_page("/").await?;
    let rows = with_class(&index, "tr", "topic");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get("data-status"), "unjudged");
    assert_eq!(
        s.ok_page("/?status=unjudged&q=web-open").await?.len(),
        index.len()
    );
    let none = s.ok_page("/?status=missing").await?;
    assert!(with_class(&none, "tr", "topic").is_empty());
    s.ok_page(&format!("/topics/{topic}?from={B0}&to={B1}"))
        .await?;
    let resp = client().get(format!("{}/login", s.base)).send().await?;
    assert_eq!(resp.status().as_u16(), 303, "nothing to log in to");

    for (path, param) in [
        ("/?status=lost".to_owned(), "status"),
        ("/?page=0".to_owned(), "page"),
        ("/?page=2".to_owned(), "page"),
        ("/?page=two".to_owned(), "page"),
        ("/?colour=red".to_owned(), "colour"),
        ("/?q=a&q=b".to_owned(), "q"),
        (format!("/topics/{topic}?from=yesterday"), "from"),
        (format!("/topics/{topic}?from=2000&to=1000"), "from"),
        (format!("/topics/{topic}?to=1&to=2"), "to"),
        (format!("/topics/{topic}?from=0&to=1764067200000"), "from"),
        ("/incidents/abc".to_owned(), "id"),
        ("/incidents/-3".to_owned(), "id"),
        ("/incidents/1?verbose=1".to_owned(), "verbose"),
        ("/login?back=%2F".to_owned(), "back"),
    ] {
        let (status, body) = s.page(&path).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains(&format!("invalid parameter `{param}`")),
            "{path}: {body}"
        );
    }
    for path in [
        format!("/topics/{}", unique("nothing")),
        "/incidents/987654".to_owned(),
    ] {
        let (status, body) = s.page(&path).await?;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("no "), "{path}: {body}");
    }

    collector.stop().await?;
    db.drop_db().await
}
