//! Reconciliation against the real PostgreSQL of `dev/stack up`: counts and progress rows are
//! written straight into the ingest tables, the reconciler runs on a hand-moved clock, and the
//! verdicts, their history, incidents and outbox events are read back.

mod reconcile_support;

use std::sync::Arc;

use chaperone_collector::alerts::Incidents;
use chaperone_collector::reconcile::{
    EdgeConfig, ReconcileConfig, ReconcileMetrics, Reconciler, VerdictStatus,
    latest_verdicts_by_topic, list_verdicts, verdict_history,
};
use reconcile_support::*;

const P2R: &str = "producer->regional";
const R2A: &str = "regional->aggregate";

/// producer -> regional -> aggregate counts for bucket `n` of `topic` in dc1, partition 0.
async fn flow(db: &TestDb, topic: &str, n: i64, producer: i64, regional: i64, aggregate: i64) {
    let pool = &db.pool;
    add_counts(pool, topic, start(n), "producer", "dc1", -1, producer)
        .await
        .unwrap();
    add_counts(pool, topic, start(n), "regional", "dc1", 0, regional)
        .await
        .unwrap();
    if aggregate > 0 {
        add_counts(pool, topic, start(n), "aggregate", "dc1", 0, aggregate)
            .await
            .unwrap();
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn complete_once_every_downstream_partition_is_past_the_lateness() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", -1, 15)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 10)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 1, 5)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 10)
        .await
        .unwrap();
    progress(&db.pool, "orders", "producer", "dc1", -1, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 1, end(0) + LATENESS)
        .await
        .unwrap();
    // Aggregate partition 1 has counted fewer than regional and has not passed the bucket:
    // regional->aggregate is not final yet.
    progress(&db.pool, "orders", "aggregate", "dc1", 0, end(0) + LATENESS)
        .await
        .unwrap();
    progress(
        &db.pool,
        "orders",
        "aggregate",
        "dc1",
        1,
        end(0) + LATENESS - 1,
    )
    .await
    .unwrap();
    // A partition nobody wrote to holds nothing back, even without progress past the bucket.
    progress(&db.pool, "orders", "aggregate", "dc1", 2, start(0))
        .await
        .unwrap();

    let report = pass(&r).await;
    assert_eq!(report.queued, 1);
    assert_eq!(
        report.pending, 1,
        "the bucket waits for aggregate partition 1"
    );
    let v = verdict(&db.pool, "orders", P2R, start(0))
        .await
        .expect("producer->regional judged");
    assert_eq!(v.status, VerdictStatus::Complete);
    assert_eq!((v.expected, v.actual, v.difference), (15, 15, 0));
    assert_eq!(v.datacenter.as_deref(), Some("dc1"));
    assert_eq!(v.final_reason, "progress");
    assert!(verdict(&db.pool, "orders", R2A, start(0)).await.is_none());

    progress(&db.pool, "orders", "aggregate", "dc1", 1, end(0) + LATENESS)
        .await
        .unwrap();
    clock.advance(chrono::Duration::seconds(1));
    let report = pass(&r).await;
    assert_eq!(report.pending, 0);
    let v = verdict(&db.pool, "orders", R2A, start(0))
        .await
        .expect("regional->aggregate judged");
    assert_eq!(
        v.status,
        VerdictStatus::Missing,
        "partition 1 passed without its 5"
    );
    assert_eq!(v.datacenter, None, "summed over datacenters");
    // Nothing changes on another pass.
    let report = pass(&r).await;
    assert_eq!((report.evaluated, report.changed), (0, 0));
    assert_eq!(
        count(&db, "SELECT count(*) FROM reconcile_verdict_history").await,
        2
    );
}

#[tokio::test]
async fn an_idle_partition_equal_on_both_sides_does_not_wait() {
    let db = reconcile_db().await.unwrap();
    let (r, _clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    flow(&db, "orders", 0, 10, 10, 10).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    // Aggregate partition 1 was never written: its progress stays at the start.
    progress(&db.pool, "orders", "aggregate", "dc1", 1, start(0))
        .await
        .unwrap();
    let report = pass(&r).await;
    assert_eq!(report.pending, 0);
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.final_reason.as_str()),
        (VerdictStatus::Complete, "progress")
    );
    assert_eq!(count(&db, "SELECT count(*) FROM alert_events").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 0);
}

