//! The `fire` arrow: a recurring task's fire time becomes a `pending` job
//! (`[task fire time] ──fire──► [pending]`), many at once.
//!
//! [`fire_batch`] writes every job row of a scheduler pass with one INSERT
//! (UNNEST), their `data_change` rows with one INSERT and their outbox rows
//! with one INSERT, inside the caller's transaction. A fire time that
//! already has its job (the unique `jobs_task_fire_idx` on
//! `(task_id, fire_at, node)`) is skipped (`ON CONFLICT DO NOTHING`) and
//! answered `None`: another scheduler fired it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::changelog::{self, Action, Change};
use crate::jobs::{OutboxMessage, TaskRun};
use crate::messages::JOB_RUN_V1;
use crate::model::{Fanout, JobSpec};
use crate::store::accept::{SpecColumns, first_run};

/// One fire time of a task, to become one job routed by the task's target.
/// Only single-target tasks (`fanout` one) take this path; a fan-out to
/// all nodes goes through `jobs::accept_in`.
#[derive(Debug, Clone)]
pub struct Fire<'a> {
    /// The new job's id (UUIDv7).
    pub job_id: Uuid,
    /// Owner (the task's creator).
    pub user_id: &'a str,
    /// The task's job.
    pub spec: &'a JobSpec,
    /// The task and its fire time (`fire_at` must be set).
    pub task: TaskRun,
    /// The W3C `traceparent` of the fire's span, for its work message
    /// (README, "Tracing"); None when tracing is off.
    pub traceparent: Option<String>,
}

/// Inserts the jobs of `fires` (with their change rows and outbox rows) on
/// `conn`, which must be inside a transaction. Answers one entry per fire,
/// in order: the committed-to-be outbox row, or `None` when that
/// (task, fire time) already had a job.
pub async fn fire_batch(
    conn: &mut PgConnection,
    fires: &[Fire<'_>],
    changed_by: &str,
) -> Result<Vec<Option<OutboxMessage>>, sqlx::Error> {
    if fires.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(fires.iter().all(|f| f.spec.target.fanout == Fanout::One));
    let ids: Vec<Uuid> = fires.iter().map(|f| f.job_id).collect();
    let users: Vec<&str> = fires.iter().map(|f| f.user_id).collect();
    let spec = SpecColumns::of(fires.iter().map(|f| f.spec));
    let task_ids: Vec<Uuid> = fires.iter().map(|f| f.task.task_id).collect();
    let fire_ats: Vec<Option<DateTime<Utc>>> = fires.iter().map(|f| f.task.fire_at).collect();
    let max_retries: Vec<i32> = fires.iter().map(|f| f.task.max_retries).collect();
    let delays: Vec<i32> = fires.iter().map(|f| f.task.retry_delay_seconds).collect();
    let kills: Vec<bool> = fires.iter().map(|f| f.task.kill_on_timeout).collect();
    let inserted: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query!(
        r#"INSERT INTO jobs (job_id, user_id, job_name, command, description, execution_mode, status,
                           target_node_id, target_node_group, target_node_role, fanout, priority,
                           timeout_seconds, env, triggered_by, task_id, fire_at, max_retries,
                           retry_delay_seconds, kill_on_timeout, secret_env, limits)
         SELECT id, u, n, c, d, m, 'pending', ni, ng, nr, 'one', p, t, e, 'schedule', ti, fa, mr, rd, k, se, li
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::uuid[], $8::text[], $9::text[], $10::int2[], $11::int4[], $12::jsonb[],
                     $13::uuid[], $14::timestamptz[], $15::int4[], $16::int4[], $17::bool[],
                     $18::text[], $19::jsonb[])
              AS x(id, u, n, c, d, m, ni, ng, nr, p, t, e, ti, fa, mr, rd, k, se, li)
         ON CONFLICT DO NOTHING
         RETURNING job_id, to_jsonb(jobs.*)::text AS "row!", submitted_at"#,
        &ids,
        &users as &[&str],
        &spec.names as &[&str],
        &spec.commands as &[&str],
        &spec.descriptions as &[&str],
        &spec.modes as &[&str],
        &spec.node_ids as &[Option<Uuid>],
        &spec.groups as &[Option<&str>],
        &spec.roles as &[Option<&str>],
        &spec.priorities,
        &spec.timeouts as &[Option<i32>],
        &spec.envs,
        &task_ids,
        &fire_ats as &[Option<DateTime<Utc>>],
        &max_retries,
        &delays,
        &kills,
        &spec.secret_envs as &[Option<&str>],
        &spec.limits as &[Option<Value>],
    )
    .map(|r| (r.job_id, r.row, r.submitted_at))
    .fetch_all(&mut *conn)
    .await?;
    let by_id: HashMap<Uuid, usize> = inserted
        .iter()
        .enumerate()
        .map(|(k, (id, _, _))| (*id, k))
        .collect();
    let fresh: Vec<&Fire<'_>> = fires
        .iter()
        .filter(|f| by_id.contains_key(&f.job_id))
        .collect();
    let changes: Vec<Change<'_>> = fresh
        .iter()
        .map(|f| Change {
            table: "jobs",
            record_id: f.job_id.to_string(),
            action: Action::Insert,
            old: None,
            new: Some(&inserted[by_id[&f.job_id]].1),
            changed_by,
            node_id: None,
            reason: Some("submitted"),
        })
        .collect();
    changelog::record_many(conn, &changes).await?;
    let keys: Vec<String> = fresh.iter().map(|f| f.spec.target.routing_key()).collect();
    let message_ids: Vec<String> = fresh.iter().map(|f| format!("{}:0", f.job_id)).collect();
    let payloads: Vec<Value> = fresh
        .iter()
        .map(|f| {
            let run = first_run(f.job_id, f.spec, inserted[by_id[&f.job_id]].2);
            serde_json::to_value(&run).unwrap_or(Value::Null)
        })
        .collect();
    let run_ids: Vec<Uuid> = fresh.iter().map(|f| f.job_id).collect();
    let run_priorities: Vec<i16> = fresh.iter().map(|f| f.spec.priority).collect();
    // With tracing off the array is empty: UNNEST pads it with NULLs.
    let traceparents: Vec<Option<&str>> = if fresh.iter().any(|f| f.traceparent.is_some()) {
        fresh.iter().map(|f| f.traceparent.as_deref()).collect()
    } else {
        Vec::new()
    };
    let outbox: Vec<OutboxMessage> = sqlx::query_as!(
        OutboxMessage,
        r#"INSERT INTO outbox (exchange, routing_key, message_type, message_id, priority, payload, job_id, traceparent)
         SELECT 'work', rk, $2, mid, p, pl, j, tp
         FROM UNNEST($1::text[], $3::text[], $4::int2[], $5::jsonb[], $6::uuid[], $7::text[])
              AS x(rk, mid, p, pl, j, tp)
         RETURNING outbox_id, exchange, routing_key, message_type, message_id, priority, payload::text AS "payload!", job_id, traceparent"#,
        &keys,
        JOB_RUN_V1,
        &message_ids,
        &run_priorities,
        &payloads,
        &run_ids,
        &traceparents as &[Option<&str>],
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut outbox: HashMap<Uuid, OutboxMessage> = outbox
        .into_iter()
        .filter_map(|m| m.job_id.map(|id| (id, m)))
        .collect();
    Ok(fires.iter().map(|f| outbox.remove(&f.job_id)).collect())
}
