//! The audit record: the one contract every Chaperone component speaks.
//!
//! An [`AuditRecord`] travels as one JSON object per Kafka message on the audit topic. It is
//! either a [`Counts`] delta (messages one hop saw in one event-time bucket of one topic and
//! partition) or a [`Progress`] heartbeat (how far one hop has got in one partition, so a
//! silent tier can be told apart from a tier that saw nothing). The schema is documented with
//! an example in this crate's README; `version` is bumped on any incompatible change.
//!
//! Decoding with [`AuditRecord::decode`] is strict: every problem is a typed [`DecodeError`]
//! naming the offending field.

use serde::{Deserialize, Serialize};

use crate::bucket::BucketWidth;
use crate::histogram::{HistogramError, Latency};

/// Wire-format version written by this crate.
pub const VERSION: u32 = 1;

/// Longest topic name Kafka allows, in bytes (Kafka's own names are ASCII, so also
/// characters).
pub const MAX_TOPIC_LEN: usize = 249;

/// Longest identity string (tier, datacenter, cluster, host, instance, id), in UTF-8 bytes.
/// Bytes, not characters: the collector's keys hold up to seven of these strings, and
/// PostgreSQL refuses an index row over about 2.7 KB (a third of a page).
pub const MAX_NAME_LEN: usize = 255;

/// Earliest timestamp accepted anywhere in a record: 2000-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;

/// Latest timestamp accepted anywhere in a record: 2200-01-01T00:00:00Z.
pub const MAX_TIMESTAMP_MS: i64 = 7_258_118_400_000;

/// Largest count or byte total accepted in one record (2^53, exact in every JSON reader).
pub const MAX_TOTAL: i64 = 1 << 53;

/// Longest encoded record accepted by the decoder.
pub const MAX_RECORD_LEN: usize = 256 * 1024;

/// The hop that observed messages. The three well-known tiers have names; any other is
/// carried as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Tier {
    /// Producers, counting what Kafka acknowledged (audit-lib).
    Producer,
    /// The regional cluster (chaperone-service next to it).
    Regional,
    /// The aggregate cluster fed by the mirror (chaperone-service next to it).
    Aggregate,
    /// A user-defined tier, such as a consumer application.
    Other(String),
}

impl Tier {
    /// The tier's name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Tier::Producer => "producer",
            Tier::Regional => "regional",
            Tier::Aggregate => "aggregate",
            Tier::Other(s) => s,
        }
    }
}

impl From<String> for Tier {
    fn from(s: String) -> Self {
        match s.as_str() {
            "producer" => Tier::Producer,
            "regional" => Tier::Regional,
            "aggregate" => Tier::Aggregate,
            _ => Tier::Other(s),
        }
    }
}

impl From<&str> for Tier {
    fn from(s: &str) -> Self {
        Tier::from(s.to_owned())
    }
}

