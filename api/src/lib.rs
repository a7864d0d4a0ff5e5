//! The taskhost HTTP API (axum).
//!
//! - [`router`] builds the whole app for a state, so tests can drive it.
//! - [`run`] serves it on the configured address until shutdown;
//!   [`serve`] takes an already-bound listener.
//! - Modules: `jobs` (submit, results, cancel), `tasks`, `nodes`,
//!   `output` (bounded previews, whole outputs streamed), `changes` (the
//!   feed), `live` (job and node changes pushed as Server-Sent Events),
//!   `sync` (consumer cursors, the events relay), `ops` (`/livez`,
//!   `/readyz`, OpenAPI), `webhooks` (notification webhooks and their
//!   delivery log, admins only), `metrics`, `dashboard` (the browser page),
//!   `auth` (Bearer keys), `path` (path ids as text, so a malformed one is
//!   the handler's 404), `ratelimit` (per-key token buckets), `error` (the
//!   one error type that owns status codes), `server` (the accept loop:
//!   connection cap, header and idle timeouts).
//!
//! The api never executes commands and never consumes work queues.

mod auth;
mod changes;
mod console;
mod dashboard;
mod error;
mod health;
mod jobs;
mod live;
mod metrics;
mod nodes;
mod ops;
mod output;
mod path;
mod ratelimit;
mod server;
mod state;
mod sync;
mod tasks;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use taskhost_common::amqp::{Names, Publisher};
use taskhost_common::{CancellationToken, Settings, db, startup};
use tokio::net::TcpListener;

pub use error::ApiError;
pub use state::AppState;

/// The longest a request may take in the router (then 503); shutdown waits
/// this long, and a little more, for requests in flight.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the state from settings (connections are opened lazily). Call it
/// inside the Tokio runtime: it starts the publish batcher.
pub fn state(settings: &Settings) -> anyhow::Result<AppState> {
    metrics::register();
    let pool = db::pool(&settings.database).context("database.url")?;
    let publisher = Arc::new(Publisher::new(
        &settings.amqp,
        Names::new(settings.amqp.prefix.clone()),
        format!("taskhost-api@{}", taskhost_common::hostname()),
    ));
    let keys = Arc::new(taskhost_common::keys::KeyCache::new());
    // Revocations clear the cache as they commit; the listener stops when
    // the state is dropped.
    tokio::spawn(taskhost_common::keys::KeyCache::follow_revocations(
        Arc::downgrade(&keys),
        settings.database.url.clone(),
    ));
    Ok(AppState {
        keys,
        accepter: Arc::new(taskhost_common::jobs::plain_accepter(pool.clone())),
        db_health: Arc::default(),
        streams: CancellationToken::new(),
        batcher: taskhost_common::jobs::PublishBatcher::spawn(pool.clone(), publisher.clone()),
        pool,
        publisher,
        settings: Arc::new(settings.clone()),
        watermark: Arc::new(taskhost_common::sync::Watermark::new()),
        limiter: Arc::new(ratelimit::RateLimiter::new(
            settings.api.rate_limit_per_sec,
            settings.api.rate_limit_burst,
        )),
    })
}

