//! `/api/v1/jobs`: submit, results, one job, delete, cancel.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use taskhost_common::amqp::Outgoing;
use taskhost_common::changelog;
use taskhost_common::jobs::{self, Accepted, NewJob};
use taskhost_common::messages::{CONTROL_V1, Control};
use taskhost_common::model::{ExecutionMode, JobStatus, SubmitRequest, TriggeredBy};
use taskhost_common::store::{
    self,
    cancel::{Cancelled, Deleted},
};
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::output::{PREVIEW_COLUMNS, PreviewColumns, Previews};
use crate::path::RawPath;
use crate::state::AppState;

/// Longest `Idempotency-Key` accepted.
const IDEMPOTENCY_KEY_MAX: usize = 200;

/// Parses a JSON body, telling 400 (not JSON) from 422 (wrong fields).
/// A string holding NUL (the escape `\u0000`) is refused with 422 naming its
/// field, for every body (see `taskhost_common::text`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every body is an object: serde would also read a struct from an
    // array of its fields in order, which the contract does not allow.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(ApiError::Invalid("body must be a JSON object".into())),
            Err(e) => Err(ApiError::BadRequest(format!("body is not valid JSON: {e}"))),
        };
    }
    if taskhost_common::text::may_hold_nul(body) {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => {
                if let Some(path) = taskhost_common::text::nul_path(&v) {
                    return Err(ApiError::Invalid(taskhost_common::text::nul_refusal(&path)));
                }
            }
            Err(e) => return Err(ApiError::BadRequest(format!("body is not valid JSON: {e}"))),
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    match T::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        Ok(v) => Ok(v),
        Err(e) if e.is_syntax() || e.is_eof() => {
            Err(ApiError::BadRequest(format!("body is not valid JSON: {e}")))
        }
        Err(e) => Err(ApiError::Invalid(format!("invalid body: {e}"))),
    }
}

/// The answer to an accepted job (`POST /jobs/submit`; a task's
/// `POST /tasks/{taskId}/run` and a `POST /jobs/{jobId}/rerun` add their
/// own fields).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SubmitAccepted, example = json!({
    "success": true,
    "jobId": "0193a5b2-7c1d-7e4f-9a2b-3c4d5e6f7a8b",
    "message": "job accepted",
    "executionMode": "pool"
}))]
pub(crate) struct Accepted202 {
    #[schema(schema_with = crate::doc::always_true)]
    pub(crate) success: bool,
    /// The job (with `fanout: all`, the first of them).
    pub(crate) job_id: Uuid,
    /// `job accepted`; `job already accepted for this Idempotency-Key` for
    /// a repeat; `job recorded as dead: ...` when no node matches.
    pub(crate) message: String,
    /// The canonical mode it runs in.
    pub(crate) execution_mode: ExecutionMode,
    /// With `fanout: all` and more than one matching node: every job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) job_ids: Option<Vec<Uuid>>,
}

impl Accepted202 {
    pub(crate) fn new(job_ids: &[Uuid], message: String, execution_mode: ExecutionMode) -> Self {
        Accepted202 {
            success: true,
            job_id: job_ids.first().copied().unwrap_or_default(),
            message,
            execution_mode,
            job_ids: (job_ids.len() > 1).then(|| job_ids.to_vec()),
        }
    }
}

