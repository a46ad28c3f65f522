//! Configuration of in-producer auditing: where audit records go, how often, who we are.
//!
//! [`AuditConfig`] is a serde struct (TOML, JSON, ...) with `deny_unknown_fields` and defaults
//! that work on a developer machine; [`AuditConfig::validate`] fails with a [`ConfigError`]
//! naming the offending key. Durations are written with a unit, such as `"10s"`, `"250ms"`,
//! `"5m"` or `"1h"`; a bare number is refused ([`crate::duration`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bucket::BucketWidth;
use crate::record::{MAX_NAME_LEN, MAX_TOPIC_LEN, Observer, Tier};

/// Default audit topic.
pub const DEFAULT_TOPIC: &str = "chaperone-audit";

/// librdkafka properties the audit producer always sets itself, after user overrides.
pub const FORCED_AUDIT_PROPERTIES: [(&str, &str); 2] =
    [("acks", "all"), ("enable.idempotence", "true")];

/// What a log line shows instead of a secret property's value.
pub const REDACTED: &str = "<redacted>";

/// Whether a librdkafka property holds a secret, so its value is never logged or printed:
/// passwords (`sasl.password`, `ssl.key.password`, `ssl.keystore.password`...), client
/// secrets, JAAS and OAUTHBEARER configurations, and private keys given inline
/// (`ssl.key.pem`). Deliberately broad: a property that merely looks secret is hidden too.
/// The one rule for audit-lib, chaperone-service and the collector.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// librdkafka properties as they may be logged: sorted, every secret value replaced by
/// [`REDACTED`] (see [`is_secret_property`]).
pub fn redacted_properties<'a, K, V>(
    properties: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> BTreeMap<&'a str, &'a str>
where
    K: AsRef<str> + ?Sized + 'a,
    V: AsRef<str> + ?Sized + 'a,
{
    properties
        .into_iter()
        .map(|(k, v)| {
            let k = k.as_ref();
            (
                k,
                if is_secret_property(k) {
                    REDACTED
                } else {
                    v.as_ref()
                },
            )
        })
        .collect()
}

