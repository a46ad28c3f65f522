//! Alerts end to end against the real PostgreSQL of `dev/stack up`: verdicts written by the
//! reconciler reach a webhook receiver on 127.0.0.1 through the outbox, exactly once, signed;
//! over HTTPS to a receiver behind a private CA, and not to one whose certificate is untrusted.

mod reconcile_support;

use std::time::Duration;

use chaperone_collector::alerts::{
    self, AlertMetrics, AlertSender, AlertsConfig, IDEMPOTENCY_HEADER, IncidentStatus,
    NotificationKind, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookBody, WebhookConfig,
    WebhookFilters, WebhookFormat,
};
use chaperone_collector::reconcile::VerdictStatus;
use chaperone_test_support::{Notification, Receiver};
use reconcile_support::*;

/// Serves the collector's API (and `/metrics` of `registry`) over `pool` on a port of its own
/// until the returned token is cancelled.
async fn serve_api(
    pool: &sqlx::PgPool,
    registry: &prometheus::Registry,
    clock: chaperone_collector::Clock,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let state = chaperone_collector::api::ApiState {
        pool: pool.clone(),
        health_pool: chaperone_collector::api::health_pool(pool),
        registry: registry.clone(),
        token: None,
        status: std::sync::Arc::new(chaperone_collector::ingest::IngestStatus::new(0)),
        clock,
        metrics: chaperone_collector::metrics::IngestMetrics::register(registry).unwrap(),
        max_range: Duration::from_secs(86_400),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(chaperone_collector::api::serve(
        listener,
        chaperone_collector::router(state, Default::default()),
        stop.clone(),
    ));
    (api, stop)
}

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
        ca_file: None,
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

fn timestamp(r: &Notification) -> i64 {
    r.headers
        .get(TIMESTAMP_HEADER)
        .expect("timestamped")
        .to_str()
        .unwrap()
        .parse()
        .expect("epoch seconds")
}

fn verify_signature(r: &Notification) {
    let header = r
        .headers
        .get(SIGNATURE_HEADER)
        .expect("signed")
        .to_str()
        .unwrap();
    let ts = timestamp(r);
    assert_eq!(header, alerts::signature(SECRET.as_bytes(), ts, &r.body));
    assert_eq!(
        receiver_check(r, SECRET.as_bytes(), ts, Duration::from_secs(300)),
        Ok(())
    );
}

/// What the README tells a receiver to do, written independently of the crate: refuse a
/// timestamp more than `tolerance` away from its own clock (`now`, epoch seconds), then check
/// the HMAC-SHA256 of `"{timestamp}.{body}"` in constant time.
fn receiver_check(
    r: &Notification,
    secret: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), &'static str> {
    use hmac::Mac as _;
    let ts = r
        .headers
        .get(TIMESTAMP_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or("no timestamp")?;
    if now.abs_diff(ts) > tolerance.as_secs() {
        return Err("timestamp outside the tolerance: a replay");
    }
    let hex = r
        .headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .ok_or("no signature")?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&r.body);
    mac.verify_slice(&::hex::decode(hex).map_err(|_| "signature is not hex")?)
        .map_err(|_| "bad signature")
}