/// Submit a job
///
/// Accepts a job and queues it for a worker. Roles: for execution mode
/// `pool` or `background`, one of debug, task_manager, system_admin,
/// site_admin; for `inline`, debug only (403 otherwise). The body is checked
/// before the role (422 first) and is read as JSON whatever the
/// Content-Type. With `target.fanout: all` one job is created per active
/// matching node (all ids in `jobIds`); with no matching node the job is
/// recorded as `dead` and still answered 202. See the `Idempotency-Key`
/// header for safe retries.
#[utoipa::path(
    post,
    path = "/jobs/submit",
    operation_id = "submitJob",
    tag = "jobs",
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200, pattern = "^[\t -~]+$",
         description = "Makes a submission safe to retry: 1 to 200 visible ASCII characters, scoped to the caller's user. A repeat with the same key and the same body (as JSON: whitespace and key order do not count) answers 202 with the original `jobId`; the same key with a different body answers 409. An empty, too long or non-ASCII key answers 400.")
    ),
    request_body(content = SubmitRequest, description = "The job. Unknown fields are refused with 422."),
    responses(
        (status = 202, description = "Accepted (also for an Idempotency-Key repeat).", body = Accepted202,
         links(
            ("GetJob" = (operation_id = "getJob", parameters(("jobId" = "$response.body#/jobId")),
                         description = "The job, with its status and, once it ended, its output.")),
            ("CancelJob" = (operation_id = "cancelJob", parameters(("jobId" = "$response.body#/jobId")),
                            description = "Cancel it.")),
            ("GetJobOutput" = (operation_id = "getJobOutput", parameters(("jobId" = "$response.body#/jobId")),
                               description = "Its whole stdout or stderr, once it ended.")),
            ("DeleteJob" = (operation_id = "deleteJob", parameters(("jobId" = "$response.body#/jobId")),
                            description = "Delete its result, once it ended."))
         )),
        (status = 403, response = crate::doc::Forbidden),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let span = submit_span(&headers);
    let result = submit_inner(&state, &caller, &headers, &body)
        .instrument(span.clone())
        .await;
    if !span.is_disabled() {
        let code = result.as_ref().map_or_else(
            |e| e.status_and_code().0.as_u16(),
            |(status, _)| status.as_u16(),
        );
        span.record("http.response.status_code", code);
    }
    // Accepted jobs are counted where they commit (the store), with the
    // scheduler's and the ingress's.
    if result.is_err() {
        crate::metrics::rejected();
    }
    result
}

async fn submit_inner(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Json<Accepted202>), ApiError> {
    let request: SubmitRequest = parse_json(body)?;
    let key = state.settings.secrets.key();
    let spec = request
        .validate_with(key.as_ref())
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    caller.require_any(
        spec.execution_mode.allowed_roles(),
        &format!("execution mode `{}`", spec.execution_mode),
    )?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| {
                ApiError::BadRequest("Idempotency-Key must be visible ASCII".into())
            })?;
            if v.is_empty() || v.len() > IDEMPOTENCY_KEY_MAX {
                return Err(ApiError::BadRequest(format!(
                    "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
                )));
            }
            Some(v.to_owned())
        }
    };
    // The hash is of the parsed request, so the same JSON with other
    // whitespace or key order is the same request.
    let request_hash = idempotency_key.as_ref().map(|_| {
        let canonical =
            serde_json::to_vec(&serde_json::from_slice::<Value>(body).unwrap_or(Value::Null))
                .unwrap_or_default();
        // A body with secret values is hashed with the secrets key, so the
        // stored hash cannot be used to guess them.
        match (&spec.secret_env, &key) {
            (Some(_), Some(key)) => key.keyed_hash(&canonical),
            _ => hex::encode(Sha256::digest(canonical)),
        }
    });
    let job_id = Uuid::now_v7();
    // Tracing: the work message's `publish` span, a child of the submit
    // span; its traceparent is stored with the outbox row.
    let publish = publish_span(state, &spec, job_id);
    let accepted = if jobs::PlainJob::fits(&spec, idempotency_key.as_deref()) {
        // The bulk of submissions: accepted together with whatever else
        // arrives at the same moment.
        let plain = jobs::PlainJob {
            job_id,
            user_id: caller.user().to_owned(),
            spec: spec.clone(),
            triggered_by: TriggeredBy::Api,
            changed_by: caller.user().to_owned(),
            traceparent: taskhost_common::telemetry::traceparent(&publish),
        };
        state.accepter.call(plain).await.map_err(|error| {
            match error.strip_prefix(taskhost_common::db::TRANSIENT) {
                Some(error) => {
                    tracing::warn!(%error, "accepting a job failed: postgres unavailable");
                    ApiError::Unavailable(crate::error::DATABASE)
                }
                None => ApiError::Internal(format!("accepting a job failed: {error}")),
            }
        })?
    } else {
        jobs::accept(
            &state.pool,
            NewJob {
                job_id,
                user_id: caller.user(),
                spec: &spec,
                triggered_by: TriggeredBy::Api,
                idempotency_key: idempotency_key.as_deref(),
                request_hash: request_hash.as_deref(),
                changed_by: caller.user(),
                task: None,
                rerun_of: None,
            },
        )
        .instrument(publish.clone())
        .await?
    };
    match accepted {
        Accepted::Conflict => Err(ApiError::Conflict(
            "Idempotency-Key was already used with a different request body".into(),
        )),
        Accepted::Duplicate { job_id } => {
            let mode: ExecutionMode =
                sqlx::query_scalar("SELECT execution_mode FROM jobs WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_one(&state.pool)
                    .await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(Accepted202::new(
                    &[job_id],
                    "job already accepted for this Idempotency-Key".to_owned(),
                    mode,
                )),
            ))
        }
        Accepted::Created {
            job_ids,
            outbox,
            status,
        } => {
            // Fault tests: the api dies between the commit and its answer,
            // or leaves the publish to the outbox relay.
            taskhost_common::failpoint::hit("api.submit.after_commit");
            let message = if taskhost_common::failpoint::hit("api.submit.skip_publish") {
                "accepted (failpoint: publish left to the relay)".to_owned()
            } else {
                dispatch(state, caller.user(), &job_ids, &outbox, status)
                    .instrument(publish)
                    .await
            };
            Ok((
                StatusCode::ACCEPTED,
                Json(Accepted202::new(&job_ids, message, spec.execution_mode)),
            ))
        }
    }
}

