//! Configuration of the alert sender: the webhooks, their filters and secrets, and the retry
//! policy.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{ConfigError, VerdictStatus};

/// `[alerts]`: where notifications go and how hard delivery tries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Run the sender at all.
    pub enabled: bool,
    /// How often the outbox is polled for new events and due retries.
    #[serde(with = "chaperone_audit::duration")]
    pub poll_interval: Duration,
    /// Timeout of one webhook request (connect and response).
    #[serde(with = "chaperone_audit::duration")]
    pub request_timeout: Duration,
    /// Delay before the first retry of a failed delivery; doubles on every further failure.
    #[serde(with = "chaperone_audit::duration")]
    pub initial_backoff: Duration,
    /// Cap of the retry delay: a receiver that is down for hours is still retried this often.
    #[serde(with = "chaperone_audit::duration")]
    pub max_backoff: Duration,
    /// A delivery the receiver refuses this many times is parked: never tried again, shown in
    /// the API, on the incident page and in the metrics. A refusal is a 4xx answer other than
    /// 408 (Request Timeout) and 429 (Too Many Requests): the receiver got the request and
    /// turned it down, so sending the same bytes again only helps once someone fixes the
    /// receiver or its configuration. The attempts are spread by the backoff (with the
    /// defaults, 10 refusals take about 8.5 minutes). Other failures (no connection, a
    /// timeout, 408, 429, 5xx) do not count here: an outage of the receiver is waited out
    /// up to `max_age`.
    pub max_attempts: u32,
    /// A delivery that still fails this long after it was created (whatever the failure) is
    /// parked at its next failed attempt, with the webhook's other notifications that have
    /// waited as long: a receiver down for longer gets the notifications of the last
    /// `max_age` when it is back, not older ones.
    #[serde(with = "chaperone_audit::duration")]
    pub max_age: Duration,
    /// Due deliveries of one webhook read per query; each is then locked, posted and
    /// committed in its own transaction.
    pub batch_size: usize,
    /// Base URL of this collector as people reach it, used for the `link` field (the incident's
    /// status page), for example `http://collector.internal:8080`. Without it `link` is null.
    pub public_url: Option<String>,
    /// The webhooks.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_attempts: 10,
            max_age: Duration::from_secs(24 * 3600),
            batch_size: 16,
            public_url: None,
            webhooks: Vec::new(),
        }
    }
}

/// Body format of a webhook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The documented JSON body.
    #[default]
    Json,
    /// Slack incoming-webhook compatible: `{"text": "..."}`.
    Slack,
}

/// `[[alerts.webhooks]]`: one receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Stable name: deliveries are stored under it, so renaming a webhook forgets what was
    /// already sent to it.
    pub name: String,
    /// Where to POST: an `http://` or `https://` URL. Credentials in it (`user:password@`)
    /// are sent as HTTP basic authentication and never shown: logs, stored errors and the
    /// API show the URL as scheme, host and port only ([`super::client::redact_url`]).
    pub url: String,
    /// Body format.
    #[serde(default)]
    pub format: WebhookFormat,
    /// Which incidents this webhook hears about.
    #[serde(default)]
    pub filters: WebhookFilters,
    /// Environment variable holding the HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the HMAC-SHA256 signing secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// PEM file of the certificate authorities that signed the receiver's certificate, for
    /// receivers behind a private CA. When set, only these CAs are trusted for this webhook
    /// (not the built-in web roots), so a certificate from any other issuer is refused.
    /// Read and checked at start-up and by `--check-config`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[alerts.webhooks.filters]`: an incident is notified to the webhook (once) when one of its
/// bad buckets passes every filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookFilters {
    /// Topics to notify about; empty means all.
    pub topics: Vec<String>,
    /// Verdicts to notify about.
    pub statuses: Vec<VerdictStatus>,
    /// For `missing`: at least this many messages missing in the bucket.
    pub min_missing_count: u64,
    /// For `missing`: at least this fraction (0..=1) of the expected messages missing.
    pub min_missing_ratio: f64,
}

impl Default for WebhookFilters {
    fn default() -> Self {
        Self {
            topics: Vec::new(),
            statuses: vec![
                VerdictStatus::Missing,
                VerdictStatus::Duplicated,
                VerdictStatus::TierSilent,
            ],
            min_missing_count: 0,
            min_missing_ratio: 0.0,
        }
    }
}

