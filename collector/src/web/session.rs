//! Status page sessions and the login rate limit.
//!
//! Logging in with the API token opens a session: a random 256-bit id (two v4 UUIDs, from the
//! operating system's CSPRNG) sent to the browser in the [`COOKIE`] and stored in PostgreSQL
//! (`web_sessions`) only as its SHA-256, with an expiry and the SHA-256 of the token it was
//! opened with. The cookie therefore says nothing about the token. A session is refused, and
//! its row deleted, once it has expired or the API token has changed; logging out deletes it.
//!
//! Failed logins are counted per client address (IPv6 per /64): after
//! [`LoginLimits::max_failures`] failures within [`LoginLimits::window`], the client's logins
//! answer 429 with `Retry-After` until the window that began with its first failure ends,
//! even with the right token. At most [`MAX_TRACKED_CLIENTS`] addresses are tracked; past
//! that, failures of untracked addresses share one count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::api::constant_time_eq;

/// Cookie holding the session id (hex) after a login.
pub const COOKIE: &str = "chaperone_session";

/// Most client addresses whose failed logins are counted one by one.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

/// How long a session lasts and how many failed logins a client may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Lifetime of a session (the cookie's `Max-Age`).
    pub session_ttl: Duration,
    /// Failed logins a client may make within `window`; the next attempts answer 429.
    pub max_failures: u32,
    /// Window that starts at a client's first counted failure.
    pub window: Duration,
    /// Whether the cookie carries `Secure` (the status page is served over https).
    pub secure: bool,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3_600),
            max_failures: 5,
            window: Duration::from_secs(60),
            secure: false,
        }
    }
}

/// The login settings and the failed-login counts, shared by the handlers.
#[derive(Debug, Clone, Default)]
pub struct Login {
    /// The settings.
    pub limits: LoginLimits,
    failures: Arc<Mutex<Failures>>,
}

impl Login {
    /// Login with `limits` and no failure counted yet.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            failures: Arc::default(),
        }
    }

    /// `Err(retry_after)` when `client` has used up its failed logins.
    pub(crate) fn check(&self, client: Option<IpAddr>, now: DateTime<Utc>) -> Result<(), Duration> {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.check(&self.limits, key(client), now)
    }

    /// Counts a failed login of `client`.
    pub(crate) fn failed(&self, client: Option<IpAddr>, now: DateTime<Utc>) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.failed(&self.limits, key(client), now);
    }

    /// Forgets the failures of `client` after a successful login.
    pub(crate) fn succeeded(&self, client: Option<IpAddr>) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.clients.remove(&key(client));
    }

    /// The `Set-Cookie` value carrying `id`.
    pub(crate) fn cookie(&self, id: &str) -> String {
        format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
            self.limits.session_ttl.as_secs().max(1),
            if self.limits.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub(crate) fn clear_cookie(&self) -> String {
        format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
            if self.limits.secure { "; Secure" } else { "" }
        )
    }
}

/// Whose failures a count holds: an address (IPv6 by /64, the smallest block a host is
/// usually given), or `None` for everyone untracked.
fn key(client: Option<IpAddr>) -> Option<IpAddr> {
    match client?.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            Some(IpAddr::V6(bits.into()))
        }
        v4 => Some(v4),
    }
}

/// A client's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Count {
    since: DateTime<Utc>,
    failures: u32,
}

#[derive(Debug, Default)]
struct Failures {
    clients: HashMap<Option<IpAddr>, Count>,
}

impl Failures {
    fn window_end(limits: &LoginLimits, c: &Count) -> DateTime<Utc> {
        c.since + chrono::Duration::from_std(limits.window).unwrap_or(chrono::Duration::MAX)
    }

