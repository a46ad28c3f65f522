//! The audit pipeline on a secured cluster: an `AuditedProducer`, a chaperone-service and the
//! collector talk to the regional cluster through its SASL_SSL listener only (SCRAM-SHA-512,
//! TLS with the stack's CA, a client certificate whose key is encrypted), reading their
//! passwords from files (`${file:…}` in the daemons' configurations). The producer->regional
//! edge is judged `complete` with the exact counts; a wrong password makes chaperone-service
//! fail at start-up and the collector log an error, both naming the cluster, within seconds.
//!
//! Every log line of the test process is captured at DEBUG, librdkafka's own `conf` and
//! `security` debug output included, and searched for the passwords: none may appear.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use chaperone_test_support::{
    SecureListener, TestDb, create_topics, eventually, secure_listener, unique,
};
use chaperone_tests::pipeline::{Daemons, collector_toml};
use chaperone_tests::producer::TestProducer;
use chaperone_tests::verdicts::{edge_totals, verdicts};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 2_000;
const EDGE: &str = "producer->regional";
/// librdkafka's own debug contexts, on in every client: `conf` dumps each client's
/// configuration when it is created, `security` traces the TLS and SASL exchanges.
const LIBRDKAFKA_DEBUG: &str = "conf,security";

// ---------------------------------------------------------------- log capture --

/// Everything the test process logged.
fn log_buffer() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(Mutex::default)
}

struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every tracing event and `log` record (librdkafka's, through rdkafka) at DEBUG.
fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(|| CaptureWriter)
        .try_init();
}

fn captured() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// Fails when any captured line holds one of `secrets`, naming the line (with the secret
/// masked).
fn assert_no_secret_logged(secrets: &[&str]) -> anyhow::Result<()> {
    let logs = captured();
    ensure!(
        !logs.is_empty(),
        "nothing was captured: the log check would prove nothing"
    );
    for line in logs.lines() {
        for secret in secrets {
            ensure!(
                !line.contains(secret),
                "a secret was logged: {}",
                line.replace(secret, "<SECRET>")
            );
        }
    }
    Ok(())
}

fn last_lines(n: usize) -> String {
    let logs = captured();
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ------------------------------------------------------------- configurations --

fn read_secret(path: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} (made by dev/stack up)"))?;
    let secret = text.trim_end_matches('\n').to_owned();
    ensure!(!secret.is_empty(), "{path} is empty");
    Ok(secret)
}

/// librdkafka properties of a client of the secured listener, as a program holding its
/// secrets in memory sets them.
fn client_config(s: &SecureListener) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &s.bootstrap)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", &s.user)
        .set("sasl.password", read_secret(&s.password_file)?)
        .set("ssl.ca.location", &s.ca)
        .set("ssl.certificate.location", &s.client_cert)
        .set("ssl.key.location", &s.client_key)
        .set(
            "ssl.key.password",
            read_secret(&s.client_key_password_file)?,
        )
        .set("debug", LIBRDKAFKA_DEBUG);
    Ok(cfg)
}

