//! Helpers for the integration tests: topics, producing known messages, spawning the real
//! binary, and reading the audit topic back with `read_committed`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chaperone_audit::{AuditRecord, Counts, Progress};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub use chaperone_test_support::unique;

pub fn regional() -> String {
    chaperone_test_support::regional_bootstrap()
}

pub fn aggregate() -> String {
    chaperone_test_support::aggregate_bootstrap()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Creates a topic (fails the test when the cluster is unreachable).
pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    chaperone_test_support::create_topic(bootstrap, name, partitions)
        .await
        .unwrap_or_else(|e| panic!("{e:#} (is `dev/stack up` running?)"));
}

/// A fresh topic `<prefix>-<suffix>` with `partitions` partitions and a 3-partition audit topic
/// `<prefix>-audit` on the regional cluster, `prefix` being unique per call. Returns (prefix,
/// audit topic, topic, bootstrap servers).
pub async fn regional_topic(
    name: &str,
    suffix: &str,
    partitions: i32,
) -> (String, String, String, String) {
    let prefix = unique(name);
    let audit = format!("{prefix}-audit");
    let topic = format!("{prefix}-{suffix}");
    let bootstrap = regional();
    create_topic(&bootstrap, &audit, 3).await;
    create_topic(&bootstrap, &topic, partitions).await;
    (prefix, audit, topic, bootstrap)
}

/// A regional-tier configuration in group `<prefix>-g` auditing exactly `topic`.
pub fn regional_config(prefix: &str, bootstrap: &str, audit: &str, topic: &str) -> TestConfig {
    TestConfig::new(
        bootstrap,
        "regional",
        "regional",
        "dc-test",
        &format!("{prefix}-g"),
        audit,
        &format!("^{topic}$"),
    )
}

/// Replaces the topic's configuration with `configs` (empty: every setting back to its
/// default).
pub async fn set_topic_config(bootstrap: &str, name: &str, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
    for (k, v) in configs {
        alter = alter.set(k, v);
    }
    let results = admin
        .alter_configs([&alter], &AdminOptions::new())
        .await
        .expect("alter configs");
    for r in results {
        r.unwrap_or_else(|(resource, e)| panic!("cannot configure {resource:?}: {e}"));
    }
}

/// The value of a counter or gauge line in a Prometheus text exposition, 0 when absent.
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One message to produce: partition, CreateTime timestamp, payload.
#[derive(Debug, Clone)]
pub struct Msg {
    pub partition: i32,
    pub timestamp: i64,
    pub payload: Vec<u8>,
}

pub fn producer(bootstrap: &str) -> BaseProducer {
    producer_with(bootstrap, &[])
}

