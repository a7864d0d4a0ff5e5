//! Shared state of the HTTP handlers.

use std::sync::Arc;

use sqlx::PgPool;
use taskhost_common::Settings;
use taskhost_common::amqp::Publisher;

use crate::metrics::Metrics;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Postgres.
    pub pool: PgPool,
    /// RabbitMQ, with confirms.
    pub publisher: Arc<Publisher>,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}
