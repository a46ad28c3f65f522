//! A broker that stops while the proxy produces to it: requests get 50003 (HTTP 500), never a
//! 200.
//!
//! The shared stack's brokers are left alone: the test runs a private single-node Kafka from the
//! stack's own Kafka distribution (`.cache/kafka/libs`, or `CHAPERONE_KAFKA_LIBS`) on free ports,
//! and kills it.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use chaperone_test_support::{create_topic, eventually, unique};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio::process::{Child, Command};

fn kafka_libs() -> PathBuf {
    std::env::var("CHAPERONE_KAFKA_LIBS").map_or_else(
        |_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/kafka/libs")),
        PathBuf::from,
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A single-node KRaft Kafka of this test's own.
struct PrivateKafka {
    bootstrap: String,
    dir: PathBuf,
    child: Child,
}

impl PrivateKafka {
    async fn start() -> anyhow::Result<Self> {
        let libs = kafka_libs();
        ensure!(
            libs.is_dir(),
            "no kafka distribution at {} (dev/stack up fetches it)",
            libs.display()
        );
        let (port, controller) = (free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(unique("proxy-kafka"));
        std::fs::create_dir_all(&dir)?;
        let props = dir.join("server.properties");
        std::fs::write(
            &props,
            format!(
                "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:{controller}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 log.dirs={}\nauto.create.topics.enable=false\noffsets.topic.replication.factor=1\n\
                 transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
                 num.network.threads=1\nnum.io.threads=2\n",
                dir.join("data").display()
            ),
        )?;
        let cp = format!("{}/*", libs.display());
        let cluster_id = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
        let status = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                "-cp",
                &cp,
                "kafka.tools.StorageTool",
                "format",
            ])
            .arg("--config")
            .arg(&props)
            .args(["--cluster-id", &cluster_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("formatting the private kafka")?;
        ensure!(
            status.success(),
            "formatting the private kafka failed: {status}"
        );
        let child = Command::new("java")
            .args([
                "-Xms64m",
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-cp",
                &cp,
                "kafka.Kafka",
            ])
            .arg(&props)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the private kafka")?;
        let bootstrap = format!("127.0.0.1:{port}");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        eventually(
            "the private kafka to serve",
            Duration::from_secs(120),
            || {
                let ok = consumer
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok_and(|m| !m.brokers().is_empty());
                std::future::ready(Ok(ok.then_some(())))
            },
        )
        .await?;
        Ok(Self {
            bootstrap,
            dir,
            child,
        })
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_gets_50003_never_200() -> anyhow::Result<()> {
    let mut kafka = PrivateKafka::start().await?;
    let t = unique("proxy-down");
    create_topic(&kafka.bootstrap, &t, 1).await?;
    let mut c = support::config().await?;
    // The audit goes to the shared regional cluster; the records to the private one.
    c.audit.kafka = [("bootstrap.servers".to_owned(), c.bootstrap_servers.clone())].into();
    c.bootstrap_servers = kafka.bootstrap.clone();
    c.produce_timeout = Duration::from_secs(5);
    let proxy = support::start(c).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/topics/{t}", proxy.url);
    let body = r#"{"records":[{"value":"YQ=="},{"value":"Yg=="}]}"#;
    let send = || async {
        let r = client
            .post(&url)
            .header("content-type", "application/vnd.kafka.binary.v2+json")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        anyhow::Ok((r.status().as_u16(), r.text().await?))
    };
    let (status, text) = send().await?;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(r#""error_code":null"#), "{text}");

    kafka.child.start_kill()?;
    kafka.child.wait().await?;
    for _ in 0..3 {
        let (status, text) = send().await?;
        assert_eq!(status, 500, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text)?;
        for o in v["offsets"].as_array().context("offsets")? {
            assert_eq!(o["error_code"], 50003, "{text}");
            assert!(o["offset"].is_null() && o["partition"].is_null(), "{text}");
        }
    }
    proxy.stop().await
}