/// A producer with `overrides` on top of [`producer`]'s settings.
pub fn producer_with(bootstrap: &str, overrides: &[(&str, &str)]) -> BaseProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in overrides {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

/// Produces `msgs` to `topic` and waits until all are acknowledged.
pub fn produce(p: &BaseProducer, topic: &str, msgs: &[Msg]) {
    for m in msgs {
        let mut rec = BaseRecord::<(), [u8]>::to(topic)
            .partition(m.partition)
            .timestamp(m.timestamp)
            .payload(&m.payload);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    rec = r;
                    p.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("produce to {topic} failed: {e}"),
            }
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

/// Expected counts per (physical topic, partition, bucket start).
pub type Expected = BTreeMap<(String, i32, i64), u64>;

pub fn expect(expected: &mut Expected, topic: &str, msgs: &[Msg], width_ms: i64) {
    for m in msgs {
        let bucket = m.timestamp.div_euclid(width_ms) * width_ms;
        *expected
            .entry((topic.to_owned(), m.partition, bucket))
            .or_default() += 1;
    }
}

/// A service configuration for tests, as TOML.
pub struct TestConfig {
    pub toml: String,
}

impl TestConfig {
    pub fn new(
        bootstrap: &str,
        tier: &str,
        cluster: &str,
        datacenter: &str,
        group: &str,
        audit: &str,
        include: &str,
    ) -> Self {
        let toml = format!(
            r#"
tier = "{tier}"
cluster = "{cluster}"
datacenter = "{datacenter}"
host = "test-host"
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
audit_topic = "{audit}"
audit_topic_partitions = 3
flush_interval = "1s"
transaction_timeout = "30s"
http_addr = "127.0.0.1:0"

[topics]
include = ['{include}']
refresh_interval = "1s"

[kafka_consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
"#
        );
        Self { toml }
    }

    /// Replaces the flush interval.
    pub fn flush_interval(mut self, d: &str) -> Self {
        self.toml = self.toml.replace(
            "flush_interval = \"1s\"",
            &format!("flush_interval = \"{d}\""),
        );
        self
    }

    /// Adds a librdkafka property of the consumer (`[kafka_consumer]`).
    pub fn kafka_consumer(mut self, key: &str, value: &str) -> Self {
        self.toml = self.toml.replace(
            "[kafka_consumer]\n",
            &format!("[kafka_consumer]\n\"{key}\" = \"{value}\"\n"),
        );
        self
    }

    /// Appends TOML (for example an `[event_time]` table).
    pub fn with(mut self, extra: &str) -> Self {
        self.toml.push_str(extra);
        self
    }

    pub fn parse(&self, instance: &str) -> chaperone_service::Config {
        let mut c = chaperone_service::Config::from_toml(&self.toml).expect("test config parses");
        c.instance = instance.to_owned();
        c
    }

    pub fn write(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join("service.toml");
        std::fs::write(&path, &self.toml).expect("write config");
        path
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real binary, spawned with a config file and an instance name.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Service {
    pub fn spawn(config: &std::path::Path, instance: &str, log: PathBuf) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_chaperone-service"))
            .arg("--config")
            .arg(config)
            .arg("--instance")
            .arg(instance)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn chaperone-service");
        Self {
            child: Some(child),
            log,
        }
    }

    /// SIGKILL: no flush, no commit, no leaving the group.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        assert!(
                            status.success(),
                            "service exited with {status}; log:\n{}",
                            self.log_text()
                        );
                        return;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        panic!(
                            "service did not stop within 60 s; log:\n{}",
                            self.log_text()
                        );
                    }
                }
            }
        }
    }

    /// Fails the test when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "service exited early with {status}; log:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a whole audit topic with `read_committed` and accumulates what it holds.
pub struct AuditReader {
    consumer: BaseConsumer,
    pub ids: HashSet<String>,
    pub duplicate_ids: Vec<String>,
    pub counts: Vec<Counts>,
    /// Latest progress position per (physical topic, partition).
    pub positions: HashMap<(String, i32), i64>,
    pub progress_records: usize,
    /// Every progress record, in the order read.
    pub progress: Vec<Progress>,
    /// Instances that wrote any record.
    pub instances: HashSet<String>,
    /// Physical topics of interest (others are ignored).
    topics: HashSet<String>,
}

