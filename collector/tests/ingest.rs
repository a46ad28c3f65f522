//! Ingest against the real stack: duplicates, dead letters, progress marks.

mod ingest_support;

use std::time::Duration;

use chaperone_audit::AuditRecord;
use chaperone_collector::store;
use chaperone_test_support::{aggregate_bootstrap, regional_bootstrap};
use ingest_support::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_ignored() -> anyhow::Result<()> {
    let db = ingest_db().await?;
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
    let ids = applied_records(&db.pool).await?;
    // Ids of counts records only: progress records need no duplicate filter.
    assert_eq!(ids, 600);
    // Progress keeps the furthest marks of each partition, and the cluster it arrived through.
    let marks: Vec<(i32, i64, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT partition, watermark_ms, position, source FROM audit_progress ORDER BY partition",
    )
    .fetch_all(&db.pool)
    .await?;
    let via = Some(topics.alias.clone());
    assert_eq!(
        marks,
        vec![
            (0, BUCKET + 28_000, Some(28), via.clone()),
            (1, BUCKET + 29_000, Some(29), via)
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
async fn an_audit_topic_created_again_under_its_stored_offsets_is_read_from_its_start()
-> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(3).await?;
    // The database remembers offsets of the topic's earlier life, past the new log's end
    // (a topic deleted and created again, a cluster rebuilt under a kept database).
    for partition in 0..topics.partitions {
        sqlx::query(
            "INSERT INTO ingest_offsets (cluster, topic, partition, next_offset) \
             VALUES ($1, $2, $3, 5000)",
        )
        .bind(&topics.alias)
        .bind(&topics.audit)
        .bind(partition)
        .execute(&db.pool)
        .await?;
    }
    let records = mixed_records(&unique("again"), 300);
    produce(&topics, &encode_all(&records)).await?;

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    // Every record is stored, and the stored offsets follow the new log.
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;
    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&records));

    collector.stop().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_records_all_reach_the_dlq() -> anyhow::Result<()> {
    let db = ingest_db().await?;
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
    let db = ingest_db().await?;
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
    // Two streams of numbered records; one of them has been idle since before the cutoff.
    let mut streams = [
        chaperone_audit::SequenceIds::new(),
        chaperone_audit::SequenceIds::new(),
    ];
    records.extend(streams.iter_mut().map(|ids| {
        AuditRecord::Counts(counts(
            &ids.next("orders"),
            "orders",
            Some(0),
            BUCKET,
            observer(chaperone_audit::Tier::Producer, "dc1", "h"),
            &[1],
        ))
    }));
    store::write_batch(&db.pool, &records, &[], &[]).await?;
    let cutoff_ms = BUCKET - 30 * 86_400_000;
    let far_past =
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(cutoff_ms).expect("timestamp");
    let idle = chaperone_audit::SequencedId::parse(&streams[0].next("orders")).expect("numbered");
    sqlx::query("UPDATE audit_record_ranges SET updated_at = $1 WHERE stream = $2")
        .bind(far_past - chrono::Duration::days(1))
        .bind(idle.stream as i64)
        .execute(&db.pool)
        .await?;
    let out = store::delete_expired(&db.pool, cutoff_ms, far_past, 4).await?;
    assert_eq!(out.counts, 25);
    assert_eq!(out.record_ranges, 1, "the idle stream's ranges");
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
    let db = TestDb::create_empty_with(pool_options()).await?;
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
    let out = store::write_batch(&db.pool, &again, &[], &[]).await?;
    assert_eq!((out.counts, out.duplicates), (0, ids.len()));
    db.drop_db().await
}

/// Numbered records (audit-lib's ids) arriving out of order, repeated within a batch, across
/// batches and from a second stream of the same topic are each applied exactly once, next to
/// records with other ids; each stream's applied numbers end as one range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_records_are_applied_once_in_any_order() -> anyhow::Result<()> {
    use chaperone_audit::SequenceIds;
    use chaperone_collector::store;
    let db = ingest_db().await?;
    let prefix = unique("numbered");
    let (mut a, mut b) = (SequenceIds::new(), SequenceIds::new());
    let ids_a: Vec<String> = (0..40).map(|_| a.next("orders")).collect();
    let ids_b: Vec<String> = (0..10).map(|_| b.next("orders")).collect();
    let record = |id: &str| sized(id, "orders", 0, 1, 10);
    // Batch 1: a's odd numbers backwards, one of them twice, and b's first half.
    let mut batch1: Vec<AuditRecord> = ids_a
        .iter()
        .skip(1)
        .step_by(2)
        .rev()
        .map(|id| record(id))
        .collect();
    batch1.push(record(&ids_a[5]));
    batch1.extend(ids_b[..5].iter().map(|id| record(id)));
    batch1.push(record(&format!("{prefix}-plain")));
    let out = store::write_batch(&db.pool, &batch1, &[], &[]).await?;
    assert_eq!((out.counts, out.duplicates), (26, 1));
    // Batch 2: everything again, in order, plus what was missing.
    let mut batch2: Vec<AuditRecord> = ids_a.iter().map(|id| record(id)).collect();
    batch2.extend(ids_b.iter().map(|id| record(id)));
    batch2.push(record(&format!("{prefix}-plain")));
    let out = store::write_batch(&db.pool, &batch2, &[], &[]).await?;
    assert_eq!((out.counts, out.duplicates), (25, 26));
    // Batch 3: a replay of all of it changes nothing.
    let out = store::write_batch(&db.pool, &batch2, &[], &[]).await?;
    assert_eq!((out.counts, out.duplicates), (0, 51));

    let count: i64 = sqlx::query_scalar("SELECT sum(count)::int8 FROM audit_counts")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(count, 51, "every record counted once");
    assert_eq!(applied_records(&db.pool).await?, 51);
    let ranges: Vec<String> =
        sqlx::query_scalar("SELECT ranges::text FROM audit_record_ranges ORDER BY 1")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(ranges, vec!["{[1,11)}", "{[1,41)}"]);
    db.drop_db().await
}

