//! Alerts end to end against the real PostgreSQL of `dev/stack up`: verdicts written by the
//! reconciler reach a webhook receiver on 127.0.0.1 through the outbox, exactly once, signed.

mod reconcile_support;

use std::time::Duration;

use chaperone_collector::alerts::{
    self, AlertMetrics, AlertSender, AlertsConfig, IDEMPOTENCY_HEADER, IncidentStatus,
    NotificationKind, SIGNATURE_HEADER, WebhookBody, WebhookConfig, WebhookFilters, WebhookFormat,
};
use chaperone_collector::reconcile::{ManualClock, VerdictStatus};
use reconcile_support::*;

const SECRET: &str = "correct horse battery staple";

fn secret_file() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("chaperone-alerts-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("webhook-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path
}

fn webhook(name: &str, url: String) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        url,
        format: WebhookFormat::Json,
        filters: WebhookFilters::default(),
        secret_env: None,
        secret_file: None,
    }
}

fn alerts_config(webhooks: Vec<WebhookConfig>) -> AlertsConfig {
    AlertsConfig {
        request_timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        public_url: Some("http://collector.test:8080".into()),
        webhooks,
        ..AlertsConfig::default()
    }
}

fn sender(db: &TestDb, config: AlertsConfig, clock: &ManualClock) -> AlertSender {
    let metrics = AlertMetrics::new(&prometheus::Registry::new()).unwrap();
    AlertSender::new(db.pool.clone(), config, clock.clock(), metrics).unwrap()
}

/// Regional saw `regional` messages of bucket `n`, the aggregate `aggregate`; both tiers
/// have progressed past it.
async fn bucket(db: &TestDb, topic: &str, n: i64, regional: i64, aggregate: i64) {
    add_counts(&db.pool, topic, start(n), "regional", "dc1", 0, regional)
        .await
        .unwrap();
    add_counts(&db.pool, topic, start(n), "aggregate", "dc1", 0, aggregate)
        .await
        .unwrap();
    progress(&db.pool, topic, "regional", "dc1", 0, end(n) + LATENESS)
        .await
        .unwrap();
    progress(&db.pool, topic, "aggregate", "dc1", 0, end(n) + LATENESS)
        .await
        .unwrap();
}

fn verify_signature(r: &Received) {
    let header = r
        .headers
        .get(SIGNATURE_HEADER)
        .expect("signed")
        .to_str()
        .unwrap();
    assert_eq!(header, alerts::signature(SECRET.as_bytes(), &r.body));
    // Independently of the crate's helper: HMAC-SHA256 over the exact body bytes.
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&r.body);
    let hex = header.strip_prefix("sha256=").expect("sha256= prefix");
    mac.verify_slice(&::hex::decode(hex).unwrap())
        .expect("signature verifies");
}

fn body(r: &Received) -> WebhookBody {
    serde_json::from_slice(&r.body).expect("documented JSON body")
}

/// A receiver on 127.0.0.1 that accepts every connection, reads the request and never
/// answers; the first bytes of each request come out of the channel.
async fn hung_receiver() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = hung.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .unwrap_or(0);
            buf.truncate(n);
            seen_tx.send(buf).await.ok();
            held.push(conn);
        }
    });
    (addr, seen_rx)
}