#[tokio::test]
async fn missing_duplicated_and_per_datacenter_counts() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    // orders: 3 lost between regional and aggregate.
    flow(&db, "orders", 0, 10, 10, 7).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    // clicks: dc2 lost 1 between producer and regional; its mirror is paused after copying
    // one message.
    flow(&db, "clicks", 0, 5, 5, 5).await;
    add_counts(&db.pool, "clicks", start(0), "producer", "dc2", -1, 4)
        .await
        .unwrap();
    add_counts(&db.pool, "clicks", start(0), "regional", "dc2", 0, 3)
        .await
        .unwrap();
    add_counts(&db.pool, "clicks", start(0), "aggregate", "dc2", 0, 1)
        .await
        .unwrap();
    all_progress(&db.pool, "clicks", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "clicks", "producer", "dc2", -1, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "clicks", "regional", "dc2", 0, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "clicks", "aggregate", "dc2", 0, start(0))
        .await
        .unwrap();
    // dc2's copy on the aggregate is its own stream: partition 0 of dc1 having passed says
    // nothing about it.
    pass(&r).await;
    assert!(
        verdicts(&db.pool, "clicks")
            .await
            .iter()
            .all(|v| v.edge != R2A),
        "judged before dc2's copy passed the bucket"
    );
    // The mirror resumes.
    add_counts(&db.pool, "clicks", start(0), "aggregate", "dc2", 0, 2)
        .await
        .unwrap();
    progress(&db.pool, "clicks", "aggregate", "dc2", 0, end(0) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;

    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::Missing);
    assert_eq!(
        (v.expected, v.actual, v.difference, v.missing),
        (10, 7, -3, 3)
    );
    assert_eq!(
        verdict(&db.pool, "orders", P2R, start(0))
            .await
            .unwrap()
            .status,
        VerdictStatus::Complete
    );

    let clicks = verdicts(&db.pool, "clicks").await;
    let find = |edge: &str, dc: Option<&str>| {
        clicks
            .iter()
            .find(|v| v.edge == edge && v.datacenter.as_deref() == dc)
            .unwrap_or_else(|| panic!("no verdict for {edge} {dc:?}: {clicks:#?}"))
    };
    assert_eq!(find(P2R, Some("dc1")).status, VerdictStatus::Complete);
    let dc2 = find(P2R, Some("dc2"));
    assert_eq!((dc2.status, dc2.missing), (VerdictStatus::Missing, 1));
    // Regional summed over dc1 and dc2 (5 + 3) against the aggregate's 8.
    let r2a = find(R2A, None);
    assert_eq!((r2a.expected, r2a.actual), (8, 8));
    assert_eq!(r2a.status, VerdictStatus::Complete);

    // Two more at the aggregate: duplicated, once they settled.
    add_counts(&db.pool, "clicks", start(0), "aggregate", "dc1", 0, 2)
        .await
        .unwrap();
    pass(&r).await;
    assert_eq!(
        verdict(&db.pool, "clicks", R2A, start(0))
            .await
            .unwrap()
            .status,
        VerdictStatus::Complete,
        "not judged again before the settle time"
    );
    clock.advance(chrono::Duration::milliseconds(SETTLE));
    pass(&r).await;
    let r2a = verdict(&db.pool, "clicks", R2A, start(0)).await.unwrap();
    assert_eq!(r2a.status, VerdictStatus::Duplicated);
    assert_eq!((r2a.expected, r2a.actual, r2a.difference), (8, 10, 2));

    let missing = list_verdicts(&db.pool, Some(VerdictStatus::Missing), None, None)
        .await
        .unwrap();
    assert_eq!(missing.len(), 2, "{missing:#?}");
    assert!(missing.iter().all(|v| v.status == VerdictStatus::Missing));
    let none = list_verdicts(&db.pool, None, Some(start(1)), None)
        .await
        .unwrap();
    assert!(none.is_empty(), "from excludes earlier buckets");
    let latest = latest_verdicts_by_topic(&db.pool).await.unwrap();
    assert_eq!(
        latest.len(),
        5,
        "orders: 2 edges, clicks: dc1, dc2 and summed: {latest:#?}"
    );
}

#[tokio::test]
async fn silent_tier_is_judged_after_the_max_wait() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) - 1_000);
    // The aggregate never reports anything.
    regional_counted(&db.pool, "orders", 10).await.unwrap();
    pass(&r).await;
    assert!(verdict(&db.pool, "orders", R2A, start(0)).await.is_none());

    clock.set(at(end(0) + MAX_WAIT - 1));
    pass(&r).await;
    assert!(
        verdict(&db.pool, "orders", R2A, start(0)).await.is_none(),
        "not before max wait"
    );

    clock.set(at(end(0) + MAX_WAIT));
    let report = pass(&r).await;
    assert_eq!(report.pending, 0);
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::TierSilent);
    assert_eq!(v.silent_tier.as_deref(), Some("aggregate"));
    assert_eq!(v.final_reason, "max_wait");
    assert_eq!((v.expected, v.actual), (10, 0));

    // A downstream tier that stopped before the bucket is silent too, not "missing"; and a
    // producer tier that stopped before it while regional counted messages is silent, not
    // "duplicated". Stopped: no progress for longer than the instance timeout.
    progress(&db.pool, "payments", "producer", "dc1", -1, start(0))
        .await
        .unwrap();
    add_counts(&db.pool, "payments", start(0), "regional", "dc1", 0, 4)
        .await
        .unwrap();
    progress(
        &db.pool,
        "payments",
        "regional",
        "dc1",
        0,
        end(0) + LATENESS,
    )
    .await
    .unwrap();
    progress(&db.pool, "payments", "aggregate", "dc1", 0, start(0))
        .await
        .unwrap();
    stop_reporting(&db.pool, "payments", "producer")
        .await
        .unwrap();
    stop_reporting(&db.pool, "payments", "aggregate")
        .await
        .unwrap();
    // Its counts came after the maximum wait: it gets the whole wait from then.
    pass(&r).await;
    assert!(verdict(&db.pool, "payments", R2A, start(0)).await.is_none());
    clock.advance(chrono::Duration::milliseconds(MAX_WAIT));
    pass(&r).await;
    let v = verdict(&db.pool, "payments", R2A, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::TierSilent);
    let v = verdict(&db.pool, "payments", P2R, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::TierSilent);
    assert_eq!(v.silent_tier.as_deref(), Some("producer"));
}

