//! The HTTP API: Confluent's v2 and v3 produce and metadata endpoints, plus `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! - [`error`]: [`ApiError`], the one request-level error, shaped as Confluent's.
//! - [`v2`]: `POST /topics/{t}[/partitions/{p}]`, `GET /topics...`, `GET /brokers`.
//! - [`v3`]: `GET /v3/clusters[/{id}]`, `POST /v3/clusters/{id}/topics/{t}/records`.
//! - [`idempotency`]: the `Idempotency-Key` window.
//! - here: shared state, authentication, the in-flight bound, body reading.

pub mod error;
pub mod idempotency;
pub mod v2;
pub mod v3;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use prometheus::{Encoder as _, Registry, TextEncoder};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use error::ApiError;

use crate::config::{Config, Credentials};
use crate::kafka::{Metadata, Producer};
use crate::metrics::Metrics;

/// Everything a request handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

/// What [`AppState`] shares.
#[derive(Debug)]
pub struct Shared {
    /// The producer.
    pub producer: Arc<Producer>,
    /// Cached metadata.
    pub metadata: Metadata,
    /// Metrics of the proxy.
    pub metrics: Metrics,
    /// Registry `/metrics` exposes.
    pub registry: Registry,
    /// The id v3 paths name.
    pub cluster_id: String,
    /// Idempotency window.
    pub window: idempotency::Window,
    /// In-flight bytes bound.
    pub in_flight: Arc<Semaphore>,
    /// Client secrets.
    pub credentials: Credentials,
    /// Configuration.
    pub config: Config,
}

impl AppState {
    /// Builds the state.
    pub fn new(shared: Shared) -> Self {
        Self {
            inner: Arc::new(shared),
        }
    }

    fn s(&self) -> &Shared {
        &self.inner
    }
}

/// The name of the authenticated client (`anonymous` without authentication).
#[derive(Debug, Clone)]
pub struct Client(pub String);

/// The whole router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/topics", get(v2::list_topics))
        .route(
            "/topics/{topic}",
            get(v2::get_topic).post(v2::produce_to_topic),
        )
        .route("/topics/{topic}/partitions", get(v2::list_partitions))
        .route(
            "/topics/{topic}/partitions/{partition}",
            get(v2::get_partition).post(v2::produce_to_partition),
        )
        .route("/brokers", get(v2::list_brokers))
        .route("/v3/clusters", get(v3::list_clusters))
        .route("/v3/clusters/{cluster_id}", get(v3::get_cluster))
        .route(
            "/v3/clusters/{cluster_id}/topics/{topic}/records",
            post(v3::produce),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::http(StatusCode::NOT_FOUND) })
        .method_not_allowed_fallback(|| async { ApiError::http(StatusCode::METHOD_NOT_ALLOWED) })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts every answer by endpoint (its route, never the topic) and status.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = endpoint(req.uri().path());
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        _ => "OTHER",
    };
    let started = Instant::now();
    let res = next.run(req).await;
    let label = format!("{method} {endpoint}");
    let m = &state.s().metrics;
    m.requests
        .with_label_values(&[label.as_str(), res.status().as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[label.as_str()])
        .observe(started.elapsed().as_secs_f64());
    res
}

/// The route a path falls under, as a bounded metric label (never a topic name).
fn endpoint(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["topics"] => "/topics",
        ["topics", _] => "/topics/{topic}",
        ["topics", _, "partitions"] => "/topics/{topic}/partitions",
        ["topics", _, "partitions", _] => "/topics/{topic}/partitions/{partition}",
        ["brokers"] => "/brokers",
        ["v3", "clusters"] => "/v3/clusters",
        ["v3", "clusters", _] => "/v3/clusters/{cluster_id}",
        ["v3", "clusters", _, "topics", _, "records"] => {
            "/v3/clusters/{cluster_id}/topics/{topic}/records"
        }
        ["metrics"] => "/metrics",
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        _ => "other",
    }
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (digest(a.as_bytes()), digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Who sent `headers`, when the credentials match a configured client.
fn identify(creds: &Credentials, headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        let mut found = None;
        for (client, token) in &creds.bearer {
            if same_secret(rest, token) {
                found = Some(client.clone());
            }
        }
        found
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        let mut found = None;
        for (u, p) in &creds.basic {
            if u == user && same_secret(password, p) {
                found = Some(u.clone());
            }
        }
        found
    } else {
        None
    }
}

async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let creds = &state.s().credentials;
    let client = if creds.required() {
        match identify(creds, req.headers()) {
            Some(c) => c,
            None => {
                state
                    .s()
                    .metrics
                    .rejected
                    .with_label_values(&["unauthorized"])
                    .inc();
                return ApiError::unauthorized().into_response();
            }
        }
    } else {
        "anonymous".to_owned()
    };
    req.extensions_mut().insert(Client(client));
    next.run(req).await
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.s().registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response(),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.s().metadata.get().await {
        Ok(s) if !s.brokers.is_empty() => (StatusCode::OK, "ready").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "kafka unreachable").into_response(),
    }
}