fn body(r: &Notification) -> WebhookBody {
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
    let db = reconcile_db().await.unwrap();
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
            "http://collector.test:8080/incidents/{}",
            firing.incident_id
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
    let db = reconcile_db().await.unwrap();
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
    let db = reconcile_db().await.unwrap();
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
    let db = reconcile_db().await.unwrap();
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
    let db = reconcile_db().await.unwrap();
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
    let db = reconcile_db().await.unwrap();
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
    let db = reconcile_db().await.unwrap();
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

/// A certificate authority made for one test, and a server certificate for 127.0.0.1 it signed.
struct TestPki {
    ca_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestPki {
    fn new(name: &str) -> Self {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            server_cert: leaf_cert.der().clone(),
            server_key: leaf_key.serialize_der(),
        }
    }

    /// Writes the CA certificate to a PEM file of its own.
    fn ca_file(&self) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("chaperone-ca-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

use tokio_rustls::rustls;

/// TLS in front of a TCP listener, for `axum::serve`; counts the handshakes that failed (a
/// client that refuses the certificate aborts the handshake).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    failed_handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(_) => {
                    self.failed_handshakes
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An HTTPS webhook receiver on 127.0.0.1 with the certificate of `pki`: the shared receiver
/// behind [`TlsListener`]; stops when dropped.
struct HttpsReceiver {
    addr: std::net::SocketAddr,
    receiver: Receiver,
    failed_handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HttpsReceiver {
    async fn start(pki: &TestPki) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_cert.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
            )
            .unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let failed_handshakes = std::sync::Arc::default();
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)),
            failed_handshakes: std::sync::Arc::clone(&failed_handshakes),
        };
        let receiver = Receiver::serve(listener).unwrap();
        Self {
            addr: receiver.addr(),
            receiver,
            failed_handshakes,
        }
    }

    fn received(&self) -> Vec<Notification> {
        self.receiver.received()
    }

    fn failed_handshakes(&self) -> usize {
        self.failed_handshakes
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn an_https_receiver_behind_a_private_ca_gets_a_notification_that_verifies() {
    let db = reconcile_db().await.unwrap();
    let pki = TestPki::new("private");
    let receiver = HttpsReceiver::start(&pki).await;
    let mut hook = webhook(
        "ops",
        format!("https://ops:basic-pw@{}/hook/abc", receiver.addr),
    );
    hook.secret_file = Some(secret_file());
    hook.ca_file = Some(pki.ca_file());
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let s = sender(&db, alerts_config(vec![hook]), &clock);
    bucket(&db, "orders", 0, 100, 97).await;
    pass(&r).await;

    let report = s.run_once().await.unwrap();
    assert_eq!((report.created, report.sent, report.failed), (1, 1, 0));
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(receiver.failed_handshakes(), 0);
    let firing = body(&got[0]);
    assert_eq!((firing.topic.as_str(), firing.difference), ("orders", -3));
    // Signed over the timestamp and the body, stamped with the sender's clock.
    let ts = timestamp(&got[0]);
    assert_eq!(ts, clock.now().timestamp());
    verify_signature(&got[0]);
    // The documented receiver check: a replay outside the window is refused, and so is the
    // same signature under another timestamp.
    let five_minutes = Duration::from_secs(300);
    assert_eq!(
        receiver_check(&got[0], SECRET.as_bytes(), ts + 301, five_minutes),
        Err("timestamp outside the tolerance: a replay")
    );
    let mut shifted = got[0].clone();
    shifted
        .headers
        .insert(TIMESTAMP_HEADER, (ts + 1).to_string().parse().unwrap());
    assert_eq!(
        receiver_check(&shifted, SECRET.as_bytes(), ts, five_minutes),
        Err("bad signature")
    );
    // The URL's credentials went as HTTP basic authentication.
    assert_eq!(
        got[0].headers.get("authorization").unwrap(),
        &format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "ops:basic-pw")
        )
    );
}