/// A cluster the collector cannot reach silences everyone reporting through it at once: that
/// is delay. Their silence counts only from when the cluster answers again.
#[tokio::test]
async fn an_unreachable_cluster_is_delay_not_silence() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) - 1_000);
    let reach = chaperone_collector::ingest::Reach::default();
    let r = r.hearing(reach.clone());
    regional_counted(&db.pool, "orders", 10).await.unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, start(0))
        .await
        .unwrap();
    sqlx::query("UPDATE audit_progress SET source = 'aggregate' WHERE tier = 'aggregate'")
        .execute(&db.pool)
        .await
        .unwrap();
    stop_reporting(&db.pool, "orders", "aggregate")
        .await
        .unwrap();
    reach.lost("aggregate");
    pass(&r).await;
    clock.set(at(end(0) + MAX_WAIT));
    pass(&r).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        v.status,
        VerdictStatus::Lagging,
        "an aggregate tier that cannot be heard is behind, not silent"
    );

    // Reachable again: its observers get the whole instance timeout to report from now.
    reach.answered("aggregate", clock.clock().now());
    clock.advance(chrono::Duration::milliseconds(1_000));
    pass(&r).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::Lagging);
    let timeout = chrono::Duration::from_std(config().instance_timeout).unwrap();
    clock.advance(timeout);
    pass(&r).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::TierSilent);
    assert_eq!(v.silent_tier.as_deref(), Some("aggregate"));
}

#[tokio::test]
async fn zero_messages_at_every_tier_is_complete() {
    let db = reconcile_db().await.unwrap();
    let (r, _clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    // Producers and regional flushed empty counts; the aggregate has no row at all.
    add_counts(&db.pool, "quiet", start(0), "producer", "dc1", -1, 0)
        .await
        .unwrap();
    add_counts(&db.pool, "quiet", start(0), "regional", "dc1", 0, 0)
        .await
        .unwrap();
    all_progress(&db.pool, "quiet", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    // Same, but nobody downstream ever reports: still nothing lost.
    add_counts(&db.pool, "idle", start(0), "producer", "dc1", -1, 0)
        .await
        .unwrap();
    progress(&db.pool, "idle", "producer", "dc1", -1, end(0) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;
    for edge in [P2R, R2A] {
        let v = verdict(&db.pool, "quiet", edge, start(0)).await.unwrap();
        assert_eq!(v.status, VerdictStatus::Complete, "{edge}");
        assert_eq!((v.expected, v.actual), (0, 0));
    }
    let v = verdict(&db.pool, "idle", P2R, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.final_reason.as_str()),
        (VerdictStatus::Complete, "progress"),
        "a final upstream that counted nothing needs no downstream progress"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 0);
}

#[tokio::test]
async fn an_upstream_tier_that_never_reported_the_topic_is_not_expected() {
    let db = reconcile_db().await.unwrap();
    let (r, _clock) = reconciler(&db.pool, config(), end(0) + MAX_WAIT);
    // No producer uses the audit library for this topic: only the clusters report it.
    add_counts(&db.pool, "legacy", start(0), "regional", "dc1", 0, 8)
        .await
        .unwrap();
    add_counts(&db.pool, "legacy", start(0), "aggregate", "dc1", 0, 8)
        .await
        .unwrap();
    progress(&db.pool, "legacy", "regional", "dc1", 0, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "legacy", "aggregate", "dc1", 0, end(0) + LATENESS)
        .await
        .unwrap();
    let report = pass(&r).await;
    assert_eq!(report.pending, 0);
    let all = verdicts(&db.pool, "legacy").await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(
        (all[0].edge.as_str(), all[0].status),
        (R2A, VerdictStatus::Complete)
    );
}

#[tokio::test]
async fn late_records_reopen_the_verdict_and_the_change_is_recorded() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    flow(&db, "orders", 0, 10, 10, 6).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.missing, v.revisions),
        (VerdictStatus::Missing, 4, 0)
    );
    let incident = v.incident_id.expect("a missing bucket opens an incident");

    // Part of the loss arrives late: still missing, with the new count.
    clock.advance(chrono::Duration::minutes(5));
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 3)
        .await
        .unwrap();
    let report = rejudge(&r, &clock).await;
    assert_eq!(report.queued, 1);
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.missing, v.revisions),
        (VerdictStatus::Missing, 1, 1)
    );
    assert_eq!(v.incident_id, Some(incident));

    // The rest arrives: complete, the incident resolves.
    clock.advance(chrono::Duration::minutes(5));
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.actual, v.revisions),
        (VerdictStatus::Complete, 10, 2)
    );

    let history: Vec<_> = verdict_history(&db.pool, "orders", None, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.edge == R2A)
        .map(|h| (h.old_status, h.status, h.actual))
        .collect();
    assert_eq!(
        history,
        vec![
            (None, "missing".to_owned(), 6),
            (Some("missing".to_owned()), "missing".to_owned(), 9),
            (Some("missing".to_owned()), "complete".to_owned(), 10),
        ]
    );
    let (status, resolved): (String, bool) =
        sqlx::query_as("SELECT status, resolved_at IS NOT NULL FROM alert_incidents WHERE id = $1")
            .bind(incident)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), resolved), ("resolved", true));
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM alert_events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["bad_bucket", "bad_bucket", "resolved"]);
}