/// A share of the in-flight bound, released when dropped.
#[derive(Debug)]
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
    state: AppState,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The permit is released after this body runs; count it as gone already.
        let s = self.state.s();
        let held = s.config.max_in_flight_bytes
            - s.in_flight.available_permits()
            - self._permit.num_permits();
        s.metrics.in_flight_bytes.set(held as i64);
    }
}

impl AppState {
    /// Reserves `bytes` of the in-flight bound, or answers 429.
    pub fn reserve(&self, bytes: usize) -> Result<InFlight, ApiError> {
        let s = self.s();
        let n = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        match Arc::clone(&s.in_flight).try_acquire_many_owned(n) {
            Ok(permit) => {
                let held = s.config.max_in_flight_bytes - s.in_flight.available_permits();
                s.metrics.in_flight_bytes.set(held as i64);
                Ok(InFlight {
                    _permit: permit,
                    state: self.clone(),
                })
            }
            Err(_) => {
                s.metrics
                    .rejected
                    .with_label_values(&["in_flight_bytes"])
                    .inc();
                Err(ApiError::too_many_requests(
                    s.config.retry_after.as_secs_f64().ceil() as u64,
                ))
            }
        }
    }

    /// Checks the declared length against the request limit and reserves room for the body:
    /// its declared length, or the limit when it declares none.
    pub fn admit(&self, headers: &HeaderMap) -> Result<InFlight, ApiError> {
        let limit = self.s().config.max_request_bytes;
        let declared = content_length(headers);
        if declared.is_some_and(|n| n > limit) {
            self.too_large();
            return Err(ApiError::too_large(limit));
        }
        self.reserve(declared.unwrap_or(limit))
    }

    fn too_large(&self) {
        self.s()
            .metrics
            .rejected
            .with_label_values(&["too_large"])
            .inc();
    }

    /// Reads the whole body, at most `max_request_bytes`.
    pub async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.s().config.max_request_bytes;
        axum::body::to_bytes(body, limit).await.map_err(|e| {
            tracing::debug!(error = %e, "request body not read");
            self.too_large();
            ApiError::too_large(limit)
        })
    }

    /// The deadline of a record enqueued now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.s().config.produce_timeout
    }

    /// The shared parts.
    pub fn shared(&self) -> &Shared {
        self.s()
    }
}

/// The declared `Content-Length`, if any.
pub fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The media type of `Content-Type`, lowercased, without parameters.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(ct.split(';').next()?.trim().to_ascii_lowercase())
}

/// The `Idempotency-Key` of the request scoped to its client and path, if it has one, or a
/// 400 when it is not 1 to 255 visible ASCII characters.
pub fn idempotency_key(
    headers: &HeaderMap,
    client: &Client,
    path: &str,
) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let ok = !v.is_empty() && v.len() <= 255 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            400,
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        ));
    }
    let key = v.to_str().unwrap_or_default();
    Ok(Some(format!("{}\n{path}\n{key}", client.0)))
}

/// The fingerprint a reused key must match: the media type and the body.
pub fn fingerprint(media: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(media.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// 422 for a key reused with another request.
pub fn key_conflict() -> ApiError {
    ApiError::invalid_payload("Idempotency-Key was already used with a different request.")
}

/// A duration as whole seconds, at least 1.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            bearer: vec![("orders".into(), "tok".into())],
            basic: vec![("alice".into(), "pw".into())],
        }
    }

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_and_basic_identify_their_client() {
        let c = creds();
        assert_eq!(
            identify(&c, &with_auth("Bearer tok")).as_deref(),
            Some("orders")
        );
        assert_eq!(identify(&c, &with_auth("Bearer tak")), None);
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:pw");
        assert_eq!(
            identify(&c, &with_auth(&format!("Basic {basic}"))).as_deref(),
            Some("alice")
        );
        let wrong = base64::engine::general_purpose::STANDARD.encode("alice:px");
        assert_eq!(identify(&c, &with_auth(&format!("Basic {wrong}"))), None);
        assert_eq!(identify(&c, &HeaderMap::new()), None);
    }

    #[test]
    fn idempotency_keys_are_scoped_and_checked() {
        let mut h = HeaderMap::new();
        let c = Client("a".into());
        assert_eq!(idempotency_key(&h, &c, "/topics/t").unwrap(), None);
        h.insert("idempotency-key", "k-1".parse().unwrap());
        assert_eq!(
            idempotency_key(&h, &c, "/topics/t").unwrap().as_deref(),
            Some("a\n/topics/t\nk-1")
        );
        h.insert("idempotency-key", "x".repeat(256).parse().unwrap());
        assert!(idempotency_key(&h, &c, "/topics/t").is_err());
    }
}