/// Collects every log line (debug and up) of the current thread's tracing.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn an_untrusted_certificate_is_retried_and_shown_with_the_url_redacted() {
    let logs = LogCapture::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let db = reconcile_db().await.unwrap();
    let pki = TestPki::new("receiver");
    let receiver = HttpsReceiver::start(&pki).await;
    let url = format!(
        "https://alice:hunter2-secret@{}/hook/path-token",
        receiver.addr
    );
    // Trusts the built-in web roots only: the receiver's private CA is unknown.
    let public_roots = webhook("public-roots", url.clone());
    // Trusts a private CA, but not the one that signed the receiver's certificate.
    let mut other_ca = webhook("other-ca", url.clone());
    other_ca.ca_file = Some(TestPki::new("another").ca_file());
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let registry = prometheus::Registry::new();
    let metrics = AlertMetrics::new(&registry).unwrap();
    let s = AlertSender::new(
        db.pool.clone(),
        alerts_config(vec![public_roots, other_ca]),
        clock.clock(),
        metrics,
    )
    .unwrap();
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;

    let report = s.run_once().await.unwrap();
    assert_eq!((report.created, report.sent, report.failed), (2, 0, 2));
    // Retried after the backoff, and refused again.
    clock.advance(chrono::Duration::seconds(1));
    let report = s.run_once().await.unwrap();
    assert_eq!((report.sent, report.failed), (0, 2));
    assert!(receiver.received().is_empty(), "no request got through");
    assert!(
        receiver.failed_handshakes() >= 4,
        "each attempt was refused at the handshake ({})",
        receiver.failed_handshakes()
    );

    // The API and /metrics of the collector show it.
    let (api, stop) = serve_api(&db.pool, &registry, clock.clock()).await;
    let get = |path: &str| {
        let url = format!("http://{api}{path}");
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let metrics_text = get("/metrics").await;
    for hook in ["public-roots", "other-ca"] {
        let line = format!(
            "chaperone_collector_alerts_webhook_deliveries_total{{result=\"failed\",webhook=\"{hook}\"}} 2"
        );
        assert!(metrics_text.contains(&line), "{line} in\n{metrics_text}");
    }
    let alerts_text = get("/api/v1/alerts?status=open").await;
    stop.cancel();
    let alerts: serde_json::Value = serde_json::from_str(&alerts_text).unwrap();
    let deliveries = alerts["alerts"][0]["deliveries"]
        .as_array()
        .unwrap_or_else(|| panic!("deliveries in {alerts}"));
    assert_eq!(deliveries.len(), 2, "{alerts}");
    let shown = format!("https://***@{}/…", receiver.addr);
    for d in deliveries {
        assert_eq!(d["attempts"], 2, "{d}");
        assert!(d["sent_at"].is_null(), "{d}");
        let error = d["last_error"].as_str().unwrap_or_else(|| panic!("{d}"));
        assert!(error.contains(&shown), "{error}");
        assert!(error.contains("certificate"), "{error}");
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    let logs = logs.text();
    assert!(
        logs.contains("webhook delivery failed") && logs.contains(&shown),
        "the failure is logged with the URL redacted:\n{logs}"
    );
    for secret in ["alice", "hunter2-secret", "path-token"] {
        assert!(!alerts_text.contains(secret), "{secret} in {alerts_text}");
        assert!(!metrics_text.contains(secret), "{secret} in the metrics");
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}

/// The topic a notification is about.
fn topic_of(r: &Notification) -> String {
    body(r).topic
}

/// `SELECT` of one delivery's state as stored: (state, attempts, refusals, last_status,
/// last_error).
type Stored = (String, i32, i32, Option<i32>, Option<String>);

async fn stored(db: &TestDb, webhook: &str, topic: &str, kind: &str) -> Stored {
    sqlx::query_as(
        "SELECT CASE WHEN sent_at IS NOT NULL THEN 'sent'
                     WHEN parked_at IS NOT NULL THEN 'parked' ELSE 'pending' END,
                attempts, refusals, last_status, last_error
           FROM alert_deliveries
          WHERE webhook = $1 AND body::json->>'topic' = $2 AND kind = $3",
    )
    .bind(webhook)
    .bind(topic)
    .bind(kind)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// What a receiver that refuses `orders` answers: a 400 with a long explanation.
fn refusal_text() -> String {
    format!(
        "no route for topic orders\r\n\tchannel #orders-alerts was archived; {}",
        "x".repeat(400)
    )
}

/// A receiver refusing the notifications of topic `orders` (400), accepting the others.
async fn refuses_orders() -> Receiver {
    Receiver::start_answering(|n: &Notification| {
        if topic_of(n) == "orders" {
            (axum::http::StatusCode::BAD_REQUEST, refusal_text())
        } else {
            (axum::http::StatusCode::OK, String::new())
        }
    })
    .await
    .unwrap()
}

/// Three refusals park a notification; the webhook's other notifications, before and after
/// it, arrive.
fn parking_config(webhooks: Vec<WebhookConfig>) -> AlertsConfig {
    AlertsConfig {
        max_attempts: 3,
        ..alerts_config(webhooks)
    }
}

#[tokio::test]
async fn a_refused_notification_is_parked_and_the_others_still_arrive() {
    let db = reconcile_db().await.unwrap();
    let receiver = refuses_orders().await;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let registry = prometheus::Registry::new();
    let metrics = AlertMetrics::new(&registry).unwrap();
    let s = AlertSender::new(
        db.pool.clone(),
        parking_config(vec![webhook("ops", receiver.url())]),
        clock.clock(),
        metrics.clone(),
    )
    .unwrap();
    let posted = |topic: &str| {
        receiver
            .received()
            .iter()
            .filter(|n| topic_of(n) == topic)
            .count()
    };
    // orders first: its refusal does not hold back payments, posted right after it.
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;
    bucket(&db, "payments", 0, 10, 8).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!(
        (report.created, report.sent, report.failed, report.refused),
        (2, 1, 1, 1),
        "{report:?}"
    );
    assert_eq!((posted("orders"), posted("payments")), (1, 1));
    let (state, attempts, refusals, status, error) = stored(&db, "ops", "orders", "firing").await;
    assert_eq!(
        (state.as_str(), attempts, refusals, status),
        ("pending", 1, 1, Some(400))
    );
    let error = error.expect("why");
    assert!(
        error.contains("receiver answered 400 Bad Request: no route for topic orders channel #orders-alerts was archived"),
        "{error}"
    );

    // Refused again after 1 s; a loss of another topic meanwhile arrives in the same round.
    clock.advance(chrono::Duration::seconds(1));
    bucket(&db, "shipping", 0, 20, 19).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.refused, report.parked),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!((posted("orders"), posted("shipping")), (2, 1));

    // The third refusal (2 s later) parks it.
    clock.advance(chrono::Duration::seconds(2));
    let report = s.run_once().await.unwrap();
    assert_eq!((report.refused, report.parked), (1, 1), "{report:?}");
    let (state, attempts, refusals, status, error) = stored(&db, "ops", "orders", "firing").await;
    assert_eq!(
        (state.as_str(), attempts, refusals, status),
        ("parked", 3, 3, Some(400))
    );
    let error = error.expect("why");
    assert!(error.ends_with('…'), "the answer is cut: {error}");
    assert!(
        error.chars().filter(|c| *c == 'x').count() < 256,
        "at most {} bytes of the answer: {error}",
        alerts::ERROR_BODY_BYTES
    );

    // Never tried again; later notifications of the webhook go on.
    for _ in 0..5 {
        clock.advance(chrono::Duration::minutes(10));
        s.run_once().await.unwrap();
    }
    bucket(&db, "inventory", 0, 30, 27).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!((report.sent, report.failed), (1, 0), "{report:?}");
    assert_eq!(posted("orders"), 3, "three attempts, then parked");
    let mut arrived: Vec<String> = receiver
        .received()
        .iter()
        .map(topic_of)
        .filter(|t| t != "orders")
        .collect();
    arrived.sort();
    assert_eq!(arrived, ["inventory", "payments", "shipping"]);

    // The parked incident heals: its resolved is parked too, never posted.
    add_counts(&db.pool, "orders", start(0), "aggregate", "dc1", 0, 3)
        .await
        .unwrap();
    rejudge(&r, &clock).await;
    let report = s.run_once().await.unwrap();
    assert_eq!((report.created, report.parked), (1, 1), "{report:?}");
    assert_eq!(posted("orders"), 3);
    let (state, attempts, _, _, error) = stored(&db, "ops", "orders", "resolved").await;
    assert_eq!((state.as_str(), attempts), ("parked", 0));
    assert!(error.is_some_and(|e| e.contains("firing notification of this incident was parked")));

    let parked = metrics.parked.with_label_values(&["ops"]).get();
    assert_eq!(
        (parked, metrics.parked_now.get(), metrics.pending.get()),
        (2, 2, 0)
    );
}

#[tokio::test]
async fn a_receiver_failing_longer_than_max_age_has_its_old_notifications_parked() {
    let db = reconcile_db().await.unwrap();
    // Answers 503 until told otherwise.
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answer = std::sync::Arc::clone(&failing);
    let receiver = Receiver::start_answering(move |_| {
        if answer.load(std::sync::atomic::Ordering::SeqCst) {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "maintenance".to_owned(),
            )
        } else {
            (axum::http::StatusCode::OK, String::new())
        }
    })
    .await
    .unwrap();
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let cfg = AlertsConfig {
        max_attempts: 2,
        max_age: Duration::from_secs(60),
        ..alerts_config(vec![webhook("ops", receiver.url())])
    };
    let s = sender(&db, cfg, &clock);
    bucket(&db, "orders", 0, 10, 7).await;
    bucket(&db, "payments", 0, 10, 8).await;
    pass(&r).await;

    // 503 is not a refusal: more than max_attempts attempts, still pending, and the other
    // notification waits behind it.
    let mut attempts = 0;
    for step in [0, 1, 2, 4] {
        clock.advance(chrono::Duration::seconds(step));
        let report = s.run_once().await.unwrap();
        assert_eq!(
            (report.sent, report.failed, report.refused, report.parked),
            (0, 1, 0, 0),
            "{report:?}"
        );
        attempts += 1;
    }
    assert_eq!(receiver.received().len(), attempts);
    let (state, tried, refusals, status, error) = stored(&db, "ops", "orders", "firing").await;
    assert_eq!(
        (state.as_str(), tried, refusals, status),
        ("pending", 4, 0, Some(503))
    );
    assert!(error.is_some_and(|e| e.contains("503 Service Unavailable: maintenance")));

    // Past max_age since they were created: the next failure parks both.
    clock.advance(chrono::Duration::seconds(60));
    let report = s.run_once().await.unwrap();
    assert_eq!((report.failed, report.parked), (1, 2), "{report:?}");
    for topic in ["orders", "payments"] {
        let (state, _, _, status, _) = stored(&db, "ops", topic, "firing").await;
        assert_eq!((state.as_str(), status), ("parked", Some(503)), "{topic}");
    }
    let (_, tried, _, _, error) = stored(&db, "ops", "payments", "firing").await;
    assert_eq!(tried, 0, "parked with the one that was tried");
    assert!(error.is_some_and(|e| e.starts_with("not delivered within alerts.max_age")));

    // The receiver is back: what comes next is delivered, the parked ones are not.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    clock.advance(chrono::Duration::minutes(10));
    bucket(&db, "shipping", 0, 10, 9).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!((report.sent, report.failed), (1, 0), "{report:?}");
    let last = receiver.received();
    assert_eq!(last.len(), attempts + 2);
    assert_eq!(topic_of(last.last().unwrap()), "shipping");
}

#[tokio::test]
async fn a_parked_notification_shows_in_the_api_the_incident_page_and_the_metrics() {
    let db = reconcile_db().await.unwrap();
    let receiver = refuses_orders().await;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    let registry = prometheus::Registry::new();
    let metrics = AlertMetrics::new(&registry).unwrap();
    let s = AlertSender::new(
        db.pool.clone(),
        AlertsConfig {
            max_attempts: 1,
            ..alerts_config(vec![webhook("ops", receiver.url())])
        },
        clock.clock(),
        metrics,
    )
    .unwrap();
    bucket(&db, "orders", 0, 10, 7).await;
    pass(&r).await;
    let report = s.run_once().await.unwrap();
    assert_eq!((report.refused, report.parked), (1, 1), "{report:?}");

    let (api, stop) = serve_api(&db.pool, &registry, clock.clock()).await;
    let get = |path: String| {
        let url = format!("http://{api}{path}");
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };

    let alerts: serde_json::Value =
        serde_json::from_str(&get("/api/v1/alerts?status=open".into()).await).unwrap();
    let alert = &alerts["alerts"][0];
    assert_eq!(
        (
            &alert["notifications_sent"],
            &alert["notifications_pending"],
            &alert["notifications_parked"]
        ),
        (&0.into(), &0.into(), &1.into()),
        "{alert}"
    );
    let d = &alert["deliveries"][0];
    assert_eq!(d["state"], "parked", "{d}");
    assert_eq!(
        (&d["attempts"], &d["last_status"]),
        (&1.into(), &400.into())
    );
    assert!(d["parked_at"].is_string(), "{d}");
    assert!(d["sent_at"].is_null(), "{d}");
    let error = d["last_error"].as_str().unwrap_or_else(|| panic!("{d}"));
    assert!(
        error.contains("400 Bad Request: no route for topic orders"),
        "{error}"
    );

    let page = get(format!("/incidents/{}", alert["id"])).await;
    for needle in [
        "data-notifications-parked=\"1\"",
        "data-state=\"parked\"",
        "data-last-status=\"400\"",
        "no route for topic orders",
    ] {
        assert!(page.contains(needle), "{needle} in\n{page}");
    }

    let metrics_text = get("/metrics".into()).await;
    stop.cancel();
    for line in [
        "chaperone_collector_alerts_webhook_deliveries_parked_total{webhook=\"ops\"} 1",
        "chaperone_collector_alerts_parked_deliveries 1",
        "chaperone_collector_alerts_pending_deliveries 0",
    ] {
        assert!(metrics_text.contains(line), "{line} in\n{metrics_text}");
    }
}

/// A receiver on 127.0.0.1 that reads each request whole, reports it on the channel and
/// answers `200 OK` only once `release` has a permit for it.
async fn gated_receiver() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<String>,
    std::sync::Arc<tokio::sync::Semaphore>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel::<String>(16);
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = std::sync::Arc::clone(&release);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen_tx.clone();
            let gate = std::sync::Arc::clone(&gate);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                // Headers, then as many body bytes as Content-Length says.
                let complete = |r: &[u8]| {
                    let text = String::from_utf8_lossy(r).to_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        return false;
                    };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    r.len() >= end + 4 + length
                };
                while !complete(&request) {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                seen.send(String::from_utf8_lossy(&request).into_owned())
                    .await
                    .ok();
                let Ok(permit) = gate.acquire().await else {
                    return;
                };
                permit.forget();
                conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await
                .ok();
                conn.shutdown().await.ok();
            });
        }
    });
    (addr, seen_rx, release)
}