impl From<Tier> for String {
    fn from(t: Tier) -> Self {
        match t {
            Tier::Other(s) => s,
            t => t.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who observed the messages: shared by both record kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Observer {
    /// The hop.
    pub tier: Tier,
    /// The datacenter the messages originated in (for mirrored topics, the source named by
    /// the topic mapping).
    pub datacenter: String,
    /// Alias of the Kafka cluster the messages were seen on.
    pub cluster: String,
    /// Host name of the observing process.
    pub host: String,
    /// Instance of the observing process on its host (for example a pid or pod name).
    pub instance: String,
}

/// A delta of counts seen at one hop for one topic, partition and event-time bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    /// Unique id, stable across retries so the collector can drop duplicates.
    pub id: String,
    /// Logical topic (after topic mapping).
    pub topic: String,
    /// Topic the messages were seen on (for example `regional.orders` on an aggregate).
    pub physical_topic: String,
    /// Partition, when the hop knows it.
    pub partition: Option<i32>,
    /// Start of the event-time bucket (epoch ms, aligned to `bucket_width`).
    pub bucket_start_ms: i64,
    /// Width of the bucket.
    pub bucket_width: BucketWidth,
    /// Who observed the messages.
    pub observer: Observer,
    /// Messages counted (including those without timestamp and malformed ones).
    pub count: u64,
    /// Payload bytes of the counted messages.
    pub bytes: u64,
    /// Messages with no usable event time, counted in the bucket of their arrival time.
    pub no_timestamp: u64,
    /// Messages whose payload could not be parsed for an event time.
    pub malformed: u64,
    /// Earliest event time seen, when any message had one.
    pub min_event_ms: Option<i64>,
    /// Latest event time seen, when any message had one.
    pub max_event_ms: Option<i64>,
    /// Distribution of (time seen at the hop - event time).
    pub latency: Latency,
    /// When the record was made (epoch ms).
    pub emitted_at_ms: i64,
}

/// How far one hop has got in one topic-partition: a heartbeat that is sent even when no
/// message arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Unique id, stable across retries.
    pub id: String,
    /// Logical topic (after topic mapping).
    pub topic: String,
    /// Topic consumed or produced to.
    pub physical_topic: String,
    /// Partition, when the hop knows it.
    pub partition: Option<i32>,
    /// Who reports.
    pub observer: Observer,
    /// Next offset the hop will read (consumers), if known.
    pub position: Option<i64>,
    /// High watermark of the partition when the record was made, if known.
    pub high_watermark: Option<i64>,
    /// Event-time watermark: every message with an earlier event time has been counted.
    pub watermark_ms: i64,
    /// Width of the buckets this hop counts in.
    pub bucket_width: BucketWidth,
    /// When the record was made (epoch ms).
    pub emitted_at_ms: i64,
    /// The observer stops reporting this partition after this record because it shut down
    /// cleanly: every count it made was sent before it (JSON `"final": true`, omitted when
    /// false). The collector stops waiting for an instance once it has said so.
    pub closing: bool,
    /// The observer is a consumer whose counts are at-least-once (JSON `"at_least_once":
    /// true`, omitted when false): a member killed after its counts were sent and before its
    /// offsets were committed has its messages processed, and counted, again by the next
    /// owner. The collector marks a surplus on such a tier `redelivered`, not `duplicated`.
    pub at_least_once: bool,
}

/// One audit record, as carried on the audit topic.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditRecord {
    /// A delta of counts.
    Counts(Counts),
    /// A progress heartbeat.
    Progress(Progress),
}

/// Why a record was rejected. Every variant names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is larger than [`MAX_RECORD_LEN`].
    #[error("record is {0} bytes, more than the {MAX_RECORD_LEN} allowed")]
    TooLarge(usize),
    /// The payload is not a JSON object of the expected shape.
    #[error("record is not valid JSON: {0}")]
    Json(String),
    /// The record has no `version` field.
    #[error("record has no `version` field")]
    NoVersion,
    /// The record's version is not one this crate reads.
    #[error("unsupported record version {0} (this reader supports version {VERSION})")]
    UnsupportedVersion(i64),
    /// `kind` is not `counts` or `progress`.
    #[error("unknown record kind `{0}` (expected `counts` or `progress`)")]
    UnknownKind(String),
    /// A required field is absent or null.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field carries a field name this version does not define.
    #[error("unknown field `{0}`")]
    UnknownField(String),
    /// A number is below zero.
    #[error("field `{field}` is negative ({value})")]
    Negative {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: i64,
    },
    /// A number is outside what the field can hold.
    #[error("field `{field}` is out of range ({value}): {reason}")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: i64,
        /// What the allowed range is.
        reason: &'static str,
    },
    /// A timestamp is outside 2000-01-01 ..= 2200-01-01.
    #[error("field `{field}` is not a plausible epoch-millisecond timestamp ({value})")]
    Timestamp {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: i64,
    },
    /// A string is empty or too long (in UTF-8 bytes).
    #[error("field `{field}` is {len} bytes long, allowed 1..={max} bytes (UTF-8)")]
    StringLength {
        /// Field name.
        field: &'static str,
        /// Length found, in bytes.
        len: usize,
        /// Longest allowed.
        max: usize,
    },
    /// A string holds a NUL character, which PostgreSQL's `text` cannot store.
    #[error("field `{field}` contains a NUL character")]
    NulCharacter {
        /// Field name.
        field: &'static str,
    },
    /// Fields contradict each other.
    #[error("field `{field}` is inconsistent: {reason}")]
    Inconsistent {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The latency histogram is unreadable.
    #[error("field `latency`: {0}")]
    Histogram(#[from] HistogramError),
}

/// Wire form: every field optional so that absence is reported by name, numbers signed so
/// that negatives are reported by name.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: Option<i64>,
    kind: Option<String>,
    id: Option<String>,
    topic: Option<String>,
    physical_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partition: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bucket_start_ms: Option<i64>,
    bucket_width_ms: Option<i64>,
    tier: Option<String>,
    datacenter: Option<String>,
    cluster: Option<String>,
    host: Option<String>,
    instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    no_timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    malformed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_event_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_event_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    high_watermark: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark_ms: Option<i64>,
    #[serde(rename = "final", default, skip_serializing_if = "Option::is_none")]
    closing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_least_once: Option<bool>,
    emitted_at_ms: Option<i64>,
}

