//! The worker's Postgres side: claiming a job (attempt + 1, lease), renewing
//! the lease, and recording the end of a run in one transaction with its
//! history row and change-log rows. The attempt number fences every write,
//! so a worker whose claim was taken over cannot overwrite the newer attempt.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::db;
use taskhost_common::jobs::insert_outbox_delayed;
use taskhost_common::messages::JobRun;
use taskhost_common::model::{JobStatus, TriggeredBy};
use taskhost_common::tasks;
use uuid::Uuid;

/// A job this worker now owns, for one attempt.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    /// The job.
    pub job_id: Uuid,
    /// This attempt.
    pub attempt: i32,
    /// The recurring task, if a task fired it.
    pub task_id: Option<Uuid>,
    /// What caused it.
    pub triggered_by: TriggeredBy,
    /// The job's command (from Postgres, the source of truth).
    pub command: String,
    /// Seconds before the run is killed.
    pub timeout_seconds: Option<i32>,
    /// Extra environment.
    pub env: std::collections::BTreeMap<String, String>,
    /// The work queue the job is addressed to.
    pub routing_key: String,
    /// Retries allowed after a failed attempt (task runs).
    pub max_retries: i32,
    /// First retry delay in seconds, doubled per retry.
    pub retry_delay_seconds: i32,
    /// Whether the run is killed at its timeout.
    pub kill_on_timeout: bool,
}

/// The answer to a claim.
#[derive(Debug)]
pub(crate) enum ClaimResult {
    /// Ours: run it.
    Claimed(Claimed),
    /// Already finished: ack without running.
    Finished(JobStatus),
    /// No such job (its result was deleted): ack without running.
    Missing,
    /// Another worker holds a live claim: wait and ask again.
    Busy,
    /// The job waits for a retry that is not due yet; this delivery is an
    /// older copy. Ack it without running: the delayed message runs it.
    NotDue,
    /// Too many attempts: recorded as dead; ack and dead-letter.
    Dead(String),
}

#[derive(sqlx::FromRow)]
struct Current {
    row: Value,
    status: String,
    attempt: i32,
    claimed_by: Option<Uuid>,
    claim_live: bool,
    task_id: Option<Uuid>,
    triggered_by: String,
    command: String,
    timeout_seconds: Option<i32>,
    env: Value,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
    max_retries: i32,
    retry_delay_seconds: i32,
    cancel_requested: bool,
    kill_on_timeout: bool,
    retry_pending: bool,
}

fn record_job_change<'a>(
    job_id: Uuid,
    old: Option<&'a Value>,
    new: &'a Value,
    node_id: Uuid,
    changed_by: &'a str,
    reason: &'a str,
) -> Change<'a> {
    Change {
        table: "jobs",
        record_id: job_id.to_string(),
        action: Action::Update,
        old,
        new: Some(new),
        changed_by,
        node_id: Some(node_id),
        reason: Some(reason),
    }
}

