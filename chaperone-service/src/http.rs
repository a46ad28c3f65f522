//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the consume loop is alive) and
//! `/readyz` (the instance has joined its group and is consuming).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder as _, Registry, TextEncoder};

/// Liveness and readiness flags shared by the pipeline and the HTTP server.
#[derive(Debug, Clone, Default)]
pub struct Health {
    alive: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the consume loop alive (or dead).
    pub fn set_alive(&self, v: bool) {
        self.alive.store(v, Ordering::Relaxed);
    }

    /// Marks the instance ready (or not).
    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Relaxed);
    }

    /// Whether the consume loop is alive.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Whether the instance is ready.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    health: Health,
}

/// The router serving the three endpoints.
pub fn router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health })
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    if s.health.alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not alive").into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.health.ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}
