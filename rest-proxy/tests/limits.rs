//! Idempotency keys, the in-flight bound (429), the request size limit (413) and client
//! authentication, against the regional cluster of `dev/stack up`.

mod support;

use std::time::Duration;

use chaperone_test_support::{end_offsets, eventually, regional_bootstrap};
use support::{config, start, topic};
use tokio::io::AsyncWriteExt as _;

const BINARY: &str = "application/vnd.kafka.binary.v2+json";

async fn ends(t: &str) -> anyhow::Result<i64> {
    let t = t.to_owned();
    let offsets =
        tokio::task::spawn_blocking(move || end_offsets(&regional_bootstrap(), &t, 1)).await??;
    Ok(offsets.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_produces_once_even_for_concurrent_duplicates() -> anyhow::Result<()> {
    let proxy = start(config().await?).await?;
    let t = topic(1).await?;
    let url = format!("{}/topics/{t}", proxy.url);
    let client = reqwest::Client::new();
    let send = |key: &'static str, body: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client
                .post(url)
                .header("content-type", BINARY)
                .header("idempotency-key", key)
                .body(body)
                .send()
                .await?;
            anyhow::Ok((r.status().as_u16(), r.text().await?))
        }
    };
    let batch = r#"{"records":[{"value":"YQ=="},{"value":"Yg=="}]}"#;
    let first = send("order-1", batch).await?;
    assert_eq!(first.0, 200);
    assert_eq!(send("order-1", batch).await?, first);
    assert_eq!(ends(&t).await?, 2);
    // The same key with another body is refused, not produced.
    let (status, body) = send("order-1", r#"{"records":[{"value":"Yw=="}]}"#).await?;
    assert_eq!((status, body.contains("42206")), (422, true), "{body}");
    // Concurrent duplicates: one produces, all get its response.
    let all = futures_util::future::join_all((0..8).map(|_| send("order-2", batch))).await;
    let answers: Vec<(u16, String)> = all.into_iter().collect::<Result<_, _>>()?;
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 200);
    assert_eq!(ends(&t).await?, 4);
    let metrics = client
        .get(format!("{}/metrics", proxy.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("chaperone_rest_proxy_idempotent_replays_total 8"),
        "{metrics}"
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_bound_requests_get_429_with_retry_after() -> anyhow::Result<()> {
    let mut c = config().await?;
    c.max_request_bytes = 64 * 1024;
    c.max_in_flight_bytes = 64 * 1024;
    let proxy = start(c).await?;
    let t = topic(1).await?;
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    // A chunked request whose body never comes holds the whole bound.
    let mut hog = tokio::net::TcpStream::connect(&addr).await?;
    hog.write_all(
        format!("POST /topics/{t} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {BINARY}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let client = reqwest::Client::new();
    let url = format!("{}/topics/{t}", proxy.url);
    let body = r#"{"records":[{"value":"YQ=="}]}"#;
    let (retry_after, text) = eventually("a 429", Duration::from_secs(30), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client
                .post(url)
                .header("content-type", BINARY)
                .body(body)
                .send()
                .await?;
            if r.status().as_u16() != 429 {
                return Ok(None);
            }
            let ra = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            Ok(Some((ra, r.text().await?)))
        }
    })
    .await?;
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        text.starts_with(r#"{"error_code":429,"message":"#),
        "{text}"
    );
    drop(hog);
    eventually(
        "a 200 once the bound is free",
        Duration::from_secs(30),
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client
                    .post(url)
                    .header("content-type", BINARY)
                    .body(body)
                    .send()
                    .await?;
                Ok((r.status().as_u16() == 200).then_some(()))
            }
        },
    )
    .await?;
    // Over the request limit: 413 before anything is read.
    let big = format!(r#"{{"records":[{{"value":"{}"}}]}}"#, "A".repeat(70 * 1024));
    let r = client
        .post(&url)
        .header("content-type", BINARY)
        .body(big)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 413);
    assert!(r.text().await?.starts_with(r#"{"error_code":413,"#));
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_authenticate_with_tokens_or_basic_from_secret_files() -> anyhow::Result<()> {
    let token_file = support::temp_file("token");
    let password_file = support::temp_file("password");
    std::fs::write(&token_file, "t0ken\n")?;
    std::fs::write(&password_file, "pa55\n")?;
    let mut c = config().await?;
    c.auth
        .bearer
        .push(chaperone_rest_proxy::config::BearerClient {
            client: "orders".into(),
            token_file: token_file.clone(),
        });
    c.auth
        .basic
        .push(chaperone_rest_proxy::config::BasicClient {
            user: "alice".into(),
            password_file: password_file.clone(),
        });
    let proxy = start(c).await?;
    let t = topic(1).await?;
    let url = format!("{}/topics/{t}", proxy.url);
    let client = reqwest::Client::new();
    let body = r#"{"records":[{"value":"YQ=="}]}"#;
    let post = |auth: Option<(&str, &str)>, bearer: Option<&str>| {
        let mut r = client.post(&url).header("content-type", BINARY).body(body);
        if let Some((u, p)) = auth {
            r = r.basic_auth(u, Some(p));
        }
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        async move { anyhow::Ok(r.send().await?.status().as_u16()) }
    };
    assert_eq!(post(None, None).await?, 401);
    assert_eq!(post(None, Some("wrong")).await?, 401);
    assert_eq!(post(Some(("alice", "wrong")), None).await?, 401);
    assert_eq!(post(None, Some("t0ken")).await?, 200);
    assert_eq!(post(Some(("alice", "pa55")), None).await?, 200);
    let r = client.get(format!("{}/topics", proxy.url)).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.text().await?,
        r#"{"error_code":401,"message":"HTTP 401 Unauthorized"}"#
    );
    assert_eq!(
        client
            .get(format!("{}/metrics", proxy.url))
            .send()
            .await?
            .status()
            .as_u16(),
        200
    );
    let _ = std::fs::remove_file(token_file);
    let _ = std::fs::remove_file(password_file);
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_is_served_over_tls() -> anyhow::Result<()> {
    let dir = support::temp_file("tls");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // A CA and a certificate it signed for localhost, as a site would have.
    support::sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
         -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
         -keyout key.pem -out leaf.csr 2>/dev/null && \
         printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
         -extfile ext -out cert.pem 2>/dev/null",
        d = dir.display()
    ))
    .await?;
    let mut c = config().await?;
    c.tls = Some(chaperone_rest_proxy::config::TlsConfig {
        cert_file: cert.clone(),
        key_file: key.clone(),
    });
    let tls_client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            dir.join("ca.pem"),
        )?)?)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let proxy = tokio::spawn(chaperone_rest_proxy::run(
        c,
        chaperone_rest_proxy::Deps {
            listener: Some(listener),
            ..chaperone_rest_proxy::Deps::default()
        },
        shutdown.clone(),
    ));
    let t = topic(1).await?;
    let url = format!("https://localhost:{port}/topics/{t}");
    let (status, body) = eventually("a produce over https", Duration::from_secs(60), || {
        let (client, url) = (tls_client.clone(), url.clone());
        async move {
            let r = match client
                .post(url)
                .header("content-type", BINARY)
                .body(r#"{"records":[{"value":"YQ=="}]}"#)
                .send()
                .await
            {
                Ok(r) => r,
                Err(_) => return Ok(None),
            };
            Ok(Some((r.status().as_u16(), r.text().await?)))
        }
    })
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        r#"{"offsets":[{"partition":0,"offset":0,"error_code":null,"error":null}],"key_schema_id":null,"value_schema_id":null}"#
    );
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/topics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    shutdown.cancel();
    proxy.await??;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
