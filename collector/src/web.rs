//! The status page: server-rendered HTML (maud) served by the API's axum server, for a
//! person who wants the answer in a browser: which topics are healthy, where messages went
//! missing, how many, at which hop, and how late the rest arrived.
//!
//! - `/`: every topic with its latest verdict per edge, worst first, open incidents and how
//!   far behind each tier's watermark is; filters `status`, `q` (part of the topic name) and
//!   `page` ([`pages::PAGE_SIZE`] topics a page).
//! - `/topics/{topic}?from=&to=`: messages per bucket and tier as an SVG chart with the
//!   missing and duplicated buckets marked, latency percentiles per tier from the merged
//!   histograms, the verdicts of the range (partition-level ones too) and their history.
//! - `/incidents/{id}`: the incident's buckets, expected against actual, and its webhook
//!   notifications with their delivery state.
//!
//! The numbers come from the functions the JSON API calls (`store::list_topics`,
//! `store::counts_rows` + `store::summarize`, `reconcile::latest_verdicts_by_topic`,
//! `reconcile::verdict_history`, `alerts::list_alerts`); what the API does not serve is read
//! from the same stages' query modules (`reconcile::query::topic_verdicts`,
//! `alerts::query::incident`, …). Query parameters follow the API's rules (unknown or repeated ones answer 400
//! naming the parameter, times are epoch ms or RFC 3339).
//!
//! When the collector has an API token, the pages need it too: `/login` takes it in a form
//! and opens a server-side session ([`session`]): the cookie holds a random id (HttpOnly,
//! SameSite=Lax, `Max-Age` of `api.session_ttl`, `Secure` when `alerts.public_url` is https),
//! never the token. `/logout` deletes the session. Failed logins are rate-limited per client
//! address (429 with `Retry-After`). The pages also accept the token as a bearer token.
//! Without a token the pages are open.
//!
//! - [`pages`]: the HTML of each page, pure functions of what was read.
//! - [`chart`]: the SVG chart.
//! - [`format`]: UTC and relative times.
//! - [`session`]: login sessions and the failed-login limit.

pub mod chart;
pub mod format;
pub mod pages;
pub mod session;

use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use std::net::SocketAddr;

use axum::Extension;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;

use crate::alerts::{self, IncidentStatus};
use crate::api::{self, ApiError, ApiState, Params};
use crate::reconcile::{self, VerdictStatus};
use crate::store;
use session::Login;

pub use format::{encode, topic_href};
pub use session::COOKIE;

/// Most open incidents `/` reads (as `/api/v1/alerts` allows).
const MAX_OPEN_INCIDENTS: i64 = 10_000;

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// What the API would answer.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No such topic or incident.
    #[error("{0}")]
    NotFound(String),
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        Self::Api(e.into())
    }
}

impl From<store::StoreError> for PageError {
    fn from(e: store::StoreError) -> Self {
        Self::Api(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (code, title, message) = match &self {
            PageError::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", what.clone()),
            PageError::Api(ApiError::BadParameter { .. }) => {
                (StatusCode::BAD_REQUEST, "Bad request", self.to_string())
            }
            PageError::Api(ApiError::Unauthorized) => {
                (StatusCode::UNAUTHORIZED, "Log in", self.to_string())
            }
            PageError::Api(ApiError::NotFound) => {
                (StatusCode::NOT_FOUND, "Not found", "not found".to_owned())
            }
            PageError::Api(ApiError::Internal(cause)) => {
                tracing::error!(error = format!("{cause:#}"), "status page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Error",
                    "internal error".to_owned(),
                )
            }
        };
        (code, page(pages::error(title, &message))).into_response()
    }
}

/// The pages' routes, to merge into the API's router; `login` holds the session settings
/// and counts failed logins.
pub fn router(state: ApiState, login: Login) -> Router<ApiState> {
    let pages = Router::new()
        .route("/", get(index))
        .route("/topics/{topic}", get(topic))
        .route("/incidents/{id}", get(incident))
        .route_layer(middleware::from_fn_with_state(state, require_login));
    Router::new()
        .merge(pages)
        .route("/login", get(login_form).post(self::login))
        .route("/logout", post(logout))
        .layer(Extension(login))
}

/// A page that no cache keeps.
fn page(markup: Markup) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        markup,
    )
        .into_response()
}

