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

/// A webhook receiver answering 200 (or what it is told) to every POST to `/hook` (and any
/// path below it) and recording it; stops when dropped.
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

    /// Starts on a free port of 127.0.0.1, answering each request what `answer` says of it
    /// (status and body), for example a 400 to the notifications of one topic. Every request
    /// is recorded, answered 2xx or not.
    pub async fn start_answering<A>(answer: A) -> anyhow::Result<Self>
    where
        A: Fn(&Notification) -> (StatusCode, String) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the webhook receiver")?;
        Self::serve_answering(listener, answer)
    }

    /// Serves on `listener`, such as one that wraps TCP in TLS.
    pub fn serve<L>(listener: L) -> anyhow::Result<Self>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        Self::serve_answering(listener, |_: &Notification| (StatusCode::OK, String::new()))
    }

    /// Serves on `listener`, answering as `answer` says (see [`Self::start_answering`]).
    pub fn serve_answering<L, A>(listener: L, answer: A) -> anyhow::Result<Self>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
        A: Fn(&Notification) -> (StatusCode, String) + Send + Sync + 'static,
    {
        let addr = listener.local_addr()?;
        let received: Arc<Mutex<Vec<Notification>>> = Arc::default();
        let log = Arc::clone(&received);
        let answer = Arc::new(answer);
        let record = move |headers: HeaderMap, body: Bytes| {
            let log = Arc::clone(&log);
            let answer = Arc::clone(&answer);
            async move {
                let notification = Notification {
                    at: Utc::now(),
                    headers,
                    body,
                };
                let answered = answer(&notification);
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(notification);
                answered
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
