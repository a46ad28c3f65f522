//! Confluent's v2 API for producers: produce to a topic or a partition, and the metadata
//! clients read first (`/topics`, `/topics/{t}`, `/topics/{t}/partitions[/{p}]`, `/brokers`).
//!
//! A produce answers only after every record's delivery report: a record's entry in
//! `offsets` holds its partition and offset when Kafka acknowledged it (`acks=all`), or
//! `error_code` 50003 (retriable) / 50002 (final) and an `error` when it did not. The status
//! is 200 when at least one record was stored (as Confluent's), 500 when none was (401/403
//! for Kafka's authentication and authorization errors), so a stopped broker is never a 200. A topic
//! missing from the cluster is answered 40401 (never created), a partition 40402, both before
//! anything is produced.

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use std::borrow::Cow;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::error::{ApiError, V2_JSON, codes};
use super::idempotency::{Begin, Stored};
use super::{AppState, Client, fingerprint, idempotency_key, key_conflict, media_type};
use crate::kafka::{OutRecord, PartitionInfo};

/// How a v2 request's keys and values are embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// base64 strings (`vnd.kafka.binary.v2+json`, also `vnd.kafka.v2+json` and
    /// `application/json`).
    Binary,
    /// Any JSON, produced as its compact text (`vnd.kafka.json.v2+json`).
    Json,
    /// A schema format (avro, jsonschema, protobuf): not enabled, no schema registry.
    Schema(&'static str),
}

/// The format a `Content-Type` asks for, or 415.
pub fn request_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let Some(media) = media_type(headers) else {
        return Ok(Format::Binary);
    };
    Ok(match media.as_str() {
        "application/vnd.kafka.binary.v2+json"
        | "application/vnd.kafka.v2+json"
        | "application/json" => Format::Binary,
        "application/vnd.kafka.json.v2+json" => Format::Json,
        "application/vnd.kafka.avro.v2+json" => Format::Schema("avro"),
        "application/vnd.kafka.jsonschema.v2+json" => Format::Schema("jsonschema"),
        "application/vnd.kafka.protobuf.v2+json" => Format::Schema("protobuf"),
        _ => return Err(ApiError::http(StatusCode::UNSUPPORTED_MEDIA_TYPE)),
    })
}

/// The response media type `Accept` allows among `offered` (the first is the default), or
/// 406.
pub fn negotiate(headers: &HeaderMap, offered: &[&'static str]) -> Result<&'static str, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(offered[0]);
    };
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            let p = p.trim().replace(' ', "");
            p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
        });
        if refused || media.is_empty() {
            continue;
        }
        if media == "*/*" || media == "application/*" {
            return Ok(offered[0]);
        }
        if let Some(o) = offered.iter().find(|o| **o == media) {
            return Ok(o);
        }
    }
    Err(ApiError::http(StatusCode::NOT_ACCEPTABLE))
}

const V2_OFFERED: &[&str] = &[V2_JSON, "application/vnd.kafka+json", "application/json"];

/// A v2 produce request, borrowing its strings from the body where it can.
#[derive(Debug, Deserialize)]
pub struct ProduceRequest<'a> {
    /// The records.
    #[serde(borrow)]
    pub records: Vec<ProduceRecord<'a>>,
    /// Schema formats only.
    #[serde(default)]
    pub key_schema: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub key_schema_id: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub value_schema: Option<Value>,
    /// Schema formats only.
    #[serde(default)]
    pub value_schema_id: Option<Value>,
}

/// One record of a v2 request.
#[derive(Debug, Deserialize)]
pub struct ProduceRecord<'a> {
    /// Key: base64 (binary) or any JSON; null or absent for none.
    #[serde(default, borrow)]
    pub key: Option<Embedded<'a>>,
    /// Value, likewise.
    #[serde(default, borrow)]
    pub value: Option<Embedded<'a>>,
    /// Partition, overriding the one in the path.
    #[serde(default)]
    pub partition: Option<i32>,
}

/// One entry of `offsets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Partition Kafka acknowledged, null on error.
    pub partition: Option<i32>,
    /// Offset, null on error.
    pub offset: Option<i64>,
    /// Null on success.
    pub error_code: Option<u32>,
    /// Null on success.
    pub error: Option<String>,
}

/// The v2 produce response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceResponse {
    /// One entry per record, in request order.
    pub offsets: Vec<PartitionOffset>,
    /// Always null (no schema registry).
    pub key_schema_id: Option<i32>,
    /// Always null (no schema registry).
    pub value_schema_id: Option<i32>,
}

