//! Configuration: one TOML file, overridden by `CHAPERONE_PROXY_*` environment variables and
//! command-line flags (applied by `main.rs`), validated once at start-up.
//!
//! Only `bootstrap_servers` has no working default. [`Config::validate`] names the offending
//! key in its error; secrets (client tokens and passwords, librdkafka secrets) come from files
//! or the environment and never appear in `Debug` output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chaperone_audit::AuditConfig;
use chaperone_daemon_support::secrets;
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
    /// A key holds a value that is not allowed, or a secret it names cannot be read.
    #[error("invalid config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key name.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A client allowed to call the proxy with `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerClient {
    /// Name of the client, logged and used to scope its idempotency keys.
    pub client: String,
    /// File holding the token (trailing newline dropped).
    pub token_file: PathBuf,
}

/// A client allowed to call the proxy with HTTP Basic authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicClient {
    /// User name, also the client's name.
    pub user: String,
    /// File holding the password (trailing newline dropped).
    pub password_file: PathBuf,
}

/// Who may call the proxy. With no client listed, every request is accepted (fine on
/// loopback; a warning is logged when the proxy listens beyond it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Clients authenticating with a bearer token.
    pub bearer: Vec<BearerClient>,
    /// Clients authenticating with HTTP Basic.
    pub basic: Vec<BasicClient>,
}

/// HTTPS for the API: with both files set, the proxy serves TLS (rustls) instead of plain HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file holding the server certificate, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM file holding the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The `Idempotency-Key` window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long a key is remembered after its first request completed: a retry within it gets
    /// the first response and produces nothing. Keep it above the clients' retry horizon.
    #[serde(with = "chaperone_audit::duration")]
    pub window: Duration,
    /// At most this many keys are remembered; beyond it the oldest are forgotten first.
    pub max_keys: usize,
    /// At most this many bytes of remembered responses (plus 512 bytes of bookkeeping per
    /// key); beyond it the oldest keys are forgotten first. A response larger than a tenth of
    /// this is not remembered, and a retry of its request produces again.
    pub max_bytes: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The proxy's configuration. Its `Debug` output shows secret librdkafka properties as