/// Polls `check` every 20 ms until it holds (the caller bounds the wait).
async fn until(mut check: impl FnMut() -> bool) {
    while !check() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_loss_fires_once_and_resolves_once_signed() {
    let db = TestDb::create().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let mut hook = webhook("ops", receiver.url());
    hook.secret_file = Some(secret_file());
    let (r, clock) = reconciler(&db.pool, config(), end(1) + 1_000);
    let s = sender(&db, alerts_config(vec![hook]), &clock);

    bucket(&db, "orders", 0, 100, 88).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!((report.created, report.sent), (1, 1));
    // A second loss right after joins the same incident: no second firing.
    bucket(&db, "orders", 1, 50, 45).await;
    pass(&r).await;
    s.run_once().await.unwrap();
    s.run_once().await.unwrap();

    let got = receiver.received();
    assert_eq!(got.len(), 1, "exactly one firing");
    verify_signature(&got[0]);
    let firing = body(&got[0]);
    assert_eq!(firing.event, NotificationKind::Firing);
    assert_eq!(firing.topic, "orders");
    assert_eq!(firing.edge, "regional->aggregate");
    assert_eq!(firing.status, VerdictStatus::Missing);
    assert_eq!(
        (firing.expected, firing.actual, firing.difference),
        (100, 88, -12)
    );
    assert_eq!(firing.bucket_start_ms, start(0));
    assert_eq!(firing.bucket, "2026-01-01T00:00:00Z");
    assert_eq!(firing.datacenter, None);
    assert_eq!(
        firing.link.as_deref(),
        Some(&*format!(
            "http://collector.test:8080/api/v1/topics/orders/buckets?from={}&to={}",
            start(0),
            end(0)
        ))
    );
    assert_eq!(got[0].headers.get("x-chaperone-event").unwrap(), "firing");

    // Late data fills the first bucket: still open (the second is still bad).
    clock.advance(chrono::Duration::minutes(3));
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 12)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    s.run_once().await.unwrap();
    assert_eq!(receiver.received().len(), 1);
    // And the second: resolved, once.
    add_counts(&db.pool, "orders", start(1), "aggregate", "dc1", 0, 5)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    s.run_once().await.unwrap();
    s.run_once().await.unwrap();
    rejudge(&r, &clock).await;
    s.run_once().await.unwrap();

    let got = receiver.received();
    assert_eq!(got.len(), 2, "one firing, one resolved");
    verify_signature(&got[1]);
    let resolved = body(&got[1]);
    assert_eq!(resolved.event, NotificationKind::Resolved);
    assert_eq!(resolved.incident_id, firing.incident_id);
    assert_eq!(resolved.status, VerdictStatus::Complete);
    assert_eq!(
        (
            resolved.incident_first_bucket_start_ms,
            resolved.incident_last_bucket_start_ms
        ),
        (start(0), start(1))
    );
    assert!(resolved.resolved_at.is_some());
    let keys: Vec<_> = got
        .iter()
        .map(|r| r.headers.get(IDEMPOTENCY_HEADER).unwrap().clone())
        .collect();
    assert_ne!(keys[0], keys[1]);

    let alerts = alerts::list_alerts(&db.pool, Some(IncidentStatus::Resolved), 10)
        .await
        .unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        (
            alerts[0].notifications_sent,
            alerts[0].notifications_pending
        ),
        (2, 0)
    );
    assert_eq!(
        (
            alerts[0].buckets,
            alerts[0].bad_buckets,
            alerts[0].max_missing
        ),
        (2, 0, 12)
    );
    assert!(
        alerts::list_alerts(&db.pool, Some(IncidentStatus::Open), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn no_alert_when_nothing_is_lost() {
    let db = TestDb::create().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(2) + 1_000);
    let s = sender(
        &db,
        alerts_config(vec![webhook("ops", receiver.url())]),
        &clock,
    );
    for n in 0..3 {
        bucket(&db, "orders", n, 40 + n, 40 + n).await;
    }
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!(report, Default::default());
    assert!(receiver.received().is_empty());
    assert!(
        alerts::list_alerts(&db.pool, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let judged: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_verdicts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(judged, 3, "the buckets were judged, and complete");
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_the_alert_once_it_is_back() {
    let db = TestDb::create().await.unwrap();
    // Reserve a port, then leave nothing listening on it.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{addr}/hook");
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let s = sender(&db, alerts_config(vec![webhook("ops", url)]), &clock);
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;

    let report = s.run_once().await.unwrap();
    assert_eq!((report.created, report.sent, report.failed), (1, 0, 1));
    // Not due again before the backoff.
    let report = s.run_once().await.unwrap();
    assert_eq!((report.sent, report.failed), (0, 0));
    clock.advance(chrono::Duration::seconds(1));
    let report = s.run_once().await.unwrap();
    assert_eq!(report.failed, 1, "retried after 1 s");
    clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        s.run_once().await.unwrap().failed,
        0,
        "the next backoff is 2 s"
    );

    // Meanwhile the loss heals: the resolved waits behind its firing.
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 3)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM alert_deliveries WHERE kind = 'firing'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 2);
    assert!(error.is_some());

    let receiver = Receiver::start_on(addr).await.unwrap();
    clock.advance(chrono::Duration::seconds(10));
    let report = s.run_once().await.unwrap();
    assert_eq!((report.sent, report.failed), (2, 0));
    for _ in 0..3 {
        clock.advance(chrono::Duration::seconds(10));
        s.run_once().await.unwrap();
    }
    let got = receiver.received();
    let events: Vec<_> = got.iter().map(|r| body(r).event).collect();
    assert_eq!(
        events,
        [NotificationKind::Firing, NotificationKind::Resolved]
    );
    assert!(
        got[0].headers.get(SIGNATURE_HEADER).is_none(),
        "no secret, no signature"
    );
}

#[tokio::test]
async fn filters_and_the_slack_format() {
    let db = TestDb::create().await.unwrap();
    let strict = Receiver::start().await.unwrap();
    let chat = Receiver::start().await.unwrap();
    let mut big_losses = webhook("big-losses", strict.url());
    big_losses.filters.min_missing_count = 100;
    let mut other_topics = webhook("payments-only", strict.url());
    other_topics.filters.topics = vec!["payments".into()];
    let mut slack = webhook("chat", chat.url());
    slack.format = WebhookFormat::Slack;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let s = sender(
        &db,
        alerts_config(vec![big_losses, other_topics, slack]),
        &clock,
    );
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;
    s.run_once().await.unwrap();
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 3)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    s.run_once().await.unwrap();

    assert!(
        strict.received().is_empty(),
        "filtered out: too small, other topic"
    );
    let got = chat.received();
    assert_eq!(got.len(), 2);
    let texts: Vec<String> = got
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 1, "only `text`: {v}");
            v["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(
        texts[0].contains("3 of 10 messages missing"),
        "{}",
        texts[0]
    );
    assert!(texts[0].contains("orders"), "{}", texts[0]);
    assert!(texts[1].contains("resolved"), "{}", texts[1]);
}

