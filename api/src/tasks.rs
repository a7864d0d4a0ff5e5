//! `/api/v1/tasks`: recurring tasks. Any key reads; writes and "run now"
//! need task_manager, system_admin or site_admin (and, for an `inline` task,
//! the roles of that mode too).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use taskhost_common::jobs::Accepted;
use taskhost_common::model::{ExecutionMode, Role};
use taskhost_common::tasks::{self, Task, TaskError, TaskRequest};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::jobs::parse_json;
use crate::path::RawPath;
use crate::state::AppState;

const WRITERS: &[Role] = &[Role::TaskManager, Role::SystemAdmin, Role::SiteAdmin];

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Invalid(f) => ApiError::Invalid(f.to_string()),
            TaskError::Parameter(p) => ApiError::Invalid(p.to_string()),
            TaskError::Duplicate(..) => ApiError::Conflict(e.to_string()),
            TaskError::NotFound => ApiError::NotFound("task"),
            TaskError::Db(db) => db.into(),
        }
    }
}

fn task_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("task"))
}

fn require_writer(caller: &Caller, mode: &str) -> Result<(), ApiError> {
    caller.require_any(WRITERS, "changing tasks")?;
    if let Ok(mode) = mode.parse::<ExecutionMode>() {
        caller.require_any(
            mode.allowed_roles(),
            &format!("a task in execution mode `{mode}`"),
        )?;
    }
    Ok(())
}

async fn with_schedule(state: &AppState, task: Task) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(&task).map_err(|e| ApiError::Internal(e.to_string()))?;
    // Names only, each with `***`; null when the task has none.
    v["secretEnvironment"] = task
        .secret_environment
        .as_deref()
        .map_or(Value::Null, |sealed| {
            taskhost_common::secrets::masked(state.settings.secrets.key().as_ref(), sealed)
        });
    if let Some(s) = tasks::schedule_state(&state.pool, task.task_id).await? {
        v["nextRun"] = json!(s.next_run);
        v["lastRun"] = json!(s.last_run);
        v["lastState"] = json!(s.last_state);
        v["isRunning"] = json!(s.is_running);
    }
    Ok(v)
}

pub(crate) async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for t in tasks::list(&state.pool).await? {
        out.push(with_schedule(&state, t).await?);
    }
    Ok(Json(
        json!({ "success": true, "count": out.len(), "tasks": out }),
    ))
}

pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: TaskRequest = parse_json(&body)?;
    require_writer(&caller, request.execution_mode.as_deref().unwrap_or("pool"))?;
    let key = state.settings.secrets.key();
    let task = tasks::create_with(&state.pool, request, caller.user(), key.as_ref()).await?;
    let id = task.task_id;
    let body = with_schedule(&state, task).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "success": true, "taskId": id, "task": body })),
    ))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Value>, ApiError> {
    let task = tasks::get(&state.pool, task_id(&raw)?)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    Ok(Json(with_schedule(&state, task).await?))
}

pub(crate) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&raw)?;
    let request: TaskRequest = parse_json(&body)?;
    let current = tasks::get(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    // Changing a task needs the roles of the mode it has and of the mode
    // it gets (an inline task stays debug's, even when turned into pool).
    require_writer(&caller, current.execution_mode.as_str())?;
    if let Some(mode) = request.execution_mode.as_deref() {
        require_writer(&caller, mode)?;
    }
    let key = state.settings.secrets.key();
    let task = tasks::update_with(&state.pool, id, request, caller.user(), key.as_ref()).await?;
    Ok(Json(with_schedule(&state, task).await?))
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&raw)?;
    caller.require_any(WRITERS, "deleting tasks")?;
    let current = tasks::get(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    require_writer(&caller, current.execution_mode.as_str())?;
    tasks::delete(&state.pool, id, caller.user()).await?;
    Ok(Json(
        json!({ "success": true, "taskId": id, "message": "task deleted" }),
    ))
}

