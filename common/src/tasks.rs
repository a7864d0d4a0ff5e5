//! Recurring tasks: the request and its validation, the stored row, and
//! create / update / delete with their change-log rows. Shared by the api
//! (CRUD, run now) and the scheduler (firing).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::changelog::{self, Action, Change};
use crate::model::{
    ExecutionMode, Fanout, FieldError, JobLimits, JobSpec, LimitsRequest, MisfirePolicy,
    NoNodePolicy, OverlapPolicy, SubmitRequest, Target, TargetRequest, check_secret_env,
    seal_secret_env,
};
use crate::params;
use crate::schedule::Schedule;
use crate::secrets::{SecretKey, SecretValues};

/// Body of `POST /tasks` and `PUT /tasks/{id}`. For PUT every field is
/// optional and only the named fields change (`null` clears
/// `timeoutSeconds`, `limits` or the assignment). Unknown fields are refused
/// with 422; `assignedNodeId` cannot be combined with `assignedNodeGroup` or
/// `assignedNodeRole`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = TaskUpdate, example = json!({"enabled": false, "schedule": "*/10 * * * *"}))]
pub struct TaskRequest {
    /// Name, unique within its app; trimmed, then 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub task_name: Option<String>,
    /// App the task belongs to; trimmed, then 1 to 200 characters. Default
    /// `default`.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub app_name: Option<String>,
    /// The command, by the job rules (not blank, at most 65536 bytes;
    /// `diagnostics` or `noop` for inline).
    #[schema(min_length = 1, max_length = 65536, pattern = r"\S")]
    pub command: Option<String>,
    /// `pool` (default), `background`, `inline`, or an alias.
    #[schema(schema_with = crate::model::execution_mode_input)]
    pub execution_mode: Option<String>,
    /// Cron pattern with 5 fields, or 6 with seconds first, or an @name
    /// such as `@hourly`; it must fire at some point.
    #[schema(
        min_length = 1,
        pattern = r"\S",
        examples("0 2 * * *", "*/5 * * * * *", "@hourly")
    )]
    pub schedule: Option<String>,
    /// IANA timezone the schedule is read in. Default `UTC`.
    #[schema(examples("UTC", "Europe/Berlin"))]
    pub timezone: Option<String>,
    /// Whether the schedule fires. Default true.
    pub enabled: Option<bool>,
    #[serde(
        default,
        deserialize_with = "named",
        skip_serializing_if = "Option::is_none"
    )]
    /// Run on this node.
    #[schema(value_type = Option<Uuid>)]
    pub assigned_node_id: Option<Option<Uuid>>,
    #[serde(
        default,
        deserialize_with = "named",
        skip_serializing_if = "Option::is_none"
    )]
    /// Run on nodes of this group.
    #[schema(value_type = Option<String>, pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)]
    pub assigned_node_group: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "named",
        skip_serializing_if = "Option::is_none"
    )]
    /// Run on nodes of this role.
    #[schema(value_type = Option<String>, pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)]
    pub assigned_node_role: Option<Option<String>>,
    /// `one` (default) or `all` matching nodes.
    #[schema(value_type = Option<Fanout>)]
    pub fanout: Option<String>,
    /// 0 to 9; default 5.
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<i64>,
    #[serde(
        default,
        deserialize_with = "named",
        skip_serializing_if = "Option::is_none"
    )]
    /// Seconds before a run is killed, 1 to 604800.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 604_800)]
    pub timeout_seconds: Option<Option<i64>>,
    /// Retries of a failed run, 0 to 20; default 0.
    #[schema(minimum = 0, maximum = 20)]
    pub max_retries: Option<i64>,
    /// Delay before the first retry, 0 to 86400 seconds; default 60.
    #[schema(minimum = 0, maximum = 86_400)]
    pub retry_delay_seconds: Option<i64>,
    /// Default true.
    pub kill_on_timeout: Option<bool>,
    /// What to do with fire times missed while down; default `catch_up`.
    #[schema(value_type = Option<MisfirePolicy>)]
    pub misfire_policy: Option<String>,
    /// Whether a run may start while the previous one runs; default `skip`.
    #[schema(value_type = Option<OverlapPolicy>)]
    pub overlap_policy: Option<String>,
    /// What a fan-out task does when no node matches; default `fail`.
    #[schema(value_type = Option<NoNodePolicy>)]
    pub no_node_policy: Option<String>,
    /// Free text, at most 2000 characters.
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    /// Labels.
    pub tags: Option<Vec<String>>,
    /// Declared parameters (`crate::params`): absent keeps them, an
    /// object replaces them (`{}`: none).
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// Upstream tasks (`crate::params::After`): one object or an array;
    /// absent keeps them, `[]` clears them.
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
    /// Environment variables of every run: at most 100, names
    /// `[A-Za-z_][A-Za-z0-9_]*`.
    #[schema(schema_with = crate::model::env_map)]
    pub environment: Option<BTreeMap<String, String>>,
    /// Secret environment values: sealed under `secrets.key`. Absent keeps
    /// the stored ones, a map replaces them, `{}` clears them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::model::env_map)]
    pub secret_environment: Option<SecretValues>,
    /// Limits of every run: absent keeps them, an object replaces them,
    /// `null` or `{}` clears them.
    #[serde(
        default,
        deserialize_with = "named",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<LimitsRequest>)]
    pub limits: Option<Option<LimitsRequest>>,
}

