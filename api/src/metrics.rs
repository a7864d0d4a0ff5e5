//! `/metrics` in the Prometheus text format: process counters plus gauges
//! read from Postgres at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::state::AppState;

/// Counters of this api process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs accepted (202).
    pub jobs_submitted: AtomicU64,
    /// Submissions refused (4xx).
    pub jobs_rejected: AtomicU64,
    /// Work messages confirmed on the fast path.
    pub jobs_published: AtomicU64,
    /// Fast-path publishes that failed (left for the relay).
    pub publish_failures: AtomicU64,
    /// Requests refused with 429.
    pub rate_limited: AtomicU64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request refused with 429.
    pub fn rate_limited(&self) {
        Self::add(&self.rate_limited, 1);
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
               example = "# TYPE taskhost_api_jobs_submitted_total counter\ntaskhost_api_jobs_submitted_total 3\n"))
)]
pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    let mut out = String::new();
    for (name, help, value) in [
        (
            "taskhost_jobs_submitted_total",
            "Jobs accepted by this api process.",
            &m.jobs_submitted,
        ),
        (
            "taskhost_jobs_rejected_total",
            "Job submissions refused by this api process.",
            &m.jobs_rejected,
        ),
        (
            "taskhost_jobs_published_total",
            "Work messages confirmed by the broker on the fast path.",
            &m.jobs_published,
        ),
        (
            "taskhost_publish_failures_total",
            "Fast-path publishes that failed and were left to the outbox relay.",
            &m.publish_failures,
        ),
        (
            "taskhost_api_rate_limited_total",
            "Requests refused with 429 because their key spent its budget.",
            &m.rate_limited,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    let statuses: Result<Vec<(String, i64)>, _> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(&state.pool)
            .await;
    let nodes: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE is_active), count(*) FILTER (WHERE NOT is_active) FROM nodes",
    )
    .fetch_one(&state.pool)
    .await;
    let outbox: Result<i64, _> =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&state.pool)
            .await;
    let up = statuses.is_ok();
    let _ = writeln!(
        out,
        "# HELP taskhost_database_up Whether Postgres answered this scrape.\n# TYPE taskhost_database_up gauge\ntaskhost_database_up {}",
        u8::from(up)
    );
    if let Ok(statuses) = statuses {
        let _ = writeln!(
            out,
            "# HELP taskhost_jobs Jobs by status.\n# TYPE taskhost_jobs gauge"
        );
        // Every state, zeros included, so a series never vanishes.
        for status in taskhost_common::model::JobStatus::ALL {
            let n = statuses
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "taskhost_jobs{{status=\"{status}\"}} {n}");
        }
    }
    if let Ok((active, dead)) = nodes {
        let _ = writeln!(
            out,
            "# HELP taskhost_nodes Registered nodes.\n# TYPE taskhost_nodes gauge\ntaskhost_nodes{{state=\"active\"}} {active}\ntaskhost_nodes{{state=\"inactive\"}} {dead}"
        );
    }
    if let Ok(n) = outbox {
        let _ = writeln!(
            out,
            "# HELP taskhost_outbox_pending Outbox messages not yet confirmed by the broker.\n# TYPE taskhost_outbox_pending gauge\ntaskhost_outbox_pending {n}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
