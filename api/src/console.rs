//! The operator console's reads: every job of the system with filters and
//! keyset paging (`GET /jobs`), the system at a glance (`GET /overview`),
//! and who the caller is (`GET /me`). Admins (system_admin, site_admin) see
//! every user's jobs; any other key sees its own.

use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder};
use taskhost_common::model::{ExecutionMode, JobStatus, Role};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Longest page of `GET /jobs`.
pub(crate) const MAX_LIMIT: i64 = 500;
/// Page size of `GET /jobs` when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: i64 = 50;
/// Characters of a command a summary carries.
const COMMAND_PREVIEW: i32 = 300;

/// `GET /jobs` filters; every one is optional and they combine with AND.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct JobFilter {
    /// Comma-separated states (`failed,timed_out`).
    #[param(schema_with = status_list, example = "failed,timed_out")]
    status: Option<String>,
    /// The owner (admins; any other key only ever sees its own).
    user: Option<String>,
    /// Job name prefix.
    name: Option<String>,
    /// The task that fired it.
    #[param(value_type = Option<Uuid>)]
    task: Option<String>,
    /// The node that ran it: its id or its name.
    node: Option<String>,
    /// Target group.
    group: Option<String>,
    /// Target role.
    role: Option<String>,
    /// Execution mode.
    #[param(value_type = Option<ExecutionMode>)]
    mode: Option<String>,
    /// Submitted at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    submitted_after: Option<String>,
    /// Submitted before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    submitted_before: Option<String>,
    /// Finished at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    finished_after: Option<String>,
    /// Finished before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    finished_before: Option<String>,
    /// Text searched (case-insensitive) in the name and the command.
    q: Option<String>,
    /// From a previous page's `nextCursor`.
    cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
}

/// One job in a list: what it is and where it stands, never its output.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobSummary {
    job_id: Uuid,
    job_name: String,
    /// The first 300 characters.
    command: String,
    user_id: String,
    status: JobStatus,
    status_reason: Option<String>,
    execution_mode: ExecutionMode,
    exit_code: Option<i32>,
    attempt: i32,
    priority: i16,
    submitted_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    /// Seconds from start to end.
    runtime: Option<f64>,
    node_id: Option<Uuid>,
    node_name: Option<String>,
    task_id: Option<Uuid>,
    #[schema(value_type = taskhost_common::model::TriggeredBy)]
    triggered_by: String,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
    /// The job this one re-runs, if any.
    rerun_of: Option<Uuid>,
}

/// The columns of a [`JobSummary`], for `FROM jobs j LEFT JOIN nodes n`.
pub(crate) fn summary_select() -> String {
    format!(
        "SELECT j.job_id, j.job_name, left(j.command, {COMMAND_PREVIEW}) AS command, j.user_id,
                j.status, j.status_reason, j.execution_mode, j.exit_code, j.attempt, j.priority,
                j.submitted_at, j.started_at, j.completed_at,
                EXTRACT(EPOCH FROM (j.completed_at - j.started_at))::float8 AS runtime,
                j.claimed_by AS node_id, n.node_name, j.task_id, j.triggered_by,
                j.target_node_id, j.target_node_group, j.target_node_role, j.rerun_of
         FROM jobs j LEFT JOIN nodes n ON n.node_id = j.claimed_by"
    )
}

/// `status` of `GET /jobs`: one or more states, comma-separated (empty
/// entries are skipped).
fn status_list() -> utoipa::openapi::schema::Object {
    let one = JobStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("|");
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some("Comma-separated states (`failed,timed_out`)."))
        .pattern(Some(format!(
            "^(\\s*,)*\\s*({one})\\s*(,\\s*(({one})\\s*)?)*$"
        )))
        .build()
}

fn invalid(field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::Invalid(format!("{field}: {why}"))
}

fn time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid(field, format!("`{raw}` is not an RFC 3339 time ({e})")))
}

/// `LIKE` metacharacters taken literally.
fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// A page position: the last job shown, as `<submitted_at µs>_<job id>`.
fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", at.timestamp_micros(), id.simple())
}

fn decode_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || invalid("cursor", "not a cursor from a previous page's nextCursor");
    let (micros, id) = raw.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