/// `next` when it is a path on this server, `/` otherwise (no open redirect).
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

/// Whether the request carries the token as a bearer token.
fn bearer(token: &str, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .is_some_and(|b| api::constant_time_eq(b.as_bytes(), token.as_bytes()))
}

/// Whether the request carries the token as a bearer token or a live session's cookie.
async fn authenticated(
    state: &ApiState,
    token: &str,
    headers: &HeaderMap,
) -> Result<bool, PageError> {
    if bearer(token, headers) {
        return Ok(true);
    }
    let now = state.clock.now();
    for id in session::cookie_ids(headers) {
        if session::valid(&state.pool, &id, token, now).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn require_login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, PageError> {
    if let Some(token) = &state.token
        && !authenticated(&state, token, &headers).await?
    {
        let here = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        return Ok(Redirect::to(&format!("/login?next={}", encode(&here))).into_response());
    }
    Ok(next.run(req).await)
}

async fn login_form(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, PageError> {
    let p = api::params(q)?;
    api::check_params(&p, &["next"])?;
    let next = local_path(api::param(&p, "next"));
    if state.token.is_none() {
        return Ok(Redirect::to(&next).into_response());
    }
    Ok(page(pages::login(&next, None)))
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// The address a request came from, when the server was started with it.
type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

fn set_cookie(value: String) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&value)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("login cookie")))
}

async fn login(
    State(state): State<ApiState>,
    Extension(limiter): Extension<Login>,
    peer: Peer,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::bad("token", e.body_text()))?;
    let next = local_path(form.next.as_deref());
    let Some(token) = &state.token else {
        return Ok(Redirect::to(&next).into_response());
    };
    let client = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let now = state.clock.now();
    if let Err(wait) = limiter.check(client, now) {
        tracing::warn!(
            client = ?client,
            retry_after_s = wait.as_secs(),
            "status page login refused: too many failed logins"
        );
        let retry = HeaderValue::from(wait.as_secs());
        return Ok((
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry)],
            page(pages::login(
                &next,
                Some(&format!(
                    "Too many failed logins from this address; try again in {} s.",
                    wait.as_secs()
                )),
            )),
        )
            .into_response());
    }
    if !api::constant_time_eq(form.token.trim().as_bytes(), token.as_bytes()) {
        limiter.failed(client, now);
        return Ok((
            StatusCode::UNAUTHORIZED,
            page(pages::login(
                &next,
                Some("That token is not this collector's."),
            )),
        )
            .into_response());
    }
    limiter.succeeded(client);
    let id = session::open(&state.pool, token, limiter.limits.session_ttl, now).await?;
    let cookie = set_cookie(limiter.cookie(&id))?;
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response())
}

async fn logout(
    State(state): State<ApiState>,
    Extension(limiter): Extension<Login>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    for id in session::cookie_ids(&headers) {
        session::revoke(&state.pool, &id).await?;
    }
    let cookie = set_cookie(limiter.clear_cookie())?;
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response())
}

/// The `status` filter of `/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFilter {
    /// Any latest verdict not complete.
    Bad,
    /// No verdict yet.
    Unjudged,
    /// The worst latest verdict is this.
    Is(VerdictStatus),
}

impl StatusFilter {
    fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "bad" => Ok(Self::Bad),
            "unjudged" => Ok(Self::Unjudged),
            _ => s.parse().map(Self::Is).map_err(|_| {
                let all: Vec<&str> = std::iter::once("bad")
                    .chain(VerdictStatus::ALL.iter().map(|v| v.as_str()))
                    .chain(std::iter::once("unjudged"))
                    .collect();
                ApiError::bad("status", format!("`{s}` is not one of {}", all.join(", ")))
            }),
        }
    }

    fn keeps(self, worst: Option<VerdictStatus>) -> bool {
        match self {
            Self::Bad => worst.is_some_and(|s| s != VerdictStatus::Complete),
            Self::Unjudged => worst.is_none(),
            Self::Is(s) => worst == Some(s),
        }
    }
}