/// Claims `job_id` for `node_id`. `own_stale` says the job is not running in
/// this process, so a live claim held under this node's id is left over from
/// a previous process of the same node and may be taken over at once.
pub(crate) async fn claim(
    pool: &PgPool,
    job_id: Uuid,
    node_id: Uuid,
    node_name: &str,
    lease: Duration,
    own_stale: bool,
    delivery_limit: u32,
) -> Result<ClaimResult, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Losing this commit in a Postgres crash is harmless (see
    // db::no_fsync_wait), so it does not wait for the disk.
    db::no_fsync_wait(&mut tx).await?;
    let current: Option<Current> = sqlx::query_as(
        "SELECT to_jsonb(j.*) AS row, status, attempt, claimed_by,
                coalesce(claim_expiry > now(), false) AS claim_live, task_id, triggered_by,
                command, timeout_seconds, env, target_node_id, target_node_group, target_node_role,
                max_retries, retry_delay_seconds, cancel_requested, kill_on_timeout,
                coalesce(retry_at > now(), false) AS retry_pending
         FROM jobs j WHERE job_id = $1 FOR UPDATE",
    )
    .bind(job_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(cur) = current else {
        return Ok(ClaimResult::Missing);
    };
    let status: JobStatus = cur.status.parse().unwrap_or(JobStatus::Dead);
    if status.is_terminal() {
        return Ok(ClaimResult::Finished(status));
    }
    if status == JobStatus::Running
        && cur.claim_live
        && !(own_stale && cur.claimed_by == Some(node_id))
    {
        return Ok(ClaimResult::Busy);
    }
    if status == JobStatus::Queued && cur.retry_pending && !cur.cancel_requested {
        return Ok(ClaimResult::NotDue);
    }
    // A cancel requested while the job's previous worker was dying ends it
    // here instead of running it again.
    let give_up = if cur.cancel_requested {
        Some((JobStatus::Cancelled, "cancelled on request".to_owned()))
    } else if cur.attempt >= delivery_limit as i32 + cur.max_retries {
        // Retries of a task run are attempts too; the limit is on top of them.
        Some((
            JobStatus::Dead,
            format!(
                "gave up after {} attempts (delivery limit {delivery_limit})",
                cur.attempt
            ),
        ))
    } else {
        None
    };
    if let Some((status, reason)) = give_up {
        let new: Value = sqlx::query_scalar(
            "UPDATE jobs SET status = $2, status_reason = $3, completed_at = now(), success = false,
                    claim_expiry = NULL
             WHERE job_id = $1 RETURNING to_jsonb(jobs.*)",
        )
        .bind(job_id)
        .bind(status.as_str())
        .bind(&reason)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO task_history (task_id, job_id, node_id, attempt, state, is_final, triggered_by, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, true, $6, $7, 0)
             ON CONFLICT DO NOTHING",
        )
        .bind(cur.task_id)
        .bind(job_id)
        .bind(node_id)
        .bind(cur.attempt + 1)
        .bind(status.as_str())
        .bind(&cur.triggered_by)
        .bind(changelog::gzip(reason.as_bytes()))
        .execute(&mut *tx)
        .await?;
        changelog::record(
            &mut tx,
            record_job_change(job_id, Some(&cur.row), &new, node_id, node_name, &reason),
        )
        .await?;
        if let Some(task_id) = cur.task_id {
            tasks::record_run_end(
                &mut tx,
                task_id,
                status.as_str(),
                false,
                node_name,
                Some(node_id),
            )
            .await?;
        }
        tx.commit().await?;
        return Ok(if status == JobStatus::Dead {
            ClaimResult::Dead(reason)
        } else {
            ClaimResult::Finished(status)
        });
    }
    let attempt = cur.attempt + 1;
    let new: Value = sqlx::query_scalar(
        "UPDATE jobs SET status = 'running', attempt = $2, claimed_by = $3,
                claim_expiry = now() + make_interval(secs => $4), started_at = now(), retry_at = NULL
         WHERE job_id = $1 RETURNING to_jsonb(jobs.*)",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(node_id)
    .bind(lease.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    changelog::record(
        &mut tx,
        record_job_change(job_id, Some(&cur.row), &new, node_id, node_name, "claimed"),
    )
    .await?;
    if let Some(task_id) = cur.task_id {
        tasks::record_run_start(&mut tx, task_id, node_id, node_name).await?;
    }
    tx.commit().await?;
    Ok(ClaimResult::Claimed(Claimed {
        job_id,
        attempt,
        task_id: cur.task_id,
        triggered_by: cur.triggered_by.parse().unwrap_or(TriggeredBy::Api),
        command: cur.command,
        timeout_seconds: cur.timeout_seconds,
        env: serde_json::from_value(cur.env).unwrap_or_default(),
        routing_key: taskhost_common::model::Target {
            node_id: cur.target_node_id,
            node_group: cur.target_node_group,
            node_role: cur.target_node_role,
            fanout: taskhost_common::model::Fanout::One,
        }
        .routing_key(),
        max_retries: cur.max_retries,
        retry_delay_seconds: cur.retry_delay_seconds,
        kill_on_timeout: cur.kill_on_timeout,
    }))
}

/// Extends the claim. `None` means the claim is no longer ours (taken over
/// or the job ended); `Some(true)` means a cancel was requested.
pub(crate) async fn renew(
    pool: &PgPool,
    job_id: Uuid,
    attempt: i32,
    lease: Duration,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE jobs SET claim_expiry = now() + make_interval(secs => $3)
         WHERE job_id = $1 AND attempt = $2 AND status = 'running'
         RETURNING cancel_requested",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// The end of one attempt.
#[derive(Debug, Clone)]
pub(crate) struct Finish {
    /// Final status.
    pub status: JobStatus,
    /// Why, when it is not plain success or failure.
    pub reason: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Stdout, gzip-compressed.
    pub output: Vec<u8>,
    /// Stderr, gzip-compressed.
    pub error: Vec<u8>,
    /// Output was cut at the cap.
    pub truncated: bool,
    /// Start of the run.
    pub started_at: DateTime<Utc>,
    /// Length of the run.
    pub duration: Duration,
}

/// What recording the end of an attempt did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Finished {
    /// The job is terminal.
    Final,
    /// The attempt failed and the job will run again after this many seconds.
    Retry(f64),
    /// The attempt no longer owns the job; nothing was written.
    Fenced,
}

/// Longest retry backoff, seconds.
const MAX_BACKOFF_SECS: f64 = 86_400.0;

/// Records the end of an attempt in one transaction: the job's state, its
/// history row, its change-log row and, for task runs, the task's schedule
/// state. A failed or timed-out attempt with retries left is recorded as a
/// non-final history row and queued again after `retry_delay * 2^n`.
pub(crate) async fn finish(
    pool: &PgPool,
    claimed: &Claimed,
    run: &JobRun,
    node_id: Uuid,
    node_name: &str,
    fin: &Finish,
) -> Result<Finished, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let retryable = matches!(fin.status, JobStatus::Failed | JobStatus::TimedOut);
    let retries_done: i64 = if retryable && claimed.max_retries > 0 {
        sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = $1 AND NOT is_final")
            .bind(claimed.job_id)
            .fetch_one(&mut *tx)
            .await?
    } else {
        0
    };
    let retry = retryable && retries_done < i64::from(claimed.max_retries);
    let delay = if retry {
        (f64::from(claimed.retry_delay_seconds) * 2f64.powi(retries_done as i32))
            .min(MAX_BACKOFF_SECS)
    } else {
        0.0
    };
    let reason = if retry {
        Some(format!(
            "attempt {} {}; retry {} of {} in {delay:.0}s",
            claimed.attempt,
            fin.status,
            retries_done + 1,
            claimed.max_retries
        ))
    } else {
        fin.reason.clone()
    };
    let changed: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (
             SELECT job_id, to_jsonb(j.*) AS row FROM jobs j
             WHERE job_id = $1 AND attempt = $2 AND status = 'running' FOR UPDATE
         )
         UPDATE jobs SET status = CASE WHEN $7 THEN 'queued' ELSE $3 END, status_reason = $4, exit_code = $5,
                success = CASE WHEN $7 THEN NULL ELSE $6 END,
                completed_at = CASE WHEN $7 THEN NULL ELSE now() END,
                claimed_by = CASE WHEN $7 THEN NULL ELSE claimed_by END, claim_expiry = NULL,
                retry_at = CASE WHEN $7 THEN now() + make_interval(secs => $8) END
         FROM old WHERE jobs.job_id = old.job_id
         RETURNING old.row, to_jsonb(jobs.*)",
    )
    .bind(claimed.job_id)
    .bind(claimed.attempt)
    .bind(fin.status.as_str())
    .bind(reason.as_deref())
    .bind(fin.exit_code)
    .bind(fin.status == JobStatus::Succeeded)
    .bind(retry)
    .bind(delay)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((old, new)) = changed else {
        return Ok(Finished::Fenced);
    };
    sqlx::query(
        "INSERT INTO task_history (task_id, job_id, node_id, attempt, start_time, end_time, duration_ms,
                                   state, is_final, exit_code, output, error, output_truncated, triggered_by)
         VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(claimed.task_id)
    .bind(claimed.job_id)
    .bind(node_id)
    .bind(claimed.attempt)
    .bind(fin.started_at)
    .bind(fin.duration.as_millis() as i64)
    .bind(fin.status.as_str())
    .bind(!retry)
    .bind(fin.exit_code)
    .bind(&fin.output)
    .bind(&fin.error)
    .bind(fin.truncated)
    .bind(claimed.triggered_by.as_str())
    .execute(&mut *tx)
    .await?;
    let why = if retry {
        "retry scheduled"
    } else {
        fin.status.as_str()
    };
    changelog::record(
        &mut tx,
        record_job_change(claimed.job_id, Some(&old), &new, node_id, node_name, why),
    )
    .await?;
    if retry {
        let again = JobRun {
            attempt: claimed.attempt,
            ..run.clone()
        };
        insert_outbox_delayed(&mut tx, &claimed.routing_key, &again, delay).await?;
    } else if let Some(task_id) = claimed.task_id {
        tasks::record_run_end(
            &mut tx,
            task_id,
            fin.status.as_str(),
            fin.status == JobStatus::Succeeded,
            node_name,
            Some(node_id),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(if retry {
        Finished::Retry(delay)
    } else {
        Finished::Final
    })
}

/// Gives a claimed job back (the worker is shutting down before it ended):
/// it returns to `queued` and, when `republish` is set, an outbox message is
/// written for the relay to publish again.
pub(crate) async fn release(
    pool: &PgPool,
    claimed: &Claimed,
    node_id: Uuid,
    node_name: &str,
    republish: Option<&taskhost_common::messages::JobRun>,
    routing_key: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (
             SELECT job_id, to_jsonb(j.*) AS row FROM jobs j
             WHERE job_id = $1 AND attempt = $2 AND status = 'running' FOR UPDATE
         )
         UPDATE jobs SET status = 'queued', claimed_by = NULL, claim_expiry = NULL, started_at = NULL
         FROM old WHERE jobs.job_id = old.job_id
         RETURNING old.row, to_jsonb(jobs.*)",
    )
    .bind(claimed.job_id)
    .bind(claimed.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((old, new)) = changed else {
        return Ok(false);
    };
    changelog::record(
        &mut tx,
        record_job_change(
            claimed.job_id,
            Some(&old),
            &new,
            node_id,
            node_name,
            "released at shutdown",
        ),
    )
    .await?;
    if let Some(run) = republish {
        taskhost_common::jobs::insert_outbox(&mut tx, routing_key, run).await?;
    }
    tx.commit().await?;
    Ok(true)
}