/// For fields that may be cleared: absent is `None` (unchanged), `null` is
/// `Some(None)` (cleared), a value is `Some(Some(v))`. Such a field is
/// serialized only when `Some`, so `None` stays absent (not `null`, which
/// would clear it).
fn named<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A stored task, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = StoredTask)]
pub struct Task {
    pub task_id: Uuid,
    pub task_name: String,
    pub app_name: String,
    pub command: String,
    pub execution_mode: ExecutionMode,
    pub schedule: String,
    pub timezone: String,
    pub enabled: bool,
    pub assigned_node_id: Option<Uuid>,
    pub assigned_node_group: Option<String>,
    pub assigned_node_role: Option<String>,
    pub fanout: Fanout,
    pub priority: i16,
    pub timeout_seconds: Option<i32>,
    pub max_retries: i32,
    pub retry_delay_seconds: i32,
    pub kill_on_timeout: bool,
    pub misfire_policy: MisfirePolicy,
    pub overlap_policy: OverlapPolicy,
    pub no_node_policy: NoNodePolicy,
    pub description: String,
    #[schema(value_type = Vec<String>)]
    pub tags: Value,
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// The upstream tasks, as an array of `{taskId, on, parameters?}`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub after: Value,
    #[schema(value_type = BTreeMap<String, String>)]
    pub environment: Value,
    /// The secret environment, sealed (`base64(nonce || ciphertext)`, see
    /// [`crate::secrets`]). Never serialized: answers show the names with
    /// `***` instead.
    #[serde(skip)]
    pub secret_environment: Option<String>,
    /// The limits of every run (camelCase JSON of [`JobLimits`]), or null.
    #[schema(value_type = Option<JobLimits>)]
    pub limits: Option<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub modified_by: Option<String>,
    pub modified_at: Option<DateTime<Utc>>,
}

/// Most retries of one run.
pub const MAX_RETRIES: i64 = 20;
/// Longest first retry delay, seconds (one day).
pub const MAX_RETRY_DELAY: i64 = 86_400;

fn err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn one_of(field: &'static str, value: &str, allowed: &[&str]) -> Result<(), FieldError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(err(
            field,
            format!("`{value}` is not one of {}", allowed.join(", ")),
        ))
    }
}

impl Task {
    fn blank(user: &str) -> Self {
        Task {
            task_id: Uuid::now_v7(),
            task_name: String::new(),
            app_name: "default".into(),
            command: String::new(),
            execution_mode: ExecutionMode::Pool,
            schedule: String::new(),
            timezone: "UTC".into(),
            enabled: true,
            assigned_node_id: None,
            assigned_node_group: None,
            assigned_node_role: None,
            fanout: Fanout::One,
            priority: 5,
            timeout_seconds: None,
            max_retries: 0,
            retry_delay_seconds: 60,
            kill_on_timeout: true,
            misfire_policy: MisfirePolicy::CatchUp,
            overlap_policy: OverlapPolicy::Skip,
            no_node_policy: NoNodePolicy::Fail,
            description: String::new(),
            tags: Value::Array(Vec::new()),
            parameters: Value::Object(Default::default()),
            after: Value::Array(Vec::new()),
            environment: Value::Object(Default::default()),
            secret_environment: None,
            limits: None,
            created_by: user.to_owned(),
            created_at: Utc::now(),
            modified_by: None,
            modified_at: None,
        }
    }

    /// The task a `POST /tasks` body describes (before it is stored):
    /// `taskName`, `command` and `schedule` are required, the rest default.
    /// No `secrets.key`: a body with secret values is refused.
    pub fn from_request(request: TaskRequest, user: &str) -> Result<Self, FieldError> {
        Self::from_request_with(request, user, None)
    }

    /// [`Task::from_request`], sealing `secretEnvironment` under `key`.
    pub fn from_request_with(
        request: TaskRequest,
        user: &str,
        key: Option<&SecretKey>,
    ) -> Result<Self, FieldError> {
        for (field, present) in [
            ("taskName", request.task_name.is_some()),
            ("command", request.command.is_some()),
            ("schedule", request.schedule.is_some()),
        ] {
            if !present {
                return Err(err(field, "is required"));
            }
        }
        let mut task = Task::blank(user);
        task.apply_with(request, key)?;
        Ok(task)
    }

    /// Applies the fields a request names, validating each (`PUT
    /// /tasks/{id}`); on an error the task may be partly changed. No
    /// `secrets.key`: a body with secret values is refused.
    pub fn apply(&mut self, r: TaskRequest) -> Result<(), FieldError> {
        self.apply_with(r, None)
    }