/// Tracing (README, "Tracing"): the server span of one `POST
/// /jobs/submit`, a child of the request's `traceparent` (and
/// `tracestate`) when it sent one, else a new trace's root. Disabled when
/// tracing is off.
fn submit_span(headers: &HeaderMap) -> tracing::Span {
    use taskhost_common::telemetry;
    if !telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "job.submit",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/api/v1/jobs/submit",
        http.response.status_code = tracing::field::Empty,
        job.id = tracing::field::Empty,
        job.name = tracing::field::Empty,
        job.mode = tracing::field::Empty,
    );
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    telemetry::set_parent(
        &span,
        header(telemetry::TRACEPARENT),
        header(telemetry::TRACESTATE),
    );
    span
}

/// The `publish` span of a submission's work message (see
/// [`submit_span`]), with the job's attributes recorded on the submit span.
fn publish_span(
    state: &AppState,
    spec: &taskhost_common::model::JobSpec,
    job_id: Uuid,
) -> tracing::Span {
    if !taskhost_common::telemetry::enabled() {
        return tracing::Span::none();
    }
    let submit = tracing::Span::current();
    submit.record("job.id", tracing::field::display(job_id));
    submit.record("job.name", spec.job_name.as_str());
    submit.record("job.mode", spec.execution_mode.as_str());
    taskhost_common::telemetry::publish_span(
        &state.publisher.names().work(),
        &spec.target.routing_key(),
        job_id,
    )
}

/// Publishes what an accepted submission committed (the fast path) and says
/// in a few words where the job stands. A job the broker could not take now
/// is still accepted: the outbox relay publishes it. A job recorded `dead`
/// (no node matches) only gets its event.
pub(crate) async fn dispatch(
    state: &AppState,
    user: &str,
    job_ids: &[Uuid],
    outbox: &[jobs::OutboxMessage],
    status: JobStatus,
) -> String {
    if status == JobStatus::Dead {
        let events: Vec<_> = job_ids
            .iter()
            .map(|id| jobs::job_event(*id, JobStatus::Dead, 0, None, None))
            .collect();
        jobs::publish_events(&state.publisher, &events).await;
        return format!("job recorded as dead: {}", jobs::NO_NODE_REASON);
    }
    // The job is committed: answer now, and publish in the background with
    // whatever else was accepted meanwhile. What the broker does not
    // confirm stays in the outbox for the relay.
    let batcher = state.batcher.clone();
    let (rows, user, count) = (outbox.to_vec(), user.to_owned(), outbox.len());
    // Tracing: the caller's `publish` span lasts until the broker confirms.
    let span = if taskhost_common::telemetry::enabled() {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    };
    tokio::spawn(async move {
        match batcher.publish(rows, &user).await {
            Ok(n) => crate::metrics::published(n, count - n),
            Err(error) => {
                tracing::warn!(%error, "marking published jobs failed; the relay will finish them");
                crate::metrics::published(0, count);
            }
        }
    }.instrument(span));
    "job accepted".to_owned()
}