impl WebhookFilters {
    /// Whether a bad bucket passes.
    pub fn matches(&self, topic: &str, status: VerdictStatus, expected: i64, actual: i64) -> bool {
        if !self.topics.is_empty() && !self.topics.iter().any(|t| t == topic) {
            return false;
        }
        if !self.statuses.contains(&status) {
            return false;
        }
        if status == VerdictStatus::Missing {
            let missing = (expected - actual).max(0);
            if u64::try_from(missing).unwrap_or(0) < self.min_missing_count {
                return false;
            }
            let ratio = if expected > 0 {
                missing as f64 / expected as f64
            } else {
                1.0
            };
            if ratio < self.min_missing_ratio {
                return false;
            }
        }
        true
    }
}

/// A signing secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl AlertsConfig {
    /// Checks the configuration, naming the first bad key. Does not read secrets (see
    /// [`WebhookConfig::load_secret`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.poll_interval.is_zero() {
            return Err(ConfigError::new(
                "alerts.poll_interval",
                "must be above zero",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::new(
                "alerts.request_timeout",
                "must be above zero",
            ));
        }
        if self.initial_backoff.is_zero() {
            return Err(ConfigError::new(
                "alerts.initial_backoff",
                "must be above zero",
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(ConfigError::new(
                "alerts.max_backoff",
                "must be at least alerts.initial_backoff",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "alerts.max_attempts",
                "must be at least 1",
            ));
        }
        if self.max_age.is_zero() {
            return Err(ConfigError::new("alerts.max_age", "must be above zero"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::new("alerts.batch_size", "must be at least 1"));
        }
        let public_ok = self
            .public_url
            .as_ref()
            .is_none_or(|url| url.starts_with("http://") || url.starts_with("https://"));
        if !public_ok {
            return Err(ConfigError::new(
                "alerts.public_url",
                "must start with http:// or https://",
            ));
        }
        let mut names = HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let key = |field: &str| format!("alerts.webhooks[{i}].{field}");
            if w.name.is_empty() || w.name.len() > 100 {
                return Err(ConfigError::new(key("name"), "must be 1 to 100 characters"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("webhook name `{}` is used twice", w.name),
                ));
            }
            let url = reqwest::Url::parse(&w.url).map_err(|e| {
                ConfigError::new(key("url"), format!("webhook `{}`: not a URL: {e}", w.name))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::new(
                    key("url"),
                    format!(
                        "webhook `{}`: must be an http:// or https:// URL with a host",
                        w.name
                    ),
                ));
            }
            if w.ca_file.is_some() && url.scheme() != "https" {
                return Err(ConfigError::new(
                    key("ca_file"),
                    format!("webhook `{}`: ca_file needs an https:// url", w.name),
                ));
            }
            if w.secret_env.is_some() && w.secret_file.is_some() {
                return Err(ConfigError::new(
                    key("secret_file"),
                    "set secret_env or secret_file, not both",
                ));
            }
            if w.filters.statuses.is_empty()
                || w.filters.statuses.contains(&VerdictStatus::Complete)
            {
                return Err(ConfigError::new(
                    key("filters.statuses"),
                    "must list some of missing, duplicated, tier_silent",
                ));
            }
            if !(0.0..=1.0).contains(&w.filters.min_missing_ratio) {
                return Err(ConfigError::new(
                    key("filters.min_missing_ratio"),
                    "must be between 0 and 1",
                ));
            }
        }
        Ok(())
    }
}

