//! `/api/v1/tasks/export` and `/api/v1/tasks/import`: tasks as a versioned
//! file (`taskhost_common::taskfile`; README, "Export and import"). Both
//! need task_manager, system_admin or site_admin.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use taskhost_common::model::Role;
use taskhost_common::taskfile::{self, ImportError, ImportItem, TaskFile};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::jobs::parse_json;
use crate::state::AppState;

const WRITERS: &[Role] = &[Role::TaskManager, Role::SystemAdmin, Role::SiteAdmin];

/// Which tasks to export.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// Only this app's tasks (default: every app).
    #[param(min_length = 1, max_length = 200, pattern = r"\S")]
    app: Option<String>,
}

/// Export tasks
///
/// The tasks as a versioned task file (`format` `taskhost.tasks`,
/// `version` 1): every field a task is created with, named by app and task
/// name, sorted; no ids, no times. Secret environment values are exported
/// sealed under this system's `secrets.key` (`secretEnvironmentSealed`),
/// never in clear. Roles: task_manager, system_admin or site_admin.
#[utoipa::path(
    get,
    path = "/tasks/export",
    operation_id = "exportTasks",
    tag = "tasks",
    params(ExportQuery),
    responses(
        (status = 200, description = "The task file.", body = TaskFile),
        (status = 403, response = crate::doc::Forbidden),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn export(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TaskFile>, ApiError> {
    caller.require_any(WRITERS, "exporting tasks")?;
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    if let Some(app) = &query.app
        && (app.trim().is_empty() || app.chars().count() > 200)
    {
        return Err(ApiError::Invalid(
            "app: 1 to 200 characters, not blank".into(),
        ));
    }
    let file = taskfile::export(&state.pool, query.app.as_deref()).await?;
    Ok(Json(file))
}

/// How to import.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ImportQuery {
    /// Only answer what would change; write nothing.
    #[serde(default)]
    dry_run: bool,
}

/// What an import did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ImportAnswer {
    #[schema(schema_with = crate::doc::always_true)]
    success: bool,
    /// Whether this was a dry run (nothing written).
    dry_run: bool,
    /// Tasks created, updated and unchanged.
    created: usize,
    updated: usize,
    unchanged: usize,
    /// Each task of the file, in file order.
    tasks: Vec<ImportItem>,
}

/// Import tasks
///
/// Upserts the tasks of a task file by (app, task name): new ones are
/// created, changed ones updated (every field, as in the file), equal
/// ones left alone; each answer item names the fields that differ. The
/// whole file is checked first, so a wrong task (422 naming it) writes
/// nothing. A sealed secret environment imports only where this system's
/// `secrets.key` opens it. Roles: task_manager, system_admin or site_admin.
#[utoipa::path(
    post,
    path = "/tasks/import",
    operation_id = "importTasks",
    tag = "tasks",
    params(ImportQuery),
    request_body(content = TaskFile, description = "A task file, as `GET /tasks/export` gives it."),
    responses(
        (status = 200, description = "What was (or, in a dry run, would be) done.", body = ImportAnswer),
        (status = 403, response = crate::doc::Forbidden),
        (status = 422, response = crate::doc::Invalid),
    )
)]
pub(crate) async fn import(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Json<ImportAnswer>, ApiError> {
    caller.require_any(WRITERS, "importing tasks")?;
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let file: TaskFile = parse_json(&body)?;
    let key = state.settings.secrets.key();
    let items = taskfile::import(
        &state.pool,
        &file,
        caller.user(),
        key.as_ref(),
        query.dry_run,
    )
    .await
    .map_err(|e| match e {
        ImportError::Invalid(message) => ApiError::Invalid(message),
        ImportError::Db(db) => db.into(),
    })?;
    let count = |a: &str| items.iter().filter(|i| i.action == a).count();
    Ok(Json(ImportAnswer {
        success: true,
        dry_run: query.dry_run,
        created: count("created"),
        updated: count("updated"),
        unchanged: count("unchanged"),
        tasks: items,
    }))
}
