//! Leadership: which collector instance runs the jobs that run once per database
//! (reconciliation, alert delivery and retention) while every instance ingests.
//!
//! The leader holds a session-level advisory lock on a PostgreSQL connection of its own.
//! PostgreSQL releases the lock when that session ends: a clean stop, a crash or `kill -9`
//! of the process (the kernel closes its socket and the backend exits at once), or silence
//! longer than [`LEASE`] (the session's `idle_session_timeout`; the leader speaks on it
//! every [`CHECK`]). The other instances try to take the lock every [`CHECK`], so a dead
//! leader is replaced within about a second, and one cut off from the database within
//! about [`LEASE`]. A leader whose check fails stops its jobs before it tries again.
//!
//! Two instances may briefly both run the jobs (a leader cut off from the database has not
//! noticed yet). That stays correct: reconcile passes and alert fan-out each hold a
//! transaction-level advisory lock, and deliveries are claimed row by row with
//! `FOR UPDATE SKIP LOCKED`. Leadership keeps the work in one place; the locks keep it right.
//! A leader cut off in the middle of such a transaction holds its locks no longer than the
//! pool's `database.idle_in_transaction_session_timeout`, after which PostgreSQL ends the
//! session; a wait for them fails after `database.lock_timeout` and is retried. The leader
//! session itself only ever tries the lock (`pg_try_advisory_lock`), so it never waits.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::job::{First, Pace, Periodic};

/// Key of the advisory lock the leader holds (scoped to the database, like every advisory
/// lock).
pub const LEADER_LOCK: &str = "chaperone-collector-leader";

/// How often the leader checks its session and the others try to take the lock.
pub const CHECK: Duration = Duration::from_secs(1);

/// How long PostgreSQL keeps a silent leader's session (and lock) before ending it.
pub const LEASE: Duration = Duration::from_secs(10);

/// Runs until `shutdown`: takes leadership whenever it is free, calls `start` with a token
/// that is cancelled when leadership ends, and waits for the returned jobs to stop before
/// trying to lead again. `leading` is 1 while this instance leads; `checks` counts the
/// checks of the leader's session by result.
pub async fn run<F>(
    pool: PgPool,
    leading: prometheus::IntGauge,
    checks: prometheus::IntCounterVec,
    shutdown: CancellationToken,
    mut start: F,
) where
    F: FnMut(CancellationToken) -> TaskTracker,
{
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let session = tokio::select! {
            () = shutdown.cancelled() => break,
            s = Session::open(&pool) => s,
        };
        let mut session = match session {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, "cannot open the leadership session; retrying");
                }
                pause(&shutdown).await;
                continue;
            }
        };
        // Wait for the lock on this session; on a failure open another one.
        let acquired = loop {
            let r = tokio::select! {
                () = shutdown.cancelled() => break false,
                r = session.try_lock() => r,
            };
            match r {
                Ok(true) => break true,
                Ok(false) => pause(&shutdown).await,
                Err(e) => {
                    tracing::warn!(error = %e, "leadership session failed; opening another");
                    break false;
                }
            }
        };
        if !acquired {
            continue;
        }
        leading.set(1);
        tracing::info!("leading: this instance now reconciles, sends alerts and applies retention");
        let stop = shutdown.child_token();
        let jobs = start(stop.clone());
        // Checks the session every CHECK until shutdown or until a check fails.
        let checking = shutdown.child_token();
        let job = Periodic {
            failed: None,
            abandoned: "leadership check abandoned at shutdown",
            pace: Pace::After(CHECK),
            first: First::AfterPeriod,
            // A check in progress ends by itself within LEASE: let it.
            finish_within: Some(LEASE),
            runs: Some(checks.clone()),
        };
        let (session_ref, lost) = (&session, &checking);
        job.run(&checking, move || async move {
            let checked = session_ref.check().await;
            if let Err(e) = &checked {
                tracing::error!(
                    error = %e,
                    "lost the database session that holds leadership; stopping the leader's jobs"
                );
                lost.cancel();
            }
            checked
        })
        .await;
        let reason = if shutdown.is_cancelled() {
            "shutting down"
        } else {
            "session lost"
        };
        stop.cancel();
        jobs.close();
        jobs.wait().await;
        leading.set(0);
        tracing::info!(reason, "no longer leading");
        session.close().await;
    }
}

async fn pause(shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(CHECK) => {}
    }
}

/// The connection that holds (or waits for) the leader lock, outside the pool so that it is
/// never reused or recycled by anyone else.
struct Session {
    /// Locked only by the one task that leads: a `Mutex` so that a check needs no `&mut`.
    conn: tokio::sync::Mutex<PgConnection>,
}

impl Session {
    async fn open(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let options = pool.connect_options();
        let mut conn = tokio::time::timeout(LEASE, PgConnection::connect_with(&options))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // PostgreSQL before 14 has no idle_session_timeout: a leader cut off from it then
        // keeps the lock until TCP gives the session up.
        if let Err(e) = sqlx::query(&format!(
            "SET idle_session_timeout = '{}ms'",
            LEASE.as_millis()
        ))
        .execute(&mut conn)
        .await
        {
            tracing::warn!(error = %e, "cannot bound a silent leader's session; a leader cut off from PostgreSQL is replaced only when its connection times out");
        }
        sqlx::query("SET application_name = 'chaperone-collector leader'")
            .execute(&mut conn)
            .await?;
        Ok(Self {
            conn: tokio::sync::Mutex::new(conn),
        })
    }

    async fn try_lock(&mut self) -> Result<bool, sqlx::Error> {
        Self::bounded(
            self.conn.get_mut(),
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))").bind(LEADER_LOCK),
        )
        .await
    }

    /// Fails when the session is gone (a live session keeps its lock until it ends).
    async fn check(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.conn.lock().await;
        Self::bounded(&mut conn, sqlx::query_scalar::<_, bool>("SELECT true"))
            .await
            .map(|_| ())
    }

    /// Runs a one-value query, failing after [`LEASE`] like a lost connection: a busy
    /// PostgreSQL may answer slowly, and only one that has stopped answering for as long as it
    /// would keep a silent session ends the leadership.
    async fn bounded<'q, T>(
        conn: &mut PgConnection,
        q: sqlx::query::QueryScalar<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>,
    ) -> Result<T, sqlx::Error>
    where
        T: Send + Unpin,
        (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        tokio::time::timeout(LEASE, q.fetch_one(conn))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    /// Ends the session; PostgreSQL releases the lock with it.
    async fn close(self) {
        let _ = tokio::time::timeout(CHECK, self.conn.into_inner().close()).await;
    }
}
