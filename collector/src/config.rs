//! The collector's configuration: one TOML file, environment overrides for secrets and
//! addresses, and a [`Config::validate`] that names the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chaperone_daemon_support::secrets;
use serde::Deserialize;

/// Environment variable that overrides `database.url`.
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// Environment variable that overrides `api.listen`.
pub const ENV_LISTEN: &str = "CHAPERONE_COLLECTOR_LISTEN";
/// Environment variable holding the API bearer token (takes precedence over `api.token_file`).
pub const ENV_API_TOKEN: &str = "CHAPERONE_COLLECTOR_API_TOKEN";

/// A configuration value that cannot work, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration key `{key}`: {message}")]
#[non_exhaustive]
pub struct ConfigError {
    /// Dotted path of the key, for example `clusters[1].bootstrap`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// A new error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Everything the collector daemon needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store lives.
    pub database: DatabaseConfig,
    /// The Kafka clusters whose audit topics are consumed.
    pub clusters: Vec<ClusterConfig>,
    /// Batching and retry behaviour of the ingest pipeline.
    pub ingest: IngestConfig,
    /// How long stored counts are kept.
    pub retention: RetentionConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// Tier reconciliation (see [`crate::reconcile`]).
    pub reconcile: crate::reconcile::ReconcileConfig,
    /// Webhook alerts (see [`crate::alerts`]).
    pub alerts: crate::alerts::AlertsConfig,
}

/// PostgreSQL connection settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL. It usually holds a password, so prefer the `DATABASE_URL` environment
    /// variable or `url_file`; it is never logged.
    pub url: Option<String>,
    /// File whose first line is the connection URL (for mounted secrets).
    pub url_file: Option<PathBuf>,
    /// Pool size: ingest uses one connection at a time, the API, reconciliation, alerts and
    /// retention the rest.
    pub max_connections: u32,
    /// How long to wait for a connection before an operation counts as failed.
    #[serde(with = "chaperone_audit::duration")]
    pub acquire_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_file", &self.url_file)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl DatabaseConfig {
    /// The connection URL, from `url` or `url_file`.
    pub fn resolve_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        if let Some(path) = &self.url_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("database.url_file", format!("cannot read {path:?}: {e}"))
            })?;
            let url = text.lines().next().unwrap_or("").trim().to_owned();
            if url.is_empty() {
                return Err(ConfigError::new("database.url_file", "the file is empty"));
            }
            return Ok(url);
        }
        Err(ConfigError::new(
            "database.url",
            format!("no database URL: set {ENV_DATABASE_URL}, database.url or database.url_file"),
        ))
    }
}

/// One Kafka cluster whose audit topic the collector consumes.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Short name of the cluster, used as the key of its consumed offsets in PostgreSQL and
    /// as a metric label. Renaming it makes the collector read the audit topic from the start
    /// again (duplicates are dropped by record id).
    pub alias: String,
    /// `bootstrap.servers` of the cluster.
    pub bootstrap: String,
    /// Topic the audit records are read from.
    #[serde(default = "default_audit_topic")]
    pub audit_topic: String,
    /// Topic on the same cluster that receives records failing validation.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Extra librdkafka properties for the consumer and the dead-letter producer (security,
    /// timeouts). Settings the collector's guarantees rely on are forced after these. A value
    /// `"${file:/run/secrets/kafka-password}"` or `"${env:KAFKA_PASSWORD}"` is replaced by that
    /// file's content (trailing newline dropped) or variable when the configuration is loaded
    /// ([`Config::resolve_secret_refs`]), so secrets stay out of the file.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

/// Shows secret librdkafka properties as `<redacted>` (the rule is
/// [`chaperone_audit::config::is_secret_property`], shared with the other daemons).
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("alias", &self.alias)
            .field("bootstrap", &self.bootstrap)
            .field("audit_topic", &self.audit_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field(
                "librdkafka",
                &chaperone_audit::config::redacted_properties(&self.librdkafka),
            )
            .finish()
    }
}