/// `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers of the cluster produced to.
    pub bootstrap_servers: String,
    /// Address the HTTP API (and `/metrics`, `/healthz`, `/readyz`) listens on.
    pub http_addr: SocketAddr,
    /// The id `GET /v3/clusters` reports and v3 paths must name. Empty: Kafka's own cluster id,
    /// read at start-up.
    pub cluster_id: String,
    /// How long a record may take from the request to Kafka's acknowledgement (librdkafka
    /// `message.timeout.ms`). A record not acknowledged by then is answered with error 50003,
    /// never with success.
    #[serde(with = "chaperone_audit::duration")]
    pub produce_timeout: Duration,
    /// Timeout of the metadata requests behind `/topics`, `/brokers` and the topic checks of
    /// produce requests.
    #[serde(with = "chaperone_audit::duration")]
    pub metadata_timeout: Duration,
    /// How long cluster metadata is reused. A produce to a topic missing from it refreshes it
    /// at once, so a new topic is found without waiting.
    #[serde(with = "chaperone_audit::duration")]
    pub metadata_max_age: Duration,
    /// Largest request body in bytes; a larger one is answered 413.
    pub max_request_bytes: usize,
    /// Most records in one v2 request; more is answered 422.
    pub max_records_per_request: usize,
    /// Bound on the bytes of requests being produced at once (counted from each request's
    /// length before it is read). A request that does not fit is answered 429 with
    /// `Retry-After`, never queued. Must be at least `max_request_bytes`.
    pub max_in_flight_bytes: usize,
    /// `Retry-After` of a 429 answer.
    #[serde(with = "chaperone_audit::duration")]
    pub retry_after: Duration,
    /// Count nothing: the proxy produces through a bare librdkafka producer. For measuring the
    /// audit's cost only; never in production.
    pub audit_disabled: bool,
    /// The audit library's settings (tier `producer`; host and instance are the proxy's).
    pub audit: AuditConfig,
    /// `Idempotency-Key` handling.
    pub idempotency: IdempotencyConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// HTTPS; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// librdkafka properties of the producer (SASL, SSL, tuning). `acks=all`, idempotence and
    /// `message.timeout.ms` are forced after these. A value `"${file:PATH}"` or
    /// `"${env:VAR}"` is replaced by that file's content or variable at start-up.
    pub kafka: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chaperone_audit::config::redacted_properties;
        f.debug_struct("Config")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("http_addr", &self.http_addr)
            .field("cluster_id", &self.cluster_id)
            .field("produce_timeout", &self.produce_timeout)
            .field("metadata_timeout", &self.metadata_timeout)
            .field("metadata_max_age", &self.metadata_max_age)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_records_per_request", &self.max_records_per_request)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("retry_after", &self.retry_after)
            .field("audit_disabled", &self.audit_disabled)
            .field("audit", &self.audit)
            .field("idempotency", &self.idempotency)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("kafka", &redacted_properties(&self.kafka))
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8082)),
            cluster_id: String::new(),
            produce_timeout: Duration::from_secs(30),
            metadata_timeout: Duration::from_secs(10),
            metadata_max_age: Duration::from_secs(30),
            max_request_bytes: 8 * 1024 * 1024,
            max_records_per_request: 10_000,
            max_in_flight_bytes: 256 * 1024 * 1024,
            retry_after: Duration::from_secs(1),
            audit_disabled: false,
            audit: AuditConfig::default(),
            idempotency: IdempotencyConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            kafka: BTreeMap::new(),
        }
    }
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

    /// Applies `CHAPERONE_PROXY_KAFKA__<PROPERTY>` variables (for example
    /// `CHAPERONE_PROXY_KAFKA__SASL_PASSWORD` sets `sasl.password`).
    pub fn apply_kafka_env<I: IntoIterator<Item = (String, String)>>(&mut self, vars: I) {
        chaperone_daemon_support::kafka::apply_env(
            &mut self.kafka,
            "CHAPERONE_PROXY_KAFKA__",
            vars,
        );
    }

    /// Replaces every `${file:PATH}` and `${env:VAR}` value of the librdkafka table.
    pub fn resolve_secret_refs(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        secrets::resolve_all(&mut self.kafka, &env)
            .map_err(|(prop, reason)| invalid(format!("kafka.\"{prop}\""), reason))
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid("bootstrap_servers", "must be set and non-empty"));
        }
        let nonzero = [
            ("produce_timeout", self.produce_timeout),
            ("metadata_timeout", self.metadata_timeout),
            ("retry_after", self.retry_after),
            ("idempotency.window", self.idempotency.window),
        ];
        for (key, d) in nonzero {
            if d.is_zero() {
                return Err(invalid(key, "must be above zero"));
            }
        }
        if self.produce_timeout > Duration::from_secs(3600) {
            return Err(invalid("produce_timeout", "must be at most 1h"));
        }
        if self.max_request_bytes < 1024 {
            return Err(invalid("max_request_bytes", "must be at least 1024"));
        }
        if self.max_records_per_request == 0 {
            return Err(invalid("max_records_per_request", "must be at least 1"));
        }
        if self.max_in_flight_bytes < self.max_request_bytes {
            return Err(invalid(
                "max_in_flight_bytes",
                "must be at least max_request_bytes, or no request of the largest size could ever pass",
            ));
        }
        if self.max_in_flight_bytes > (u32::MAX as usize) {
            return Err(invalid("max_in_flight_bytes", "must be at most 4 GiB"));
        }
        if self.idempotency.max_keys == 0 {
            return Err(invalid("idempotency.max_keys", "must be at least 1"));
        }
        self.audit
            .validate()
            .map_err(|e| invalid("audit", e.to_string()))?;
        for (i, c) in self.auth.bearer.iter().enumerate() {
            if c.client.trim().is_empty() {
                return Err(invalid(
                    format!("auth.bearer[{i}].client"),
                    "must be non-empty",
                ));
            }
        }
        for (i, c) in self.auth.basic.iter().enumerate() {
            if c.user.is_empty() || c.user.contains(':') {
                return Err(invalid(
                    format!("auth.basic[{i}].user"),
                    "must be non-empty and hold no ':'",
                ));
            }
        }
        Ok(())
    }

    /// Reads the client secrets the `auth` section names; the error names the key and file.
    pub fn read_credentials(&self) -> Result<Credentials, ConfigError> {
        let read = |key: String, path: &PathBuf| -> Result<String, ConfigError> {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(key.clone(), format!("cannot read {}: {e}", path.display()))
            })?;
            let secret = text.strip_suffix('\n').unwrap_or(&text);
            let secret = secret.strip_suffix('\r').unwrap_or(secret).to_owned();
            if secret.is_empty() {
                return Err(invalid(key, format!("{} is empty", path.display())));
            }
            Ok(secret)
        };
        let mut creds = Credentials::default();
        for (i, c) in self.auth.bearer.iter().enumerate() {
            let token = read(format!("auth.bearer[{i}].token_file"), &c.token_file)?;
            creds.bearer.push((c.client.clone(), token));
        }
        for (i, c) in self.auth.basic.iter().enumerate() {
            let password = read(format!("auth.basic[{i}].password_file"), &c.password_file)?;
            creds.basic.push((c.user.clone(), password));
        }
        Ok(creds)
    }
}