#[tokio::test]
async fn consecutive_bad_buckets_form_one_incident() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(2) + 1_000);
    flow(&db, "orders", 0, 10, 10, 9).await;
    flow(&db, "orders", 1, 10, 10, 8).await;
    flow(&db, "orders", 2, 10, 10, 10).await;
    all_progress(&db.pool, "orders", "dc1", end(2) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;
    let incidents: Vec<(i64, i32, i32, String)> =
        sqlx::query_as("SELECT id, buckets, bad_buckets, status FROM alert_incidents ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!((incidents[0].1, incidents[0].2), (2, 2));

    // One bucket heals: still open.
    clock.advance(chrono::Duration::minutes(1));
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let (bad, status): (i32, String) =
        sqlx::query_as("SELECT bad_buckets, status FROM alert_incidents")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((bad, status.as_str()), (1, "open"));

    // The other heals: resolved, exactly once.
    add_counts(&db.pool, "orders", start(1), "aggregate", "dc1", 0, 2)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let (bad, status): (i32, String) =
        sqlx::query_as("SELECT bad_buckets, status FROM alert_incidents")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((bad, status.as_str()), (0, "resolved"));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM alert_events WHERE kind = 'resolved'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM alert_events WHERE kind = 'bad_bucket'"
        )
        .await,
        2
    );

    // A new loss later is a new incident.
    flow(&db, "orders", 5, 10, 10, 0).await;
    all_progress(&db.pool, "orders", "dc1", end(5) + LATENESS)
        .await
        .unwrap();
    clock.set(at(end(5) + 1_000));
    pass(&r).await;
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 2);
}

#[tokio::test]
async fn partition_level_verdicts_where_partitions_map_one_to_one() {
    let db = reconcile_db().await.unwrap();
    let mut cfg = config();
    cfg.edges = vec![EdgeConfig {
        from: "regional".into(),
        to: "aggregate".into(),
        partition_level: true,
        ..EdgeConfig::default()
    }];
    let (r, _clock) = reconciler(&db.pool, cfg, end(0) + 1_000);
    for (tier, p0, p1) in [("regional", 5, 5), ("aggregate", 3, 7)] {
        add_counts(&db.pool, "orders", start(0), tier, "dc1", 0, p0)
            .await
            .unwrap();
        add_counts(&db.pool, "orders", start(0), tier, "dc1", 1, p1)
            .await
            .unwrap();
        for p in [0, 1] {
            progress(&db.pool, "orders", tier, "dc1", p, end(0) + LATENESS)
                .await
                .unwrap();
        }
    }
    pass(&r).await;
    let all = verdicts(&db.pool, "orders").await;
    let summary: Vec<_> = all
        .iter()
        .map(|v| (v.partition, v.status, v.expected, v.actual))
        .collect();
    assert_eq!(
        summary,
        vec![
            (None, VerdictStatus::Complete, 10, 10),
            (Some(0), VerdictStatus::Missing, 5, 3),
            (Some(1), VerdictStatus::Duplicated, 5, 7),
        ]
    );
    // Partition-level verdicts are informative: no incident when the topic is complete.
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 0);
}

