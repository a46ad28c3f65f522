//! Helpers shared by audit-lib's integration tests: they talk to the real regional Kafka of
//! the dev stack (`dev/stack up`), and fail when it is not there.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chaperone_audit::{AuditConfig, AuditRecord};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub use chaperone_test_support::{regional_bootstrap, unique};

pub fn temp_dir(prefix: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

pub fn client(bootstrap: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap);
    cc
}

/// Creates a topic on the regional cluster and waits until its metadata shows it.
pub async fn create_topic(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let bootstrap = regional_bootstrap();
    chaperone_test_support::create_topic(&bootstrap, topic, partitions).await?;
    chaperone_test_support::wait_for_topics(
        &bootstrap,
        &[topic.to_owned()],
        Duration::from_secs(30),
    )
    .await
}

/// Audit config for a test: its own audit topic and spool directory, fast flushes.
pub fn audit_config(audit_topic: &str, spool_dir: PathBuf) -> AuditConfig {
    AuditConfig {
        topic: audit_topic.to_owned(),
        flush_interval: Duration::from_millis(500),
        spool_dir,
        instance: Some(unique("test")),
        ..AuditConfig::default()
    }
}

/// Every message on `topic` up to its high watermarks at call time, read with
/// `read_committed`, decoded (a record that does not decode fails the test).
pub fn read_audit_topic(topic: &str) -> anyhow::Result<Vec<AuditRecord>> {
    Ok(read_audit_messages(topic)?
        .into_iter()
        .map(|m| m.record)
        .collect())
}

/// One message of an audit topic.
#[derive(Debug, Clone)]
pub struct AuditMessage {
    pub partition: i32,
    pub offset: i64,
    /// The Kafka key, as UTF-8.
    pub key: Option<String>,
    pub record: AuditRecord,
}

/// Like [`read_audit_topic`], with where each record is and its key; in partition and offset
/// order.
pub fn read_audit_messages(topic: &str) -> anyhow::Result<Vec<AuditMessage>> {
    let consumer: BaseConsumer = client(&regional_bootstrap())
        .set("group.id", unique("audit-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: HashMap<i32, bool> = ends.iter().map(|(p, h)| (*p, *h == 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.values().any(|d| !d) {
        if Instant::now() > deadline {
            bail!("audit topic {topic} not read to its end in time: {done:?}");
        }
        // Done where the position passed the end: the last offsets of a transactional
        // topic are commit markers, which are never delivered.
        if let Ok(positions) = consumer.position() {
            for el in positions.elements() {
                if let Some(pos) = el.offset().to_raw()
                    && ends.get(&el.partition()).is_some_and(|h| pos >= *h)
                {
                    done.insert(el.partition(), true);
                }
            }
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let payload = m.payload().context("audit message without payload")?;
        out.push(AuditMessage {
            partition: m.partition(),
            offset: m.offset(),
            key: m
                .key()
                .map(|k| String::from_utf8(k.to_vec()))
                .transpose()
                .context("audit key is UTF-8")?,
            record: AuditRecord::decode(payload).context("audit record decodes")?,
        });
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), true);
        }
    }
    out.sort_by_key(|m| (m.partition, m.offset));
    Ok(out)
}

/// Ids of the records in every spool file under `dir` (format: `<checksum> <record>\n`).
pub fn spool_file_ids(dir: &std::path::Path) -> anyhow::Result<HashSet<String>> {
    let mut ids = HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("spool") {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let (_, json) = line
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("bad spool line"))?;
            ids.insert(AuditRecord::decode(json.as_bytes())?.id().to_owned());
        }
    }
    Ok(ids)
}

/// Message counts per (physical topic, partition, bucket start).
pub type Sums = BTreeMap<(String, Option<i32>, i64), u64>;

/// Counts per (physical topic, partition, bucket start) over records with distinct ids;
/// fails when two copies of one id differ.
pub fn sum_counts(records: &[AuditRecord]) -> anyhow::Result<(Sums, usize)> {
    let mut seen: HashMap<String, &AuditRecord> = HashMap::new();
    let mut duplicates = 0;
    let mut sums = BTreeMap::new();
    for r in records {
        if let Some(prev) = seen.get(r.id()) {
            if *prev != r {
                bail!("two different records share id {}", r.id());
            }
            duplicates += 1;
            continue;
        }
        seen.insert(r.id().to_owned(), r);
        if let AuditRecord::Counts(c) = r {
            *sums
                .entry((c.physical_topic.clone(), c.partition, c.bucket_start_ms))
                .or_insert(0) += c.count;
        }
    }
    Ok((sums, duplicates))
}

/// Produces `n` messages of 100 bytes to `topic` with a plain (unaudited) producer, message
/// `i` to partition `i % partitions` with an event time spread over the three one-minute
/// buckets before the current one; returns how many went to each (topic, partition, bucket).
pub fn produce_spread(topic: &str, partitions: i32, n: usize) -> anyhow::Result<Sums> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = client(&regional_bootstrap())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?;
    let width = chaperone_audit::BucketWidth::default();
    let end = width.start_of(chrono::Utc::now().timestamp_millis()) - 1;
    let payload = vec![b'p'; 100];
    let mut sums = Sums::new();
    for i in 0..n {
        let partition = (i as i32) % partitions;
        let event = end - ((i % 3) as i64) * 60_000 - (i % 997) as i64;
        let mut record = BaseRecord::<(), [u8]>::to(topic)
            .partition(partition)
            .payload(payload.as_slice())
            .timestamp(event);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        *sums
            .entry((topic.to_owned(), Some(partition), width.start_of(event)))
            .or_insert(0) += 1;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(sums)
}

/// The group's committed offsets of partitions `0..partitions` of `topic` (-1 when none).
pub fn group_offsets(group: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let consumer: BaseConsumer = client(&regional_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(|p| {
            committed
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1)
        })
        .collect())
}

/// The progress records of `topic` in `records`, in the order read.
pub fn progress_of<'a>(
    records: &'a [AuditRecord],
    topic: &'a str,
) -> impl Iterator<Item = &'a chaperone_audit::Progress> + 'a {
    records.iter().filter_map(move |r| match r {
        AuditRecord::Progress(p) if p.topic == topic => Some(p),
        _ => None,
    })
}
