//! Hostile input against the real collector binary: records built to exhaust its memory, to
//! pass the decoder but not PostgreSQL's limits, to be refused by the dead-letter topic, and
//! every case of the decoder's fuzz corpus, sent to one cluster's audit topic between good
//! records while a second cluster's audit topic is written all along.
//!
//! What must hold, as a person running the collector would see it: the process stays up
//! with a peak RSS under [`PEAK_RSS_BOUND`]; every good record of either cluster is stored
//! within [`STORED_WITHIN`] of being acknowledged by Kafka; each bad record is on the
//! dead-letter topic with the reason the decoder gives it, or parked in PostgreSQL when the
//! dead-letter topic would not take it; and the writer never had to retry a PostgreSQL write.

mod ingest_support;

use std::time::Duration;

use anyhow::Context as _;
use chaperone_audit::{AuditRecord, Tier};
use chaperone_collector::ingest::reason_label;
use chaperone_test_support::{regional_bootstrap, regional2_bootstrap};
use ingest_support::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};

/// Longest a good record may take from Kafka's acknowledgement to being stored.
const STORED_WITHIN: Duration = Duration::from_secs(30);
/// Peak resident set size the collector must stay under through the whole test.
const PEAK_RSS_BOUND: u64 = 512 * 1024 * 1024;
/// `ingest.dlq_timeout` of the collector under test: how long a dead letter may wait for
/// its acknowledgement before it is parked.
const DLQ_TIMEOUT: &str = "5s";
/// The 40-byte V2 header that claims a payload of 0xFFFFFFFF bytes.
const HUGE_HEADER: &str = "HISTE/////8AAAAAAAAAAgAAAAAAAAABAAAAACQMhAA/8AAAAAAAAA==";

/// What a bad record must come to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    DeadLettered(String),
    Parked(String),
}

/// One record sent to the hostile cluster.
struct Case {
    what: String,
    payload: Vec<u8>,
    /// `None` for a good record (stored).
    fate: Option<Fate>,
}

/// A counts record of `topic` with one message, as JSON, for editing.
fn good_json(topic: &str, id: &str) -> Value {
    let mut c = counts(
        id,
        topic,
        Some(0),
        BUCKET,
        observer(Tier::Producer, "dc1", "h"),
        &[7],
    );
    c.observer.cluster = "regional".into();
    serde_json::from_slice(&AuditRecord::Counts(c).encode()).expect("a record is JSON")
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializes")
}

/// A string of `n` scrambled Cyrillic letters (two bytes each in UTF-8).
fn cyrillic(n: usize) -> String {
    (0..n)
        .map(|i| char::from_u32(0x0430 + (i as u32 * 7_919 + 13) % 32).expect("Cyrillic"))
        .collect()
}