    /// [`Task::apply`], sealing `secretEnvironment` under `key`.
    pub fn apply_with(
        &mut self,
        r: TaskRequest,
        key: Option<&SecretKey>,
    ) -> Result<(), FieldError> {
        let environment_changed = r.environment.is_some();
        if let Some(v) = r.task_name {
            self.task_name = v.trim().to_owned();
        }
        if let Some(v) = r.app_name {
            self.app_name = v.trim().to_owned();
        }
        if let Some(v) = r.command {
            self.command = v;
        }
        if let Some(v) = r.execution_mode {
            self.execution_mode = v.parse().map_err(|e| err("executionMode", e))?;
        }
        if let Some(v) = r.schedule {
            self.schedule = v.trim().to_owned();
        }
        if let Some(v) = r.timezone {
            self.timezone = v.trim().to_owned();
        }
        if let Some(v) = r.enabled {
            self.enabled = v;
        }
        if r.assigned_node_id.is_some()
            || r.assigned_node_group.is_some()
            || r.assigned_node_role.is_some()
        {
            // A new assignment replaces the old one as a whole; `null`
            // everywhere means any node.
            self.assigned_node_id = r.assigned_node_id.flatten();
            self.assigned_node_group = r.assigned_node_group.flatten();
            self.assigned_node_role = r.assigned_node_role.flatten();
        }
        if let Some(v) = r.fanout {
            self.fanout = v.parse().map_err(|e| err("fanout", e))?;
        }
        if let Some(v) = r.priority {
            self.priority = i16::try_from(v)
                .ok()
                .filter(|p| (0..=9).contains(p))
                .ok_or_else(|| err("priority", "must be between 0 and 9"))?;
        }
        if r.timeout_seconds == Some(None) {
            self.timeout_seconds = None;
        }
        if let Some(Some(v)) = r.timeout_seconds {
            self.timeout_seconds = Some(
                i32::try_from(v)
                    .ok()
                    .filter(|t| (1..=crate::model::limits::TIMEOUT_MAX).contains(t))
                    .ok_or_else(|| {
                        err(
                            "timeoutSeconds",
                            format!(
                                "must be between 1 and {}",
                                crate::model::limits::TIMEOUT_MAX
                            ),
                        )
                    })?,
            );
        }
        if let Some(v) = r.max_retries {
            if !(0..=MAX_RETRIES).contains(&v) {
                return Err(err(
                    "maxRetries",
                    format!("must be between 0 and {MAX_RETRIES}"),
                ));
            }
            self.max_retries = v as i32;
        }
        if let Some(v) = r.retry_delay_seconds {
            if !(0..=MAX_RETRY_DELAY).contains(&v) {
                return Err(err(
                    "retryDelaySeconds",
                    format!("must be between 0 and {MAX_RETRY_DELAY}"),
                ));
            }
            self.retry_delay_seconds = v as i32;
        }
        if let Some(v) = r.kill_on_timeout {
            self.kill_on_timeout = v;
        }
        if let Some(v) = r.misfire_policy {
            one_of("misfirePolicy", &v, &["catch_up", "skip"])?;
            self.misfire_policy = v.parse().map_err(|e| err("misfirePolicy", e))?;
        }
        if let Some(v) = r.overlap_policy {
            one_of("overlapPolicy", &v, &["skip", "allow"])?;
            self.overlap_policy = v.parse().map_err(|e| err("overlapPolicy", e))?;
        }
        if let Some(v) = r.no_node_policy {
            one_of("noNodePolicy", &v, &["fail", "hold"])?;
            self.no_node_policy = v.parse().map_err(|e| err("noNodePolicy", e))?;
        }
        if let Some(v) = r.description {
            self.description = v;
        }
        if let Some(v) = r.tags {
            self.tags = serde_json::to_value(v).unwrap_or(Value::Null);
        }
        if let Some(v) = r.parameters {
            let defs = params::parse_defs(&v)?;
            self.parameters = serde_json::to_value(defs).unwrap_or(Value::Null);
        }
        if let Some(v) = r.after {
            let defs = params::parse_defs(&self.parameters)?;
            let edges = params::parse_after(&v, &defs)?;
            self.after = serde_json::to_value(edges).unwrap_or(Value::Null);
        }
        if let Some(v) = r.environment {
            self.environment = serde_json::to_value(v).unwrap_or(Value::Null);
        }
        self.apply_secrets(r.secret_environment, environment_changed, key)?;
        if let Some(limits) = r.limits {
            self.limits = match limits {
                None => None,
                Some(l) => l
                    .validate()?
                    .map(|l| serde_json::to_value(l).unwrap_or(Value::Null)),
            };
        }
        self.validate()
    }

    /// Replaces (a map), clears (`{}`) or keeps (absent) the sealed secret
    /// environment, checking its names against the plain `environment`.
    fn apply_secrets(
        &mut self,
        secrets: Option<SecretValues>,
        environment_changed: bool,
        key: Option<&SecretKey>,
    ) -> Result<(), FieldError> {
        let env: BTreeMap<String, String> =
            serde_json::from_value(self.environment.clone()).unwrap_or_default();
        if let Some(secrets) = secrets {
            check_secret_env("secretEnvironment", &secrets.0, &env)?;
            self.secret_environment = seal_secret_env("secretEnvironment", &secrets.0, key)?;
        } else if environment_changed
            && let Some(sealed) = &self.secret_environment
            && let Ok(stored) = crate::secrets::open(key, sealed)
            && let Some(name) = stored.keys().find(|n| env.contains_key(*n))
        {
            // Kept secrets that the key can read are checked too; ones it
            // cannot read make the run fail with the reason instead.
            return Err(err(
                "environment",
                format!(
                    "`{name}` is a secret environment variable of this task; a name may be plain or secret, not both"
                ),
            ));
        }
        Ok(())
    }

