//! The collector's configuration: one TOML file, environment overrides for secrets and
//! addresses, and a [`Config::validate`] that names the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chaperone_daemon_support::secrets;
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

pub use crate::ingest::config::{ClusterConfig, IngestConfig};
pub use crate::model::ConfigError;
pub use crate::store::retention::RetentionConfig;

/// Environment variable that overrides `database.url`.
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// Environment variable that overrides `api.listen`.
pub const ENV_LISTEN: &str = "CHAPERONE_COLLECTOR_LISTEN";
/// Environment variable holding the API bearer token (takes precedence over `api.token_file`).
pub const ENV_API_TOKEN: &str = "CHAPERONE_COLLECTOR_API_TOKEN";

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
    pub reconcile: crate::reconcile::config::ReconcileConfig,
    /// Webhook alerts (see [`crate::alerts`]).
    pub alerts: crate::alerts::config::AlertsConfig,
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
    /// PostgreSQL `statement_timeout` of every pooled session: a statement running longer is
    /// cancelled and its operation retried (an ingest batch, a reconcile pass, an alert round,
    /// a retention run). It bounds how long a runaway query holds its locks. The longest
    /// statements are a reconcile pass queueing a long backlog of changed buckets and a
    /// retention batch scanning the counts table; start-up migrations run without this limit.
    /// Default 5 min.
    #[serde(with = "chaperone_audit::duration")]
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout` of every pooled session: a statement that waits this long
    /// for a lock fails, and its operation is retried, instead of queueing behind a session
    /// that may never let go (one of a collector cut off from the database). The waits the
    /// collector means are short: an ingest batch waits for another writer's batch of the
    /// same rows, a reconcile pass or an alert fan-out for another instance's transaction, a
    /// start-up migration for another instance's migration (retried until it applies). Must
    /// not be longer than `statement_timeout`. Default 30 s.
    #[serde(with = "chaperone_audit::duration")]
    pub lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout` of every pooled session: the server
    /// ends a session that has left a transaction open and silent this long, and its locks
    /// go with it. This is what frees the row and advisory locks of a collector cut off from
    /// the database in the middle of a transaction (network partition, frozen VM), which the
    /// server would otherwise keep until TCP gives the connection up, about 2 h: another
    /// instance's reconcile, alert fan-out and ingest then go on after at most this long.
    /// A webhook delivery is posted inside its transaction, so this must be longer than
    /// `alerts.request_timeout`. Default 60 s.
    #[serde(with = "chaperone_audit::duration")]
    pub idle_in_transaction_session_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_file", &self.url_file)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field(
                "idle_in_transaction_session_timeout",
                &self.idle_in_transaction_session_timeout,
            )
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
            statement_timeout: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(30),
            idle_in_transaction_session_timeout: Duration::from_secs(60),
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

    /// The session settings every pooled connection starts with, as PostgreSQL parameters
    /// in milliseconds: `statement_timeout`, `lock_timeout` and
    /// `idle_in_transaction_session_timeout`.
    pub fn session_settings(&self) -> [(&'static str, u128); 3] {
        [
            ("statement_timeout", self.statement_timeout.as_millis()),
            ("lock_timeout", self.lock_timeout.as_millis()),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout.as_millis(),
            ),
        ]
    }

    /// Connection options for `url` (from [`DatabaseConfig::resolve_url`]) with the
    /// [session settings](DatabaseConfig::session_settings), sent when each connection starts
    /// (they override any the URL sets).
    pub fn connect_options(&self, url: &str) -> Result<PgConnectOptions, ConfigError> {
        let options: PgConnectOptions = url.parse().map_err(|e| {
            // The message of a parse error never holds the URL (nor its password).
            ConfigError::new("database.url", format!("not a PostgreSQL URL: {e}"))
        })?;
        Ok(options.options(self.session_settings()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2 (ingest holds one while the API uses another)",
            ));
        }
        nonzero(self.acquire_timeout, "database.acquire_timeout")?;
        for (key, d) in [
            ("database.statement_timeout", self.statement_timeout),
            ("database.lock_timeout", self.lock_timeout),
            (
                "database.idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout,
            ),
        ] {
            // PostgreSQL takes whole milliseconds up to i32::MAX; 0 would turn the limit off.
            if d < Duration::from_millis(1) || d.as_millis() > i32::MAX as u128 {
                return Err(ConfigError::new(
                    key,
                    "must be 1ms ..= 24d (PostgreSQL's largest timeout)",
                ));
            }
        }
        if self.lock_timeout > self.statement_timeout {
            return Err(ConfigError::new(
                "database.lock_timeout",
                "must not be longer than database.statement_timeout (the statement would be \
                 cancelled first)",
            ));
        }
        Ok(())
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
        self.database.validate()?;
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
        nonzero(i.dlq_park_after, "ingest.dlq_park_after")?;
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
        if self.alerts.enabled
            && self.database.idle_in_transaction_session_timeout <= self.alerts.request_timeout
        {
            return Err(ConfigError::new(
                "database.idle_in_transaction_session_timeout",
                "must be longer than alerts.request_timeout (a webhook delivery is posted \
                 inside its transaction)",
            ));
        }
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
    fn session_timeouts_have_defaults_and_reach_every_connection() {
        let c = minimal();
        assert_eq!(
            c.database.session_settings(),
            [
                ("statement_timeout", 300_000),
                ("lock_timeout", 30_000),
                ("idle_in_transaction_session_timeout", 60_000),
            ]
        );
        let c = Config::from_toml(
            "[database]\nstatement_timeout = \"90s\"\nlock_timeout = \"1500ms\"\n\
             idle_in_transaction_session_timeout = \"20s\"\n",
        )
        .expect("parses");
        let options = c
            .database
            .connect_options("postgres://u:p@localhost/db?options=-c%20geqo%3Doff")
            .expect("options");
        assert_eq!(
            options.get_options(),
            Some(
                "-c geqo=off -c statement_timeout=90000 -c lock_timeout=1500 \
                 -c idle_in_transaction_session_timeout=20000"
            )
        );
        let err = c
            .database
            .connect_options("postgres://u:s3cret@h:port/d")
            .expect_err("no port");
        assert_eq!(err.key, "database.url");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = Config::from_toml("[database]\nlock_timeout = 30\n").expect_err("no unit");
        assert!(err.to_string().contains("\"30s\""), "{err}");
    }

    #[test]
    fn session_timeouts_are_validated() {
        let mut c = minimal();
        c.database.statement_timeout = Duration::ZERO;
        assert_eq!(
            c.validate().expect_err("zero").key,
            "database.statement_timeout"
        );
        let mut c = minimal();
        c.database.idle_in_transaction_session_timeout = Duration::from_micros(500);
        assert_eq!(
            c.validate().expect_err("rounds to zero").key,
            "database.idle_in_transaction_session_timeout"
        );
        let mut c = minimal();
        c.database.lock_timeout = Duration::from_secs(30 * 86_400);
        assert_eq!(
            c.validate().expect_err("too long").key,
            "database.lock_timeout"
        );
        let mut c = minimal();
        c.database.lock_timeout = Duration::from_secs(600);
        assert_eq!(
            c.validate().expect_err("longer than statements").key,
            "database.lock_timeout"
        );
        let mut c = minimal();
        c.database.idle_in_transaction_session_timeout = c.alerts.request_timeout;
        assert_eq!(
            c.validate()
                .expect_err("shorter than a webhook request")
                .key,
            "database.idle_in_transaction_session_timeout"
        );
        c.alerts.enabled = false;
        c.validate().expect("no webhook is posted");
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
