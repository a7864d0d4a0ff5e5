//! Domain words shared by every process: job states, execution modes, roles,
//! and the validated job request that HTTP and the ingress queue both produce.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::secrets::{SecretKey, SecretValues};

/// True when `name` matches `^[a-z0-9][a-z0-9_-]{0,63}$` (groups, roles,
/// prefixes).
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name { #[default] $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Every word accepted on input: the canonical names, then
            /// their aliases.
            pub const INPUTS: &'static [&'static str] = &[$($text,)+ $($($alias,)*)+];

            /// The canonical name stored in Postgres and sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text $(| $alias)* => Ok($name::$variant),)+
                    other => Err(format!(
                        "`{other}` is not one of {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> { s.parse() }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> &'static str { v.as_str() }
        }

        // The OpenAPI schema: the canonical names (what answers carry).
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        // Stored as text: decoding an unknown word is an error, never a
        // silent default.
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}

string_enum! {
    /// Where a job is in its life; see docs/state_machine.md.
    JobStatus {
        /// Accepted and committed, its publish not yet marked (a worker may
        /// already have its message and claims it from here).
        Pending = "pending",
        /// Published to its work queue and still waiting when the publish was
        /// marked (0.1 s after the broker's confirm).
        Queued = "queued",
        /// Claimed by a worker.
        Running = "running",
        /// Exited with status 0.
        Succeeded = "succeeded",
        /// Exited non-zero, or could not be started.
        Failed = "failed",
        /// Killed at its timeout.
        TimedOut = "timed_out",
        /// Stopped on request.
        Cancelled = "cancelled",
        /// Undeliverable, or no node can take it.
        Dead = "dead",
    }
}

impl JobStatus {
    /// True for the states a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::TimedOut
                | JobStatus::Cancelled
                | JobStatus::Dead
        )
    }
}

string_enum! {
    /// How a worker runs a job (README, "Execution modes and roles").
    ExecutionMode {
        /// A child process in the worker's bounded pool.
        Pool = "pool" | "Runspace",
        /// A long-running child process with its own slot budget.
        Background = "background" | "BackgroundJob",
        /// A built-in command inside the worker process.
        Inline = "inline" | "MainLoop",
    }
}

impl ExecutionMode {
    /// The roles that may submit a job in this mode.
    pub fn allowed_roles(self) -> &'static [Role] {
        match self {
            ExecutionMode::Pool | ExecutionMode::Background => &[
                Role::Debug,
                Role::TaskManager,
                Role::SystemAdmin,
                Role::SiteAdmin,
            ],
            ExecutionMode::Inline => &[Role::Debug],
        }
    }
}

string_enum! {
    /// A role carried by an API key.
    Role {
        /// May run inline commands, and everything a pool job may.
        Debug = "debug",
        /// Manages recurring tasks and runs jobs.
        TaskManager = "task_manager",
        /// Administers the system.
        SystemAdmin = "system_admin",
        /// Administers the site.
        SiteAdmin = "site_admin",
    }
}

impl Role {
    /// True for the administrator roles.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::SystemAdmin | Role::SiteAdmin)
    }
}

string_enum! {
    /// What caused a job.
    TriggeredBy {
        /// `POST /jobs/submit`.
        Api = "api",
        /// The ingress queue.
        Queue = "queue",
        /// A recurring task fired.
        Schedule = "schedule",
        /// A task run by hand.
        Manual = "manual",
        /// A task run fired by the end of an upstream task's run (`after`).
        Dependency = "dependency",
    }
}

string_enum! {
    /// What a task does with a fire time older than the misfire grace.
    MisfirePolicy {
        /// Fire one catch-up run, then go on from now.
        CatchUp = "catch_up",
        /// Fire nothing for it; go on from now.
        Skip = "skip",
    }
}

string_enum! {
    /// What a task does with a fire time while its previous run is going.
    OverlapPolicy {
        /// Skip the tick.
        Skip = "skip",
        /// Fire anyway.
        Allow = "allow",
    }
}

string_enum! {
    /// What a fan-out task does when no active node matches its target.
    NoNodePolicy {
        /// Record the run `dead` with the reason.
        Fail = "fail",
        /// Wait, trying the same fire time again, until a node appears.
        Hold = "hold",
    }
}

string_enum! {
    /// Whether a target means one matching node or every one.
    Fanout {
        /// Any one matching node.
        One = "one",
        /// Every active matching node.
        All = "all",
    }
}

