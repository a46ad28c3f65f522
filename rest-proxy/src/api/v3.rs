//! Confluent's v3 API for producers: `GET /v3/clusters[/{id}]` and
//! `POST /v3/clusters/{id}/topics/{t}/records`.
//!
//! A produce body is one JSON record or, streamed (chunked, no `Content-Length`), any number
//! of concatenated ones. Each record gets one delivery report, in order, each followed by
//! `\r\n` as Confluent writes them: `error_code` 200 with partition and offset once Kafka
//! acknowledged it, or an error code and message. A request with a `Content-Length` (or an
//! `Idempotency-Key`) is read whole first; when it holds one record, the HTTP status is its
//! report's. A streamed request is answered 200 at once and its reports follow as records are
//! acknowledged.

use std::convert::Infallible;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use super::error::{ApiError, JSON, codes};
use super::idempotency::{Begin, Stored};
use super::v2::negotiate;
use super::{AppState, Client, InFlight, fingerprint, idempotency_key, key_conflict, media_type};
use crate::kafka::{Delivery, OutRecord, PartitionInfo};

/// A v3 record.
#[derive(Debug, Deserialize)]
pub struct ProduceRequest {
    /// Partition, or none for the partitioner.
    #[serde(default)]
    pub partition_id: Option<i32>,
    /// Headers, values base64.
    #[serde(default)]
    pub headers: Option<Vec<RequestHeader>>,
    /// Key.
    #[serde(default)]
    pub key: Option<RequestData>,
    /// Value.
    #[serde(default)]
    pub value: Option<RequestData>,
    /// RFC 3339 timestamp.
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// A v3 header.
#[derive(Debug, Deserialize)]
pub struct RequestHeader {
    /// Name.
    pub name: String,
    /// base64 value, or null.
    #[serde(default)]
    pub value: Option<String>,
}

/// A v3 key or value.
#[derive(Debug, Deserialize)]
pub struct RequestData {
    /// BINARY, JSON or STRING (JSON when absent); schema formats are not enabled.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The data.
    #[serde(default)]
    pub data: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub subject: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub subject_name_strategy: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub schema_id: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub schema_version: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub schema: Option<Value>,
}

/// What a report says of a key or value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseData {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its size in bytes.
    pub size: usize,
}

/// One delivery report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProduceResponse {
    /// 200, or an error code.
    pub error_code: u32,
    /// On error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// On success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cluster_id: Option<String>,
    /// On success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub topic_name: Option<String>,
    /// On success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partition_id: Option<i32>,
    /// On success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<i64>,
    /// On success, RFC 3339 in UTC.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timestamp: Option<String>,
    /// On success, when the record had a key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<ResponseData>,
    /// On success, when the record had a value.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<ResponseData>,
}

impl ProduceResponse {
    fn error(code: u32, message: impl Into<String>) -> Self {
        Self {
            error_code: code,
            message: Some(message.into()),
            ..Self::default()
        }
    }
}

/// Why one record of a request is refused before it is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Error code of its report.
    pub code: u32,
    /// Message of its report.
    pub message: String,
}

impl From<RecordError> for ProduceResponse {
    fn from(e: RecordError) -> Self {
        ProduceResponse::error(e.code, e.message)
    }
}

fn bad_request(message: impl std::fmt::Display) -> RecordError {
    RecordError {
        code: 400,
        message: format!("Bad Request: {message}"),
    }
}

/// Encodes a key or value: its bytes and what the report says of it.
fn encode(d: RequestData, what: &str) -> Result<Option<(Vec<u8>, ResponseData)>, RecordError> {
    let kind = d
        .kind
        .unwrap_or_else(|| "JSON".to_owned())
        .to_ascii_uppercase();
    let schema = d.subject.is_some()
        || d.subject_name_strategy.is_some()
        || d.schema_id.is_some()
        || d.schema_version.is_some()
        || d.schema.is_some();
    if schema || matches!(kind.as_str(), "AVRO" | "JSONSCHEMA" | "PROTOBUF") {
        return Err(RecordError {
            code: 422,
            message: format!(
                "Unprocessable Entity: the {what} uses a schema format, which is not enabled on this proxy (it has no schema registry); use BINARY, JSON or STRING."
            ),
        });
    }
    let bytes = match (kind.as_str(), d.data) {
        (_, None) => return Ok(None),
        ("BINARY", Some(Value::String(s))) => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|_| bad_request(format!("data={s} is not a base64 string.")))?,
        ("BINARY", Some(v)) => {
            return Err(bad_request(format!("data={v} is not a base64 string.")));
        }
        ("STRING", Some(Value::String(s))) => s.into_bytes(),
        ("STRING", Some(v)) => return Err(bad_request(format!("data={v} is not a string."))),
        ("JSON", Some(v)) => serde_json::to_vec(&v).map_err(bad_request)?,
        (other, Some(_)) => {
            return Err(bad_request(format!(
                "{what} type {other} is not supported."
            )));
        }
    };
    let meta = ResponseData {
        kind,
        size: bytes.len(),
    };
    Ok(Some((bytes, meta)))
}