#[tokio::test]
async fn run_evaluates_periodically_until_shutdown() {
    let db = reconcile_db().await.unwrap();
    flow(&db, "orders", 0, 10, 10, 10).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    let mut cfg = config();
    cfg.interval = std::time::Duration::from_millis(50);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let clock = ManualClock::new(at(end(0) + 1_000));
    let registry = prometheus::Registry::new();
    let metrics = ReconcileMetrics::new(&registry).unwrap();
    let task = tokio::spawn(chaperone_collector::reconcile::run_with_clock(
        db.pool.clone(),
        cfg,
        clock.clock(),
        chaperone_collector::ingest::Reach::default(),
        Arc::new(Incidents::new(&config())),
        metrics,
        shutdown.clone(),
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while verdict(&db.pool, "orders", R2A, start(0)).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no verdict from the periodic run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("chaperone_collector_reconcile_verdicts_total{status=\"complete\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn retention_deletes_old_verdicts_and_resolved_incidents() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    flow(&db, "orders", 0, 10, 10, 9).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM alert_incidents WHERE status = 'resolved'"
        )
        .await,
        1
    );
    assert_eq!(r.prune().await.unwrap(), 0, "nothing is 30 days old yet");

    clock.advance(chrono::Duration::days(31));
    let deleted = r.prune().await.unwrap();
    for table in [
        "reconcile_verdicts",
        "reconcile_verdict_history",
        "alert_events",
        "alert_incidents",
    ] {
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    // 2 verdicts, 3 history entries (one per verdict, one change), 2 events, 1 incident.
    assert_eq!(deleted, 8);
}

#[tokio::test]
async fn buckets_older_than_the_lookback_are_not_judged() {
    let db = reconcile_db().await.unwrap();
    // Started three days after a loss (the default lookback is two days).
    let (r, _clock) = reconciler(&db.pool, config(), end(0) + 3 * 86_400_000);
    flow(&db, "orders", 0, 10, 10, 5).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    let report = pass(&r).await;
    assert_eq!((report.queued, report.pending), (0, 0));
    assert!(verdicts(&db.pool, "orders").await.is_empty());
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 0);
}

async fn events(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM alert_events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn revisions(db: &TestDb) -> i64 {
    count(
        db,
        "SELECT coalesce(sum(revisions), 0)::bigint FROM reconcile_verdicts",
    )
    .await
}

#[tokio::test]
async fn every_live_producer_instance_must_pass_the_bucket() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let due = end(0) + LATENESS;
    // Two instances; the fast one has reported past the bucket, the slow one has not yet,
    // and its 4 messages have not been counted yet.
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", 0, 6)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 10)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "fast", due, due, false)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "slow", start(0), start(0), false)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, due)
        .await
        .unwrap();
    let report = pass(&r).await;
    assert_eq!(report.pending, 1);
    assert!(verdict(&db.pool, "orders", P2R, start(0)).await.is_none());

    // The slow instance reports 30 s later: its counts, then its progress.
    clock.advance(chrono::Duration::seconds(30));
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", 0, 4)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "slow", due, due, false)
        .await
        .unwrap();
    pass(&r).await;
    let v = verdict(&db.pool, "orders", P2R, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.expected, v.actual),
        (VerdictStatus::Complete, 10, 10)
    );
    assert_eq!(revisions(&db).await, 0);
    assert!(events(&db).await.is_empty());
}

#[tokio::test]
async fn a_clean_shutdown_is_not_waited_for_and_a_killed_instance_is_named() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let due = end(0) + LATENESS;
    // "gone" shut down cleanly before the bucket ended; "live" passed it.
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", 0, 10)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 10)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "gone", start(0), start(0), true)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "live", due, due, false)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, due)
        .await
        .unwrap();
    pass(&r).await;
    let v = verdict(&db.pool, "orders", P2R, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.final_reason.as_str()),
        (VerdictStatus::Complete, "progress")
    );
    assert!(v.stale_instances.is_empty());

    // Next bucket: "killed" counted 3 of its messages before kill -9; regional saw all 8.
    add_counts(&db.pool, "payments", start(0), "producer", "dc1", 0, 3)
        .await
        .unwrap();
    add_counts(&db.pool, "payments", start(0), "regional", "dc1", 0, 8)
        .await
        .unwrap();
    instance_progress(
        &db.pool,
        "payments",
        "dc1",
        "killed",
        start(0),
        start(0),
        false,
    )
    .await
    .unwrap();
    instance_progress(&db.pool, "payments", "dc1", "live", due, due, false)
        .await
        .unwrap();
    progress(&db.pool, "payments", "regional", "dc1", 0, due)
        .await
        .unwrap();
    pass(&r).await;
    assert!(
        verdict(&db.pool, "payments", P2R, start(0)).await.is_none(),
        "waits for the killed instance until it times out"
    );
    // Silent for longer than the instance timeout, on the collector's clock and against the
    // newest progress of the others.
    sqlx::query(
        "UPDATE audit_progress SET last_seen_at = $1, last_emitted_ms = last_emitted_ms - 200000
          WHERE instance = 'killed'",
    )
    .bind(at(end(0) + 1_000 - 121_000))
    .execute(&db.pool)
    .await
    .unwrap();
    clock.advance(chrono::Duration::seconds(1));
    pass(&r).await;
    let v = verdict(&db.pool, "payments", P2R, start(0)).await.unwrap();
    assert_eq!(v.status, VerdictStatus::UpstreamIncomplete, "{v:#?}");
    assert_eq!(v.stale_instances, vec!["host/killed".to_owned()]);
    assert_eq!((v.expected, v.actual), (3, 8));
    assert!(
        events(&db).await.is_empty(),
        "the auditor's gap notifies nobody"
    );
}

#[tokio::test]
async fn a_lagging_tier_is_lag_until_it_catches_up_or_proves_the_loss() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) - 1_000);
    let due = end(0) + LATENESS;
    // The mirror is paused: the aggregate stays at the bucket start for both topics.
    for topic in ["orders", "payments"] {
        flow(&db, topic, 0, 10, 10, 4).await;
        progress(&db.pool, topic, "producer", "dc1", -1, due)
            .await
            .unwrap();
        progress(&db.pool, topic, "regional", "dc1", 0, due)
            .await
            .unwrap();
        progress(&db.pool, topic, "aggregate", "dc1", 0, start(0))
            .await
            .unwrap();
    }
    pass(&r).await;
    clock.set(at(end(0) + MAX_WAIT - 1));
    pass(&r).await;
    assert!(
        verdict(&db.pool, "orders", R2A, start(0)).await.is_none(),
        "nothing before max_wait"
    );

    clock.set(at(end(0) + MAX_WAIT));
    let report = pass(&r).await;
    assert_eq!(report.pending, 2, "lagging buckets stay queued");
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.final_reason.as_str()),
        (VerdictStatus::Lagging, "max_wait")
    );
    assert_eq!(v.lag_ms, Some(MAX_WAIT + WIDTH));
    assert_eq!(
        v.waiting_on,
        vec!["aggregate:test-host/test partition 0".to_owned()],
        "names what held the bucket back"
    );
    assert!(events(&db).await.is_empty(), "delay is not loss");

    // orders: the mirror resumes and copies everything.
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 6)
        .await
        .unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, due)
        .await
        .unwrap();
    // payments: the aggregate moves past the bucket without the 6.
    progress(&db.pool, "payments", "aggregate", "dc1", 0, due)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!((v.status, v.actual), (VerdictStatus::Complete, 10));
    let v = verdict(&db.pool, "payments", R2A, start(0)).await.unwrap();
    assert_eq!((v.status, v.missing), (VerdictStatus::Missing, 6));
    assert_eq!(
        events(&db).await,
        ["bad_bucket"],
        "one firing, for the real loss"
    );
    assert_eq!(pass(&r).await.pending, 0);
}