impl JobFilter {
    /// Appends the WHERE clause (always at least the visibility rule).
    fn push_where(&self, caller: &Caller, qb: &mut QueryBuilder<Postgres>) -> Result<(), ApiError> {
        qb.push(" WHERE true");
        if !caller.0.is_admin() {
            qb.push(" AND j.user_id = ")
                .push_bind(caller.user().to_owned());
        }
        if let Some(user) = &self.user {
            qb.push(" AND j.user_id = ").push_bind(user.clone());
        }
        if let Some(raw) = &self.status {
            let states = raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<JobStatus>().map(JobStatus::as_str))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("status", e))?;
            if states.is_empty() {
                return Err(invalid("status", "name at least one state"));
            }
            qb.push(" AND j.status = ANY(").push_bind(states).push(")");
        }
        if let Some(name) = &self.name {
            qb.push(" AND j.job_name LIKE ")
                .push_bind(format!("{}%", like_escape(name)));
        }
        if let Some(raw) = &self.task {
            let id: Uuid = raw.parse().map_err(|_| invalid("task", "not a task id"))?;
            qb.push(" AND j.task_id = ").push_bind(id);
        }
        if let Some(node) = &self.node {
            match node.parse::<Uuid>() {
                Ok(id) => qb.push(" AND j.claimed_by = ").push_bind(id),
                Err(_) => qb
                    .push(" AND j.claimed_by = (SELECT node_id FROM nodes WHERE node_name = ")
                    .push_bind(node.clone())
                    .push(")"),
            };
        }
        if let Some(group) = &self.group {
            qb.push(" AND j.target_node_group = ")
                .push_bind(group.clone());
        }
        if let Some(role) = &self.role {
            qb.push(" AND j.target_node_role = ")
                .push_bind(role.clone());
        }
        if let Some(raw) = &self.mode {
            let mode: ExecutionMode = raw.parse().map_err(|e| invalid("mode", e))?;
            qb.push(" AND j.execution_mode = ").push_bind(mode.as_str());
        }
        for (field, raw, clause) in [
            (
                "submittedAfter",
                &self.submitted_after,
                " AND j.submitted_at >= ",
            ),
            (
                "submittedBefore",
                &self.submitted_before,
                " AND j.submitted_at < ",
            ),
            (
                "finishedAfter",
                &self.finished_after,
                " AND j.completed_at >= ",
            ),
            (
                "finishedBefore",
                &self.finished_before,
                " AND j.completed_at < ",
            ),
        ] {
            if let Some(raw) = raw {
                qb.push(clause).push_bind(time(field, raw)?);
            }
        }
        if let Some(q) = self.q.as_deref().filter(|q| !q.is_empty()) {
            let pattern = format!("%{}%", like_escape(q));
            qb.push(" AND (j.job_name ILIKE ")
                .push_bind(pattern.clone())
                .push(" OR j.command ILIKE ")
                .push_bind(pattern)
                .push(")");
        }
        if let Some(raw) = &self.cursor {
            let (at, id) = decode_cursor(raw)?;
            qb.push(" AND (j.submitted_at, j.job_id) < (")
                .push_bind(at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        Ok(())
    }
}

/// A page of job summaries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobPage)]
pub(crate) struct JobPage {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

/// List jobs
///
/// Job summaries across the system (admins: every user's jobs; others:
/// their own), newest first, filtered and keyset-paged.
#[utoipa::path(
    get,
    path = "/jobs",
    operation_id = "listJobs",
    tag = "jobs",
    params(JobFilter),
    responses(
        (status = 200, description = "A page of jobs.", body = JobPage),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<JobFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let Query(filter) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let mut qb = QueryBuilder::<Postgres>::new(summary_select());
    filter.push_where(&caller, &mut qb)?;
    qb.push(" ORDER BY j.submitted_at DESC, j.job_id DESC LIMIT ")
        .push_bind(limit + 1);
    let mut jobs: Vec<JobSummary> = qb.build_query_as().fetch_all(&state.pool).await?;
    let next = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| encode_cursor(j.submitted_at, j.job_id))
    } else {
        None
    };
    Ok(Json(JobPage {
        success: true,
        count: jobs.len(),
        jobs,
        next_cursor: next,
    }))
}

/// Who the key is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Me)]
pub(crate) struct Me {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    user_id: String,
    roles: Vec<Role>,
    /// Has system_admin or site_admin.
    is_admin: bool,
    /// The key (null for a principal without a stored key).
    key: Option<KeyInfo>,
}

/// An API key, without its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyInfo {
    key_id: Uuid,
    name: String,
    /// The visible start of the key (`thk_<8 hex>`).
    prefix: String,
    created_at: DateTime<Utc>,
}