/// Limits of a job request.
pub mod limits {
    /// Longest job name, in characters.
    pub const JOB_NAME_MAX: usize = 200;
    /// Longest command, in bytes.
    pub const COMMAND_MAX: usize = 64 * 1024;
    /// Longest description, in characters.
    pub const DESCRIPTION_MAX: usize = 2000;
    /// Largest timeout, in seconds (7 days).
    pub const TIMEOUT_MAX: i32 = 7 * 24 * 3600;
    /// Most environment variables.
    pub const ENV_MAX: usize = 100;
    /// Largest `limits.cpuSeconds` (7 days of CPU).
    pub const CPU_SECONDS_MAX: u64 = 7 * 24 * 3600;
    /// Largest `limits.memoryMb` (1 TiB).
    pub const MEMORY_MB_MAX: u64 = 1 << 20;
    /// Largest `limits.maxFiles`.
    pub const MAX_FILES_MAX: u64 = 1 << 20;
    /// Largest `limits.maxProcesses` (Linux's highest `pid_max`).
    pub const MAX_PROCESSES_MAX: u64 = 1 << 22;
}

/// Per-job limits as a submit or task body carries them (`limits`): each
/// optional, a whole number from 1 up to its bound. Held as JSON values so
/// a wrong one is refused naming its field (`limits.cpuSeconds`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(
    as = JobLimits,
    example = json!({"cpuSeconds": 60, "memoryMb": 512, "maxFiles": 256, "maxProcesses": 64})
)]
pub struct LimitsRequest {
    /// CPU seconds of each process (RLIMIT_CPU), 1 to 604800.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 604_800)]
    pub cpu_seconds: Option<serde_json::Value>,
    /// Address space of each process, in MiB (RLIMIT_AS), 1 to 1048576.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_048_576)]
    pub memory_mb: Option<serde_json::Value>,
    /// Open files of each process (RLIMIT_NOFILE), 1 to 1048576.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_048_576)]
    pub max_files: Option<serde_json::Value>,
    /// Processes of the job's user (RLIMIT_NPROC), 1 to 4194304.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 4_194_304)]
    pub max_processes: Option<serde_json::Value>,
}

/// Validated per-job limits (README, "Guarantees and choices", jobs run
/// bounded). A worker applies each as min(job, worker) where it has a limit
/// of its own, else the job's: a job can only tighten the operator's
/// limits. Stored as JSON in `jobs.limits` and `tasks.limits`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobLimitsShown)]
pub struct JobLimits {
    /// CPU seconds (RLIMIT_CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Address space of each process, in MiB (RLIMIT_AS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Open files of each process (RLIMIT_NOFILE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
    /// Processes of the job's user (RLIMIT_NPROC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
}

impl JobLimits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == JobLimits::default()
    }
}

impl LimitsRequest {
    /// Checks every limit; `None` when none is set.
    pub fn validate(&self) -> Result<Option<JobLimits>, FieldError> {
        fn one(
            field: &'static str,
            value: &Option<serde_json::Value>,
            max: u64,
        ) -> Result<Option<u64>, FieldError> {
            match value {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
                    _ => Err(field_error(
                        field,
                        format!("must be a whole number from 1 to {max}, not {v}"),
                    )),
                },
            }
        }
        let l = JobLimits {
            cpu_seconds: one(
                "limits.cpuSeconds",
                &self.cpu_seconds,
                limits::CPU_SECONDS_MAX,
            )?,
            memory_mb: one("limits.memoryMb", &self.memory_mb, limits::MEMORY_MB_MAX)?,
            max_files: one("limits.maxFiles", &self.max_files, limits::MAX_FILES_MAX)?,
            max_processes: one(
                "limits.maxProcesses",
                &self.max_processes,
                limits::MAX_PROCESSES_MAX,
            )?,
        };
        Ok((!l.is_empty()).then_some(l))
    }
}

/// Where a job should run, as submitted. `nodeId` cannot be combined with
/// `nodeGroup` or `nodeRole` (422); group and role together mean nodes of
/// both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"nodeGroup": "default", "fanout": "one"}))]
pub struct TargetRequest {
    /// One node by id.
    pub node_id: Option<Uuid>,
    /// Nodes of a group.
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)]
    pub node_group: Option<String>,
    /// Nodes of a role.
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)]
    pub node_role: Option<String>,
    /// `one` (default): any one matching node; `all`: one job per active
    /// matching node.
    #[schema(value_type = Option<Fanout>)]
    pub fanout: Option<String>,
}