fn default_audit_topic() -> String {
    "chaperone-audit".to_owned()
}

fn default_dlq_topic() -> String {
    "chaperone-audit-dlq".to_owned()
}

/// Batching, buffering and retry of the ingest pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Most records written in one PostgreSQL transaction. Larger batches amortise the
    /// round trips; smaller ones bound the work redone after a crash.
    pub batch_size: usize,
    /// Longest a record waits for its batch to fill before the batch is written anyway.
    #[serde(with = "chaperone_audit::duration")]
    pub linger: Duration,
    /// Capacity of the queue between the Kafka consumers and the writer. When the writer
    /// stalls (PostgreSQL down), consumers stop here and Kafka keeps the rest.
    pub queue_capacity: usize,
    /// How often the partitions of each audit topic are listed, to start reading new ones,
    /// and the ingest lag is measured.
    #[serde(with = "chaperone_audit::duration")]
    pub partition_refresh: Duration,
    /// First wait after a failed write to PostgreSQL or the dead-letter topic.
    #[serde(with = "chaperone_audit::duration")]
    pub retry_min: Duration,
    /// Longest wait between retries.
    #[serde(with = "chaperone_audit::duration")]
    pub retry_max: Duration,
    /// How long a dead-letter record may take to be acknowledged before the send is retried.
    #[serde(with = "chaperone_audit::duration")]
    pub dlq_timeout: Duration,
    /// On shutdown, how long the writer keeps retrying the last batch before giving up (the
    /// batch is then read again from Kafka at the next start; nothing is lost).
    #[serde(with = "chaperone_audit::duration")]
    pub shutdown_grace: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            linger: Duration::from_millis(200),
            queue_capacity: 20_000,
            partition_refresh: Duration::from_secs(30),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            dlq_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Deletion of old data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Buckets that started more than this many days ago are deleted, and so are record ids
    /// and progress rows older than that. 0 keeps everything.
    pub days: u32,
    /// Rows deleted per statement, so retention never holds long locks.
    pub batch_size: i64,
    /// How often the retention job runs.
    #[serde(with = "chaperone_audit::duration")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            days: 30,
            batch_size: 5_000,
            interval: Duration::from_secs(3_600),
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the API and `/metrics` listen on.
    pub listen: SocketAddr,
    /// File holding the bearer token required on `/api/` routes (overridden by the
    /// `CHAPERONE_COLLECTOR_API_TOKEN` environment variable). No token: the API is open.
    pub token_file: Option<PathBuf>,
    /// Longest time range one `/buckets` request may span, so a careless range cannot load
    /// the whole table.
    #[serde(with = "chaperone_audit::duration")]
    pub max_range: Duration,
    /// How long a status page login lasts (the session's expiry and the cookie's `Max-Age`).
    #[serde(with = "chaperone_audit::duration")]
    pub session_ttl: Duration,
    /// Failed status page logins a client address may make within `login_window`; past that,
    /// its logins answer 429 with `Retry-After` until the window ends.
    pub login_max_failures: u32,
    /// The window of `login_max_failures`, starting at a client's first failure.
    #[serde(with = "chaperone_audit::duration")]
    pub login_window: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9480)),
            token_file: None,
            max_range: Duration::from_secs(7 * 86_400),
            session_ttl: Duration::from_secs(12 * 3_600),
            login_max_failures: 5,
            login_window: Duration::from_secs(60),
        }
    }
}

