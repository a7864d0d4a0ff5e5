//! The `after` arrow of a chain: the end of an upstream task's run becomes
//! a `pending` run of each downstream task whose `after` it matches
//! (`[upstream final] ──after──► [pending]`), inside the transaction that
//! records the upstream's end (`finish.rs`), so a crash never loses nor
//! doubles the downstream run.
//!
//! A downstream with one upstream fires once per matching end. With
//! several (fan-in), each matching end is noted in the downstream's
//! `task_chain_state` row (an upsert, which locks the row: two upstreams
//! ending at once are serialized), and the run fires when every upstream
//! that still exists has one since the last dependency run; the row is
//! then emptied. The job carries `triggered_by = dependency` and
//! `upstream_job_id` (the end that completed the set); the unique index
//! `jobs (task_id, upstream_job_id)` makes a repeated recording a no-op.
//!
//! Parameters of the downstream run: its own defaults, overridden by the
//! values the upstream run had for parameters of the same name
//! (`TASKHOST_PARAM_*` in its environment, kept when they fit the
//! downstream's type), overridden by the fixed `parameters` of the
//! `after` edges.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::jobs::{Accepted, NewJob, TaskRun};
use crate::model::{
    ExecutionMode, Fanout, MisfirePolicy, NoNodePolicy, OverlapPolicy, TriggeredBy,
};
use crate::params;
use crate::tasks::{self, Task};

/// Fires the downstream runs of an upstream run that ended with `status`.
/// Called in the transaction that records the end (after the upstream's
/// `task_schedule` row is updated).
pub async fn upstream_ended(
    conn: &mut PgConnection,
    upstream_task: Uuid,
    upstream_job: Uuid,
    status: &str,
    by: &str,
) -> Result<(), sqlx::Error> {
    // The columns of `tasks::TASK_COLUMNS`, written out for the macro (it
    // checks that they fill every field of `Task`).
    let downstream: Vec<Task> = sqlx::query_as!(
        Task,
        r#"SELECT task_id, task_name, app_name, command,
                execution_mode AS "execution_mode: ExecutionMode", schedule, timezone, enabled,
                assigned_node_id, assigned_node_group, assigned_node_role,
                fanout AS "fanout: Fanout", priority, timeout_seconds, max_retries,
                retry_delay_seconds, kill_on_timeout,
                misfire_policy AS "misfire_policy: MisfirePolicy",
                overlap_policy AS "overlap_policy: OverlapPolicy",
                no_node_policy AS "no_node_policy: NoNodePolicy", description, tags, parameters,
                after, environment, secret_environment, limits, created_by, created_at,
                modified_by, modified_at
         FROM tasks
         WHERE after @> jsonb_build_array(jsonb_build_object('taskId', $1::text))
         ORDER BY task_id"#,
        upstream_task.to_string(),
    )
    .fetch_all(&mut *conn)
    .await?;
    if downstream.is_empty() {
        return Ok(());
    }
    let upstream_env: Option<Value> =
        sqlx::query_scalar!("SELECT env FROM jobs WHERE job_id = $1", upstream_job)
            .fetch_optional(&mut *conn)
            .await?;
    for task in &downstream {
        let Ok(edges) = task.after_edges() else {
            continue;
        };
        if !edges
            .iter()
            .any(|e| e.task_id == upstream_task && e.on.matches(status))
        {
            continue;
        }
        // Upstreams deleted since do not hold the downstream back.
        let ids: Vec<Uuid> = edges.iter().map(|e| e.task_id).collect();
        let existing: Vec<Uuid> =
            sqlx::query_scalar!("SELECT task_id FROM tasks WHERE task_id = ANY($1)", &ids)
                .fetch_all(&mut *conn)
                .await?;
        let satisfied: Value = sqlx::query_scalar!(
            "INSERT INTO task_chain_state (task_id, satisfied) VALUES ($1, jsonb_build_object($2::text, $3::text))
             ON CONFLICT (task_id) DO UPDATE SET satisfied = task_chain_state.satisfied || EXCLUDED.satisfied
             RETURNING satisfied",
            task.task_id,
            upstream_task.to_string(),
            upstream_job.to_string(),
        )
        .fetch_one(&mut *conn)
        .await?;
        let all = existing
            .iter()
            .all(|id| satisfied.get(id.to_string()).is_some());
        if !all {
            continue;
        }
        let job_id = fire(conn, task, &edges, upstream_job, upstream_env.as_ref(), by).await?;
        sqlx::query!(
            "UPDATE task_chain_state SET satisfied = '{}'::jsonb, last_fired_at = now(),
                    last_fired_job = coalesce($2, last_fired_job), fire_count = fire_count + CASE WHEN $2 IS NULL THEN 0 ELSE 1 END
             WHERE task_id = $1",
            task.task_id,
            job_id,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// One dependency run of `task`; its job id, or `None` when it was not
/// created (it exists already, or the task cannot run as stored).
async fn fire(
    conn: &mut PgConnection,
    task: &Task,
    edges: &[params::After],
    upstream_job: Uuid,
    upstream_env: Option<&Value>,
    by: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let Ok(defs) = task.param_defs() else {
        return Ok(None);
    };
    let mut supplied = Map::new();
    if let Some(Value::Object(env)) = upstream_env {
        for (name, def) in &defs {
            if let Some(v) = env.get(&params::env_name(name))
                && params::coerce(def, v).is_ok()
            {
                supplied.insert(name.clone(), v.clone());
            }
        }
    }
    for e in edges {
        for (k, v) in &e.parameters {
            supplied.insert(k.clone(), v.clone());
        }
    }
    let values: BTreeMap<String, String> = match params::resolve(&defs, &supplied, "parameters") {
        Ok(v) => v,
        Err(error) => {
            tracing::warn!(task_id = %task.task_id, %upstream_job, %error, "dependency run not fired");
            return Ok(None);
        }
    };
    let spec = match task.job_spec_with(&values) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(task_id = %task.task_id, %upstream_job, %error, "task no longer valid; dependency run not fired");
            return Ok(None);
        }
    };
    let job_id = Uuid::now_v7();
    let accepted = crate::jobs::accept_in(
        conn,
        &NewJob {
            job_id,
            user_id: &task.created_by,
            spec: &spec,
            triggered_by: TriggeredBy::Dependency,
            idempotency_key: None,
            request_hash: None,
            changed_by: by,
            task: Some(TaskRun {
                task_id: task.task_id,
                fire_at: None,
                max_retries: task.max_retries,
                retry_delay_seconds: task.retry_delay_seconds,
                kill_on_timeout: task.kill_on_timeout,
                upstream_job_id: Some(upstream_job),
            }),
            rerun_of: None,
        },
    )
    .await?;
    match accepted {
        Accepted::Created { status, .. } => {
            tasks::record_unscheduled_start(conn, task.task_id, status, by, "after upstream run")
                .await?;
            tracing::info!(task_id = %task.task_id, %job_id, %upstream_job, "dependency run fired");
            Ok(Some(job_id))
        }
        _ => Ok(None),
    }
}
