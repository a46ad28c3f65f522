//! Audited consumer groups as the end-to-end tests run them: a [`Reader`] reads in a thread
//! of the test; a [`Member`] is a process of its own so that it can be killed with `kill -9`
//! (the test binary run again as its `member_process` test, which calls [`run_member`] with
//! the settings [`Member::start`] put in its environment). A member reads until its stdin
//! closes, then closes its consumer cleanly (final progress records).

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chaperone_audit::mapping::{MappingConfig, MappingKind};
use chaperone_audit::{AuditConfig, AuditedConsumer, ConsumerOptions, CountOn};
use chaperone_test_support::{TestProcess, regional_bootstrap, unique};
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The environment variable that carries a member's settings.
pub const MEMBER_ENV: &str = "CHAPERONE_E2E_MEMBER";

/// One member of a group reading a regional topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Topic read.
    pub topic: String,
    /// Audit topic the counts go to.
    pub audit_topic: String,
    /// `group.id`; the tier is `consumer:<group>`.
    pub group: String,
    /// The audit instance; a restarted member gets a new one, and keeps its predecessor's
    /// transactional id through `slot`.
    pub instance: String,
    /// Which member this is, the same for a killed member and its restart (the transactional
    /// id, so the restart fences what its predecessor left open).
    pub slot: String,
    /// Counts, progress and offsets in one transaction; else at-least-once.
    pub transactional: bool,
}

impl Member {
    fn encode(&self) -> String {
        [
            self.topic.as_str(),
            &self.audit_topic,
            &self.group,
            &self.instance,
            &self.slot,
            if self.transactional { "1" } else { "0" },
        ]
        .join("\t")
    }

    fn decode(s: &str) -> anyhow::Result<Self> {
        let f: Vec<&str> = s.split('\t').collect();
        let [topic, audit_topic, group, instance, slot, transactional] = f[..] else {
            anyhow::bail!("{MEMBER_ENV} holds {} fields, expected 6", f.len());
        };
        Ok(Self {
            topic: topic.to_owned(),
            audit_topic: audit_topic.to_owned(),
            group: group.to_owned(),
            instance: instance.to_owned(),
            slot: slot.to_owned(),
            transactional: transactional == "1",
        })
    }

    /// Starts the member as a process of its own.
    pub fn start(&self) -> anyhow::Result<TestProcess> {
        TestProcess::start("member_process", (MEMBER_ENV, self.encode()))
    }
}

/// The body of a member process: reads as [`MEMBER_ENV`] says until stdin closes, then
/// closes.
pub fn run_member() -> anyhow::Result<()> {
    let spec = Member::decode(
        &std::env::var(MEMBER_ENV).map_err(|_| anyhow::anyhow!("{MEMBER_ENV} is not set"))?,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stopping.store(true, Ordering::Relaxed);
    });
    let reader = Reader {
        bootstrap: regional_bootstrap(),
        topics: vec![spec.topic.clone()],
        audit_topic: spec.audit_topic.clone(),
        group: spec.group.clone(),
        instance: spec.instance.clone(),
        transactional_id: format!("{}-{}", spec.group, spec.slot),
        transactional: spec.transactional,
        mirror: false,
        skip: None,
    };
    reader.run(&stop)?;
    Ok(())
}

/// One audited consumer of a group, reading in the calling thread.
#[derive(Debug, Clone)]
pub struct Reader {
    /// Cluster read.
    pub bootstrap: String,
    /// Topics read.
    pub topics: Vec<String>,
    /// Audit topic the counts go to (on the cluster read).
    pub audit_topic: String,
    /// `group.id`; the tier is `consumer:<group>`.
    pub group: String,
    /// The audit instance.
    pub instance: String,
    /// Transactional id in transactional mode.
    pub transactional_id: String,
    /// Counts, progress and offsets in one transaction (committed every 200 messages and on
    /// every flush); else at-least-once.
    pub transactional: bool,
    /// The topics are MirrorMaker 2's copies on the aggregate cluster, mapped back to the
    /// logical topics (`mirror` mapping).
    pub mirror: bool,
    /// With `Some`, a message counts only once said `processed`, and the offsets this says
    /// are never said to be: a consumer that passes over records. With `None`, every message
    /// received counts.
    pub skip: Option<fn(i64) -> bool>,
}

impl Reader {
    /// Reads until `stop`, then closes cleanly (final progress records); returns the
    /// messages passed over.
    pub fn run(&self, stop: &AtomicBool) -> anyhow::Result<u64> {
        let mut kafka = ClientConfig::new();
        kafka
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("fetch.queue.backoff.ms", "1");
        if self.transactional {
            kafka.set("enable.auto.commit", "false");
        }
        let audit = AuditConfig {
            topic: self.audit_topic.clone(),
            flush_interval: Duration::from_secs(1),
            bucket_width: Duration::from_secs(10),
            instance: Some(self.instance.clone()),
            spool_dir: std::env::temp_dir().join(unique("e2e-reader-spool")),
            ..AuditConfig::default()
        };
        let options = ConsumerOptions {
            transactional: self.transactional,
            transactional_id: Some(self.transactional_id.clone()),
            transaction_timeout: Duration::from_secs(10),
            count_on: if self.skip.is_some() {
                CountOn::Processed
            } else {
                CountOn::Offsets
            },
            mapping: MappingConfig {
                kind: self.mirror.then_some(MappingKind::Mirror),
                ..MappingConfig::default()
            },
            ..ConsumerOptions::default()
        };
        // Creating a transactional consumer waits for its producer id; on a stalled machine
        // that can time out, and an application would start again.
        let mut attempts = 0;
        let consumer = loop {
            match AuditedConsumer::with_options(
                &kafka,
                audit.clone(),
                options.clone(),
                &prometheus::Registry::new(),
            ) {
                Ok(c) => break c,
                Err(e) if attempts < 5 && !stop.load(Ordering::Relaxed) => {
                    attempts += 1;
                    eprintln!("reader {}: cannot start yet: {e}", self.instance);
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (mut n, mut passed_over) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    n += 1;
                    match self.skip {
                        Some(skip) if skip(m.offset()) => passed_over += 1,
                        Some(_) => {
                            consumer.processed(&m);
                        }
                        None => {}
                    }
                    if self.transactional && n.is_multiple_of(200) {
                        consumer.commit_message(&m, CommitMode::Async)?;
                    }
                }
                Some(Err(e)) => eprintln!("reader {}: consumer error: {e}", self.instance),
                None => {}
            }
        }
        if self.transactional {
            consumer.commit_consumer_state(CommitMode::Async)?;
        }
        let stats = consumer.close();
        eprintln!("reader {} stopped: {stats:?}", self.instance);
        Ok(passed_over)
    }
}

fn group_client(group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// The committed offsets of `group` in partitions `0..partitions` of `topic` (-1 where none).
/// Blocks.
pub fn committed(group: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = group_client(group)?.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(|p| {
            c.find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1)
        })
        .collect())
}

/// Sets the committed offsets of `group`, which has no member, to `offset` in partitions
/// `0..partitions` of `topic`: what an operator's `kafka-consumer-groups --reset-offsets`
/// does to replay a topic. Blocks.
pub fn reset_offsets(group: &str, topic: &str, partitions: i32, offset: i64) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
    }
    group_client(group)?.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}
