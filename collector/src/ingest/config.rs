//! The ingest stage's configuration: the clusters whose audit topics are read (`[[clusters]]`)
//! and batching, buffering and retries (`[ingest]`); validated by [`crate::Config::validate`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

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
    /// ([`crate::Config::resolve_secret_refs`]), so secrets stay out of the file.
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
    /// How long a dead letter that Kafka keeps failing to acknowledge (broker away, a topic
    /// being created) is sent again before it is parked in PostgreSQL instead. A dead letter
    /// Kafka refuses outright (too large, no such topic, no ACL) is parked at once. Bounds how
    /// long one rejected record can hold ingest up.
    #[serde(with = "chaperone_audit::duration")]
    pub dlq_park_after: Duration,
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
            dlq_park_after: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