/// Configuration of an [`AuditedProducer`](crate::AuditedProducer) or a standalone
/// [`Reporter`](crate::Reporter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Topic the audit records are published to. Collectors and chaperone-service read the
    /// same topic, so change it only together with them.
    pub topic: String,
    /// How often counts are drained and published. Bounds how much counting a `kill -9` can
    /// lose and how stale the collector's view is.
    #[serde(with = "crate::duration")]
    pub flush_interval: Duration,
    /// Event-time bucket width (whole seconds, 1 s to 1 day). Every hop of one pipeline must
    /// use the same width for the counts to be comparable.
    #[serde(with = "crate::duration")]
    pub bucket_width: Duration,
    /// The hop this process reports as (`producer` unless it audits something else, such as
    /// a consumer application).
    pub tier: String,
    /// Datacenter the counted messages originate in. The default, `regional`, is the source
    /// alias MirrorMaker 2 uses in the dev stack, so producer counts line up with mirrored ones.
    pub datacenter: String,
    /// Alias of the Kafka cluster the producer writes to.
    pub cluster: String,
    /// Host name reported in records; defaults to this machine's host name.
    pub host: Option<String>,
    /// Instance reported in records; defaults to the process id.
    pub instance: Option<String>,
    /// Cap on open (topic, partition, bucket) cells between two flushes (each holds a latency
    /// histogram of about 24 KiB). Messages beyond it are not counted but are reported by
    /// the `chaperone_audit_cell_overflow_total` metric and an error log.
    pub max_open_cells: usize,
    /// Directory of the local spool holding audit records until Kafka acknowledges them.
    /// Keep it on local disk and stable across restarts: a restarted process re-sends what a
    /// previous one left there. Processes sharing a directory must share the audit topic:
    /// spooled records carry no destination and go to the adopting process's topic.
    pub spool_dir: PathBuf,
    /// Largest spool size in bytes; records that do not fit are dropped, counted and logged.
    pub spool_max_bytes: u64,
    /// How long the audit producer tries to deliver one record before it is kept in the
    /// spool for a later attempt (librdkafka `message.timeout.ms` of the audit producer).
    #[serde(with = "crate::duration")]
    pub delivery_timeout: Duration,
    /// Longest time `shutdown()` waits for pending deliveries before leaving the rest in the
    /// spool.
    #[serde(with = "crate::duration")]
    pub shutdown_timeout: Duration,
    /// librdkafka properties of the audit producer. When empty, the audited producer's own
    /// client properties are used, so the audit topic lives on the same cluster.
    /// `acks` and `enable.idempotence` are always forced on.
    pub kafka: BTreeMap<String, String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            topic: DEFAULT_TOPIC.to_owned(),
            flush_interval: Duration::from_secs(10),
            bucket_width: Duration::from_secs(60),
            tier: Tier::Producer.as_str().to_owned(),
            datacenter: "regional".to_owned(),
            cluster: "regional".to_owned(),
            host: None,
            instance: None,
            max_open_cells: 10_000,
            spool_dir: std::env::temp_dir().join("chaperone-audit-spool"),
            spool_max_bytes: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            kafka: BTreeMap::new(),
        }
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid audit config key `{key}`: {reason}")]
pub struct ConfigError {
    /// The offending key.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl AuditConfig {
    /// Checks every value, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_topic(&self.topic).map_err(|r| bad("topic", r))?;
        if self.flush_interval < Duration::from_millis(100)
            || self.flush_interval > Duration::from_secs(3_600)
        {
            return Err(bad("flush_interval", "must be between 100ms and 1h"));
        }
        BucketWidth::from_duration(self.bucket_width)
            .map_err(|e| bad("bucket_width", e.to_string()))?;
        for (key, value) in [
            ("tier", Some(&self.tier)),
            ("datacenter", Some(&self.datacenter)),
            ("cluster", Some(&self.cluster)),
            ("host", self.host.as_ref()),
            ("instance", self.instance.as_ref()),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > MAX_NAME_LEN)
            {
                return Err(bad(
                    key,
                    format!("must be 1 to {MAX_NAME_LEN} bytes (UTF-8)"),
                ));
            }
        }
        if self.max_open_cells == 0 {
            return Err(bad("max_open_cells", "must be at least 1"));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(bad("spool_dir", "must not be empty"));
        }
        if self.spool_max_bytes < 4_096 {
            return Err(bad("spool_max_bytes", "must be at least 4096"));
        }
        if self.delivery_timeout < Duration::from_secs(1)
            || self.delivery_timeout > Duration::from_secs(3_600)
        {
            return Err(bad("delivery_timeout", "must be between 1s and 1h"));
        }
        if self.shutdown_timeout > Duration::from_secs(3_600) {
            return Err(bad("shutdown_timeout", "must be at most 1h"));
        }
        for key in self.kafka.keys() {
            if key.trim().is_empty() {
                return Err(bad("kafka", "property names must not be empty"));
            }
        }
        Ok(())
    }

    /// The validated bucket width.
    pub fn width(&self) -> Result<BucketWidth, ConfigError> {
        BucketWidth::from_duration(self.bucket_width)
            .map_err(|e| bad("bucket_width", e.to_string()))
    }

    /// The identity written into every record, with host and instance defaulted to this
    /// machine's host name and the process id.
    pub fn observer(&self) -> Observer {
        Observer {
            tier: Tier::from(self.tier.as_str()),
            datacenter: self.datacenter.clone(),
            cluster: self.cluster.clone(),
            host: self.host.clone().unwrap_or_else(hostname),
            instance: self
                .instance
                .clone()
                .unwrap_or_else(|| std::process::id().to_string()),
        }
    }
}

fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(format!("must be 1 to {MAX_TOPIC_LEN} characters"));
    }
    if topic == "." || topic == ".." {
        return Err("must not be `.` or `..`".to_owned());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} is not allowed in a Kafka topic name"
        ));
    }
    Ok(())
}

