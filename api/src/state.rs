//! Shared state of the HTTP handlers.

use std::sync::Arc;

use sqlx::PgPool;
use taskhost_common::Settings;
use taskhost_common::amqp::Publisher;

use taskhost_common::sync::Watermark;

use crate::ratelimit::RateLimiter;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Postgres.
    pub pool: PgPool,
    /// RabbitMQ, with confirms.
    pub publisher: Arc<Publisher>,
    /// Settings.
    pub settings: Arc<Settings>,
    /// The change feed's safe head.
    pub watermark: Arc<Watermark>,
    /// Per-key request budget.
    pub limiter: Arc<RateLimiter>,
    /// Recent authentications, so a request costs no key lookup.
    pub keys: Arc<taskhost_common::keys::KeyCache>,
    /// Publishes accepted jobs of concurrent requests together.
    pub batcher: taskhost_common::jobs::PublishBatcher,
    /// Whether Postgres is known to be down (requests answered 503 at once).
    pub db_health: Arc<crate::health::DbHealth>,
    /// Cancelled when the server begins to shut down, so answers that
    /// never end by themselves (the event stream) end.
    pub streams: taskhost_common::CancellationToken,
    /// Accepts plain submissions of concurrent requests together.
    pub accepter: Arc<
        taskhost_common::batch::Batcher<
            taskhost_common::jobs::PlainJob,
            taskhost_common::jobs::Accepted,
        >,
    >,
}
