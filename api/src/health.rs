//! Postgres down: once a request has found it unreachable, the api answers
//! every request that needs it with 503 and `Retry-After: 1` at once instead
//! of letting each wait for the pool's acquire timeout, and a probe notices
//! the recovery within a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;

use crate::error::{ApiError, DATABASE, DatabaseDown};
use crate::state::AppState;

/// How often the probe tries Postgres while it is down.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How long one probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// Whether Postgres is known to be down.
#[derive(Debug, Default)]
pub struct DbHealth {
    down: AtomicBool,
}

impl DbHealth {
    /// Whether requests should be answered 503 at once.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Records that Postgres could not be reached and, unless a probe runs
    /// already, starts one that clears the mark once `SELECT 1` answers.
    pub fn mark_down(self: &Arc<Self>, pool: &PgPool) {
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!("postgres unreachable: answering 503 at once until it is back");
        let (health, pool) = (self.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool);
                if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    health.down.store(false, Ordering::Release);
                    tracing::info!("postgres reachable again");
                    return;
                }
            }
        });
    }
}

/// The middleware of every `/api/v1` route.
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.db_health.is_down() {
        return ApiError::Unavailable(DATABASE).into_response();
    }
    let response = next.run(request).await;
    if response.extensions().get::<DatabaseDown>().is_some() {
        state.db_health.mark_down(&state.pool);
    }
    response
}