/// A record decoded from a v3 request, with what its report says of its key and value.
#[derive(Debug)]
pub struct Decoded {
    /// The record.
    pub record: OutRecord,
    /// Key description.
    pub key: Option<ResponseData>,
    /// Value description.
    pub value: Option<ResponseData>,
}

/// Decodes one JSON record of a v3 request.
pub fn decode(v: Value) -> Result<Decoded, RecordError> {
    let req: ProduceRequest = serde_json::from_value(v).map_err(bad_request)?;
    if req.partition_id.is_some_and(|p| p < 0) {
        return Err(bad_request("partition_id must not be negative."));
    }
    let timestamp_ms = match req.timestamp {
        None => None,
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(&t)
                .map_err(|_| bad_request(format!("timestamp={t} is not an RFC 3339 date-time.")))?
                .timestamp_millis(),
        ),
    };
    let mut headers = Vec::new();
    for h in req.headers.unwrap_or_default() {
        let value = match h.value {
            None => None,
            Some(v) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(|_| {
                        bad_request(format!("header value={v} is not a base64 string."))
                    })?,
            ),
        };
        headers.push((h.name, value));
    }
    let key = req.key.map(|k| encode(k, "key")).transpose()?.flatten();
    let value = req.value.map(|v| encode(v, "value")).transpose()?.flatten();
    let (key, key_meta) = key.map_or((None, None), |(b, m)| (Some(b), Some(m)));
    let (value, value_meta) = value.map_or((None, None), |(b, m)| (Some(b), Some(m)));
    Ok(Decoded {
        record: OutRecord {
            partition: req.partition_id,
            key,
            value,
            headers,
            timestamp_ms,
        },
        key: key_meta,
        value: value_meta,
    })
}

/// Splits concatenated JSON values off the front of `buf`; what is left is an incomplete
/// value. `Err` on a syntax error (the stream cannot be resynchronised).
pub fn split_values(buf: &mut Vec<u8>, out: &mut Vec<Value>) -> Result<(), serde_json::Error> {
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    let mut consumed = 0;
    loop {
        match stream.next() {
            Some(Ok(v)) => {
                consumed = stream.byte_offset();
                out.push(v);
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => return Err(e),
            None => {
                consumed = stream.byte_offset();
                break;
            }
        }
    }
    buf.drain(..consumed);
    Ok(())
}

enum Slot {
    Ready(ProduceResponse),
    Pending {
        delivery: Delivery,
        key: Option<ResponseData>,
        value: Option<ResponseData>,
        size: usize,
        _in_flight: Option<InFlight>,
    },
}

/// Reads records from `body`, produces them and sends their slots in order.
async fn read_and_produce(
    state: AppState,
    topic: String,
    parts: Vec<PartitionInfo>,
    body: Body,
    reserve_each: bool,
    slots: mpsc::Sender<Slot>,
) {
    let s = state.shared();
    let limit = s.config.max_request_bytes;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut values = Vec::new();
    loop {
        let chunk = stream.next().await;
        let eof = chunk.is_none();
        match chunk {
            Some(Ok(c)) => buf.extend_from_slice(&c),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body ended early");
                let _ = slots
                    .send(Slot::Ready(
                        bad_request("the request body ended early.").into(),
                    ))
                    .await;
                return;
            }
            None => {}
        }
        if let Err(e) = split_values(&mut buf, &mut values) {
            let _ = slots.send(Slot::Ready(bad_request(e).into())).await;
            return;
        }
        for v in values.drain(..) {
            let slot = match decode(v) {
                Err(r) => Slot::Ready(r.into()),
                Ok(d) => {
                    if d.record
                        .partition
                        .is_some_and(|p| !parts.iter().any(|i| i.partition == p))
                    {
                        Slot::Ready(ProduceResponse::error(
                            codes::PARTITION_NOT_FOUND,
                            "Partition not found.",
                        ))
                    } else {
                        let size = d.record.payload_len();
                        let in_flight = if reserve_each {
                            match state.reserve(size) {
                                Ok(p) => Some(p),
                                Err(e) => {
                                    let _ = slots
                                        .send(Slot::Ready(ProduceResponse::error(
                                            429,
                                            e.body.message,
                                        )))
                                        .await;
                                    continue;
                                }
                            }
                        } else {
                            None
                        };
                        let delivery = s
                            .producer
                            .enqueue(&topic, &d.record, state.deadline())
                            .await;
                        Slot::Pending {
                            delivery,
                            key: d.key,
                            value: d.value,
                            size,
                            _in_flight: in_flight,
                        }
                    }
                }
            };
            if slots.send(slot).await.is_err() {
                return;
            }
        }
        if buf.len() > limit {
            let _ = slots
                .send(Slot::Ready(ProduceResponse::error(
                    413,
                    format!("Payload Too Large: a record is larger than the proxy's limit of {limit} bytes."),
                )))
                .await;
            return;
        }
        if eof {
            if buf.iter().any(|b| !b.is_ascii_whitespace()) {
                let _ = slots
                    .send(Slot::Ready(
                        bad_request("the request body ends inside a record.").into(),
                    ))
                    .await;
            }
            return;
        }
    }
}

