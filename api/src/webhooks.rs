//! Webhooks (README, "Notifications (webhooks)"): create, list, delete,
//! and read a webhook's delivery log. Admins only (system_admin,
//! site_admin); others get 403. The signing secret is configuration
//! (`notifications.secret`) and never appears in an answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use serde::{Deserialize, Serialize};
use taskhost_common::notify::{self, CreateError, Delivery, EVENTS, NewWebhook, Webhook};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::jobs::parse_json;
use crate::path::RawPath;
use crate::state::AppState;

/// The longest accepted `url`.
const MAX_URL_LEN: usize = 2048;
/// The largest `failuresInARow`.
const MAX_FAILURES_IN_A_ROW: i32 = 1000;

/// The body of `POST /api/v1/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"url": "https://hooks.example.com/taskhost", "events": ["job.failed", "job.timed_out"]}))]
pub(crate) struct WebhookRequest {
    /// `http://` or `https://` URL the deliveries are POSTed to.
    #[schema(max_length = 2048, pattern = "^https?://")]
    url: String,
    /// One or more of `job.succeeded`, `job.failed`, `job.timed_out`,
    /// `job.dead`, `node.dead` (global webhooks only),
    /// `task.failed_repeatedly`.
    #[schema(min_items = 1)]
    events: Vec<String>,
    /// Only this task's runs; absent: every job (and node events).
    #[serde(default)]
    task_id: Option<Uuid>,
    /// N of `task.failed_repeatedly` (default 3).
    #[serde(default, rename = "failuresInARow")]
    #[schema(minimum = 1, maximum = 1000)]
    failures_in_a_row: Option<i32>,
}

/// The query of `GET /api/v1/webhooks/{id}/deliveries`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveriesQuery {
    /// Rows at most, newest first (1..=1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A created webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WebhookCreated {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    webhook_id: Uuid,
    webhook: Webhook,
}

/// Every webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WebhookList {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    webhooks: Vec<Webhook>,
}

/// A deleted webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WebhookDeleted {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    webhook_id: Uuid,
    message: String,
}

/// A webhook's delivery log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeliveryLog {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    webhook_id: Uuid,
    count: usize,
    deliveries: Vec<Delivery>,
}

fn webhook_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("webhook"))
}

fn validate(r: WebhookRequest) -> Result<NewWebhook, ApiError> {
    let invalid = |m: String| Err(ApiError::Invalid(m));
    let url = r.url.trim().to_string();
    if url.len() > MAX_URL_LEN {
        return invalid(format!("url: longer than {MAX_URL_LEN} characters"));
    }
    match url.parse::<Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty()) => {}
        _ => return invalid("url: must be an absolute http:// or https:// URL".into()),
    }
    if r.events.is_empty() {
        return invalid(format!(
            "events: name at least one of {}",
            EVENTS.join(", ")
        ));
    }
    let mut events = Vec::new();
    for e in r.events {
        if !EVENTS.contains(&e.as_str()) {
            return invalid(format!("events: `{e}` is not one of {}", EVENTS.join(", ")));
        }
        if !events.contains(&e) {
            events.push(e);
        }
    }
    if r.task_id.is_some() && events.iter().any(|e| e == "node.dead") {
        return invalid("events: `node.dead` is a global event; leave taskId out".into());
    }
    let failures_in_a_row = r.failures_in_a_row.unwrap_or(3);
    if !(1..=MAX_FAILURES_IN_A_ROW).contains(&failures_in_a_row) {
        return invalid(format!(
            "failuresInARow: must be between 1 and {MAX_FAILURES_IN_A_ROW}"
        ));
    }
    Ok(NewWebhook {
        url,
        events,
        task_id: r.task_id,
        failures_in_a_row,
    })
}