/// The `Idempotency-Key` of a raw request.
fn idempotency_key(request: &str) -> String {
    request
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("idempotency-key:")
                .map(|v| v.trim().to_owned())
        })
        .expect("idempotency key sent")
}

async fn sent_keys(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT idempotency_key FROM alert_deliveries WHERE sent_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn each_answered_notification_is_committed_at_once_so_a_new_leader_does_not_resend_it() {
    let db = reconcile_db().await.unwrap();
    let (addr, mut seen, release) = gated_receiver().await;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    for topic in ["orders", "payments"] {
        bucket(&db, topic, 0, 10, 7).await;
    }
    pass(&r).await;
    // Long enough that only the drop below ends the round.
    let mut cfg = alerts_config(vec![webhook("ops", format!("http://{addr}/hook"))]);
    cfg.request_timeout = Duration::from_secs(120);
    let old_leader = sender(&db, cfg, &clock);
    // The first notification is answered, the second hangs: the leader loses its leadership
    // (its round is dropped) while waiting on it.
    release.add_permits(1);
    let mut round = Box::pin(old_leader.run_once());
    let mut requests = Vec::new();
    while requests.len() < 2 {
        tokio::select! {
            got = seen.recv() => requests.push(got.expect("the receiver is up")),
            result = &mut round => panic!("the round cannot end, the second POST hangs: {result:?}"),
        }
    }
    let first = idempotency_key(&requests[0]);
    // Committed while the round still waits on the second answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sent_keys(&db).await != [first.clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "the answered notification is committed as sent before the round ends"
        );
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            result = &mut round => panic!("the round ended: {result:?}"),
        }
    }
    drop(round);
    drop(old_leader);

    // The new leader sends only the one that was in flight, with the same key.
    let receiver = Receiver::start().await.unwrap();
    let new_leader = sender(
        &db,
        alerts_config(vec![webhook("ops", receiver.url())]),
        &clock,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while receiver.received().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never delivered");
        // The dropped transaction is rolled back when its connection is cleaned up.
        new_leader.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    new_leader.run_once().await.unwrap();
    let got = receiver.received();
    assert_eq!(
        got.len(),
        1,
        "only the notification in flight is sent again"
    );
    assert_eq!(
        got[0].headers.get(IDEMPOTENCY_HEADER).unwrap(),
        idempotency_key(&requests[1]).as_str()
    );
    assert_eq!(sent_keys(&db).await.len(), 2);
}