/// A key or value as a request embeds it: a string (borrowed from the body unless it has
/// escapes), or any other JSON. Null is `None` around it.
#[derive(Debug, Clone, PartialEq)]
pub enum Embedded<'a> {
    /// A JSON string.
    Text(Cow<'a, str>),
    /// Any other JSON value.
    Json(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for Embedded<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Strings<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Strings<'a> {
            type Value = Embedded<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Embedded::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Embedded::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Embedded::Text(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Embedded::Json(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Embedded::Json(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Embedded::Json(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Embedded::Json(Value::from(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Embedded::Json(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Embedded::Json)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Embedded::Json)
            }
        }
        d.deserialize_any(Strings(std::marker::PhantomData))
    }
}

fn embedded(
    format: Format,
    v: Option<Embedded<'_>>,
    what: &str,
) -> Result<Option<Vec<u8>>, ApiError> {
    match (format, v) {
        (_, None | Some(Embedded::Json(Value::Null))) => Ok(None),
        (Format::Json, Some(Embedded::Text(s))) => serde_json::to_vec(&*s)
            .map(Some)
            .map_err(ApiError::json_conversion),
        (Format::Json, Some(Embedded::Json(v))) => serde_json::to_vec(&v)
            .map(Some)
            .map_err(ApiError::json_conversion),
        (_, Some(Embedded::Text(s))) => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Some)
            .map_err(|_| {
                ApiError::json_conversion(format!("the record's {what} is not valid base64"))
            }),
        (_, Some(_)) => Err(ApiError::json_conversion(format!(
            "the record's {what} must be a base64 string"
        ))),
    }
}

impl Embedded<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Self::Json(Value::Null))
    }
}

/// Decodes a request body into records, or the request-level error Confluent answers.
pub fn decode(
    format: Format,
    body: &[u8],
    path_partition: Option<i32>,
    max_records: usize,
) -> Result<Vec<OutRecord>, ApiError> {
    let req: ProduceRequest = serde_json::from_slice(body).map_err(ApiError::json_conversion)?;
    if let Format::Schema(name) = format {
        if req
            .records
            .iter()
            .any(|r| r.key.as_ref().is_some_and(|k| !k.is_null()))
            && req.key_schema.is_none()
            && req.key_schema_id.is_none()
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::KEY_SCHEMA_MISSING,
                "Request includes keys but does not include key schema",
            ));
        }
        if req
            .records
            .iter()
            .any(|r| r.value.as_ref().is_some_and(|v| !v.is_null()))
            && req.value_schema.is_none()
            && req.value_schema_id.is_none()
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::VALUE_SCHEMA_MISSING,
                "Request includes values but does not include value schema",
            ));
        }
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            415,
            format!(
                "HTTP 415 Unsupported Media Type: the {name} format is not enabled on this proxy (it has no schema registry); produce binary or json"
            ),
        ));
    }
    if req.records.is_empty() {
        return Err(ApiError::invalid_payload("records must not be empty."));
    }
    if req.records.len() > max_records {
        return Err(ApiError::invalid_payload(format!(
            "a request holds at most {max_records} records."
        )));
    }
    req.records
        .into_iter()
        .map(|r| {
            let partition = r.partition.or(path_partition);
            if partition.is_some_and(|p| p < 0) {
                return Err(ApiError::invalid_payload("partition must not be negative."));
            }
            Ok(OutRecord {
                partition,
                key: embedded(format, r.key, "key")?,
                value: embedded(format, r.value, "value")?,
                headers: Vec::new(),
                timestamp_ms: None,
            })
        })
        .collect()
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

fn stored_response(s: Stored) -> Response {
    let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
    respond(status, s.content_type, s.body.to_vec())
}

/// `POST /topics/{topic}`.
pub async fn produce_to_topic(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    produce(state, topic, None, client, headers, body).await
}

/// `POST /topics/{topic}/partitions/{partition}`.
pub async fn produce_to_partition(
    State(state): State<AppState>,
    Path((topic, partition)): Path<(String, String)>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(p) = partition.parse::<i32>() else {
        return ApiError::http(StatusCode::NOT_FOUND).into_response();
    };
    produce(state, topic, Some(p), client, headers, body).await
}

