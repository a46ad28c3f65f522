//! Topics on the stack's clusters: creating them, waiting until they exist (MirrorMaker's
//! copies appear on its refresh interval) and reading where their partitions end.

use std::time::Duration;

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::eventually;

/// Creates `topic` with `partitions` partitions on the cluster at `bootstrap`.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", bootstrap);
    create_topics(&client, &[(topic, partitions)]).await
}

/// Creates every `(topic, partitions)` of `topics` through a client made of `client`, such
/// as one of a secured listener.
pub async fn create_topics(client: &ClientConfig, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let bootstrap = client.get("bootstrap.servers").unwrap_or("?").to_owned();
    let admin: AdminClient<DefaultClientContext> =
        client.create().context("creating admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|&(t, p)| NewTopic::new(t, p, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("creating topics {topics:?} on {bootstrap}"))?;
    for r in results {
        if let Err((name, code)) = r {
            bail!("creating topic {name} on {bootstrap} failed: {code}");
        }
    }
    Ok(())
}

/// Waits until every topic of `names` exists on the cluster at `bootstrap`, failing after
/// `timeout`.
pub async fn wait_for_topics(
    bootstrap: &str,
    names: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    eventually(&format!("topics {names:?}"), timeout, || async {
        let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        Ok(names
            .iter()
            .all(|n| md.topics().iter().any(|t| t.name() == n))
            .then_some(()))
    })
    .await
}

/// End offsets (high watermarks) of partitions `0..partitions` of `topic` on the cluster at
/// `bootstrap`. Blocks: call it from `spawn_blocking` where that matters.
pub fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            Ok(high)
        })
        .collect()
}
