//! The proxy killed with SIGKILL mid-load and restarted on its spool, against the regional
//! cluster of `dev/stack up`: every record a caller got a 200 for is in Kafka, the requests
//! the kill cut off succeed when retried with their `Idempotency-Key`, and the audit counts
//! never exceed what Kafka holds.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chaperone_test_support::{eventually, unique};
use support::{audit_counts, config, kcat, topic};
use tokio::process::{Child, Command};

const BINARY: &str = "application/vnd.kafka.binary.v2+json";
const RECORDS_PER_REQUEST: usize = 10;

fn spawn_proxy(config_file: &std::path::Path, instance: &str) -> anyhow::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_chaperone-rest-proxy"))
        .arg("--config")
        .arg(config_file)
        .arg("--instance")
        .arg(instance)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting chaperone-rest-proxy")
}

async fn ready(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    eventually("the proxy to be ready", Duration::from_secs(60), || {
        let (client, url) = (client.clone(), url.to_owned());
        async move {
            Ok(client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        }
    })
    .await
}

/// One request of the load: its key, its values, and how it ended.
#[derive(Debug, Clone)]
struct Sent {
    key: String,
    values: Vec<String>,
    acked: bool,
}

fn request_body(values: &[String]) -> String {
    let records: Vec<String> = values
        .iter()
        .map(|v| {
            format!(
                "{{\"value\":\"{}\"}}",
                base64::engine::general_purpose::STANDARD.encode(v)
            )
        })
        .collect();
    format!("{{\"records\":[{}]}}", records.join(","))
}

async fn send(client: &reqwest::Client, url: &str, s: &Sent) -> anyhow::Result<bool> {
    let r = client
        .post(url)
        .header("content-type", BINARY)
        .header("idempotency-key", &s.key)
        .body(request_body(&s.values))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    if r.status().as_u16() != 200 {
        return Ok(false);
    }
    let v: serde_json::Value = r.json().await?;
    Ok(v["offsets"]
        .as_array()
        .is_some_and(|o| o.iter().all(|e| e["error_code"].is_null())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_loses_no_acknowledged_record_and_its_restart_delivers_the_retries()
-> anyhow::Result<()> {
    let c = config().await?;
    let t = topic(3).await?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let file = support::temp_file("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "bootstrap_servers = \"{}\"\nhttp_addr = \"127.0.0.1:{port}\"\n[audit]\ntopic = \"{}\"\nflush_interval = \"1s\"\nspool_dir = \"{}\"\n",
            c.bootstrap_servers,
            c.audit.topic,
            c.audit.spool_dir.display()
        ),
    )?;
    let killed = unique("killed");
    let restarted = unique("restarted");
    let mut first = spawn_proxy(&file, &killed)?;
    ready(&url).await?;

    // Four callers send batches of 10 records, each request with its own key.
    let produce_url = format!("{url}/topics/{t}");
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let client = reqwest::Client::new();
    let callers: Vec<_> = (0..4)
        .map(|caller| {
            let (client, url, log) = (client.clone(), produce_url.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("c{caller}-r{i}");
                    let values = (0..RECORDS_PER_REQUEST)
                        .map(|j| format!("{key}-{j}"))
                        .collect();
                    let mut s = Sent {
                        key,
                        values,
                        acked: false,
                    };
                    let ok = send(&client, &url, &s).await;
                    s.acked = matches!(ok, Ok(true));
                    log.lock().unwrap().push(s);
                    if ok.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    eventually(
        "200 acknowledged requests",
        Duration::from_secs(120),
        || {
            let n = log.lock().unwrap().iter().filter(|s| s.acked).count();
            std::future::ready(Ok((n >= 200).then_some(())))
        },
    )
    .await?;
    // Killed once it has delivered some counts, so that both of its sides show below.
    audit_counts(&c.audit.topic, &t, 1).await?;
    first.start_kill()?;
    first.wait().await?;
    for c in callers {
        c.await?;
    }
    let sent = log.lock().unwrap().clone();
    let acked_first: Vec<&Sent> = sent.iter().filter(|s| s.acked).collect();
    let cut_off: Vec<&Sent> = sent.iter().filter(|s| !s.acked).collect();
    assert!(!cut_off.is_empty(), "the kill cut no request off");

    // Restarted on the same spool, the callers retry what the kill cut off, same keys.
    let mut second = spawn_proxy(&file, &restarted)?;
    ready(&url).await?;
    for s in &cut_off {
        assert!(
            send(&client, &produce_url, s).await?,
            "retry of {} failed",
            s.key
        );
    }
    // A clean stop: SIGTERM, then the audit's closing flush.
    let pid = second.id().context("pid")?;
    support::sh(&format!("kill -TERM {pid}")).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), second.wait()).await??;
    assert!(status.success(), "{status}");

    let in_kafka = kcat(
        &t,
        (acked_first.len() + cut_off.len()) * RECORDS_PER_REQUEST,
    )
    .await?;
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &in_kafka {
        *copies.entry(r.value.as_str()).or_default() += 1;
    }
    for s in &acked_first {
        for v in &s.values {
            assert_eq!(
                copies.get(v.as_str()),
                Some(&1),
                "{v} acknowledged before the kill"
            );
        }
    }
    for s in &cut_off {
        for v in &s.values {
            let n = copies.get(v.as_str()).copied().unwrap_or(0);
            assert!(
                (1..=2).contains(&n),
                "{v} retried after the kill is in kafka {n} times"
            );
        }
    }
    // The restarted instance counted exactly what it acknowledged; the killed one never more
    // than Kafka holds (it loses at most its last flush interval).
    let retried = (cut_off.len() * RECORDS_PER_REQUEST) as u64;
    let counts = audit_counts(&c.audit.topic, &t, retried).await?;
    let by_instance = counts
        .iter()
        .fold(BTreeMap::<&str, u64>::new(), |mut m, ((i, _), n)| {
            *m.entry(i.as_str()).or_default() += n;
            m
        });
    assert_eq!(
        by_instance.get(restarted.as_str()),
        Some(&retried),
        "{by_instance:?}"
    );
    let killed_counted = by_instance.get(killed.as_str()).copied().unwrap_or(0);
    assert!(killed_counted > 0, "{by_instance:?}");
    assert!(
        killed_counted + retried <= in_kafka.len() as u64,
        "audit {killed_counted} + {retried} > {} in kafka",
        in_kafka.len()
    );
    support::remove_spool(&c);
    let _ = std::fs::remove_file(file);
    Ok(())
}