/// The fields every view of a job shows.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobFields {
    job_id: Uuid,
    job_name: String,
    command: String,
    description: String,
    #[schema(value_type = ExecutionMode)]
    execution_mode: String,
    #[schema(value_type = JobStatus)]
    status: String,
    /// Why the job is in its status (a timeout, a cancel, no node), when
    /// known.
    status_reason: Option<String>,
    /// Whether it succeeded; null until it ends.
    success: Option<bool>,
    /// Exit status of the command, when it ran.
    exit_code: Option<i32>,
    /// When the current attempt started.
    #[sqlx(rename = "started_at")]
    date_started: Option<DateTime<Utc>>,
    /// When the job ended.
    #[sqlx(rename = "completed_at")]
    date_completed: Option<DateTime<Utc>>,
    submitted_at: DateTime<Utc>,
    /// Run time of the final attempt, in seconds.
    runtime: Option<f64>,
    /// The worker cut the captured stdout or stderr at
    /// `worker.output_cap_bytes` (the rest was never stored).
    output_truncated: Option<bool>,
    /// The node that ran (or runs) it.
    node_id: Option<Uuid>,
    /// Attempt number (retries of task runs increase it).
    attempt: i32,
    priority: i16,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
    timeout_seconds: Option<i32>,
    /// The owner.
    user_id: String,
    /// The name of `node_id`'s node.
    node_name: Option<String>,
    /// The task that fired it.
    task_id: Option<Uuid>,
    /// api, queue, schedule or manual.
    #[schema(value_type = TriggeredBy)]
    triggered_by: String,
    /// The job it re-runs.
    rerun_of: Option<Uuid>,
    /// The upstream run that fired it (`triggeredBy` dependency).
    upstream_job_id: Option<Uuid>,
    /// The job's own limits (`{cpuSeconds, memoryMb, maxFiles,
    /// maxProcesses}`, each only when set), or null.
    #[schema(value_type = Option<taskhost_common::model::JobLimits>)]
    limits: Option<Value>,
    /// The sealed secret environment (never shown).
    #[serde(skip)]
    secret_env: Option<String>,
    /// Its names, each with `***` (README, "Secrets"); null when none.
    #[sqlx(skip)]
    #[serde(rename = "secretEnv")]
    #[schema(schema_with = crate::doc::secret_names)]
    secret_env_names: Option<Value>,
}

impl JobFields {
    /// Fills in the masked names of the job's secret environment.
    fn mask(&mut self, key: Option<&taskhost_common::secrets::SecretKey>) {
        self.secret_env_names = self
            .secret_env
            .as_deref()
            .map(|sealed| taskhost_common::secrets::masked(key, sealed));
    }
}

/// `GET /jobs/{id}`: the job with its whole output, as it always was.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[schema(as = Job)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobView {
    #[sqlx(flatten)]
    #[serde(flatten)]
    fields: JobFields,
    /// The final attempt's whole stdout followed by its stderr (each up to
    /// `worker.output_cap_bytes`); null until an attempt has ended.
    /// `GET /api/v1/jobs/{jobId}/output` streams either alone.
    #[sqlx(skip)]
    output: Option<String>,
    /// The final attempt's whole stderr alone, when not empty.
    #[sqlx(skip)]
    error: Option<String>,
    #[serde(skip)]
    raw_output: Option<Vec<u8>>,
    #[serde(skip)]
    raw_error: Option<Vec<u8>>,
}

/// A `/jobs/results` entry: the job with bounded previews of stdout and
/// stderr and their sizes (the whole streams: `GET /jobs/{id}/output`).
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobResult)]
pub(crate) struct JobEntry {
    #[sqlx(flatten)]
    #[serde(flatten)]
    fields: JobFields,
    #[sqlx(skip)]
    #[serde(flatten)]
    out: Previews,
    #[sqlx(flatten)]
    #[serde(skip)]
    raw: PreviewColumns,
}

const FIELDS_SELECT: &str =
    "SELECT j.job_id, j.job_name, j.command, j.description, j.execution_mode, j.status,
            j.status_reason, j.success, j.exit_code, j.started_at, j.completed_at, j.submitted_at,
            h.duration_ms::float8 / 1000 AS runtime,
            h.output_truncated, coalesce(h.node_id, j.claimed_by) AS node_id, j.attempt, j.priority,
            j.target_node_id, j.target_node_group, j.target_node_role, j.timeout_seconds,
            j.user_id, n.node_name, j.task_id, j.triggered_by, j.rerun_of, j.upstream_job_id, j.secret_env, j.limits";

const FROM_JOBS: &str = "FROM jobs j LEFT JOIN task_history h ON h.job_id = j.job_id AND h.is_final
     LEFT JOIN nodes n ON n.node_id = coalesce(h.node_id, j.claimed_by)";