/// The bad records, each with its fate.
fn hostile_cases(topic: &str) -> anyhow::Result<Vec<Case>> {
    let mut cases = Vec::new();
    let dead = |reason: &str| Some(Fate::DeadLettered(reason.to_owned()));

    // A latency header claiming 4 GiB, several times: each used to be allocated before
    // anything checked it.
    for i in 0..20 {
        let mut v = good_json(topic, &unique("huge-header"));
        v["latency"] = json!(HUGE_HEADER);
        cases.push(Case {
            what: format!("latency header claiming 0xFFFFFFFF bytes #{i}"),
            payload: bytes(&v),
            fate: dead("histogram"),
        });
    }
    // A compressed latency that inflates far past any histogram.
    {
        use std::io::Write as _;
        let mut inner = 0x1c84_9313u32.to_be_bytes().to_vec();
        inner.extend(std::iter::repeat_n(0u8, 8 << 20));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&inner)?;
        let packed = z.finish()?;
        let mut bomb = 0x1c84_9314u32.to_be_bytes().to_vec();
        bomb.extend(u32::try_from(packed.len())?.to_be_bytes());
        bomb.extend(packed);
        let mut v = good_json(topic, &unique("bomb"));
        v["latency"] = json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            bomb
        ));
        cases.push(Case {
            what: "compressed latency inflating to 8 MiB".into(),
            payload: bytes(&v),
            fate: dead("histogram"),
        });
    }
    // Names that pass a limit in characters but not PostgreSQL's index row limit.
    {
        let p = progress(&unique("cyrillic"), topic, 0, BUCKET, 1);
        let mut v: Value = serde_json::from_slice(&AuditRecord::Progress(p).encode())?;
        for field in ["tier", "datacenter", "cluster", "host", "instance"] {
            v[field] = json!(cyrillic(255));
        }
        cases.push(Case {
            what: "progress record with 255 Cyrillic letters in each name".into(),
            payload: bytes(&v),
            fate: dead("string_length"),
        });
    }
    // A NUL byte, which PostgreSQL's text cannot hold.
    {
        let mut v = good_json(topic, &unique("nul"));
        v["host"] = json!("web\u{0}1");
        cases.push(Case {
            what: "NUL in a name".into(),
            payload: bytes(&v),
            fate: dead("nul_character"),
        });
    }
    // A record near 1.5 MB: the audit topic takes it, the dead-letter topic (1 MB) does not.
    {
        let mut payload = bytes(&good_json(topic, &unique("large")));
        payload.extend(std::iter::repeat_n(b' ', 1_500_000));
        cases.push(Case {
            what: "a 1.5 MB record".into(),
            payload,
            fate: Some(Fate::Parked("too_large".into())),
        });
    }
    // Every case of the decoder's fuzz corpus, with the fate the decoder gives it.
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .with_context(|| format!("reading {}", corpus.display()))?
        .collect::<Result<_, _>>()?;
    files.sort_by_key(std::fs::DirEntry::path);
    anyhow::ensure!(!files.is_empty(), "{} is empty", corpus.display());
    for f in files {
        let payload = std::fs::read(f.path())?;
        let fate = AuditRecord::decode(&payload)
            .err()
            .map(|e| Fate::DeadLettered(reason_label(&e).to_owned()));
        cases.push(Case {
            what: format!("fuzz corpus {}", f.path().display()),
            payload,
            fate,
        });
    }
    Ok(cases)
}

