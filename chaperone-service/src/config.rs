//! Configuration: one TOML file, overridden by `CHAPERONE_*` environment variables and
//! command-line flags (applied by `main.rs`), validated once at start-up.
//!
//! Every field has a default that works against a local cluster except the identity of the
//! cluster being audited (`cluster`, `datacenter`) and `bootstrap_servers`, which are
//! required. [`Config::validate`] names the offending key in its error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use chaperone_audit::mapping::{Mapping, MappingError};
pub use chaperone_audit::mapping::{MappingConfig, MappingKind};
use chaperone_audit::{BucketWidth, Tier};
use chaperone_daemon_support::secrets;
use regex::Regex;
use serde::Deserialize;

/// Why a configuration was rejected. Every variant names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path of the file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The TOML does not parse or holds unknown keys.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A key holds a value that is not allowed.
    #[error("invalid config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key name.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `${file:…}` or `${env:…}` reference (a secret) cannot be resolved.
    #[error("invalid config key `{key}`: {reason}")]
    SecretRef {
        /// Dotted key name, for example `kafka."sasl.password"`.
        key: String,
        /// What is wrong, naming the file.
        reason: String,
    },
}

/// Smallest `open_cells_max_bytes`: room for a few dozen busy cells.
pub const MIN_OPEN_CELLS_MAX_BYTES: u64 = 1024 * 1024;

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Where the event time of a message comes from, tried in the configured order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The Kafka record timestamp, when the topic uses CreateTime.
    CreateTime,
    /// The JSON field named by `event_time.json_field` (seconds or milliseconds detected).
    JsonField,
}

/// Which topics to audit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// A topic is audited when it matches any of these (default: every topic).
    pub include: Vec<String>,
    /// ... and none of these. The audit topic, its mirrored copies, internal `__*` topics and
    /// MirrorMaker 2's own topics are excluded whatever this says.
    pub exclude: Vec<String>,
    /// How often cluster metadata is read to pick up new or deleted topics.
    #[serde(with = "chaperone_audit::duration")]
    pub refresh_interval: Duration,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            include: vec![".*".to_owned()],
            exclude: Vec::new(),
            refresh_interval: Duration::from_secs(10),
        }
    }
}

/// How each message gets its event time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventTimeConfig {
    /// Sources tried in order; a message none of them dates is counted as "no timestamp" in
    /// the bucket of its arrival time.
    pub sources: Vec<TimeSource>,
    /// Top-level JSON field holding the event time (epoch seconds or milliseconds, as a
    /// number or numeric string, or an RFC 3339 string). Required when `json_field` is a
    /// source. A payload that is not JSON, or whose field is not a time, counts as malformed.
    pub json_field: Option<String>,
    /// Subtracted from the event-time watermark in progress records, to allow for
    /// out-of-order event times within a partition.
    #[serde(with = "chaperone_audit::duration")]
    pub watermark_lateness: Duration,
}

impl Default for EventTimeConfig {
    fn default() -> Self {
        Self {
            sources: vec![TimeSource::CreateTime, TimeSource::JsonField],
            json_field: None,
            watermark_lateness: Duration::ZERO,
        }
    }
}

/// Prometheus exposition knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// At most this many per-partition lag series are exported (label cardinality cap);
    /// the total lag is always exported.
    pub max_lag_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_lag_series: 2_000,
        }
    }
}

