//! Cross-component integration and end-to-end tests. They run against the real stack
//! started by `dev/stack up` (two Apache Kafka clusters, MirrorMaker 2, PostgreSQL) and
//! fail, never skip, when it is not there.
//!
//! This library holds what the tests in `tests/tests/` share: the stack's addresses, unique
//! names, topic creation and polling with a deadline; [`pipeline`] runs the daemons and a
//! webhook receiver in the test process.

pub mod pipeline;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

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

/// URL of the project's PostgreSQL database.
pub fn database_url() -> String {
    env_or(
        "DATABASE_URL",
        "postgres://chaperone:chaperone@127.0.0.1:55432/chaperone",
    )
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// A name no other test uses: `<prefix>-<uuid>`, valid as a topic, group or schema suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates `topic` with `partitions` partitions on the cluster at `bootstrap`.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("creating topic {topic} on {bootstrap}"))?;
    for r in results {
        if let Err((name, code)) = r {
            bail!("creating topic {name} on {bootstrap} failed: {code}");
        }
    }
    Ok(())
}

/// Polls `check` until it returns `Some`, failing with `what` once `timeout` has passed.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A database of its own for one test, with the project's migrations applied. Dropped by
/// [`TestDb::drop_db`] when the test passed; a failed test leaves it behind for inspection.
#[derive(Debug)]
pub struct TestDb {
    /// Name of the database.
    pub name: String,
    /// Pool connected to it.
    pub pool: sqlx::PgPool,
    admin: sqlx::PgPool,
}

impl TestDb {
    /// Creates `chaperone_test_<random>` and applies `migrations/`.
    pub async fn create() -> anyhow::Result<Self> {
        let admin = sqlx::PgPool::connect(&database_url())
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", database_url()))?;
        let name = unique("chaperone_test").replace('-', "_");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = db_url(&name)?;
        let pool = sqlx::PgPool::connect(&url).await?;
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .context("applying migrations")?;
        Ok(Self { name, pool, admin })
    }

    /// URL of this database.
    pub fn url(&self) -> anyhow::Result<String> {
        db_url(&self.name)
    }

    /// Drops the database.
    pub async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await?;
        Ok(())
    }
}

fn db_url(name: &str) -> anyhow::Result<String> {
    let base = database_url();
    let (server, _) = base
        .rsplit_once('/')
        .with_context(|| format!("DATABASE_URL {base} names no database"))?;
    Ok(format!("{server}/{name}"))
}