    /// Checks the whole task.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.task_name.is_empty() || self.task_name.chars().count() > 200 {
            return Err(err("taskName", "must be 1 to 200 characters"));
        }
        if self.app_name.is_empty() || self.app_name.chars().count() > 200 {
            return Err(err("appName", "must be 1 to 200 characters"));
        }
        Schedule::parse(&self.schedule, &self.timezone)
            .map_err(|e| err(e.field(), e.to_string()))?;
        // The command, mode, target and environment follow the job rules.
        self.base_spec()?;
        self.check_parameters()?;
        Ok(())
    }

    /// The declared parameters.
    pub fn param_defs(&self) -> Result<params::ParamDefs, FieldError> {
        params::parse_defs(&self.parameters)
    }

    /// The upstream tasks.
    pub fn after_edges(&self) -> Result<Vec<params::After>, FieldError> {
        params::parse_after(&self.after, &self.param_defs()?)
    }

    /// Parameters, `after` and the environment fit together: no
    /// `TASKHOST_PARAM_*` in the environment, and a required parameter
    /// without a default is given by every `after` edge and the schedule
    /// is off (`enabled: false`; a scheduled run has only the defaults).
    fn check_parameters(&self) -> Result<(), FieldError> {
        let defs = self.param_defs()?;
        let edges = params::parse_after(&self.after, &defs)?;
        if let Value::Object(env) = &self.environment
            && let Some(name) = env.keys().find(|k| k.starts_with(params::ENV_PREFIX))
        {
            return Err(err(
                "environment",
                format!(
                    "`{name}`: {}* names are set from the task's parameters",
                    params::ENV_PREFIX
                ),
            ));
        }
        let env_len = self.environment.as_object().map_or(0, serde_json::Map::len);
        if !defs.is_empty() && env_len + defs.len() > crate::model::limits::ENV_MAX {
            return Err(err(
                "parameters",
                format!(
                    "the environment ({env_len}) and the parameters ({}) are variables of every run: at most {} together",
                    defs.len(),
                    crate::model::limits::ENV_MAX
                ),
            ));
        }
        for (name, def) in &defs {
            if !def.required || def.default.is_some() {
                continue;
            }
            if self.enabled {
                return Err(err(
                    "parameters",
                    format!(
                        "`{name}` is required and has no default, so a scheduled run cannot have it: give it a default or set enabled to false (run-now and `after` runs still run the task)"
                    ),
                ));
            }
            if let Some(i) = edges.iter().position(|e| !e.parameters.contains_key(name)) {
                return Err(err(
                    "after",
                    format!("[{i}].parameters.{name}: required by the task and it has no default"),
                ));
            }
        }
        Ok(())
    }

    /// The job of a scheduled run: the parameters' defaults.
    pub fn job_spec(&self) -> Result<JobSpec, FieldError> {
        let values = params::resolve(&self.param_defs()?, &Default::default(), "parameters")
            .map_err(|e| err("parameters", e.to_string()))?;
        self.job_spec_with(&values)
    }

    /// The job of a run with these (checked) parameter values, each in
    /// the environment as `TASKHOST_PARAM_<NAME>`.
    pub fn job_spec_with(&self, values: &BTreeMap<String, String>) -> Result<JobSpec, FieldError> {
        let mut spec = self.base_spec()?;
        for (name, value) in values {
            spec.env.insert(params::env_name(name), value.clone());
        }
        Ok(spec)
    }

    /// The job this task runs, without parameters.
    fn base_spec(&self) -> Result<JobSpec, FieldError> {
        let env: BTreeMap<String, String> = serde_json::from_value(self.environment.clone())
            .map_err(|e| err("environment", e.to_string()))?;
        let request = SubmitRequest {
            job_name: self.task_name.clone(),
            command: self.command.clone(),
            description: Some(self.description.clone()),
            execution_mode: Some(self.execution_mode.as_str().to_owned()),
            timeout_seconds: self.timeout_seconds.map(i64::from),
            priority: Some(i64::from(self.priority)),
            target: Some(TargetRequest {
                node_id: self.assigned_node_id,
                node_group: self.assigned_node_group.clone(),
                node_role: self.assigned_node_role.clone(),
                fanout: Some(self.fanout.as_str().to_owned()),
            }),
            env: Some(env),
            secret_env: None,
            limits: None,
        };
        request
            .validate()
            .map_err(|e| FieldError {
                field: match e.field {
                    "jobName" => "taskName",
                    "target" => "assignedNodeId",
                    "target.nodeGroup" => "assignedNodeGroup",
                    "target.nodeRole" => "assignedNodeRole",
                    "target.fanout" => "fanout",
                    "env" => "environment",
                    other => other,
                },
                message: e.message,
            })
            .and_then(|mut spec| {
                // The sealed values go to the job as they are.
                spec.secret_env = self.secret_environment.clone();
                spec.limits = self.job_limits()?;
                Ok(spec)
            })
    }

    /// The limits of every run of this task.
    pub fn job_limits(&self) -> Result<Option<JobLimits>, FieldError> {
        match &self.limits {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value::<LimitsRequest>(v.clone())
                .map_err(|e| err("limits", e.to_string()))?
                .validate(),
        }
    }

    /// The target of this task.
    pub fn target(&self) -> Target {
        Target {
            node_id: self.assigned_node_id,
            node_group: self.assigned_node_group.clone(),
            node_role: self.assigned_node_role.clone(),
            fanout: self.fanout,
        }
    }

    /// The parsed schedule (valid for stored tasks).
    pub fn parsed_schedule(&self) -> Option<Schedule> {
        Schedule::parse(&self.schedule, &self.timezone).ok()
    }
}

/// Scheduling state of a task, as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleState {
    pub task_id: Uuid,
    pub next_run: Option<DateTime<Utc>>,
    pub last_run: Option<DateTime<Utc>>,
    pub last_state: Option<String>,
    pub is_running: bool,
    pub running_on_node: Option<Uuid>,
    pub started_at: Option<DateTime<Utc>>,
    pub claim_expiry: Option<DateTime<Utc>>,
    pub total_runs: i64,
    pub success_count: i64,
    pub failure_count: i64,
}

/// What can go wrong writing a task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A field is wrong.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A parameter value of a run is wrong (`parameters.<name>: ...`).
    #[error(transparent)]
    Parameter(#[from] params::ParamError),
    /// Another task has the same name in the app.
    #[error("a task named `{0}` already exists in app `{1}`")]
    Duplicate(String, String),
    /// No such task.
    #[error("task not found")]
    NotFound,
    /// Postgres failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The columns of a [`Task`], in its field order (the scheduler selects them
/// too).
pub const TASK_COLUMNS: &str = "task_id, task_name, app_name, command, execution_mode, schedule, timezone, enabled,
    assigned_node_id, assigned_node_group, assigned_node_role, fanout, priority, timeout_seconds, max_retries,
    retry_delay_seconds, kill_on_timeout, misfire_policy, overlap_policy, no_node_policy, description, tags,
    parameters, after, environment, secret_environment, limits, created_by, created_at, modified_by, modified_at";

fn json_of<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn change<'a>(
    table: &'a str,
    id: Uuid,
    action: Action,
    old: Option<&'a Value>,
    new: Option<&'a Value>,
    by: &'a str,
    reason: &'a str,
) -> Change<'a> {
    Change {
        table,
        record_id: id.to_string(),
        action,
        old: old.map(|v| v as &dyn changelog::RowJson),
        new: new.map(|v| v as &dyn changelog::RowJson),
        changed_by: by,
        node_id: None,
        reason: Some(reason),
    }
}