fn require<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField(field))
}

fn name(v: Option<String>, field: &'static str, max: usize) -> Result<String, DecodeError> {
    let s = require(v, field)?;
    let len = s.len();
    if len == 0 || len > max {
        return Err(DecodeError::StringLength { field, len, max });
    }
    if s.contains('\0') {
        return Err(DecodeError::NulCharacter { field });
    }
    Ok(s)
}

fn total(v: Option<i64>, field: &'static str) -> Result<u64, DecodeError> {
    let n = require(v, field)?;
    if n < 0 {
        return Err(DecodeError::Negative { field, value: n });
    }
    if n > MAX_TOTAL {
        return Err(DecodeError::OutOfRange {
            field,
            value: n,
            reason: "at most 2^53",
        });
    }
    Ok(n as u64)
}

fn timestamp(v: i64, field: &'static str) -> Result<i64, DecodeError> {
    if (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&v) {
        Ok(v)
    } else {
        Err(DecodeError::Timestamp { field, value: v })
    }
}

fn partition(v: Option<i64>) -> Result<Option<i32>, DecodeError> {
    match v {
        None => Ok(None),
        Some(p) if p < 0 => Err(DecodeError::Negative {
            field: "partition",
            value: p,
        }),
        Some(p) => i32::try_from(p)
            .map(Some)
            .map_err(|_| DecodeError::OutOfRange {
                field: "partition",
                value: p,
                reason: "at most 2^31-1",
            }),
    }
}

fn offset(v: Option<i64>, field: &'static str) -> Result<Option<i64>, DecodeError> {
    match v {
        Some(o) if o < 0 => Err(DecodeError::Negative { field, value: o }),
        o => Ok(o),
    }
}

fn width(v: Option<i64>) -> Result<BucketWidth, DecodeError> {
    let w = require(v, "bucket_width_ms")?;
    BucketWidth::from_millis(w).map_err(|_| DecodeError::OutOfRange {
        field: "bucket_width_ms",
        value: w,
        reason: "whole seconds between 1 s and 1 day",
    })
}

impl Observer {
    fn from_wire(w: &mut Wire) -> Result<Self, DecodeError> {
        Ok(Self {
            tier: Tier::from(name(w.tier.take(), "tier", MAX_NAME_LEN)?),
            datacenter: name(w.datacenter.take(), "datacenter", MAX_NAME_LEN)?,
            cluster: name(w.cluster.take(), "cluster", MAX_NAME_LEN)?,
            host: name(w.host.take(), "host", MAX_NAME_LEN)?,
            instance: name(w.instance.take(), "instance", MAX_NAME_LEN)?,
        })
    }

