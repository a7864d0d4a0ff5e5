//! What the taskhost processes share.
//!
//! - [`config`]: typed, layered settings (the one way in for configuration).
//! - [`telemetry`]: structured logs.
//! - [`metrics`]: Prometheus metrics and the health/metrics server of the
//!   worker and the scheduler.
//! - [`db`]: the Postgres pool, embedded migrations, the schema check.
//! - [`amqp`]: topology names and declaration, the confirming publisher.
//! - [`messages`]: versioned wire messages.
//! - [`model`]: job states, modes, roles, request validation.
//! - [`notify`]: webhook notifications (outbox rows, signed delivery).
//! - [`changelog`]: the gzip-compressed `data_change` log.
//! - [`keys`]: hashed API keys.
//! - [`batch`]: group commit of requests that arrive together.
//! - [`events`]: job events, published in batches.
//! - [`failpoint`]: crash/freeze points for the fault tests (debug builds).
//! - [`jobs`]: accepting a job (row + change + outbox in one transaction).
//! - [`shutdown`]: SIGTERM/SIGINT as a cancellation token.
//! - [`startup`]: start-up checks that fail fast with the fix in one line.
//! - [`store`]: the job store, the one owner of the `jobs` row.
//! - [`secrets`]: sealed secret environment values and output masking.
//! - [`taskfile`]: export and import of tasks (the versioned task file).
//! - [`text`]: the one rule for text fields (no NUL), at every entry point.
//! - [`sync`]: the change feed's safe head, consumer cursors, the events relay.

pub mod amqp;
pub mod batch;
pub mod changelog;
pub mod config;
pub mod db;
pub mod events;
pub mod failpoint;
pub mod jobs;
pub mod keys;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod params;
pub mod replica;
pub mod schedule;
pub mod secrets;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod sync;
pub mod taskfile;
pub mod tasks;
pub mod telemetry;
pub mod text;

pub use config::Settings;
pub use tokio_util::sync::CancellationToken;

/// This machine's host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
