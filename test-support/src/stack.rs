//! Where the stack of `dev/stack up` listens. Each address can be overridden by the
//! variable `dev/stack env` exports; the defaults are the stack's own ports.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};

/// Bootstrap servers of the regional cluster.
pub fn regional_bootstrap() -> String {
    env_or("CHAPERONE_REGIONAL_BOOTSTRAP", "127.0.0.1:19092")
}

/// Bootstrap servers of the second datacenter's regional cluster.
pub fn regional2_bootstrap() -> String {
    env_or("CHAPERONE_REGIONAL2_BOOTSTRAP", "127.0.0.1:39092")
}

/// Bootstrap servers of the aggregate cluster.
pub fn aggregate_bootstrap() -> String {
    env_or("CHAPERONE_AGGREGATE_BOOTSTRAP", "127.0.0.1:29092")
}

/// URL of the stack's PostgreSQL database (the `chaperone` role may create databases).
pub fn database_url() -> String {
    env_or(
        "DATABASE_URL",
        "postgres://chaperone:chaperone@127.0.0.1:55432/chaperone",
    )
}

/// The regional cluster's SASL_SSL listener (SCRAM-SHA-512) and what a client needs to use
/// it, as `dev/stack env` exports them: files, so secrets are read where they are used.
#[derive(Debug, Clone)]
pub struct SecureListener {
    /// Bootstrap servers of the listener.
    pub bootstrap: String,
    /// CA certificate (PEM) that signed the broker's certificate.
    pub ca: String,
    /// Client certificate (PEM) signed by the same CA.
    pub client_cert: String,
    /// The client certificate's private key (PEM, encrypted).
    pub client_key: String,
    /// File holding the client key's password.
    pub client_key_password_file: String,
    /// SCRAM user.
    pub user: String,
    /// File holding the SCRAM user's password.
    pub password_file: String,
}

/// The regional cluster's secured listener (`CHAPERONE_REGIONAL_SECURE_BOOTSTRAP`,
/// `CHAPERONE_TLS_*`, `CHAPERONE_SCRAM_*`; defaults: the stack's port and `.cache/stack/tls/`).
pub fn secure_listener() -> SecureListener {
    let tls = concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/stack/tls");
    SecureListener {
        bootstrap: env_or("CHAPERONE_REGIONAL_SECURE_BOOTSTRAP", "127.0.0.1:19094"),
        ca: env_or("CHAPERONE_TLS_CA", &format!("{tls}/ca.crt")),
        client_cert: env_or("CHAPERONE_TLS_CLIENT_CERT", &format!("{tls}/client.crt")),
        client_key: env_or("CHAPERONE_TLS_CLIENT_KEY", &format!("{tls}/client.key")),
        client_key_password_file: env_or(
            "CHAPERONE_TLS_CLIENT_KEY_PASSWORD_FILE",
            &format!("{tls}/client-key.password"),
        ),
        user: env_or("CHAPERONE_SCRAM_USER", "chaperone"),
        password_file: env_or(
            "CHAPERONE_SCRAM_PASSWORD_FILE",
            &format!("{tls}/scram.password"),
        ),
    }
}

/// Runs `dev/stack` with `args`, such as `["stop-postgres"]` or `["stop-mirror", "regional"]`,
/// and fails unless it succeeds.
pub fn dev_stack(args: &[&str]) -> anyhow::Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dev/stack");
    let cmd = args.join(" ");
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .with_context(|| format!("running dev/stack {cmd}"))?;
    ensure!(status.success(), "dev/stack {cmd} failed: {status}");
    Ok(())
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}
