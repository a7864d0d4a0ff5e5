//! `/metrics` in the Prometheus text format (the process's recorder,
//! `taskhost_common::metrics`, plus gauges read from Postgres at scrape
//! time), and the access log: one line and one
//! `taskhost_http_request_duration_seconds` observation per request.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::state::AppState;

/// Counts one submission refused with a 4xx.
pub(crate) fn rejected() {
    metrics::counter!("taskhost_jobs_rejected_total").increment(1);
}

/// Counts fast-path publishes: `confirmed` by the broker, `failed` left to
/// the outbox relay.
pub(crate) fn published(confirmed: usize, failed: usize) {
    metrics::counter!("taskhost_jobs_published_total").increment(confirmed as u64);
    metrics::counter!("taskhost_publish_failures_total").increment(failed as u64);
}

/// Counts one request refused with 429.
pub(crate) fn rate_limited() {
    metrics::counter!("taskhost_api_rate_limited_total").increment(1);
}

/// Registers the api's families at zero.
pub(crate) fn register() {
    let _ = taskhost_common::metrics::handle();
    for name in [
        "taskhost_jobs_rejected_total",
        "taskhost_jobs_published_total",
        "taskhost_publish_failures_total",
        "taskhost_api_rate_limited_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
}

/// Prometheus metrics
///
/// The api's counters in the Prometheus text format (open).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.",
               content_type = "text/plain", body = String,
               example = "# TYPE taskhost_jobs_submitted_total counter\ntaskhost_jobs_submitted_total{source=\"api\"} 3\n"))
)]
pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    refresh(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        taskhost_common::metrics::handle().render(),
    )
}

/// The gauges read from Postgres: jobs by status (every status, zeros
/// included, so a series never vanishes), nodes by group and state, the
/// outbox backlog.
async fn refresh(state: &AppState) {
    let statuses: Result<Vec<(String, i64)>, _> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(&state.pool)
            .await;
    let outbox: Result<i64, _> =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&state.pool)
            .await;
    metrics::gauge!("taskhost_database_up").set(if statuses.is_ok() { 1.0 } else { 0.0 });
    if let Ok(statuses) = statuses {
        for status in taskhost_common::model::JobStatus::ALL {
            let n = statuses
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("taskhost_jobs", "status" => status.as_str()).set(n as f64);
        }
    }
    taskhost_common::metrics::record_nodes(&state.pool).await;
    if let Ok(n) = outbox {
        metrics::gauge!("taskhost_outbox_pending").set(n as f64);
    }
}

/// What the access log learns while a request is handled: its route
/// template (set by [`note_route`] once routing matched) and the id of the
/// key that authenticated it (set by the `Caller` extractor).
#[derive(Debug, Clone, Default)]
pub(crate) struct AccessNote(Arc<Mutex<(Option<String>, Option<Uuid>)>>);

impl AccessNote {
    /// Records the authenticated key's id.
    pub(crate) fn key(&self, key_id: Option<Uuid>) {
        if let Ok(mut n) = self.0.lock() {
            n.1 = key_id;
        }
    }
}

/// Inner layer of the routed paths: notes the route template.
pub(crate) async fn note_route(request: Request, next: Next) -> Response {
    if let (Some(note), Some(path)) = (
        request.extensions().get::<AccessNote>(),
        request.extensions().get::<MatchedPath>(),
    ) && let Ok(mut n) = note.0.lock()
    {
        n.0 = Some(path.as_str().to_owned());
    }
    next.run(request).await
}

/// Outermost layer: one access log line (target `taskhost_api::access`,
/// INFO; 5xx at WARN) and one latency observation per request, with the
/// route template rather than the path (bounded labels, no ids), the
/// status, the latency and the key id — never the key or the
/// Authorization header.
pub(crate) async fn access_log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let note = AccessNote::default();
    request.extensions_mut().insert(note.clone());
    let method = request.method().clone();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let (route, key_id) = note
        .0
        .lock()
        .map(|n| (n.0.clone(), n.1))
        .unwrap_or_default();
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    metrics::histogram!(
        "taskhost_http_request_duration_seconds",
        "route" => route.clone(),
        "method" => method.as_str().to_owned(),
        "status" => status.to_string(),
    )
    .record(seconds);
    let latency_ms = (seconds * 1_000_000.0).round() / 1000.0;
    let key_id = key_id.map(|k| k.to_string());
    if status >= 500 {
        tracing::warn!(target: "taskhost_api::access", method = method.as_str(), route, status, latency_ms, key_id, "request");
    } else {
        tracing::info!(target: "taskhost_api::access", method = method.as_str(), route, status, latency_ms, key_id, "request");
    }
    response
}
