//! `/api/v1/nodes`: the node registry.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::path::RawPath;
use crate::state::AppState;

/// A node as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodeView {
    node_id: Uuid,
    node_name: String,
    hostname: String,
    ip_address: Option<String>,
    node_group: String,
    node_role: String,
    is_active: bool,
    status: String,
    last_heartbeat: DateTime<Utc>,
    heartbeat_age_seconds: f64,
    max_concurrent_tasks: i32,
    supported_task_types: Vec<String>,
    running_jobs: i64,
    stats: Value,
    tags: Value,
    registered_at: DateTime<Utc>,
}

const NODE_SELECT: &str = "SELECT n.node_id, n.node_name, n.hostname, n.ip_address, n.node_group, n.node_role,
        n.is_active, CASE WHEN n.is_active THEN 'active' ELSE 'dead' END AS status,
        n.last_heartbeat, extract(epoch FROM now() - n.last_heartbeat)::float8 AS heartbeat_age_seconds,
        n.max_concurrent_tasks, n.supported_task_types,
        (SELECT count(*) FROM jobs j WHERE j.status = 'running' AND j.claimed_by = n.node_id) AS running_jobs,
        n.stats, n.tags, n.registered_at
    FROM nodes n";

pub(crate) async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let nodes: Vec<NodeView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{NODE_SELECT} ORDER BY n.node_group, n.node_role, n.node_name"
    )))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(
        json!({ "success": true, "count": nodes.len(), "nodes": nodes }),
    ))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<NodeView>, ApiError> {
    let node_id: Uuid = raw.parse().map_err(|_| ApiError::NotFound("node"))?;
    let node: Option<NodeView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{NODE_SELECT} WHERE n.node_id = $1"
    )))
    .bind(node_id)
    .fetch_optional(&state.pool)
    .await?;
    node.map(Json).ok_or(ApiError::NotFound("node"))
}
