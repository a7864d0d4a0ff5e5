//! Firing recurring tasks. One pass ([`tick`]) locks the due `task_schedule`
//! rows with `FOR UPDATE SKIP LOCKED`, so several schedulers never fire the
//! same row at once, and the unique (task, fire time, node) index on `jobs`
//! is the backstop: each due tick fires exactly once.

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use taskhost_common::jobs::{self, Accepted, NewJob, OutboxMessage, TaskRun};
use taskhost_common::model::{Fanout, JobStatus, TriggeredBy};
use taskhost_common::tasks::{self, TASK_COLUMNS, Task};
use uuid::Uuid;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Jobs created, one per fired task (more with fan-out).
    pub fired_jobs: Vec<Uuid>,
    /// Ticks skipped (misfire policy `skip`, or overlap policy `skip`).
    pub skipped: usize,
    /// Outbox rows committed by this pass (the caller publishes them).
    pub outbox: Vec<OutboxMessage>,
    /// Jobs recorded `dead` because no node matched (the caller publishes
    /// their events).
    pub dead_jobs: Vec<Uuid>,
}

const BATCH: i64 = 100;

/// Policies a tick decides with.
#[derive(Debug, Clone, Copy)]
pub struct TickPolicy {
    /// A fire time older than this counts as missed.
    pub misfire_grace: Duration,
}

async fn log_schedule(
    tx: &mut Transaction<'_, Postgres>,
    task_id: Uuid,
    old: &Value,
    new: &Value,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tasks::log_schedule_update(tx, task_id, old, new, "scheduler", None, reason).await
}

#[derive(sqlx::FromRow)]
struct DueRow {
    next_run: Option<DateTime<Utc>>,
    is_running: bool,
    schedule_row: Value,
    #[sqlx(flatten)]
    task: Task,
}

/// One pass over due tasks at `now`: schedules tasks that have no
/// `next_run` yet, then fires every enabled task whose `next_run <= now`.
pub async fn tick(
    pool: &PgPool,
    now: DateTime<Utc>,
    policy: TickPolicy,
) -> Result<TickReport, sqlx::Error> {
    let mut report = TickReport::default();
    let mut tx = pool.begin().await?;
    let sql = format!(
        "SELECT s.next_run, s.is_running, to_jsonb(s.*) AS schedule_row, {cols}
         FROM task_schedule s JOIN tasks t USING (task_id)
         WHERE t.enabled AND (s.next_run IS NULL OR s.next_run <= $1)
         ORDER BY s.next_run NULLS FIRST
         LIMIT $2
         FOR UPDATE OF s SKIP LOCKED",
        cols = TASK_COLUMNS
            .split(',')
            .map(|c| format!("t.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let due: Vec<DueRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
    for row in due {
        let task = &row.task;
        let Some(schedule) = task.parsed_schedule() else {
            tracing::warn!(task_id = %task.task_id, schedule = task.schedule, "stored schedule does not parse; task skipped");
            continue;
        };
        let Some(fire_at) = row.next_run else {
            let next = schedule.next_after(now);
            let new: Value = sqlx::query_scalar(
                "UPDATE task_schedule SET next_run = $2 WHERE task_id = $1 RETURNING to_jsonb(task_schedule.*)",
            )
            .bind(task.task_id)
            .bind(next)
            .fetch_one(&mut *tx)
            .await?;
            log_schedule(&mut tx, task.task_id, &row.schedule_row, &new, "scheduled").await?;
            continue;
        };
        let missed = now - fire_at > policy.misfire_grace;
        // A fire time within the grace is followed by the one after it, so a
        // pass that runs late (or a row another scheduler held) loses none;
        // a missed one is followed by the first after `now`, so a scheduler
        // that was down fires at most one catch-up run.
        let next = if missed {
            schedule.next_after(now)
        } else {
            schedule.next_after(fire_at)
        };
        let skip_reason = if missed && task.misfire_policy == "skip" {
            Some("misfire: fire time missed; policy skip")
        } else if row.is_running && task.overlap_policy == "skip" {
            Some("overlap: previous run still going; policy skip")
        } else {
            None
        };
        if let Some(reason) = skip_reason {
            report.skipped += 1;
            tracing::info!(task_id = %task.task_id, %fire_at, reason, "tick skipped");
            let new: Value = sqlx::query_scalar(
                "UPDATE task_schedule SET next_run = $2, last_state = 'skipped'
                 WHERE task_id = $1 RETURNING to_jsonb(task_schedule.*)",
            )
            .bind(task.task_id)
            .bind(next)
            .fetch_one(&mut *tx)
            .await?;
            log_schedule(&mut tx, task.task_id, &row.schedule_row, &new, reason).await?;
            continue;
        }
        let spec = match task.job_spec() {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "task no longer valid; skipped");
                continue;
            }
        };
        if task.no_node_policy == "hold"
            && spec.target.fanout == Fanout::All
            && jobs::matching_active_nodes(&mut tx, &spec.target)
                .await?
                .is_empty()
        {
            // Hold: nothing is written and next_run stays, so the same fire
            // time is tried again on every pass until a matching node is up.
            tracing::info!(task_id = %task.task_id, "no active node matches; task held");
            report.skipped += 1;
            continue;
        }
        let accepted = jobs::accept_in(
            &mut tx,
            &NewJob {
                job_id: Uuid::now_v7(),
                user_id: &task.created_by,
                spec: &spec,
                triggered_by: TriggeredBy::Schedule,
                idempotency_key: None,
                request_hash: None,
                changed_by: "scheduler",
                task: Some(TaskRun {
                    task_id: task.task_id,
                    fire_at: Some(fire_at),
                    max_retries: task.max_retries,
                    retry_delay_seconds: task.retry_delay_seconds,
                    kill_on_timeout: task.kill_on_timeout,
                }),
            },
        )
        .await?;
        let (state, fired) = match accepted {
            Accepted::Created {
                job_ids,
                outbox,
                status,
            } => {
                if status == JobStatus::Dead {
                    report.dead_jobs.extend(&job_ids);
                }
                report.fired_jobs.extend(job_ids);
                report.outbox.extend(outbox);
                (
                    if status == JobStatus::Dead {
                        "dead"
                    } else {
                        "queued"
                    },
                    status != JobStatus::Dead,
                )
            }
            // Another scheduler fired this tick already.
            Accepted::Duplicate { .. } | Accepted::Conflict => ("queued", false),
        };
        let new: Value = sqlx::query_scalar(
            "UPDATE task_schedule SET next_run = $2, last_run = $3, last_state = $4,
                    is_running = is_running OR $5,
                    total_runs = total_runs + 1,
                    failure_count = failure_count + CASE WHEN $4 = 'dead' THEN 1 ELSE 0 END
             WHERE task_id = $1 RETURNING to_jsonb(task_schedule.*)",
        )
        .bind(task.task_id)
        .bind(next)
        .bind(fire_at)
        .bind(state)
        .bind(fired)
        .fetch_one(&mut *tx)
        .await?;
        log_schedule(&mut tx, task.task_id, &row.schedule_row, &new, "fired").await?;
        tracing::info!(task_id = %task.task_id, task = task.task_name, %fire_at, next_run = ?next, "task fired");
    }
    tx.commit().await?;
    Ok(report)
}