/// Who am I
///
/// The caller's user, roles and key.
#[utoipa::path(
    get,
    path = "/me",
    operation_id = "getMe",
    tag = "console",
    responses((status = 200, description = "The caller.", body = Me))
)]
pub(crate) async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Me>, ApiError> {
    let key: Option<(Uuid, String, String, DateTime<Utc>)> = match caller.0.key_id {
        Some(id) => {
            sqlx::query_as(
                "SELECT key_id, name, prefix, created_at FROM api_keys WHERE key_id = $1",
            )
            .bind(id)
            .fetch_optional(&state.pool)
            .await?
        }
        None => None,
    };
    Ok(Json(Me {
        success: true,
        user_id: caller.user().to_owned(),
        roles: caller.0.roles.to_vec(),
        is_admin: caller.0.is_admin(),
        key: key.map(|(key_id, name, prefix, created_at)| KeyInfo {
            key_id,
            name,
            prefix,
            created_at,
        }),
    }))
}

/// Unfinished states (counted exactly, all time).
const UNFINISHED: [&str; 3] = ["pending", "queued", "running"];
/// States of a job that ended badly.
const UNHAPPY: [&str; 3] = ["failed", "timed_out", "dead"];

/// One bucket of the throughput chart: final runs that ended in it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct Bucket {
    /// Its start.
    at: DateTime<Utc>,
    succeeded: i64,
    failed: i64,
}

/// Final runs per `unit` ('minute' or 'hour') over the last `n` of them,
/// zeros included, oldest first.
async fn throughput(
    state: &AppState,
    user: Option<&str>,
    unit: &str,
    n: i64,
) -> Result<Vec<Bucket>, ApiError> {
    let (join, user_clause) = match user {
        Some(_) => ("JOIN jobs j ON j.job_id = h.job_id", "AND j.user_id = $2"),
        None => ("", "AND $2::text IS NULL"),
    };
    let sql = format!(
        "SELECT date_trunc('{unit}', h.end_time) AS at,
                count(*) FILTER (WHERE h.state = 'succeeded') AS succeeded,
                count(*) FILTER (WHERE h.state IN ('failed', 'timed_out', 'dead')) AS failed
         FROM task_history h {join}
         WHERE h.is_final AND h.end_time >= date_trunc('{unit}', now()) - make_interval(secs => $1)
           {user_clause}
         GROUP BY 1"
    );
    let step = if unit == "minute" { 60 } else { 3600 };
    let rows: Vec<(DateTime<Utc>, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(((n - 1) * step) as f64)
        .bind(user)
        .fetch_all(&state.pool)
        .await?;
    let now: DateTime<Utc> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT date_trunc('{unit}', now())"
    )))
    .fetch_one(&state.pool)
    .await?;
    Ok((0..n)
        .rev()
        .map(|k| {
            let at = now - chrono::Duration::seconds(k * step);
            let (succeeded, failed) = rows
                .iter()
                .find(|r| r.0 == at)
                .map_or((0, 0), |r| (r.1, r.2));
            Bucket {
                at,
                succeeded,
                failed,
            }
        })
        .collect())
}

/// Jobs by state: unfinished ones exactly, finished ones that ended in
/// the last 24 hours; every state present, zeros included.
async fn by_state(
    state: &AppState,
    user: Option<&str>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let unfinished: Vec<(String, i64)> = match user {
        None => {
            sqlx::query_as(
                "SELECT status, count(*) FROM jobs
                 WHERE status IN ('pending', 'queued', 'running') GROUP BY status",
            )
            .fetch_all(&state.pool)
            .await?
        }
        Some(u) => {
            sqlx::query_as(
                "SELECT status, count(*) FROM jobs
                 WHERE user_id = $1 AND status IN ('pending', 'queued', 'running') GROUP BY status",
            )
            .bind(u)
            .fetch_all(&state.pool)
            .await?
        }
    };
    let finished: Vec<(String, i64)> =
        match user {
            None => {
                sqlx::query_as(
                    "SELECT state, count(*) FROM task_history
                 WHERE is_final AND end_time >= now() - interval '24 hours' GROUP BY state",
                )
                .fetch_all(&state.pool)
                .await?
            }
            Some(u) => sqlx::query_as(
                "SELECT h.state, count(*) FROM task_history h JOIN jobs j ON j.job_id = h.job_id
                 WHERE h.is_final AND h.end_time >= now() - interval '24 hours' AND j.user_id = $1
                 GROUP BY h.state",
            )
            .bind(u)
            .fetch_all(&state.pool)
            .await?,
        };
    let mut out = serde_json::Map::new();
    for s in JobStatus::ALL {
        let name = s.as_str();
        let source = if UNFINISHED.contains(&name) {
            &unfinished
        } else {
            &finished
        };
        let n = source
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, n)| *n);
        out.insert(name.to_owned(), Value::from(n));
    }
    Ok(out)
}