/// Awaits the slots in order and turns each into its report.
async fn report(
    state: AppState,
    topic: String,
    mut slots: mpsc::Receiver<Slot>,
    out: mpsc::Sender<ProduceResponse>,
) {
    let s = state.shared();
    while let Some(slot) = slots.recv().await {
        let r = match slot {
            Slot::Ready(r) => r,
            Slot::Pending {
                delivery,
                key,
                value,
                size,
                _in_flight,
            } => match delivery.await {
                Ok(ack) => {
                    s.metrics.records.with_label_values(&["acked"]).inc();
                    s.metrics.acked_bytes.inc_by(size as u64);
                    ProduceResponse {
                        error_code: 200,
                        message: None,
                        cluster_id: Some(s.cluster_id.clone()),
                        topic_name: Some(topic.clone()),
                        partition_id: Some(ack.partition),
                        offset: Some(ack.offset),
                        timestamp: ack.timestamp_ms.and_then(|ms| {
                            chrono::DateTime::from_timestamp_millis(ms)
                                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                        }),
                        key,
                        value,
                    }
                }
                Err(refused) => {
                    s.metrics.records.with_label_values(&["failed"]).inc();
                    ProduceResponse::error(refused.code, refused.message)
                }
            },
        };
        if out.send(r).await.is_err() {
            // The caller went away; the records already enqueued are still delivered and
            // counted, only their reports are lost.
            return;
        }
    }
}

fn line(r: &ProduceResponse) -> Vec<u8> {
    let mut v = serde_json::to_vec(r).unwrap_or_default();
    v.extend_from_slice(b"\r\n");
    v
}

fn status_of(code: u32) -> StatusCode {
    let http = if code >= 10_000 { code / 100 } else { code };
    StatusCode::from_u16(u16::try_from(http).unwrap_or(500))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn respond(status: StatusCode, body: Body) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    res
}

/// `POST /v3/clusters/{cluster_id}/topics/{topic}/records`.
pub async fn produce(
    State(state): State<AppState>,
    Path((cluster_id, topic)): Path<(String, String)>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match produce_inner(state, cluster_id, topic, client, headers, body).await {
        Ok(r) => r,
        Err(e) => e.v3().into_response(),
    }
}

fn cluster_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        404,
        format!("Cluster {id} cannot be found."),
    )
}