#[tokio::test]
async fn a_stopping_sender_commits_the_notification_in_flight() {
    let db = reconcile_db().await.unwrap();
    let (addr, mut seen, release) = gated_receiver().await;
    let (r, clock) = reconciler(&db.pool, config(), end(0) + 1_000);
    bucket(&db, "orders", 0, 10, 7).await;
    bucket(&db, "payments", 0, 10, 7).await;
    pass(&r).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let metrics = AlertMetrics::new(&prometheus::Registry::new()).unwrap();
    let mut cfg = alerts_config(vec![webhook("ops", format!("http://{addr}/hook"))]);
    cfg.request_timeout = Duration::from_secs(60);
    let running = tokio::spawn(alerts::run_with_clock(
        db.pool.clone(),
        cfg,
        clock.clock(),
        metrics,
        shutdown.clone(),
    ));
    let request = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("posted")
        .expect("the receiver is up");
    // Leadership ends while the first POST waits on its answer; then the answer comes.
    shutdown.cancel();
    release.add_permits(1);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the sender stops")
        .unwrap()
        .unwrap();
    assert_eq!(
        sent_keys(&db).await,
        [idempotency_key(&request)],
        "the answered notification is committed, the other is not started"
    );
    assert!(seen.try_recv().is_err(), "nothing posted after the stop");
}