/// The body of `POST /jobs/submit`, and of a `job.submit.v1` message less its
/// `userId`.
///
/// Optional fields may be omitted or null; unknown fields are refused with
/// 422. An `inline` job's command is `diagnostics` or `noop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SubmitJob, example = json!({
    "jobName": "hello",
    "command": "echo hello from $(hostname)",
    "timeoutSeconds": 30,
    "priority": 5,
    "target": {"nodeGroup": "default"},
    "env": {"GREETING": "hi"}
}))]
pub struct SubmitRequest {
    /// A short name for people; trimmed, then 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub job_name: String,
    /// The shell command (run with the node's shell, default `/bin/sh -c`,
    /// in its own process group), or for `inline` the built-in name
    /// `diagnostics` or `noop`. Not blank, at most 65536 bytes.
    #[schema(min_length = 1, max_length = 65536, pattern = r"\S")]
    pub command: String,
    /// Free text, at most 2000 characters.
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    /// `pool` (default), `background`, `inline`, or a seed alias
    /// (`Runspace`, `BackgroundJob`, `MainLoop`).
    #[schema(schema_with = execution_mode_input)]
    pub execution_mode: Option<String>,
    /// Seconds before the run is killed, 1 to 604800 (7 days). Default: the
    /// worker's for `pool`, none otherwise.
    #[schema(minimum = 1, maximum = 604_800)]
    pub timeout_seconds: Option<i64>,
    /// 0 (lowest) to 9; default 5.
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<i64>,
    /// Where it runs (default: any node).
    pub target: Option<TargetRequest>,
    /// Extra environment variables: at most 100, names
    /// `[A-Za-z_][A-Za-z0-9_]*`.
    #[schema(schema_with = env_map)]
    pub env: Option<BTreeMap<String, String>>,
    /// Extra environment variables whose values are secret: sealed at rest
    /// under `secrets.key`, masked in output and answers (README,
    /// "Secrets"). At most 100, no name also in `env`.
    #[schema(schema_with = env_map)]
    pub secret_env: Option<SecretValues>,
    /// Limits of this job, tightening the worker's.
    pub limits: Option<LimitsRequest>,
}

/// The schema of an optional `executionMode` on input: a canonical name or
/// an alias.
pub fn execution_mode_input() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::String,
            Type::Null,
        ]))
        .enum_values(Some(
            ExecutionMode::INPUTS
                .iter()
                .map(|s| serde_json::Value::from(*s))
                .chain([serde_json::Value::Null]),
        ))
        .description(Some(
            "`pool` (default), `background` or `inline`, or an alias \
             (`Runspace`, `BackgroundJob`, `MainLoop`).",
        ))
        .build()
}

/// The schema of an optional environment map ([`check_env`]): at most
/// [`limits::ENV_MAX`] variables named `[A-Za-z_][A-Za-z0-9_]*` (up to 128
/// characters), string values.
pub fn env_map() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Object,
            Type::Null,
        ]))
        .max_properties(Some(limits::ENV_MAX))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(ENV_NAME_PATTERN))
                .max_length(Some(128)),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(
            ObjectBuilder::new().schema_type(Type::String).into(),
        )))
        .examples([serde_json::json!({"GREETING": "hi"})])
        .build()
}

/// What [`check_env`] accepts as a variable name.
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// A validated target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// One node by id.
    pub node_id: Option<Uuid>,
    /// Nodes of a group.
    pub node_group: Option<String>,
    /// Nodes of a role.
    pub node_role: Option<String>,
    /// One matching node or all of them.
    pub fanout: Fanout,
}

impl Target {
    /// The routing key of the work queue this target maps to.
    pub fn routing_key(&self) -> String {
        match (&self.node_id, &self.node_group, &self.node_role) {
            (Some(id), _, _) => format!("node.{id}"),
            (None, Some(g), Some(r)) => format!("group.{g}.role.{r}"),
            (None, Some(g), None) => format!("group.{g}"),
            (None, None, Some(r)) => format!("role.{r}"),
            (None, None, None) => "any".to_owned(),
        }
    }
}