/// The schema of `jobsByState`: a count for every state.
fn by_state_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let mut b = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Jobs in each state: unfinished ones (pending, queued, running) exactly, \
             finished ones that ended in the last `finishedWindowHours`.",
        ))
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ));
    for s in JobStatus::ALL {
        b = b
            .property(
                s.as_str(),
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::schema::SchemaFormat::KnownFormat(
                        utoipa::openapi::schema::KnownFormat::Int64,
                    )))
                    .minimum(Some(0)),
            )
            .required(s.as_str());
    }
    b.build()
}

/// The system at a glance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Overview)]
pub(crate) struct Overview {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    /// `all` for admins, `own` for anyone else (only their jobs counted).
    #[schema(schema_with = scope_schema)]
    scope: &'static str,
    #[schema(schema_with = by_state_schema)]
    jobs_by_state: serde_json::Map<String, Value>,
    /// The window of the finished counts, in hours (24).
    finished_window_hours: i64,
    throughput: Throughput,
    /// The job waiting longest to start, if any.
    oldest_waiting: Option<OldestWaiting>,
    /// The work queues the active nodes consume.
    queues: Vec<QueueDepth>,
    /// Nodes active now or seen in the last hour.
    nodes: Vec<NodeLoad>,
    /// The newest failed, timed out or dead jobs (at most 10).
    recent_failures: Vec<JobSummary>,
    scheduler: SchedulerHealth,
}

fn scope_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["all", "own"]))
        .build()
}

/// Final runs per minute (last 60) and per hour (last 24), oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct Throughput {
    per_minute: Vec<Bucket>,
    per_hour: Vec<Bucket>,
}

/// The job waiting longest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct OldestWaiting {
    job_id: Uuid,
    submitted_at: DateTime<Utc>,
    age_seconds: f64,
}

/// A work queue's depth (null when the broker could not say).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct QueueDepth {
    queue: String,
    messages: Option<u32>,
    consumers: Option<u32>,
}

/// A node's slots.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct NodeLoad {
    node_id: Uuid,
    node_name: String,
    node_group: String,
    node_role: String,
    #[schema(schema_with = crate::nodes::node_status)]
    status: &'static str,
    slots_busy: i64,
    slots_total: i32,
    heartbeat_age_seconds: f64,
}

/// The scheduler's health.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct SchedulerHealth {
    enabled_tasks: i64,
    /// The next fire time of any enabled task.
    next_fire_at: Option<DateTime<Utc>>,
    /// The task that fires next.
    next_task: Option<NextTask>,
    /// Enabled tasks whose next run is past the misfire grace.
    overdue_tasks: i64,
    /// Fire times missed, all time.
    misfires: i64,
    last_misfire_at: Option<DateTime<Utc>>,
}

/// A task by id and name.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct NextTask {
    task_id: Uuid,
    task_name: String,
}

/// The work queues the active nodes consume, each once.
async fn work_queues(state: &AppState) -> Result<Vec<String>, ApiError> {
    let nodes: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT node_id, node_group, node_role FROM nodes WHERE is_active ORDER BY node_name",
    )
    .fetch_all(&state.pool)
    .await?;
    let names = state.publisher.names();
    let mut queues = vec![names.work_queue("any")];
    for (id, group, role) in nodes {
        for key in [
            format!("node.{id}"),
            format!("group.{group}"),
            format!("role.{role}"),
            format!("group.{group}.role.{role}"),
        ] {
            let q = names.work_queue(&key);
            if !queues.contains(&q) {
                queues.push(q);
            }
        }
    }
    Ok(queues)
}

/// A node's id, name, group, role, liveness, slots, busy slots and
/// heartbeat age.
type NodeSlots = (Uuid, String, String, String, bool, i32, i64, f64);