fn text_of(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|b| match changelog::gunzip(b) {
        Ok(raw) => match String::from_utf8(raw) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        },
        Err(e) => format!("<output could not be decoded: {e}>"),
    })
}

impl JobView {
    fn finish(mut self) -> Self {
        let out = text_of(self.raw_output.take().as_deref());
        let err = text_of(self.raw_error.take().as_deref());
        self.output = match (out, &err) {
            (Some(mut o), Some(e)) => {
                o.push_str(e);
                Some(o)
            }
            (Some(o), None) => Some(o),
            (None, Some(e)) => Some(e.clone()),
            (None, None) => None,
        };
        self.error = err.filter(|e| !e.is_empty());
        self
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ResultsQuery {
    /// How many results to return, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    max_results: Option<i64>,
}

/// Your finished jobs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = JobResults)]
pub(crate) struct Results {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    count: usize,
    results: Vec<JobEntry>,
}

/// List your finished jobs
///
/// Your own finished jobs, newest first, each with bounded previews of its
/// stdout and stderr (at most 4096 bytes each) and their sizes; the whole
/// streams come from `GET /jobs/{jobId}/output`.
#[utoipa::path(
    get,
    path = "/jobs/results",
    operation_id = "listJobResults",
    tag = "jobs",
    params(ResultsQuery),
    responses(
        (status = 200, description = "Your finished jobs.", body = Results),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn results(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ResultsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Results>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = q.max_results.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid(
            "maxResults must be between 1 and 1000".into(),
        ));
    }
    let sql = format!(
        "{FIELDS_SELECT}, {PREVIEW_COLUMNS} {FROM_JOBS}
         WHERE j.user_id = $1 AND j.completed_at IS NOT NULL
         ORDER BY j.completed_at DESC, j.job_id DESC LIMIT $2"
    );
    // Row by row, so only one row's slices are held at a time.
    let mut rows = sqlx::query_as::<_, JobEntry>(sqlx::AssertSqlSafe(sql))
        .bind(caller.user())
        .bind(limit)
        .fetch(&state.pool);
    let mut results = Vec::new();
    let key = state.settings.secrets.key();
    while let Some(mut entry) = rows.try_next().await? {
        entry.out = entry.raw.previews();
        entry.fields.mask(key.as_ref());
        results.push(entry);
    }
    Ok(Json(Results {
        success: true,
        count: results.len(),
        results,
    }))
}

/// Loads a job the caller may see (its owner, or an admin), with its whole
/// output.
async fn load_visible(
    state: &AppState,
    caller: &Caller,
    job_id: Uuid,
) -> Result<JobView, ApiError> {
    let sql = format!(
        "{FIELDS_SELECT}, h.output AS raw_output, h.error AS raw_error
         {FROM_JOBS}
         WHERE j.job_id = $1 AND (j.user_id = $2 OR $3)"
    );
    let row: Option<JobView> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .bind(caller.user())
        .bind(caller.0.is_admin())
        .fetch_optional(&state.pool)
        .await?;
    let key = state.settings.secrets.key();
    row.map(|mut view| {
        view.fields.mask(key.as_ref());
        view.finish()
    })
    .ok_or(ApiError::NotFound("job"))
}

/// Fails with 404 unless the caller may act on the job: its owner, or an
/// admin.
async fn check_visible(state: &AppState, caller: &Caller, job_id: Uuid) -> Result<(), ApiError> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM jobs WHERE job_id = $1 AND (user_id = $2 OR $3)")
            .bind(job_id)
            .bind(caller.user())
            .bind(caller.0.is_admin())
            .fetch_optional(&state.pool)
            .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound("job"))
}

fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    // A malformed id cannot name anyone's job: 404, like a missing one.
    raw.parse().map_err(|_| ApiError::NotFound("job"))
}

