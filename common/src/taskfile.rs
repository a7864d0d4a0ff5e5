//! Export and import of tasks: the versioned task file (README, "Export and
//! import"). A task is named by (app, task name), never by its id, so a
//! file moves between systems; an import upserts by that name. Secret
//! environment values leave sealed (the ciphertext under `secrets.key`),
//! never in clear, and an import refuses a sealed value its `secrets.key`
//! cannot open. The file has no times and no ids, and its tasks are sorted
//! by (app, name), so export → import into an empty system → export gives
//! the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use crate::model::FieldError;
use crate::secrets::SecretKey;
use crate::tasks::{self, TASK_COLUMNS, Task, TaskError, TaskRequest};

/// The `format` of a task file.
pub const FORMAT: &str = "taskhost.tasks";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;

/// A task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskFile {
    /// Always `taskhost.tasks`.
    pub format: String,
    /// The file format's version (1).
    pub version: u32,
    /// The tasks, sorted by app, then name.
    pub tasks: Vec<ExportedTask>,
}

/// One task as exported: every field a task is created with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedTask {
    pub app_name: String,
    pub task_name: String,
    pub command: String,
    pub execution_mode: String,
    pub schedule: String,
    pub timezone: String,
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_node_id: Option<uuid::Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_node_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_node_role: Option<String>,
    pub fanout: String,
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    pub max_retries: i64,
    pub retry_delay_seconds: i64,
    pub kill_on_timeout: bool,
    pub misfire_policy: String,
    pub overlap_policy: String,
    pub no_node_policy: String,
    pub description: String,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub parameters: Value,
    pub environment: BTreeMap<String, String>,
    /// The limits of every run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub limits: Option<Value>,
    /// The upstream tasks it runs after, named by app and task name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<ExportedAfter>,
    /// The secret environment sealed under the exporting system's
    /// `secrets.key` (`base64(nonce ‖ ciphertext)`): never in clear. It
    /// imports only where the same key is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_environment_sealed: Option<String>,
}

/// One upstream edge of a task (`after`), portable: the upstream is named
/// by app and task name, not by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedAfter {
    pub app_name: String,
    pub task_name: String,
    /// `succeeded`, `failed` or `finished`.
    pub on: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: serde_json::Map<String, Value>,
}

/// Task ids and their (app, name), both ways.
#[derive(Debug, Default)]
struct Names {
    by_id: std::collections::HashMap<uuid::Uuid, (String, String)>,
    by_name: std::collections::HashMap<(String, String), uuid::Uuid>,
}

impl Names {
    async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let rows: Vec<(uuid::Uuid, String, String)> =
            sqlx::query_as("SELECT task_id, app_name, task_name FROM tasks")
                .fetch_all(pool)
                .await?;
        let mut names = Self::default();
        for (id, app, name) in rows {
            names.by_name.insert((app.clone(), name.clone()), id);
            names.by_id.insert(id, (app, name));
        }
        Ok(names)
    }

    /// A stored `after` (array of `{taskId, on, parameters}`) by names; an
    /// edge to a task that is gone is left out.
    fn export(&self, after: &Value) -> Vec<ExportedAfter> {
        let edges: Vec<crate::params::After> =
            serde_json::from_value(after.clone()).unwrap_or_default();
        edges
            .into_iter()
            .filter_map(|e| {
                let (app, name) = self.by_id.get(&e.task_id)?;
                Some(ExportedAfter {
                    app_name: app.clone(),
                    task_name: name.clone(),
                    on: serde_json::to_value(e.on)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    parameters: e.parameters,
                })
            })
            .collect()
    }

    /// The `after` request of exported edges, by this system's ids.
    fn import(&self, after: &[ExportedAfter]) -> Result<Value, String> {
        let mut out = Vec::with_capacity(after.len());
        for (i, e) in after.iter().enumerate() {
            let id = self
                .by_name
                .get(&(e.app_name.clone(), e.task_name.clone()))
                .ok_or_else(|| {
                    format!(
                        "after[{i}]: no task {}/{} here or in the file",
                        e.app_name, e.task_name
                    )
                })?;
            out.push(serde_json::json!({"taskId": id, "on": e.on, "parameters": e.parameters}));
        }
        Ok(Value::Array(out))
    }
}

