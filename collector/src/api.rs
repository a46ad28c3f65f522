//! The collector's HTTP API (axum): stored counts and latency per topic, bucket and tier,
//! health, readiness and Prometheus metrics.
//!
//! `/api/` routes require `Authorization: Bearer <token>` when a token is configured;
//! `/healthz`, `/readyz` and `/metrics` are always open. Every failure is an [`ApiError`]:
//! bad query parameters answer 400 with a JSON body naming the parameter; internal errors
//! answer a generic 500 and log their cause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chaperone_daemon_support::Clock;
use chrono::{DateTime, Utc};
use prometheus::Registry;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ingest::IngestStatus;
use crate::metrics::IngestMetrics;
use crate::store;

/// Default span of `/buckets` when `from` is not given.
pub(crate) const DEFAULT_RANGE: Duration = Duration::from_secs(3_600);

/// Connections of the health checks' own pool ([`health_pool`]).
pub const HEALTH_CONNECTIONS: u32 = 2;

/// Longest `/readyz` waits for a connection of its pool; a flood of probes past
/// [`HEALTH_CONNECTIONS`] answers "database unreachable" rather than queueing.
pub const HEALTH_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// The pool `/readyz` checks the database with: [`HEALTH_CONNECTIONS`] connections of its own
/// to the database of `pool` (same settings), so that probes, however many, never take a
/// connection that ingest, reconciliation or the API needs. Connects on first use.
pub fn health_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(HEALTH_CONNECTIONS)
        .acquire_timeout(HEALTH_ACQUIRE_TIMEOUT)
        .connect_lazy_with(
            pool.connect_options()
                .as_ref()
                .clone()
                .options([("statement_timeout", HEALTH_ACQUIRE_TIMEOUT.as_millis())]),
        )
}

/// Compares in time independent of where the inputs differ (tokens, token hashes).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The store.
    pub pool: PgPool,
    /// `/readyz`'s own small pool to the store ([`health_pool`]).
    pub health_pool: PgPool,
    /// Served by `/metrics`.
    pub registry: Registry,
    /// Required bearer token, if any. Never logged.
    pub token: Option<Arc<str>>,
    /// Ingest health for `/readyz`.
    pub status: Arc<IngestStatus>,
    /// Wall clock for default ranges.
    pub clock: Clock,
    /// Request timings.
    pub metrics: IngestMetrics,
    /// Longest `/buckets` range.
    pub max_range: Duration,
}

/// Every way an API request fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// A query or path parameter is malformed, unknown or out of range.
    #[error("invalid parameter `{param}`: {message}")]
    BadParameter {
        /// The parameter's name.
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// The bearer token is missing or wrong.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Nothing matches the request.
    #[error("not found")]
    NotFound,
    /// A failure on our side; the cause is logged, not returned.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadParameter {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        Self::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::BadParameter { param, .. } => (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": self.to_string(), "parameter": param })),
            )
                .into_response(),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                Json(json!({ "error": self.to_string() })),
            )
                .into_response(),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": self.to_string() })),
            )
                .into_response(),
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "api request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "error": "internal error" })),
                )
                    .into_response()
            }
        }
    }
}

/// The API's routes: `/api/v1/…` (behind the bearer token when one is set), `/healthz`,
/// `/readyz` and `/metrics`. [`crate::router`] merges them with the status page's and
/// finishes them with [`layered`].
pub fn routes(state: ApiState) -> Router<ApiState> {
    let api = Router::new()
        .route("/api/v1/topics", get(topics))
        .route("/api/v1/topics/{topic}/buckets", get(buckets))
        .route("/api/v1/verdicts", get(verdicts))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/parked", get(parked))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The server's router from every route of `routes`: unknown paths answer the API's 404 and
/// every request is timed by route.
pub fn layered(routes: Router<ApiState>, state: ApiState) -> Router {
    routes
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then finishes the requests
/// in progress. Handlers see the peer's address (the status page's login limit counts
/// failures per address).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

async fn timed(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let started = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .api_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The route template of `path`, so the metric label stays bounded.
fn route_label(path: &str) -> &'static str {
    const STATIC: [&str; 10] = [
        "/",
        "/login",
        "/logout",
        "/api/v1/topics",
        "/api/v1/verdicts",
        "/api/v1/alerts",
        "/api/v1/parked",
        "/healthz",
        "/readyz",
        "/metrics",
    ];
    if let Some(r) = STATIC.iter().find(|r| **r == path) {
        return r;
    }
    for (prefix, label) in [
        ("/topics/", "/topics/{topic}"),
        ("/incidents/", "/incidents/{id}"),
    ] {
        if path
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.contains('/'))
        {
            return label;
        }
    }
    match path
        .strip_prefix("/api/v1/topics/")
        .and_then(|rest| rest.strip_suffix("/buckets"))
    {
        Some(topic) if !topic.contains('/') => "/api/v1/topics/{topic}/buckets",
        _ => "other",
    }
}

async fn authorize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => {}
            _ => return Err(ApiError::Unauthorized),
        }
    }
    Ok(next.run(req).await)
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.health_pool),
    )
    .await;
    let (ready, reason) = match db {
        Ok(Ok(_)) if state.status.is_ready() => (true, None),
        Ok(Ok(_)) => (false, Some("ingest is not running yet or cannot store")),
        Ok(Err(_)) | Err(_) => (false, Some("database unreachable")),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({ "ready": ready, "reason": reason }))).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(&state.registry),
    )
        .into_response()
}

