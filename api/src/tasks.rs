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
use taskhost_common::model::{ExecutionMode, JobStatus, Role};
use taskhost_common::tasks::{self, ScheduleState, Task, TaskError, TaskRequest};
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

/// A task as the API shows it: the stored task, its secret environment's
/// names, and where its schedule stands.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Task)]
pub(crate) struct TaskView {
    #[serde(flatten)]
    task: Task,
    #[schema(schema_with = crate::doc::secret_names)]
    secret_environment: Option<Value>,
    #[serde(flatten)]
    schedule: ScheduleSummary,
}

/// Where a task's schedule stands (the whole state:
/// `GET /tasks/{taskId}/schedule`); these fields are absent until the
/// scheduler has seen the task.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ScheduleSummary {
    /// When it fires next (null when disabled or never again).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<DateTime<Utc>>, required = false)]
    next_run: Option<Option<DateTime<Utc>>>,
    /// When it last fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<DateTime<Utc>>, required = false)]
    last_run: Option<Option<DateTime<Utc>>>,
    /// How its last run ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, required = false)]
    last_state: Option<Option<String>>,
    /// A run is going.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = bool, required = false)]
    is_running: Option<bool>,
}

async fn with_schedule(state: &AppState, task: Task) -> Result<TaskView, ApiError> {
    // Names only, each with `***`; null when the task has none.
    let secret_environment = task.secret_environment.as_deref().map(|sealed| {
        taskhost_common::secrets::masked(state.settings.secrets.key().as_ref(), sealed)
    });
    let schedule = tasks::schedule_state(&state.pool, task.task_id)
        .await?
        .map(|s| ScheduleSummary {
            next_run: Some(s.next_run),
            last_run: Some(s.last_run),
            last_state: Some(s.last_state),
            is_running: Some(s.is_running),
        })
        .unwrap_or_default();
    Ok(TaskView {
        task,
        secret_environment,
        schedule,
    })
}

/// Every task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = TaskList)]
pub(crate) struct TaskList {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    tasks: Vec<TaskView>,
}

/// List tasks
///
/// Every recurring task with its schedule state. Any key.
#[utoipa::path(
    get,
    path = "/tasks",
    operation_id = "listTasks",
    tag = "tasks",
    responses((status = 200, description = "The tasks.", body = TaskList))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<TaskList>, ApiError> {
    let mut out = Vec::new();
    for t in tasks::list(&state.pool).await? {
        out.push(with_schedule(&state, t).await?);
    }
    Ok(Json(TaskList {
        success: true,
        count: out.len(),
        tasks: out,
    }))
}

/// A created task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TaskCreated)]
pub(crate) struct Created201 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    task_id: Uuid,
    task: TaskView,
}

/// Create a task
///
/// Roles: task_manager, system_admin or site_admin (and for an `inline`
/// task, debug too). 409 when the app already has a task of that name.
#[utoipa::path(
    post,
    path = "/tasks",
    operation_id = "createTask",
    tag = "tasks",
    request_body(content = crate::doc::TaskCreateBody, description = "The task."),
    responses(
        (status = 201, description = "Created.", body = Created201,
         links(
            ("GetTask" = (operation_id = "getTask", parameters(("taskId" = "$response.body#/taskId")),
                          description = "The task.")),
            ("UpdateTask" = (operation_id = "updateTask", parameters(("taskId" = "$response.body#/taskId")),
                             description = "Change it.")),
            ("GetTaskSchedule" = (operation_id = "getTaskSchedule", parameters(("taskId" = "$response.body#/taskId")),
                                  description = "Its next and last run.")),
            ("GetTaskHistory" = (operation_id = "getTaskHistory", parameters(("taskId" = "$response.body#/taskId")),
                                 description = "Its runs.")),
            ("RunTaskNow" = (operation_id = "runTaskNow", parameters(("taskId" = "$response.body#/taskId")),
                             description = "Run it now.")),
            ("DeleteTask" = (operation_id = "deleteTask", parameters(("taskId" = "$response.body#/taskId")),
                             description = "Delete it."))
         )),
        (status = 403, response = crate::doc::Forbidden),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Created201>), ApiError> {
    let request: TaskRequest = parse_json(&body)?;
    require_writer(&caller, request.execution_mode.as_deref().unwrap_or("pool"))?;
    let key = state.settings.secrets.key();
    let task = tasks::create_with(&state.pool, request, caller.user(), key.as_ref()).await?;
    let id = task.task_id;
    let body = with_schedule(&state, task).await?;
    Ok((
        StatusCode::CREATED,
        Json(Created201 {
            success: true,
            task_id: id,
            task: body,
        }),
    ))
}

/// Get a task
#[utoipa::path(
    get,
    path = "/tasks/{taskId}",
    operation_id = "getTask",
    tag = "tasks",
    params(crate::doc::TaskIdPath),
    responses((status = 200, description = "The task.", body = TaskView))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = tasks::get(&state.pool, task_id(&raw)?)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    Ok(Json(with_schedule(&state, task).await?))
}

/// Change a task
///
/// Changes the fields the body names (`null` clears `timeoutSeconds`,
/// `limits` or the assignment). Roles as for creating, for the mode the
/// task has and the one it gets.
#[utoipa::path(
    put,
    path = "/tasks/{taskId}",
    operation_id = "updateTask",
    tag = "tasks",
    params(crate::doc::TaskIdPath),
    request_body(content = TaskRequest, description = "The fields to change."),
    responses(
        (status = 200, description = "The task as it is now.", body = TaskView),
        (status = 403, response = crate::doc::Forbidden),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    body: Bytes,
) -> Result<Json<TaskView>, ApiError> {
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

/// A deleted task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TaskDeleted)]
pub(crate) struct Deleted200 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    task_id: Uuid,
    /// `task deleted`.
    message: &'static str,
}

