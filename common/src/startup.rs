//! Start-up checks: a service that cannot start says so in one line that
//! names the endpoint (password hidden) and what to do, and exits within
//! seconds. Once a service has started, losing Postgres or RabbitMQ is not
//! fatal: it reconnects (see `amqp::supervise`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;

use crate::Settings;
use crate::config::DatabaseSettings;
use crate::db::{self, DbError};

/// How long a start-up check waits for Postgres or RabbitMQ to answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A start-up check that failed: one line saying what and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

/// `url` with its password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

/// Binds the API address, or says who holds it.
pub async fn bind(addr: &str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).await.map_err(|e| {
        let fix = if e.kind() == std::io::ErrorKind::AddrInUse {
            "another process (perhaps a running taskhost) listens there; stop it or set api.bind \
             (TASKHOST__API__BIND) to a free address"
        } else {
            "check api.bind (TASKHOST__API__BIND)"
        };
        StartupError(format!("cannot listen on {addr}: {e}; {fix}"))
    })
}

/// What went wrong talking to Postgres at `url`, in one line with the fix.
pub fn explain_db_error(url: &str, error: &sqlx::Error) -> String {
    let shown = redact(url);
    match error {
        sqlx::Error::Database(e) => match e.code().as_deref() {
            Some("3D000") => format!(
                "the database in {shown} does not exist; run `taskhost migrate` to create it \
                 (`taskhost standalone` does it too)"
            ),
            Some("28P01" | "28000") => format!(
                "PostgreSQL at {shown} refused the login ({}); check the user and password in \
                 database.url (DATABASE_URL)",
                e.message()
            ),
            _ => format!(
                "PostgreSQL at {shown} answered with an error: {}",
                e.message()
            ),
        },
        sqlx::Error::Io(e) => format!(
            "cannot reach PostgreSQL at {shown}: {e}; is it running there? (database.url, DATABASE_URL)"
        ),
        sqlx::Error::PoolTimedOut => format!(
            "cannot reach PostgreSQL at {shown}: no connection within {} s; is it running there? \
             (database.url, DATABASE_URL)",
            CHECK_TIMEOUT.as_secs()
        ),
        sqlx::Error::Configuration(e) => {
            format!("database.url {shown} is not a valid PostgreSQL URL: {e}")
        }
        sqlx::Error::Tls(e) => format!("TLS to PostgreSQL at {shown} failed: {e}"),
        other => format!("PostgreSQL at {shown}: {other}"),
    }
}

/// One connection to `options`, closed again.
pub async fn reach_database(url: &str, options: &PgConnectOptions) -> Result<(), StartupError> {
    match tokio::time::timeout(CHECK_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(StartupError(explain_db_error(url, &e))),
        Err(_) => Err(StartupError(explain_db_error(
            url,
            &sqlx::Error::PoolTimedOut,
        ))),
    }
}

/// A [`DbError`] in one line with the fix.
pub fn explain(url: &str, error: &DbError) -> String {
    match error {
        DbError::Sqlx(e) => explain_db_error(url, e),
        DbError::Migrate(e) => format!("applying migrations to {} failed: {e}", redact(url)),
        DbError::Behind { applied, known } => format!(
            "the schema of {} is behind this binary ({applied} of {known} migrations applied); \
             run `taskhost migrate`",
            redact(url)
        ),
    }
}

/// What every service checks before it starts: Postgres answers at
/// `database.url`, its schema is current, and RabbitMQ answers at
/// `amqp.url`. `name` labels the broker connection.
pub async fn check_services(settings: &Settings, name: &str) -> Result<(), StartupError> {
    let pool = database(&settings.database, 1).await?;
    pool.close().await;
    reach_broker(&settings.amqp.url, name).await
}

/// Proves Postgres answers at `database.url` and the schema is current,
/// then returns a pool of up to `connections`.
pub async fn database(
    settings: &DatabaseSettings,
    connections: u32,
) -> Result<PgPool, StartupError> {
    let url = &settings.url;
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| StartupError(explain_db_error(url, &e)))?;
    reach_database(url, &options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(CHECK_TIMEOUT)
        .connect_lazy_with(options);
    db::ensure_current(&pool)
        .await
        .map_err(|e| StartupError(explain(url, &e)))?;
    Ok(pool)
}

/// Connects to RabbitMQ once (within [`CHECK_TIMEOUT`]) and hands the
/// connection back, or says why not.
pub async fn broker(url: &str, name: &str) -> Result<lapin::Connection, StartupError> {
    let shown = redact(url);
    let fix = "is RabbitMQ running there, and are amqp.url (AMQP_URL) and its credentials right?";
    match tokio::time::timeout(CHECK_TIMEOUT, crate::amqp::connect(url, name)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(StartupError(format!(
            "cannot reach RabbitMQ at {shown}: {e}; {fix}"
        ))),
        Err(_) => Err(StartupError(format!(
            "cannot reach RabbitMQ at {shown}: no answer within {} s; {fix}",
            CHECK_TIMEOUT.as_secs()
        ))),
    }
}

/// [`broker`], closing the connection again.
pub async fn reach_broker(url: &str, name: &str) -> Result<(), StartupError> {
    let conn = broker(url, name).await?;
    let _ = conn.close(200, "start-up check".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("postgres://u:p@ss@db:5432/x?sslmode=disable"),
            "postgres://u:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1:5432/taskhost"),
            "postgres://postgres@127.0.0.1:5432/taskhost"
        );
        assert_eq!(redact("not a url"), "not a url");
    }
}
