//! The HTTP client of each webhook (rustls; a private CA per webhook through `ca_file`) and
//! how a webhook's URL and request errors are shown without the credentials they may hold.

use std::error::Error as _;

use super::config::{AlertsConfig, WebhookConfig};
use crate::model::ConfigError;

impl AlertsConfig {
    /// What start-up would read, read now (for `--check-config`): every webhook's secret and
    /// CA file, each CA file loaded into a client. Errors name the webhook and the file.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (i, w) in self.webhooks.iter().enumerate() {
            w.load_secret(i)?;
            build_client(self, w, i)?;
        }
        Ok(())
    }
}

/// Builds the client of webhook number `index`: the request timeout of `config`, and, when
/// the webhook has a `ca_file`, only the certificate authorities of that PEM file as trust
/// roots. Fails naming the webhook and the file when it cannot be read or holds no valid
/// certificate.
pub fn build_client(
    config: &AlertsConfig,
    webhook: &WebhookConfig,
    index: usize,
) -> Result<reqwest::Client, ConfigError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout)
        .user_agent(concat!("chaperone-collector/", env!("CARGO_PKG_VERSION")));
    let key = || format!("alerts.webhooks[{index}].ca_file");
    if let Some(path) = &webhook.ca_file {
        let name = &webhook.name;
        let shown = path.display();
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::new(key(), format!("webhook `{name}`: cannot read {shown}: {e}"))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ConfigError::new(
                key(),
                format!(
                    "webhook `{name}`: {shown} is not a PEM certificate file: {}",
                    chain(&e)
                ),
            )
        })?;
        if certs.is_empty() {
            return Err(ConfigError::new(
                key(),
                format!("webhook `{name}`: {shown} holds no PEM certificate"),
            ));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        // The certificates are parsed into the trust store here: a PEM block that is not a
        // certificate fails now, not at the first notification.
        return builder.build().map_err(|e| {
            ConfigError::new(
                key(),
                format!(
                    "webhook `{name}`: {shown} holds an invalid certificate: {}",
                    chain(&e)
                ),
            )
        });
    }
    builder.build().map_err(|e| {
        ConfigError::new(
            format!("alerts.webhooks[{index}]"),
            format!(
                "webhook `{}`: building its http client: {}",
                webhook.name,
                chain(&e)
            ),
        )
    })
}

/// `url` as it may be shown in logs, stored errors and the API: scheme, host and port, with
/// `***@` where the URL carries credentials and `/…` where it has a path or query (a chat
/// webhook's path is its secret).
pub fn redact_url(url: &str) -> String {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return "<unparsable url>".to_owned();
    };
    let credentials = if parsed.username().is_empty() && parsed.password().is_none() {
        ""
    } else {
        "***@"
    };
    let host = parsed.host().map(|h| h.to_string()).unwrap_or_default();
    let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
    let rest = if parsed.path() == "/" && parsed.query().is_none() {
        ""
    } else {
        "/…"
    };
    format!("{}://{credentials}{host}{port}{rest}", parsed.scheme())
}

/// Why a request to `url` failed, with its causes (a TLS error says which certificate check
/// failed) and without the URL or its credentials.
pub fn request_error(url: &str, error: reqwest::Error) -> String {
    let timeout = error.is_timeout();
    let mut text = chain(&error.without_url());
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    // Belt and braces: no cause may repeat the URL's secrets.
    if let Ok(parsed) = reqwest::Url::parse(url) {
        for secret in [Some(parsed.username()), parsed.password()]
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 3)
        {
            text = text.replace(secret, "***");
        }
    }
    format!("POST {}: {text}", redact_url(url))
}

/// `error` and its sources, joined with `: `, each cause shown once.
fn chain(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_only_scheme_host_and_port() {
        assert_eq!(
            redact_url("https://alice:s3cret@hooks.internal:8443/services/T0/B0/XyZ?token=t0k"),
            "https://***@hooks.internal:8443/…"
        );
        assert_eq!(redact_url("http://hooks.internal"), "http://hooks.internal");
        assert_eq!(redact_url("https://token@[::1]:9/"), "https://***@[::1]:9");
        assert_eq!(redact_url("not a url"), "<unparsable url>");
    }

    #[tokio::test]
    async fn request_errors_name_no_credentials() {
        // Nothing listens on port 9 of loopback: connection refused.
        let url = "http://alice:s3cret-pw@127.0.0.1:9/hook/path-token";
        let error = reqwest::Client::new()
            .post(url)
            .send()
            .await
            .expect_err("nothing listens");
        let text = request_error(url, error);
        assert!(
            text.starts_with("POST http://***@127.0.0.1:9/…: "),
            "{text}"
        );
        for secret in ["alice", "s3cret-pw", "path-token"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.to_lowercase().contains("connect"), "{text}");
    }

    fn hook(ca_file: &std::path::Path) -> WebhookConfig {
        toml::from_str(&format!(
            "name = \"ops\"\nurl = \"https://h.internal/x\"\nca_file = {:?}",
            ca_file.display().to_string()
        ))
        .expect("parses")
    }

    #[test]
    fn a_bad_ca_file_is_named_with_its_webhook() {
        let dir = std::env::temp_dir().join(format!("chaperone-ca-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = AlertsConfig::default();

        let missing = dir.join("missing.pem");
        let err = build_client(&config, &hook(&missing), 2).unwrap_err();
        assert_eq!(err.key, "alerts.webhooks[2].ca_file");
        assert!(err.message.contains("webhook `ops`"), "{err}");
        assert!(err.message.contains("missing.pem"), "{err}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "just some text\n").unwrap();
        let err = build_client(&config, &hook(&empty), 0).unwrap_err();
        assert!(err.message.contains("no PEM certificate"), "{err}");

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = build_client(&config, &hook(&garbage), 0).unwrap_err();
        assert_eq!(err.key, "alerts.webhooks[0].ca_file");
        assert!(err.message.contains("garbage.pem"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
