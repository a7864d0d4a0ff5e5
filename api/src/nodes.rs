//! `/api/v1/nodes`: the node registry.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::path::RawPath;
use crate::state::AppState;

/// A node as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Node)]
pub(crate) struct NodeView {
    node_id: Uuid,
    node_name: String,
    hostname: String,
    ip_address: Option<String>,
    node_group: String,
    node_role: String,
    is_active: bool,
    /// `active`, or `dead` when its heartbeat stopped.
    #[schema(schema_with = node_status)]
    status: String,
    last_heartbeat: DateTime<Utc>,
    /// Seconds since the last heartbeat.
    heartbeat_age_seconds: f64,
    max_concurrent_tasks: i32,
    supported_task_types: Vec<String>,
    /// Jobs it runs now.
    running_jobs: i64,
    /// What the worker last reported (load, memory, slots...).
    #[schema(value_type = Object)]
    stats: Value,
    /// Its tags, as JSON (a list unless configured otherwise).
    #[schema(value_type = Value)]
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

/// `active` or `dead`.
pub(crate) fn node_status() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["active", "dead"]))
        .build()
}

/// Every node.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = NodeList)]
pub(crate) struct NodeList {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    nodes: Vec<NodeView>,
}

/// List nodes
///
/// Every registered node with its group, role, status, heartbeat age,
/// running jobs and stats.
#[utoipa::path(
    get,
    path = "/nodes",
    operation_id = "listNodes",
    tag = "nodes",
    responses((status = 200, description = "The nodes.", body = NodeList))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<NodeList>, ApiError> {
    let nodes: Vec<NodeView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{NODE_SELECT} ORDER BY n.node_group, n.node_role, n.node_name"
    )))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(NodeList {
        success: true,
        count: nodes.len(),
        nodes,
    }))
}

/// Get a node
#[utoipa::path(
    get,
    path = "/nodes/{nodeId}",
    operation_id = "getNode",
    tag = "nodes",
    params(crate::doc::NodeIdPath),
    responses((status = 200, description = "The node.", body = NodeView))
)]
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
