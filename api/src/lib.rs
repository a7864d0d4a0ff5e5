//! The taskhost HTTP API (axum).
//!
//! - [`router`] builds the whole app for a state, so tests can drive it.
//! - [`run`] serves it on the configured address until shutdown;
//!   [`serve`] takes an already-bound listener.
//! - Modules: `jobs` (submit, results, cancel), `tasks`, `nodes`,
//!   `output` (bounded previews, whole outputs streamed), `changes` (the
//!   feed), `live` (job and node changes pushed as Server-Sent Events),
//!   `sync` (consumer cursors, the events relay), `ops` (`/livez`,
//!   `/readyz`, `/openapi.json`, `/docs`), `doc` (the OpenAPI document,
//!   derived from the handlers' annotations), `webhooks` (notification webhooks and their delivery log, admins only),
//!   `metrics`, `dashboard` (the
//!   browser page),
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
mod doc;
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
mod taskfile;
mod tasks;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;
use taskhost_common::amqp::{Names, Publisher};
use taskhost_common::{CancellationToken, Settings, db, startup};
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use doc::{document as openapi_document, json as openapi_json};
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

/// Every route with its handler, and so the OpenAPI document
/// ([`doc::document`]): `routes!` takes each handler's path, methods and
/// operation from its `#[utoipa::path]`. `guard` is the state the
/// `/api/v1` routes check the database's health with (none for the
/// document alone).
pub(crate) fn routes(guard: Option<AppState>) -> OpenApiRouter<AppState> {
    let mut v1 = OpenApiRouter::new()
        .routes(routes!(console::list_jobs))
        .routes(routes!(jobs::submit))
        .routes(routes!(jobs::results, jobs::delete_by_query))
        .routes(routes!(jobs::get_one, jobs::delete_by_path))
        .routes(routes!(jobs::cancel))
        .routes(routes!(console::rerun))
        .routes(routes!(output::job_output))
        .routes(routes!(console::overview))
        .routes(routes!(console::me))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::get_one))
        .routes(routes!(changes::list))
        .routes(routes!(live::stream))
        .routes(routes!(sync::status))
        .routes(routes!(sync::trigger))
        .routes(routes!(tasks::list, tasks::create))
        .routes(routes!(taskfile::export))
        .routes(routes!(taskfile::import))
        .routes(routes!(tasks::get_one, tasks::update, tasks::delete))
        .routes(routes!(tasks::history))
        .routes(routes!(output::history_output))
        .routes(routes!(tasks::schedule))
        .routes(routes!(tasks::run_now))
        .routes(routes!(webhooks::list, webhooks::create))
        .routes(routes!(webhooks::delete))
        .routes(routes!(webhooks::deliveries));
    if let Some(state) = guard {
        v1 = v1.layer(axum::middleware::from_fn_with_state(state, health::guard));
    }
    OpenApiRouter::with_openapi(doc::ApiDoc::openapi())
        .nest("/api/v1", v1)
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz))
        .routes(routes!(metrics::render))
        .routes(routes!(ops::openapi))
        .routes(routes!(ops::asyncapi))
        .routes(routes!(ops::docs))
        .routes(routes!(dashboard::page))
        .routes(routes!(dashboard::root))
        // The page's own files: part of `/docs`, not operations.
        .route("/docs/{file}", get(ops::docs_asset))
}

/// The whole HTTP app.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    // Built once, before the first request asks for it.
    let _ = doc::json();
    let (app, _) = routes(Some(state.clone())).split_for_parts();
    // Matched routes tell the access log their template.
    app.route_layer(axum::middleware::from_fn(metrics::note_route))
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
        axum::Json(doc::ErrorBody {
            success: false,
            error: doc::ErrorDetail { code, message },
        }),
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
