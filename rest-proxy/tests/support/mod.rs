//! What the proxy's integration tests share: a proxy running in-process on the regional
//! cluster of `dev/stack up`, reading topics back with `kcat`, and summing the audit records
//! the proxy wrote.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use chaperone_audit::{AuditRecord, Tier};
use chaperone_rest_proxy::{Config, Deps};
use chaperone_test_support::{create_topic, eventually, regional_bootstrap, unique};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A proxy running in this process.
#[derive(Debug)]
pub struct Running {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its configuration.
    pub config: Config,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops it cleanly (the audit's last flushes included) and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// A fresh configuration on the regional cluster with its own audit topic and spool, a 1 s
/// audit flush.
pub async fn config() -> anyhow::Result<Config> {
    let audit_topic = unique("proxy-audit");
    create_topic(&regional_bootstrap(), &audit_topic, 1).await?;
    let mut c = Config {
        bootstrap_servers: regional_bootstrap(),
        ..Config::default()
    };
    c.audit.topic = audit_topic;
    c.audit.flush_interval = Duration::from_secs(1);
    c.audit.spool_dir = std::env::temp_dir().join(unique("proxy-spool"));
    c.audit.instance = Some(unique("proxy"));
    Ok(c)
}

/// Starts a proxy with `config` on a free loopback port.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let deps = Deps {
        listener: Some(listener),
        ..Deps::default()
    };
    let task = tokio::spawn(chaperone_rest_proxy::run(
        config.clone(),
        deps,
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    eventually(
        "the proxy to answer /readyz",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let url = url.clone();
            async move {
                Ok(client
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        },
    )
    .await?;
    Ok(Running {
        url,
        config,
        shutdown,
        task,
    })
}

/// A new topic on the regional cluster.
pub async fn topic(partitions: i32) -> anyhow::Result<String> {
    let t = unique("proxy");
    create_topic(&regional_bootstrap(), &t, partitions).await?;
    Ok(t)
}

/// One record as `kcat` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Read {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key (`kcat` prints an empty string for none).
    pub key: String,
    /// Value.
    pub value: String,
    /// Timestamp in ms.
    pub timestamp_ms: i64,
    /// Headers as `kcat` prints them: `name=value,...`.
    pub headers: String,
}

/// Every record of `topic`, read by `kcat` once it holds `expected`, sorted by partition and
/// offset.
pub async fn kcat(topic: &str, expected: usize) -> anyhow::Result<Vec<Read>> {
    let topic = topic.to_owned();
    eventually(
        &format!("kcat to read {expected} records of {topic}"),
        Duration::from_secs(60),
        || {
            let topic = topic.clone();
            async move {
                let out = tokio::process::Command::new("kcat")
                    .args([
                        "-C",
                        "-b",
                        &regional_bootstrap(),
                        "-t",
                        &topic,
                        "-o",
                        "beginning",
                        "-e",
                        "-q",
                        "-f",
                        "%p\t%o\t%k\t%s\t%T\t%h\n",
                    ])
                    .output()
                    .await
                    .context("running kcat")?;
                ensure!(out.status.success(), "kcat failed: {out:?}");
                let text = String::from_utf8(out.stdout)?;
                let mut reads = Vec::new();
                for line in text.lines().filter(|l| !l.is_empty()) {
                    let f: Vec<&str> = line.split('\t').collect();
                    ensure!(f.len() == 6, "unexpected kcat line {line:?}");
                    reads.push(Read {
                        partition: f[0].parse()?,
                        offset: f[1].parse()?,
                        key: f[2].to_owned(),
                        value: f[3].to_owned(),
                        timestamp_ms: f[4].parse()?,
                        headers: f[5].to_owned(),
                    });
                }
                reads.sort();
                Ok((reads.len() >= expected).then_some(reads))
            }
        },
    )
    .await
}

/// Producer-tier counts of `topic` on `audit_topic`, per (instance, partition), each record id
/// applied once; waits until they add up to at least `expected`.
pub async fn audit_counts(
    audit_topic: &str,
    topic: &str,
    expected: u64,
) -> anyhow::Result<BTreeMap<(String, i32), u64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("group.id", unique("proxy-audit-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(audit_topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut seen = HashSet::new();
    let mut counts: BTreeMap<(String, i32), u64> = BTreeMap::new();
    eventually(
        &format!("{expected} audited records of {topic}"),
        Duration::from_secs(60),
        || {
            while let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => return std::future::ready(Err(e.into())),
                };
                let Some(payload) = m.payload() else { continue };
                if let Ok(AuditRecord::Counts(c)) = AuditRecord::decode(payload)
                    && c.topic == topic
                    && c.observer.tier == Tier::Producer
                    && seen.insert(c.id.clone())
                {
                    *counts
                        .entry((c.observer.instance.clone(), c.partition.unwrap_or(-1)))
                        .or_default() += c.count;
                }
            }
            let total: u64 = counts.values().sum();
            std::future::ready(Ok((total >= expected).then_some(())))
        },
    )
    .await?;
    Ok(counts)
}

/// Runs a shell command line and returns its stdout, failing on a non-zero exit.
pub async fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The directory of the spool of `config`, removed.
pub fn remove_spool(config: &Config) {
    let _ = std::fs::remove_dir_all(&config.audit.spool_dir);
}

/// A path for a temporary file.
pub fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(unique(name))
}