/// The secrets of the configured clients, read from their files. `Debug` shows names only.
#[derive(Clone, Default)]
pub struct Credentials {
    /// (client, token).
    pub bearer: Vec<(String, String)>,
    /// (user, password).
    pub basic: Vec<(String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        f.debug_struct("Credentials")
            .field("bearer", &names(&self.bearer))
            .field("basic", &names(&self.basic))
            .finish()
    }
}

impl Credentials {
    /// Whether any client is configured (then every API request must authenticate).
    pub fn required(&self) -> bool {
        !self.bearer.is_empty() || !self.basic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            bootstrap_servers: "127.0.0.1:19092".into(),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_validate_once_bootstrap_is_set() {
        assert!(base().validate().is_ok());
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("`bootstrap_servers`"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bare_durations_are_refused() {
        let err = Config::from_toml("bootstrap_servers = \"x\"\nfoo = 1\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("foo"), "{err}");
        let err = Config::from_toml("produce_timeout = 30\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("30s"), "{err}");
        let c = Config::from_toml(
            "bootstrap_servers = \"k:9092\"\nproduce_timeout = \"5s\"\n[idempotency]\nwindow = \"2m\"\n[audit]\nflush_interval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.produce_timeout, Duration::from_secs(5));
        assert_eq!(c.idempotency.window, Duration::from_secs(120));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = base();
        c.max_in_flight_bytes = c.max_request_bytes - 1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`max_in_flight_bytes`")
        );
        let mut c = base();
        c.produce_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`produce_timeout`")
        );
        let mut c = base();
        c.auth.basic.push(BasicClient {
            user: "a:b".into(),
            password_file: "/nonexistent".into(),
        });
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`auth.basic[0].user`")
        );
    }

    #[test]
    fn credentials_come_from_files_and_a_missing_file_names_its_key() {
        let dir = std::env::temp_dir().join(format!("proxy-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let mut c = base();
        c.auth.bearer.push(BearerClient {
            client: "orders".into(),
            token_file: token,
        });
        let creds = c.read_credentials().unwrap();
        assert_eq!(
            creds.bearer,
            vec![("orders".to_owned(), "s3cret".to_owned())]
        );
        assert!(!format!("{creds:?}").contains("s3cret"));
        c.auth.basic.push(BasicClient {
            user: "u".into(),
            password_file: dir.join("missing"),
        });
        let err = c.read_credentials().unwrap_err().to_string();
        assert!(err.contains("`auth.basic[0].password_file`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kafka_env_and_debug_redact_secrets() {
        let mut c = base();
        c.apply_kafka_env([(
            "CHAPERONE_PROXY_KAFKA__SASL_PASSWORD".to_owned(),
            "pw".to_owned(),
        )]);
        assert_eq!(c.kafka.get("sasl.password").map(String::as_str), Some("pw"));
        assert!(!format!("{c:?}").contains("\"pw\""));
    }
}