/// Delete a task
///
/// Its history goes with it; jobs it fired stay.
#[utoipa::path(
    delete,
    path = "/tasks/{taskId}",
    operation_id = "deleteTask",
    tag = "tasks",
    params(crate::doc::TaskIdPath),
    responses(
        (status = 200, description = "Deleted.", body = Deleted200),
        (status = 403, response = crate::doc::Forbidden),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Deleted200>, ApiError> {
    let id = task_id(&raw)?;
    caller.require_any(WRITERS, "deleting tasks")?;
    let current = tasks::get(&state.pool, id)
        .await?
        .ok_or(ApiError::NotFound("task"))?;
    require_writer(&caller, current.execution_mode.as_str())?;
    tasks::delete(&state.pool, id, caller.user()).await?;
    Ok(Json(Deleted200 {
        success: true,
        task_id: id,
        message: "task deleted",
    }))
}

/// A task's schedule
///
/// Next and last run, its state, and totals.
#[utoipa::path(
    get,
    path = "/tasks/{taskId}/schedule",
    operation_id = "getTaskSchedule",
    tag = "tasks",
    params(crate::doc::TaskIdPath),
    responses((status = 200, description = "The schedule state.", body = ScheduleState))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// Page size, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000, default = 50)]
    limit: Option<i64>,
    /// Page cursor: only entries with a smaller `historyId` (pass the
    /// previous `nextBefore`).
    before: Option<i64>,
}

/// One run of a task.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct HistoryEntry {
    /// Row id; pass the last one as `before` to page.
    history_id: i64,
    job_id: Uuid,
    node_id: Option<Uuid>,
    /// The node's name (people read names; the id stays for machines).
    node_name: Option<String>,
    attempt: i32,
    start_time: Option<DateTime<Utc>>,
    end_time: DateTime<Utc>,
    duration_ms: Option<i64>,
    /// How the attempt ended.
    #[schema(value_type = JobStatus)]
    state: String,
    /// False for an attempt that was retried.
    is_final: bool,
    exit_code: Option<i32>,
    #[schema(value_type = taskhost_common::model::TriggeredBy)]
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

/// A page of a task's runs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TaskHistory)]
pub(crate) struct HistoryPage {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    /// Pass as `before` for the next page; null on the last one.
    next_before: Option<i64>,
    history: Vec<HistoryEntry>,
}

/// A task's history
///
/// The task's runs (every attempt), newest first, with bounded output
/// previews; page with `before=<nextBefore>`.
#[utoipa::path(
    get,
    path = "/tasks/{taskId}/history",
    operation_id = "getTaskHistory",
    tag = "tasks",
    params(crate::doc::TaskIdPath, HistoryQuery),
    responses(
        (status = 200, description = "A page of runs.", body = HistoryPage),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn history(
    State(state): State<AppState>,
    _caller: Caller,
    RawPath(raw): RawPath<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
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
    Ok(Json(HistoryPage {
        success: true,
        count: entries.len(),
        next_before: next,
        history: entries,
    }))
}

/// Body of `POST /tasks/{id}/run` (optional): values of the task's
/// parameters, by name; the others take their defaults.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RunNowRequest {
    /// Values by parameter name (README, "Chains and parameters").
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: serde_json::Map<String, Value>,
}

/// A task's run, accepted.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TaskRunAccepted)]
pub(crate) struct Run202 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    task_id: Uuid,
    /// The run's job (with `fanout: all`, the first of them).
    job_id: Uuid,
    /// `job accepted`, or `job recorded as dead: ...` when no node matches.
    message: String,
    /// With `fanout: all` and more than one matching node: every job.
    #[serde(skip_serializing_if = "Option::is_none")]
    job_ids: Option<Vec<Uuid>>,
}

/// Run a task now
///
/// Fires the task once (`triggeredBy: manual`) whatever its schedule.
/// Roles as for changing it.
#[utoipa::path(
    post,
    path = "/tasks/{taskId}/run",
    operation_id = "runTaskNow",
    tag = "tasks",
    params(crate::doc::TaskIdPath),
    request_body(content = Option<RunNowRequest>, description = "Optional (may be empty): values of the task's parameters; the others take their defaults."),
    responses(
        (status = 202, description = "The run's job was accepted.", body = Run202,
         links(
            ("GetJob" = (operation_id = "getJob", parameters(("jobId" = "$response.body#/jobId")),
                         description = "The job, with its status and, once it ended, its output.")),
            ("CancelJob" = (operation_id = "cancelJob", parameters(("jobId" = "$response.body#/jobId")),
                            description = "Cancel it.")),
            ("GetJobOutput" = (operation_id = "getJobOutput", parameters(("jobId" = "$response.body#/jobId")),
                               description = "Its whole stdout or stderr, once it ended."))
         )),
        (status = 403, response = crate::doc::Forbidden),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn run_now(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Run202>), ApiError> {
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
            Ok((
                StatusCode::ACCEPTED,
                Json(Run202 {
                    success: true,
                    task_id: task.task_id,
                    job_id: job_ids.first().copied().unwrap_or_default(),
                    message,
                    job_ids: (job_ids.len() > 1).then(|| job_ids.clone()),
                }),
            ))
        }
        _ => Err(ApiError::Conflict("the task cannot run as stored".into())),
    }
}
