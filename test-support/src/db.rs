//! A PostgreSQL database of its own for each test, so tests run in parallel on the stack's
//! one server.

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::{database_url, unique};

/// A database of its own for one test: `chaperone_test_<random>` on the stack's PostgreSQL,
/// with the project's `migrations/` applied (unless made by [`TestDb::create_empty_with`]).
///
/// By default it is dropped by [`TestDb::drop_db`] at the end of a test that passed, and a
/// failed test leaves it behind for inspection; [`TestDb::dropped_on_drop`] drops it
/// whenever the value goes, also when the test panics.
#[derive(Debug)]
pub struct TestDb {
    /// Name of the database.
    pub name: String,
    /// URL of the database.
    pub url: String,
    /// Pool connected to it.
    pub pool: PgPool,
    drop_on_drop: bool,
}

impl TestDb {
    /// A migrated database, its pool with sqlx's default settings.
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_with(PgPoolOptions::new()).await
    }

    /// A migrated database, its pool made with `pool` (such as a short acquire timeout, for
    /// tests that stop PostgreSQL).
    pub async fn create_with(pool: PgPoolOptions) -> anyhow::Result<Self> {
        let db = Self::create_empty_with(pool).await?;
        sqlx::migrate!("../migrations")
            .run(&db.pool)
            .await
            .context("applying migrations to the test database")?;
        Ok(db)
    }

    /// A database without the schema, for tests that apply migrations themselves.
    pub async fn create_empty_with(pool: PgPoolOptions) -> anyhow::Result<Self> {
        let server = database_url();
        let name = unique("chaperone_test").replace('-', "_");
        let mut admin = PgConnection::connect(&server).await.with_context(|| {
            format!("connecting to PostgreSQL at {server} (is `dev/stack up` running?)")
        })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await.ok();
        let options: PgConnectOptions = server
            .parse::<PgConnectOptions>()
            .with_context(|| format!("DATABASE_URL {server} is not a PostgreSQL URL"))?
            .database(&name);
        let url = with_database(&server, &name);
        let pool = pool
            .connect_with(options)
            .await
            .context("connecting to the test database")?;
        Ok(Self {
            name,
            url,
            pool,
            drop_on_drop: false,
        })
    }

    /// Drops the database whenever this value is dropped, also when the test panics.
    pub fn dropped_on_drop(mut self) -> Self {
        self.drop_on_drop = true;
        self
    }

    /// Drops the database; call at the end of a test that passed.
    pub async fn drop_db(mut self) -> anyhow::Result<()> {
        self.drop_on_drop = false;
        self.pool.close().await;
        drop_database(&self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.drop_on_drop {
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime, perhaps while tasks of a failed test still hold
        // connections: drop the database from a thread of its own, with FORCE ending them.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            let _ = rt.block_on(drop_database(&name));
        });
        let _ = cleanup.join();
    }
}

/// Drops `name`, ending the sessions still connected to it. An autovacuum worker busy in the
/// database has no role, and PostgreSQL 15 refuses to end it for a user that is not a
/// superuser ("must be a member of the role whose process is being terminated", SQLSTATE
/// 42501): such a worker is done within moments, so the drop is tried again for a few seconds.
async fn drop_database(name: &str) -> anyhow::Result<()> {
    let drop = &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    crate::eventually(
        &format!("no autovacuum worker in database {name}, to drop it"),
        std::time::Duration::from_secs(10),
        || async move {
            let mut admin = PgConnection::connect(&database_url()).await?;
            let result = sqlx::query(drop).execute(&mut admin).await;
            admin.close().await.ok();
            match result {
                Ok(_) => Ok(Some(())),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => Ok(None),
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

/// `url` with its database replaced by `db`, query parameters kept.
fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{db}{query}")
        }
        None => format!("{url}/{db}"),
    }
}
