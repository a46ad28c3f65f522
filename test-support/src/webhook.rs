//! A webhook receiver on 127.0.0.1: what a person subscribed to the alerts would be sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request the receiver got, with when it arrived.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Arrival time.
    pub at: DateTime<Utc>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

impl Notification {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("notification body is not JSON")
    }
}

/// A webhook receiver answering 200 to every POST to `/hook` (and any path below it) and
/// recording it; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Notification>>>,
    stop: CancellationToken,
}

impl Receiver {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// Starts on `addr` (such as a port the test reserved earlier).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook receiver to {addr}"))?;
        Self::serve(listener)
    }

    /// Serves on `listener`, such as one that wraps TCP in TLS.
    pub fn serve<L>(listener: L) -> anyhow::Result<Self>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr()?;
        let received: Arc<Mutex<Vec<Notification>>> = Arc::default();
        let log = Arc::clone(&received);
        let record = move |headers: HeaderMap, body: Bytes| {
            let log = Arc::clone(&log);
            async move {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Notification {
                        at: Utc::now(),
                        headers,
                        body,
                    });
                StatusCode::OK
            }
        };
        let app = Router::new()
            .route("/hook", post(record.clone()))
            .route("/hook/{*rest}", post(record));
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .ok();
        });
        Ok(Self {
            addr,
            received,
            stop,
        })
    }

    /// Address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// URL to configure as the webhook: `http://<addr>/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Everything received so far, in order of arrival.
    pub fn received(&self) -> Vec<Notification> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
