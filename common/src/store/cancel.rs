//! A user's writes to one job: cancel it (→ `cancelled` before it starts,
//! or a cancel request that its worker obeys) and delete a finished job's
//! result. Both lock the row, write the change row in the same
//! transaction, and answer what the api needs to tell the caller.

use sqlx::PgPool;
use uuid::Uuid;

use crate::changelog::{self, Action, Change};
use crate::model::JobStatus;
use crate::tasks;

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// No such job.
    NotFound,
    /// The job had already ended in this state.
    AlreadyFinished(JobStatus),
    /// The job is running: its cancel is requested, and the node running
    /// it should be told to stop it now.
    Requested {
        /// The node holding the claim.
        node: Option<Uuid>,
        /// The running attempt.
        attempt: i32,
    },
    /// The job had not started: it is `cancelled` now.
    BeforeStart {
        /// Its attempt number.
        attempt: i32,
    },
}

#[derive(sqlx::FromRow)]
struct CancelRow {
    row: String,
    status: JobStatus,
    claimed_by: Option<Uuid>,
    attempt: i32,
    task_id: Option<Uuid>,
}

/// Cancels a job on behalf of `by` (visibility is the caller's check).
pub async fn cancel(pool: &PgPool, job_id: Uuid, by: &str) -> Result<Cancelled, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current: Option<CancelRow> = sqlx::query_as!(
        CancelRow,
        r#"SELECT to_jsonb(j.*)::text AS "row!", status AS "status: JobStatus", claimed_by, attempt,
                task_id
         FROM jobs j
         WHERE job_id = $1 FOR UPDATE"#,
        job_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(CancelRow {
        row: old,
        status,
        claimed_by,
        attempt,
        task_id,
    }) = current
    else {
        return Ok(Cancelled::NotFound);
    };
    if status.is_terminal() {
        return Ok(Cancelled::AlreadyFinished(status));
    }
    let (new, answer): (String, Cancelled) = if status == JobStatus::Running {
        let new = sqlx::query_scalar!(
            r#"UPDATE jobs SET cancel_requested = true WHERE job_id = $1
             RETURNING to_jsonb(jobs.*)::text AS "new!""#,
            job_id,
        )
        .fetch_one(&mut *tx)
        .await?;
        (
            new,
            Cancelled::Requested {
                node: claimed_by,
                attempt,
            },
        )
    } else {
        // Not started: it ends here; a worker that receives its message later
        // sees a finished job and acks it without running.
        let new = sqlx::query_scalar!(
            r#"UPDATE jobs SET cancel_requested = true, status = 'cancelled', completed_at = now(),
                    success = false, retry_at = NULL,
                    status_reason = CASE WHEN attempt > 0 THEN 'cancelled while waiting for its retry'
                                         ELSE 'cancelled before it started' END
             WHERE job_id = $1 RETURNING to_jsonb(jobs.*)::text AS "new!""#,
            job_id,
        )
        .fetch_one(&mut *tx)
        .await?;
        // A job waiting for a retry already has a (non-final) row for its
        // last attempt; the cancel is the next one.
        sqlx::query!(
            "INSERT INTO task_history (task_id, job_id, attempt, state, is_final, triggered_by, duration_ms)
             SELECT task_id, job_id,
                    attempt + CASE WHEN EXISTS (SELECT 1 FROM task_history h
                                                WHERE h.job_id = j.job_id AND h.attempt = j.attempt)
                                   THEN 1 ELSE 0 END,
                    'cancelled', true, triggered_by, 0
             FROM jobs j WHERE job_id = $1
             ON CONFLICT DO NOTHING",
            job_id,
        )
        .execute(&mut *tx)
        .await?;
        // A task run that ends here frees its task's schedule, as a run that
        // ends on a worker does.
        if let Some(task_id) = task_id {
            tasks::record_run_end(&mut tx, task_id, "cancelled", false, by, None).await?;
            super::chain::upstream_ended(&mut tx, task_id, job_id, "cancelled", by).await?;
        }
        (new, Cancelled::BeforeStart { attempt })
    };
    changelog::record(
        &mut tx,
        Change {
            table: "jobs",
            record_id: job_id.to_string(),
            action: Action::Update,
            old: Some(&old),
            new: Some(&new),
            changed_by: by,
            node_id: None,
            reason: Some("cancel requested"),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(answer)
}

/// What deleting a result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// No such job of this user.
    NotFound,
    /// The job has not ended (its status); nothing was deleted.
    NotFinished(JobStatus),
    /// The job and its history are gone.
    Deleted,
}

/// Deletes `user`'s finished job (its history goes with it, by cascade),
/// with a DELETE change row.
pub async fn delete(pool: &PgPool, job_id: Uuid, user: &str) -> Result<Deleted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let old: Option<(String, JobStatus)> = sqlx::query!(
        r#"SELECT to_jsonb(j.*)::text AS "row!", status AS "status: JobStatus"
         FROM jobs j WHERE job_id = $1 AND user_id = $2 FOR UPDATE"#,
        job_id,
        user,
    )
    .map(|r| (r.row, r.status))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((old, status)) = old else {
        return Ok(Deleted::NotFound);
    };
    if !status.is_terminal() {
        return Ok(Deleted::NotFinished(status));
    }
    sqlx::query!("DELETE FROM jobs WHERE job_id = $1", job_id)
        .execute(&mut *tx)
        .await?;
    changelog::record(
        &mut tx,
        Change {
            table: "jobs",
            record_id: job_id.to_string(),
            action: Action::Delete,
            old: Some(&old),
            new: None,
            changed_by: user,
            node_id: None,
            reason: Some("result deleted"),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Deleted::Deleted)
}