impl ApiConfig {
    /// The bearer token, from the environment or `token_file`. Never logged.
    pub fn resolve_token(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        if let Some(t) = env(ENV_API_TOKEN).filter(|t| !t.trim().is_empty()) {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.token_file {
            None => Ok(None),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("api.token_file", format!("cannot read {path:?}: {e}"))
                })?;
                let token = text.trim().to_owned();
                if token.is_empty() {
                    return Err(ConfigError::new("api.token_file", "the file is empty"));
                }
                Ok(Some(token))
            }
        }
    }
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads `path` (or starts from the defaults when `None`), then applies the environment.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading configuration file {}", p.display()))?;
                Self::from_toml(&text)
                    .with_context(|| format!("parsing configuration file {}", p.display()))?
            }
            None => Self::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.resolve_secret_refs(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Replaces every `${file:PATH}` and `${env:VAR}` value of the clusters' `librdkafka`
    /// properties by the file's content (trailing newline dropped) or the variable, read
    /// through `env`. Fails naming the property and the file or variable.
    pub fn resolve_secret_refs(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for (i, c) in self.clusters.iter_mut().enumerate() {
            secrets::resolve_all(&mut c.librdkafka, &env).map_err(|(prop, message)| {
                ConfigError::new(format!("clusters[{i}].librdkafka.\"{prop}\""), message)
            })?;
        }
        Ok(())
    }

    /// Everything `--check-config` checks: [`Config::validate`], then what start-up reads
    /// from files and the environment (`env`): the database URL, the API token, the webhook
    /// secrets and CA files. Needs no database and no Kafka cluster.
    pub fn check(&self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.validate()?;
        self.database.resolve_url()?;
        self.api.resolve_token(env)?;
        self.alerts.check_files()?;
        Ok(())
    }

    /// Applies environment overrides, read through `env` so tests need not touch the process
    /// environment.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = env(ENV_DATABASE_URL).filter(|u| !u.is_empty()) {
            self.database.url = Some(url);
        }
        if let Some(listen) = env(ENV_LISTEN).filter(|l| !l.is_empty()) {
            self.api.listen = listen.parse().map_err(|e| {
                ConfigError::new("api.listen", format!("{ENV_LISTEN}={listen:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Checks every value, naming the first key that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2 (ingest holds one while the API uses another)",
            ));
        }
        nonzero(self.database.acquire_timeout, "database.acquire_timeout")?;
        if self.clusters.is_empty() {
            return Err(ConfigError::new(
                "clusters",
                "at least one cluster is needed",
            ));
        }
        let mut aliases = std::collections::BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let key = |field: &str| format!("clusters[{i}].{field}");
            if c.alias.is_empty()
                || !c
                    .alias
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(ConfigError::new(
                    key("alias"),
                    "must be non-empty letters, digits, '-', '_' or '.'",
                ));
            }
            if !aliases.insert(c.alias.as_str()) {
                return Err(ConfigError::new(
                    key("alias"),
                    format!("`{}` is used by two clusters", c.alias),
                ));
            }
            if c.bootstrap.trim().is_empty() {
                return Err(ConfigError::new(key("bootstrap"), "must not be empty"));
            }
            topic_name(&c.audit_topic, &key("audit_topic"))?;
            topic_name(&c.dlq_topic, &key("dlq_topic"))?;
            if c.dlq_topic == c.audit_topic {
                return Err(ConfigError::new(
                    key("dlq_topic"),
                    "must differ from audit_topic",
                ));
            }
            if let Some(k) = secrets::first_unresolved(&c.librdkafka) {
                return Err(ConfigError::new(
                    format!("clusters[{i}].librdkafka.\"{k}\""),
                    "holds an unresolved ${file:…}/${env:…} reference \
                     (Config::load resolves them; or call Config::resolve_secret_refs)",
                ));
            }
            for k in c.librdkafka.keys() {
                if k == "bootstrap.servers" {
                    return Err(ConfigError::new(
                        format!("clusters[{i}].librdkafka.\"{k}\""),
                        "set `bootstrap` instead",
                    ));
                }
            }
        }
        let i = &self.ingest;
        if i.batch_size == 0 || i.batch_size > 100_000 {
            return Err(ConfigError::new(
                "ingest.batch_size",
                "must be 1 ..= 100000",
            ));
        }
        if i.queue_capacity == 0 {
            return Err(ConfigError::new(
                "ingest.queue_capacity",
                "must be positive",
            ));
        }
        nonzero(i.partition_refresh, "ingest.partition_refresh")?;
        nonzero(i.retry_min, "ingest.retry_min")?;
        if i.retry_max < i.retry_min {
            return Err(ConfigError::new(
                "ingest.retry_max",
                "must not be shorter than ingest.retry_min",
            ));
        }
        nonzero(i.dlq_timeout, "ingest.dlq_timeout")?;
        if self.retention.batch_size <= 0 {
            return Err(ConfigError::new("retention.batch_size", "must be positive"));
        }
        nonzero(self.retention.interval, "retention.interval")?;
        nonzero(self.api.max_range, "api.max_range")?;
        if self.api.session_ttl < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "api.session_ttl",
                "must be at least 1s (the cookie's Max-Age counts whole seconds)",
            ));
        }
        if self.api.login_max_failures == 0 {
            return Err(ConfigError::new(
                "api.login_max_failures",
                "must be positive",
            ));
        }
        nonzero(self.api.login_window, "api.login_window")?;
        self.reconcile.validate()?;
        self.alerts.validate()?;
        Ok(())
    }
}