pub(crate) async fn schedule(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&raw)?;
    let s = tasks::schedule_state(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    let mut v = json!(s);
    // The chain around the task (README, "Chains and parameters").
    if let Some(task) = tasks::get(&state.pool, id).await? {
        let chain = tasks::chain_view(&state.pool, &task).await?;
        if let (Some(v), Value::Object(chain)) = (v.as_object_mut(), chain) {
            v.extend(chain);
        }
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    limit: Option<i64>,
    /// Page cursor: only rows with a smaller historyId.
    before: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct HistoryEntry {
    history_id: i64,
    job_id: Uuid,
    node_id: Option<Uuid>,
    /// The node's name (people read names; the id stays for machines).
    node_name: Option<String>,
    attempt: i32,
    start_time: Option<DateTime<Utc>>,
    end_time: DateTime<Utc>,
    duration_ms: Option<i64>,
    state: String,
    is_final: bool,
    exit_code: Option<i32>,
    triggered_by: String,
    /// The worker cut the captured output at `worker.output_cap_bytes`.
    output_truncated: bool,
    /// Bounded previews of stdout and stderr with their sizes (the whole
    /// streams: `GET /tasks/{id}/history/{historyId}/output`).
    #[sqlx(skip)]
    #[serde(flatten)]
    out: crate::output::Previews,
    #[sqlx(flatten)]
    #[serde(skip)]
    raw: crate::output::PreviewColumns,
}

pub(crate) async fn history(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(&raw)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid("limit must be between 1 and 1000".into()));
    }
    tasks::get(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    let sql = format!(
        "SELECT h.history_id, h.job_id, h.node_id, n.node_name, h.attempt, h.start_time, h.end_time,
                h.duration_ms, h.state, h.is_final, h.exit_code, h.triggered_by, h.output_truncated,
                {}
         FROM task_history h LEFT JOIN nodes n ON n.node_id = h.node_id
         WHERE h.task_id = $1 AND ($2::bigint IS NULL OR h.history_id < $2)
         ORDER BY h.history_id DESC
         LIMIT $3",
        crate::output::PREVIEW_COLUMNS
    );
    // Row by row, so only one row's output slices are held at a time.
    let mut rows = sqlx::query_as::<_, HistoryEntry>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(q.before)
        .bind(limit)
        .fetch(&state.pool);
    let mut entries = Vec::new();
    while let Some(mut h) = futures_util::TryStreamExt::try_next(&mut rows).await? {
        h.out = h.raw.previews();
        entries.push(h);
    }
    let next = if entries.len() as i64 == limit {
        entries.last().map(|h| h.history_id)
    } else {
        None
    };
    Ok(Json(
        json!({ "success": true, "count": entries.len(), "nextBefore": next, "history": entries }),
    ))
}

/// Body of `POST /tasks/{id}/run` (optional): values of the task's
/// parameters, by name; the others take their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RunNowRequest {
    #[serde(default)]
    parameters: serde_json::Map<String, Value>,
}

pub(crate) async fn run_now(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let task = tasks::get(&state.pool, task_id(&raw)?)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    require_writer(&caller, task.execution_mode.as_str())?;
    // No body (or `{}`): the parameters' defaults.
    let request: RunNowRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RunNowRequest::default()
    } else {
        parse_json(&body)?
    };
    let ran = match tasks::run_now(&state.pool, &task, caller.user(), &request.parameters).await {
        // Deleted between the read above and the job's insert.
        Err(TaskError::Db(sqlx::Error::Database(e))) if e.code().as_deref() == Some("23503") => {
            return Err(ApiError::NotFound("task"));
        }
        other => other?,
    };
    match ran {
        Accepted::Created {
            job_ids,
            outbox,
            status,
        } => {
            let message =
                crate::jobs::dispatch(&state, caller.user(), &job_ids, &outbox, status).await;
            let mut body = json!({ "success": true, "taskId": task.task_id, "jobId": job_ids[0], "message": message });
            if job_ids.len() > 1 {
                body["jobIds"] = json!(job_ids);
            }
            Ok((StatusCode::ACCEPTED, Json(body)))
        }
        _ => Err(ApiError::Conflict("the task cannot run as stored".into())),
    }
}
