//! Kafka clients: the consumer and transactional producer configurations (user properties
//! first, safety-critical ones forced after them and logged) and audit topic creation.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

/// Property names whose values are never logged.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("key") || k.contains("jaas")
}

/// Builds a client configuration: `defaults`, then the user's `layers` in order, then
/// `forced`. Every forced value that replaced a user value is logged at WARN, the others at
/// DEBUG.
fn layered(
    client: &str,
    defaults: &[(&str, String)],
    layers: &[&BTreeMap<String, String>],
    forced: &[(&str, String)],
) -> ClientConfig {
    let mut props: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in defaults {
        props.insert((*k).to_owned(), v.clone());
    }
    for layer in layers {
        for (k, v) in layer.iter() {
            props.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in forced {
        match props.get(*k) {
            Some(user) if user != v => {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    user.as_str()
                };
                tracing::warn!(
                    client,
                    property = *k,
                    configured = shown,
                    forced = %if is_secret(k) { "<redacted>" } else { v.as_str() },
                    "overriding a safety-critical kafka property"
                );
            }
            _ => tracing::debug!(client, property = *k, "forcing kafka property"),
        }
        props.insert((*k).to_owned(), v.clone());
    }
    let mut cfg = ClientConfig::new();
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg
}

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
    layered(
        "consumer",
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
    layered(
        "producer",
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

/// Creates the audit topic when it does not exist.
pub async fn ensure_audit_topic(c: &Config) -> anyhow::Result<()> {
    let mut cfg = layered(
        "admin",
        &[],
        &[&c.kafka],
        &[("bootstrap.servers", c.bootstrap_servers.clone())],
    );
    cfg.set("socket.timeout.ms", ms(c.kafka_timeout));
    let admin: AdminClient<DefaultClientContext> = cfg
        .create()
        .context("cannot create the kafka admin client")?;
    let topic = NewTopic::new(
        &c.audit_topic,
        c.audit_topic_partitions,
        TopicReplication::Fixed(c.audit_topic_replication),
    );
    let opts = AdminOptions::new().operation_timeout(Some(c.kafka_timeout));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .context("cannot create the audit topic")?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "created the audit topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "audit topic exists");
            }
            Err((name, code)) => {
                anyhow::bail!("cannot create the audit topic {name}: {code}");
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