impl AuditReader {
    pub fn new(bootstrap: &str, audit_topic: &str, partitions: i32, topics: &[String]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("audit-reader"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("audit reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(audit_topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign audit topic");
        Self {
            consumer,
            ids: HashSet::new(),
            duplicate_ids: Vec::new(),
            counts: Vec::new(),
            positions: HashMap::new(),
            progress_records: 0,
            progress: Vec::new(),
            instances: HashSet::new(),
            topics: topics.iter().cloned().collect(),
        }
    }

    /// Reads what is available for up to `max`.
    pub fn poll_for(&mut self, max: Duration) {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let payload = m.payload().unwrap_or_default();
                    let rec = AuditRecord::decode(payload).unwrap_or_else(|e| {
                        panic!(
                            "undecodable audit record ({e}): {}",
                            String::from_utf8_lossy(payload)
                        )
                    });
                    let physical = match &rec {
                        AuditRecord::Counts(c) => &c.physical_topic,
                        AuditRecord::Progress(p) => &p.physical_topic,
                    };
                    if !self.topics.contains(physical) {
                        continue;
                    }
                    self.instances.insert(rec.observer().instance.clone());
                    if !self.ids.insert(rec.id().to_owned()) {
                        self.duplicate_ids.push(rec.id().to_owned());
                    }
                    match rec {
                        AuditRecord::Counts(c) => self.counts.push(c),
                        AuditRecord::Progress(p) => {
                            self.progress_records += 1;
                            if let (Some(part), Some(pos)) = (p.partition, p.position) {
                                self.positions.insert((p.physical_topic.clone(), part), pos);
                            }
                            self.progress.push(p);
                        }
                    }
                }
                Some(Err(e)) => panic!("audit reader error: {e}"),
                None => break,
            }
        }
    }

    /// Totals per (physical topic, partition, bucket).
    pub fn totals(&self) -> Expected {
        let mut t = Expected::new();
        for c in &self.counts {
            *t.entry((
                c.physical_topic.clone(),
                c.partition.unwrap_or(-1),
                c.bucket_start_ms,
            ))
            .or_default() += c.count;
        }
        t
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.count).sum()
    }

    /// Reads until the totals equal `expected` and every partition's progress reached its
    /// end offset in `ends`; panics on overshoot, duplicates or the deadline.
    pub fn wait_exact(
        &mut self,
        expected: &Expected,
        ends: &HashMap<(String, i32), i64>,
        within: Duration,
        context: &dyn Fn() -> String,
    ) {
        let want: u64 = expected.values().sum();
        let deadline = Instant::now() + within;
        loop {
            self.poll_for(Duration::from_millis(500));
            assert!(
                self.duplicate_ids.is_empty(),
                "duplicate record ids: {:?}",
                &self.duplicate_ids[..self.duplicate_ids.len().min(5)]
            );
            let got = self.total();
            if got > want {
                panic!(
                    "over-counted: {got} > {want}\n{}\n{}",
                    diff(expected, &self.totals()),
                    context()
                );
            }
            let at_end = ends
                .iter()
                .all(|(k, end)| self.positions.get(k).copied().unwrap_or(-1) >= *end);
            if got == want && at_end {
                assert_eq!(&self.totals(), expected, "per-cell totals differ");
                return;
            }
            if Instant::now() >= deadline {
                let behind: Vec<_> = ends
                    .iter()
                    .filter(|(k, end)| self.positions.get(*k).copied().unwrap_or(-1) < **end)
                    .map(|(k, end)| (k.clone(), self.positions.get(k).copied(), *end))
                    .take(5)
                    .collect();
                panic!(
                    "timed out: counted {got} of {want}; progress behind: {behind:?}\n{}\n{}",
                    diff(expected, &self.totals()),
                    context()
                );
            }
        }
    }
}

/// The first differing cells of two totals, for failure messages.
pub fn diff(want: &Expected, got: &Expected) -> String {
    let mut out = Vec::new();
    for (k, w) in want {
        let g = got.get(k).copied().unwrap_or(0);
        if g != *w {
            out.push(format!("{k:?}: want {w}, got {g}"));
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            out.push(format!("{k:?}: unexpected {g}"));
        }
    }
    out.truncate(10);
    out.join("\n")
}

/// End offsets of every partition of `topics` on `bootstrap` (read_uncommitted high watermarks).
pub fn ends(bootstrap: &str, topics: &[(String, i32)]) -> HashMap<(String, i32), i64> {
    let mut out = HashMap::new();
    for (t, parts) in topics {
        let offsets =
            chaperone_test_support::end_offsets(bootstrap, t, *parts).expect("end offsets");
        for (p, high) in (0..).zip(offsets) {
            out.insert((t.clone(), p), high);
        }
    }
    out
}

/// Cancels the in-process service when a test ends, even by a panic, so the runtime's
/// blocking consume thread stops.
/// The service running in this process with an HTTP listener on loopback; cancelled when
/// dropped, so a failing test does not leave it running.
pub struct InProcess {
    pub addr: std::net::SocketAddr,
    shutdown: CancelOnDrop,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub async fn start(config: chaperone_service::Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(chaperone_service::run(
            config,
            chaperone_service::Deps {
                listener: Some(listener),
                ..Default::default()
            },
            shutdown.clone(),
        ));
        Self {
            addr,
            shutdown: CancelOnDrop(shutdown),
            task,
        }
    }

    /// Shuts the service down and checks that it stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.0.cancel();
        self.task
            .await
            .expect("service task")
            .expect("service stopped cleanly");
    }
}

struct CancelOnDrop(tokio_util::sync::CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Plain GET over HTTP/1.1; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}
