//! The reaper's and retention's writes to `jobs`: claims of dead nodes
//! expire at once, a job whose lease ran out goes back to `queued` with a
//! new outbox message (running → queued), and finished jobs past their
//! retention are deleted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::changelog::{self, Action, Change};
use crate::messages::JobRun;
use crate::model::{ExecutionMode, Fanout, JobStatus, Target};
use crate::store::accept::insert_outbox;

/// Expired claims one pass requeues at most.
const REQUEUE_BATCH: i64 = 200;

/// Makes the running claims of `nodes` (found dead) expire now, so the
/// next [`requeue_expired`] hands their jobs back.
pub async fn expire_claims_of(conn: &mut PgConnection, nodes: &[Uuid]) -> Result<(), sqlx::Error> {
    if nodes.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "UPDATE jobs SET claim_expiry = now() - interval '1 second'
         WHERE status = 'running' AND claimed_by = ANY($1)",
        nodes,
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ExpiredJob {
    job_id: Uuid,
    row: String,
    attempt: i32,
    command: String,
    execution_mode: ExecutionMode,
    timeout_seconds: Option<i32>,
    env: Json<BTreeMap<String, String>>,
    priority: i16,
    submitted_at: DateTime<Utc>,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
}

/// Puts jobs whose claim lease ran out back to `queued` (their worker died
/// or hung), each with a change row and a new outbox message, in the
/// caller's transaction. Rows another transaction holds are skipped (the
/// next pass takes them). Returns each job with the attempt that lost its
/// claim.
pub async fn requeue_expired(conn: &mut PgConnection) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    let expired: Vec<ExpiredJob> = sqlx::query_as!(
        ExpiredJob,
        r#"SELECT job_id, to_jsonb(j.*)::text AS "row!", attempt, command,
                execution_mode AS "execution_mode: ExecutionMode", timeout_seconds,
                env AS "env: Json<BTreeMap<String, String>>", priority, submitted_at,
                target_node_id, target_node_group, target_node_role
         FROM jobs j
         WHERE status = 'running' AND claim_expiry < now()
         ORDER BY job_id
         LIMIT $1
         FOR UPDATE SKIP LOCKED"#,
        REQUEUE_BATCH,
    )
    .fetch_all(&mut *conn)
    .await?;
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = expired.iter().map(|j| j.job_id).collect();
    let new: Vec<(Uuid, String)> = sqlx::query!(
        r#"UPDATE jobs SET status = 'queued', claimed_by = NULL, claim_expiry = NULL, started_at = NULL
         WHERE job_id = ANY($1) RETURNING job_id, to_jsonb(jobs.*)::text AS "new!""#,
        &ids,
    )
    .map(|r| (r.job_id, r.new))
    .fetch_all(&mut *conn)
    .await?;
    let new: std::collections::HashMap<Uuid, String> = new.into_iter().collect();
    let changes: Vec<Change<'_>> = expired
        .iter()
        .filter_map(|job| {
            new.get(&job.job_id).map(|n| Change {
                table: "jobs",
                record_id: job.job_id.to_string(),
                action: Action::Update,
                old: Some(&job.row),
                new: Some(n),
                changed_by: "scheduler",
                node_id: None,
                reason: Some("claim expired; requeued"),
            })
        })
        .collect();
    changelog::record_many(&mut *conn, &changes).await?;
    for job in &expired {
        let target = Target {
            node_id: job.target_node_id,
            node_group: job.target_node_group.clone(),
            node_role: job.target_node_role.clone(),
            fanout: Fanout::One,
        };
        let run = JobRun {
            job_id: job.job_id,
            attempt: job.attempt,
            command: job.command.clone(),
            execution_mode: job.execution_mode,
            timeout_seconds: job.timeout_seconds,
            env: job.env.0.clone(),
            priority: job.priority,
            submitted_at: job.submitted_at,
        };
        insert_outbox(&mut *conn, &target.routing_key(), &run).await?;
        tracing::warn!(job_id = %job.job_id, attempt = job.attempt, "claim expired; job requeued");
    }
    Ok(expired.iter().map(|j| (j.job_id, j.attempt)).collect())
}

/// Deletes up to `limit` finished jobs (and, by cascade, their history) of
/// the given final states that completed more than `days` ago. Pruning is
/// not written to `data_change` row by row (it would double the rows it
/// removes); the retention pass logs its counts.
pub async fn prune(
    pool: &PgPool,
    states: &[JobStatus],
    days: u32,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "DELETE FROM jobs WHERE job_id IN (
             SELECT job_id FROM jobs WHERE status = ANY($1)
               AND completed_at < now() - make_interval(days => $2::int) LIMIT $3)",
        states as &[JobStatus],
        days as i32,
        limit,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