async fn produce(
    state: AppState,
    topic: String,
    partition: Option<i32>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match produce_inner(state, topic, partition, client, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn produce_inner(
    state: AppState,
    topic: String,
    partition: Option<i32>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ct = negotiate(&headers, V2_OFFERED)?;
    let format = request_format(&headers).map_err(|e| e.with_content_type(ct))?;
    let in_flight = state.admit(&headers).map_err(|e| e.with_content_type(ct))?;
    let bytes = state
        .read_body(body)
        .await
        .map_err(|e| e.with_content_type(ct))?;
    let path = match partition {
        Some(p) => format!("/topics/{topic}/partitions/{p}"),
        None => format!("/topics/{topic}"),
    };
    let key = idempotency_key(&headers, &client, &path).map_err(|e| e.with_content_type(ct))?;
    let media = media_type(&headers).unwrap_or_default();
    let lead = match key {
        None => None,
        Some(key) => match state
            .shared()
            .window
            .begin(key, fingerprint(&media, &bytes))
            .await
        {
            Begin::Replay(s) => {
                state.shared().metrics.idempotent_replays.inc();
                return Ok(stored_response(s));
            }
            Begin::Conflict => return Err(key_conflict().with_content_type(ct)),
            Begin::Lead(l) => Some(l),
        },
    };
    // Produce in a task of its own: a caller that goes away does not stop it half-way, and
    // the idempotency window learns its outcome either way.
    let task = tokio::spawn(async move {
        let _in_flight = in_flight;
        let stored = produce_records(&state, &topic, partition, format, &bytes, ct).await?;
        if let Some(lead) = lead {
            lead.complete(stored.clone());
        }
        Ok::<_, ApiError>(stored)
    });
    match task.await {
        Ok(Ok(s)) => Ok(stored_response(s)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::internal(&e).with_content_type(ct)),
    }
}

async fn produce_records(
    state: &AppState,
    topic: &str,
    partition: Option<i32>,
    format: Format,
    body: &Bytes,
    ct: &'static str,
) -> Result<Stored, ApiError> {
    let s = state.shared();
    let records = decode(format, body, partition, s.config.max_records_per_request)
        .map_err(|e| e.with_content_type(ct))?;
    let parts = s
        .metadata
        .topic(topic)
        .await
        .map_err(|e| ApiError::metadata(&e).with_content_type(ct))?
        .ok_or_else(|| ApiError::topic_not_found().with_content_type(ct))?;
    let known = |p: i32| parts.iter().any(|i| i.partition == p);
    if partition.is_some_and(|p| !known(p))
        || records
            .iter()
            .any(|r| r.partition.is_some_and(|p| !known(p)))
    {
        return Err(ApiError::partition_not_found().with_content_type(ct));
    }
    let deadline = state.deadline();
    let mut pending = Vec::with_capacity(records.len());
    for r in &records {
        pending.push(s.producer.enqueue(topic, r, deadline).await);
    }
    let mut offsets = Vec::with_capacity(records.len());
    let (mut acked, mut failed, mut acked_bytes) = (0u64, 0u64, 0u64);
    let mut status = StatusCode::OK;
    // In order, one after the other: they are acknowledged together, so this wakes up about
    // once per batch, without the bookkeeping of polling them all at once.
    for (r, delivery) in records.iter().zip(pending) {
        offsets.push(match delivery.await {
            Ok(ack) => {
                acked += 1;
                acked_bytes += r.payload_len() as u64;
                PartitionOffset {
                    partition: Some(ack.partition),
                    offset: Some(ack.offset),
                    error_code: None,
                    error: None,
                }
            }
            Err(refused) => {
                failed += 1;
                status = match refused.code {
                    40101 => StatusCode::UNAUTHORIZED,
                    40301 if status != StatusCode::UNAUTHORIZED => StatusCode::FORBIDDEN,
                    _ => status,
                };
                PartitionOffset {
                    partition: None,
                    offset: None,
                    error_code: Some(refused.code),
                    error: Some(refused.message),
                }
            }
        });
    }
    if acked == 0 && status == StatusCode::OK {
        // Nothing was stored: the caller must not read success in the status line.
        status = StatusCode::INTERNAL_SERVER_ERROR;
    }
    s.metrics
        .records
        .with_label_values(&["acked"])
        .inc_by(acked);
    s.metrics
        .records
        .with_label_values(&["failed"])
        .inc_by(failed);
    s.metrics.acked_bytes.inc_by(acked_bytes);
    let response = ProduceResponse {
        offsets,
        key_schema_id: None,
        value_schema_id: None,
    };
    let body = serde_json::to_vec(&response).map_err(|e| ApiError::internal(&e))?;
    Ok(Stored {
        status: status.as_u16(),
        content_type: ct,
        body: Bytes::from(body),
    })
}

/// A partition as v2 describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Partition id.
    pub partition: i32,
    /// Leader broker.
    pub leader: i32,
    /// Replicas.
    pub replicas: Vec<Replica>,
}

/// A replica as v2 describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Broker id.
    pub broker: i32,
    /// Whether it leads.
    pub leader: bool,
    /// Whether it is in sync.
    pub in_sync: bool,
}

