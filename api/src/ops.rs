//! Operations endpoints: `/livez`, `/readyz`, and the interface documents
//! `/openapi.json` and `/asyncapi.json`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

/// The OpenAPI document of this API.
const OPENAPI: &str = include_str!("../openapi.json");
/// The AsyncAPI document of the RabbitMQ interface (docs/asyncapi.json).
const ASYNCAPI: &str = include_str!("../../docs/asyncapi.json");
/// A self-contained page that renders the OpenAPI document.
const DOCS: &str = include_str!("docs.html");

pub(crate) async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

/// `GET /asyncapi.json`: the queues, message types, headers, payload
/// schemas and examples of the RabbitMQ interface. Open, like
/// `/openapi.json`.
pub(crate) async fn asyncapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        ASYNCAPI,
    )
}

pub(crate) async fn docs() -> axum::response::Html<&'static str> {
    axum::response::Html(DOCS)
}

pub(crate) async fn livez() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when Postgres and RabbitMQ both answer; 503 naming what is down.
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
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
    let check = |r: &Result<(), String>| match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let mut down = Vec::new();
    if pg.is_err() {
        down.push("postgres");
    }
    if mq.is_err() {
        down.push("rabbitmq");
    }
    let body = json!({
        "status": if down.is_empty() { "ready" } else { "unavailable" },
        "down": down,
        "checks": { "postgres": check(&pg), "rabbitmq": check(&mq) },
    });
    let code = if down.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