/// The system at a glance
///
/// Jobs by state, throughput per minute and per hour, the oldest waiting
/// job, queue depths, busy slots, recent failures and the scheduler's
/// health. Admins see every user's jobs; any other key its own (nodes,
/// queues and the scheduler are the same for everyone).
#[utoipa::path(
    get,
    path = "/overview",
    operation_id = "getOverview",
    tag = "console",
    responses((status = 200, description = "The overview.", body = Overview))
)]
pub(crate) async fn overview(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Overview>, ApiError> {
    let user = (!caller.0.is_admin()).then(|| caller.user().to_owned());
    let user = user.as_deref();
    let by_state = by_state(&state, user).await?;
    let per_minute = throughput(&state, user, "minute", 60).await?;
    let per_hour = throughput(&state, user, "hour", 24).await?;

    let oldest: Option<(Uuid, DateTime<Utc>, f64)> = sqlx::query_as(
        "SELECT job_id, submitted_at, extract(epoch FROM now() - submitted_at)::float8
         FROM jobs WHERE status IN ('pending', 'queued') AND ($1::text IS NULL OR user_id = $1)
         ORDER BY submitted_at LIMIT 1",
    )
    .bind(user)
    .fetch_optional(&state.pool)
    .await?;

    let queue_names = work_queues(&state).await?;
    let depths = state.publisher.queue_depths(&queue_names).await;
    let queues: Vec<QueueDepth> = queue_names
        .iter()
        .zip(depths)
        .map(|(q, d)| QueueDepth {
            queue: q.clone(),
            messages: d.map(|d| d.0),
            consumers: d.map(|d| d.1),
        })
        .collect();

    let nodes: Vec<NodeSlots> = sqlx::query_as(
        "SELECT n.node_id, n.node_name, n.node_group, n.node_role, n.is_active,
                n.max_concurrent_tasks,
                (SELECT count(*) FROM jobs j WHERE j.status = 'running' AND j.claimed_by = n.node_id),
                extract(epoch FROM now() - n.last_heartbeat)::float8
         FROM nodes n
         WHERE n.is_active OR n.last_heartbeat > now() - interval '1 hour'
         ORDER BY n.is_active DESC, n.node_name",
    )
    .fetch_all(&state.pool)
    .await?;
    let nodes: Vec<NodeLoad> = nodes
        .into_iter()
        .map(
            |(node_id, node_name, node_group, node_role, active, slots_total, slots_busy, age)| {
                NodeLoad {
                    node_id,
                    node_name,
                    node_group,
                    node_role,
                    status: if active { "active" } else { "dead" },
                    slots_busy,
                    slots_total,
                    heartbeat_age_seconds: age,
                }
            },
        )
        .collect();

    // The newest few of each unhappy state (each from its partial index),
    // then the newest of those.
    let mut qb = QueryBuilder::<Postgres>::new("SELECT * FROM (");
    for (i, s) in UNHAPPY.iter().enumerate() {
        if i > 0 {
            qb.push(" UNION ALL ");
        }
        qb.push("(")
            .push(summary_select())
            .push(" WHERE j.status = ")
            .push_bind(*s);
        if let Some(u) = user {
            qb.push(" AND j.user_id = ").push_bind(u.to_owned());
        }
        qb.push(" ORDER BY j.submitted_at DESC, j.job_id DESC LIMIT 10)");
    }
    qb.push(") f ORDER BY submitted_at DESC, job_id DESC LIMIT 10");
    let failures: Vec<JobSummary> = qb.build_query_as().fetch_all(&state.pool).await?;

    let grace = state.settings.scheduler.misfire_grace_secs as f64;
    let sched: (i64, Option<DateTime<Utc>>, i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE t.enabled),
                min(s.next_run) FILTER (WHERE t.enabled),
                count(*) FILTER (WHERE t.enabled AND s.next_run < now() - make_interval(secs => $1)),
                coalesce(sum(s.misfire_count), 0)::int8,
                max(s.last_misfire_at)
         FROM tasks t JOIN task_schedule s ON s.task_id = t.task_id",
    )
    .bind(grace)
    .fetch_one(&state.pool)
    .await?;
    let next_task: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT t.task_id, t.task_name FROM tasks t JOIN task_schedule s ON s.task_id = t.task_id
         WHERE t.enabled AND s.next_run IS NOT NULL ORDER BY s.next_run LIMIT 1",
    )
    .fetch_optional(&state.pool)
    .await?;

    Ok(Json(Overview {
        success: true,
        scope: if user.is_some() { "own" } else { "all" },
        jobs_by_state: by_state,
        finished_window_hours: 24,
        throughput: Throughput {
            per_minute,
            per_hour,
        },
        oldest_waiting: oldest.map(|(job_id, submitted_at, age_seconds)| OldestWaiting {
            job_id,
            submitted_at,
            age_seconds,
        }),
        queues,
        nodes,
        recent_failures: failures,
        scheduler: SchedulerHealth {
            enabled_tasks: sched.0,
            next_fire_at: sched.1,
            next_task: next_task.map(|(task_id, task_name)| NextTask { task_id, task_name }),
            overdue_tasks: sched.2,
            misfires: sched.3,
            last_misfire_at: sched.4,
        },
    }))
}