impl ExportedTask {
    fn of(t: &Task, names: &Names) -> Self {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let env = t
            .environment
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            app_name: t.app_name.clone(),
            task_name: t.task_name.clone(),
            command: t.command.clone(),
            execution_mode: t.execution_mode.as_str().to_owned(),
            schedule: t.schedule.clone(),
            timezone: t.timezone.clone(),
            enabled: t.enabled,
            assigned_node_id: t.assigned_node_id,
            assigned_node_group: t.assigned_node_group.clone(),
            assigned_node_role: t.assigned_node_role.clone(),
            fanout: t.fanout.as_str().to_owned(),
            priority: i64::from(t.priority),
            timeout_seconds: t.timeout_seconds.map(i64::from),
            max_retries: i64::from(t.max_retries),
            retry_delay_seconds: i64::from(t.retry_delay_seconds),
            kill_on_timeout: t.kill_on_timeout,
            misfire_policy: t.misfire_policy.as_str().to_owned(),
            overlap_policy: t.overlap_policy.as_str().to_owned(),
            no_node_policy: t.no_node_policy.as_str().to_owned(),
            description: t.description.clone(),
            tags: strings(&t.tags),
            parameters: t.parameters.clone(),
            environment: env,
            limits: t.limits.clone().filter(|l| !l.is_null()),
            after: names.export(&t.after),
            secret_environment_sealed: t.secret_environment.clone(),
        }
    }

    /// The request that gives a task every exported field (secrets apart).
    fn request(&self) -> Result<TaskRequest, FieldError> {
        let limits = match &self.limits {
            None => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| FieldError {
                field: "limits",
                message: format!("is not a limits object: {e}"),
            })?),
        };
        Ok(TaskRequest {
            task_name: Some(self.task_name.clone()),
            app_name: Some(self.app_name.clone()),
            command: Some(self.command.clone()),
            execution_mode: Some(self.execution_mode.clone()),
            schedule: Some(self.schedule.clone()),
            timezone: Some(self.timezone.clone()),
            enabled: Some(self.enabled),
            assigned_node_id: Some(self.assigned_node_id),
            assigned_node_group: Some(self.assigned_node_group.clone()),
            assigned_node_role: Some(self.assigned_node_role.clone()),
            fanout: Some(self.fanout.clone()),
            priority: Some(self.priority),
            timeout_seconds: Some(self.timeout_seconds),
            max_retries: Some(self.max_retries),
            retry_delay_seconds: Some(self.retry_delay_seconds),
            kill_on_timeout: Some(self.kill_on_timeout),
            misfire_policy: Some(self.misfire_policy.clone()),
            overlap_policy: Some(self.overlap_policy.clone()),
            no_node_policy: Some(self.no_node_policy.clone()),
            description: Some(self.description.clone()),
            tags: Some(self.tags.clone()),
            parameters: Some(self.parameters.clone()),
            environment: Some(self.environment.clone()),
            secret_environment: None,
            limits: Some(limits),
            // Set in a second pass, once every task of the file exists.
            after: None,
        })
    }

    /// The names of the fields that differ from `other`, in file order.
    fn differences(&self, other: &Self) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Vec::new();
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| k.to_string())
            .collect()
    }
}

/// The tasks of `app` (every app when `None`) as a task file.
pub async fn export(pool: &PgPool, app: Option<&str>) -> Result<TaskFile, sqlx::Error> {
    let tasks: Vec<Task> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE $1::text IS NULL OR app_name = $1
         ORDER BY app_name, task_name"
    )))
    .bind(app)
    .fetch_all(pool)
    .await?;
    let names = Names::load(pool).await?;
    Ok(TaskFile {
        format: FORMAT.to_owned(),
        version: VERSION,
        tasks: tasks.iter().map(|t| ExportedTask::of(t, &names)).collect(),
    })
}

/// What an import did (or, in a dry run, would do) to one task.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportItem {
    /// The task's app.
    pub app_name: String,
    /// The task's name.
    pub task_name: String,
    /// `created`, `updated` or `unchanged`.
    pub action: String,
    /// The fields that differ (an update), in file order.
    pub changed: Vec<String>,
    /// The task's id (absent for a task a dry run would create).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<uuid::Uuid>,
}