#[tokio::test]
async fn a_lag_that_outlasts_loss_after_is_loss() {
    let db = reconcile_db().await.unwrap();
    let cfg = ReconcileConfig {
        loss_after: std::time::Duration::from_millis(2 * MAX_WAIT as u64),
        ..config()
    };
    let (r, clock) = reconciler(&db.pool, cfg, end(0) - 1_000);
    flow(&db, "orders", 0, 10, 10, 4).await;
    progress(&db.pool, "orders", "producer", "dc1", -1, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, end(0) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, start(0))
        .await
        .unwrap();
    pass(&r).await;
    clock.set(at(end(0) + MAX_WAIT));
    pass(&r).await;
    assert_eq!(
        verdict(&db.pool, "orders", R2A, start(0))
            .await
            .unwrap()
            .status,
        VerdictStatus::Lagging
    );
    clock.set(at(end(0) + 2 * MAX_WAIT));
    pass(&r).await;
    let v = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (v.status, v.final_reason.as_str()),
        (VerdictStatus::Missing, "loss_after")
    );
    assert_eq!(events(&db).await, ["bad_bucket"]);
}

#[tokio::test]
async fn producers_event_time_lag_holds_consumer_tiers_back() {
    let db = reconcile_db().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let due = end(0) + LATENESS;
    // A producer whose event times run 90 s behind its clock: its watermark passed the bucket
    // at a time 90 s later, so the regional tier (caught up at `due`) may not have its last
    // messages yet.
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", 0, 10)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 7)
        .await
        .unwrap();
    instance_progress(
        &db.pool,
        "orders",
        "dc1",
        "skewed",
        due,
        due + 90_000,
        false,
    )
    .await
    .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, due)
        .await
        .unwrap();
    pass(&r).await;
    assert!(verdict(&db.pool, "orders", P2R, start(0)).await.is_none());
    // The regional tier reads the rest and moves on.
    clock.advance(chrono::Duration::seconds(90));
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 3)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, due + 90_000)
        .await
        .unwrap();
    pass(&r).await;
    let v = verdict(&db.pool, "orders", P2R, start(0)).await.unwrap();
    assert_eq!((v.status, v.revisions), (VerdictStatus::Complete, 0));
    assert!(events(&db).await.is_empty());
}

#[tokio::test]
async fn a_message_that_reached_the_log_late_is_not_called_lost_by_a_mirror_that_read_past_it() {
    let db = reconcile_db().await.unwrap();
    let due = end(0) + LATENESS;
    let (r, clock) = reconciler(&db.pool, config(), due + 500);
    // Producer `a` is on time; `b` stalled with one message of the bucket in flight. The
    // mirror's reader read `a`'s later messages: its mark (the latest event time read) is
    // past the bucket and its producers' event-time lag.
    instance_progress(&db.pool, "orders", "dc1", "a", due + 500, due + 500, false)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "b", start(0), due + 500, false)
        .await
        .unwrap();
    for tier in ["producer", "regional", "aggregate"] {
        add_counts(&db.pool, "orders", start(0), tier, "dc1", 0, 9)
            .await
            .unwrap();
    }
    progress(&db.pool, "orders", "regional", "dc1", 0, due + 500)
        .await
        .unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, due + 400)
        .await
        .unwrap();
    pass(&r).await;
    assert!(verdict(&db.pool, "orders", R2A, start(0)).await.is_none());
    // Four seconds later `b`'s message is appended, behind messages of `a` that the mirror
    // copied already, and acknowledged: `b` passes the bucket. Regional counted it; the
    // aggregate's reader has not, though it read event times 2 s past the lateness.
    clock.advance(chrono::Duration::seconds(4));
    let now = due + 4_500;
    instance_progress(&db.pool, "orders", "dc1", "a", now, now, false)
        .await
        .unwrap();
    instance_progress(&db.pool, "orders", "dc1", "b", now, now, false)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "producer", "dc1", 0, 1)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(0), "regional", "dc1", 0, 1)
        .await
        .unwrap();
    progress(&db.pool, "orders", "regional", "dc1", 0, now)
        .await
        .unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, due + 2_000)
        .await
        .unwrap();
    pass(&r).await;
    let p2r = verdict(&db.pool, "orders", P2R, start(0)).await.unwrap();
    assert_eq!((p2r.status, p2r.expected), (VerdictStatus::Complete, 10));
    assert!(
        verdict(&db.pool, "orders", R2A, start(0)).await.is_none(),
        "the reader's mark is older than the time the producers passed"
    );
    // The mirror copies it.
    clock.advance(chrono::Duration::seconds(1));
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    progress(&db.pool, "orders", "aggregate", "dc1", 0, now + 800)
        .await
        .unwrap();
    pass(&r).await;
    let r2a = verdict(&db.pool, "orders", R2A, start(0)).await.unwrap();
    assert_eq!(
        (r2a.status, r2a.expected, r2a.actual, r2a.revisions),
        (VerdictStatus::Complete, 10, 10, 0)
    );
    assert!(events(&db).await.is_empty(), "nobody notified");
}