/// Create a webhook
///
/// Deliveries of the named events are POSTed to `url`, signed with
/// `notifications.secret` (README, "Notifications (webhooks)"). Admins only;
/// 409 when no `notifications.secret` is configured.
#[utoipa::path(
    post,
    path = "/webhooks",
    operation_id = "createWebhook",
    tag = "webhooks",
    request_body(content = WebhookRequest, description = "The webhook."),
    responses(
        (status = 201, description = "Created.", body = WebhookCreated),
        (status = 403, response = crate::doc::Forbidden),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<WebhookCreated>), ApiError> {
    caller.require_admin("managing webhooks")?;
    let new = validate(parse_json(&body)?)?;
    if state.settings.notifications.secret.is_empty() {
        return Err(ApiError::Conflict(
            "webhooks need notifications.secret (TASKHOST__NOTIFICATIONS__SECRET) \
             on the api and the schedulers"
                .into(),
        ));
    }
    let hook = match notify::create(&state.pool, &new, caller.user()).await {
        Ok(hook) => hook,
        Err(CreateError::NoSuchTask) => {
            return Err(ApiError::Invalid(CreateError::NoSuchTask.to_string()));
        }
        Err(CreateError::Db(e)) => return Err(e.into()),
    };
    Ok((
        StatusCode::CREATED,
        Json(WebhookCreated {
            success: true,
            webhook_id: hook.webhook_id,
            webhook: hook,
        }),
    ))
}

/// List webhooks
///
/// Every webhook. Admins only.
#[utoipa::path(
    get,
    path = "/webhooks",
    operation_id = "listWebhooks",
    tag = "webhooks",
    responses(
        (status = 200, description = "The webhooks.", body = WebhookList),
        (status = 403, response = crate::doc::Forbidden),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, ApiError> {
    caller.require_admin("reading webhooks")?;
    let hooks = notify::list(&state.pool).await?;
    Ok(Json(WebhookList {
        success: true,
        count: hooks.len(),
        webhooks: hooks,
    }))
}

/// Delete a webhook
///
/// Its delivery log goes with it. Admins only.
#[utoipa::path(
    delete,
    path = "/webhooks/{webhookId}",
    operation_id = "deleteWebhook",
    tag = "webhooks",
    params(crate::doc::WebhookIdPath),
    responses(
        (status = 200, description = "Deleted.", body = WebhookDeleted),
        (status = 403, response = crate::doc::Forbidden),
        (status = 404, response = crate::doc::NotFound),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<WebhookDeleted>, ApiError> {
    caller.require_admin("managing webhooks")?;
    let id = webhook_id(&raw)?;
    if !notify::delete(&state.pool, id, caller.user()).await? {
        return Err(ApiError::NotFound("webhook"));
    }
    Ok(Json(WebhookDeleted {
        success: true,
        webhook_id: id,
        message: "webhook deleted".to_owned(),
    }))
}

/// A webhook's delivery log
///
/// Its deliveries, newest first: event, status (`pending`, `delivered`,
/// `failed`), attempts, the last answer's status code or error, the body
/// sent. Admins only.
#[utoipa::path(
    get,
    path = "/webhooks/{webhookId}/deliveries",
    operation_id = "getWebhookDeliveries",
    tag = "webhooks",
    params(crate::doc::WebhookIdPath, DeliveriesQuery),
    responses(
        (status = 200, description = "The delivery log.", body = DeliveryLog),
        (status = 403, response = crate::doc::Forbidden),
        (status = 404, response = crate::doc::NotFound),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    query: Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryLog>, ApiError> {
    caller.require_admin("reading webhook deliveries")?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid(
            "limit: must be between 1 and 1000".into(),
        ));
    }
    let id = webhook_id(&raw)?;
    if notify::get(&state.pool, id).await?.is_none() {
        return Err(ApiError::NotFound("webhook"));
    }
    let rows = notify::deliveries(&state.pool, id, limit).await?;
    Ok(Json(DeliveryLog {
        success: true,
        webhook_id: id,
        count: rows.len(),
        deliveries: rows,
    }))
}