/// Query parameters as given, in order.
pub(crate) type Params = Vec<(String, String)>;

pub(crate) fn params(q: Result<Query<Params>, QueryRejection>) -> Result<Params, ApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| ApiError::bad("query", e.body_text()))
}

/// Checks that only `allowed` parameters appear, each at most once.
pub(crate) fn check_params(params: &Params, allowed: &[&str]) -> Result<(), ApiError> {
    for (i, (k, _)) in params.iter().enumerate() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad(
                k.clone(),
                format!("unknown parameter (allowed: {})", allowed.join(", ")),
            ));
        }
        if params[..i].iter().any(|(p, _)| p == k) {
            return Err(ApiError::bad(k.clone(), "given more than once"));
        }
    }
    Ok(())
}

pub(crate) fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parses a time given as epoch milliseconds or RFC 3339.
pub fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let v = value.trim();
    let parsed = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        v.parse::<i64>()
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
    } else {
        DateTime::parse_from_rfc3339(v)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    };
    parsed.ok_or_else(|| {
        ApiError::bad(
            name,
            format!("`{value}` is neither epoch milliseconds nor an RFC 3339 time"),
        )
    })
}

/// Parses optional `from` and `to`, defaulting to `[to - default, now)`, and checks them.
pub fn parse_range(
    params: &Params,
    now: DateTime<Utc>,
    default: Duration,
    max: Option<Duration>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = match param(params, "to") {
        Some(v) => parse_time("to", v)?,
        None => now,
    };
    let from = match param(params, "from") {
        Some(v) => parse_time("from", v)?,
        None => to - chrono::Duration::from_std(default).unwrap_or(chrono::Duration::hours(1)),
    };
    if from >= to {
        return Err(ApiError::bad("from", "must be earlier than `to`"));
    }
    if let Some(max) = max {
        let span = (to - from).to_std().unwrap_or(Duration::MAX);
        if span > max {
            return Err(ApiError::bad(
                "from",
                format!(
                    "the range spans {} s, more than the {} s allowed",
                    span.as_secs(),
                    max.as_secs()
                ),
            ));
        }
    }
    Ok((from, to))
}

async fn topics(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    check_params(&p, &[])?;
    let rows = store::list_topics(&state.pool).await?;
    let mut latest: std::collections::BTreeMap<String, Vec<crate::reconcile::Verdict>> =
        std::collections::BTreeMap::new();
    for v in crate::reconcile::latest_verdicts_by_topic(&state.pool).await? {
        latest.entry(v.topic.clone()).or_default().push(v);
    }
    let topics: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|t| {
            let verdicts = latest.remove(&t.topic).unwrap_or_default();
            json!({
                "topic": t.topic,
                "first_seen_at": t.first_seen_at,
                "last_seen_at": t.last_seen_at,
                "last_bucket_start_ms": t.last_bucket_start_ms,
                "latest_verdicts": verdicts,
            })
        })
        .collect();
    Ok(Json(json!({ "topics": topics })).into_response())
}

async fn buckets(
    State(state): State<ApiState>,
    Path(topic): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    if topic.is_empty() || topic.len() > chaperone_audit::record::MAX_TOPIC_LEN {
        return Err(ApiError::bad("topic", "not a valid topic name"));
    }
    let p = params(q)?;
    check_params(&p, &["from", "to"])?;
    let (from, to) = parse_range(&p, state.clock.now(), DEFAULT_RANGE, Some(state.max_range))?;
    let rows = store::counts_rows(
        &state.pool,
        &topic,
        from.timestamp_millis(),
        to.timestamp_millis(),
    )
    .await?;
    let buckets = store::summarize(rows);
    Ok(Json(json!({
        "topic": topic,
        "from_ms": from.timestamp_millis(),
        "to_ms": to.timestamp_millis(),
        "buckets": buckets,
    }))
    .into_response())
}

