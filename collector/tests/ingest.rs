//! Ingest against the real stack: duplicates, dead letters, progress marks.

mod ingest_support;

use std::time::Duration;

use chaperone_audit::AuditRecord;
use chaperone_collector::store;
use ingest_support::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_ignored() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topics = Topics::create(3).await?;
    let prefix = unique("dup");
    let records = mixed_records(&prefix, 600);
    // The first 150 again (a producer retrying), plus repeats of one id within what will be
    // one batch.
    let mut sent = records.clone();
    sent.extend_from_slice(&records[..150]);
    sent.extend(std::iter::repeat_n(records[599].clone(), 5));
    let progress: Vec<AuditRecord> = (0..30)
        .map(|i| {
            AuditRecord::Progress(progress(
                &format!("{prefix}-p{i}"),
                "orders-0",
                i % 2,
                BUCKET + 1_000 * i64::from(i),
                i64::from(i),
            ))
        })
        .collect();
    sent.extend(progress.iter().cloned());
    sent.extend(progress.iter().cloned());
    produce(&topics, &encode_all(&sent)).await?;

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;

    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&records));
    let ids: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_record_seen")
        .fetch_one(&db.pool)
        .await?;
    // Ids of counts records only: progress records need no duplicate filter.
    assert_eq!(ids, 600);
    // Progress keeps the furthest marks of each partition.
    let marks: Vec<(i32, i64, Option<i64>)> = sqlx::query_as(
        "SELECT partition, watermark_ms, position FROM audit_progress ORDER BY partition",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        marks,
        vec![
            (0, BUCKET + 28_000, Some(28)),
            (1, BUCKET + 29_000, Some(29))
        ]
    );
    let dup = metric(
        &collector.registry,
        "chaperone_collector_records_duplicate_total",
        None,
    );
    // Repeated progress records are applied again (a no-op), not counted as duplicates.
    assert_eq!(dup, (150 + 5) as f64);
    let counted = metric(
        &collector.registry,
        "chaperone_collector_records_ingested_total",
        Some(("kind", "counts")),
    );
    assert_eq!(counted, 600.0);

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_records_all_reach_the_dlq() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topics = Topics::create(2).await?;
    let prefix = unique("bad");
    let good = mixed_records(&prefix, 200);
    let valid = encode_all(&good);
    let mut payloads = Vec::new();
    let mut expected_reasons = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..10_000usize {
        let (reason, p): (&str, Vec<u8>) = match i % 4 {
            0 => ("json", format!("not json {i}").into_bytes()),
            1 => ("unsupported_version", br#"{"version": 7}"#.to_vec()),
            2 => {
                // A valid record with a negative count.
                let mut v: serde_json::Value = serde_json::from_slice(&valid[i % valid.len()])?;
                v["count"] = serde_json::json!(-1);
                v["id"] = serde_json::json!(format!("{prefix}-neg-{i}"));
                ("negative", serde_json::to_vec(&v)?)
            }
            _ => {
                let mut v: serde_json::Value = serde_json::from_slice(&valid[i % valid.len()])?;
                v.as_object_mut().expect("object").remove("topic");
                ("missing_field", serde_json::to_vec(&v)?)
            }
        };
        *expected_reasons.entry(reason).or_default() += 1;
        payloads.push(p);
        if i % 50 == 0 {
            payloads.push(valid[i / 50].clone());
        }
    }
    produce(&topics, &payloads).await?;

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(90)).await?;
    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&good));
    assert!(!collector.task.is_finished(), "the collector kept running");
    for (reason, n) in &expected_reasons {
        let got = metric(
            &collector.registry,
            "chaperone_collector_records_rejected_total",
            Some(("reason", reason)),
        );
        assert_eq!(got, *n as f64, "rejected with reason {reason}");
    }
    let ready = reqwest::get(collector.url("/readyz")).await?;
    assert_eq!(ready.status(), 200);

    // Every rejected record is on the dead-letter topic with its reason.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[&topics.dlq])?;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while total < 10_000 {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {total} dead letters after 60 s"))??;
        let headers = m.headers().expect("dead letters carry headers");
        let reason = headers
            .iter()
            .find(|h| h.key == "chaperone-dlq-reason")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("reason header");
        assert!(
            headers.iter().any(|h| h.key == "chaperone-dlq-error"),
            "error header"
        );
        assert!(m.payload().is_some_and(|p| !p.is_empty()));
        *seen.entry(reason).or_default() += 1;
        total += 1;
    }
    let expected: std::collections::BTreeMap<String, usize> = expected_reasons
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    assert_eq!(seen, expected);

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_buckets_in_small_batches() -> anyhow::Result<()> {
    use chaperone_collector::store;
    let db = TestDb::create().await?;
    let prefix = unique("ret");
    // 25 rows in an old bucket, 5 in a recent one.
    let old = BUCKET - 40 * 86_400_000;
    let mut records: Vec<AuditRecord> = (0..25)
        .map(|i| {
            AuditRecord::Counts(counts(
                &format!("{prefix}-old-{i}"),
                "orders",
                Some(i),
                old,
                observer(chaperone_audit::Tier::Producer, "dc1", "h"),
                &[1, 2],
            ))
        })
        .collect();
    records.extend((0..5).map(|i| {
        AuditRecord::Counts(counts(
            &format!("{prefix}-new-{i}"),
            "orders",
            Some(i),
            BUCKET,
            observer(chaperone_audit::Tier::Producer, "dc1", "h"),
            &[1, 2],
        ))
    }));
    store::write_batch(&db.pool, &records, &[]).await?;
    let cutoff_ms = BUCKET - 30 * 86_400_000;
    let far_past =
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(cutoff_ms).expect("timestamp");
    let out = store::delete_expired(&db.pool, cutoff_ms, far_past, 4).await?;
    assert_eq!(out.counts, 25);
    // Ids, changes, progress and topics were all touched just now: kept.
    assert_eq!(
        (out.record_ids, out.changes, out.progress, out.topics),
        (0, 0, 0, 0)
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT bucket_start_ms FROM audit_counts")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(left, vec![BUCKET; 5]);
    db.drop_db().await
}

/// Ids stored as text before `0013_ingest_write_path.sql` are still recognised afterwards:
/// the migration converts them with the same rule as `store::record_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_stored_before_the_uuid_migration_still_filter_duplicates() -> anyhow::Result<()> {
    let db = TestDb::create_empty().await?;
    for sql in [
        include_str!("../../migrations/0001_ingest_store.sql"),
        include_str!("../../migrations/0010_reconcile_verdicts.sql"),
        include_str!("../../migrations/0011_alert_outbox.sql"),
        include_str!("../../migrations/0012_alert_indexes.sql"),
    ] {
        sqlx::raw_sql(sql).execute(&db.pool).await?;
    }
    let prefix = unique("upgrade");
    let ids = [
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string().to_uppercase(),
        format!("{prefix}-plain"),
        "ünïcödé-id".to_owned(),
    ];
    for id in &ids {
        sqlx::query("INSERT INTO audit_record_ids (id, kind) VALUES ($1, 'counts')")
            .bind(id)
            .execute(&db.pool)
            .await?;
    }
    sqlx::query("INSERT INTO audit_record_ids (id, kind) VALUES ($1, 'progress')")
        .bind(format!("{prefix}-progress"))
        .execute(&db.pool)
        .await?;
    sqlx::raw_sql(include_str!("../../migrations/0013_ingest_write_path.sql"))
        .execute(&db.pool)
        .await?;

    let mut stored: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM audit_record_seen")
        .fetch_all(&db.pool)
        .await?;
    stored.sort();
    let mut expected: Vec<uuid::Uuid> = ids.iter().map(|id| store::record_key(id)).collect();
    expected.sort();
    assert_eq!(stored, expected);
    // The uppercase form is not canonical: hashed, not parsed.
    assert_ne!(store::record_key(&ids[1]), uuid::Uuid::parse_str(&ids[1])?);

    let again: Vec<AuditRecord> = ids
        .iter()
        .map(|id| {
            AuditRecord::Counts(counts(
                id,
                "orders",
                Some(0),
                BUCKET,
                observer(chaperone_audit::Tier::Producer, "dc1", "h"),
                &[1, 2],
            ))
        })
        .collect();
    let out = store::write_batch(&db.pool, &again, &[]).await?;
    assert_eq!((out.counts, out.duplicates), (0, ids.len()));
    db.drop_db().await
}
