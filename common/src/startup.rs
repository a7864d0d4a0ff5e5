//! Start-up checks: a service that cannot start says so in one line that
//! names the endpoint (password hidden) and what to do, and exits within
//! seconds. Once a service has started, losing Postgres or RabbitMQ is not
//! fatal: it reconnects (see `amqp::supervise`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;

use crate::Settings;
use crate::amqp::Endpoint;
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
        // sqlx reports a failed TLS handshake as I/O.
        sqlx::Error::Io(e) if tls_trouble(&e.to_string()).is_some() => tls_to_postgres(&shown, e),
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
        sqlx::Error::Tls(e) => tls_to_postgres(&shown, e),
        other => format!("PostgreSQL at {shown}: {other}"),
    }
}

fn tls_to_postgres(shown: &str, error: &dyn std::fmt::Display) -> String {
    format!(
        "TLS to PostgreSQL at {shown} failed: {error}; check sslmode, sslrootcert, sslcert and \
         sslkey in database.url (DATABASE_URL)"
    )
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
    reach_broker(&settings.amqp, name).await
}

/// Proves Postgres answers at `database.url` and the schema is current,
/// then returns a pool of up to `connections`.
pub async fn database(
    settings: &DatabaseSettings,
    connections: u32,
) -> Result<PgPool, StartupError> {
    let url = &settings.url;
    let options = crate::db::connect_options(url)
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
/// connection back, or says why not. `endpoint` is a URL, or
/// `&settings.amqp` for its TLS files too: the same
/// [`amqp::connect`](crate::amqp::connect) every service uses.
pub async fn broker(
    endpoint: impl Into<Endpoint>,
    name: &str,
) -> Result<lapin::Connection, StartupError> {
    let endpoint = endpoint.into();
    let shown = endpoint.shown();
    match tokio::time::timeout(CHECK_TIMEOUT, crate::amqp::connect(&endpoint, name)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(StartupError(explain_broker_error(&shown, &e.to_string()))),
        Err(_) => Err(StartupError(format!(
            "cannot reach RabbitMQ at {shown}: no answer within {} s; {BROKER_FIX}",
            CHECK_TIMEOUT.as_secs()
        ))),
    }
}

const BROKER_FIX: &str =
    "is RabbitMQ running there, and are amqp.url (AMQP_URL) and its credentials right?";

/// What went wrong connecting to RabbitMQ at `shown` (a redacted URL), in
/// one line with the fix: TLS problems name the `amqp.tls_*` key to set.
pub fn explain_broker_error(shown: &str, error: &str) -> String {
    let error = error.replace('\n', " ");
    match tls_trouble(&error) {
        _ if error.contains("amqp.tls_") => format!(
            "cannot connect to RabbitMQ at {shown}: {error}; check amqp.tls_ca_file \
             (TASKHOST__AMQP__TLS_CA_FILE), amqp.tls_client_cert_file and amqp.tls_client_key_file"
        ),
        Some(TlsTrouble::Refused) => format!(
            "TLS to RabbitMQ at {shown} failed: the broker refused the handshake ({error}); if it \
             asks for a client certificate, set amqp.tls_client_cert_file and \
             amqp.tls_client_key_file (TASKHOST__AMQP__TLS_CLIENT_CERT_FILE, \
             TASKHOST__AMQP__TLS_CLIENT_KEY_FILE)"
        ),
        Some(TlsTrouble::Untrusted) => format!(
            "TLS to RabbitMQ at {shown} failed: the broker's certificate is not trusted \
             ({error}); set amqp.tls_ca_file (TASKHOST__AMQP__TLS_CA_FILE) to the PEM of the CA \
             that signed it, and make sure the URL's host is a name in that certificate"
        ),
        Some(TlsTrouble::Other) => format!(
            "TLS to RabbitMQ at {shown} failed: {error}; is the port a TLS listener (amqps://, \
             usually 5671)?"
        ),
        None => format!("cannot reach RabbitMQ at {shown}: {error}; {BROKER_FIX}"),
    }
}

/// What kind of TLS failure an error's text tells of, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsTrouble {
    /// The peer sent an alert: it refused us (e.g. no client certificate).
    Refused,
    /// The peer's certificate did not verify (issuer, name, expiry).
    Untrusted,
    /// Anything else about TLS (e.g. a plain port answering).
    Other,
}

fn tls_trouble(error: &str) -> Option<TlsTrouble> {
    let lower = error.to_ascii_lowercase();
    if lower.contains("received fatal alert") {
        Some(TlsTrouble::Refused)
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        Some(TlsTrouble::Untrusted)
    } else if ["tls", "handshake", "corrupt message", "alert"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Some(TlsTrouble::Other)
    } else {
        None
    }
}

/// [`broker`], closing the connection again.
pub async fn reach_broker(endpoint: impl Into<Endpoint>, name: &str) -> Result<(), StartupError> {
    let conn = broker(endpoint, name).await?;
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

    #[test]
    fn broker_errors_name_the_tls_key_to_set() {
        let shown = "amqps://u:***@mq:5671/%2f";
        let untrusted =
            explain_broker_error(shown, "IO error: invalid peer certificate: UnknownIssuer");
        assert!(untrusted.contains("not trusted"), "{untrusted}");
        assert!(
            untrusted.contains("TASKHOST__AMQP__TLS_CA_FILE"),
            "{untrusted}"
        );
        let refused =
            explain_broker_error(shown, "IO error: received fatal alert: CertificateRequired");
        assert!(refused.contains("tls_client_cert_file"), "{refused}");
        let plain = explain_broker_error(
            shown,
            "IO error: received corrupt message of type InvalidContentType",
        );
        assert!(plain.contains("TLS listener"), "{plain}");
        let file = explain_broker_error(
            shown,
            "IO error: cannot read amqp.tls_ca_file /x: No such file or directory (os error 2)",
        );
        assert!(file.contains("check amqp.tls_ca_file"), "{file}");
        let down = explain_broker_error(shown, "IO error: Connection refused (os error 111)");
        assert!(down.contains("is RabbitMQ running there"), "{down}");
    }
}
