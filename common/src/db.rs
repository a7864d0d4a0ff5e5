//! The Postgres pool, the embedded migrations, and the check that a database
//! is not behind them.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres};

use crate::config::DatabaseSettings;

/// The schema, embedded from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A database problem at startup.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres could not be reached or answered with an error.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The schema is older than this binary.
    #[error(
        "the database schema is behind this binary ({applied} of {known} migrations applied); run `taskhost migrate`"
    )]
    Behind {
        /// Migrations applied to the database.
        applied: usize,
        /// Migrations this binary knows.
        known: usize,
    },
}

/// The connect options of `url`. Where neither the URL (`sslmode`) nor the
/// environment (`PGSSLMODE`) chooses TLS and the server is on this machine
/// (a loopback address, `localhost`, or a Unix socket), TLS is off: nothing
/// leaves the machine, and TLS on a loopback connection halved the burn
/// benchmark (README, "Performance"). Anywhere else sqlx's default,
/// `prefer`, stays; production URLs should say `sslmode=verify-full`.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let chosen = std::env::var_os("PGSSLMODE").is_some() || names_ssl_mode(url);
    Ok(if !chosen && is_local(&options) {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    })
}

/// Whether the URL's query sets `sslmode` (or sqlx's `ssl-mode`).
fn names_ssl_mode(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            key.eq_ignore_ascii_case("sslmode") || key.eq_ignore_ascii_case("ssl-mode")
        })
    })
}

/// A Unix socket, `localhost` or a loopback address.
fn is_local(options: &PgConnectOptions) -> bool {
    if options.get_socket().is_some() {
        return true;
    }
    let host = options
        .get_host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A one-connection pool for a `LISTEN` connection (sqlx's `PgListener`
/// reconnects through it), with the options of [`connect_options`].
pub fn listener_pool(url: &str) -> Result<PgPool, sqlx::Error> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(connect_options(url)?))
}

/// Opens a pool. Connections are made on demand so a process can start while
/// Postgres is still coming up; `/readyz` reports it.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let options = connect_options(&settings.url)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
        .connect_lazy_with(options))
}

/// Creates the database when it does not exist, then applies pending
/// migrations. Safe to run concurrently (sqlx takes an advisory lock).
pub async fn migrate(settings: &DatabaseSettings) -> Result<MigrateReport, DbError> {
    let created = if Postgres::database_exists(&settings.url).await? {
        false
    } else {
        match Postgres::create_database(&settings.url).await {
            Ok(()) => true,
            // Another process created it in between.
            Err(e)
                if Postgres::database_exists(&settings.url)
                    .await
                    .unwrap_or(false) =>
            {
                tracing::debug!(error = %e, "database appeared concurrently");
                false
            }
            Err(e) => return Err(e.into()),
        }
    };
    let pool = pool(settings)?;
    let before = applied_versions(&pool).await?.len();
    rebaseline(&pool).await?;
    MIGRATOR.run(&pool).await?;
    let after = applied_versions(&pool).await?.len();
    pool.close().await;
    Ok(MigrateReport {
        created_database: created,
        applied: after.saturating_sub(before),
        total: after,
    })
}

/// Migrations whose file changed after release in comments only, with the
/// checksum (SHA-384 of the file) they were applied with. sqlx refuses a
/// database whose applied checksum differs from the file's; for these,
/// `migrate` records the current checksum instead, and only when the stored
/// one is exactly the listed original.
const COMMENT_ONLY_EDITS: &[(i64, &str)] = &[(
    // Its first comment named a design file outside the repository.
    20261123000001,
    "4f8676b3451fbd27a3f97d199c810ac13d2bdc49d2b347a773b5c41516d3d055a13ea16631456f3a7f09cddf54254cfa",
)];

/// Whether sqlx's migrations table exists (a fresh database has none).
async fn has_migrations_table(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
}

async fn rebaseline(pool: &PgPool) -> Result<(), sqlx::Error> {
    if !has_migrations_table(pool).await? {
        return Ok(());
    }
    for (version, original) in COMMENT_ONLY_EDITS {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $2
             WHERE version = $1 AND checksum = decode($3, 'hex')",
        )
        .bind(version)
        .bind(current.checksum.as_ref())
        .bind(original)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateReport {
    /// The database did not exist and was created.
    pub created_database: bool,
    /// Migrations applied by this run.
    pub applied: usize,
    /// Migrations applied in all.
    pub total: usize,
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    if !has_migrations_table(pool).await? {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
}

/// Fails with [`DbError::Behind`] unless every migration this binary knows
/// has been applied.
pub async fn ensure_current(pool: &PgPool) -> Result<(), DbError> {
    let applied = applied_versions(pool).await?;
    let known = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count();
    let missing = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .any(|m| !applied.contains(&m.version));
    if missing {
        return Err(DbError::Behind {
            applied: applied.len(),
            known,
        });
    }
    Ok(())
}

/// Whether `error` is about reaching Postgres (worth trying again later)
/// rather than about the data (trying again would fail the same way): I/O,
/// pool and protocol failures, and the SQLSTATE classes 08 (connection),
/// 53 (resources), 57P (shutdown), 58 (system), 40001/40P01 (serialization,
/// deadlock).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|c| {
            ["08", "53", "57P", "58"].iter().any(|p| c.starts_with(p))
                || c == "40001"
                || c == "40P01"
        }),
        _ => false,
    }
}

/// How a batch reports a transient failure in its error text (batch errors
/// travel as strings): this prefix, then the error.
pub const TRANSIENT: &str = "transient: ";

/// `error` as text, prefixed with [`TRANSIENT`] when [`is_transient`].
pub fn describe(error: &sqlx::Error) -> String {
    if is_transient(error) {
        format!("{TRANSIENT}{error}")
    } else {
        error.to_string()
    }
}

/// Begins a transaction that commits without waiting for its WAL to reach
/// disk (`SET LOCAL synchronous_commit = off`), sent with the `BEGIN` in
/// one message, so it costs no round trip of its own. Only for
/// transactions whose loss in a Postgres crash is harmless because what
/// they record is recovered anyway: a claim (the message is not acked, so
/// it is claimed again), marking an outbox row published (the relay
/// publishes it again and the duplicate is absorbed), a heartbeat. Never
/// for accepting a job or recording its end: those are answered (202) or
/// acked right after. A transaction that comes to record one after all
/// sets `synchronous_commit = on` before its commit.
pub async fn begin_no_fsync_wait(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_off(url: &str) -> bool {
        // PgConnectOptions shows its ssl mode only in Debug.
        format!("{:?}", connect_options(url).unwrap()).contains("ssl_mode: Disable")
    }

    #[test]
    fn tls_is_off_on_this_machine_unless_asked_for() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // the environment chooses; nothing to decide here
        }
        assert!(tls_off("postgres://postgres@127.0.0.1:5432/x"));
        assert!(tls_off("postgres://postgres@localhost/x"));
        assert!(tls_off("postgres://postgres@[::1]:5432/x"));
        assert!(tls_off("postgres:///x?host=/var/run/postgresql"));
        assert!(!tls_off(
            "postgres://postgres@127.0.0.1:5432/x?sslmode=require"
        ));
        assert!(!tls_off(
            "postgres://postgres@127.0.0.1/x?application_name=a&ssl-mode=prefer"
        ));
        assert!(!tls_off("postgres://postgres@db.internal:5432/x"));
        assert!(!tls_off("postgres://postgres@10.0.0.5:5432/x"));
    }
}