/// `GET /topics/{t}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Configuration.
    pub configs: std::collections::BTreeMap<String, String>,
    /// Partitions.
    pub partitions: Vec<Partition>,
}

/// `GET /brokers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Brokers {
    /// Broker ids.
    pub brokers: Vec<i32>,
}

fn partition_of(p: &PartitionInfo) -> Partition {
    Partition {
        partition: p.partition,
        leader: p.leader,
        replicas: p
            .replicas
            .iter()
            .map(|&b| Replica {
                broker: b,
                leader: b == p.leader,
                in_sync: p.isr.contains(&b),
            })
            .collect(),
    }
}

fn json<T: Serialize>(ct: &'static str, v: &T) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(v).map_err(|e| ApiError::internal(&e))?;
    Ok(respond(StatusCode::OK, ct, body))
}

fn reply(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn partitions_of(
    state: &AppState,
    topic: &str,
    ct: &'static str,
) -> Result<Vec<PartitionInfo>, ApiError> {
    state
        .shared()
        .metadata
        .topic(topic)
        .await
        .map_err(|e| ApiError::metadata(&e).with_content_type(ct))?
        .ok_or_else(|| ApiError::topic_not_found().with_content_type(ct))
}

/// `GET /topics`: the names, sorted.
pub async fn list_topics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    reply(
        async {
            let ct = negotiate(&headers, V2_OFFERED)?;
            let s = state
                .shared()
                .metadata
                .newer_than(std::time::Instant::now())
                .await
                .map_err(|e| ApiError::metadata(&e).with_content_type(ct))?;
            let names: Vec<&String> = s.topics.keys().collect();
            json(ct, &names)
        }
        .await,
    )
}

/// `GET /topics/{t}`.
pub async fn get_topic(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let ct = negotiate(&headers, V2_OFFERED)?;
            let parts = partitions_of(&state, &topic, ct).await?;
            let configs = state
                .shared()
                .metadata
                .topic_configs(&topic)
                .await
                .map_err(|e| ApiError::metadata(&e).with_content_type(ct))?;
            json(
                ct,
                &Topic {
                    name: topic,
                    configs,
                    partitions: parts.iter().map(partition_of).collect(),
                },
            )
        }
        .await,
    )
}

/// `GET /topics/{t}/partitions`.
pub async fn list_partitions(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let ct = negotiate(&headers, V2_OFFERED)?;
            let parts = partitions_of(&state, &topic, ct).await?;
            json(ct, &parts.iter().map(partition_of).collect::<Vec<_>>())
        }
        .await,
    )
}

/// `GET /topics/{t}/partitions/{p}`.
pub async fn get_partition(
    State(state): State<AppState>,
    Path((topic, partition)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let ct = negotiate(&headers, V2_OFFERED)?;
            let Ok(p) = partition.parse::<i32>() else {
                return Err(ApiError::http(StatusCode::NOT_FOUND).with_content_type(ct));
            };
            let parts = partitions_of(&state, &topic, ct).await?;
            let found = parts
                .iter()
                .find(|i| i.partition == p)
                .ok_or_else(|| ApiError::partition_not_found().with_content_type(ct))?;
            json(ct, &partition_of(found))
        }
        .await,
    )
}