    fn to_wire(&self, w: &mut Wire) {
        w.tier = Some(self.tier.as_str().to_owned());
        w.datacenter = Some(self.datacenter.clone());
        w.cluster = Some(self.cluster.clone());
        w.host = Some(self.host.clone());
        w.instance = Some(self.instance.clone());
    }
}

fn forbid(present: bool, field: &str) -> Result<(), DecodeError> {
    if present {
        Err(DecodeError::UnknownField(field.to_owned()))
    } else {
        Ok(())
    }
}

impl Counts {
    fn from_wire(mut w: Wire) -> Result<Self, DecodeError> {
        forbid(w.position.is_some(), "position")?;
        forbid(w.high_watermark.is_some(), "high_watermark")?;
        forbid(w.watermark_ms.is_some(), "watermark_ms")?;
        forbid(w.closing.is_some(), "final")?;
        forbid(w.at_least_once.is_some(), "at_least_once")?;
        let id = name(w.id.take(), "id", MAX_NAME_LEN)?;
        let topic = name(w.topic.take(), "topic", MAX_TOPIC_LEN)?;
        let physical_topic = name(w.physical_topic.take(), "physical_topic", MAX_TOPIC_LEN)?;
        let partition = partition(w.partition)?;
        let bucket_width = width(w.bucket_width_ms)?;
        let bucket_start_ms = timestamp(
            require(w.bucket_start_ms, "bucket_start_ms")?,
            "bucket_start_ms",
        )?;
        if !bucket_width.is_aligned(bucket_start_ms) {
            return Err(DecodeError::Inconsistent {
                field: "bucket_start_ms",
                reason: format!("{bucket_start_ms} is not aligned to a {bucket_width} bucket"),
            });
        }
        let observer = Observer::from_wire(&mut w)?;
        let count = total(w.count, "count")?;
        let bytes = total(w.bytes, "bytes")?;
        let no_timestamp = total(w.no_timestamp, "no_timestamp")?;
        let malformed = total(w.malformed, "malformed")?;
        for (field, n) in [("no_timestamp", no_timestamp), ("malformed", malformed)] {
            if n > count {
                return Err(DecodeError::Inconsistent {
                    field,
                    reason: format!("{n} exceeds count {count}"),
                });
            }
        }
        let min_event_ms = w
            .min_event_ms
            .map(|t| timestamp(t, "min_event_ms"))
            .transpose()?;
        let max_event_ms = w
            .max_event_ms
            .map(|t| timestamp(t, "max_event_ms"))
            .transpose()?;
        if let (Some(lo), Some(hi)) = (min_event_ms, max_event_ms) {
            if lo > hi {
                return Err(DecodeError::Inconsistent {
                    field: "min_event_ms",
                    reason: format!("{lo} is after max_event_ms {hi}"),
                });
            }
        }
        if min_event_ms.is_some() != max_event_ms.is_some() {
            return Err(DecodeError::Inconsistent {
                field: "max_event_ms",
                reason: "min_event_ms and max_event_ms must be given together".to_owned(),
            });
        }
        let latency = Latency::decode(&require(w.latency.take(), "latency")?)?;
        if latency.len() > count {
            return Err(DecodeError::Inconsistent {
                field: "latency",
                reason: format!(
                    "histogram holds {} values but count is {count}",
                    latency.len()
                ),
            });
        }
        let emitted_at_ms = timestamp(require(w.emitted_at_ms, "emitted_at_ms")?, "emitted_at_ms")?;
        Ok(Self {
            id,
            topic,
            physical_topic,
            partition,
            bucket_start_ms,
            bucket_width,
            observer,
            count,
            bytes,
            no_timestamp,
            malformed,
            min_event_ms,
            max_event_ms,
            latency,
            emitted_at_ms,
        })
    }