#[tokio::test]
async fn every_consumer_group_is_judged_on_the_topics_it_reads() {
    let db = reconcile_db().await.unwrap();
    let mut config = config();
    config.tiers.push("consumer:*".into());
    config.edges.push(EdgeConfig {
        from: "aggregate".into(),
        to: "consumer:*".into(),
        ..EdgeConfig::default()
    });
    let due = end(0) + LATENESS;
    let (r, _clock) = reconciler(&db.pool, config, due + 1_000);
    for topic in ["orders", "payments"] {
        flow(&db, topic, 0, 10, 10, 10).await;
        all_progress(&db.pool, topic, "dc1", due + 1_000)
            .await
            .unwrap();
    }
    // `billing` reads both topics and processed 9 orders; `search` reads only payments.
    for (group, topic, n) in [
        ("consumer:billing", "orders", 9),
        ("consumer:billing", "payments", 10),
        ("consumer:search", "payments", 10),
    ] {
        add_counts(&db.pool, topic, start(0), group, "dc1", 0, n)
            .await
            .unwrap();
        progress(&db.pool, topic, group, "dc1", 0, due + 1_000)
            .await
            .unwrap();
    }
    pass(&r).await;
    let orders = verdict(&db.pool, "orders", "aggregate->consumer:billing", start(0))
        .await
        .expect("billing judged on orders");
    assert_eq!(
        (orders.status, orders.expected, orders.actual),
        (VerdictStatus::Missing, 10, 9)
    );
    for (topic, edge) in [
        ("payments", "aggregate->consumer:billing"),
        ("payments", "aggregate->consumer:search"),
    ] {
        let v = verdict(&db.pool, topic, edge, start(0)).await.unwrap();
        assert_eq!(v.status, VerdictStatus::Complete, "{topic} {edge}");
    }
    assert!(
        verdict(&db.pool, "orders", "aggregate->consumer:search", start(0))
            .await
            .is_none(),
        "search never read orders"
    );
    assert_eq!(events(&db).await.len(), 1, "the loss of one order notifies");
}

#[tokio::test]
async fn tiers_with_different_bucket_widths_are_reported_not_silent() {
    let db = reconcile_db().await.unwrap();
    let (_, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    flow(&db, "orders", 0, 10, 10, 10).await;
    all_progress(&db.pool, "orders", "dc1", end(0) + LATENESS)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_progress SET bucket_width_ms = 10000 WHERE tier = 'aggregate'")
        .execute(&db.pool)
        .await
        .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = ReconcileMetrics::new(&registry).unwrap();
    let r2 = Reconciler::new(
        db.pool.clone(),
        config(),
        clock.clock(),
        metrics.clone(),
        Arc::new(Incidents::new(&config())),
    );
    let report = pass(&r2).await;
    assert_eq!(report.pending, 1, "stays queued while the mismatch lasts");
    assert!(verdict(&db.pool, "orders", R2A, start(0)).await.is_none());
    assert_eq!(
        verdict(&db.pool, "orders", P2R, start(0))
            .await
            .unwrap()
            .status,
        VerdictStatus::Complete
    );
    assert_eq!(metrics.width_mismatches.get(), 1);
    pass(&r2).await;
    assert_eq!(metrics.width_mismatches.get(), 1, "still mismatched");
    // Fixed: the gauge falls back and the edge is compared.
    sqlx::query("UPDATE audit_progress SET bucket_width_ms = 60000 WHERE tier = 'aggregate'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = pass(&r2).await;
    assert_eq!(report.pending, 0);
    assert_eq!(metrics.width_mismatches.get(), 0);
    assert_eq!(
        verdict(&db.pool, "orders", R2A, start(0))
            .await
            .unwrap()
            .status,
        VerdictStatus::Complete
    );
}

#[tokio::test]
async fn a_much_worse_or_much_later_loss_notifies_despite_an_open_incident() {
    let db = reconcile_db().await.unwrap();
    let cfg = ReconcileConfig {
        incident_gap: std::time::Duration::from_secs(180),
        escalate_min: 10,
        ..config()
    };
    let (r, clock) = reconciler(&db.pool, cfg, end(0) + 1_000);
    // One message lost, then the same again next bucket: one incident.
    flow(&db, "orders", 0, 100, 100, 99).await;
    flow(&db, "orders", 1, 100, 100, 99).await;
    all_progress(&db.pool, "orders", "dc1", end(1) + LATENESS)
        .await
        .unwrap();
    pass(&r).await;
    assert_eq!(events(&db).await, ["bad_bucket", "bad_bucket"]);
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 1);

    // Ten times worse: a new incident, which notifies; the first is superseded.
    flow(&db, "orders", 2, 100, 100, 90).await;
    all_progress(&db.pool, "orders", "dc1", end(2) + LATENESS)
        .await
        .unwrap();
    clock.set(at(end(2) + 1_000));
    pass(&r).await;
    let incidents: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, max_missing FROM alert_incidents ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        incidents,
        [("superseded".to_owned(), 1), ("open".to_owned(), 10)]
    );

    // A loss long after the open incident's last bad bucket: yet another incident.
    flow(&db, "orders", 8, 100, 100, 95).await;
    all_progress(&db.pool, "orders", "dc1", end(8) + LATENESS)
        .await
        .unwrap();
    clock.set(at(end(8) + 1_000));
    pass(&r).await;
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM alert_incidents ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(statuses, ["superseded", "superseded", "open"]);
    let firsts: i64 = count(
        &db,
        "SELECT count(DISTINCT incident_id) FROM alert_events WHERE kind = 'bad_bucket'",
    )
    .await;
    assert_eq!(firsts, 3, "each incident has its firing event");

    // The first incident's buckets heal: its resolution is still told.
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    add_counts(&db.pool, "orders", start(1), "aggregate", "dc1", 0, 1)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let resolved: i64 = count(
        &db,
        "SELECT count(*) FROM alert_events e JOIN alert_incidents i ON i.id = e.incident_id
          WHERE e.kind = 'resolved' AND i.status = 'superseded'",
    )
    .await;
    assert_eq!(resolved, 1);
}

