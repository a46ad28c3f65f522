//! Fault scenarios against the real stack, each asserting what a person would receive: the
//! verdicts, their revisions and the notifications at a webhook receiver. Nothing is lost in
//! a scenario unless it says so; where nothing is lost nobody may be notified, and a real loss
//! is notified exactly once.
//!
//! One pipeline (collector, a chaperone-service per cluster) serves every scenario, each on
//! topics of its own, with 10 s buckets. Producers are `loadgen` processes (audit-lib's example),
//! so that they can be killed with SIGKILL. Scenarios that stop MirrorMaker run one after the
//! other, after the ones that need it running. Two audited consumer groups read the copies of
//! some topics on aggregate during the first phase, so the `aggregate->consumer:<group>` edges
//! are judged and asserted with the others. At the end a table of verdicts, revisions,
//! notifications and detection times per scenario is printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chaperone_test_support::{
    Notification, Receiver, TestDb, aggregate_bootstrap, create_topic, dev_stack, end_offsets,
    eventually, regional_bootstrap, regional2_bootstrap, unique, wait_for_topics,
};
use chaperone_tests::group::Reader;
use chaperone_tests::pipeline::{Pipeline, PipelineSpec, edges_to_consumers};
use chaperone_tests::programs::built;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::process::{Child, Command};

const WIDTH: &str = "10s";
const WIDTH_MS: i64 = 10_000;
/// Far enough above the instance timeout that a producer killed mid-stream is stale before its
/// buckets are judged by waiting.
const MAX_WAIT_S: u64 = 90;
/// How long MirrorMaker may take to create the copy of a new topic.
const MIRRORED: Duration = Duration::from_secs(120);

/// The default edges, and one from aggregate to every consumer group.
fn reconcile_section() -> String {
    format!(
        r#"interval = "1s"
allowed_lateness = "3s"
settle = "5s"
max_wait = "{MAX_WAIT_S}s"
loss_after = "600s"
instance_timeout = "75s"
{edges}"#,
        edges = edges_to_consumers("aggregate")
    )
}

/// audit-lib's load generator.
fn loadgen_path() -> anyhow::Result<PathBuf> {
    built(
        "examples/loadgen",
        "cargo build -p chaperone-audit --example loadgen",
    )
}

/// A chaperone-service process of the regional tier for the topics matching `include`, so
/// that it can be killed with SIGKILL and started again.
struct ServiceProcess {
    config: PathBuf,
    log: PathBuf,
    child: Child,
}

impl ServiceProcess {
    fn start(id: &str, audit: &str, include: &str) -> anyhow::Result<Self> {
        let config = std::env::temp_dir()
            .join(unique("faults-service"))
            .with_extension("toml");
        std::fs::write(
            &config,
            format!(
                r#"
tier = "regional"
cluster = "regional"
datacenter = "regional"
instance = "{id}-process"
bootstrap_servers = "{bootstrap}"
group_id = "{id}-process"
audit_topic = "{audit}"
bucket_width = "{WIDTH}"
flush_interval = "1s"
http_addr = "127.0.0.1:0"

[topics]
include = ['{include}']
refresh_interval = "2s"

[kafka_consumer]
# The restarted process gets the partitions of its SIGKILLed predecessor this soon.
"session.timeout.ms" = "6000"
"#,
                bootstrap = regional_bootstrap(),
            ),
        )?;
        let log = config.with_extension("log");
        let child = Self::spawn(&config, &log)?;
        Ok(Self { config, log, child })
    }

    fn spawn(config: &PathBuf, log: &PathBuf) -> anyhow::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Command::new(built(
            "chaperone-service",
            "cargo build -p chaperone-service",
        )?)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("starting chaperone-service")
    }

    /// SIGKILL, then the same instance again (it fences its predecessor's transaction).
    async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .context("killing chaperone-service")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.child = Self::spawn(&self.config, &self.log)?;
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }
}

/// One load generator process.
struct Loadgen {
    child: Child,
    log: PathBuf,
}

impl Loadgen {
    /// Starts `loadgen` for `topics` on the `regional` cluster with extra arguments.
    fn start(audit_topic: &str, topics: &[&str], args: &[&str]) -> anyhow::Result<Self> {
        Self::start_in("regional", audit_topic, topics, args)
    }

    /// Starts `loadgen` for `topics` in a datacenter: `regional` or `regional2`, each with a
    /// regional cluster of its own.
    fn start_in(
        datacenter: &str,
        audit_topic: &str,
        topics: &[&str],
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let spool = std::env::temp_dir().join(unique("faults-spool"));
        let log = std::env::temp_dir().join(unique("faults-loadgen-log"));
        let bootstrap = if datacenter == "regional2" {
            regional2_bootstrap()
        } else {
            regional_bootstrap()
        };
        let child = Command::new(loadgen_path()?)
            .arg("--bootstrap")
            .arg(bootstrap)
            .args(["--datacenter", datacenter, "--cluster", datacenter])
            .arg("--topics")
            .arg(topics.join(","))
            .arg("--audit-topic")
            .arg(audit_topic)
            .arg("--bucket-width")
            .arg(WIDTH)
            .args(if args.contains(&"--flush-interval") {
                &[][..]
            } else {
                &["--flush-interval", "1s"][..]
            })
            .arg("--spool-dir")
            .arg(spool)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .context("starting loadgen")?;
        Ok(Self { child, log })
    }