    fn to_wire(&self) -> Wire {
        let mut w = Wire {
            version: Some(i64::from(VERSION)),
            kind: Some("counts".to_owned()),
            id: Some(self.id.clone()),
            topic: Some(self.topic.clone()),
            physical_topic: Some(self.physical_topic.clone()),
            partition: self.partition.map(i64::from),
            bucket_start_ms: Some(self.bucket_start_ms),
            bucket_width_ms: Some(self.bucket_width.as_millis()),
            count: Some(self.count as i64),
            bytes: Some(self.bytes as i64),
            no_timestamp: Some(self.no_timestamp as i64),
            malformed: Some(self.malformed as i64),
            min_event_ms: self.min_event_ms,
            max_event_ms: self.max_event_ms,
            latency: Some(self.latency.encode()),
            emitted_at_ms: Some(self.emitted_at_ms),
            ..Wire::default()
        };
        self.observer.to_wire(&mut w);
        w
    }

    /// End (exclusive) of this record's bucket.
    pub fn bucket_end_ms(&self) -> i64 {
        self.bucket_width.end_of(self.bucket_start_ms)
    }
}

impl Progress {
    fn from_wire(mut w: Wire) -> Result<Self, DecodeError> {
        for (present, field) in [
            (w.bucket_start_ms.is_some(), "bucket_start_ms"),
            (w.count.is_some(), "count"),
            (w.bytes.is_some(), "bytes"),
            (w.no_timestamp.is_some(), "no_timestamp"),
            (w.malformed.is_some(), "malformed"),
            (w.min_event_ms.is_some(), "min_event_ms"),
            (w.max_event_ms.is_some(), "max_event_ms"),
            (w.latency.is_some(), "latency"),
        ] {
            forbid(present, field)?;
        }
        let id = name(w.id.take(), "id", MAX_NAME_LEN)?;
        let topic = name(w.topic.take(), "topic", MAX_TOPIC_LEN)?;
        let physical_topic = name(w.physical_topic.take(), "physical_topic", MAX_TOPIC_LEN)?;
        let partition = partition(w.partition)?;
        let observer = Observer::from_wire(&mut w)?;
        let position = offset(w.position, "position")?;
        let high_watermark = offset(w.high_watermark, "high_watermark")?;
        if let (Some(p), Some(h)) = (position, high_watermark) {
            if p > h {
                return Err(DecodeError::Inconsistent {
                    field: "position",
                    reason: format!("{p} is beyond high_watermark {h}"),
                });
            }
        }
        let watermark_ms = timestamp(require(w.watermark_ms, "watermark_ms")?, "watermark_ms")?;
        let bucket_width = width(w.bucket_width_ms)?;
        let emitted_at_ms = timestamp(require(w.emitted_at_ms, "emitted_at_ms")?, "emitted_at_ms")?;
        Ok(Self {
            id,
            topic,
            physical_topic,
            partition,
            observer,
            position,
            high_watermark,
            watermark_ms,
            bucket_width,
            emitted_at_ms,
            closing: w.closing.unwrap_or(false),
            at_least_once: w.at_least_once.unwrap_or(false),
        })
    }

    fn to_wire(&self) -> Wire {
        let mut w = Wire {
            version: Some(i64::from(VERSION)),
            kind: Some("progress".to_owned()),
            id: Some(self.id.clone()),
            topic: Some(self.topic.clone()),
            physical_topic: Some(self.physical_topic.clone()),
            partition: self.partition.map(i64::from),
            bucket_width_ms: Some(self.bucket_width.as_millis()),
            position: self.position,
            high_watermark: self.high_watermark,
            watermark_ms: Some(self.watermark_ms),
            closing: self.closing.then_some(true),
            at_least_once: self.at_least_once.then_some(true),
            emitted_at_ms: Some(self.emitted_at_ms),
            ..Wire::default()
        };
        self.observer.to_wire(&mut w);
        w
    }
}

/// Just enough of a record to read its version before anything else.
#[derive(Deserialize)]
struct VersionOnly {
    version: Option<serde_json::Value>,
}

impl AuditRecord {
    /// The record's unique id.
    pub fn id(&self) -> &str {
        match self {
            AuditRecord::Counts(c) => &c.id,
            AuditRecord::Progress(p) => &p.id,
        }
    }