/// This machine's host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if !s.is_empty() && s.len() <= MAX_NAME_LEN {
                return s.to_owned();
            }
        }
    }
    match std::env::var("HOSTNAME") {
        Ok(h) if !h.is_empty() && h.len() <= MAX_NAME_LEN => h,
        _ => "localhost".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(s: &str) -> Result<AuditConfig, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn defaults_are_valid() {
        let c = AuditConfig::default();
        c.validate().expect("defaults validate");
        assert_eq!(c.topic, "chaperone-audit");
        assert_eq!(c.flush_interval, Duration::from_secs(10));
        assert_eq!(c.width().expect("width").as_millis(), 60_000);
        let o = c.observer();
        assert_eq!(o.tier, Tier::Producer);
        assert_eq!(o.instance, std::process::id().to_string());
        assert!(!o.host.is_empty());
    }

    #[test]
    fn reads_durations_and_identity() {
        let c = from_json(
            r#"{"topic":"audit-x","flush_interval":"250ms","bucket_width":"5m",
                "delivery_timeout":"5s","host":"web-1","instance":"a","tier":"billing",
                "kafka":{"bootstrap.servers":"127.0.0.1:19092"}}"#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.bucket_width, Duration::from_secs(300));
        assert_eq!(c.delivery_timeout, Duration::from_secs(5));
        let o = c.observer();
        assert_eq!((o.host.as_str(), o.instance.as_str()), ("web-1", "a"));
        assert_eq!(o.tier, Tier::Other("billing".to_owned()));
        let back: AuditConfig =
            serde_json::from_str(&serde_json::to_string(&c).expect("serializes")).expect("reads");
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = from_json(r#"{"flush_intervall":"10s"}"#).expect_err("unknown key");
        assert!(err.to_string().contains("flush_intervall"), "{err}");
        let err = from_json(r#"{"flush_interval":"10 parsecs"}"#).expect_err("bad unit");
        assert!(err.to_string().contains("parsecs"), "{err}");
        let err = from_json(r#"{"bucket_width":60000}"#).expect_err("no unit");
        assert!(err.to_string().contains("\"60s\" or \"60000ms\""), "{err}");
    }

    #[test]
    fn validation_names_the_bad_key() {
        type Breaker = Box<dyn Fn(&mut AuditConfig)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("topic", Box::new(|c| c.topic = "bad topic".into())),
            ("topic", Box::new(|c| c.topic = String::new())),
            ("topic", Box::new(|c| c.topic = "x".repeat(250))),
            (
                "flush_interval",
                Box::new(|c| c.flush_interval = Duration::ZERO),
            ),
            (
                "bucket_width",
                Box::new(|c| c.bucket_width = Duration::from_millis(1_500)),
            ),
            (
                "bucket_width",
                Box::new(|c| c.bucket_width = Duration::from_secs(2 * 86_400)),
            ),
            ("tier", Box::new(|c| c.tier = String::new())),
            ("datacenter", Box::new(|c| c.datacenter = "d".repeat(256))),
            ("host", Box::new(|c| c.host = Some(String::new()))),
            ("instance", Box::new(|c| c.instance = Some(String::new()))),
            ("max_open_cells", Box::new(|c| c.max_open_cells = 0)),
            ("spool_dir", Box::new(|c| c.spool_dir = PathBuf::new())),
            ("spool_max_bytes", Box::new(|c| c.spool_max_bytes = 10)),
            (
                "delivery_timeout",
                Box::new(|c| c.delivery_timeout = Duration::from_millis(10)),
            ),
            (
                "shutdown_timeout",
                Box::new(|c| c.shutdown_timeout = Duration::from_secs(7_200)),
            ),
            (
                "kafka",
                Box::new(|c| {
                    c.kafka.insert(" ".into(), "x".into());
                }),
            ),
        ];
        for (key, break_it) in cases {
            let mut c = AuditConfig::default();
            break_it(&mut c);
            let err = c.validate().expect_err(key);
            assert_eq!(err.key, key, "{err}");
            assert!(err.to_string().contains(key));
        }
    }

    #[test]
    fn secret_properties_are_redacted_and_the_rest_kept() {
        let props: BTreeMap<String, String> = [
            ("sasl.password", "pw1"),
            ("ssl.key.password", "pw2"),
            ("ssl.keystore.password", "pw3"),
            ("sasl.oauthbearer.client.secret", "pw4"),
            ("sasl.oauthbearer.config", "principal=a secret=pw5"),
            ("SSL.KEY.PEM", "-----BEGIN PRIVATE KEY-----pw6"),
            ("sasl.jaas.config", "pw7"),
            ("sasl.username", "chaperone"),
            ("security.protocol", "SASL_SSL"),
            ("ssl.key.location", "/etc/chaperone/client.key"),
            ("ssl.ca.location", "/etc/chaperone/ca.crt"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let shown = redacted_properties(&props);
        let text = format!("{shown:?}");
        for n in 1..=7 {
            assert!(!text.contains(&format!("pw{n}")), "{text}");
        }
        assert_eq!(shown["sasl.password"], REDACTED);
        assert_eq!(shown["sasl.username"], "chaperone");
        assert_eq!(shown["security.protocol"], "SASL_SSL");
        assert_eq!(shown["ssl.key.location"], "/etc/chaperone/client.key");
        assert_eq!(shown.len(), props.len());
    }
}