/// A job request that passed validation: inner code trusts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// A short name for people.
    pub job_name: String,
    /// The command.
    pub command: String,
    /// Free text.
    pub description: String,
    /// How it runs.
    pub execution_mode: ExecutionMode,
    /// Seconds before the run is killed, if any.
    pub timeout_seconds: Option<i32>,
    /// 0..=9.
    pub priority: i16,
    /// Where it runs.
    pub target: Target,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// The secret environment variables, sealed (`base64(nonce ||
    /// ciphertext)` of their JSON map, see [`crate::secrets`]); `None` when
    /// there are none. Never the clear values.
    pub secret_env: Option<String>,
    /// Limits of this job (None: the worker's alone).
    pub limits: Option<JobLimits>,
}

/// A validation failure naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The camelCase field name.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn field_error(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// The built-in commands of `inline` mode.
pub const INLINE_COMMANDS: &[&str] = &["diagnostics", "noop"];

impl SubmitRequest {
    /// Checks every field and returns the trusted form, with no
    /// `secrets.key`: a request carrying `secretEnv` values is refused.
    pub fn validate(self) -> Result<JobSpec, FieldError> {
        self.validate_with(None)
    }

    /// Checks every field and returns the trusted form, sealing
    /// `secretEnv` under `key` (a request carrying secret values without a
    /// key is refused, naming `secretEnv`).
    pub fn validate_with(self, key: Option<&SecretKey>) -> Result<JobSpec, FieldError> {
        let job_name = self.job_name.trim().to_owned();
        if job_name.is_empty() {
            return Err(field_error("jobName", "must not be empty"));
        }
        // Postgres text cannot hold NUL: refuse it here, as bad input.
        if job_name.contains('\0') {
            return Err(field_error("jobName", "must not contain NUL bytes"));
        }
        if job_name.chars().count() > limits::JOB_NAME_MAX {
            return Err(field_error(
                "jobName",
                format!("must be at most {} characters", limits::JOB_NAME_MAX),
            ));
        }
        if self.command.trim().is_empty() {
            return Err(field_error("command", "must not be empty"));
        }
        if self.command.len() > limits::COMMAND_MAX {
            return Err(field_error(
                "command",
                format!("must be at most {} bytes", limits::COMMAND_MAX),
            ));
        }
        if self.command.contains('\0') {
            return Err(field_error("command", "must not contain NUL bytes"));
        }
        let description = self.description.unwrap_or_default();
        if description.contains('\0') {
            return Err(field_error("description", "must not contain NUL bytes"));
        }
        if description.chars().count() > limits::DESCRIPTION_MAX {
            return Err(field_error(
                "description",
                format!("must be at most {} characters", limits::DESCRIPTION_MAX),
            ));
        }
        let execution_mode = match self.execution_mode.as_deref() {
            None => ExecutionMode::Pool,
            Some(m) => m.parse().map_err(|e| field_error("executionMode", e))?,
        };
        if execution_mode == ExecutionMode::Inline
            && !INLINE_COMMANDS.contains(&self.command.trim())
        {
            return Err(field_error(
                "command",
                format!(
                    "inline mode runs only built-in commands: {}",
                    INLINE_COMMANDS.join(", ")
                ),
            ));
        }
        let timeout_seconds = match self.timeout_seconds {
            None => None,
            Some(t) if (1..=i64::from(limits::TIMEOUT_MAX)).contains(&t) => Some(t as i32),
            Some(_) => {
                return Err(field_error(
                    "timeoutSeconds",
                    format!("must be between 1 and {}", limits::TIMEOUT_MAX),
                ));
            }
        };
        let priority = match self.priority {
            None => 5,
            Some(p) if (0..=9).contains(&p) => p as i16,
            Some(_) => return Err(field_error("priority", "must be between 0 and 9")),
        };
        let target = validate_target(self.target.unwrap_or_default())?;
        let env = self.env.unwrap_or_default();
        check_env("env", &env)?;
        let secret_env = self.secret_env.unwrap_or_default().0;
        check_secret_env("secretEnv", &secret_env, &env)?;
        let secret_env = seal_secret_env("secretEnv", &secret_env, key)?;
        let limits = match &self.limits {
            None => None,
            Some(l) => l.validate()?,
        };
        Ok(JobSpec {
            job_name,
            command: self.command,
            description,
            execution_mode,
            timeout_seconds,
            priority,
            target,
            env,
            secret_env,
            limits,
        })
    }
}

