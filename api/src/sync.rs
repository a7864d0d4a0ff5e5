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
use serde::Deserialize;
use serde_json::{Value, json};
use taskhost_common::sync::{self, ALL_TABLES, EVENTS_CONSUMER, TABLES};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Relay passes one trigger may run (each up to [`RELAY_BATCH`] changes).
const MAX_PASSES: usize = 20;
const RELAY_BATCH: i64 = 500;

pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin("reading sync status")?;
    let mut conn = state.pool.acquire().await?;
    let head = state.watermark.safe_head(&mut conn).await?;
    let consumers = sync::status(&mut conn, head).await?;
    Ok(Json(json!({
        "success": true,
        "headSeq": head,
        "consumers": consumers,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TriggerRequest {
    consumer: Option<String>,
    table: Option<String>,
    reset_to: Option<i64>,
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

pub(crate) async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    let head = state.watermark.safe_head(&mut conn).await?;
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
    Ok(Json(json!({
        "success": true,
        "consumer": consumer,
        "published": published,
        "headSeq": head,
        "consumers": consumers,
    })))
}