impl WebhookConfig {
    /// Reads the signing secret from the environment or its file, if one is configured.
    /// `index` is the webhook's position, for the error's key.
    pub fn load_secret(&self, index: usize) -> Result<Option<Secret>, ConfigError> {
        let key = |field: &str| format!("alerts.webhooks[{index}].{field}");
        let raw = if let Some(var) = &self.secret_env {
            std::env::var(var).map_err(|_| {
                ConfigError::new(
                    key("secret_env"),
                    format!("environment variable `{var}` is not set"),
                )
            })?
        } else if let Some(path) = &self.secret_file {
            std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    key("secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
        } else {
            return Ok(None);
        };
        let secret = raw.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            let field = if self.secret_env.is_some() {
                "secret_env"
            } else {
                "secret_file"
            };
            return Err(ConfigError::new(key(field), "the secret is empty"));
        }
        Ok(Some(Secret(secret.as_bytes().to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook() -> WebhookConfig {
        WebhookConfig {
            name: "ops".into(),
            url: "http://127.0.0.1:9/hook".into(),
            format: WebhookFormat::Json,
            filters: WebhookFilters::default(),
            secret_env: None,
            secret_file: None,
            ca_file: None,
        }
    }

    #[test]
    fn parses_webhooks() {
        let cfg: AlertsConfig = toml::from_str(
            r#"
            public_url = "http://collector:8080"
            initial_backoff = "500ms"
            max_attempts = 3
            max_age = "2h"
            [[webhooks]]
            name = "ops"
            url = "http://hooks.internal/chaperone"
            secret_env = "CHAPERONE_WEBHOOK_SECRET"
            [webhooks.filters]
            topics = ["orders"]
            min_missing_count = 10
            min_missing_ratio = 0.001
            [[webhooks]]
            name = "chat"
            url = "https://chat.internal/hook"
            ca_file = "/etc/chaperone/chat-ca.pem"
            format = "slack"
            filters = { statuses = ["missing"] }
            "#,
        )
        .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.initial_backoff, Duration::from_millis(500));
        assert_eq!(
            (cfg.max_attempts, cfg.max_age),
            (3, Duration::from_secs(7200))
        );
        assert_eq!(cfg.webhooks[1].format, WebhookFormat::Slack);
        assert_eq!(cfg.webhooks[0].filters.min_missing_count, 10);
        assert_eq!(
            cfg.webhooks[1].filters.statuses,
            vec![VerdictStatus::Missing]
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<AlertsConfig>(
            "[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"s\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let mut cfg = AlertsConfig {
            webhooks: vec![webhook(), webhook()],
            ..AlertsConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.webhooks[1].name");
        cfg.webhooks[1].name = "other".into();
        cfg.webhooks[1].url = "ftp://x".into();
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.webhooks[1].url");
        cfg.webhooks[1].url = "https://user:pw@".into();
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.webhooks[1].url");
        cfg.webhooks[1].url = "http://x".into();
        cfg.webhooks[1].ca_file = Some("/ca.pem".into());
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key, "alerts.webhooks[1].ca_file");
        assert!(err.message.contains("`other`"), "{err}");
        cfg.webhooks[1].url = "https://x".into();
        cfg.validate().expect("https with a ca_file");
        cfg.webhooks[0].filters.min_missing_ratio = 2.0;
        assert_eq!(
            cfg.validate().unwrap_err().key,
            "alerts.webhooks[0].filters.min_missing_ratio"
        );
        cfg.webhooks[0].filters.min_missing_ratio = 0.5;
        cfg.max_backoff = Duration::from_millis(1);
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.max_backoff");
        cfg.max_backoff = Duration::from_secs(300);
        cfg.max_attempts = 0;
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.max_attempts");
        cfg.max_attempts = 10;
        cfg.max_age = Duration::ZERO;
        assert_eq!(cfg.validate().unwrap_err().key, "alerts.max_age");
    }

    #[test]
    fn filters_match() {
        let f = WebhookFilters {
            topics: vec!["orders".into()],
            min_missing_count: 10,
            min_missing_ratio: 0.05,
            ..WebhookFilters::default()
        };
        assert!(f.matches("orders", VerdictStatus::Missing, 100, 80));
        assert!(!f.matches("payments", VerdictStatus::Missing, 100, 80));
        assert!(
            !f.matches("orders", VerdictStatus::Missing, 100, 95),
            "5 < 10 missing"
        );
        assert!(
            !f.matches("orders", VerdictStatus::Missing, 10_000, 9_980),
            "ratio too low"
        );
        assert!(f.matches("orders", VerdictStatus::Duplicated, 100, 101));
        assert!(f.matches("orders", VerdictStatus::TierSilent, 100, 0));
        let only_missing = WebhookFilters {
            statuses: vec![VerdictStatus::Missing],
            ..WebhookFilters::default()
        };
        assert!(!only_missing.matches("orders", VerdictStatus::Duplicated, 1, 2));
    }

    #[test]
    fn secrets_come_from_files_and_are_not_printed() {
        let dir = std::env::temp_dir().join(format!("chaperone-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let w = WebhookConfig {
            secret_file: Some(path.clone()),
            ..webhook()
        };
        let secret = w.load_secret(0).unwrap().unwrap();
        assert_eq!(secret.expose(), b"s3cr3t");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        let missing = WebhookConfig {
            secret_env: Some("CHAPERONE_TEST_SURELY_UNSET_VARIABLE".into()),
            ..webhook()
        };
        assert_eq!(
            missing.load_secret(3).unwrap_err().key,
            "alerts.webhooks[3].secret_env"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