/// The same properties as a daemon's TOML table, passwords as `${file:…}` references.
fn librdkafka_toml(s: &SecureListener, password_file: &str) -> String {
    format!(
        r#""security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{user}"
"sasl.password" = "${{file:{password_file}}}"
"ssl.ca.location" = "{ca}"
"ssl.certificate.location" = "{cert}"
"ssl.key.location" = "{key}"
"ssl.key.password" = "${{file:{key_password_file}}}"
"debug" = "{LIBRDKAFKA_DEBUG}"
"#,
        user = s.user,
        ca = s.ca,
        cert = s.client_cert,
        key = s.client_key,
        key_password_file = s.client_key_password_file,
    )
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// A regional-tier chaperone-service of `cluster` on the secured listener.
fn service_config(
    s: &SecureListener,
    id: &str,
    cluster: &str,
    topic: &str,
    audit_topic: &str,
    password_file: &str,
) -> anyhow::Result<chaperone_service::Config> {
    let toml = format!(
        r#"
tier = "regional"
cluster = "{cluster}"
datacenter = "regional"
instance = "secured-1"
bootstrap_servers = "{bootstrap}"
group_id = "{id}"
audit_topic = "{audit_topic}"
bucket_width = "10s"
flush_interval = "1s"
kafka_timeout = "30s"
http_addr = "127.0.0.1:0"

[topics]
include = ['^{topic}$']
refresh_interval = "2s"

[kafka]
{librdkafka}"#,
        bootstrap = s.bootstrap,
        librdkafka = librdkafka_toml(s, password_file),
    );
    let mut config = chaperone_service::Config::from_toml(&toml)?;
    config.resolve_secret_refs(env)?;
    Ok(config)
}

/// A collector reading the audit topic of the secured listener as cluster `alias`, judging
/// the producer->regional edge only.
fn collector_config(
    s: &SecureListener,
    db_url: &str,
    alias: &str,
    audit_topic: &str,
    password_file: &str,
) -> anyhow::Result<chaperone_collector::Config> {
    let cluster = collector_toml(db_url, &[(alias, &s.bootstrap)], audit_topic);
    let toml = format!(
        r#"{cluster}
[clusters.librdkafka]
{librdkafka}
[ingest]
linger = "200ms"
partition_refresh = "2s"

[reconcile]
interval = "1s"
allowed_lateness = "2s"
settle = "2s"
max_wait = "90s"
tiers = ["producer", "regional"]

[[reconcile.edges]]
from = "producer"
to = "regional"
per_datacenter = true

[alerts]
poll_interval = "500ms"
"#,
        librdkafka = librdkafka_toml(s, password_file),
    );
    let mut config = chaperone_collector::Config::from_toml(&toml)?;
    config.resolve_secret_refs(env)?;
    Ok(config)
}

// ----------------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_counts_exactly_over_sasl_ssl_and_logs_no_secret() -> anyhow::Result<()> {
    capture_logs();
    let s = secure_listener();
    let id = unique("secured");
    let topic = format!("{id}-orders");
    let audit_topic = format!("{id}-audit");
    create_topics(&client_config(&s)?, &[(&topic, 3), (&audit_topic, 1)])
        .await
        .context("creating topics through the secured listener")?;

    let db = TestDb::create().await?;
    let alias = format!("{id}-regional");
    let collector = collector_config(&s, &db.url, &alias, &audit_topic, &s.password_file)?;
    let service = service_config(&s, &id, "regional", &topic, &audit_topic, &s.password_file)?;
    let mut daemons = Daemons::new();
    daemons.collector(collector, &db.pool).await?;
    daemons.service(service, chaperone_service::Deps::default());
    let outcome = produce_and_judge(&s, &db, &topic, &audit_topic).await;
    let stopped = daemons.stop().await;
    if outcome.is_err() || stopped.is_err() {
        eprintln!("last log lines:\n{}", last_lines(80));
    }
    outcome?;
    stopped?;

    // Each component logged its effective client properties, secrets redacted...
    let logs = captured();
    // The daemons log through chaperone-daemon-support, naming the client.
    let daemons = "chaperone_daemon_support::kafka: kafka client properties";
    for (component, marker, client) in [
        (
            "audit-lib",
            "chaperone_audit::reporter: audit producer kafka properties",
            "",
        ),
        ("chaperone-service", daemons, "client=\"consumer\""),
        ("collector", daemons, "client=\"audit consumer\""),
    ] {
        ensure!(
            logs.lines().any(|l| l.contains(marker)
                && l.contains(client)
                && l.contains("\"sasl.password\": \"<redacted>\"")
                && l.contains("\"ssl.key.password\": \"<redacted>\"")),
            "{component} logged no client properties with redacted passwords"
        );
    }
    // ...and librdkafka dumped the configuration of its clients: the check below covers it.
    ensure!(
        logs.lines()
            .any(|l| l.contains("librdkafka") && l.contains("sasl.password")),
        "no librdkafka configuration dump was captured"
    );
    // No password anywhere, at DEBUG.
    assert_no_secret_logged(&[
        &read_secret(&s.password_file)?,
        &read_secret(&s.client_key_password_file)?,
    ])?;
    db.drop_db().await
}

