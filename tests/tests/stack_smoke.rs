//! Proves the stack the other tests stand on: a message produced to the regional cluster is
//! mirrored to the aggregate one by MirrorMaker 2, and a row round-trips through PostgreSQL.

use std::time::Duration;

use chaperone_test_support::{
    aggregate_bootstrap, create_topic, database_url, eventually, regional_bootstrap, unique,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test]
async fn regional_messages_are_mirrored_to_aggregate() -> anyhow::Result<()> {
    let topic = unique("smoke");
    create_topic(&regional_bootstrap(), &topic, 2).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("enable.idempotence", "true")
        .create()?;
    let sent: Vec<String> = (0..10).map(|i| format!("message-{i}")).collect();
    for payload in &sent {
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let mirrored = format!("regional.{topic}");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", aggregate_bootstrap())
        .set("group.id", unique("smoke"))
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()?;
    // The mirrored topic appears once MirrorMaker 2 refreshes its topic list.
    eventually(
        "the mirrored topic on aggregate",
        Duration::from_secs(90),
        || async {
            let md = consumer.fetch_metadata(Some(&mirrored), Duration::from_secs(5))?;
            Ok(md
                .topics()
                .iter()
                .any(|t| t.name() == mirrored && !t.partitions().is_empty())
                .then_some(()))
        },
    )
    .await?;
    consumer.subscribe(&[&mirrored])?;
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while received.len() < sent.len() {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} of {} messages mirrored",
                    received.len(),
                    sent.len()
                )
            })??;
        received.push(String::from_utf8(
            msg.payload().unwrap_or_default().to_vec(),
        )?);
    }
    received.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(received, expected);
    Ok(())
}

#[tokio::test]
async fn postgres_round_trips_a_row() -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&database_url()).await?;
    let mut tx = pool.begin().await?;
    let table = unique("smoke").replace('-', "_");
    sqlx::query(&format!(
        "CREATE TEMP TABLE {table} (id BIGINT PRIMARY KEY, body TEXT NOT NULL)"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("INSERT INTO {table} (id, body) VALUES ($1, $2)"))
        .bind(42_i64)
        .bind("chaperone")
        .execute(&mut *tx)
        .await?;
    let (id, body): (i64, String) = sqlx::query_as(&format!("SELECT id, body FROM {table}"))
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!((id, body.as_str()), (42, "chaperone"));
    tx.rollback().await?;
    Ok(())
}
