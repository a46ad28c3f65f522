//! Kafka clients: the consumer and transactional producer configurations (user properties
//! first, safety-critical ones forced after them and logged, the result logged with secrets
//! redacted) and audit topic creation, which is also where a cluster that refuses our
//! credentials is noticed at start-up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chaperone_daemon_support::kafka::client_config;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// librdkafka waits this long (default 1 s) before fetching again for a partition whose
/// local queue was full. An auditor drains its queue faster than that, and would then sit
/// idle for the rest of the second: with the default a consumer reads ~200-300k messages/s
/// on loopback, with 10 ms over 1M. Users can still override it.
pub const FETCH_QUEUE_BACKOFF: (&str, &str) = ("fetch.queue.backoff.ms", "10");

/// The consumer configuration. Forced: no auto commit, no auto offset store,
/// `read_committed` isolation, the configured group and bootstrap servers.
pub fn consumer_config(c: &Config) -> ClientConfig {
    let defaults = [
        ("auto.offset.reset", "earliest".to_owned()),
        (
            "statistics.interval.ms",
            ms(c.flush_interval.min(Duration::from_secs(5))),
        ),
        ("enable.partition.eof", "false".to_owned()),
        (FETCH_QUEUE_BACKOFF.0, FETCH_QUEUE_BACKOFF.1.to_owned()),
    ];
    let forced = [
        ("bootstrap.servers", c.bootstrap_servers.clone()),
        ("group.id", c.group_id.clone()),
        ("enable.auto.commit", "false".to_owned()),
        ("enable.auto.offset.store", "false".to_owned()),
        ("isolation.level", "read_committed".to_owned()),
    ];
    tracing::info!(
        "consumer forces enable.auto.commit=false, enable.auto.offset.store=false, isolation.level=read_committed"
    );
    client_config(
        "consumer",
        &c.cluster,
        &defaults,
        &[&c.kafka, &c.kafka_consumer],
        &forced,
    )
}

/// The transactional producer configuration. Forced: idempotence, `acks=all`, the
/// transactional id and transaction timeout, the bootstrap servers.
pub fn producer_config(c: &Config) -> ClientConfig {
    let defaults = [
        ("linger.ms", "1".to_owned()),
        // A transaction started right after the previous commit may be told
        // CONCURRENT_TRANSACTIONS while its markers are written; retry quickly (as the Java
        // client does) instead of after librdkafka's default 100 ms.
        ("retry.backoff.ms", "10".to_owned()),
        // Audit records are checked by commit_transaction; no per-record reports needed.
        ("delivery.report.only.error", "true".to_owned()),
        ("compression.type", "lz4".to_owned()),
    ];
    let forced = [
        ("bootstrap.servers", c.bootstrap_servers.clone()),
        ("transactional.id", c.transactional_id()),
        ("transaction.timeout.ms", ms(c.transaction_timeout)),
        ("enable.idempotence", "true".to_owned()),
        ("acks", "all".to_owned()),
    ];
    tracing::info!(
        transactional_id = %c.transactional_id(),
        "producer forces enable.idempotence=true, acks=all and a transactional id"
    );
    client_config(
        "producer",
        &c.cluster,
        &defaults,
        &[&c.kafka, &c.kafka_producer],
        &forced,
    )
}

/// Whether the consumer resets to the end of a partition that has no committed offset.
pub fn resets_to_end(c: &Config) -> bool {
    let reset = c
        .kafka_consumer
        .get("auto.offset.reset")
        .or_else(|| c.kafka.get("auto.offset.reset"))
        .map(|s| s.to_ascii_lowercase());
    matches!(reset.as_deref(), Some("latest" | "largest" | "end"))
}