/// The whole HTTP app.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    let v1 = Router::new()
        .route("/jobs", get(console::list_jobs))
        .route("/jobs/submit", post(jobs::submit))
        .route(
            "/jobs/results",
            get(jobs::results).delete(jobs::delete_by_query),
        )
        .route(
            "/jobs/{job_id}",
            get(jobs::get_one).delete(jobs::delete_by_path),
        )
        .route("/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/jobs/{job_id}/rerun", post(console::rerun))
        .route("/jobs/{job_id}/output", get(output::job_output))
        .route("/overview", get(console::overview))
        .route("/me", get(console::me))
        .route("/nodes", get(nodes::list))
        .route("/nodes/{node_id}", get(nodes::get_one))
        .route("/changes", get(changes::list))
        .route("/events/stream", get(live::stream))
        .route("/sync/status", get(sync::status))
        .route("/sync/trigger", post(sync::trigger))
        .route("/tasks", get(tasks::list).post(tasks::create))
        .route(
            "/tasks/{task_id}",
            get(tasks::get_one).put(tasks::update).delete(tasks::delete),
        )
        .route("/tasks/{task_id}/history", get(tasks::history))
        .route(
            "/tasks/{task_id}/history/{history_id}/output",
            get(output::history_output),
        )
        .route("/tasks/{task_id}/schedule", get(tasks::schedule))
        .route("/tasks/{task_id}/run", post(tasks::run_now))
        .route("/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/webhooks/{webhook_id}",
            axum::routing::delete(webhooks::delete),
        )
        .route(
            "/webhooks/{webhook_id}/deliveries",
            get(webhooks::deliveries),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            health::guard,
        ))
        .route_layer(axum::middleware::from_fn(metrics::note_route));
    Router::new()
        .nest("/api/v1", v1)
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(ops::openapi))
        .route("/asyncapi.json", get(ops::asyncapi))
        .route("/docs", get(ops::docs))
        .route("/dashboard", get(dashboard::page))
        .route("/", get(dashboard::root))
        .route_layer(axum::middleware::from_fn(metrics::note_route))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(axum::middleware::from_fn(refuse_nul_in_url))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        // Outermost, so it also sees what the layers above produce.
        .layer(axum::middleware::map_response(move |r| async move {
            json_errors(r, max_body)
        }))
        // Outside even that: the access log sees the final status.
        .layer(axum::middleware::from_fn(metrics::access_log))
        .with_state(state)
}

/// A NUL (`%00`) in the path or query string is refused before any handler
/// turns it into a value (the same rule as for bodies, `taskhost_common::text`).
async fn refuse_nul_in_url(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let uri = request.uri();
    let holds_nul = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
    };
    if holds_nul(uri.path()) || uri.query().is_some_and(holds_nul) {
        return ApiError::Invalid(taskhost_common::text::nul_refusal("the URL")).into_response();
    }
    next.run(request).await
}

/// Errors axum or tower produce themselves (413 oversized body, 405 wrong
/// method, 503 timeout) come as plain text or empty bodies; give them the
/// same JSON shape as every other error.
fn json_errors(response: axum::response::Response, max_body: usize) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => return ApiError::TooLarge(max_body).into_response(),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "method not allowed on this path".to_owned(),
        ),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the request timed out".to_owned()),
        other => (
            "error",
            other.canonical_reason().unwrap_or("error").to_lowercase(),
        ),
    };
    let mut out = (
        status,
        axum::Json(
            serde_json::json!({ "success": false, "error": { "code": code, "message": message } }),
        ),
    )
        .into_response();
    if let Some(allow) = response.headers().get(axum::http::header::ALLOW) {
        out.headers_mut()
            .insert(axum::http::header::ALLOW, allow.clone());
    }
    out
}

/// Serves on the configured address until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = startup::bind(&settings.api.bind).await?;
    run_on(listener, settings, shutdown).await
}

/// [`run`] on a listener the caller bound (`standalone` binds first, so a
/// busy port stops it before anything else starts).
pub async fn run_on(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    startup::check_services(&settings, "taskhost-api start-up check").await?;
    let state = state(&settings)?;
    serve(listener, state, shutdown).await
}

/// Serves on `listener` until `shutdown`, then drains in-flight requests
/// (for a little longer than the request timeout at most). At most
/// `api.max_connections` connections are open at once, and a connection
/// that is slow to send its headers or idle too long is closed (the
/// `server` module says how).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // Endless answers (the event stream) end when shutdown begins, so the
    // drain does not wait for them.
    let mut state = state;
    state.streams = shutdown.child_token();
    let limits = server::Limits::new(
        &state.settings.api,
        REQUEST_TIMEOUT + Duration::from_secs(5),
    );
    tracing::info!(
        %addr,
        max_connections = limits.max_connections,
        header_timeout_secs = limits.header_timeout.as_secs(),
        idle_timeout_secs = limits.idle_timeout.as_secs(),
        "api listening"
    );
    server::check_open_file_limit(limits.max_connections);
    let publisher = state.publisher.clone();
    let app = router(state);
    server::accept_loop(listener, app, limits, shutdown).await;
    publisher.close().await;
    tracing::info!("api stopped");
    Ok(())
}
