//! `/api/v1/jobs`: submit, results, one job, delete, cancel.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use taskhost_common::amqp::Outgoing;
use taskhost_common::changelog;
use taskhost_common::jobs::{self, Accepted, NewJob};
use taskhost_common::messages::{CONTROL_V1, Control};
use taskhost_common::model::{JobStatus, SubmitRequest, TriggeredBy};
use taskhost_common::store::{
    self,
    cancel::{Cancelled, Deleted},
};
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

pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let result = submit_inner(&state, &caller, &headers, &body).await;
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
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let accepted = if jobs::PlainJob::fits(&spec, idempotency_key.as_deref()) {
        // The bulk of submissions: accepted together with whatever else
        // arrives at the same moment.
        let plain = jobs::PlainJob {
            job_id: Uuid::now_v7(),
            user_id: caller.user().to_owned(),
            spec: spec.clone(),
            triggered_by: TriggeredBy::Api,
            changed_by: caller.user().to_owned(),
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
                job_id: Uuid::now_v7(),
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
        .await?
    };
    match accepted {
        Accepted::Conflict => Err(ApiError::Conflict(
            "Idempotency-Key was already used with a different request body".into(),
        )),
        Accepted::Duplicate { job_id } => {
            let mode: String =
                sqlx::query_scalar("SELECT execution_mode FROM jobs WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_one(&state.pool)
                    .await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "success": true,
                    "jobId": job_id,
                    "message": "job already accepted for this Idempotency-Key",
                    "executionMode": mode,
                })),
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
                dispatch(state, caller.user(), &job_ids, &outbox, status).await
            };
            let mut body = json!({
                "success": true,
                "jobId": job_ids[0],
                "message": message,
                "executionMode": spec.execution_mode.as_str(),
            });
            if job_ids.len() > 1 {
                body["jobIds"] = json!(job_ids);
            }
            Ok((StatusCode::ACCEPTED, Json(body)))
        }
    }
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
    tokio::spawn(async move {
        match batcher.publish(rows, &user).await {
            Ok(n) => crate::metrics::published(n, count - n),
            Err(error) => {
                tracing::warn!(%error, "marking published jobs failed; the relay will finish them");
                crate::metrics::published(0, count);
            }
        }
    });
    "job accepted".to_owned()
}

/// The fields every view of a job shows.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobFields {
    job_id: Uuid,
    job_name: String,
    command: String,
    description: String,
    execution_mode: String,
    status: String,
    status_reason: Option<String>,
    success: Option<bool>,
    exit_code: Option<i32>,
    #[sqlx(rename = "started_at")]
    date_started: Option<DateTime<Utc>>,
    #[sqlx(rename = "completed_at")]
    date_completed: Option<DateTime<Utc>>,
    submitted_at: DateTime<Utc>,
    runtime: Option<f64>,
    /// The worker cut the captured output at `worker.output_cap_bytes`.
    output_truncated: Option<bool>,
    node_id: Option<Uuid>,
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
    triggered_by: String,
    /// The job it re-runs.
    rerun_of: Option<Uuid>,
    /// The upstream run that fired it (`triggeredBy` dependency).
    upstream_job_id: Option<Uuid>,
    /// The job's own limits (`{cpuSeconds, memoryMb, maxFiles,
    /// maxProcesses}`, each only when set), or null.
    limits: Option<Value>,
    /// The sealed secret environment (never shown).
    #[serde(skip)]
    secret_env: Option<String>,
    /// Its names, each with `***` (README, "Secrets"); null when none.
    #[sqlx(skip)]
    #[serde(rename = "secretEnv")]
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
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobView {
    #[sqlx(flatten)]
    #[serde(flatten)]
    fields: JobFields,
    /// stdout then stderr.
    #[sqlx(skip)]
    output: Option<String>,
    /// stderr alone, when not empty.
    #[sqlx(skip)]
    error: Option<String>,
    #[serde(skip)]
    raw_output: Option<Vec<u8>>,
    #[serde(skip)]
    raw_error: Option<Vec<u8>>,
}

/// A `/jobs/results` entry: the job with bounded previews of stdout and
/// stderr and their sizes (the whole streams: `GET /jobs/{id}/output`).
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
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

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ResultsQuery {
    max_results: Option<i64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Results {
    success: bool,
    count: usize,
    results: Vec<JobEntry>,
}

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

pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let job_id = parse_job_id(&raw)?;
    Ok(Json(load_visible(&state, &caller, job_id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    job_id: String,
}

pub(crate) async fn delete_by_query(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    delete_job(&state, &caller, parse_job_id(&q.job_id)?).await
}

pub(crate) async fn delete_by_path(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<Json<Value>, ApiError> {
    delete_job(&state, &caller, parse_job_id(&raw)?).await
}

async fn delete_job(
    state: &AppState,
    caller: &Caller,
    job_id: Uuid,
) -> Result<Json<Value>, ApiError> {
    match store::cancel::delete(&state.pool, job_id, caller.user()).await? {
        Deleted::NotFound => Err(ApiError::NotFound("job")),
        Deleted::NotFinished(status) => Err(ApiError::Conflict(format!(
            "job is {status}; cancel it before deleting its result"
        ))),
        Deleted::Deleted => Ok(Json(
            json!({ "success": true, "jobId": job_id, "message": "job result deleted" }),
        )),
    }
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    RawPath(raw): RawPath<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        Json(json!({ "success": true, "jobId": job_id, "message": message })),
    ))
}