/// A counts record of one row (`topic`, producer tier, dc1, `partition`) with exactly
/// `count` messages and `bytes` bytes.
fn sized(id: &str, topic: &str, partition: i32, count: u64, bytes: u64) -> AuditRecord {
    let mut c = counts(
        id,
        topic,
        Some(partition),
        BUCKET,
        observer(chaperone_audit::Tier::Producer, "dc1", "h"),
        &[],
    );
    c.count = count;
    c.bytes = bytes;
    AuditRecord::Counts(c)
}

/// Records whose counts overflow `bigint` once added to what is already stored are
/// dead-lettered with their reason; every record before and after them, on their partition,
/// another partition and another cluster, is stored once, and every offset moves past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_overflowing_its_row_is_dead_lettered_and_ingest_goes_on() -> anyhow::Result<()> {
    const MAX: u64 = chaperone_audit::record::MAX_TOTAL as u64;
    let db = ingest_db().await?;
    let regional = Topics::create(2).await?;
    let aggregate = Topics::create_on("aggregate", &aggregate_bootstrap(), 2).await?;
    let prefix = unique("overflow");
    let id = |what: &str, i: usize| format!("{prefix}-{what}-{i}");

    // Regional partition 0: good records, then 1023 records of 2^53 messages for one row
    // (the most bigint holds in multiples of 2^53), one more (poison), more good records
    // and a small one for the same row, which still fits.
    let before0 = mixed_records(&format!("{prefix}-before0"), 100);
    let after0 = mixed_records(&format!("{prefix}-after0"), 100);
    let counts_poison = sized(&id("count-poison", 0), "big", 0, MAX, 1);
    let mut p0: Vec<AuditRecord> = before0.clone();
    p0.extend((0..1023).map(|i| sized(&id("count", i), "big", 0, MAX, 1)));
    p0.push(counts_poison.clone());
    p0.extend(after0.iter().cloned());
    p0.push(sized(&id("count-small", 0), "big", 0, 5, 5));
    // Regional partition 1: the same with bytes.
    let bytes_poison = sized(&id("bytes-poison", 0), "wide", 1, 1, MAX);
    let mut p1: Vec<AuditRecord> = mixed_records(&format!("{prefix}-before1"), 100);
    p1.extend((0..1023).map(|i| sized(&id("bytes", i), "wide", 1, 1, MAX)));
    p1.push(bytes_poison.clone());
    p1.push(sized(&id("bytes-small", 0), "wide", 1, 1, 7));
    p1.extend(mixed_records(&format!("{prefix}-after1"), 50));
    // The aggregate cluster: good records only.
    let other = mixed_records(&format!("{prefix}-other"), 300);

    produce_to(&regional, 0, &encode_all(&p0)).await?;
    produce_to(&regional, 1, &encode_all(&p1)).await?;
    produce(&aggregate, &encode_all(&other)).await?;

    let mut cfg = config(&db, &regional);
    cfg.clusters.push(aggregate.cluster());
    // Large enough for 1024 records of one row to share a batch.
    cfg.ingest.batch_size = 2_000;
    let collector = InProcess::start(cfg, db.pool.clone(), None).await?;
    wait_caught_up(&db.pool, &regional, Duration::from_secs(120)).await?;
    wait_caught_up(&db.pool, &aggregate, Duration::from_secs(60)).await?;

    let stored: Vec<AuditRecord> = p0
        .iter()
        .chain(&p1)
        .chain(&other)
        .filter(|r| r.id() != counts_poison.id() && r.id() != bytes_poison.id())
        .cloned()
        .collect();
    let totals = stored_totals(&db.pool).await?;
    assert_eq!(totals, expected_totals(&stored));
    let big = (
        "big".to_owned(),
        BUCKET,
        "producer".to_owned(),
        "dc1".to_owned(),
        0,
    );
    assert_eq!(totals[&big], (1023 * (1 << 53) + 5, 1023 + 5, 1024));
    let wide = (
        "wide".to_owned(),
        BUCKET,
        "producer".to_owned(),
        "dc1".to_owned(),
        1,
    );
    assert_eq!(totals[&wide], (1024, 1023 * (1 << 53) + 7, 1024));
    assert_eq!(
        metric(
            &collector.registry,
            "chaperone_collector_records_ingested_total",
            Some(("kind", "counts"))
        ),
        stored.len() as f64
    );
    assert_eq!(
        metric(
            &collector.registry,
            "chaperone_collector_records_rejected_total",
            Some(("reason", "db_out_of_range"))
        ),
        2.0
    );

    let mut letters = dead_letters(
        &regional,
        2,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await?;
    letters.sort_by(|a, b| a.source.cmp(&b.source));
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (letter, (partition, poison)) in letters
        .iter()
        .zip([(0, &counts_poison), (1, &bytes_poison)])
    {
        assert_eq!(letter.reason, "db_out_of_range");
        assert!(letter.error.contains("22003"), "{}", letter.error);
        assert_eq!(
            letter.source,
            format!("regional/{}/{partition}/1123", regional.audit)
        );
        assert_eq!(letter.payload, poison.encode());
    }
    assert!(
        dead_letters(&aggregate, 0, Duration::ZERO, Duration::from_secs(2))
            .await?
            .is_empty()
    );
    assert!(!collector.task.is_finished(), "the collector kept running");
    let ready = reqwest::get(collector.url("/readyz")).await?;
    assert_eq!(ready.status(), 200);

    collector.stop().await?;
    db.drop_db().await
}

