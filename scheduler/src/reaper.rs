//! The reaper: marks nodes whose heartbeats stopped as dead, and hands back
//! jobs whose claim lease ran out (their worker died or hung) so another
//! worker runs them. Rows are locked with SKIP LOCKED, so several schedulers
//! can reap at once without doing the same work twice.

use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::jobs::insert_outbox;
use taskhost_common::messages::JobRun;
use taskhost_common::model::{ExecutionMode, Fanout, Target};
use uuid::Uuid;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Nodes marked dead.
    pub dead_nodes: usize,
    /// Jobs handed back to their queue, with the attempt that lost its claim.
    pub requeued_jobs: Vec<(Uuid, i32)>,
}

/// One pass: nodes silent for `dead_after_secs` are marked inactive and their
/// running claims expire now; jobs whose claim expired go back to `queued`
/// with a new outbox message.
pub async fn reap(pool: &PgPool, dead_after_secs: f64) -> Result<Reaped, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let dead: Vec<(Uuid, Value, Value)> = sqlx::query_as(
        "WITH old AS (
             SELECT node_id, to_jsonb(n.*) AS row FROM nodes n
             WHERE is_active AND last_heartbeat < now() - make_interval(secs => $1)
             FOR UPDATE SKIP LOCKED
         )
         UPDATE nodes SET is_active = false FROM old WHERE nodes.node_id = old.node_id
         RETURNING nodes.node_id, old.row, to_jsonb(nodes.*)",
    )
    .bind(dead_after_secs)
    .fetch_all(&mut *tx)
    .await?;
    for (node_id, old, new) in &dead {
        tracing::warn!(%node_id, "node missed its heartbeats; marked dead");
        changelog::record(
            &mut tx,
            Change {
                table: "nodes",
                record_id: node_id.to_string(),
                action: Action::Update,
                old: Some(old),
                new: Some(new),
                changed_by: "scheduler",
                node_id: None,
                reason: Some("missed heartbeats"),
            },
        )
        .await?;
    }
    if !dead.is_empty() {
        let ids: Vec<Uuid> = dead.iter().map(|d| d.0).collect();
        sqlx::query("UPDATE jobs SET claim_expiry = now() - interval '1 second' WHERE status = 'running' AND claimed_by = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
    }
    let expired: Vec<ExpiredJob> = sqlx::query_as(
        "SELECT job_id, to_jsonb(j.*) AS row, attempt, command, execution_mode, timeout_seconds, env, priority,
                submitted_at, target_node_id, target_node_group, target_node_role
         FROM jobs j
         WHERE status = 'running' AND claim_expiry < now()
         ORDER BY claim_expiry
         LIMIT 200
         FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    for job in &expired {
        let new: Value = sqlx::query_scalar(
            "UPDATE jobs SET status = 'queued', claimed_by = NULL, claim_expiry = NULL, started_at = NULL
             WHERE job_id = $1 RETURNING to_jsonb(jobs.*)",
        )
        .bind(job.job_id)
        .fetch_one(&mut *tx)
        .await?;
        changelog::record(
            &mut tx,
            Change {
                table: "jobs",
                record_id: job.job_id.to_string(),
                action: Action::Update,
                old: Some(&job.row),
                new: Some(&new),
                changed_by: "scheduler",
                node_id: None,
                reason: Some("claim expired; requeued"),
            },
        )
        .await?;
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
            execution_mode: job.execution_mode.parse().unwrap_or(ExecutionMode::Pool),
            timeout_seconds: job.timeout_seconds,
            env: serde_json::from_value(job.env.clone()).unwrap_or_default(),
            priority: job.priority,
            submitted_at: job.submitted_at,
        };
        insert_outbox(&mut tx, &target.routing_key(), &run).await?;
        tracing::warn!(job_id = %job.job_id, attempt = job.attempt, "claim expired; job requeued");
    }
    tx.commit().await?;
    Ok(Reaped {
        dead_nodes: dead.len(),
        requeued_jobs: expired.iter().map(|j| (j.job_id, j.attempt)).collect(),
    })
}

#[derive(sqlx::FromRow)]
struct ExpiredJob {
    job_id: Uuid,
    row: Value,
    attempt: i32,
    command: String,
    execution_mode: String,
    timeout_seconds: Option<i32>,
    env: Value,
    priority: i16,
    submitted_at: chrono::DateTime<chrono::Utc>,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
}