/// Get a job
///
/// One job in any status, with its whole output (`output`: stdout then
/// stderr; `error`: stderr alone). Its owner and admins only: anyone else
/// gets 404.
#[utoipa::path(
    get,
    path = "/jobs/{jobId}",
    operation_id = "getJob",
    tag = "jobs",
    params(crate::doc::JobIdPath),
    responses((status = 200, description = "The job.", body = JobView))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let job_id = parse_job_id(&raw)?;
    Ok(Json(load_visible(&state, &caller, job_id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteQuery {
    /// The job whose result to delete (UUID). Missing answers 422;
    /// malformed answers 404.
    #[param(value_type = Uuid)]
    job_id: String,
}

/// A deleted job result.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobDeleted)]
pub(crate) struct Deleted200 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    job_id: Uuid,
    /// `job result deleted`.
    message: &'static str,
}

/// A cancel that was done or asked for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobCancelAccepted)]
pub(crate) struct Cancel202 {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    job_id: Uuid,
    /// `job cancelled before it started`, or `cancel requested; the job is
    /// being stopped`.
    message: &'static str,
}

/// Delete a job result (by query)
///
/// Deletes one of your finished jobs (409 while it has not ended).
#[utoipa::path(
    delete,
    path = "/jobs/results",
    operation_id = "deleteJobResultByQuery",
    tag = "jobs",
    params(DeleteQuery),
    responses(
        (status = 200, description = "Deleted.", body = Deleted200),
        (status = 404, response = crate::doc::NotFound),
        (status = 409, response = crate::doc::Conflict),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn delete_by_query(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Deleted200>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    delete_job(&state, &caller, parse_job_id(&q.job_id)?).await
}

/// Delete a job result
///
/// Deletes one of your finished jobs (409 while it has not ended; only the
/// owner may, anyone else gets 404).
#[utoipa::path(
    delete,
    path = "/jobs/{jobId}",
    operation_id = "deleteJob",
    tag = "jobs",
    params(crate::doc::JobIdPath),
    responses(
        (status = 200, description = "Deleted.", body = Deleted200),
        (status = 409, response = crate::doc::Conflict),
    )
)]
pub(crate) async fn delete_by_path(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Deleted200>, ApiError> {
    delete_job(&state, &caller, parse_job_id(&raw)?).await
}

async fn delete_job(
    state: &AppState,
    caller: &Caller,
    job_id: Uuid,
) -> Result<Json<Deleted200>, ApiError> {
    match store::cancel::delete(&state.pool, job_id, caller.user()).await? {
        Deleted::NotFound => Err(ApiError::NotFound("job")),
        Deleted::NotFinished(status) => Err(ApiError::Conflict(format!(
            "job is {status}; cancel it before deleting its result"
        ))),
        Deleted::Deleted => Ok(Json(Deleted200 {
            success: true,
            job_id,
            message: "job result deleted",
        })),
    }
}

/// Cancel a job
///
/// Stops it wherever it runs, or before it starts. Its owner and admins
/// only (anyone else gets 404); 409 when it already ended.
#[utoipa::path(
    post,
    path = "/jobs/{jobId}/cancel",
    operation_id = "cancelJob",
    tag = "jobs",
    params(crate::doc::JobIdPath),
    responses(
        (status = 202, description = "Cancelled, or the cancel is on its way to the node.", body = Cancel202),
        (status = 409, response = crate::doc::Conflict),
    )
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<(StatusCode, Json<Cancel202>), ApiError> {
    let job_id = parse_job_id(&raw)?;
    // Visibility first, so another user's job answers 404.
    check_visible(&state, &caller, job_id).await?;
    let (message, running_on) =
        match store::cancel::cancel(&state.pool, job_id, caller.user()).await? {
            Cancelled::NotFound => return Err(ApiError::NotFound("job")),
            Cancelled::AlreadyFinished(status) => {
                return Err(ApiError::Conflict(format!(
                    "job already finished: {status}"
                )));
            }
            Cancelled::BeforeStart { attempt } => {
                let event = jobs::job_event(job_id, JobStatus::Cancelled, attempt, None, None);
                jobs::publish_events(&state.publisher, &[event]).await;
                ("job cancelled before it started", None)
            }
            Cancelled::Requested { node, attempt } => (
                "cancel requested; the job is being stopped",
                node.map(|n| (n, attempt)),
            ),
        };
    if let Some((node, attempt)) = running_on {
        // The worker also polls cancel_requested with its lease, so a lost
        // control message only delays the kill by one lease renewal.
        let payload = serde_json::to_vec(&Control::Cancel { job_id }).unwrap_or_default();
        let msg = Outgoing {
            exchange: "control".into(),
            routing_key: format!("node.{node}"),
            message_type: CONTROL_V1.into(),
            message_id: format!("cancel:{job_id}:{attempt}"),
            priority: 9,
            payload,
            headers: Vec::new(),
        };
        if let Err(error) = state.publisher.publish(&msg).await {
            tracing::warn!(%error, %job_id, "cancel message not published; the worker will see the flag");
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(Cancel202 {
            success: true,
            job_id,
            message,
        }),
    ))
}