/// Row of a table as JSON, for the change log.
pub(crate) async fn row_json(
    conn: &mut PgConnection,
    table: &'static str,
    id: Uuid,
) -> Result<Option<Value>, sqlx::Error> {
    let sql = match table {
        "tasks" => "SELECT to_jsonb(t.*) FROM tasks t WHERE task_id = $1",
        _ => "SELECT to_jsonb(s.*) FROM task_schedule s WHERE task_id = $1",
    };
    sqlx::query_scalar(sql).bind(id).fetch_optional(conn).await
}

fn map_unique(e: sqlx::Error, t: &Task) -> TaskError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            TaskError::Duplicate(t.task_name.clone(), t.app_name.clone())
        }
        _ => TaskError::Db(e),
    }
}

async fn write_task(conn: &mut PgConnection, t: &Task, insert: bool) -> Result<Value, sqlx::Error> {
    let sql = if insert {
        "INSERT INTO tasks (task_id, task_name, app_name, command, execution_mode, schedule, timezone, enabled,
             assigned_node_id, assigned_node_group, assigned_node_role, fanout, priority, timeout_seconds, max_retries,
             retry_delay_seconds, kill_on_timeout, misfire_policy, overlap_policy, no_node_policy, description, tags,
             parameters, environment, created_by, created_at, modified_by, modified_at, secret_environment, limits, after)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24,$25,$26,$27,$28,$29,$30,$31)
         RETURNING to_jsonb(tasks.*)"
    } else {
        "UPDATE tasks SET task_name=$2, app_name=$3, command=$4, execution_mode=$5, schedule=$6, timezone=$7, enabled=$8,
             assigned_node_id=$9, assigned_node_group=$10, assigned_node_role=$11, fanout=$12, priority=$13,
             timeout_seconds=$14, max_retries=$15, retry_delay_seconds=$16, kill_on_timeout=$17, misfire_policy=$18,
             overlap_policy=$19, no_node_policy=$20, description=$21, tags=$22, parameters=$23, environment=$24,
             created_by=$25, created_at=$26, modified_by=$27, modified_at=$28, secret_environment=$29,
             limits=$30, after=$31
         WHERE task_id = $1 RETURNING to_jsonb(tasks.*)"
    };
    sqlx::query_scalar(sql)
        .bind(t.task_id)
        .bind(&t.task_name)
        .bind(&t.app_name)
        .bind(&t.command)
        .bind(t.execution_mode)
        .bind(&t.schedule)
        .bind(&t.timezone)
        .bind(t.enabled)
        .bind(t.assigned_node_id)
        .bind(&t.assigned_node_group)
        .bind(&t.assigned_node_role)
        .bind(t.fanout)
        .bind(t.priority)
        .bind(t.timeout_seconds)
        .bind(t.max_retries)
        .bind(t.retry_delay_seconds)
        .bind(t.kill_on_timeout)
        .bind(t.misfire_policy)
        .bind(t.overlap_policy)
        .bind(t.no_node_policy)
        .bind(&t.description)
        .bind(&t.tags)
        .bind(&t.parameters)
        .bind(&t.environment)
        .bind(&t.created_by)
        .bind(t.created_at)
        .bind(&t.modified_by)
        .bind(t.modified_at)
        .bind(&t.secret_environment)
        .bind(&t.limits)
        .bind(&t.after)
        .fetch_one(conn)
        .await
}

/// Sets `next_run` from the schedule (None when disabled), logging the change.
async fn reschedule(
    conn: &mut PgConnection,
    t: &Task,
    by: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let next = if t.enabled {
        t.parsed_schedule().and_then(|s| s.next_after(Utc::now()))
    } else {
        None
    };
    let old = row_json(conn, "task_schedule", t.task_id).await?;
    let new: Value = sqlx::query_scalar(
        "INSERT INTO task_schedule (task_id, next_run) VALUES ($1, $2)
         ON CONFLICT (task_id) DO UPDATE SET next_run = EXCLUDED.next_run
         RETURNING to_jsonb(task_schedule.*)",
    )
    .bind(t.task_id)
    .bind(next)
    .fetch_one(&mut *conn)
    .await?;
    let action = if old.is_some() {
        Action::Update
    } else {
        Action::Insert
    };
    changelog::record(
        conn,
        change(
            "task_schedule",
            t.task_id,
            action,
            old.as_ref(),
            Some(&new),
            by,
            reason,
        ),
    )
    .await
    .map(|_| ())
}

/// The Postgres channel a task write notifies, so a sleeping scheduler
/// wakes at once and recomputes its next due time.
pub const NOTIFY_CHANNEL: &str = "taskhost_tasks";