    /// The record's logical topic: also the key of the Kafka message carrying it, so that
    /// every record of one topic is on one partition of an audit topic, in the order sent.
    pub fn topic(&self) -> &str {
        match self {
            AuditRecord::Counts(c) => &c.topic,
            AuditRecord::Progress(p) => &p.topic,
        }
    }

    /// Who observed the record's messages.
    pub fn observer(&self) -> &Observer {
        match self {
            AuditRecord::Counts(c) => &c.observer,
            AuditRecord::Progress(p) => &p.observer,
        }
    }

    /// Serializes to the JSON wire form.
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            AuditRecord::Counts(c) => c.to_wire(),
            AuditRecord::Progress(p) => p.to_wire(),
        };
        #[allow(clippy::expect_used)]
        serde_json::to_vec(&wire).expect("the wire struct always serializes")
    }

    /// Parses and validates the JSON wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let head: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        match head.version {
            None | Some(serde_json::Value::Null) => return Err(DecodeError::NoVersion),
            Some(v) => match v.as_i64() {
                Some(1) => {}
                Some(n) => return Err(DecodeError::UnsupportedVersion(n)),
                None => {
                    return Err(DecodeError::Json(format!(
                        "field `version` must be an integer, found {v}"
                    )));
                }
            },
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| {
            let msg = e.to_string();
            match msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                Some(field) => DecodeError::UnknownField(field.to_owned()),
                None => DecodeError::Json(msg),
            }
        })?;
        match wire.kind.as_deref() {
            Some("counts") => Counts::from_wire(wire).map(AuditRecord::Counts),
            Some("progress") => Progress::from_wire(wire).map(AuditRecord::Progress),
            Some(other) => Err(DecodeError::UnknownKind(other.to_owned())),
            None => Err(DecodeError::MissingField("kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn observer() -> Observer {
        Observer {
            tier: Tier::Producer,
            datacenter: "dc1".into(),
            cluster: "regional".into(),
            host: "web-1".into(),
            instance: "4242".into(),
        }
    }

    fn counts() -> Counts {
        let mut latency = Latency::new();
        latency.record(12);
        latency.record(340);
        Counts {
            id: "0193a0b4-2f1c-7c3e-9a51-3b8f0f6d2a10".into(),
            topic: "orders".into(),
            physical_topic: "orders".into(),
            partition: Some(3),
            bucket_start_ms: 1_764_067_200_000,
            bucket_width: BucketWidth::default(),
            observer: observer(),
            count: 2,
            bytes: 512,
            no_timestamp: 0,
            malformed: 0,
            min_event_ms: Some(1_764_067_200_100),
            max_event_ms: Some(1_764_067_259_900),
            latency,
            emitted_at_ms: 1_764_067_270_000,
        }
    }

    fn progress() -> Progress {
        Progress {
            id: "p-1".into(),
            topic: "orders".into(),
            physical_topic: "regional.orders".into(),
            partition: Some(0),
            observer: Observer {
                tier: Tier::Aggregate,
                ..observer()
            },
            position: Some(10),
            high_watermark: Some(12),
            watermark_ms: 1_764_067_200_000,
            bucket_width: BucketWidth::default(),
            emitted_at_ms: 1_764_067_270_000,
            closing: false,
            at_least_once: false,
        }
    }

    fn json_of(r: &AuditRecord) -> Value {
        serde_json::from_slice(&r.encode()).expect("valid json")
    }

    fn decode_value(v: &Value) -> Result<AuditRecord, DecodeError> {
        AuditRecord::decode(&serde_json::to_vec(v).expect("serializes"))
    }

    fn with(field: &str, value: Value) -> Result<AuditRecord, DecodeError> {
        let mut v = json_of(&AuditRecord::Counts(counts()));
        v[field] = value;
        decode_value(&v)
    }

    fn without(field: &str) -> Result<AuditRecord, DecodeError> {
        let mut v = json_of(&AuditRecord::Counts(counts()));
        v.as_object_mut().expect("object").remove(field);
        decode_value(&v)
    }

    #[test]
    fn round_trips_both_kinds() {
        for r in [
            AuditRecord::Counts(counts()),
            AuditRecord::Progress(progress()),
        ] {
            assert_eq!(AuditRecord::decode(&r.encode()).expect("decodes"), r);
        }
    }

    #[test]
    fn custom_tier_round_trips() {
        let mut c = counts();
        c.observer.tier = Tier::from("billing-consumer");
        let r = AuditRecord::Counts(c);
        let back = AuditRecord::decode(&r.encode()).expect("decodes");
        assert_eq!(back.observer().tier, Tier::Other("billing-consumer".into()));
    }

    #[test]
    fn wire_form_is_stable() {
        let v = json_of(&AuditRecord::Counts(counts()));
        assert_eq!(v["version"], json!(1));
        assert_eq!(v["kind"], json!("counts"));
        assert_eq!(v["bucket_width_ms"], json!(60_000));
        assert_eq!(v["tier"], json!("producer"));
        assert!(v.get("position").is_none());
    }

    #[test]
    fn rejects_unknown_version() {
        assert_eq!(
            with("version", json!(2)),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(without("version"), Err(DecodeError::NoVersion));
        assert!(matches!(
            with("version", json!("1")),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn names_missing_fields() {
        for field in [
            "kind",
            "id",
            "topic",
            "physical_topic",
            "bucket_start_ms",
            "bucket_width_ms",
            "tier",
            "datacenter",
            "cluster",
            "host",
            "instance",
            "count",
            "bytes",
            "no_timestamp",
            "malformed",
            "latency",
            "emitted_at_ms",
        ] {
            assert_eq!(
                without(field),
                Err(DecodeError::MissingField(field)),
                "{field}"
            );
        }
        // Partition is optional.
        assert!(without("partition").is_ok());
    }

    #[test]
    fn rejects_negative_and_absurd_values() {
        assert_eq!(
            with("count", json!(-1)),
            Err(DecodeError::Negative {
                field: "count",
                value: -1
            })
        );
        assert_eq!(
            with("partition", json!(-3)),
            Err(DecodeError::Negative {
                field: "partition",
                value: -3
            })
        );
        assert!(matches!(
            with("bytes", json!(1i64 << 60)),
            Err(DecodeError::OutOfRange { field: "bytes", .. })
        ));
        assert!(matches!(
            with("bucket_width_ms", json!(1_500)),
            Err(DecodeError::OutOfRange {
                field: "bucket_width_ms",
                ..
            })
        ));
        assert!(matches!(
            with("no_timestamp", json!(3)),
            Err(DecodeError::Inconsistent {
                field: "no_timestamp",
                ..
            })
        ));
        assert!(matches!(
            with("count", json!(1)),
            Err(DecodeError::Inconsistent {
                field: "latency",
                ..
            })
        ));
    }

    #[test]
    fn rejects_implausible_timestamps() {
        assert!(matches!(
            with("bucket_start_ms", json!(0)),
            Err(DecodeError::Timestamp {
                field: "bucket_start_ms",
                ..
            })
        ));
        assert!(matches!(
            with("emitted_at_ms", json!(9_999_999_999_999i64)),
            Err(DecodeError::Timestamp {
                field: "emitted_at_ms",
                ..
            })
        ));
        assert!(matches!(
            with("bucket_start_ms", json!(1_764_067_200_001i64)),
            Err(DecodeError::Inconsistent {
                field: "bucket_start_ms",
                ..
            })
        ));
        assert!(matches!(
            with("min_event_ms", json!(1_764_067_299_999i64)),
            Err(DecodeError::Inconsistent {
                field: "min_event_ms",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_strings() {
        assert_eq!(
            with("topic", json!("")),
            Err(DecodeError::StringLength {
                field: "topic",
                len: 0,
                max: MAX_TOPIC_LEN
            })
        );
        assert!(matches!(
            with("host", json!("h".repeat(300))),
            Err(DecodeError::StringLength {
                field: "host",
                len: 300,
                ..
            })
        ));
        // Limits are bytes: 200 two-byte characters are 400 bytes.
        assert!(matches!(
            with("host", json!("ж".repeat(200))),
            Err(DecodeError::StringLength {
                field: "host",
                len: 400,
                ..
            })
        ));
        assert!(with("host", json!("ж".repeat(127))).is_ok());
        assert_eq!(
            with("host", json!("web\u{0}1")),
            Err(DecodeError::NulCharacter { field: "host" })
        );
    }

    #[test]
    fn rejects_unknown_fields_and_kinds() {
        assert_eq!(
            with("colour", json!("red")),
            Err(DecodeError::UnknownField("colour".into()))
        );
        assert_eq!(
            with("kind", json!("gauge")),
            Err(DecodeError::UnknownKind("gauge".into()))
        );
        assert_eq!(
            with("watermark_ms", json!(1_764_067_200_000i64)),
            Err(DecodeError::UnknownField("watermark_ms".into()))
        );
        assert!(matches!(
            AuditRecord::decode(b"not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            AuditRecord::decode(b"[1,2]"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            with("latency", json!("@@@")),
            Err(DecodeError::Histogram(HistogramError::Base64(_)))
        ));
    }

    #[test]
    fn final_progress_round_trips_and_counts_reject_it() {
        let closing = Progress {
            closing: true,
            ..progress()
        };
        let v = json_of(&AuditRecord::Progress(closing.clone()));
        assert_eq!(v["final"], json!(true));
        assert_eq!(decode_value(&v), Ok(AuditRecord::Progress(closing)));
        assert!(
            json_of(&AuditRecord::Progress(progress()))
                .get("final")
                .is_none()
        );
        assert_eq!(
            with("final", json!(true)),
            Err(DecodeError::UnknownField("final".into()))
        );
    }

    #[test]
    fn at_least_once_progress_round_trips_and_counts_reject_it() {
        let redelivers = Progress {
            at_least_once: true,
            ..progress()
        };
        let v = json_of(&AuditRecord::Progress(redelivers.clone()));
        assert_eq!(v["at_least_once"], json!(true));
        assert_eq!(decode_value(&v), Ok(AuditRecord::Progress(redelivers)));
        assert!(
            json_of(&AuditRecord::Progress(progress()))
                .get("at_least_once")
                .is_none()
        );
        assert_eq!(
            with("at_least_once", json!(true)),
            Err(DecodeError::UnknownField("at_least_once".into()))
        );
    }

    #[test]
    fn progress_checks_offsets() {
        let mut v = json_of(&AuditRecord::Progress(progress()));
        v["position"] = json!(13);
        assert!(matches!(
            decode_value(&v),
            Err(DecodeError::Inconsistent {
                field: "position",
                ..
            })
        ));
        v["position"] = json!(-1);
        assert!(matches!(
            decode_value(&v),
            Err(DecodeError::Negative {
                field: "position",
                ..
            })
        ));
        v.as_object_mut().expect("object").remove("watermark_ms");
        v["position"] = json!(1);
        assert_eq!(
            decode_value(&v),
            Err(DecodeError::MissingField("watermark_ms"))
        );
    }

    #[test]
    fn rejects_oversized_records() {
        let big = vec![b' '; MAX_RECORD_LEN + 1];
        assert_eq!(
            AuditRecord::decode(&big),
            Err(DecodeError::TooLarge(MAX_RECORD_LEN + 1))
        );
    }

    #[test]
    fn readme_examples_decode() {
        let readme = include_str!("../README.md");
        let blocks: Vec<&str> = readme
            .split("```json")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .collect();
        assert_eq!(blocks.len(), 2, "the README shows one record of each kind");
        for block in blocks {
            AuditRecord::decode(block.as_bytes()).expect("README example decodes");
        }
    }
}