/// Parses optional `from` and `to` without defaults; when both are given, `from < to`.
fn optional_range(params: &Params) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let from = param(params, "from")
        .map(|v| parse_time("from", v))
        .transpose()?;
    let to = param(params, "to")
        .map(|v| parse_time("to", v))
        .transpose()?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(ApiError::bad("from", "must be earlier than `to`"));
    }
    Ok((
        from.map(|t| t.timestamp_millis()),
        to.map(|t| t.timestamp_millis()),
    ))
}

async fn verdicts(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::reconcile::VerdictStatus;
    let p = params(q)?;
    check_params(&p, &["status", "from", "to"])?;
    let status = param(&p, "status")
        .map(|s| {
            s.parse::<VerdictStatus>().map_err(|_| {
                let allowed: Vec<&str> = VerdictStatus::ALL.iter().map(|v| v.as_str()).collect();
                ApiError::bad(
                    "status",
                    format!("`{s}` is not one of {}", allowed.join(", ")),
                )
            })
        })
        .transpose()?;
    let (from, to) = optional_range(&p)?;
    let verdicts = crate::reconcile::list_verdicts(&state.pool, status, from, to).await?;
    Ok(Json(json!({ "verdicts": verdicts })).into_response())
}

async fn alerts(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::alerts::IncidentStatus;
    let p = params(q)?;
    check_params(&p, &["status", "limit"])?;
    let status = param(&p, "status")
        .map(|s| {
            s.parse::<IncidentStatus>()
                .map_err(|e| ApiError::bad("status", e.to_string()))
        })
        .transpose()?;
    let limit = limit_param(&p, 100)?;
    let alerts = crate::alerts::list_alerts(&state.pool, status, limit).await?;
    Ok(Json(json!({ "alerts": alerts })).into_response())
}

/// The `limit` parameter: a whole number from 1 to 10000, `default` when absent.
fn limit_param(p: &Params, default: i64) -> Result<i64, ApiError> {
    match param(p, "limit") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=10_000).contains(&n) => Ok(n),
            _ => Err(ApiError::bad(
                "limit",
                format!("`{v}` is not a whole number from 1 to 10000"),
            )),
        },
    }
}

/// Records the dead-letter topic did not take, parked in PostgreSQL: how many, and the latest
/// `limit` (default 100), newest first.
async fn parked(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    check_params(&p, &["limit"])?;
    let limit = limit_param(&p, 100)?;
    let (total, records) = store::list_parked(&state.pool, limit).await?;
    Ok(Json(json!({ "total": total, "parked": records })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    fn p(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn param_of(e: ApiError) -> String {
        match e {
            ApiError::BadParameter { param, .. } => param,
            other => panic!("expected a bad parameter, got {other:?}"),
        }
    }

    #[test]
    fn parses_times() {
        let t = parse_time("from", "1764067200000").expect("ms");
        assert_eq!(t.timestamp_millis(), 1_764_067_200_000);
        let t = parse_time("from", "2025-11-25T10:40:00Z").expect("rfc3339");
        assert_eq!(t.timestamp_millis(), 1_764_067_200_000);
        assert_eq!(
            param_of(parse_time("to", "yesterday").expect_err("bad")),
            "to"
        );
        assert_eq!(param_of(parse_time("to", "").expect_err("bad")), "to");
    }

    #[test]
    fn ranges_default_and_are_checked() {
        let now = DateTime::<Utc>::from_timestamp_millis(1_764_067_200_000).expect("time");
        let (from, to) = parse_range(&p(&[]), now, DEFAULT_RANGE, None).expect("default");
        assert_eq!(to, now);
        assert_eq!((to - from).num_seconds(), 3_600);
        let err = parse_range(
            &p(&[("from", "2000"), ("to", "1000")]),
            now,
            DEFAULT_RANGE,
            None,
        )
        .expect_err("reversed");
        assert_eq!(param_of(err), "from");
        let err = parse_range(
            &p(&[("from", "0"), ("to", "1764067200000")]),
            now,
            DEFAULT_RANGE,
            Some(Duration::from_secs(86_400)),
        )
        .expect_err("too long");
        assert_eq!(param_of(err), "from");
    }

    #[test]
    fn unknown_and_repeated_parameters_are_named() {
        let err = check_params(&p(&[("from", "1"), ("form", "2")]), &["from", "to"])
            .expect_err("unknown");
        assert_eq!(param_of(err), "form");
        let err =
            check_params(&p(&[("to", "1"), ("to", "2")]), &["from", "to"]).expect_err("repeated");
        assert_eq!(param_of(err), "to");
    }

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label("/api/v1/topics"), "/api/v1/topics");
        assert_eq!(
            route_label("/api/v1/topics/orders/buckets"),
            "/api/v1/topics/{topic}/buckets"
        );
        assert_eq!(route_label("/api/v1/topics/a/b/buckets"), "other");
        assert_eq!(route_label("/random"), "other");
    }
}