/// The stored spec of a job, to run it again.
#[derive(Debug, sqlx::FromRow)]
struct StoredSpec {
    job_name: String,
    command: String,
    description: String,
    execution_mode: ExecutionMode,
    timeout_seconds: Option<i32>,
    priority: i16,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
    fanout: taskhost_common::model::Fanout,
    env: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    secret_env: Option<String>,
    limits: Option<sqlx::types::Json<taskhost_common::model::JobLimits>>,
}

/// A re-run, accepted.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RerunAccepted)]
pub(crate) struct Rerun202 {
    /// The job it re-runs.
    rerun_of: Uuid,
    #[serde(flatten)]
    accepted: crate::jobs::Accepted202,
}

/// Re-run a job
///
/// A new job with the same spec (secret environment and limits included),
/// owned by the caller, linked to the original (`rerunOf`). Who may see the
/// original (its owner, an admin) may re-run it, if their roles allow its
/// execution mode, as for a submission.
#[utoipa::path(
    post,
    path = "/jobs/{jobId}/rerun",
    operation_id = "rerunJob",
    tag = "jobs",
    params(crate::doc::JobIdPath),
    responses(
        (status = 202, description = "The new job was accepted.", body = Rerun202),
        (status = 403, response = crate::doc::Forbidden),
    )
)]
pub(crate) async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    crate::path::RawPath(raw): crate::path::RawPath<String>,
) -> Result<(axum::http::StatusCode, Json<Rerun202>), ApiError> {
    let original: Uuid = raw.parse().map_err(|_| ApiError::NotFound("job"))?;
    let stored: Option<StoredSpec> = sqlx::query_as(
        "SELECT job_name, command, description, execution_mode, timeout_seconds, priority,
                target_node_id, target_node_group, target_node_role, fanout, env,
                secret_env, limits
         FROM jobs WHERE job_id = $1 AND (user_id = $2 OR $3)",
    )
    .bind(original)
    .bind(caller.user())
    .bind(caller.0.is_admin())
    .fetch_optional(&state.pool)
    .await?;
    let stored = stored.ok_or(ApiError::NotFound("job"))?;
    caller.require_any(
        stored.execution_mode.allowed_roles(),
        &format!("execution mode `{}`", stored.execution_mode),
    )?;
    let spec = taskhost_common::model::JobSpec {
        job_name: stored.job_name,
        command: stored.command,
        description: stored.description,
        execution_mode: stored.execution_mode,
        timeout_seconds: stored.timeout_seconds,
        priority: stored.priority,
        target: taskhost_common::model::Target {
            node_id: stored.target_node_id,
            node_group: stored.target_node_group,
            node_role: stored.target_node_role,
            fanout: stored.fanout,
        },
        env: stored.env.0,
        // Sealed as stored: the re-run opens them like the original.
        secret_env: stored.secret_env,
        limits: stored.limits.map(|l| l.0),
    };
    let accepted = taskhost_common::jobs::accept(
        &state.pool,
        taskhost_common::jobs::NewJob {
            job_id: Uuid::now_v7(),
            user_id: caller.user(),
            spec: &spec,
            triggered_by: taskhost_common::model::TriggeredBy::Manual,
            idempotency_key: None,
            request_hash: None,
            changed_by: caller.user(),
            task: None,
            rerun_of: Some(original),
        },
    )
    .await?;
    let taskhost_common::jobs::Accepted::Created {
        job_ids,
        outbox,
        status,
    } = accepted
    else {
        return Err(ApiError::Internal("a re-run was not created".into()));
    };
    let message = crate::jobs::dispatch(&state, caller.user(), &job_ids, &outbox, status).await;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(Rerun202 {
            rerun_of: original,
            accepted: crate::jobs::Accepted202::new(&job_ids, message, spec.execution_mode),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_764_500_000_123_456).expect("time");
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).ok(), Some((at, id)));
        for bad in ["", "x", "12_nope", "nope_0193", "99999999999999999999_0"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn like_patterns_take_metacharacters_literally() {
        assert_eq!(like_escape("50%_a\\b"), "50\\%\\_a\\\\b");
    }
}