fn nonzero(d: Duration, key: &str) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(key, "must be longer than zero"))
    } else {
        Ok(())
    }
}

fn topic_name(t: &str, key: &str) -> Result<(), ConfigError> {
    let ok = !t.is_empty()
        && t.len() <= chaperone_audit::record::MAX_TOPIC_LEN
        && t != "."
        && t != ".."
        && t.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("`{t}` is not a valid Kafka topic name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Config {
        Config::from_toml(
            r#"
            [database]
            url = "postgres://u:p@localhost/db"
            [[clusters]]
            alias = "regional"
            bootstrap = "127.0.0.1:19092"
            "#,
        )
        .expect("parses")
    }

    #[test]
    fn defaults_fill_in() {
        let c = minimal();
        c.validate().expect("valid");
        assert_eq!(c.clusters[0].audit_topic, "chaperone-audit");
        assert_eq!(c.clusters[0].dlq_topic, "chaperone-audit-dlq");
        assert_eq!(c.ingest.linger, Duration::from_millis(200));
    }

    #[test]
    fn durations_need_a_unit() {
        let c = Config::from_toml("[ingest]\nlinger = \"1s\"\nretry_max = \"2500ms\"\n")
            .expect("parses");
        assert_eq!(c.ingest.linger, Duration::from_secs(1));
        assert_eq!(c.ingest.retry_max, Duration::from_millis(2_500));
        for (text, line, fix) in [
            (
                "[ingest]\nretry_max = 2500\n",
                "retry_max = 2500",
                "\"2500s\" or \"2500ms\"",
            ),
            (
                "[reconcile]\ninterval = 60000\n",
                "interval = 60000",
                "\"60s\" or \"60000ms\"",
            ),
            (
                "[alerts]\nmax_backoff = \"300\"\n",
                "max_backoff",
                "\"300s\" or \"300ms\"",
            ),
        ] {
            let e = Config::from_toml(text).expect_err(text).to_string();
            assert!(e.contains(line) && e.contains(fix), "{e}");
        }
    }

    #[test]
    fn login_settings_default_and_are_checked() {
        let c = minimal();
        assert_eq!(c.api.session_ttl, Duration::from_secs(12 * 3_600));
        assert_eq!(c.api.login_max_failures, 5);
        assert_eq!(c.api.login_window, Duration::from_secs(60));
        let c = Config::from_toml("[api]\nsession_ttl = \"30m\"\n").expect("parses");
        assert_eq!(c.api.session_ttl, Duration::from_secs(1_800));
        let mut c = minimal();
        c.api.session_ttl = Duration::from_millis(500);
        assert_eq!(c.validate().expect_err("bad").key, "api.session_ttl");
        let mut c = minimal();
        c.api.login_max_failures = 0;
        assert_eq!(c.validate().expect_err("bad").key, "api.login_max_failures");
        let mut c = minimal();
        c.api.login_window = Duration::ZERO;
        assert_eq!(c.validate().expect_err("bad").key, "api.login_window");
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = Config::from_toml("[ingest]\nbatch = 3\n").expect_err("unknown key");
        assert!(err.to_string().contains("batch"), "{err}");
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = minimal();
        c.ingest.batch_size = 0;
        assert_eq!(c.validate().expect_err("bad").key, "ingest.batch_size");

        let mut c = minimal();
        c.clusters.push(c.clusters[0].clone());
        assert_eq!(c.validate().expect_err("bad").key, "clusters[1].alias");

        let mut c = minimal();
        c.clusters[0].dlq_topic = "bad topic".into();
        assert_eq!(c.validate().expect_err("bad").key, "clusters[0].dlq_topic");

        let mut c = minimal();
        c.clusters.clear();
        assert_eq!(c.validate().expect_err("bad").key, "clusters");

        let mut c = minimal();
        c.ingest.retry_max = Duration::from_millis(1);
        assert_eq!(c.validate().expect_err("bad").key, "ingest.retry_max");
    }

    #[test]
    fn env_overrides_and_secrets() {
        let mut c = minimal();
        c.apply_env(|k| match k {
            ENV_DATABASE_URL => Some("postgres://x:secret@h/d".into()),
            ENV_LISTEN => Some("127.0.0.1:0".into()),
            _ => None,
        })
        .expect("applies");
        assert_eq!(c.api.listen.port(), 0);
        assert_eq!(
            c.database.resolve_url().expect("url"),
            "postgres://x:secret@h/d"
        );
        assert!(!format!("{:?}", c.database).contains("secret"));

        let err = c
            .apply_env(|k| (k == ENV_LISTEN).then(|| "nope".to_owned()))
            .expect_err("bad listen");
        assert_eq!(err.key, "api.listen");

        let token = c
            .api
            .resolve_token(|k| (k == ENV_API_TOKEN).then(|| "t0k".to_owned()))
            .expect("token");
        assert_eq!(token.as_deref(), Some("t0k"));
        assert_eq!(c.api.resolve_token(|_| None).expect("no token"), None);
    }

    #[test]
    fn kafka_secrets_come_from_files_or_env_and_are_never_printed() {
        let dir = std::env::temp_dir().join(format!("chaperone-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kafka-password");
        std::fs::write(&file, "pa55word\n").unwrap();
        let text = format!(
            "[[clusters]]\nalias = \"a\"\nbootstrap = \"k:9093\"\n\
             [clusters.librdkafka]\n\"sasl.username\" = \"chaperone\"\n\
             \"sasl.password\" = \"${{file:{}}}\"\n\"ssl.key.password\" = \"${{env:KEY_PW}}\"\n",
            file.display()
        );
        let env = |k: &str| (k == "KEY_PW").then(|| "k3ypw".to_owned());
        let mut c = Config::from_toml(&text).expect("parses");
        assert_eq!(
            c.validate().expect_err("unresolved").key,
            "clusters[0].librdkafka.\"sasl.password\""
        );
        c.resolve_secret_refs(env).expect("resolves");
        c.validate().expect("valid");
        assert_eq!(c.clusters[0].librdkafka["sasl.password"], "pa55word");
        assert_eq!(c.clusters[0].librdkafka["ssl.key.password"], "k3ypw");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("k3ypw"),
            "{shown}"
        );
        assert!(shown.contains("chaperone"), "{shown}");

        let mut missing = Config::from_toml(&text.replace("kafka-password", "nope")).unwrap();
        let err = missing.resolve_secret_refs(env).expect_err("no such file");
        assert_eq!(err.key, "clusters[0].librdkafka.\"sasl.password\"");
        assert!(err.message.contains("nope"), "{err}");
        let mut unset = Config::from_toml(&text).unwrap();
        let err = unset.resolve_secret_refs(|_| None).expect_err("unset");
        assert_eq!(err.key, "clusters[0].librdkafka.\"ssl.key.password\"");
        assert!(err.message.contains("KEY_PW"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