    /// Waits for a clean exit; returns messages acknowledged and skipped per topic.
    async fn finish(self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        Ok(self.finish_counted().await?.0)
    }

    /// Waits for a clean exit; returns messages acknowledged and skipped per topic, and how
    /// many deliveries failed over all topics.
    async fn finish_counted(self) -> anyhow::Result<(BTreeMap<String, (u64, u64)>, u64)> {
        let out = tokio::time::timeout(Duration::from_secs(120), self.child.wait_with_output())
            .await
            .context("loadgen did not finish in 120 s")??;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        ensure!(
            out.status.success(),
            "loadgen failed: {}: {log}",
            out.status
        );
        let line = String::from_utf8(out.stdout)?;
        let json: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("loadgen output: {line}"))?;
        let mut totals = BTreeMap::new();
        for (topic, t) in json["topics"].as_object().context("loadgen topics")? {
            totals.insert(
                topic.clone(),
                (
                    t["acked"].as_u64().unwrap_or(0),
                    t["skipped"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok((totals, json["failed"].as_u64().context("loadgen failed")?))
    }

    /// SIGKILL, as a crash would.
    async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("killing loadgen")
    }
}

/// What a scenario ended with.
#[derive(Debug, Default)]
struct Outcome {
    /// (edge, status) -> (buckets, expected, actual), topic-level.
    verdicts: BTreeMap<(String, String), (i64, i64, i64)>,
    revisions: i64,
    /// Verdict changes to anything but `complete` in the history.
    ever_bad: i64,
    /// Verdict changes to a status that notifies (`missing`, `duplicated`, `tier_silent`).
    ever_alarming: i64,
    /// Verdict changes to `lagging`.
    ever_lagging: i64,
    /// Revisions (changes of a verdict already judged) neither into nor out of `lagging`.
    revised_past_lagging: i64,
    firing: usize,
    resolved: usize,
    /// Seconds from the end of the first bad bucket to its firing notification.
    detection_s: Option<f64>,
}

async fn outcome(db: &TestDb, hooks: &[Notification], topics: &[&str]) -> anyhow::Result<Outcome> {
    let rows: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT edge, status, count(*), sum(expected)::bigint, sum(actual)::bigint,
                sum(revisions)::bigint
           FROM reconcile_verdicts WHERE topic = ANY($1) AND partition = -1
          GROUP BY edge, status ORDER BY edge, status",
    )
    .bind(topics)
    .fetch_all(&db.pool)
    .await?;
    let (ever_bad, ever_lagging, ever_alarming, revised_past_lagging): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status <> 'complete'),
                    count(*) FILTER (WHERE status = 'lagging'),
                    count(*) FILTER (WHERE status IN ('missing', 'duplicated', 'tier_silent')),
                    count(*) FILTER (WHERE old_status IS NOT NULL AND old_status <> 'lagging'
                                       AND status <> 'lagging')
               FROM reconcile_verdict_history
              WHERE topic = ANY($1) AND partition = -1",
        )
        .bind(topics)
        .fetch_one(&db.pool)
        .await?;
    let mut o = Outcome {
        ever_bad,
        ever_lagging,
        ever_alarming,
        revised_past_lagging,
        ..Outcome::default()
    };
    for (edge, status, n, e, a, r) in rows {
        o.verdicts.insert((edge, status), (n, e, a));
        o.revisions += r;
    }
    for h in hooks {
        let json = h.json()?;
        let topic = json["topic"].as_str().unwrap_or_default();
        if !topics.contains(&topic) {
            continue;
        }
        match json["event"].as_str() {
            Some("firing") => {
                o.firing += 1;
                let end = json["bucket_start_ms"].as_i64().unwrap_or(0) + WIDTH_MS;
                let s = (h.at.timestamp_millis() - end) as f64 / 1_000.0;
                o.detection_s = Some(o.detection_s.map_or(s, |d: f64| d.min(s)));
            }
            Some("resolved") => o.resolved += 1,
            _ => {}
        }
    }
    Ok(o)
}