/// Creates an audit topic of one partition that takes records of up to 2 MiB.
async fn create_large_audit_topic(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new =
        NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "2097152");
    for r in admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Peak resident set size of process `pid`, in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_never_stop_ingest_nor_exhaust_memory() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    // `local-` keeps MirrorMaker off the hostile topics: its producer would refuse the
    // 1.5 MB record and stop mirroring for every other test.
    let hostile = Topics {
        audit: unique("local-hostile-audit"),
        dlq: unique("local-hostile-dlq"),
        partitions: 1,
        alias: "regional".into(),
        bootstrap: regional_bootstrap(),
    };
    create_large_audit_topic(&hostile.bootstrap, &hostile.audit).await?;
    chaperone_test_support::create_topic(&hostile.bootstrap, &hostile.dlq, 1).await?;
    let calm = Topics::create_on("regional2", &regional2_bootstrap(), 2).await?;
    let port = free_port()?;
    let toml = config_toml_for(&db, &[&hostile, &calm])
        .replace(
            "retry_max = \"1s\"\n",
            &format!("retry_max = \"1s\"\ndlq_timeout = \"{DLQ_TIMEOUT}\"\n"),
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
    anyhow::ensure!(
        toml.contains("dlq_timeout") && toml.contains(&format!(":{port}\"")),
        "the test configuration was not rewritten: {toml}"
    );
    let mut collector = Binary::spawn(&toml)?;
    let pid = collector.child.id();

    let topic = unique("hostile-topic");
    let cases = hostile_cases(&topic)?;
    // Takes the 1.5 MB record (librdkafka's own limit is 1 MB).
    let hostile_producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &hostile.bootstrap)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "2097152")
        .create()?;
    let calm_producer = producer_on(&calm.bootstrap)?;
    let mut good_sent = 0u64;
    let mut calm_records = Vec::new();
    for (round, case) in cases.iter().enumerate() {
        // A good record before and after each bad one, on the same partition.
        let before = bytes(&good_json(&topic, &unique("good")));
        let after = bytes(&good_json(&topic, &unique("good")));
        for payload in [&before, &case.payload, &after] {
            let rec = rdkafka::producer::FutureRecord::<(), [u8]>::to(&hostile.audit)
                .payload(payload.as_slice())
                .partition(0);
            hostile_producer
                .send(rec, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .with_context(|| format!("producing {}", case.what))?;
        }
        good_sent += 2;
        // The other cluster is written all along.
        let calm_round = mixed_records(&format!("{}-{round}", calm.audit), 20);
        produce_with(&calm_producer, &calm, &encode_all(&calm_round), round * 20).await?;
        calm_records.extend(calm_round);
        // Both clusters' records are stored within the stated time.
        wait_caught_up(&db.pool, &calm, STORED_WITHIN)
            .await
            .with_context(|| format!("the other cluster's ingest, after {}", case.what))?;
        wait_caught_up(&db.pool, &hostile, STORED_WITHIN)
            .await
            .with_context(|| format!("ingest of the cluster that got {}", case.what))?;
        collector
            .assert_running()
            .with_context(|| format!("after {}", case.what))?;
    }
    drop(hostile_producer);

    // Every good record of the hostile cluster is stored, once.
    let stored: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(count), 0)::int8 FROM audit_counts WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(stored, i64::try_from(good_sent)?, "good records stored");
    // And every record of the other cluster.
    let expected = expected_totals(&calm_records);
    let calm_stored: Totals = stored_totals(&db.pool)
        .await?
        .into_iter()
        .filter(|(k, _)| k.0 != topic && expected.contains_key(k))
        .collect();
    assert_eq!(calm_stored, expected, "the other cluster's records");

    // Each bad record went where it had to, with its reason.
    let mut want_dlq: Vec<String> = cases
        .iter()
        .filter_map(|c| match &c.fate {
            Some(Fate::DeadLettered(r)) => Some(r.clone()),
            _ => None,
        })
        .collect();
    want_dlq.sort();
    let mut got_dlq: Vec<String> = dead_letters(
        &hostile,
        want_dlq.len(),
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await?
    .into_iter()
    .map(|d| d.reason)
    .collect();
    got_dlq.sort();
    assert_eq!(got_dlq, want_dlq, "dead letters by reason");
    let parked: Vec<(String, String, i64, Option<i32>)> = sqlx::query_as(
        "SELECT reason, dlq_error, \"offset\", payload_len FROM ingest_parked \
         WHERE cluster = $1 AND topic = $2 ORDER BY \"offset\"",
    )
    .bind(&hostile.alias)
    .bind(&hostile.audit)
    .fetch_all(&db.pool)
    .await?;
    let want_parked: Vec<&Case> = cases
        .iter()
        .filter(|c| matches!(c.fate, Some(Fate::Parked(_))))
        .collect();
    assert_eq!(
        parked.len(),
        want_parked.len(),
        "parked records: {parked:?}"
    );
    for ((reason, dlq_error, _, len), case) in parked.iter().zip(&want_parked) {
        assert_eq!(
            Some(Fate::Parked(reason.clone())),
            case.fate,
            "{}",
            case.what
        );
        assert!(
            dlq_error.to_lowercase().contains("too large"),
            "{}: {dlq_error}",
            case.what
        );
        assert_eq!(*len, Some(i32::try_from(case.payload.len())?));
    }

    // What an operator sees: the metrics and the API.
    let base = format!("http://127.0.0.1:{port}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    assert_eq!(
        metric_sum(
            &metrics,
            "chaperone_collector_records_parked_total",
            Some("reason=\"too_large\"")
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "chaperone_collector_write_failures_total",
            Some("target=\"postgres\"")
        ),
        0.0,
        "no PostgreSQL write had to be retried"
    );
    let api: Value = reqwest::get(format!("{base}/api/v1/parked"))
        .await?
        .json()
        .await?;
    assert_eq!(api["total"], json!(1), "{api}");
    assert_eq!(api["parked"][0]["reason"], json!("too_large"), "{api}");

    collector.assert_running()?;
    let peak = peak_rss(pid)?;
    println!("collector peak RSS: {} MiB", peak / (1024 * 1024));
    assert!(
        peak < PEAK_RSS_BOUND,
        "collector peak RSS {} MiB, over the {} MiB bound",
        peak / (1024 * 1024),
        PEAK_RSS_BOUND / (1024 * 1024)
    );
    drop(collector);
    db.drop_db().await
}
