//! The `Idempotency-Key` window: a retried request with the same key (same client, same
//! path) within `idempotency.window` gets the first request's response and produces nothing.
//!
//! - Concurrent duplicates: the first request leads; the others wait for its response.
//! - A leader that ends without a response (the request was refused before producing, say)
//!   abandons the key and one waiter leads instead.
//! - A key reused with a different body is refused (422), so a client bug cannot silently
//!   turn into a lost record.
//! - Memory is bounded by `max_keys` and `max_bytes` (responses plus [`ENTRY_OVERHEAD`] per
//!   key); past either bound the oldest keys are forgotten first, and they leave after
//!   `window` anyway. A response larger than a tenth of `max_bytes` is handed to the waiters
//!   of the moment but not remembered.
//! - The window lives in memory: a restarted proxy has forgotten it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use tokio::sync::watch;

use crate::config::IdempotencyConfig;
use crate::metrics::Metrics;

/// Bookkeeping counted per remembered key, beside its response and key bytes.
pub const ENTRY_OVERHEAD: usize = 512;

/// A response as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Bytes,
}

#[derive(Debug, Clone)]
enum State {
    Waiting,
    Done(Stored),
    Abandoned,
}

#[derive(Debug)]
enum Entry {
    Pending {
        fingerprint: [u8; 32],
        rx: watch::Receiver<State>,
        generation: u64,
    },
    Done {
        fingerprint: [u8; 32],
        response: Stored,
        at: Instant,
        size: usize,
        generation: u64,
    },
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    order: VecDeque<(String, u64)>,
    bytes: usize,
    done: usize,
    generation: u64,
}

/// The window shared by every request.
#[derive(Debug, Clone)]
pub struct Window {
    inner: Arc<Mutex<Inner>>,
    config: IdempotencyConfig,
    metrics: Option<Metrics>,
}

/// What a request with a key does.
#[derive(Debug)]
pub enum Begin {
    /// Answer with the first request's response.
    Replay(Stored),
    /// The key was used with a different body.
    Conflict,
    /// Produce, then hand the response to [`Lead::complete`].
    Lead(Lead),
}

/// The right and duty to answer for a key. Dropped without [`Lead::complete`], it abandons
/// the key.
#[derive(Debug)]
pub struct Lead {
    window: Window,
    key: String,
    fingerprint: [u8; 32],
    generation: u64,
    tx: Option<watch::Sender<State>>,
}

impl Window {
    /// An empty window.
    pub fn new(config: IdempotencyConfig, metrics: Option<Metrics>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            config,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a request holding `key` whose body hashes to `fingerprint`.
    pub async fn begin(&self, key: String, fingerprint: [u8; 32]) -> Begin {
        loop {
            let mut rx = {
                let mut inner = self.lock();
                self.evict(&mut inner, Instant::now());
                match inner.map.get(&key) {
                    Some(Entry::Done {
                        fingerprint: f,
                        response,
                        ..
                    }) => {
                        return if *f == fingerprint {
                            Begin::Replay(response.clone())
                        } else {
                            Begin::Conflict
                        };
                    }
                    Some(Entry::Pending {
                        fingerprint: f, rx, ..
                    }) => {
                        if *f != fingerprint {
                            return Begin::Conflict;
                        }
                        rx.clone()
                    }
                    None => {
                        inner.generation += 1;
                        let generation = inner.generation;
                        let (tx, rx) = watch::channel(State::Waiting);
                        inner.map.insert(
                            key.clone(),
                            Entry::Pending {
                                fingerprint,
                                rx,
                                generation,
                            },
                        );
                        return Begin::Lead(Lead {
                            window: self.clone(),
                            key,
                            fingerprint,
                            generation,
                            tx: Some(tx),
                        });
                    }
                }
            };
            let state = match rx.wait_for(|s| !matches!(s, State::Waiting)).await {
                Ok(s) => s.clone(),
                Err(_) => State::Abandoned,
            };
            match state {
                State::Done(r) => return Begin::Replay(r),
                State::Waiting | State::Abandoned => continue,
            }
        }
    }

    /// Forgets expired keys, then the oldest while over a bound.
    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some((key, generation)) = inner.order.front().cloned() {
            let (expired, size) = match inner.map.get(&key) {
                Some(Entry::Done {
                    at,
                    size,
                    generation: g,
                    ..
                }) if *g == generation => (now.duration_since(*at) >= self.config.window, *size),
                _ => {
                    inner.order.pop_front();
                    continue;
                }
            };
            let over = inner.done > self.config.max_keys || inner.bytes > self.config.max_bytes;
            if !expired && !over {
                break;
            }
            inner.order.pop_front();
            inner.map.remove(&key);
            inner.bytes -= size;
            inner.done -= 1;
        }
        if let Some(m) = &self.metrics {
            m.idempotency_keys.set(inner.done as i64);
            m.idempotency_bytes.set(inner.bytes as i64);
        }
    }