impl Outcome {
    fn count(&self, edge: &str, status: &str) -> (i64, i64, i64) {
        self.verdicts
            .get(&(edge.to_owned(), status.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    fn bad(&self) -> Vec<(&String, &String)> {
        self.verdicts
            .keys()
            .filter(|(_, s)| s != "complete")
            .map(|(e, s)| (e, s))
            .collect()
    }

    /// Totals of an edge over every status: (expected, actual).
    fn totals(&self, edge: &str) -> (i64, i64) {
        self.verdicts
            .iter()
            .filter(|((e, _), _)| e == edge)
            .fold((0, 0), |(x, y), (_, v)| (x + v.1, y + v.2))
    }

    /// Nothing was ever judged but `complete`, nobody was notified.
    fn quiet(&self, name: &str) -> anyhow::Result<()> {
        ensure!(
            self.bad().is_empty() && self.ever_bad == 0 && self.firing == 0 && self.resolved == 0,
            "{name}: nothing was lost, yet: {self:#?}"
        );
        Ok(())
    }

    /// Every verdict ends `complete` and nobody was notified; `lagging` on the way is allowed
    /// (nothing else): a machine that stalls for longer than the lateness (every process,
    /// PostgreSQL and the brokers frozen together, consumer sessions timing out) really delays
    /// the tiers, and `lagging` says so without notifying anyone.
    fn quiet_but_for_delay(&self, name: &str) -> anyhow::Result<()> {
        ensure!(
            self.bad().is_empty()
                && self.ever_bad == self.ever_lagging
                && self.firing == 0
                && self.resolved == 0,
            "{name}: nothing was lost, yet: {self:#?}"
        );
        if self.ever_lagging > 0 {
            println!(
                "{name}: {} verdicts were lagging before complete (a stalled machine)",
                self.ever_lagging
            );
        }
        Ok(())
    }
}

const P2R: &str = "producer->regional";
const R2A: &str = "regional->aggregate";

/// Waits until no bucket of `topics` is queued and the verdicts hold `expected` messages on
/// both edges (checked by `done`).
async fn settled(
    db: &TestDb,
    topics: &[&str],
    what: &str,
    timeout: Duration,
    done: impl Fn(&Outcome) -> bool,
) -> anyhow::Result<()> {
    let waited = eventually(what, timeout, || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reconcile_pending WHERE topic = ANY($1)")
                .bind(topics)
                .fetch_one(&db.pool)
                .await?;
        let o = outcome(db, &[], topics).await?;
        Ok((pending == 0 && done(&o)).then_some(()))
    })
    .await;
    if waited.is_err() {
        eprintln!("{}", pending_report(db, topics).await?);
    }
    waited
}

/// What a failed wait was still waiting for: the buckets queued for a verdict, and the stored
/// ingest offsets.
async fn pending_report(db: &TestDb, topics: &[&str]) -> anyhow::Result<String> {
    let pending: Vec<(String, i64, String, String)> = sqlx::query_as(
        "SELECT topic, bucket_start_ms, first_queued_at::text, queued_at::text
           FROM reconcile_pending WHERE topic = ANY($1) ORDER BY topic, bucket_start_ms",
    )
    .bind(topics)
    .fetch_all(&db.pool)
    .await?;
    let waiting: Vec<(String, String, i64, String, Vec<String>)> = sqlx::query_as(
        "SELECT v.topic, v.edge, v.bucket_start_ms, v.status, v.waiting_on
           FROM reconcile_verdicts v JOIN reconcile_pending p USING (topic, bucket_start_ms)
          WHERE v.topic = ANY($1) AND v.partition = -1 ORDER BY 1, 3, 2",
    )
    .bind(topics)
    .fetch_all(&db.pool)
    .await?;
    let offsets: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT cluster, partition, next_offset FROM ingest_offsets ORDER BY 1, 2")
            .fetch_all(&db.pool)
            .await?;
    Ok(format!(
        "still queued (topic, bucket, first queued, last change): {pending:#?}\n\
         their verdicts so far (topic, edge, bucket, status, waiting on): {waiting:#?}\n\
         stored ingest offsets (cluster, partition, next): {offsets:?}"
    ))
}

async fn topics(names: &[&str], partitions: i32) -> anyhow::Result<()> {
    for t in names {
        create_topic(&regional_bootstrap(), t, partitions).await?;
    }
    Ok(())
}

/// Messages with the current time, `n` per partition, straight to `topic` on `bootstrap`.
async fn produce(bootstrap: &str, topic: &str, partitions: i32, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    for p in 0..partitions {
        for i in 0..n {
            let payload = format!("{{\"n\":{i}}}");
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(p)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

/// Two audited consumer groups reading MirrorMaker 2's copies on the aggregate cluster,
/// mapped back to the logical topics, each in a thread of its own: `sink` (transactional)
/// reads every message of its topics, `skipper` (at-least-once, `processed`) passes over the
/// offsets 7, 27, ... 187 of each partition of its one topic.
struct Readers {
    id: String,
    stop: StopOnDrop,
    sink: tokio::task::JoinHandle<anyhow::Result<u64>>,
    skipper: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl Readers {
    fn start(id: &str, audit: &str, sink_topics: &[&str], skipper_topic: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let reader = |name: &str, topics: &[&str], transactional, skip| {
            let r = Reader {
                bootstrap: aggregate_bootstrap(),
                topics: topics.iter().map(|t| format!("regional.{t}")).collect(),
                audit_topic: audit.to_owned(),
                group: format!("{id}-{name}"),
                instance: name.to_owned(),
                transactional_id: format!("{id}-{name}"),
                transactional,
                mirror: true,
                skip,
            };
            let stop = Arc::clone(&stop);
            tokio::task::spawn_blocking(move || r.run(&stop))
        };
        let skip: fn(i64) -> bool = |offset| offset % 20 == 7 && offset < 200;
        Self {
            id: id.to_owned(),
            sink: reader("sink", sink_topics, true, None),
            skipper: reader("skipper", &[skipper_topic], false, Some(skip)),
            stop: StopOnDrop(stop),
        }
    }

    /// The edge from aggregate to the group `name`.
    fn edge(&self, name: &str) -> String {
        format!("aggregate->consumer:{}-{name}", self.id)
    }

    /// Stops both cleanly; returns how many messages `skipper` passed over.
    async fn stop(self) -> anyhow::Result<i64> {
        self.stop.0.store(true, Ordering::Relaxed);
        self.sink.await??;
        Ok(self.skipper.await?? as i64)
    }
}

/// Stops the readers when a scenario fails before it stops them (the runtime waits for its
/// blocking threads).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Report(Vec<(String, Outcome)>);

impl Report {
    fn print(&self) {
        println!(
            "\n| scenario | verdicts (edge status: buckets, expected, actual) | revisions | lagging on the way | firing | resolved | detection |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (name, o) in &self.0 {
            let verdicts: Vec<String> = o
                .verdicts
                .iter()
                .map(|((e, s), (n, x, a))| format!("{e} {s}: {n}, {x}, {a}"))
                .collect();
            let detection = o
                .detection_s
                .map_or("-".to_owned(), |s| format!("{s:.1} s"));
            println!(
                "| {name} | {} | {} | {} | {} | {} | {detection} |",
                verdicts.join("; "),
                o.revisions,
                o.ever_lagging,
                o.firing,
                o.resolved
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_scenarios() -> anyhow::Result<()> {
    let id = unique("faults");
    // Not under `{id}-`: the services audit `{id}-.*`, and the collector's dead-letter topic
    // (`<audit>-dlq`) is not a topic of the pipeline.
    let audit_topic = format!("audit-{id}");
    for bootstrap in [
        regional_bootstrap(),
        regional2_bootstrap(),
        aggregate_bootstrap(),
    ] {
        create_topic(&bootstrap, &audit_topic, 3).await?;
    }
    let db = TestDb::create().await?;
    let receiver = Receiver::start().await?;
    let spec = PipelineSpec {
        id: id.clone(),
        audit_topic: audit_topic.clone(),
        topics_regex: format!("{id}-.*"),
        bucket_width: WIDTH.into(),
        reconcile: reconcile_section(),
        webhooks: format!(
            "[[alerts.webhooks]]\nname = \"faults\"\nurl = \"{}\"\n",
            receiver.url()
        ),
        // Read by a chaperone-service process that is killed and restarted.
        regional_exclude: vec![format!("^{id}-restarted$")],
    };
    let pipeline = Pipeline::start(&db, &spec).await?;
    let result = scenarios(&db, &receiver, &id, &audit_topic).await;
    if let Err(e) = &result {
        eprintln!("fault scenarios failed: {e:#}");
    }
    // The regional broker and MirrorMaker run again whatever happened.
    let broker = dev_stack(&["start-kafka", "regional"]);
    let mirror = dev_stack(&["start-mirror"]);
    let stopped = pipeline.stop().await;
    let report = result?;
    report.print();
    broker?;
    mirror?;
    stopped?;
    db.drop_db().await
}

async fn scenarios(
    db: &TestDb,
    receiver: &Receiver,
    id: &str,
    audit: &str,
) -> anyhow::Result<Report> {
    let mut report = Report(Vec::new());
    let t = |name: &str| format!("{id}-{name}");
    let (clean_a, clean_b) = (t("clean-a"), t("clean-b"));
    let (slow, skew, exit, killed) = (t("slow"), t("skew"), t("exit"), t("killed"));
    let (lossy, dup, idle) = (t("lossy"), t("dup"), t("idle"));
    let restarted = t("restarted");
    // Read at the end of the path by a consumer group that passes over some records.
    let sunk = t("sunk");
    // Written in both datacenters; the second one loses messages and its mirror is paused.
    let two_dc = t("two-dc");
    // Written in phase 4, made now so that its copy on aggregate is there by then.
    let crashed = t("crashed");
    create_topic(&regional2_bootstrap(), &two_dc, 3).await?;
    topics(
        &[
            &clean_a, &clean_b, &skew, &exit, &killed, &lossy, &dup, &restarted, &two_dc, &crashed,
            &sunk,
        ],
        3,
    )
    .await?;
    topics(&[&slow], 1).await?;
    topics(&[&idle], 4).await?;
    // MirrorMaker picks new topics up on its refresh interval: wait for the copies.
    let mirrored: Vec<String> = [
        &clean_a, &clean_b, &slow, &skew, &exit, &killed, &lossy, &dup, &idle, &restarted,
        &crashed, &sunk,
    ]
    .iter()
    .map(|t| format!("regional.{t}"))
    .chain(["regional", "regional2"].map(|dc| format!("{dc}.{two_dc}")))
    .collect();
    wait_for_topics(&aggregate_bootstrap(), &mirrored, MIRRORED).await?;
    // A MirrorMaker still recovering from an earlier test's broker restart (or a stalled
    // machine) copies nothing for a while: before the traffic starts, wait until both copy
    // again (dev/stack sends each a fresh probe record and waits for its copy).
    dev_stack(&["start-mirror"])?;
    // Two consumer groups at the end of the path, reading the copies on aggregate: one reads
    // every message of four scenarios' topics; one passes over some records of its topic.
    let readers = Readers::start(id, audit, &[&clean_a, &clean_b, &lossy, &dup, &sunk], &sunk);

    // Phase 1: the faults that need MirrorMaker running, all at once. One process writes
    // several topics where it can, to keep the machine (and the brokers) responsive.
    let rate = ["--rate", "300", "--duration", "30s"];
    let steady = Loadgen::start(audit, &[&clean_a, &clean_b, &exit, &killed, &dup], &rate)?;
    let mut service = ServiceProcess::start(id, audit, &format!("^{restarted}$"))?;
    let second = Loadgen::start(
        audit,
        &[&clean_a, &clean_b, &slow, &skew, &restarted, &sunk],
        &rate,
    )?;
    let late = Loadgen::start(
        audit,
        &[&slow],
        &[
            "--rate",
            "50",
            "--duration",
            "40s",
            "--flush-interval",
            "30s",
        ],
    )?;
    let skewed = Loadgen::start(
        audit,
        &[&skew],
        &[
            "--rate",
            "50",
            "--duration",
            "30s",
            "--event-lag-ms",
            "90000",
        ],
    )?;
    let leaves = Loadgen::start(audit, &[&exit], &["--rate", "50", "--duration", "12s"])?;
    let victim = Loadgen::start(audit, &[&killed], &["--rate", "50", "--duration", "90s"])?;
    let loser = Loadgen::start(
        audit,
        &[&lossy],
        &[
            "--rate",
            "100",
            "--duration",
            "30s",
            "--skip-fraction",
            "0.01",
        ],
    )?;
    let idle_source = Loadgen::start(
        audit,
        &[&idle],
        // One key: every message goes to one of the four partitions.
        &["--rate", "50", "--duration", "30s", "--keys", "1"],
    )?;
    let dc1 = Loadgen::start(audit, &[&two_dc], &["--rate", "100", "--duration", "30s"])?;
    let dc2 = Loadgen::start_in(
        "regional2",
        audit,
        &[&two_dc],
        &[
            "--rate",
            "100",
            "--duration",
            "30s",
            "--skip-fraction",
            "0.01",
        ],
    )?;
    // The second datacenter's mirror pauses for 25 s mid-stream (more than the lateness,
    // less than max_wait); the first one's keeps copying.
    let pause = tokio::task::spawn_blocking(|| {
        std::thread::sleep(Duration::from_secs(5));
        dev_stack(&["stop-mirror", "regional2"])?;
        std::thread::sleep(Duration::from_secs(25));
        dev_stack(&["start-mirror", "regional2"])
    });
    // A poison record on the audit topic: a NUL character PostgreSQL cannot store.
    poison(audit).await?;

    // The victim is killed once it has reported for a while.
    eventually(
        "the producer to be killed reporting",
        // A fresh broker under this load can stall for half a minute.
        Duration::from_secs(120),
        || async {
            let instances: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT instance) FROM audit_progress
                  WHERE topic = $1 AND tier = 'producer'",
            )
            .bind(&killed)
            .fetch_one(&db.pool)
            .await?;
            Ok((instances == 2).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    victim.kill().await?;
    // The regional service of one topic, killed mid-stream and started again: it resumes
    // from its last committed transaction with a backlog to read.
    service.kill_and_restart().await?;
    // Duplicates written straight into the aggregate cluster.
    produce(&aggregate_bootstrap(), &format!("regional.{dup}"), 1, 40).await?;

    let mut acked: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for lg in [
        steady,
        second,
        late,
        skewed,
        leaves,
        loser,
        idle_source,
        dc1,
    ] {
        for (topic, (a, s)) in lg.finish().await? {
            let e = acked.entry(topic).or_default();
            e.0 += a;
            e.1 += s;
        }
    }
    let dc2_totals = dc2.finish().await?;
    let (dc2_acked, dc2_lost) = dc2_totals
        .get(&two_dc)
        .map_or((0, 0), |&(a, s)| (a as i64, s as i64));
    pause.await??;
    let produced = |topic: &str| acked.get(topic).map_or(0, |t| t.0 as i64);
    let skipped = |topic: &str| acked.get(topic).map_or(0, |t| t.1 as i64);

    // Everything judged: the clean and slow topics to exact totals.
    let all = [
        clean_a.as_str(),
        &clean_b,
        &slow,
        &skew,
        &exit,
        &killed,
        &lossy,
        &dup,
        &idle,
        &restarted,
        &two_dc,
        &sunk,
    ];
    let exact = [
        clean_a.as_str(),
        &clean_b,
        &slow,
        &skew,
        &exit,
        &idle,
        &restarted,
    ];
    settled(
        db,
        &all,
        "phase 1 verdicts",
        // A fresh broker under this load can stall for half a minute, which delays everything.
        Duration::from_secs(360),
        |_| true,
    )
    .await?;
    let (sink, skipper) = (readers.edge("sink"), readers.edge("skipper"));
    for topic in exact {
        let n = produced(topic);
        // The topics the sink group reads are judged on its edge too.
        let read = [clean_a.as_str(), &clean_b].contains(&topic);
        settled(
            db,
            &[topic],
            &format!("exact totals of {topic}"),
            Duration::from_secs(120),
            |o| {
                o.totals(P2R) == (n, n)
                    && o.totals(R2A) == (n, n)
                    && (!read || o.totals(&sink) == (n, n))
            },
        )
        .await?;
    }
    let n = produced(&sunk);
    settled(
        db,
        &[&sunk],
        "the consumer groups judged",
        Duration::from_secs(120),
        |o| o.totals(R2A) == (n, n) && o.totals(&sink) == (n, n) && o.totals(&skipper).0 == n,
    )
    .await?;
    let passed_over = readers.stop().await?;
    ensure!(passed_over > 0, "the skipping consumer passed nothing over");
    let lost = skipped(&lossy);
    ensure!(lost > 0, "the lossy loadgen skipped nothing");
    settled(
        db,
        &[&lossy],
        "the loss judged",
        Duration::from_secs(120),
        |o| o.totals(P2R) == (produced(&lossy) + lost, produced(&lossy)),
    )
    .await?;
    settled(
        db,
        &[&dup],
        "the duplicates judged",
        Duration::from_secs(120),
        |o| {
            let n = produced(&dup);
            o.totals(R2A) == (n, n + 40)
        },
    )
    .await?;
    ensure!(
        dc2_lost > 0,
        "the second datacenter's loadgen skipped nothing"
    );
    let dc1_acked = produced(&two_dc);
    settled(
        db,
        &[&two_dc],
        "both datacenters judged",
        Duration::from_secs(180),
        |o| {
            o.totals(P2R) == (dc1_acked + dc2_acked + dc2_lost, dc1_acked + dc2_acked)
                && o.totals(R2A) == (dc1_acked + dc2_acked, dc1_acked + dc2_acked)
        },
    )
    .await?;
    // Let the sender deliver what the reconciler decided.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hooks = receiver.received();

    for (name, topics) in [
        (
            "clean, 2 topics x 2 producers",
            vec![clean_a.as_str(), &clean_b],
        ),
        ("one producer flushing every 30 s", vec![&slow]),
        ("producer event times 90 s behind", vec![&skew]),
        ("producer exits cleanly", vec![&exit]),
        ("partitions never written", vec![&idle]),
    ] {
        let o = outcome(db, &hooks, &topics).await?;
        o.quiet_but_for_delay(name)?;
        // Counts of a skewed producer that arrive after a bucket was judged complete on the
        // on-time producer's counts revise its totals (complete -> complete). Otherwise every
        // revision goes into or out of `lagging`: a stalled machine can delay a tier's counts
        // past a bucket judged complete (complete -> lagging -> complete), nothing else.
        ensure!(
            o.revised_past_lagging == 0 || topics == [skew.as_str()],
            "{name}: revisions {o:#?}"
        );
        report.0.push((name.into(), o));
    }

    // A killed service delays its tier (its buckets may be lagging a while), never more.
    let o = outcome(db, &hooks, &[&restarted]).await?;
    ensure!(
        o.bad().is_empty() && o.ever_alarming == 0 && o.firing == 0 && o.resolved == 0,
        "chaperone-service killed -9 and restarted: {o:#?}"
    );
    report
        .0
        .push(("chaperone-service killed -9, restarted".into(), o));
    service.stop().await?;

    let o = outcome(db, &hooks, &[&killed]).await?;
    ensure!(
        o.count(P2R, "duplicated").0 == 0 && o.count(P2R, "missing").0 == 0,
        "a killed producer's lost counts are not Kafka's duplicates: {o:#?}"
    );
    ensure!(o.firing == 0, "killed producer notified: {o:#?}");
    let named: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconcile_verdicts WHERE topic = $1 AND stale_instances <> '{}'",
    )
    .bind(&killed)
    .fetch_one(&db.pool)
    .await?;
    ensure!(
        named > 0,
        "the verdicts of the killed producer's last buckets name it"
    );
    report.0.push(("producer killed -9".into(), o));

    let o = outcome(db, &hooks, &[&lossy]).await?;
    ensure!(
        o.count(P2R, "missing").1 - o.count(P2R, "missing").2 == lost,
        "producer->regional loss of {lost} found exactly: {o:#?}"
    );
    ensure!(o.firing == 1, "one firing for the loss: {o:#?}");
    ensure!(o.count(R2A, "missing").0 == 0, "{o:#?}");
    let n = produced(&lossy);
    ensure!(
        o.totals(&sink) == (n, n) && o.count(&sink, "complete").1 == n,
        "the consumer read what aggregate holds: {o:#?}"
    );
    report.0.push(("loss producer->regional".into(), o));

    let o = outcome(db, &hooks, &[&dup]).await?;
    let (_, e, a) = o.count(R2A, "duplicated");
    ensure!(a - e == 40, "40 duplicates found exactly: {o:#?}");
    ensure!(o.firing == 1, "one firing for the duplicates: {o:#?}");
    let held = produced(&dup) + 40;
    ensure!(
        o.totals(&sink) == (held, held) && o.count(&sink, "complete").1 == held,
        "the consumer read what aggregate holds, the duplicates too: {o:#?}"
    );
    report.0.push(("duplicates in aggregate".into(), o));

    let o = outcome(db, &hooks, &[&two_dc]).await?;
    let by_dc: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT datacenter, status, sum(missing)::bigint FROM reconcile_verdicts
          WHERE topic = $1 AND edge = $2 AND partition = -1 AND status <> 'complete'
          GROUP BY datacenter, status",
    )
    .bind(&two_dc)
    .bind(P2R)
    .fetch_all(&db.pool)
    .await?;
    ensure!(
        by_dc == [("regional2".to_owned(), "missing".to_owned(), dc2_lost)],
        "the loss of {dc2_lost} attributed to regional2 on {P2R}, nothing else: {by_dc:?} {o:#?}"
    );
    // The paused mirror may make buckets `lagging` for a while if it takes longer than
    // max_wait to catch up (a busy machine): delay, which notifies nobody.
    let r2a_alarms: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconcile_verdict_history
          WHERE topic = $1 AND edge = $2 AND status NOT IN ('complete', 'lagging')",
    )
    .bind(&two_dc)
    .bind(R2A)
    .fetch_one(&db.pool)
    .await?;
    ensure!(
        r2a_alarms == 0 && o.firing == 1,
        "{R2A} summed over datacenters exact and quiet while one mirror paused, one firing for \
         the loss: {r2a_alarms} {R2A} verdicts neither complete nor lagging, {o:#?}"
    );
    report.0.push((
        "two datacenters: loss in regional2, its mirror paused 25 s".into(),
        o,
    ));

    let o = outcome(db, &hooks, &[&sunk]).await?;
    let (_, e, a) = o.count(&skipper, "missing");
    ensure!(
        e - a == passed_over as i64 && o.firing == 1 && o.resolved == 0,
        "{skipper}: {passed_over} passed over found exactly, one firing: {o:#?}"
    );
    ensure!(
        o.verdicts
            .keys()
            .all(|(edge, status)| status == "complete" || edge == &skipper),
        "only the skipping group's edge is not complete: {o:#?}"
    );
    report
        .0
        .push(("consumer group passes over records".into(), o));

    dead_lettered(audit).await?;

    // Phase 2: MirrorMaker stopped for longer than the lateness, shorter than max_wait; on
    // another topic, records removed on regional before the mirror copied them.
    let (paused, removed) = (t("paused"), t("removed"));
    topics(&[&paused, &removed], 1).await?;
    wait_for_topics(
        &aggregate_bootstrap(),
        &[format!("regional.{paused}"), format!("regional.{removed}")],
        MIRRORED,
    )
    .await?;
    let before = Loadgen::start(audit, &[&removed], &["--rate", "100", "--duration", "5s"])?;
    let paused_source = Loadgen::start(audit, &[&paused], &["--rate", "100", "--duration", "40s"])?;
    before.finish().await?;
    let copied = end_offsets(&regional_bootstrap(), &removed, 1)?[0];
    eventually(
        "the first records mirrored",
        Duration::from_secs(60),
        || async {
            let there = end_offsets(&aggregate_bootstrap(), &format!("regional.{removed}"), 1)?[0];
            Ok((there >= copied).then_some(()))
        },
    )
    .await?;
    dev_stack(&["stop-mirror", "regional"])?;
    let stopped_at = Instant::now();
    Loadgen::start(audit, &[&removed], &["--count", "30", "--rate", "0"])?
        .finish()
        .await?;
    let end = end_offsets(&regional_bootstrap(), &removed, 1)?[0];
    // The regional service counts them; then they are gone before MirrorMaker copies them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    delete_records(&removed, end).await?;
    tokio::time::sleep(Duration::from_secs(25).saturating_sub(stopped_at.elapsed())).await;
    dev_stack(&["start-mirror", "regional"])?;
    // More traffic after the loss, so that the aggregate shows it moved past the bucket.
    let after = Loadgen::start(audit, &[&removed], &["--rate", "50", "--duration", "25s"])?;
    let mut totals = paused_source.finish().await?;
    totals.extend(after.finish().await?);
    let n = totals.get(&paused).map_or(0, |t| t.0 as i64);
    settled(
        db,
        &[&paused],
        "paused topic judged",
        Duration::from_secs(180),
        |o| o.totals(R2A) == (n, n),
    )
    .await?;
    settled(
        db,
        &[&removed],
        "removed records judged",
        Duration::from_secs(180),
        |o| {
            let (e, a) = o.totals(R2A);
            e - a == 30
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hooks = receiver.received();
    let o = outcome(db, &hooks, &[&paused]).await?;
    o.quiet("MirrorMaker stopped 25 s")?;
    report.0.push(("MirrorMaker stopped 25 s".into(), o));
    let o = outcome(db, &hooks, &[&removed]).await?;
    ensure!(
        o.count(R2A, "missing").1 - o.count(R2A, "missing").2 == 30 && o.firing == 1,
        "regional->aggregate loss of 30 found exactly, once: {o:#?}"
    );
    report.0.push(("loss regional->aggregate".into(), o));

    // Phase 3: MirrorMaker stopped for longer than max_wait: lag, reported as lag.
    let stuck = t("stuck");
    topics(&[&stuck], 2).await?;
    wait_for_topics(
        &aggregate_bootstrap(),
        &[format!("regional.{stuck}")],
        MIRRORED,
    )
    .await?;
    let source = Loadgen::start(audit, &[&stuck], &["--rate", "100", "--duration", "15s"])?;
    dev_stack(&["stop-mirror", "regional"])?;
    let totals = source.finish().await?;
    let n = totals.get(&stuck).map_or(0, |t| t.0 as i64);
    eventually(
        "lagging verdicts while the mirror is stopped",
        Duration::from_secs(MAX_WAIT_S + 60),
        || async {
            let o = outcome(db, &[], &[&stuck]).await?;
            Ok((o.count(R2A, "lagging").0 > 0).then_some(()))
        },
    )
    .await?;
    let during = outcome(db, &receiver.received(), &[&stuck]).await?;
    ensure!(
        during.count(R2A, "missing").0 == 0 && during.firing == 0,
        "a stopped mirror is lag, not loss: {during:#?}"
    );
    dev_stack(&["start-mirror", "regional"])?;
    settled(
        db,
        &[&stuck],
        "the stuck topic caught up",
        Duration::from_secs(180),
        |o| o.totals(R2A) == (n, n) && o.count(R2A, "lagging").0 == 0,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = outcome(db, &receiver.received(), &[&stuck]).await?;
    // Lagging, then complete: never anything that notifies.
    ensure!(
        o.bad().is_empty() && o.ever_alarming == 0 && o.firing == 0 && o.resolved == 0,
        "MirrorMaker stopped beyond max_wait: {o:#?}"
    );
    report
        .0
        .push(("MirrorMaker stopped beyond max_wait".into(), o));

    // Phase 4: the regional broker killed with SIGKILL mid-traffic, as a crash would, and
    // started again at once. It runs alone: every other scenario's traffic, services and
    // mirror go through that broker.
    let o = broker_killed(db, receiver, audit, "regional", &crashed).await?;
    report
        .0
        .push(("regional broker killed -9, restarted".into(), o));
    Ok(report)
}

/// The broker of `cluster` killed with SIGKILL while two audited producers (idempotent,
/// acks=all) write `topic` on it, and started again at once with `dev/stack start-kafka`. The
/// producers keep sending through the outage and must deliver everything they were given; the
/// topic's verdicts end `complete` with exactly what they sent, never anything that notifies,
/// and nobody is notified of anything meanwhile.
async fn broker_killed(
    db: &TestDb,
    receiver: &Receiver,
    audit: &str,
    cluster: &'static str,
    topic: &str,
) -> anyhow::Result<Outcome> {
    let phase = Instant::now();
    let notified = receiver.received().len();
    let traffic = ["--rate", "100", "--duration", "40s"];
    let first = Loadgen::start_in(cluster, audit, &[topic], &traffic)?;
    let second = Loadgen::start_in(cluster, audit, &[topic], &traffic)?;
    eventually(
        "both producers of the killed broker's topic reporting",
        Duration::from_secs(60),
        || async {
            let instances: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT instance) FROM audit_progress
                  WHERE topic = $1 AND tier = 'producer'",
            )
            .bind(topic)
            .fetch_one(&db.pool)
            .await?;
            Ok((instances == 2).then_some(()))
        },
    )
    .await?;
    let outage = tokio::task::spawn_blocking(move || {
        let killed = Instant::now();
        dev_stack(&["kill-kafka", cluster])?;
        dev_stack(&["start-kafka", cluster])?;
        anyhow::Ok(killed.elapsed())
    })
    .await??;
    eprintln!(
        "{cluster} broker killed -9 and serving again {:.1} s later",
        outage.as_secs_f64()
    );
    let mut n = 0;
    for lg in [first, second] {
        let (sent, failed) = lg.finish_counted().await?;
        ensure!(
            failed == 0,
            "{failed} deliveries to {topic} failed across the broker's outage"
        );
        n += sent.get(topic).map_or(0, |t| t.0 as i64);
    }
    settled(
        db,
        &[topic],
        "the killed broker's topic judged",
        Duration::from_secs(180),
        |o| o.totals(P2R) == (n, n) && o.totals(R2A) == (n, n),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hooks = receiver.received();
    let o = outcome(db, &hooks, &[topic]).await?;
    // A bucket may wait while the broker is away; it is never judged anything that notifies.
    ensure!(
        o.bad().is_empty() && o.ever_alarming == 0 && o.firing == 0 && o.resolved == 0,
        "{cluster} broker killed -9, restarted: {o:#?}"
    );
    ensure!(
        hooks.len() == notified,
        "the broker's crash notified someone: {:?}",
        hooks[notified..]
            .iter()
            .map(|h| String::from_utf8_lossy(&h.body))
            .collect::<Vec<_>>()
    );
    let waited: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT edge, status, count(*) FROM reconcile_verdict_history
          WHERE topic = $1 AND partition = -1 AND status <> 'complete'
          GROUP BY edge, status ORDER BY edge, status",
    )
    .bind(topic)
    .fetch_all(&db.pool)
    .await?;
    eprintln!(
        "{cluster} broker killed -9: {n} messages, phase took {:.0} s; verdicts on the way to \
         complete (edge, status, changes): {waited:?}",
        phase.elapsed().as_secs_f64(),
    );
    Ok(o)
}

/// Deletes every record of partition 0 of `topic` on regional before `offset`.
async fn delete_records(topic: &str, offset: i64) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))?;
    let result = admin.delete_records(&tpl, &AdminOptions::new()).await?;
    for el in result.elements() {
        if let Err(e) = el.error() {
            bail!("deleting records of {topic}: {e}");
        }
    }
    Ok(())
}

/// A counts record whose `host` holds a NUL character.
async fn poison(audit: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .create()?;
    let record = serde_json::json!({
        "version": 1, "kind": "progress", "id": uuid::Uuid::new_v4().to_string(),
        "topic": "poison", "physical_topic": "poison", "partition": 0, "tier": "producer",
        "datacenter": "regional", "cluster": "regional", "host": "web\u{0}1",
        "instance": "1", "watermark_ms": chrono::Utc::now().timestamp_millis(),
        "bucket_width_ms": WIDTH_MS, "emitted_at_ms": chrono::Utc::now().timestamp_millis()
    });
    producer
        .send(
            FutureRecord::to(audit)
                .key("poison")
                .payload(&record.to_string()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// The poison record is on the dead-letter topic, with a reason naming the field.
async fn dead_lettered(audit: &str) -> anyhow::Result<()> {
    use rdkafka::Message as _;
    use rdkafka::message::Headers as _;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("group.id", unique("faults-dlq"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&format!("{audit}-dlq")])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        if m.key() != Some(b"poison".as_slice()) {
            continue;
        }
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                .unwrap_or_default()
        };
        let (reason, error) = (
            header("chaperone-dlq-reason"),
            header("chaperone-dlq-error"),
        );
        ensure!(
            reason == "nul_character" && error.contains("host"),
            "dead-letter reason {reason:?}, error {error:?}"
        );
        return Ok(());
    }
    bail!("the poison record did not reach {audit}-dlq")
}