async fn produce_and_judge(
    s: &SecureListener,
    db: &TestDb,
    topic: &str,
    audit_topic: &str,
) -> anyhow::Result<()> {
    let mut kafka = client_config(s)?;
    kafka.set("linger.ms", "5");
    let producer = TestProducer::new(&kafka, audit_topic, &prometheus::Registry::new())?;
    producer.send_numbered(&[topic], MESSAGES, None).await?;
    let stats = producer.shutdown().await;
    ensure!(
        stats.acked == MESSAGES as u64,
        "not every message was acknowledged: {stats:?}"
    );

    let n = MESSAGES as i64;
    let judged = eventually(
        "producer->regional verdicts covering every message",
        Duration::from_secs(180),
        || async {
            let rows = verdicts(&db.pool, topic).await?;
            Ok((edge_totals(&rows, EDGE) == (n, n)).then_some(rows))
        },
    )
    .await?;
    ensure!(
        judged.iter().all(|r| r.0 == EDGE && r.1 == "complete"),
        "expected only complete {EDGE} verdicts, got {judged:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_is_an_error_naming_the_cluster_not_a_hang() -> anyhow::Result<()> {
    capture_logs();
    let s = secure_listener();
    let id = unique("badpw");
    let wrong = format!("wrong-{}", uuid_like(&id));
    let wrong_file = std::env::temp_dir().join(format!("{id}-password"));
    std::fs::write(&wrong_file, format!("{wrong}\n"))?;
    let wrong_file = wrong_file.display().to_string();
    let audit_topic = format!("{id}-audit");

    // chaperone-service: start-up fails, naming its cluster, well before kafka_timeout (30 s).
    let cluster = format!("{id}-regional");
    let service = service_config(&s, &id, &cluster, "none", &audit_topic, &wrong_file)?;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        chaperone_service::run(
            service,
            chaperone_service::Deps::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .context("chaperone-service still running 60 s after start with a wrong password")?;
    let service_took = started.elapsed();
    let err = match result {
        Ok(()) => anyhow::bail!("chaperone-service ran with a wrong password"),
        Err(e) => format!("{e:#}"),
    };
    if !(err.contains(&format!("`{cluster}`")) && err.contains("Authentication failed")) {
        eprintln!("last log lines:\n{}", last_lines(80));
    }
    ensure!(
        err.contains(&format!("`{cluster}`")) && err.contains("Authentication failed"),
        "the error does not name the cluster and the refusal: {err}"
    );
    ensure!(
        service_took < Duration::from_secs(15),
        "chaperone-service took {service_took:?} to give up: it waited instead of failing"
    );

    // The collector: an ERROR naming the cluster, and it still stops when asked.
    let db = TestDb::create().await?;
    let alias = format!("{id}-secure");
    let collector = collector_config(&s, &db.url, &alias, &audit_topic, &wrong_file)?;
    let mut daemons = Daemons::new();
    let started = Instant::now();
    daemons.collector(collector, &db.pool).await?;
    let error_line = eventually(
        "the collector's error naming the cluster",
        Duration::from_secs(30),
        || async {
            Ok(captured()
                .lines()
                .find(|l| {
                    l.contains(" ERROR ")
                        && l.contains(&alias)
                        && l.contains("refused the connection")
                        && l.contains("Authentication failed")
                })
                .map(str::to_owned))
        },
    )
    .await;
    let collector_took = started.elapsed();
    let stopped = daemons.stop().await;
    if error_line.is_err() {
        eprintln!("last log lines:\n{}", last_lines(80));
    }
    let error_line = error_line?;
    stopped.context("the collector did not stop cleanly")?;
    eprintln!(
        "wrong password refused: chaperone-service failed after {service_took:?} with \
         \"{err}\"; the collector logged after {collector_took:?}: {error_line}"
    );

    assert_no_secret_logged(&[&wrong, &read_secret(&s.client_key_password_file)?])?;
    let _ = std::fs::remove_file(&wrong_file);
    db.drop_db().await
}

/// The librdkafka settings of deploy/config's examples, with this stack's address, user,
/// password and CA put in place of the site's, reach the secured listener: the examples
/// name the mechanism, protocol and checks that work, not only ones `--check-config` accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_examples_kafka_settings_log_in() -> anyhow::Result<()> {
    let s = secure_listener();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config");
    let service =
        chaperone_service::Config::from_file(&format!("{deploy}/chaperone-service.toml"))?;
    let collector_text = std::fs::read_to_string(format!("{deploy}/collector.toml"))?;
    let collector = chaperone_collector::Config::from_toml(&collector_text)?;
    let mut tables = vec![(
        "chaperone-service.toml [kafka]".to_owned(),
        service.kafka.clone(),
    )];
    for c in &collector.clusters {
        tables.push((
            format!("collector.toml cluster {} [clusters.librdkafka]", c.alias),
            c.librdkafka.clone(),
        ));
    }
    for (name, mut table) in tables {
        ensure!(
            table.get("security.protocol").map(String::as_str) == Some("SASL_SSL"),
            "{name} does not use SASL_SSL"
        );
        for key in ["sasl.username", "sasl.password", "ssl.ca.location"] {
            ensure!(table.contains_key(key), "{name} has no {key}");
        }
        table.insert("sasl.username".into(), s.user.clone());
        table.insert(
            "sasl.password".into(),
            format!("${{file:{}}}", s.password_file),
        );
        table.insert("ssl.ca.location".into(), s.ca.clone());
        let mut config = chaperone_service::Config {
            cluster: "deploy-example".into(),
            bootstrap_servers: s.bootstrap.clone(),
            kafka_timeout: Duration::from_secs(30),
            kafka: table,
            ..chaperone_service::Config::default()
        };
        config.resolve_secret_refs(env)?;
        tokio::task::spawn_blocking(move || chaperone_service::kafka::probe_cluster(&config))
            .await?
            .with_context(|| format!("the settings of {name} do not log in"))?;
    }
    Ok(())
}

/// A unique, secret-looking suffix taken from a unique name.
fn uuid_like(name: &str) -> &str {
    name.rsplit('-').next().unwrap_or(name)
}