/// Adds `count` to one tier's partition of a bucket as seen on `cluster` (a second cluster
/// of the same datacenter: the reconciler sums the two).
async fn add_counts_on(db: &TestDb, topic: &str, n: i64, tier: &str, cluster: &str, count: i64) {
    sqlx::query(
        "INSERT INTO audit_counts (topic, bucket_start_ms, bucket_width_ms, tier, datacenter,
             cluster, partition, count, latency, records)
         VALUES ($1, $2, $3, $4, 'dc1', $5, 0, $6, ''::bytea, 1)",
    )
    .bind(topic)
    .bind(start(n))
    .bind(WIDTH)
    .bind(tier)
    .bind(cluster)
    .bind(count)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO audit_count_changes (topic, bucket_start_ms, bucket_width_ms, tier)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(topic)
    .bind(start(n))
    .bind(WIDTH)
    .bind(tier)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn counts_summing_past_i64_max_are_reported_once_and_the_pass_judges_the_rest() {
    let db = reconcile_db().await.unwrap();
    let (_, clock) = reconciler(&db.pool, config(), end(1) + LATENESS + 1_000);
    let registry = prometheus::Registry::new();
    let metrics = ReconcileMetrics::new(&registry).unwrap();
    let r = Reconciler::new(
        db.pool.clone(),
        config(),
        clock.clock(),
        metrics.clone(),
        Arc::new(Incidents::new(&config())),
    );
    // One bucket of `hostile` is fine on each cluster, and past i64::MAX summed over both.
    for topic in ["orders", "hostile"] {
        flow(&db, topic, 0, 10, 10, 10).await;
        flow(&db, topic, 1, 10, 10, 10).await;
        // Everyone caught up as of now.
        all_progress(&db.pool, topic, "dc1", end(1) + LATENESS + 1_000)
            .await
            .unwrap();
    }
    add_counts_on(&db, "hostile", 0, "regional", "regional-dc1-b", i64::MAX).await;

    let report = pass(&r).await;
    assert_eq!(report.pending, 0, "every bucket is settled");
    for (topic, n) in [("orders", 0), ("orders", 1), ("hostile", 1)] {
        for edge in [P2R, R2A] {
            let v = verdict(&db.pool, topic, edge, start(n))
                .await
                .unwrap_or_else(|| panic!("{topic} bucket {n} on {edge} judged"));
            assert_eq!(
                (v.status, v.expected, v.actual),
                (VerdictStatus::Complete, 10, 10)
            );
        }
    }
    // Both edges of the overflowing bucket compare the regional tier: neither is judged, and
    // nothing is alerted.
    for edge in [P2R, R2A] {
        assert!(verdict(&db.pool, "hostile", edge, start(0)).await.is_none());
    }
    assert_eq!(metrics.count_overflows.get(), 2, "one per cell");
    assert_eq!(count(&db, "SELECT count(*) FROM alert_incidents").await, 0);

    // The cell changes again: judged again, not reported again.
    add_counts(&db.pool, "hostile", start(0), "producer", "dc1", -1, 1)
        .await
        .unwrap();
    clock.advance(chrono::Duration::seconds(1));
    let report = pass(&r).await;
    assert_eq!((report.queued, report.pending), (1, 0));
    assert_eq!(metrics.count_overflows.get(), 2, "each cell reported once");
    assert!(verdict(&db.pool, "hostile", P2R, start(0)).await.is_none());
}