/// Queues a `NOTIFY taskhost_tasks` with the task id on `conn`; Postgres
/// delivers it when (and only if) the surrounding transaction commits.
pub async fn notify_scheduler(conn: &mut PgConnection, task_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('taskhost_tasks', $1)")
        .bind(task_id.to_string())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Creates a task and its schedule row (no `secrets.key`: a request with
/// secret values is refused).
pub async fn create(pool: &PgPool, request: TaskRequest, user: &str) -> Result<Task, TaskError> {
    create_with(pool, request, user, None).await
}

/// [`create`], sealing `secretEnvironment` under `key`.
pub async fn create_with(
    pool: &PgPool,
    request: TaskRequest,
    user: &str,
    key: Option<&SecretKey>,
) -> Result<Task, TaskError> {
    let task = Task::from_request_with(request, user, key)?;
    create_task(pool, task, user).await
}

/// Writes a new task built by the caller (an import keeps its sealed
/// secret environment as it is): the row, its schedule row and their
/// change rows in one transaction.
pub async fn create_task(pool: &PgPool, task: Task, user: &str) -> Result<Task, TaskError> {
    let mut tx = pool.begin().await?;
    check_chain(&mut tx, &task).await?;
    let new = write_task(&mut tx, &task, true)
        .await
        .map_err(|e| map_unique(e, &task))?;
    changelog::record(
        &mut tx,
        change(
            "tasks",
            task.task_id,
            Action::Insert,
            None,
            Some(&new),
            user,
            "created",
        ),
    )
    .await?;
    reschedule(&mut tx, &task, user, "created").await?;
    notify_scheduler(&mut tx, task.task_id).await?;
    tx.commit().await?;
    Ok(task)
}

/// How often a task write runs at most when Postgres keeps choosing it to
/// break a deadlock (see [`retry_deadlock`]).
const WRITE_TRIES: usize = 3;

/// Runs a task write again when Postgres aborted it to break a deadlock
/// (SQLSTATE 40P01), at most [`WRITE_TRIES`] times in all. Workers,
/// schedulers and run-now lock a task's rows too, each in its own order (a
/// run's job row or the task's schedule row, then the task row through the
/// foreign key of the job or history row they write); deleting a task needs
/// all of them. Postgres breaks such a cycle after `deadlock_timeout` by
/// aborting one transaction; when it is this one, it runs again once the
/// other is through, instead of failing the request.
async fn retry_deadlock<T, F, Fut>(mut write: F) -> Result<T, TaskError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TaskError>>,
{
    let mut tries = 1;
    loop {
        match write().await {
            Err(TaskError::Db(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("40P01") && tries < WRITE_TRIES =>
            {
                tracing::info!(error = %e, tries, "task write chosen to break a deadlock; trying again");
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Changes the fields a request names (no `secrets.key`: a request with
/// secret values is refused).
pub async fn update(
    pool: &PgPool,
    task_id: Uuid,
    request: TaskRequest,
    user: &str,
) -> Result<Task, TaskError> {
    update_with(pool, task_id, request, user, None).await
}

/// [`update`], sealing `secretEnvironment` under `key`.
pub async fn update_with(
    pool: &PgPool,
    task_id: Uuid,
    request: TaskRequest,
    user: &str,
    key: Option<&SecretKey>,
) -> Result<Task, TaskError> {
    retry_deadlock(|| update_once(pool, task_id, request.clone(), user, key, None)).await
}

/// [`update`] for an import: every field of `request`, then the sealed
/// secret environment as exported (`None`: none).
pub async fn update_imported(
    pool: &PgPool,
    task_id: Uuid,
    request: TaskRequest,
    sealed: Option<String>,
    user: &str,
) -> Result<Task, TaskError> {
    retry_deadlock(|| {
        update_once(
            pool,
            task_id,
            request.clone(),
            user,
            None,
            Some(sealed.clone()),
        )
    })
    .await
}

async fn update_once(
    pool: &PgPool,
    task_id: Uuid,
    request: TaskRequest,
    user: &str,
    key: Option<&SecretKey>,
    sealed: Option<Option<String>>,
) -> Result<Task, TaskError> {
    let mut tx = pool.begin().await?;
    // NO KEY UPDATE: the runs recorded meanwhile only need the row to stay
    // (their foreign keys take KEY SHARE), so neither waits for the other.
    let mut task: Task = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = $1 FOR NO KEY UPDATE"
    )))
    .bind(task_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(TaskError::NotFound)?;
    let old = json_of(&task);
    let old_row = row_json(&mut tx, "tasks", task_id).await?;
    let schedule_changed =
        request.schedule.is_some() || request.timezone.is_some() || request.enabled.is_some();
    let after_changed = request.after.is_some();
    task.apply_with(request, key)?;
    if let Some(sealed) = sealed {
        task.secret_environment = sealed;
    }
    if after_changed {
        check_chain(&mut tx, &task).await?;
    }
    task.modified_by = Some(user.to_owned());
    task.modified_at = Some(Utc::now());
    let new = write_task(&mut tx, &task, false)
        .await
        .map_err(|e| map_unique(e, &task))?;
    changelog::record(
        &mut tx,
        change(
            "tasks",
            task_id,
            Action::Update,
            old_row.as_ref().or(Some(&old)),
            Some(&new),
            user,
            "updated",
        ),
    )
    .await?;
    if schedule_changed {
        reschedule(&mut tx, &task, user, "schedule changed").await?;
    }
    notify_scheduler(&mut tx, task_id).await?;
    tx.commit().await?;
    Ok(task)
}

/// Deletes a task (its schedule row goes with it; its jobs stay).
pub async fn delete(pool: &PgPool, task_id: Uuid, user: &str) -> Result<(), TaskError> {
    retry_deadlock(|| delete_once(pool, task_id, user)).await
}

async fn delete_once(pool: &PgPool, task_id: Uuid, user: &str) -> Result<(), TaskError> {
    let mut tx = pool.begin().await?;
    let old_schedule = row_json(&mut tx, "task_schedule", task_id).await?;
    let old: Option<Value> =
        sqlx::query_scalar("DELETE FROM tasks WHERE task_id = $1 RETURNING to_jsonb(tasks.*)")
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(old) = old else {
        return Err(TaskError::NotFound);
    };
    changelog::record(
        &mut tx,
        change(
            "tasks",
            task_id,
            Action::Delete,
            Some(&old),
            None,
            user,
            "deleted",
        ),
    )
    .await?;
    if let Some(s) = old_schedule {
        changelog::record(
            &mut tx,
            change(
                "task_schedule",
                task_id,
                Action::Delete,
                Some(&s),
                None,
                user,
                "task deleted",
            ),
        )
        .await?;
    }
    notify_scheduler(&mut tx, task_id).await?;
    tx.commit().await?;
    Ok(())
}

/// One task.
pub async fn get(pool: &PgPool, task_id: Uuid) -> Result<Option<Task>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = $1"
    )))
    .bind(task_id)
    .fetch_optional(pool)
    .await
}

/// Every task, by app and name.
pub async fn list(pool: &PgPool) -> Result<Vec<Task>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks ORDER BY app_name, task_name"
    )))
    .fetch_all(pool)
    .await
}