/// Why an import was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file or one of its tasks is wrong: nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// Postgres failed (tasks before the failing one may be written).
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Imports a task file: every task is checked first (nothing is written
/// when one is wrong), then each is created or updated by (app, name) in
/// its own transaction, with its change rows. `dry_run` only answers what
/// would change.
pub async fn import(
    pool: &PgPool,
    file: &TaskFile,
    user: &str,
    key: Option<&SecretKey>,
    dry_run: bool,
) -> Result<Vec<ImportItem>, ImportError> {
    if file.format != FORMAT {
        return Err(ImportError::Invalid(format!(
            "format: expected `{FORMAT}`, found `{}`",
            file.format
        )));
    }
    if file.version != VERSION {
        return Err(ImportError::Invalid(format!(
            "version: this taskhost reads version {VERSION}, the file is version {}",
            file.version
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut checked = Vec::with_capacity(file.tasks.len());
    for (i, t) in file.tasks.iter().enumerate() {
        let at = |e: String| {
            ImportError::Invalid(format!("tasks[{i}] ({}/{}): {e}", t.app_name, t.task_name))
        };
        if !seen.insert((t.app_name.clone(), t.task_name.clone())) {
            return Err(at("the file names this task twice".to_owned()));
        }
        let request = t.request().map_err(|e| at(e.to_string()))?;
        // Validated as a create would be (the same rules as the API).
        Task::from_request(request.clone(), user).map_err(|e| at(e.to_string()))?;
        if let Some(sealed) = &t.secret_environment_sealed {
            let key = key.ok_or_else(|| {
                at("secretEnvironmentSealed needs secrets.key, and none is configured".to_owned())
            })?;
            key.open(sealed).map_err(|_| {
                at("secretEnvironmentSealed was sealed under another secrets.key: configure the exporting system's key".to_owned())
            })?;
        }
        checked.push((t, request));
    }
    // Every upstream must be in the file or already here.
    let mut names = Names::load(pool).await?;
    for (i, t) in file.tasks.iter().enumerate() {
        for (j, e) in t.after.iter().enumerate() {
            let key = (e.app_name.clone(), e.task_name.clone());
            if !names.by_name.contains_key(&key) && !seen.contains(&key) {
                return Err(ImportError::Invalid(format!(
                    "tasks[{i}] ({}/{}): after[{j}]: no task {}/{} here or in the file",
                    t.app_name, t.task_name, e.app_name, e.task_name
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(checked.len());
    for (t, request) in checked {
        let existing: Option<Task> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE app_name = $1 AND task_name = $2"
        )))
        .bind(&t.app_name)
        .bind(&t.task_name)
        .fetch_optional(pool)
        .await?;
        let item = |action: &str, changed: Vec<String>, id| ImportItem {
            app_name: t.app_name.clone(),
            task_name: t.task_name.clone(),
            action: action.to_owned(),
            changed,
            task_id: id,
        };
        match existing {
            None if dry_run => out.push(item("created", Vec::new(), None)),
            None => {
                let mut task = Task::from_request(request, user).map_err(invalid)?;
                task.secret_environment = t.secret_environment_sealed.clone();
                let task = tasks::create_task(pool, task, user)
                    .await
                    .map_err(task_error)?;
                out.push(item("created", Vec::new(), Some(task.task_id)));
            }
            Some(current) => {
                let changed = ExportedTask::of(&current, &names).differences(t);
                if changed.is_empty() {
                    out.push(item("unchanged", changed, Some(current.task_id)));
                } else if dry_run {
                    out.push(item("updated", changed, Some(current.task_id)));
                } else {
                    tasks::update_imported(
                        pool,
                        current.task_id,
                        request,
                        t.secret_environment_sealed.clone(),
                        user,
                    )
                    .await
                    .map_err(task_error)?;
                    out.push(item("updated", changed, Some(current.task_id)));
                }
            }
        }
    }
    // Second pass: the chains, now that every task of the file exists.
    if !dry_run {
        names = Names::load(pool).await?;
        for (t, item) in file.tasks.iter().zip(&out) {
            let Some(id) = item.task_id else { continue };
            let Some(current) = tasks::get(pool, id).await? else {
                continue;
            };
            if names.export(&current.after) == t.after {
                continue;
            }
            let after = names.import(&t.after).map_err(|e| {
                ImportError::Invalid(format!("{}/{}: {e}", t.app_name, t.task_name))
            })?;
            let request = TaskRequest {
                after: Some(after),
                ..TaskRequest::default()
            };
            tasks::update(pool, id, request, user)
                .await
                .map_err(task_error)?;
        }
    }
    Ok(out)
}

fn invalid(e: FieldError) -> ImportError {
    ImportError::Invalid(e.to_string())
}

fn task_error(e: TaskError) -> ImportError {
    match e {
        TaskError::Db(e) => ImportError::Db(e),
        other => ImportError::Invalid(other.to_string()),
    }
}