/// Checks an environment map (`env`, or a task's `environment`): at most
/// [`limits::ENV_MAX`] variables, names `[A-Za-z_][A-Za-z0-9_]*`, no NUL.
pub fn check_env(field: &'static str, env: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if env.len() > limits::ENV_MAX {
        return Err(field_error(
            field,
            format!("must have at most {} variables", limits::ENV_MAX),
        ));
    }
    if env.values().any(|v| v.contains('\0')) {
        return Err(field_error(field, "values must not contain NUL bytes"));
    }
    for name in env.keys() {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(field_error(
                field,
                format!("`{name}` is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
    }
    Ok(())
}

/// Checks a secret environment map like [`check_env`], and that none of
/// its names is in the plain `env` too (a variable is plain or secret).
pub fn check_secret_env(
    field: &'static str,
    secrets: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
) -> Result<(), FieldError> {
    check_env(field, secrets)?;
    if let Some(name) = secrets.keys().find(|n| env.contains_key(*n)) {
        return Err(field_error(
            field,
            format!(
                "`{name}` is also a plain environment variable; a name may be plain or secret, not both"
            ),
        ));
    }
    Ok(())
}

/// Seals checked secret values under `key`: `None` when there are none, a
/// 422 naming `field` when there are some and no key is configured.
pub fn seal_secret_env(
    field: &'static str,
    secrets: &BTreeMap<String, String>,
    key: Option<&SecretKey>,
) -> Result<Option<String>, FieldError> {
    if secrets.is_empty() {
        return Ok(None);
    }
    let key = key.ok_or_else(|| {
        field_error(
            field,
            "secret values need secrets.key (TASKHOST__SECRETS__KEY) to be configured; \
             see README, \"Secrets\"",
        )
    })?;
    Ok(Some(key.seal(secrets)))
}

fn validate_target(t: TargetRequest) -> Result<Target, FieldError> {
    for (field, value) in [
        ("target.nodeGroup", &t.node_group),
        ("target.nodeRole", &t.node_role),
    ] {
        if let Some(v) = value
            && !is_valid_name(v)
        {
            return Err(field_error(
                field,
                format!("`{v}` must match ^[a-z0-9][a-z0-9_-]{{0,63}}$"),
            ));
        }
    }
    let fanout = match t.fanout.as_deref() {
        None => Fanout::One,
        Some(f) => f.parse().map_err(|e| field_error("target.fanout", e))?,
    };
    if t.node_id.is_some() && (t.node_group.is_some() || t.node_role.is_some()) {
        return Err(field_error(
            "target",
            "nodeId cannot be combined with nodeGroup or nodeRole",
        ));
    }
    Ok(Target {
        node_id: t.node_id,
        node_group: t.node_group,
        node_role: t.node_role,
        fanout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> SubmitRequest {
        SubmitRequest {
            job_name: "n".into(),
            command: "echo hi".into(),
            description: None,
            execution_mode: None,
            timeout_seconds: None,
            priority: None,
            target: None,
            env: None,
            secret_env: None,
            limits: None,
        }
    }

    #[test]
    fn names_follow_the_target_pattern() {
        assert!(is_valid_name("prod"));
        assert!(is_valid_name("a1_b-c"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("Prod"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name("a.b"));
        assert!(!is_valid_name(&"a".repeat(65)));
        assert!(is_valid_name(&"a".repeat(64)));
    }

    #[test]
    fn seed_mode_names_are_aliases() {
        assert_eq!("Runspace".parse(), Ok(ExecutionMode::Pool));
        assert_eq!("BackgroundJob".parse(), Ok(ExecutionMode::Background));
        assert_eq!("MainLoop".parse(), Ok(ExecutionMode::Inline));
        assert!("bogus".parse::<ExecutionMode>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut r = req();
        r.command = "  ".into();
        assert_eq!(r.validate().unwrap_err().field, "command");
        let mut r = req();
        r.timeout_seconds = Some(0);
        assert_eq!(r.validate().unwrap_err().field, "timeoutSeconds");
        let mut r = req();
        r.target = Some(TargetRequest {
            node_group: Some("Bad Group".into()),
            ..Default::default()
        });
        assert_eq!(r.validate().unwrap_err().field, "target.nodeGroup");
        let mut r = req();
        r.execution_mode = Some("inline".into());
        assert_eq!(r.validate().unwrap_err().field, "command");
        // NUL cannot be stored in Postgres text: it is bad input, per field.
        let mut r = req();
        r.job_name = "a\0b".into();
        assert_eq!(r.validate().unwrap_err().field, "jobName");
        let mut r = req();
        r.description = Some("a\0b".into());
        assert_eq!(r.validate().unwrap_err().field, "description");
        let mut r = req();
        r.env = Some([("A".to_owned(), "x\0".to_owned())].into());
        assert_eq!(r.validate().unwrap_err().field, "env");
        let mut r = req();
        r.secret_env = Some(BTreeMap::from([("A".to_owned(), "x\0".to_owned())]).into());
        assert_eq!(r.validate().unwrap_err().field, "secretEnv");
    }

    #[test]
    fn limits_are_positive_bounded_whole_numbers_named_by_field() {
        let with = |l: serde_json::Value| {
            let mut r = req();
            r.limits = Some(serde_json::from_value(l).unwrap());
            r.validate()
        };
        let spec = with(serde_json::json!({"cpuSeconds": 1, "maxFiles": 16})).unwrap();
        assert_eq!(
            spec.limits,
            Some(JobLimits {
                cpu_seconds: Some(1),
                max_files: Some(16),
                ..Default::default()
            })
        );
        assert_eq!(with(serde_json::json!({})).unwrap().limits, None);
        assert_eq!(
            with(serde_json::json!({"cpuSeconds": null}))
                .unwrap()
                .limits,
            None
        );
        for (body, field) in [
            (serde_json::json!({"cpuSeconds": 0}), "limits.cpuSeconds"),
            (serde_json::json!({"memoryMb": -1}), "limits.memoryMb"),
            (serde_json::json!({"maxFiles": 1.5}), "limits.maxFiles"),
            (serde_json::json!({"maxFiles": "16"}), "limits.maxFiles"),
            (
                serde_json::json!({"maxProcesses": 1u64 << 40}),
                "limits.maxProcesses",
            ),
            (
                serde_json::json!({"cpuSeconds": 604_801}),
                "limits.cpuSeconds",
            ),
        ] {
            assert_eq!(with(body.clone()).unwrap_err().field, field, "{body}");
        }
        assert!(serde_json::from_value::<LimitsRequest>(serde_json::json!({"cpu": 1})).is_err());
    }

    #[test]
    fn secret_env_is_sealed_checked_and_needs_a_key() {
        let key = SecretKey::from_bytes([1; 32]);
        let mut r = req();
        r.env = Some([("PLAIN".to_owned(), "p".to_owned())].into());
        r.secret_env = Some(BTreeMap::from([("TOKEN".to_owned(), "s3cr3t".to_owned())]).into());
        let spec = r.clone().validate_with(Some(&key)).unwrap();
        let sealed = spec.secret_env.expect("sealed");
        assert!(!sealed.contains("s3cr3t"));
        assert_eq!(key.open(&sealed).unwrap()["TOKEN"], "s3cr3t");
        assert!(!spec.env.contains_key("TOKEN"));
        // Without a key: 422 naming the field and the setting.
        let e = r.clone().validate().unwrap_err();
        assert_eq!(e.field, "secretEnv");
        assert!(e.message.contains("secrets.key"), "{e}");
        // A name in both maps.
        let mut both = r.clone();
        both.secret_env = Some(BTreeMap::from([("PLAIN".to_owned(), "s".to_owned())]).into());
        let e = both.validate_with(Some(&key)).unwrap_err();
        assert_eq!(e.field, "secretEnv");
        assert!(e.message.contains("PLAIN"), "{e}");
        // Bad names, as for env.
        let mut bad = req();
        bad.secret_env = Some(BTreeMap::from([("1X".to_owned(), "s".to_owned())]).into());
        assert_eq!(
            bad.validate_with(Some(&key)).unwrap_err().field,
            "secretEnv"
        );
        // None at all, or an empty map: nothing sealed, no key needed.
        let mut empty = req();
        empty.secret_env = Some(SecretValues::default());
        assert_eq!(empty.validate().unwrap().secret_env, None);
    }

    #[test]
    fn routing_keys_follow_the_topology() {
        let mut t = Target::default();
        assert_eq!(t.routing_key(), "any");
        t.node_group = Some("prod".into());
        assert_eq!(t.routing_key(), "group.prod");
        t.node_role = Some("gpu".into());
        assert_eq!(t.routing_key(), "group.prod.role.gpu");
        t.node_group = None;
        assert_eq!(t.routing_key(), "role.gpu");
    }
}
