//! `/api/v1/changes`: the change feed with decoded old/new rows (admin).

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use taskhost_common::changelog;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

const TABLES: &[&str] = &["tasks", "task_schedule", "nodes", "jobs"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangesQuery {
    table: Option<String>,
    since: Option<i64>,
    limit: Option<i64>,
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin("reading the change feed")?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    if let Some(t) = &q.table
        && !TABLES.contains(&t.as_str())
    {
        return Err(ApiError::Invalid(format!(
            "table must be one of {}",
            TABLES.join(", ")
        )));
    }
    let since = q.since.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid("limit must be between 1 and 1000".into()));
    }
    let mut conn = state.pool.acquire().await?;
    let changes = changelog::read_since(&mut conn, q.table.as_deref(), since, limit).await?;
    let next = changes.last().map_or(since, |c| c.change_seq);
    Ok(Json(json!({
        "success": true,
        "count": changes.len(),
        "nextSince": next,
        "changes": changes,
    })))
}