/// A string holding NUL cannot be stored in PostgreSQL `text`: the decoder rejects it and
/// the record is dead-lettered with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_nul_in_host_is_dead_lettered() -> anyhow::Result<()> {
    let db = ingest_db().await?;
    let topics = Topics::create(2).await?;
    let prefix = unique("nul");
    let good = mixed_records(&prefix, 100);
    let mut payloads = encode_all(&good[..50]);
    let mut nul_counts: serde_json::Value = serde_json::from_slice(&good[0].encode())?;
    nul_counts["id"] = serde_json::json!(format!("{prefix}-nul-counts"));
    nul_counts["host"] = serde_json::json!("web\u{0}1");
    let nul_progress = AuditRecord::Progress(progress(
        &format!("{prefix}-nul-progress"),
        "orders-0",
        0,
        BUCKET,
        1,
    ));
    let mut nul_progress: serde_json::Value = serde_json::from_slice(&nul_progress.encode())?;
    nul_progress["host"] = serde_json::json!("svc\u{0}");
    let poison = [
        serde_json::to_vec(&nul_counts)?,
        serde_json::to_vec(&nul_progress)?,
    ];
    payloads.extend(poison.iter().cloned());
    payloads.extend(encode_all(&good[50..]));
    produce_to(&topics, 1, &payloads).await?;

    let collector = InProcess::start(config(&db, &topics), db.pool.clone(), None).await?;
    wait_caught_up(&db.pool, &topics, Duration::from_secs(60)).await?;
    assert_eq!(stored_totals(&db.pool).await?, expected_totals(&good));
    let progress_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_progress")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(progress_rows, 0);
    let letters = dead_letters(&topics, 2, Duration::from_secs(30), Duration::from_secs(2)).await?;
    assert_eq!(letters.len(), 2);
    for (letter, (offset, payload)) in letters.iter().zip([(50, &poison[0]), (51, &poison[1])]) {
        assert_eq!(letter.reason, "nul_character");
        assert!(letter.error.contains("`host`"), "{}", letter.error);
        assert_eq!(
            letter.source,
            format!("regional/{}/1/{offset}", topics.audit)
        );
        assert_eq!(&letter.payload, payload);
    }
    assert_eq!(
        metric(
            &collector.registry,
            "chaperone_collector_records_rejected_total",
            Some(("reason", "nul_character"))
        ),
        2.0
    );
    collector.stop().await?;
    db.drop_db().await
}

