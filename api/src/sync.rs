//! `/api/v1/sync`: change-feed consumer cursors and lag (admin).
//!
//! - `GET /sync/status`: the safe head of the feed and every cursor in
//!   `sync_state` with how far it is behind.
//! - `POST /sync/trigger`: runs the built-in `events` relay now (publishing
//!   the feed onto `<p>.events` as `change.<table>.<action>`), and with
//!   `resetTo` moves a consumer's cursor, e.g. to replay the feed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskhost_common::sync::{self, ALL_TABLES, ConsumerStatus, EVENTS_CONSUMER, TABLES};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Relay passes one trigger may run (each up to [`RELAY_BATCH`] changes).
const MAX_PASSES: usize = 20;
const RELAY_BATCH: i64 = 500;

/// The feed's head and every consumer cursor.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncStatus)]
pub(crate) struct Status200 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    /// The feed's safe head.
    head_seq: i64,
    consumers: Vec<ConsumerStatus>,
}

/// Sync status
///
/// The change feed's head and every consumer cursor with its lag.
/// system_admin or site_admin.
#[utoipa::path(
    get,
    path = "/sync/status",
    operation_id = "syncStatus",
    tag = "changes",
    responses(
        (status = 200, description = "The cursors.", body = Status200),
        (status = 403, response = crate::doc::Forbidden),
    )
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Status200>, ApiError> {
    caller.require_admin("reading sync status")?;
    let mut conn = state.pool.acquire().await?;
    let head = state.watermark.safe_head_local(&mut conn).await?;
    let consumers = sync::status(&mut conn, head).await?;
    Ok(Json(Status200 {
        success: true,
        head_seq: head,
        consumers,
    }))
}

/// The body of `POST /sync/trigger`: empty or `{}` runs the events relay;
/// `resetTo` moves a cursor (0 replays the feed).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(as = SyncTriggerRequest, example = json!({"consumer": "events", "resetTo": 0}))]
struct TriggerRequest {
    /// The consumer whose cursor to move: 1 to 128 letters, digits or
    /// `._:@-`; default `events` (the built-in relay, which also runs).
    #[schema(pattern = r"^[A-Za-z0-9._:@-]{1,128}$")]
    consumer: Option<String>,
    /// The cursor's table, or `*` (default) for all; the `events` relay
    /// follows every table.
    #[schema(schema_with = table_schema)]
    table: Option<String>,
    /// Move the cursor here: 0 up to the feed's head. Required for a
    /// consumer other than `events`.
    #[schema(minimum = 0)]
    reset_to: Option<i64>,
}

/// A cursor's table, as a body field: one of the feed's tables, or `*`
/// for all of them ([`valid_table`]).
pub(crate) fn table_schema() -> utoipa::openapi::schema::Object {
    tables_schema(&[ALL_TABLES])
}

/// A table to read, as a query parameter (every table: leave it out).
pub(crate) fn feed_table_schema() -> utoipa::openapi::schema::Object {
    tables_schema(&[])
}

fn tables_schema(more: &[&'static str]) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(
            TABLES
                .iter()
                .chain(more)
                .map(|t| Value::from(*t))
                .chain([Value::Null]),
        ))
        .build()
}

/// What a trigger did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SyncTriggerResult)]
pub(crate) struct Trigger200 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    /// The consumer named (default `events`).
    consumer: String,
    /// Changes the relay published now (0 when another consumer's cursor
    /// was moved).
    published: usize,
    head_seq: i64,
    consumers: Vec<ConsumerStatus>,
}

/// Checks a consumer name: 1–128 of letters, digits and `._:@-`.
pub(crate) fn valid_consumer(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(
            "consumer must be 1 to 128 letters, digits or ._:@-".into(),
        ))
    }
}

/// Checks a cursor's table: one of the logged tables, or `*`.
pub(crate) fn valid_table(table: &str) -> Result<(), ApiError> {
    if table == ALL_TABLES || TABLES.contains(&table) {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "table must be one of {}, or *",
            TABLES.join(", ")
        )))
    }
}

/// Run the events relay, or move a cursor
///
/// `{}` (or no body) runs the built-in events relay now; with `resetTo`
/// moves a consumer's cursor (0 replays the feed). system_admin or
/// site_admin.
#[utoipa::path(
    post,
    path = "/sync/trigger",
    operation_id = "syncTrigger",
    tag = "changes",
    request_body(content = Option<TriggerRequest>, description = "What to do; may be empty (the same as `{}`)."),
    responses(
        (status = 200, description = "Done.", body = Trigger200),
        (status = 403, response = crate::doc::Forbidden),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Trigger200>, ApiError> {
    caller.require_admin("triggering a sync")?;
    let req: TriggerRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TriggerRequest::default()
    } else {
        let v: Value = crate::jobs::parse_json(&body)?;
        if v.get("resetTo").is_some_and(Value::is_null) {
            return Err(ApiError::Invalid(
                "resetTo must be an integer (leave it out to keep the cursor)".into(),
            ));
        }
        serde_json::from_value(v).map_err(|e| ApiError::Invalid(format!("invalid body: {e}")))?
    };
    let consumer = req.consumer.as_deref().unwrap_or(EVENTS_CONSUMER);
    valid_consumer(consumer)?;
    let table = req.table.as_deref().unwrap_or(ALL_TABLES);
    valid_table(table)?;
    let is_relay = consumer == EVENTS_CONSUMER;
    if is_relay && table != ALL_TABLES {
        return Err(ApiError::Invalid(
            "the events relay follows every table: leave table out or give *".into(),
        ));
    }
    let mut conn = state.pool.acquire().await?;
    let head = state.watermark.safe_head_local(&mut conn).await?;
    if let Some(to) = req.reset_to {
        if !(0..=head).contains(&to) {
            return Err(ApiError::Invalid(format!(
                "resetTo must be between 0 and the head of the feed ({head})"
            )));
        }
        sync::set_cursor(&mut conn, consumer, table, to).await?;
        tracing::info!(
            consumer,
            table,
            reset_to = to,
            by = caller.user(),
            "sync cursor moved"
        );
    } else if !is_relay {
        return Err(ApiError::Invalid(format!(
            "{consumer} pulls the feed itself (GET /api/v1/changes?consumer={consumer}); \
             give resetTo to move its cursor"
        )));
    }
    drop(conn);
    let mut published = 0;
    if is_relay {
        for _ in 0..MAX_PASSES {
            let pass =
                sync::relay_once(&state.pool, &state.watermark, &state.publisher, RELAY_BATCH)
                    .await
                    .map_err(|e| match e {
                        sync::RelayError::Db(e) => ApiError::from(e),
                        sync::RelayError::Publish(detail) => {
                            tracing::warn!(error = %detail, "sync trigger could not publish");
                            ApiError::Unavailable("the message broker")
                        }
                    })?;
            published += pass.published;
            if pass.busy || pass.published < RELAY_BATCH as usize {
                break;
            }
        }
    }
    let mut conn = state.pool.acquire().await?;
    let consumers = sync::status(&mut conn, head).await?;
    Ok(Json(Trigger200 {
        success: true,
        consumer: consumer.to_owned(),
        published,
        head_seq: head,
        consumers,
    }))
}
