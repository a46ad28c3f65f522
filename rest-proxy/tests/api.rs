//! The proxy's endpoints against the regional cluster of `dev/stack up`: byte-exact JSON,
//! what `kcat` reads back, Confluent's documented curl examples, errors, and the audit.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chaperone_test_support::regional_bootstrap;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use serde_json::Value;
use support::{Read, audit_counts, config, kcat, sh, start, topic};

const BINARY: &str = "application/vnd.kafka.binary.v2+json";
const JSONV2: &str = "application/vnd.kafka.json.v2+json";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(url: &str, ct: &str, body: &str) -> anyhow::Result<(u16, String, String)> {
    let r = client()
        .post(url)
        .header("content-type", ct)
        .body(body.to_owned())
        .send()
        .await?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    Ok((status, ct, r.text().await?))
}

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let r = client().get(url).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

fn kafka_cluster_id() -> String {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .create()
        .unwrap();
    c.client()
        .fetch_cluster_id(Duration::from_secs(10))
        .expect("cluster id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_and_v3_produce_are_what_kcat_reads_back_and_what_the_audit_counts() -> anyhow::Result<()>
{
    let proxy = start(config().await?).await?;
    let t = topic(3).await?;
    let u = &proxy.url;

    // v2 binary: keys, an explicit partition, and a record for the partitioner.
    let (status, ct, body) = post(
        &format!("{u}/topics/{t}/partitions/1"),
        BINARY,
        r#"{"records":[{"key":"a2V5MQ==","value":"dmFsdWUx"},{"key":"a2V5Mg==","value":"dmFsdWUy","partition":2}]}"#,
    )
    .await?;
    assert_eq!(
        (status, ct.as_str()),
        (200, "application/vnd.kafka.v2+json")
    );
    assert_eq!(
        body,
        r#"{"offsets":[{"partition":1,"offset":0,"error_code":null,"error":null},{"partition":2,"offset":0,"error_code":null,"error":null}],"key_schema_id":null,"value_schema_id":null}"#
    );
    // v2 json.
    let (status, _, body) = post(
        &format!("{u}/topics/{t}"),
        JSONV2,
        r#"{"records":[{"key":"k3","value":{"foo":"bar"},"partition":0}]}"#,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"offsets":[{"partition":0,"offset":0,"error_code":null,"error":null}],"key_schema_id":null,"value_schema_id":null}"#
    );
    // v3: one record with headers and a timestamp.
    let cluster = kafka_cluster_id();
    let (status, ct, body) = post(
        &format!("{u}/v3/clusters/{cluster}/topics/{t}/records"),
        "application/json",
        r#"{"partition_id":0,"headers":[{"name":"h1","value":"aGVhZGVy"}],"key":{"type":"STRING","data":"k4"},"value":{"type":"BINARY","data":"dmFsdWU0"},"timestamp":"2026-01-02T03:04:05.678Z"}"#,
    )
    .await?;
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    assert_eq!(
        body,
        format!(
            "{{\"error_code\":200,\"cluster_id\":\"{cluster}\",\"topic_name\":\"{t}\",\"partition_id\":0,\"offset\":1,\"timestamp\":\"2026-01-02T03:04:05.678Z\",\"key\":{{\"type\":\"STRING\",\"size\":2}},\"value\":{{\"type\":\"BINARY\",\"size\":6}}}}\r\n"
        )
    );

    let reads = kcat(&t, 4).await?;
    let strip = |r: &Read| {
        (
            r.partition,
            r.offset,
            r.key.clone(),
            r.value.clone(),
            r.headers.clone(),
        )
    };
    assert_eq!(
        reads.iter().map(strip).collect::<Vec<_>>(),
        vec![
            (
                0,
                0,
                "\"k3\"".to_owned(),
                r#"{"foo":"bar"}"#.to_owned(),
                String::new()
            ),
            (
                0,
                1,
                "k4".to_owned(),
                "value4".to_owned(),
                "h1=header".to_owned()
            ),
            (1, 0, "key1".to_owned(), "value1".to_owned(), String::new()),
            (2, 0, "key2".to_owned(), "value2".to_owned(), String::new()),
        ]
    );
    assert_eq!(reads[1].timestamp_ms, 1_767_323_045_678);
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        reads
            .iter()
            .filter(|r| r.offset == 0)
            .all(|r| (now - r.timestamp_ms).abs() < 600_000)
    );

    // The audit counts what Kafka acknowledged, per partition, after a clean stop.
    let audit_topic = proxy.config.audit.topic.clone();
    let instance = proxy.config.audit.instance.clone().unwrap();
    proxy.stop().await?;
    let counts = audit_counts(&audit_topic, &t, 4).await?;
    let expected: BTreeMap<(String, i32), u64> = [(0, 2), (1, 1), (2, 1)]
        .into_iter()
        .map(|(p, n)| ((instance.clone(), p), n))
        .collect();
    assert_eq!(counts, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_endpoints_answer_confluents_shapes() -> anyhow::Result<()> {
    let proxy = start(config().await?).await?;
    let t = topic(2).await?;
    let u = &proxy.url;
    let md_client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", regional_bootstrap())
        .create()?;
    let md = md_client.fetch_metadata(Some(&t), Duration::from_secs(10))?;
    let parts: Vec<Value> = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            serde_json::json!({
                "partition": p.id(),
                "leader": p.leader(),
                "replicas": p.replicas().iter().map(|b| serde_json::json!({
                    "broker": b, "leader": *b == p.leader(), "in_sync": p.isr().contains(b)
                })).collect::<Vec<_>>()
            })
        })
        .collect();

    let (status, body) = get(&format!("{u}/topics")).await?;
    assert_eq!(status, 200);
    let names: Vec<String> = serde_json::from_str(&body)?;
    assert!(names.contains(&t));

    let (status, body) = get(&format!("{u}/topics/{t}")).await?;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body)?;
    assert!(
        body.starts_with(&format!("{{\"name\":\"{t}\",\"configs\":{{")),
        "{body}"
    );
    assert_eq!(v["partitions"], Value::Array(parts.clone()));
    assert_eq!(v["configs"]["cleanup.policy"], "delete");

    let (status, body) = get(&format!("{u}/topics/{t}/partitions")).await?;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body)?),
        (200, Value::Array(parts.clone()))
    );
    let p1 = &parts[1];
    let (status, body) = get(&format!("{u}/topics/{t}/partitions/1")).await?;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body)?, *p1);
    assert!(body.starts_with("{\"partition\":1,\"leader\":"), "{body}");
    assert!(body.contains("\"replicas\":[{\"broker\":"), "{body}");

    let (status, body) = get(&format!("{u}/brokers")).await?;
    let mut ids: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
    ids.sort_unstable();
    assert_eq!(
        (status, body),
        (
            200,
            format!("{{\"brokers\":{}}}", serde_json::to_string(&ids)?)
        )
    );

    let cluster = kafka_cluster_id();
    let host = u.trim_start_matches("http://");
    let one = format!(
        "{{\"kind\":\"KafkaCluster\",\"metadata\":{{\"self\":\"http://{host}/v3/clusters/{cluster}\",\"resource_name\":\"crn:///kafka={cluster}\"}},\"cluster_id\":\"{cluster}\",\"acls\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/acls\"}},\"brokers\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/brokers\"}},\"broker_configs\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/broker-configs\"}},\"consumer_groups\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/consumer-groups\"}},\"topics\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/topics\"}},\"partition_reassignments\":{{\"related\":\"http://{host}/v3/clusters/{cluster}/topics/-/partitions/-/reassignment\"}}}}"
    );
    assert_eq!(
        get(&format!("{u}/v3/clusters/{cluster}")).await?,
        (200, one.clone())
    );
    assert_eq!(
        get(&format!("{u}/v3/clusters")).await?,
        (
            200,
            format!(
                "{{\"kind\":\"KafkaClusterList\",\"metadata\":{{\"self\":\"http://{host}/v3/clusters\",\"next\":null}},\"data\":[{one}]}}"
            )
        )
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_carry_confluents_codes() -> anyhow::Result<()> {
    let proxy = start(config().await?).await?;
    let t = topic(2).await?;
    let u = &proxy.url;
    let missing = chaperone_test_support::unique("proxy-missing");
    let cases: Vec<(String, &str, &str, u16, &str)> = vec![
        (
            format!("{u}/topics/{missing}"),
            BINARY,
            r#"{"records":[{"value":"YQ=="}]}"#,
            404,
            r#"{"error_code":40401,"message":"Topic not found."}"#,
        ),
        (
            format!("{u}/topics/{t}/partitions/7"),
            BINARY,
            r#"{"records":[{"value":"YQ=="}]}"#,
            404,
            r#"{"error_code":40402,"message":"Partition not found."}"#,
        ),
        (
            format!("{u}/topics/{t}"),
            BINARY,
            r#"{"records":[{"value":"YQ==","partition":9}]}"#,
            404,
            r#"{"error_code":40402,"message":"Partition not found."}"#,
        ),
        (
            format!("{u}/topics/{t}"),
            "text/plain",
            "x",
            415,
            r#"{"error_code":415,"message":"HTTP 415 Unsupported Media Type"}"#,
        ),
        (
            format!("{u}/topics/{t}"),
            "application/vnd.kafka.avro.v2+json",
            r#"{"records":[{"key":1,"value":2}]}"#,
            422,
            r#"{"error_code":42201,"message":"Request includes keys but does not include key schema"}"#,
        ),
        (
            format!("{u}/topics/{t}"),
            "application/vnd.kafka.avro.v2+json",
            r#"{"records":[{"value":2}]}"#,
            422,
            r#"{"error_code":42202,"message":"Request includes values but does not include value schema"}"#,
        ),
        (
            format!("{u}/topics/{t}"),
            BINARY,
            r#"{"records":[]}"#,
            422,
            r#"{"error_code":42206,"message":"Payload error. records must not be empty."}"#,
        ),
    ];
    for (url, ct, body, status, expected) in cases {
        let (s, _, b) = post(&url, ct, body).await?;
        assert_eq!((s, b.as_str()), (status, expected), "{url} {ct} {body}");
    }
    let (s, _, b) = post(
        &format!("{u}/topics/{t}"),
        BINARY,
        r#"{"records":[{"value":"not base64!"}]}"#,
    )
    .await?;
    assert_eq!(s, 422);
    assert_eq!(serde_json::from_str::<Value>(&b)?["error_code"], 42203);
    let (s, _, b) = post(
        &format!("{u}/topics/{t}"),
        "application/vnd.kafka.protobuf.v2+json",
        r#"{"value_schema":"x","records":[{"value":2}]}"#,
    )
    .await?;
    assert_eq!(s, 415);
    assert!(b.contains("not enabled"), "{b}");
    let r = client()
        .get(format!("{u}/topics"))
        .header("accept", "text/html")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 406);
    assert_eq!(
        r.text().await?,
        r#"{"error_code":406,"message":"HTTP 406 Not Acceptable"}"#
    );
    let (s, _, b) = post(
        &format!("{u}/v3/clusters/nope/topics/{t}/records"),
        "application/json",
        r#"{"value":{"data":1}}"#,
    )
    .await?;
    assert_eq!(
        (s, b.as_str()),
        (
            404,
            r#"{"error_code":404,"message":"Cluster nope cannot be found."}"#
        )
    );
    let cluster = kafka_cluster_id();
    let (s, _, b) = post(
        &format!("{u}/v3/clusters/{cluster}/topics/{t}/records"),
        "application/json",
        r#"{"value":{"type":"BINARY","data":1}}"#,
    )
    .await?;
    assert_eq!(
        (s, b.as_str()),
        (
            400,
            "{\"error_code\":400,\"message\":\"Bad Request: data=1 is not a base64 string.\"}\r\n"
        )
    );
    let (s, _, b) = post(
        &format!("{u}/v3/clusters/{cluster}/topics/{missing}/records"),
        "application/json",
        r#"{"value":{"data":1}}"#,
    )
    .await?;
    assert_eq!(
        (s, b.as_str()),
        (404, r#"{"error_code":40401,"message":"Topic not found."}"#)
    );
    // A record Kafka refuses gets its own entry beside the ones it took.
    let big = "A".repeat(1_500_000);
    let (s, _, b) = post(
        &format!("{u}/topics/{t}"),
        BINARY,
        &format!(
            r#"{{"records":[{{"value":"YQ==","partition":0}},{{"value":"{big}","partition":0}}]}}"#
        ),
    )
    .await?;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        r#"{"offsets":[{"partition":0,"offset":0,"error_code":null,"error":null},{"partition":null,"offset":null,"error_code":50002,"error":"Broker: Message size too large"}],"key_schema_id":null,"value_schema_id":null}"#
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluents_documented_curl_examples_run_unchanged_but_for_host_and_topic()
-> anyhow::Result<()> {
    let proxy = start(config().await?).await?;
    let port = proxy.url.rsplit(':').next().unwrap().to_owned();
    let (jsontest, binarytest, v3test) = (topic(1).await?, topic(1).await?, topic(1).await?);
    // From the Confluent REST Proxy quick start (v2), with localhost:8082 and the topic
    // names replaced.
    let out = sh(&format!(
        r#"curl -s -X POST -H "Content-Type: application/vnd.kafka.json.v2+json" \
      -H "Accept: application/vnd.kafka.v2+json" \
      --data '{{"records":[{{"value":{{"foo":"bar"}}}}]}}' "http://localhost:{port}/topics/{jsontest}""#
    ))
    .await?;
    assert_eq!(
        out,
        r#"{"offsets":[{"partition":0,"offset":0,"error_code":null,"error":null}],"key_schema_id":null,"value_schema_id":null}"#
    );
    let out = sh(&format!(
        r#"curl -s -X POST -H "Content-Type: application/vnd.kafka.binary.v2+json" \
      -H "Accept: application/vnd.kafka.v2+json" \
      --data '{{"records":[{{"value":"S2Fma2E="}}]}}' "http://localhost:{port}/topics/{binarytest}""#
    ))
    .await?;
    assert_eq!(
        out,
        r#"{"offsets":[{"partition":0,"offset":0,"error_code":null,"error":null}],"key_schema_id":null,"value_schema_id":null}"#
    );
    let out = sh(&format!(r#"curl -s "http://localhost:{port}/topics""#)).await?;
    assert!(out.contains(&format!("\"{jsontest}\"")), "{out}");
    // The v3 produce example of the API reference.
    let cluster = kafka_cluster_id();
    let out = sh(&format!(
        r#"curl -s -X POST -H "Content-Type: application/json" \
      --data '{{"key":{{"type":"JSON","data":"key1"}},"value":{{"type":"JSON","data":{{"foo":"bar"}}}}}}' \
      "http://localhost:{port}/v3/clusters/{cluster}/topics/{v3test}/records""#
    ))
    .await?;
    let v: Value = serde_json::from_str(out.trim_end())?;
    assert_eq!(v["error_code"], 200);
    assert_eq!(v["key"], serde_json::json!({"type":"JSON","size":6}));
    assert_eq!(v["value"], serde_json::json!({"type":"JSON","size":13}));
    // Streaming: chunked, concatenated records; one report per record, in order.
    let file = support::temp_file("stream");
    let records: String = (0..50)
        .map(|i| format!("{{\"value\":{{\"type\":\"STRING\",\"data\":\"s{i}\"}}}}\n"))
        .collect();
    std::fs::write(&file, records)?;
    let out = sh(&format!(
        r#"curl -s -X POST -H "Content-Type: application/json" -H "Transfer-Encoding: chunked" \
      --data-binary @{} "http://localhost:{port}/v3/clusters/{cluster}/topics/{v3test}/records""#,
        file.display()
    ))
    .await?;
    let _ = std::fs::remove_file(&file);
    let reports: Vec<&str> = out.split_terminator("\r\n").collect();
    assert_eq!(reports.len(), 50, "{out}");
    for (i, r) in reports.iter().enumerate() {
        let v: Value = serde_json::from_str(r)?;
        assert_eq!(
            (v["error_code"].as_i64(), v["offset"].as_i64()),
            (Some(200), Some(i as i64 + 1))
        );
    }
    let reads = kcat(&v3test, 51).await?;
    assert_eq!(reads[1].value, "s0");
    assert_eq!(reads[50].value, "s49");
    // Python's requests, the client most REST Proxy scripts use.
    let out = sh(&format!(
        r#"python3 -c 'import requests, json
r = requests.post("http://localhost:{port}/topics/{jsontest}", headers={{"Content-Type": "application/vnd.kafka.json.v2+json"}}, data=json.dumps({{"records": [{{"value": {{"n": 1}}}}, {{"value": {{"n": 2}}}}]}}))
print(r.status_code, json.dumps(r.json()["offsets"]))'"#
    ))
    .await?;
    assert_eq!(
        out.trim(),
        r#"200 [{"partition": 0, "offset": 1, "error_code": null, "error": null}, {"partition": 0, "offset": 2, "error_code": null, "error": null}]"#
    );
    proxy.stop().await
}