    fn check(
        &mut self,
        limits: &LoginLimits,
        key: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> Result<(), Duration> {
        let Some(c) = self.clients.get(&key).copied() else {
            return Ok(());
        };
        let end = Self::window_end(limits, &c);
        if now >= end {
            self.clients.remove(&key);
            return Ok(());
        }
        if c.failures < limits.max_failures {
            return Ok(());
        }
        let left = (end - now).to_std().unwrap_or_default();
        // Whole seconds, rounded up, so a client that waits that long is let in.
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Err(Duration::from_secs(secs.max(1)))
    }

    fn failed(&mut self, limits: &LoginLimits, key: Option<IpAddr>, now: DateTime<Utc>) {
        let mut key = key;
        if !self.clients.contains_key(&key) && self.clients.len() >= MAX_TRACKED_CLIENTS {
            self.clients
                .retain(|_, c| now < Self::window_end(limits, c));
            if self.clients.len() >= MAX_TRACKED_CLIENTS {
                key = None;
            }
        }
        let c = self.clients.entry(key).or_insert(Count {
            since: now,
            failures: 0,
        });
        if now >= Self::window_end(limits, c) {
            *c = Count {
                since: now,
                failures: 0,
            };
        }
        c.failures = c.failures.saturating_add(1);
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// Opens a session for `token` lasting `ttl` from `now`, and deletes the expired ones;
/// returns the id for the cookie (64 hex digits).
pub(crate) async fn open(
    pool: &PgPool,
    token: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<String, sqlx::Error> {
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    id[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO web_sessions (id_sha256, token_sha256, created_at, expires_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(sha256(&id))
    .bind(sha256(token.as_bytes()))
    .bind(now)
    .bind(expires)
    .execute(pool)
    .await?;
    Ok(hex::encode(id))
}

/// The session ids in the request's cookies that look like ids (64 hex digits).
pub(crate) fn cookie_ids(headers: &axum::http::HeaderMap) -> Vec<[u8; 32]> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .filter_map(|(_, value)| {
            let mut id = [0u8; 32];
            hex::decode_to_slice(value.trim(), &mut id)
                .ok()
                .map(|()| id)
        })
        .collect()
}

/// Whether `id` is a live session opened with `token`. An expired session, or one opened
/// with another token, is deleted.
pub(crate) async fn valid(
    pool: &PgPool,
    id: &[u8; 32],
    token: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let id_hash = sha256(id);
    let row: Option<(Vec<u8>, DateTime<Utc>)> =
        sqlx::query_as("SELECT token_sha256, expires_at FROM web_sessions WHERE id_sha256 = $1")
            .bind(&id_hash)
            .fetch_optional(pool)
            .await?;
    let Some((token_hash, expires_at)) = row else {
        return Ok(false);
    };
    if expires_at > now && constant_time_eq(&token_hash, &sha256(token.as_bytes())) {
        return Ok(true);
    }
    revoke(pool, id).await?;
    Ok(false)
}

/// Deletes the session `id` (logout).
pub(crate) async fn revoke(pool: &PgPool, id: &[u8; 32]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM web_sessions WHERE id_sha256 = $1")
        .bind(sha256(id))
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_067_200 + s, 0).expect("time")
    }

    #[test]
    fn locks_a_client_after_its_failures_until_the_window_ends() {
        let login = Login::new(LoginLimits::default());
        let a = Some("10.0.0.1".parse().expect("ip"));
        let b = Some("10.0.0.2".parse().expect("ip"));
        for s in 0..5 {
            assert_eq!(login.check(a, at(s)), Ok(()));
            login.failed(a, at(s));
        }
        assert_eq!(login.check(a, at(5)), Err(Duration::from_secs(55)));
        assert_eq!(
            login.check(b, at(5)),
            Ok(()),
            "another client is not locked"
        );
        assert_eq!(login.check(a, at(59)), Err(Duration::from_secs(1)));
        assert_eq!(login.check(a, at(60)), Ok(()), "the window is over");
        login.failed(a, at(61));
        assert_eq!(login.check(a, at(61)), Ok(()), "a new window");
        login.succeeded(a);
        assert!(login.failures.lock().expect("lock").clients.is_empty());
    }

    #[test]
    fn counts_ipv6_by_64_and_bounds_the_clients() {
        let login = Login::new(LoginLimits {
            max_failures: 1,
            ..LoginLimits::default()
        });
        login.failed(Some("2001:db8::1".parse().expect("ip")), at(0));
        assert!(
            login
                .check(Some("2001:db8::ffff:2".parse().expect("ip")), at(1))
                .is_err()
        );
        assert_eq!(
            login.check(Some("2001:db8:0:1::1".parse().expect("ip")), at(1)),
            Ok(())
        );
        for i in 0..(MAX_TRACKED_CLIENTS as u32 + 10) {
            login.failed(Some(IpAddr::V4(i.into())), at(2));
        }
        let f = login.failures.lock().expect("lock");
        assert_eq!(
            f.clients.len(),
            MAX_TRACKED_CLIENTS + 1,
            "plus the shared count"
        );
        assert!(f.clients.contains_key(&None));
    }

    #[test]
    fn cookies() {
        let mut limits = LoginLimits::default();
        let login = Login::new(limits);
        assert_eq!(
            login.cookie("ab"),
            "chaperone_session=ab; Path=/; HttpOnly; SameSite=Lax; Max-Age=43200"
        );
        limits.secure = true;
        let login = Login::new(limits);
        assert!(login.cookie("ab").ends_with("; Secure"));
        assert!(login.clear_cookie().contains("Max-Age=0"));
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            axum::http::HeaderValue::from_str(&format!("a=b; {COOKIE}={}; c=zz", "0f".repeat(32)))
                .expect("header"),
        );
        assert_eq!(cookie_ids(&h), vec![[0x0f; 32]]);
        h.insert(
            axum::http::header::COOKIE,
            axum::http::HeaderValue::from_static("chaperone_session=zz"),
        );
        assert!(cookie_ids(&h).is_empty());
    }
}