#[tokio::test]
async fn two_senders_never_send_the_same_firing_twice() {
    let db = TestDb::create().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(4) + 1_000);
    let config = alerts_config(vec![webhook("ops", receiver.url())]);
    let a = sender(&db, config.clone(), &clock);
    let b = sender(&db, config, &clock);
    // Five topics lose messages at once.
    for t in 0..5 {
        bucket(&db, &format!("topic-{t}"), 0, 10, 9).await;
    }
    pass(&r).await;
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.created + rb.created, 5);
    assert_eq!(ra.sent + rb.sent, 5);
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    assert_eq!(ra.unwrap().sent + rb.unwrap().sent, 0);
    let mut topics: Vec<String> = receiver.received().iter().map(|r| body(r).topic).collect();
    topics.sort();
    assert_eq!(
        topics,
        ["topic-0", "topic-1", "topic-2", "topic-3", "topic-4"]
    );
}

#[tokio::test]
async fn a_sender_that_dies_mid_delivery_leaves_the_notification_pending() {
    let db = TestDb::create().await.unwrap();
    let (hung_addr, mut seen_rx) = hung_receiver().await;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;

    let dying = sender(
        &db,
        alerts_config(vec![webhook("ops", format!("http://{hung_addr}/hook"))]),
        &clock,
    );
    let mut round = Box::pin(dying.run_once());
    // The request is on the wire: the sender "dies" (its future is dropped mid-transaction).
    let first = tokio::select! {
        got = seen_rx.recv() => got.expect("the hung receiver saw the request"),
        _ = &mut round => panic!("the round cannot finish: the receiver never answers"),
    };
    drop(round);
    drop(dying);
    let first = String::from_utf8_lossy(&first).to_lowercase();
    let key_line = first
        .lines()
        .find(|l| l.starts_with("idempotency-key:"))
        .expect("idempotency key sent")
        .to_owned();

    // Another sender (the restarted collector) delivers it, with the same idempotency key.
    let receiver = Receiver::start().await.unwrap();
    let restarted = sender(
        &db,
        alerts_config(vec![webhook("ops", receiver.url())]),
        &clock,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while receiver.received().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never delivered");
        // The dropped transaction is rolled back when its connection is cleaned up.
        restarted.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restarted.run_once().await.unwrap();
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(body(&got[0]).event, NotificationKind::Firing);
    let key = got[0]
        .headers
        .get(IDEMPOTENCY_HEADER)
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(key_line, format!("idempotency-key: {key}"));
    let (sent, attempts): (bool, i32) =
        sqlx::query_as("SELECT sent_at IS NOT NULL, attempts FROM alert_deliveries")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((sent, attempts), (true, 1));
}

#[tokio::test]
async fn a_hung_webhook_does_not_delay_the_others() {
    let db = TestDb::create().await.unwrap();
    let (hung_addr, mut hung_seen) = hung_receiver().await;
    let healthy = Receiver::start().await.unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    // The hung webhook comes first, so its deliveries have the lower ids: posted one after
    // the other, the healthy webhook would wait for the hung one's timeout.
    let mut cfg = alerts_config(vec![
        webhook("hung", format!("http://{hung_addr}/hook")),
        webhook("ops", healthy.url()),
    ]);
    cfg.request_timeout = Duration::from_secs(15);
    cfg.poll_interval = Duration::from_millis(100);
    let s = sender(&db, cfg, &clock);
    bucket(&db, "orders", 0, 100, 90).await;
    pass(&r).await;

    let mut round = Box::pin(s.run_once());
    // Everything below happens while the round is still waiting on the hung receiver: the
    // round cannot end before its 15 s request timeout.
    let while_hung = async {
        let request = hung_seen
            .recv()
            .await
            .expect("the hung receiver got its request");
        assert!(request.starts_with(b"POST /hook "));
        until(|| healthy.received().len() == 1).await;
        // Committed, not only posted (the commit follows the receiver's answer).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let sent: bool = sqlx::query_scalar(
                "SELECT sent_at IS NOT NULL FROM alert_deliveries WHERE webhook = 'ops'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if sent {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the healthy webhook's delivery is marked sent"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A loss on another topic while the hung webhook is still being waited on: the
        // healthy one hears of it too.
        bucket(&db, "payments", 0, 50, 40).await;
        pass(&r).await;
        until(|| healthy.received().len() == 2).await;
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::select! {
            result = &mut round => panic!(
                "the round ended ({result:?}) before the healthy webhook had both notifications"
            ),
            () = while_hung => {}
        }
    })
    .await;
    assert!(outcome.is_ok(), "the healthy webhook was not notified");
    let topics: Vec<String> = healthy.received().iter().map(|r| body(r).topic).collect();
    assert_eq!(topics, ["orders", "payments"]);
    assert!(
        hung_seen.try_recv().is_err(),
        "nothing else was posted to the hung receiver meanwhile"
    );

    // The hung receiver times out: that delivery is retried after its backoff, and the
    // webhook's other notification waits as long.
    let report = round.await.unwrap();
    assert_eq!(
        (report.events, report.created, report.sent, report.failed),
        (2, 4, 2, 1)
    );
    let hung_rows: Vec<(String, i32, bool, bool)> = sqlx::query_as(
        "SELECT d.body::json->>'topic', d.attempts, d.sent_at IS NULL,
                d.next_attempt_at > $1
           FROM alert_deliveries d WHERE d.webhook = 'hung' ORDER BY d.id",
    )
    .bind(clock.now())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        hung_rows,
        [
            ("orders".to_owned(), 1, true, true),
            ("payments".to_owned(), 0, true, true)
        ]
    );
    let error: Option<String> = sqlx::query_scalar(
        "SELECT last_error FROM alert_deliveries WHERE attempts = 1 AND webhook = 'hung'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(error.is_some_and(|e| e.contains("request failed")));
}