async fn produce_inner(
    state: AppState,
    cluster_id: String,
    topic: String,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    negotiate(&headers, &[JSON])?;
    if media_type(&headers).as_deref() != Some(JSON) {
        return Err(ApiError::http(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    let s = state.shared();
    if cluster_id != s.cluster_id {
        return Err(cluster_not_found(&cluster_id));
    }
    let path = format!("/v3/clusters/{cluster_id}/topics/{topic}/records");
    let key = idempotency_key(&headers, &client, &path)?;
    let streamed = key.is_none() && super::content_length(&headers).is_none();
    let parts = s
        .metadata
        .topic(&topic)
        .await
        .map_err(|e| ApiError::metadata(&e))?
        .ok_or_else(ApiError::topic_not_found)?;
    let (slot_tx, slot_rx) = mpsc::channel(1024);
    let (out_tx, mut out_rx) = mpsc::channel(1024);
    if streamed {
        tokio::spawn(read_and_produce(
            state.clone(),
            topic.clone(),
            parts,
            body,
            true,
            slot_tx,
        ));
        tokio::spawn(report(state.clone(), topic, slot_rx, out_tx));
        let stream = futures_util::stream::unfold(out_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|r| (Ok::<_, Infallible>(Bytes::from(line(&r))), rx))
        });
        return Ok(respond(StatusCode::OK, Body::from_stream(stream)));
    }
    let in_flight = state.admit(&headers)?;
    let bytes = state.read_body(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            400,
            "Request body is empty. Data is required.",
        ));
    }
    let lead = match key {
        None => None,
        Some(key) => match s.window.begin(key, fingerprint(JSON, &bytes)).await {
            Begin::Replay(stored) => {
                s.metrics.idempotent_replays.inc();
                return Ok(respond(
                    StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
                    Body::from(stored.body),
                ));
            }
            Begin::Conflict => return Err(key_conflict()),
            Begin::Lead(l) => Some(l),
        },
    };
    // Produce in a task of its own: a caller that goes away does not stop it half-way, and
    // the idempotency window learns its outcome either way.
    let task = tokio::spawn(async move {
        let _in_flight = in_flight;
        tokio::spawn(read_and_produce(
            state.clone(),
            topic.clone(),
            parts,
            Body::from(bytes),
            false,
            slot_tx,
        ));
        tokio::spawn(report(state, topic, slot_rx, out_tx));
        let mut reports = Vec::new();
        while let Some(r) = out_rx.recv().await {
            reports.push(r);
        }
        let status = match reports.as_slice() {
            [one] => status_of(one.error_code),
            _ => StatusCode::OK,
        };
        let body: Vec<u8> = reports.iter().flat_map(line).collect();
        let stored = Stored {
            status: status.as_u16(),
            content_type: JSON,
            body: Bytes::from(body),
        };
        if let Some(lead) = lead {
            lead.complete(stored.clone());
        }
        stored
    });
    let stored = task.await.map_err(|e| ApiError::internal(&e))?;
    Ok(respond(
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
        Body::from(stored.body),
    ))
}

/// A link to a related resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Related {
    /// Its URL.
    pub related: String,
}

/// A resource's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceMetadata {
    /// Its URL.
    #[serde(rename = "self")]
    pub self_url: String,
    /// Its CRN.
    pub resource_name: String,
}

/// A collection's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionMetadata {
    /// Its URL.
    #[serde(rename = "self")]
    pub self_url: String,
    /// The next page (always null).
    pub next: Option<String>,
}

/// `KafkaCluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterData {
    /// `KafkaCluster`.
    pub kind: String,
    /// Metadata.
    pub metadata: ResourceMetadata,
    /// The id.
    pub cluster_id: String,
    /// Link.
    pub acls: Related,
    /// Link.
    pub brokers: Related,
    /// Link.
    pub broker_configs: Related,
    /// Link.
    pub consumer_groups: Related,
    /// Link.
    pub topics: Related,
    /// Link.
    pub partition_reassignments: Related,
}

/// `KafkaClusterList`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterDataList {
    /// `KafkaClusterList`.
    pub kind: String,
    /// Metadata.
    pub metadata: CollectionMetadata,
    /// The one cluster.
    pub data: Vec<ClusterData>,
}

/// The URL the caller reached the proxy at.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn cluster(base: &str, id: &str) -> ClusterData {
    let url = format!("{base}/v3/clusters/{id}");
    let related = |s: &str| Related {
        related: format!("{url}{s}"),
    };
    ClusterData {
        kind: "KafkaCluster".to_owned(),
        metadata: ResourceMetadata {
            self_url: url.clone(),
            resource_name: format!("crn:///kafka={id}"),
        },
        cluster_id: id.to_owned(),
        acls: related("/acls"),
        brokers: related("/brokers"),
        broker_configs: related("/broker-configs"),
        consumer_groups: related("/consumer-groups"),
        topics: related("/topics"),
        partition_reassignments: related("/topics/-/partitions/-/reassignment"),
    }
}