/// `GET /brokers`.
pub async fn list_brokers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    reply(
        async {
            let ct = negotiate(&headers, V2_OFFERED)?;
            let s = state
                .shared()
                .metadata
                .newer_than(std::time::Instant::now())
                .await
                .map_err(|e| ApiError::metadata(&e).with_content_type(ct))?;
            json(
                ct,
                &Brokers {
                    brokers: s.brokers.clone(),
                },
            )
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<Vec<OutRecord>, ApiError>) -> (u16, u32) {
        let e = r.unwrap_err();
        (e.status.as_u16(), e.body.error_code)
    }

    #[test]
    fn binary_and_json_records_decode_as_confluent_embeds_them() {
        let recs = decode(
            Format::Binary,
            br#"{"records":[{"key":"a2V5","value":"dmFsdWU="},{"value":"dmFsdWU=","partition":1},{"value":null}]}"#,
            None,
            10,
        )
        .unwrap();
        assert_eq!(recs[0].key.as_deref(), Some(&b"key"[..]));
        assert_eq!(recs[0].value.as_deref(), Some(&b"value"[..]));
        assert_eq!(recs[1].partition, Some(1));
        assert_eq!(recs[2].value, None);
        let recs = decode(
            Format::Json,
            br#"{"records":[{"key":"somekey","value":{"foo":"bar"}},{"value":[1,2]}]}"#,
            Some(2),
            10,
        )
        .unwrap();
        assert_eq!(recs[0].key.as_deref(), Some(&b"\"somekey\""[..]));
        assert_eq!(recs[0].value.as_deref(), Some(&br#"{"foo":"bar"}"#[..]));
        assert_eq!(recs[1].partition, Some(2));
        // Escaped strings, scalars and nesting come out as compact JSON.
        let recs = decode(
            Format::Json,
            br#"{"records":[{"key":"a\"b\u00e9","value":{"n":[1, 2.5, true, null]}},{"value":-3}]}"#,
            None,
            10,
        )
        .unwrap();
        assert_eq!(recs[0].key.as_deref(), Some("\"a\\\"bé\"".as_bytes()));
        assert_eq!(
            recs[0].value.as_deref(),
            Some(&br#"{"n":[1,2.5,true,null]}"#[..])
        );
        assert_eq!(recs[1].value.as_deref(), Some(&b"-3"[..]));
        // An escaped base64 string decodes like a plain one.
        let recs = decode(
            Format::Binary,
            br#"{"records":[{"value":"dmFs\u0064WU="}]}"#,
            None,
            10,
        )
        .unwrap();
        assert_eq!(recs[0].value.as_deref(), Some(&b"value"[..]));
    }

    #[test]
    fn bad_payloads_get_confluents_codes() {
        assert_eq!(err(decode(Format::Binary, b"{", None, 10)), (422, 42203));
        assert_eq!(
            err(decode(
                Format::Binary,
                br#"{"records":[{"value":"%%%"}]}"#,
                None,
                10
            )),
            (422, 42203)
        );
        assert_eq!(
            err(decode(
                Format::Binary,
                br#"{"records":[{"value":5}]}"#,
                None,
                10
            )),
            (422, 42203)
        );
        assert_eq!(
            err(decode(Format::Binary, br#"{"records":[]}"#, None, 10)),
            (422, 42206)
        );
        assert_eq!(
            err(decode(Format::Binary, br#"{"records":[{},{}]}"#, None, 1)),
            (422, 42206)
        );
        assert_eq!(
            err(decode(
                Format::Schema("avro"),
                br#"{"records":[{"key":1,"value":2}]}"#,
                None,
                10
            )),
            (422, 42201)
        );
        assert_eq!(
            err(decode(
                Format::Schema("avro"),
                br#"{"key_schema":"x","records":[{"key":1,"value":2}]}"#,
                None,
                10
            )),
            (422, 42202)
        );
        assert_eq!(
            err(decode(
                Format::Schema("avro"),
                br#"{"value_schema_id":1,"records":[{"value":2}]}"#,
                None,
                10
            )),
            (415, 415)
        );
    }

    #[test]
    fn media_types_and_accept_are_negotiated() {
        let mut h = HeaderMap::new();
        assert_eq!(request_format(&h).unwrap(), Format::Binary);
        assert_eq!(negotiate(&h, V2_OFFERED).unwrap(), V2_JSON);
        h.insert(
            header::CONTENT_TYPE,
            "application/vnd.kafka.json.v2+json; charset=utf-8"
                .parse()
                .unwrap(),
        );
        assert_eq!(request_format(&h).unwrap(), Format::Json);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(request_format(&h).unwrap_err().status.as_u16(), 415);
        h.insert(
            header::ACCEPT,
            "application/vnd.kafka.v2+json, application/vnd.kafka+json, application/json"
                .parse()
                .unwrap(),
        );
        assert_eq!(negotiate(&h, V2_OFFERED).unwrap(), V2_JSON);
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        assert_eq!(negotiate(&h, V2_OFFERED).unwrap(), "application/json");
        h.insert(header::ACCEPT, "text/html".parse().unwrap());
        assert_eq!(negotiate(&h, V2_OFFERED).unwrap_err().status.as_u16(), 406);
    }

    #[test]
    fn responses_serialise_byte_for_byte() {
        let r = ProduceResponse {
            offsets: vec![
                PartitionOffset {
                    partition: Some(0),
                    offset: Some(7),
                    error_code: None,
                    error: None,
                },
                PartitionOffset {
                    partition: None,
                    offset: None,
                    error_code: Some(50003),
                    error: Some("Local: Message timed out".into()),
                },
            ],
            key_schema_id: None,
            value_schema_id: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"offsets":[{"partition":0,"offset":7,"error_code":null,"error":null},{"partition":null,"offset":null,"error_code":50003,"error":"Local: Message timed out"}],"key_schema_id":null,"value_schema_id":null}"#
        );
    }
}