async fn index(
    State(state): State<ApiState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, PageError> {
    let p = api::params(q)?;
    api::check_params(&p, &["status", "q", "page"])?;
    let status = api::param(&p, "status")
        .filter(|s| !s.is_empty())
        .map(StatusFilter::parse)
        .transpose()?;
    let search = api::param(&p, "q").map(str::trim).filter(|s| !s.is_empty());
    if search.is_some_and(|s| s.len() > chaperone_audit::record::MAX_TOPIC_LEN) {
        return Err(ApiError::bad(
            "q",
            format!(
                "longer than a topic name can be ({} bytes)",
                chaperone_audit::record::MAX_TOPIC_LEN
            ),
        )
        .into());
    }
    let page_no = match api::param(&p, "page") {
        None => 1,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(ApiError::bad(
                    "page",
                    format!("`{v}` is not a page number (1, 2, ...)"),
                )
                .into());
            }
        },
    };

    let now = state.clock.now();
    let topics = store::list_topics(&state.pool).await?;
    let mut latest: std::collections::HashMap<String, Vec<reconcile::Verdict>> =
        std::collections::HashMap::new();
    for v in reconcile::latest_verdicts_by_topic(&state.pool).await? {
        latest.entry(v.topic.clone()).or_default().push(v);
    }
    let open =
        alerts::list_alerts(&state.pool, Some(IncidentStatus::Open), MAX_OPEN_INCIDENTS).await?;
    let mut open_by: std::collections::HashMap<&str, Vec<alerts::Incident>> =
        std::collections::HashMap::new();
    for a in &open {
        open_by.entry(a.topic.as_str()).or_default().push(a.clone());
    }
    let mut marks: std::collections::HashMap<String, Vec<store::read::TierWatermark>> =
        std::collections::HashMap::new();
    for w in store::read::tier_watermarks(&state.pool, None).await? {
        marks.entry(w.topic.clone()).or_default().push(w);
    }
    let total = topics.len();
    let mut lines: Vec<pages::TopicLine> = topics
        .into_iter()
        .filter(|t| search.is_none_or(|s| t.topic.contains(s)))
        .map(|t| pages::TopicLine {
            verdicts: latest.remove(&t.topic).unwrap_or_default(),
            open_incidents: open_by.remove(t.topic.as_str()).unwrap_or_default(),
            watermarks: marks.remove(&t.topic).unwrap_or_default(),
            topic: t.topic,
            last_seen_at: t.last_seen_at,
            last_bucket_start_ms: t.last_bucket_start_ms,
        })
        .filter(|l| status.is_none_or(|f| f.keeps(l.worst())))
        .collect();
    lines.sort_by(|a, b| {
        pages::severity(b.worst())
            .cmp(&pages::severity(a.worst()))
            .then(b.open_incidents.len().cmp(&a.open_incidents.len()))
            .then_with(|| a.topic.cmp(&b.topic))
    });
    let matching = lines.len();
    let pages_count = matching.div_ceil(pages::PAGE_SIZE);
    if page_no > pages_count.max(1) {
        return Err(ApiError::bad(
            "page",
            format!(
                "page {page_no} is past the last page ({})",
                pages_count.max(1)
            ),
        )
        .into());
    }
    let lines: Vec<pages::TopicLine> = lines
        .into_iter()
        .skip((page_no - 1) * pages::PAGE_SIZE)
        .take(pages::PAGE_SIZE)
        .collect();
    Ok(page(pages::index(&pages::IndexPage {
        now,
        lines,
        total,
        matching,
        page: page_no,
        pages: pages_count,
        status: status.and(api::param(&p, "status").map(str::to_owned)),
        q: search.map(str::to_owned),
        open,
        parked: store::list_parked(&state.pool, 20).await?,
        with_logout: state.token.is_some(),
    })))
}