/// The service configuration. Its `Debug` output shows secret librdkafka properties as
/// `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The hop this instance reports as: `regional`, `aggregate` or a custom name.
    pub tier: String,
    /// Alias of the Kafka cluster being audited (reported in every record).
    pub cluster: String,
    /// Datacenter of topics that are not mirrored copies (the cluster's own datacenter).
    pub datacenter: String,
    /// Host name reported in records; defaults to the machine's host name.
    pub host: String,
    /// Instance name, unique and stable per member of the consumer group: it is part of the
    /// transactional id, so a restarted instance fences its predecessor's open transaction.
    pub instance: String,
    /// Kafka bootstrap servers of the audited cluster.
    pub bootstrap_servers: String,
    /// Consumer group shared by every instance auditing this cluster.
    pub group_id: String,
    /// Transactional id; defaults to `chaperone-<group_id>-<host>-<instance>`.
    pub transactional_id: Option<String>,
    /// Topic the audit records are written to, on the audited cluster.
    pub audit_topic: String,
    /// Partitions of the audit topic when this service creates it.
    pub audit_topic_partitions: i32,
    /// Replication factor of the audit topic when this service creates it (-1: broker default).
    pub audit_topic_replication: i32,
    /// Event-time bucket width (whole seconds, 1 s to 1 day).
    #[serde(with = "chaperone_audit::duration")]
    pub bucket_width: Duration,
    /// How often counts and offsets are committed together. Shorter means fresher counts and
    /// less recounting after a crash; longer means fewer, larger transactions.
    #[serde(with = "chaperone_audit::duration")]
    pub flush_interval: Duration,
    /// Estimated memory of the open counts (cells of topic, partition and event-time bucket
    /// not yet committed) at which they are committed before `flush_interval` is up. Any
    /// producer can write any CreateTime from 2000 to 2200, so the number of cells between two
    /// flushes is the producers' choice: this bounds the service's memory whatever they write.
    /// A cell takes about 1 KiB (with the record it becomes), one with many messages about
    /// 25 KiB (a full latency histogram); the batch being committed takes as much again.
    /// Raise it for tens of thousands of busy partitions, or early commits will outpace the
    /// interval (`chaperone_service_early_flushes_total`). At least 1 MiB.
    pub open_cells_max_bytes: u64,
    /// Kafka `transaction.timeout.ms`: how long the broker keeps a dead instance's open
    /// transaction (and so the group's offsets) locked before aborting it.
    #[serde(with = "chaperone_audit::duration")]
    pub transaction_timeout: Duration,
    /// Timeout of each transactional and metadata call.
    #[serde(with = "chaperone_audit::duration")]
    pub kafka_timeout: Duration,
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`).
    pub http_addr: SocketAddr,
    /// Which topics to audit.
    pub topics: TopicsConfig,
    /// How messages are dated.
    pub event_time: EventTimeConfig,
    /// Topic mapping across mirrors.
    pub mapping: MappingConfig,
    /// Metrics knobs.
    pub metrics: MetricsConfig,
    /// librdkafka properties for both the consumer and the producer (SASL, SSL, tuning).
    /// Safety-critical properties are forced after these. In this table and the two below, a
    /// value `"${file:/run/secrets/kafka-password}"` or `"${env:KAFKA_PASSWORD}"` is replaced by
    /// that file's content (trailing newline dropped) or variable at start-up
    /// ([`Config::resolve_secret_refs`]), so secrets stay out of the file.
    pub kafka: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    pub kafka_consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub kafka_producer: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chaperone_audit::config::redacted_properties;
        f.debug_struct("Config")
            .field("tier", &self.tier)
            .field("cluster", &self.cluster)
            .field("datacenter", &self.datacenter)
            .field("host", &self.host)
            .field("instance", &self.instance)
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("transactional_id", &self.transactional_id)
            .field("audit_topic", &self.audit_topic)
            .field("audit_topic_partitions", &self.audit_topic_partitions)
            .field("audit_topic_replication", &self.audit_topic_replication)
            .field("bucket_width", &self.bucket_width)
            .field("flush_interval", &self.flush_interval)
            .field("open_cells_max_bytes", &self.open_cells_max_bytes)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("kafka_timeout", &self.kafka_timeout)
            .field("http_addr", &self.http_addr)
            .field("topics", &self.topics)
            .field("event_time", &self.event_time)
            .field("mapping", &self.mapping)
            .field("metrics", &self.metrics)
            .field("kafka", &redacted_properties(&self.kafka))
            .field("kafka_consumer", &redacted_properties(&self.kafka_consumer))
            .field("kafka_producer", &redacted_properties(&self.kafka_producer))
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tier: "regional".to_owned(),
            cluster: String::new(),
            datacenter: String::new(),
            host: default_host(),
            instance: "0".to_owned(),
            bootstrap_servers: String::new(),
            group_id: "chaperone-service".to_owned(),
            transactional_id: None,
            audit_topic: "chaperone-audit".to_owned(),
            audit_topic_partitions: 6,
            audit_topic_replication: -1,
            bucket_width: Duration::from_secs(60),
            flush_interval: Duration::from_secs(5),
            open_cells_max_bytes: 128 * 1024 * 1024,
            transaction_timeout: Duration::from_secs(60),
            kafka_timeout: Duration::from_secs(30),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 9464)),
            topics: TopicsConfig::default(),
            event_time: EventTimeConfig::default(),
            mapping: MappingConfig::default(),
            metrics: MetricsConfig::default(),
            kafka: BTreeMap::new(),
            kafka_consumer: BTreeMap::new(),
            kafka_producer: BTreeMap::new(),
        }
    }
}

/// The machine's host name, from `HOSTNAME` or the kernel, else `localhost`.
fn default_host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Config {
    /// Parses a TOML document (no validation).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads and parses a TOML file (no validation).
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Applies `CHAPERONE_KAFKA__<PROPERTY>` variables (for example
    /// `CHAPERONE_KAFKA__SASL_PASSWORD` sets `sasl.password`) to the shared librdkafka
    /// properties. This is how secrets reach the service without a file.
    pub fn apply_kafka_env<I: IntoIterator<Item = (String, String)>>(&mut self, vars: I) {
        chaperone_daemon_support::kafka::apply_env(&mut self.kafka, "CHAPERONE_KAFKA__", vars);
    }

    /// Replaces every `${file:PATH}` and `${env:VAR}` value of the librdkafka tables by the
    /// file's content (trailing newline dropped) or the variable, read through `env`. Fails
    /// naming the property and the file or variable.
    pub fn resolve_secret_refs(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for (table, props) in [
            ("kafka", &mut self.kafka),
            ("kafka_consumer", &mut self.kafka_consumer),
            ("kafka_producer", &mut self.kafka_producer),
        ] {
            secrets::resolve_all(props, &env).map_err(|(prop, reason)| ConfigError::SecretRef {
                key: format!("{table}.\"{prop}\""),
                reason,
            })?;
        }
        Ok(())
    }

    /// The tier as the record contract names it.
    pub fn tier(&self) -> Tier {
        Tier::from(self.tier.as_str())
    }

    /// The bucket width (valid after [`Config::validate`]).
    pub fn width(&self) -> BucketWidth {
        BucketWidth::from_duration(self.bucket_width).unwrap_or_default()
    }

    /// The mapping rule built from `[mapping]` (checked by validation).
    pub fn mapping_rule(&self) -> Result<Mapping, MappingError> {
        self.mapping.rule(self.mapping_kind(), &self.datacenter)
    }

    /// The mapping rule in force.
    pub fn mapping_kind(&self) -> MappingKind {
        self.mapping
            .kind
            .unwrap_or(if self.tier() == Tier::Aggregate {
                MappingKind::Mirror
            } else {
                MappingKind::Identity
            })
    }

    /// The transactional id in force.
    pub fn transactional_id(&self) -> String {
        self.transactional_id.clone().unwrap_or_else(|| {
            format!(
                "chaperone-{}-{}-{}",
                self.group_id, self.host, self.instance
            )
        })
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let names: [(&'static str, &str); 7] = [
            ("tier", &self.tier),
            ("cluster", &self.cluster),
            ("datacenter", &self.datacenter),
            ("host", &self.host),
            ("instance", &self.instance),
            ("group_id", &self.group_id),
            ("bootstrap_servers", &self.bootstrap_servers),
        ];
        for (key, value) in names {
            if value.trim().is_empty() {
                return Err(invalid(key, "must be set and non-empty"));
            }
            if value.len() > chaperone_audit::record::MAX_NAME_LEN {
                return Err(invalid(key, "must be at most 255 bytes (UTF-8)"));
            }
        }
        if self.tier() == Tier::Producer {
            return Err(invalid(
                "tier",
                "`producer` is the producers' tier; use `regional`, `aggregate` or a custom name",
            ));
        }
        if let Some(id) = &self.transactional_id
            && id.trim().is_empty()
        {
            return Err(invalid("transactional_id", "must not be empty"));
        }
        if self.audit_topic.is_empty()
            || self.audit_topic.len() > chaperone_audit::record::MAX_TOPIC_LEN
            || !self
                .audit_topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "audit_topic",
                "must be a valid Kafka topic name (1..249 of [A-Za-z0-9._-])",
            ));
        }
        if self.audit_topic_partitions < 1 {
            return Err(invalid("audit_topic_partitions", "must be at least 1"));
        }
        if self.audit_topic_replication == 0 || self.audit_topic_replication < -1 {
            return Err(invalid(
                "audit_topic_replication",
                "must be -1 (broker default) or at least 1",
            ));
        }
        BucketWidth::from_duration(self.bucket_width)
            .map_err(|e| invalid("bucket_width", e.to_string()))?;
        if self.flush_interval < Duration::from_millis(100) {
            return Err(invalid("flush_interval", "must be at least 100ms"));
        }
        if self.open_cells_max_bytes < MIN_OPEN_CELLS_MAX_BYTES {
            return Err(invalid(
                "open_cells_max_bytes",
                format!("must be at least {MIN_OPEN_CELLS_MAX_BYTES} (1 MiB)"),
            ));
        }
        if self.transaction_timeout < Duration::from_secs(1) {
            return Err(invalid("transaction_timeout", "must be at least 1s"));
        }
        if self.transaction_timeout <= self.flush_interval {
            return Err(invalid(
                "transaction_timeout",
                "must be longer than flush_interval",
            ));
        }
        if self.kafka_timeout < Duration::from_secs(1) {
            return Err(invalid("kafka_timeout", "must be at least 1s"));
        }
        if self.topics.refresh_interval < Duration::from_millis(100) {
            return Err(invalid("topics.refresh_interval", "must be at least 100ms"));
        }
        for p in &self.topics.include {
            Regex::new(p).map_err(|e| invalid("topics.include", e.to_string()))?;
        }
        for p in &self.topics.exclude {
            Regex::new(p).map_err(|e| invalid("topics.exclude", e.to_string()))?;
        }
        if self.event_time.sources.is_empty() {
            return Err(invalid(
                "event_time.sources",
                "must list at least one of `create_time`, `json_field`",
            ));
        }
        match &self.event_time.json_field {
            Some(f) if f.is_empty() => {
                return Err(invalid("event_time.json_field", "must not be empty"));
            }
            None if self.event_time.sources == [TimeSource::JsonField] => {
                return Err(invalid(
                    "event_time.json_field",
                    "must be set when `json_field` is the only event-time source",
                ));
            }
            _ => {}
        }
        self.mapping_rule().map_err(|e| {
            let key = if e.key == "separator" {
                "mapping.separator"
            } else {
                "mapping.pattern"
            };
            invalid(key, e.reason)
        })?;
        for (key, props) in [
            ("kafka", &self.kafka),
            ("kafka_consumer", &self.kafka_consumer),
            ("kafka_producer", &self.kafka_producer),
        ] {
            if let Some(prop) = secrets::first_unresolved(props) {
                return Err(ConfigError::SecretRef {
                    key: format!("{key}.\"{prop}\""),
                    reason: "holds an unresolved ${file:…}/${env:…} reference \
                             (call Config::resolve_secret_refs before validating)"
                        .into(),
                });
            }
            if let Some(k) = props.keys().find(|k| k.trim().is_empty()) {
                return Err(invalid(key, format!("empty property name {k:?}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::from_toml(
            r#"
            cluster = "regional"
            datacenter = "dc1"
            bootstrap_servers = "127.0.0.1:19092"
            "#,
        )
        .expect("parses")
    }

    #[test]
    fn defaults_validate() {
        let c = base();
        c.validate().expect("valid");
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.open_cells_max_bytes, 128 * 1024 * 1024);
        assert_eq!(c.width().as_millis(), 60_000);
        assert_eq!(c.mapping_kind(), MappingKind::Identity);
        assert_eq!(c.audit_topic, "chaperone-audit");
    }

    #[test]
    fn aggregate_defaults_to_mirror_mapping() {
        let mut c = base();
        c.tier = "aggregate".into();
        assert_eq!(c.mapping_kind(), MappingKind::Mirror);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("clustr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("clustr"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = base();
        c.flush_interval = Duration::from_millis(10);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("flush_interval")
        );
        let mut c = base();
        c.open_cells_max_bytes = 1024;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`open_cells_max_bytes`")
        );
        let mut c = base();
        c.datacenter = String::new();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`datacenter`")
        );
        let mut c = base();
        c.topics.include = vec!["(".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("topics.include")
        );
        let mut c = base();
        c.bucket_width = Duration::from_millis(1_500);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("bucket_width")
        );
        let mut c = base();
        c.mapping.kind = Some(MappingKind::Regex);
        c.mapping.pattern = Some("^(?P<source>x)$".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("mapping.pattern")
        );
    }

    #[test]
    fn durations_need_a_unit() {
        let c = Config::from_toml(
            "cluster = \"a\"\ndatacenter = \"b\"\nbootstrap_servers = \"x\"\nflush_interval = \"750ms\"\n[topics]\nrefresh_interval = \"2s\"\n",
        )
        .expect("parses");
        assert_eq!(c.flush_interval, Duration::from_millis(750));
        assert_eq!(c.topics.refresh_interval, Duration::from_secs(2));
        let e = Config::from_toml("bucket_width = 60000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket_width = 60000"), "{e}");
        assert!(
            e.contains("needs a unit, such as \"60s\" or \"60000ms\""),
            "{e}"
        );
    }

    #[test]
    fn kafka_secrets_come_from_files_or_env() {
        let dir = std::env::temp_dir().join(format!("chaperone-svc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "pa55word\n").unwrap();
        let text = format!(
            "cluster = \"a\"\ndatacenter = \"b\"\nbootstrap_servers = \"x\"\n\
             [kafka]\n\"sasl.password\" = \"${{file:{}}}\"\n\
             [kafka_producer]\n\"ssl.key.password\" = \"${{env:KEY_PW}}\"\n",
            file.display()
        );
        let env = |k: &str| (k == "KEY_PW").then(|| "k3ypw".to_owned());
        let mut c = Config::from_toml(&text).expect("parses");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`kafka.\"sasl.password\"`"), "{e}");
        c.resolve_secret_refs(env).expect("resolves");
        c.validate().expect("valid");
        assert_eq!(c.kafka["sasl.password"], "pa55word");
        assert_eq!(c.kafka_producer["ssl.key.password"], "k3ypw");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("k3ypw"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");

        let mut c = Config::from_toml(&text.replace("/password}", "/nope}")).unwrap();
        let e = c.resolve_secret_refs(env).unwrap_err().to_string();
        assert!(e.contains("`kafka.\"sasl.password\"`"), "{e}");
        assert!(e.contains("nope"), "{e}");
        let mut c = Config::from_toml(&text).unwrap();
        let e = c.resolve_secret_refs(|_| None).unwrap_err().to_string();
        assert!(e.contains("`kafka_producer.\"ssl.key.password\"`"), "{e}");
        assert!(e.contains("KEY_PW"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn kafka_env_overrides() {
        let mut c = base();
        c.apply_kafka_env([
            (
                "CHAPERONE_KAFKA__SASL_PASSWORD".to_owned(),
                "s3cret".to_owned(),
            ),
            (
                "CHAPERONE_REGIONAL_BOOTSTRAP".to_owned(),
                "ignored".to_owned(),
            ),
        ]);
        assert_eq!(
            c.kafka.get("sasl.password").map(String::as_str),
            Some("s3cret")
        );
        assert_eq!(c.kafka.len(), 1);
    }
}