    /// Keys remembered and the bytes they hold.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.done, inner.bytes)
    }

    #[cfg(test)]
    fn evict_at(&self, now: Instant) {
        let mut inner = self.lock();
        self.evict(&mut inner, now);
    }
}

impl Lead {
    /// Remembers `response` for the key and hands it to the waiting duplicates.
    pub fn complete(mut self, response: Stored) {
        let size = response.body.len() + self.key.len() + ENTRY_OVERHEAD;
        let remember = size <= self.window.config.max_bytes / 10;
        {
            let mut inner = self.window.lock();
            let ours = matches!(inner.map.get(&self.key),
                Some(Entry::Pending { generation, .. }) if *generation == self.generation);
            if ours {
                if remember {
                    inner.map.insert(
                        self.key.clone(),
                        Entry::Done {
                            fingerprint: self.fingerprint,
                            response: response.clone(),
                            at: Instant::now(),
                            size,
                            generation: self.generation,
                        },
                    );
                    inner.order.push_back((self.key.clone(), self.generation));
                    inner.bytes += size;
                    inner.done += 1;
                } else {
                    inner.map.remove(&self.key);
                }
            }
            self.window.evict(&mut inner, Instant::now());
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(State::Done(response));
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        {
            let mut inner = self.window.lock();
            let ours = matches!(inner.map.get(&self.key),
                Some(Entry::Pending { generation, .. }) if *generation == self.generation);
            if ours {
                inner.map.remove(&self.key);
            }
        }
        let _ = tx.send(State::Abandoned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(max_keys: usize, max_bytes: usize) -> IdempotencyConfig {
        IdempotencyConfig {
            window: Duration::from_secs(60),
            max_keys,
            max_bytes,
        }
    }

    fn stored(body: &str) -> Stored {
        Stored {
            status: 200,
            content_type: "application/json",
            body: Bytes::from(body.to_owned()),
        }
    }

    #[tokio::test]
    async fn a_retry_replays_and_a_different_body_conflicts() {
        let w = Window::new(cfg(10, 1 << 20), None);
        let Begin::Lead(lead) = w.begin("k".into(), [1; 32]).await else {
            panic!("first request must lead")
        };
        lead.complete(stored("first"));
        assert!(
            matches!(w.begin("k".into(), [1; 32]).await, Begin::Replay(s) if s == stored("first"))
        );
        assert!(matches!(
            w.begin("k".into(), [2; 32]).await,
            Begin::Conflict
        ));
    }

    #[tokio::test]
    async fn concurrent_duplicates_wait_for_the_leader() {
        let w = Window::new(cfg(10, 1 << 20), None);
        let Begin::Lead(lead) = w.begin("k".into(), [1; 32]).await else {
            panic!()
        };
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let w = w.clone();
                tokio::spawn(async move { w.begin("k".into(), [1; 32]).await })
            })
            .collect();
        tokio::task::yield_now().await;
        lead.complete(stored("once"));
        for h in waiters {
            assert!(matches!(h.await.unwrap(), Begin::Replay(s) if s == stored("once")));
        }
    }

    #[tokio::test]
    async fn an_abandoned_key_passes_the_lead_on() {
        let w = Window::new(cfg(10, 1 << 20), None);
        let Begin::Lead(lead) = w.begin("k".into(), [1; 32]).await else {
            panic!()
        };
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.begin("k".into(), [1; 32]).await });
        tokio::task::yield_now().await;
        drop(lead);
        assert!(matches!(waiter.await.unwrap(), Begin::Lead(_)));
    }

    #[tokio::test]
    async fn memory_stays_within_its_bounds() {
        let w = Window::new(cfg(100, 64 * 1024), None);
        for i in 0..1000 {
            let Begin::Lead(lead) = w.begin(format!("k{i}"), [0; 32]).await else {
                panic!()
            };
            lead.complete(stored(&"x".repeat(1000)));
            let (keys, bytes) = w.usage();
            assert!(keys <= 100, "{keys}");
            assert!(bytes <= 64 * 1024, "{bytes}");
        }
        // The newest key is still remembered, the oldest long forgotten.
        assert!(matches!(
            w.begin("k999".into(), [0; 32]).await,
            Begin::Replay(_)
        ));
        assert!(matches!(
            w.begin("k0".into(), [0; 32]).await,
            Begin::Lead(_)
        ));
    }

    #[tokio::test]
    async fn keys_expire_after_the_window() {
        let w = Window::new(cfg(100, 1 << 20), None);
        let Begin::Lead(lead) = w.begin("k".into(), [0; 32]).await else {
            panic!()
        };
        lead.complete(stored("x"));
        w.evict_at(Instant::now() + Duration::from_secs(61));
        assert_eq!(w.usage(), (0, 0));
    }
}