/// librdkafka callbacks of the start-up probe: client errors are logged, naming the
/// cluster, and the first one that retrying cannot cure (credentials the cluster refuses, a
/// TLS handshake that fails) is kept.
#[derive(Debug)]
struct ProbeContext {
    cluster: String,
    refused: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if matches!(
            code,
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            let mut first = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| reason.to_owned());
        } else {
            tracing::warn!(cluster = %self.cluster, %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// How long one metadata request of the probe may take before it is sent again.
const PROBE_STEP: Duration = Duration::from_millis(500);
/// How long the probe serves librdkafka's events between two requests.
const PROBE_POLL: Duration = Duration::from_millis(100);

/// Asks the cluster for its metadata until it answers, failing at once, naming the cluster,
/// when it refuses our credentials or TLS settings, or after `kafka_timeout` when it cannot
/// be reached. The service's first contact with the cluster: a wrong password is an error
/// that says so at start-up, not a silent wait. Blocking; run it off the async runtime.
pub fn probe_cluster(c: &Config) -> anyhow::Result<()> {
    let cluster = format!("`{}` ({})", c.cluster, c.bootstrap_servers);
    let cfg = client_config(
        "probe",
        &c.cluster,
        &[],
        &[&c.kafka],
        &[("bootstrap.servers", c.bootstrap_servers.clone())],
    );
    let context = ProbeContext {
        cluster: c.cluster.clone(),
        refused: Mutex::new(None),
    };
    let probe: BaseProducer<ProbeContext> = cfg
        .create_with_context(context)
        .with_context(|| format!("cannot create a kafka client for cluster {cluster}"))?;
    let deadline = Instant::now() + c.kafka_timeout;
    loop {
        let answer = probe.client().fetch_metadata(None, PROBE_STEP);
        // Serves the error callbacks and log lines queued meanwhile (one event per poll
        // call would fall behind librdkafka's debug logging).
        probe.poll(PROBE_POLL);
        let last = match answer {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let refused = probe
            .context()
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(reason) = refused {
            anyhow::bail!(
                "kafka cluster {cluster} refused the connection (check the SASL and TLS \
                 settings and secrets in `kafka`): {reason}"
            );
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "kafka cluster {cluster} did not answer within kafka_timeout ({:?}): {last}",
                c.kafka_timeout
            );
        }
    }
}

/// Creates the audit topic when it does not exist, after [`probe_cluster`] found the
/// cluster answering.
pub async fn ensure_audit_topic(c: &Config) -> anyhow::Result<()> {
    let cluster = format!("`{}` ({})", c.cluster, c.bootstrap_servers);
    let probed = c.clone();
    tokio::task::spawn_blocking(move || probe_cluster(&probed))
        .await
        .context("the kafka probe panicked")??;
    let mut cfg = client_config(
        "admin",
        &c.cluster,
        &[],
        &[&c.kafka],
        &[("bootstrap.servers", c.bootstrap_servers.clone())],
    );
    cfg.set("socket.timeout.ms", ms(c.kafka_timeout));
    let admin: AdminClient<DefaultClientContext> = cfg
        .create()
        .with_context(|| format!("cannot create the kafka admin client of cluster {cluster}"))?;
    let topic = NewTopic::new(
        &c.audit_topic,
        c.audit_topic_partitions,
        TopicReplication::Fixed(c.audit_topic_replication),
    );
    let opts = AdminOptions::new().operation_timeout(Some(c.kafka_timeout));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .with_context(|| {
            format!(
                "cannot create the audit topic {} on cluster {cluster}",
                c.audit_topic
            )
        })?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "created the audit topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "audit topic exists");
            }
            Err((name, code)) => {
                anyhow::bail!("cannot create the audit topic {name} on cluster {cluster}: {code}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let mut c = Config::from_toml(
            "cluster = \"r\"\ndatacenter = \"dc\"\nbootstrap_servers = \"127.0.0.1:1\"\ngroup_id = \"g\"\ninstance = \"i\"\nhost = \"h\"\n",
        )
        .expect("parses");
        c.kafka.insert("enable.auto.commit".into(), "true".into());
        c.kafka
            .insert("isolation.level".into(), "read_uncommitted".into());
        c.kafka.insert("fetch.max.bytes".into(), "1234".into());
        c.kafka_producer
            .insert("enable.idempotence".into(), "false".into());
        c
    }

    #[test]
    fn safety_critical_settings_win_over_user_overrides() {
        let c = cfg();
        let consumer = consumer_config(&c);
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(consumer.get("fetch.max.bytes"), Some("1234"));
        assert_eq!(consumer.get("group.id"), Some("g"));
        let producer = producer_config(&c);
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("transactional.id"), Some("chaperone-g-h-i"));
        assert_eq!(producer.get("acks"), Some("all"));
    }

    #[test]
    fn reset_policy() {
        let mut c = cfg();
        assert!(!resets_to_end(&c));
        c.kafka_consumer
            .insert("auto.offset.reset".into(), "latest".into());
        assert!(resets_to_end(&c));
    }
}