/// A task's scheduling state.
pub async fn schedule_state(
    pool: &PgPool,
    task_id: Uuid,
) -> Result<Option<ScheduleState>, sqlx::Error> {
    sqlx::query_as(
        "SELECT task_id, next_run, last_run, last_state, is_running, running_on_node, started_at, claim_expiry,
                total_runs, success_count, failure_count
         FROM task_schedule WHERE task_id = $1",
    )
    .bind(task_id)
    .fetch_optional(pool)
    .await
}

/// Writes the change-log row of an update to a task's `task_schedule` row,
/// on `conn` (inside the transaction that made it).
pub async fn log_schedule_update(
    conn: &mut PgConnection,
    task_id: Uuid,
    old: &Value,
    new: &Value,
    by: &str,
    node_id: Option<Uuid>,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let mut change = change(
        "task_schedule",
        task_id,
        Action::Update,
        Some(old),
        Some(new),
        by,
        reason,
    );
    change.node_id = node_id;
    changelog::record(conn, change).await.map(|_| ())
}

/// Records on `task_schedule` that a run of the task ended (called in the
/// transaction that finishes the job).
pub async fn record_run_end(
    conn: &mut PgConnection,
    task_id: Uuid,
    state: &str,
    succeeded: bool,
    by: &str,
    node_id: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    let changed: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (SELECT task_id, to_jsonb(s.*) AS row FROM task_schedule s WHERE task_id = $1 FOR UPDATE)
         UPDATE task_schedule SET is_running = false, running_on_node = NULL, claim_expiry = NULL, last_state = $2,
                success_count = success_count + CASE WHEN $3 THEN 1 ELSE 0 END,
                failure_count = failure_count + CASE WHEN $3 THEN 0 ELSE 1 END
         FROM old WHERE task_schedule.task_id = old.task_id
         RETURNING old.row, to_jsonb(task_schedule.*)",
    )
    .bind(task_id)
    .bind(state)
    .bind(succeeded)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((old, new)) = changed {
        log_schedule_update(conn, task_id, &old, &new, by, node_id, "run ended").await?;
    }
    Ok(())
}

/// Records on `task_schedule` that a run started on a node.
pub async fn record_run_start(
    conn: &mut PgConnection,
    task_id: Uuid,
    node_id: Uuid,
    by: &str,
) -> Result<(), sqlx::Error> {
    let changed: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (SELECT task_id, to_jsonb(s.*) AS row FROM task_schedule s WHERE task_id = $1 FOR UPDATE)
         UPDATE task_schedule SET is_running = true, running_on_node = $2, started_at = now(), last_state = 'running'
         FROM old WHERE task_schedule.task_id = old.task_id
         RETURNING old.row, to_jsonb(task_schedule.*)",
    )
    .bind(task_id)
    .bind(node_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((old, new)) = changed {
        log_schedule_update(conn, task_id, &old, &new, by, Some(node_id), "run started").await?;
    }
    Ok(())
}

/// Checks the `after` edges of `task` against the stored tasks, inside the
/// write's transaction: every upstream exists and no chain leads back to
/// the task (`after: cycle: a -> b -> a`). Chain writes are serialized by
/// a transaction-scoped advisory lock, so two writes cannot close a cycle
/// together.
async fn check_chain(conn: &mut PgConnection, task: &Task) -> Result<(), TaskError> {
    let edges = task.after_edges()?;
    if edges.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('taskhost_task_chains'))")
        .execute(&mut *conn)
        .await?;
    let rows: Vec<(Uuid, String, Value)> =
        sqlx::query_as("SELECT task_id, task_name, after FROM tasks")
            .fetch_all(&mut *conn)
            .await?;
    let mut names: BTreeMap<Uuid, String> = BTreeMap::new();
    let mut ups: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for (id, name, after) in rows {
        names.insert(id, name);
        let list: Vec<params::After> = serde_json::from_value(after).unwrap_or_default();
        ups.insert(id, list.into_iter().map(|e| e.task_id).collect());
    }
    names.insert(task.task_id, task.task_name.clone());
    ups.insert(task.task_id, edges.iter().map(|e| e.task_id).collect());
    for (i, e) in edges.iter().enumerate() {
        if !names.contains_key(&e.task_id) {
            return Err(err("after", format!("[{i}].taskId: no task `{}`", e.task_id)).into());
        }
    }
    // Depth-first along "runs after" from the task; a path back to it is
    // a cycle. `path[k + 1]` is an upstream of `path[k]`.
    let mut path = vec![task.task_id];
    let mut seen = std::collections::BTreeSet::new();
    if let Some(cycle) = find_cycle(task.task_id, &ups, &mut path, &mut seen) {
        // Shown in run order: each runs after the one before it.
        let shown: Vec<&str> = cycle
            .iter()
            .rev()
            .map(|id| names.get(id).map_or("?", String::as_str))
            .collect();
        return Err(err(
            "after",
            format!(
                "cycle: {} (each task would run after the one before it)",
                shown.join(" -> ")
            ),
        )
        .into());
    }
    Ok(())
}