async fn topic(
    State(state): State<ApiState>,
    Path(topic): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, PageError> {
    if topic.is_empty() || topic.len() > chaperone_audit::record::MAX_TOPIC_LEN {
        return Err(ApiError::bad("topic", "not a valid topic name").into());
    }
    let p = api::params(q)?;
    api::check_params(&p, &["from", "to"])?;
    let now = state.clock.now();
    let (from, to) = api::parse_range(&p, now, api::DEFAULT_RANGE, Some(state.max_range))?;
    let (from_ms, to_ms) = (from.timestamp_millis(), to.timestamp_millis());
    if !store::read::topic_exists(&state.pool, &topic).await? {
        return Err(PageError::NotFound(format!(
            "no topic `{topic}` is known to this collector"
        )));
    }
    let rows = store::counts_rows(&state.pool, &topic, from_ms, to_ms).await?;
    // The whole range as one bucket: the same exact merge the API does per bucket.
    let range_tiers = store::summarize(
        rows.iter()
            .map(|r| store::CountsRow {
                bucket_start_ms: from_ms,
                bucket_width_ms: to_ms - from_ms,
                ..r.clone()
            })
            .collect(),
    )
    .into_iter()
    .next()
    .map(|b| b.tiers)
    .unwrap_or_default();
    let buckets = store::summarize(rows);
    let verdicts = reconcile::query::topic_verdicts(&state.pool, &topic, from_ms, to_ms).await?;
    let history =
        reconcile::verdict_history(&state.pool, &topic, Some(from_ms), Some(to_ms)).await?;
    let watermarks = store::read::tier_watermarks(&state.pool, Some(&topic)).await?;
    Ok(page(pages::topic(&pages::TopicPage {
        now,
        topic,
        from_ms,
        to_ms,
        buckets,
        range_tiers,
        verdicts,
        history,
        watermarks,
        with_logout: state.token.is_some(),
    })))
}

async fn incident(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, PageError> {
    let p = api::params(q)?;
    api::check_params(&p, &[])?;
    let id = id.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad(
            "id",
            format!("`{id}` is not an incident id (a whole number from 1)"),
        )
    })?;
    let Some(incident) = alerts::query::incident(&state.pool, id).await? else {
        return Err(PageError::NotFound(format!("no incident #{id}")));
    };
    let verdicts = reconcile::query::incident_verdicts(&state.pool, id).await?;
    Ok(page(pages::incident(&pages::IncidentPage {
        now: state.clock.now(),
        incident,
        verdicts,
        with_logout: state.token.is_some(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_keeps_redirects_local() {
        assert_eq!(encode("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
        assert_eq!(topic_href("orders.v1"), "/topics/orders.v1");
        assert_eq!(local_path(Some("/topics/x?from=1")), "/topics/x?from=1");
        assert_eq!(local_path(Some("//evil.example/")), "/");
        assert_eq!(local_path(Some("https://evil.example/")), "/");
        assert_eq!(local_path(Some("/\\evil")), "/");
        assert_eq!(local_path(None), "/");
    }

    #[test]
    fn reads_the_bearer_token() {
        let mut h = HeaderMap::new();
        assert!(!bearer("s3cret", &h));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(bearer("s3cret", &h));
        assert!(!bearer("other", &h));
    }

    #[test]
    fn status_filters() {
        assert_eq!(StatusFilter::parse("bad").unwrap(), StatusFilter::Bad);
        assert!(StatusFilter::Bad.keeps(Some(VerdictStatus::Lagging)));
        assert!(!StatusFilter::Bad.keeps(Some(VerdictStatus::Complete)));
        assert!(StatusFilter::parse("unjudged").unwrap().keeps(None));
        assert!(
            StatusFilter::parse("missing")
                .unwrap()
                .keeps(Some(VerdictStatus::Missing))
        );
        match StatusFilter::parse("lost") {
            Err(ApiError::BadParameter { param, message }) => {
                assert_eq!(param, "status");
                assert!(message.contains("upstream_incomplete"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
