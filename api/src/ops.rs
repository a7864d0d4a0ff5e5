//! Operations endpoints: `/livez`, `/readyz`, and the documentation:
//! `/openapi.json` (built from the code, `crate::doc`), `/docs` (the
//! vendored Swagger UI that renders it, served from this binary) and
//! `/asyncapi.json` (the RabbitMQ interface).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// The `/docs` page: Swagger UI with its configuration.
const DOCS: &str = include_str!("../assets/docs.html");
/// The AsyncAPI document of the RabbitMQ interface (docs/asyncapi.json).
const ASYNCAPI: &str = include_str!("../../docs/asyncapi.json");

/// The page's files, by name under `/docs/`: the vendored Swagger UI
/// (api/assets/swagger-ui/VERSION says which) and its configuration.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui.css"),
    ),
    (
        "docs.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/docs.js"),
    ),
    (
        "LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/swagger-ui/LICENSE"),
    ),
    (
        "NOTICE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/swagger-ui/NOTICE"),
    ),
    (
        "swagger-ui-bundle.js.LICENSE.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js.LICENSE.txt"),
    ),
];

/// The page talks only to its own origin.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// The AsyncAPI document
///
/// The RabbitMQ interface (AsyncAPI 3.0): the queues and exchanges, message
/// types, headers, payload schemas and examples, valid and invalid with the
/// dead-letter reason of each (`docs/asyncapi.json`; a test publishes every
/// example).
#[utoipa::path(
    get,
    path = "/asyncapi.json",
    operation_id = "asyncapi",
    tag = "operations",
    responses((status = 200, description = "The document.", content_type = "application/json", body = Object))
)]
pub(crate) async fn asyncapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ASYNCAPI)
}

/// The OpenAPI document
///
/// This document (OpenAPI 3.1), generated from the api's code; the copy in
/// the repository (`api/openapi.json`) is checked against it by a test.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The document.", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        crate::doc::json(),
    )
}

/// The API reference
///
/// A page that renders this document (Swagger UI, served by the api
/// itself: nothing is fetched from elsewhere). **Authorize** takes an API
/// key, and **Execute** sends the request.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs",
    tag = "operations",
    responses((status = 200, description = "The page.", content_type = "text/html", body = String))
)]
pub(crate) async fn docs() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, DOCS_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::response::Html(DOCS),
    )
}

/// One file of the `/docs` page. They change only with the binary, so
/// browsers may keep them a day.
pub(crate) async fn docs_asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=86400"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => ApiError::NotFound("route").into_response(),
    }
}

/// The process is up.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Liveness)]
pub(crate) struct Live {
    /// Always `ok`.
    #[schema(schema_with = ok)]
    status: &'static str,
}

fn ok() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["ok"]))
        .build()
}

/// Liveness
///
/// 200 while the process runs (it checks nothing else).
#[utoipa::path(
    get,
    path = "/livez",
    operation_id = "livez",
    tag = "operations",
    responses((status = 200, description = "Alive.", body = Live))
)]
pub(crate) async fn livez() -> Json<Live> {
    Json(Live { status: "ok" })
}

/// One dependency's check.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ReadinessCheck)]
pub(crate) struct Check {
    ok: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The checks of `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Checks {
    postgres: Check,
    rabbitmq: Check,
}

/// Whether the api can serve.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Readiness)]
pub(crate) struct Ready {
    /// `ready`, or `unavailable` when a dependency is down.
    #[schema(schema_with = ready_status)]
    status: &'static str,
    /// What is down: `postgres`, `rabbitmq`.
    down: Vec<&'static str>,
    checks: Checks,
}

fn ready_status() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["ready", "unavailable"]))
        .build()
}

/// Readiness
///
/// 200 when Postgres and RabbitMQ both answer (within 3 s); 503 naming
/// what is down.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready.", body = Ready),
        (status = 503, description = "A dependency is down; `down` names it.", body = Ready),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    let pg = async {
        match tokio::time::timeout(
            Duration::from_secs(3),
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    };
    let mq = async {
        state
            .publisher
            .ensure_connected()
            .await
            .map_err(|e| e.to_string())
    };
    let (pg, mq) = tokio::join!(pg, mq);
    let check = |r: &Result<(), String>| Check {
        ok: r.is_ok(),
        error: r.as_ref().err().cloned(),
    };
    let mut down = Vec::new();
    if pg.is_err() {
        down.push("postgres");
    }
    if mq.is_err() {
        down.push("rabbitmq");
    }
    let body = Ready {
        status: if down.is_empty() {
            "ready"
        } else {
            "unavailable"
        },
        down,
        checks: Checks {
            postgres: check(&pg),
            rabbitmq: check(&mq),
        },
    };
    let code = if body.down.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