fn find_cycle(
    start: Uuid,
    ups: &BTreeMap<Uuid, Vec<Uuid>>,
    path: &mut Vec<Uuid>,
    seen: &mut std::collections::BTreeSet<Uuid>,
) -> Option<Vec<Uuid>> {
    let at = *path.last()?;
    for up in ups.get(&at).into_iter().flatten() {
        if *up == start {
            let mut cycle = path.clone();
            cycle.push(start);
            return Some(cycle);
        }
        if seen.insert(*up) {
            path.push(*up);
            if let Some(c) = find_cycle(start, ups, path, seen) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

/// Records on `task_schedule` that a run was started outside the
/// schedule (run now, or fired by an upstream run): `last_run`,
/// `total_runs`, and `is_running` while it waits. Logged.
pub(crate) async fn record_unscheduled_start(
    conn: &mut PgConnection,
    task_id: Uuid,
    status: crate::model::JobStatus,
    by: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let old: Option<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(s.*) FROM task_schedule s WHERE task_id = $1 FOR UPDATE",
    )
    .bind(task_id)
    .fetch_optional(&mut *conn)
    .await?;
    let new: Option<Value> = sqlx::query_scalar(
        "UPDATE task_schedule SET last_run = now(), last_state = $2, total_runs = total_runs + 1,
                is_running = is_running OR $2 = 'queued'
         WHERE task_id = $1 RETURNING to_jsonb(task_schedule.*)",
    )
    .bind(task_id)
    .bind(if status == crate::model::JobStatus::Dead {
        "dead"
    } else {
        "queued"
    })
    .fetch_optional(&mut *conn)
    .await?;
    if let (Some(old), Some(new)) = (old, new) {
        log_schedule_update(conn, task_id, &old, &new, by, None, reason).await?;
    }
    Ok(())
}

/// Runs a task now, outside its schedule (`POST /tasks/{id}/run`), with
/// these parameter values (checked: `parameters.<name>: ...`; the rest
/// take their defaults).
pub async fn run_now(
    pool: &PgPool,
    task: &Task,
    user: &str,
    parameters: &serde_json::Map<String, Value>,
) -> Result<crate::jobs::Accepted, TaskError> {
    let Ok(defs) = task.param_defs() else {
        return Ok(crate::jobs::Accepted::Conflict);
    };
    let values = params::resolve(&defs, parameters, "parameters")?;
    let Ok(spec) = task.job_spec_with(&values) else {
        return Ok(crate::jobs::Accepted::Conflict);
    };
    let mut tx = pool.begin().await?;
    let accepted = crate::jobs::accept_in(
        &mut tx,
        &crate::jobs::NewJob {
            job_id: Uuid::now_v7(),
            user_id: user,
            spec: &spec,
            triggered_by: crate::model::TriggeredBy::Manual,
            idempotency_key: None,
            request_hash: None,
            changed_by: user,
            task: Some(crate::jobs::TaskRun {
                task_id: task.task_id,
                fire_at: None,
                max_retries: task.max_retries,
                retry_delay_seconds: task.retry_delay_seconds,
                kill_on_timeout: task.kill_on_timeout,
                upstream_job_id: None,
            }),
            rerun_of: None,
        },
    )
    .await?;
    if let crate::jobs::Accepted::Created {
        status, job_ids, ..
    } = &accepted
    {
        record_unscheduled_start(&mut tx, task.task_id, *status, user, "run now").await?;
        if *status == crate::model::JobStatus::Dead {
            // Recorded dead at once (no node matches): a final run, whose
            // downstream tasks hear of it like any other.
            for dead in job_ids {
                crate::store::chain::upstream_ended(&mut tx, task.task_id, *dead, "dead", user)
                    .await?;
            }
        }
        notify_scheduler(&mut tx, task.task_id).await?;
        tx.commit().await?;
        crate::metrics::submitted("manual", 1);
    }
    Ok(accepted)
}

/// The chain around a task, for `GET /tasks/{id}/schedule`: its upstreams
/// (`after`, with names), the tasks that run after it (`downstream`), and
/// for a fan-in the upstreams whose run already counted since its last
/// dependency run (`waitingOn` lists the others).
pub async fn chain_view(pool: &PgPool, task: &Task) -> Result<Value, sqlx::Error> {
    let edges = task.after_edges().unwrap_or_default();
    let ids: Vec<Uuid> = edges.iter().map(|e| e.task_id).collect();
    let names: BTreeMap<Uuid, String> = sqlx::query_as::<_, (Uuid, String)>(
        "SELECT task_id, task_name FROM tasks WHERE task_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    type ChainState = (Value, Option<DateTime<Utc>>, Option<Uuid>, i64);
    let state: Option<ChainState> = sqlx::query_as(
        "SELECT satisfied, last_fired_at, last_fired_job, fire_count FROM task_chain_state WHERE task_id = $1",
    )
    .bind(task.task_id)
    .fetch_optional(pool)
    .await?;
    let satisfied = state
        .as_ref()
        .and_then(|s| s.0.as_object().cloned())
        .unwrap_or_default();
    let after: Vec<Value> = edges
        .iter()
        .map(|e| {
            let key = e.task_id.to_string();
            serde_json::json!({
                "taskId": e.task_id,
                "taskName": names.get(&e.task_id),
                "on": e.on,
                "parameters": e.parameters,
                "exists": names.contains_key(&e.task_id),
                "satisfiedBy": satisfied.get(&key),
            })
        })
        .collect();
    let waiting: Vec<Uuid> = edges
        .iter()
        .filter(|e| {
            names.contains_key(&e.task_id) && !satisfied.contains_key(&e.task_id.to_string())
        })
        .map(|e| e.task_id)
        .collect();
    let downstream: Vec<(Uuid, String, Value)> = sqlx::query_as(
        "SELECT task_id, task_name, after FROM tasks
         WHERE after @> jsonb_build_array(jsonb_build_object('taskId', $1::text))
         ORDER BY task_name",
    )
    .bind(task.task_id.to_string())
    .fetch_all(pool)
    .await?;
    let downstream: Vec<Value> = downstream
        .into_iter()
        .map(|(id, name, after)| {
            let on = serde_json::from_value::<Vec<params::After>>(after)
                .unwrap_or_default()
                .into_iter()
                .find(|e| e.task_id == task.task_id)
                .map(|e| e.on);
            serde_json::json!({"taskId": id, "taskName": name, "on": on})
        })
        .collect();
    Ok(serde_json::json!({
        "after": after,
        "waitingOn": if edges.len() > 1 { serde_json::json!(waiting) } else { serde_json::json!([]) },
        "downstream": downstream,
        "lastDependencyRun": state.as_ref().and_then(|s| s.1),
        "lastDependencyJobId": state.as_ref().and_then(|s| s.2),
        "dependencyRuns": state.as_ref().map_or(0, |s| s.3),
    }))
}