/// How the writer tells a write PostgreSQL refuses for its data (dead-lettered) from one
/// that may succeed later (retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_errors_are_told_from_other_failures() -> anyhow::Result<()> {
    use chaperone_collector::ingest::data_error_label;
    let db = ingest_db().await?;
    let prefix = unique("refused");
    let max = chaperone_audit::record::MAX_TOTAL as u64;
    // A topic holding NUL (the decoder would reject it; the store is asked directly).
    let nul = sized(&format!("{prefix}-nul"), "or\u{0}ders", 0, 1, 1);
    let e = store::write_batch(&db.pool, &[nul], &[], &[])
        .await
        .expect_err("text cannot hold NUL");
    assert_eq!(data_error_label(&e), Some("db_invalid_text"), "{e}");
    // 1023 x 2^53 fits in bigint; one more 2^53 does not.
    let fill: Vec<AuditRecord> = (0..1023)
        .map(|i| sized(&format!("{prefix}-{i}"), "big", 0, max, 0))
        .collect();
    store::write_batch(&db.pool, &fill, &[], &[]).await?;
    let over = sized(&format!("{prefix}-over"), "big", 0, max, 0);
    let e = store::write_batch(&db.pool, &[over], &[], &[])
        .await
        .expect_err("bigint overflows");
    assert_eq!(data_error_label(&e), Some("db_out_of_range"), "{e}");
    // Nothing of the refused writes is stored.
    let stored: (i64, i64) =
        sqlx::query_as("SELECT sum(count)::int8, sum(records)::int8 FROM audit_counts")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(stored, (1023 * (1 << 53), 1023));
    // Names longer than the contract allows (the decoder would reject them): the progress
    // key's index row is over PostgreSQL's limit (SQLSTATE 54000).
    let mut long = progress(&unique("long"), &"t".repeat(249), 0, BUCKET, 1);
    // Scrambled, so that PostgreSQL cannot compress them under the limit.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let name: String = (0..500)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_u32(0x0410 + (x % 64) as u32).expect("Cyrillic")
        })
        .collect();
    long.observer.datacenter = name.clone();
    long.observer.cluster = name.clone();
    long.observer.host = name.clone();
    long.observer.instance = name;
    let e = store::write_batch(&db.pool, &[AuditRecord::Progress(long)], &[], &[])
        .await
        .expect_err("index row too large");
    assert_eq!(data_error_label(&e), Some("db_program_limit"), "{e}");
    // Not a data error: PostgreSQL cannot be reached.
    db.pool.close().await;
    let e = store::write_batch(&db.pool, &fill[..1], &[], &[])
        .await
        .expect_err("pool closed");
    assert_eq!(data_error_label(&e), None, "{e}");
    db.drop_db().await
}