fn json_ok<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => respond(StatusCode::OK, Body::from(b)),
        Err(e) => ApiError::internal(&e).v3().into_response(),
    }
}

/// `GET /v3/clusters`.
pub async fn list_clusters(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = negotiate(&headers, &[JSON]) {
        return e.v3().into_response();
    }
    let base = base_url(&headers);
    json_ok(&ClusterDataList {
        kind: "KafkaClusterList".to_owned(),
        metadata: CollectionMetadata {
            self_url: format!("{base}/v3/clusters"),
            next: None,
        },
        data: vec![cluster(&base, &state.shared().cluster_id)],
    })
}

/// `GET /v3/clusters/{id}`.
pub async fn get_cluster(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = negotiate(&headers, &[JSON]) {
        return e.v3().into_response();
    }
    if id != state.shared().cluster_id {
        return cluster_not_found(&id).v3().into_response();
    }
    json_ok(&cluster(&base_url(&headers), &id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_records_split_across_chunks() {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        buf.extend_from_slice(br#"{"value":{"type":"STRING","data":"a"}}{"val"#);
        split_values(&mut buf, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(buf, br#"{"val"#);
        buf.extend_from_slice(
            br#"ue":{"data":1}}
 {"value":null} "#,
        );
        split_values(&mut buf, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(buf.iter().all(u8::is_ascii_whitespace));
        buf.extend_from_slice(b"}{");
        assert!(split_values(&mut buf, &mut out).is_err());
    }

    #[test]
    fn records_decode_with_types_headers_and_timestamps() {
        let d = decode(serde_json::json!({
            "partition_id": 1,
            "headers": [{"name": "h", "value": "dg=="}, {"name": "n", "value": null}],
            "key": {"type": "BINARY", "data": "a2V5"},
            "value": {"type": "JSON", "data": {"a": 1}},
            "timestamp": "2021-02-05T19:14:42.123Z"
        }))
        .unwrap();
        assert_eq!(d.record.partition, Some(1));
        assert_eq!(d.record.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(d.record.value.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(
            d.record.headers,
            vec![
                ("h".to_owned(), Some(b"v".to_vec())),
                ("n".to_owned(), None)
            ]
        );
        assert_eq!(d.record.timestamp_ms, Some(1_612_552_482_123));
        assert_eq!(
            d.key,
            Some(ResponseData {
                kind: "BINARY".into(),
                size: 3
            })
        );
        let e = decode(serde_json::json!({"value": {"type": "BINARY", "data": 1}})).unwrap_err();
        assert_eq!(
            line(&e.into()),
            b"{\"error_code\":400,\"message\":\"Bad Request: data=1 is not a base64 string.\"}\r\n"
        );
        let e = decode(serde_json::json!({"value": {"type": "AVRO", "data": 1}})).unwrap_err();
        assert_eq!(e.code, 422);
    }

    #[test]
    fn a_report_serialises_as_confluents() {
        let r = ProduceResponse {
            error_code: 200,
            cluster_id: Some("cluster-1".into()),
            topic_name: Some("topic-1".into()),
            partition_id: Some(1),
            offset: Some(0),
            timestamp: Some("2021-02-05T19:14:42Z".into()),
            key: Some(ResponseData {
                kind: "BINARY".into(),
                size: 7,
            }),
            value: Some(ResponseData {
                kind: "JSON".into(),
                size: 15,
            }),
            ..ProduceResponse::default()
        };
        assert_eq!(
            String::from_utf8(line(&r)).unwrap(),
            "{\"error_code\":200,\"cluster_id\":\"cluster-1\",\"topic_name\":\"topic-1\",\"partition_id\":1,\"offset\":0,\"timestamp\":\"2021-02-05T19:14:42Z\",\"key\":{\"type\":\"BINARY\",\"size\":7},\"value\":{\"type\":\"JSON\",\"size\":15}}\r\n"
        );
        assert_eq!(status_of(50003), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status_of(40402), StatusCode::NOT_FOUND);
    }
}
