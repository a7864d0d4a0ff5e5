//! `/api/v1/changes`: the change feed with decoded old/new rows (admin).
//!
//! The feed only goes up to its safe head (every row at or below it is
//! committed), so a reader that moves its cursor to `nextSince` never skips
//! a change. With `consumer=NAME` the read also records NAME's cursor in
//! `sync_state` (it has taken everything up to `since`), and without
//! `since` it continues from that cursor.

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskhost_common::changelog::ChangeEntryOf;
use taskhost_common::{changelog, secrets, sync};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::sync::{valid_consumer, valid_table};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ChangesQuery {
    /// Only changes of this table.
    #[param(schema_with = crate::sync::feed_table_schema)]
    table: Option<String>,
    /// Only changes with `changeSeq` greater than this (default 0): pass the
    /// previous `nextSince`. With `consumer`, at most the feed's head.
    #[param(minimum = 0, default = 0)]
    since: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
    /// A consumer name. With `since`, records that this consumer has taken
    /// everything up to `since`; without, continues from its recorded
    /// cursor (`GET /api/v1/sync/status` shows them).
    #[param(pattern = r"^[A-Za-z0-9._:@-]{1,128}$")]
    consumer: Option<String>,
}

/// A page of the change feed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ChangeList)]
pub(crate) struct ChangesPage {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    /// The feed's safe head: every change at or below it is committed.
    head_seq: i64,
    /// Pass as `since` for the next page.
    next_since: i64,
    #[schema(value_type = Vec<ChangeEntryOf<Value>>)]
    changes: Vec<changelog::ChangeEntry>,
}

/// Read the change feed
///
/// Changes with decoded old and new rows, oldest first, up to the safe
/// head (so moving to `nextSince` never skips a change). Sealed secrets
/// show as their names with `***`. system_admin or site_admin.
#[utoipa::path(
    get,
    path = "/changes",
    operation_id = "listChanges",
    tag = "changes",
    params(ChangesQuery),
    responses(
        (status = 200, description = "A page of changes.", body = ChangesPage),
        (status = 403, response = crate::doc::Forbidden),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ChangesPage>, ApiError> {
    caller.require_admin("reading the change feed")?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    if let Some(t) = &q.table {
        if t == sync::ALL_TABLES {
            return Err(ApiError::Invalid(
                "leave table out to read every table".into(),
            ));
        }
        valid_table(t)?;
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid("limit must be between 1 and 1000".into()));
    }
    if q.since.is_some_and(|s| s < 0) {
        return Err(ApiError::Invalid("since must be 0 or more".into()));
    }
    let mut conn = state.pool.acquire().await?;
    let cursor_table = q.table.as_deref().unwrap_or(sync::ALL_TABLES);
    let since = match (&q.consumer, q.since) {
        (Some(consumer), Some(since)) => {
            valid_consumer(consumer)?;
            // A stored cursor beyond the head would skip every change up to
            // it; /sync/trigger refuses the same.
            let head = state.watermark.safe_head_local(&mut conn).await?;
            if since > head {
                return Err(ApiError::Invalid(format!(
                    "since must be at most the head of the feed ({head}) when it moves consumer {consumer}'s cursor"
                )));
            }
            sync::set_cursor(&mut conn, consumer, cursor_table, since).await?;
            since
        }
        (Some(consumer), None) => {
            valid_consumer(consumer)?;
            sqlx::query_scalar(
                "SELECT last_change_seq FROM sync_state WHERE consumer = $1 AND table_name = $2",
            )
            .bind(consumer)
            .bind(cursor_table)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or(0)
        }
        (None, since) => since.unwrap_or(0),
    };
    let head = state.watermark.safe_head_local(&mut conn).await?;
    let mut changes =
        changelog::read_between(&mut conn, q.table.as_deref(), since, head, limit).await?;
    // Sealed secrets show as their names with `***` (README, "Secrets").
    let key = state.settings.secrets.key();
    for change in &mut changes {
        for row in [&mut change.old_data, &mut change.new_data]
            .into_iter()
            .flatten()
        {
            for column in ["secret_env", "secret_environment"] {
                secrets::mask_row_column(row, column, key.as_ref());
            }
        }
    }
    // Everything up to the head was read unless the page filled up.
    let next = match changes.last() {
        Some(last) if changes.len() as i64 >= limit => last.change_seq,
        _ => head.max(since),
    };
    Ok(Json(ChangesPage {
        success: true,
        count: changes.len(),
        head_seq: head,
        next_since: next,
        changes,
    }))
}
