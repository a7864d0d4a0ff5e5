//! The worker's Postgres side: claiming a job (attempt + 1, lease), renewing
//! the lease, and recording the end of a run in one transaction with its
//! history row and change-log rows. The attempt number fences every write,
//! so a worker whose claim was taken over cannot overwrite the newer attempt.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
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
    /// The claim could not be made (Postgres failed): ask again.
    Again(String),
    /// Too many attempts: recorded as dead; ack and dead-letter.
    Dead(String),
}

#[derive(sqlx::FromRow)]
struct Current {
    job_id: Uuid,
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
        old: old.map(|v| v as &dyn changelog::RowJson),
        new: Some(new),
        changed_by,
        node_id: Some(node_id),
        reason: Some(reason),
    }
}

/// One claim to make.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimRequest {
    /// The job.
    pub job_id: Uuid,
    /// The job is not running in this process, so a live claim held under
    /// this node's id is left over from a previous process of the same node
    /// and may be taken over at once.
    pub own_stale: bool,
}

/// What every claim of one worker shares.
#[derive(Debug, Clone)]
pub(crate) struct Claimer {
    /// This node.
    pub node_id: Uuid,
    /// Its name, for the change log.
    pub node_name: String,
    /// How long a claim lasts unless renewed.
    pub lease: Duration,
    /// Deliveries of one job before it is dead.
    pub delivery_limit: u32,
}

/// What to do with a job a delivery names.
enum Decision {
    /// Answer without writing.
    Answer(ClaimResult),
    /// Record it as ended (cancelled while its worker died, or out of
    /// attempts) without running it.
    GiveUp(JobStatus, String),
    /// Claim it.
    Claim,
}

fn decide(cur: &Current, own_stale: bool, c: &Claimer) -> Decision {
    let status: JobStatus = cur.status.parse().unwrap_or(JobStatus::Dead);
    if status.is_terminal() {
        return Decision::Answer(ClaimResult::Finished(status));
    }
    if status == JobStatus::Running
        && cur.claim_live
        && !(own_stale && cur.claimed_by == Some(c.node_id))
    {
        return Decision::Answer(ClaimResult::Busy);
    }
    if status == JobStatus::Queued && cur.retry_pending && !cur.cancel_requested {
        return Decision::Answer(ClaimResult::NotDue);
    }
    // A cancel requested while the job's previous worker was dying ends it
    // here instead of running it again.
    if cur.cancel_requested {
        return Decision::GiveUp(JobStatus::Cancelled, "cancelled on request".to_owned());
    }
    // Retries of a task run are attempts too; the limit is on top of them.
    if cur.attempt >= c.delivery_limit as i32 + cur.max_retries {
        return Decision::GiveUp(
            JobStatus::Dead,
            format!(
                "gave up after {} attempts (delivery limit {})",
                cur.attempt, c.delivery_limit
            ),
        );
    }
    Decision::Claim
}

/// The columns a claim decides on, with the row's lock clause appended.
macro_rules! current_select {
    ($where_and_lock:literal) => {
        concat!(
            "SELECT job_id, to_jsonb(j.*) AS row, status, attempt, claimed_by,
                    coalesce(claim_expiry > now(), false) AS claim_live, task_id, triggered_by,
                    command, timeout_seconds, env, target_node_id, target_node_group,
                    target_node_role, max_retries, retry_delay_seconds, cancel_requested,
                    kill_on_timeout, coalesce(retry_at > now(), false) AS retry_pending
             FROM jobs j ",
            $where_and_lock
        )
    };
}

const CURRENT_ONE: &str = current_select!("WHERE job_id = $1 FOR UPDATE");

// Rows another transaction holds (the api marking them queued, a claim of
// the same job elsewhere) are skipped here and claimed one by one after the
// batch, so a batch never waits behind someone else's lock.
const CURRENT_MANY: &str =
    current_select!("WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE SKIP LOCKED");

/// Claims one job, waiting for its row if another transaction holds it.
/// Losing this commit in a Postgres crash is harmless (see
/// db::no_fsync_wait), so it does not wait for the disk.
pub(crate) async fn claim(
    pool: &PgPool,
    c: &Claimer,
    request: ClaimRequest,
) -> Result<ClaimResult, sqlx::Error> {
    let mut tx = pool.begin().await?;
    db::no_fsync_wait(&mut tx).await?;
    let current: Option<Current> = sqlx::query_as(CURRENT_ONE)
        .bind(request.job_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(cur) = current else {
        return Ok(ClaimResult::Missing);
    };
    let answer = match decide(&cur, request.own_stale, c) {
        Decision::Answer(a) => return Ok(a),
        Decision::GiveUp(status, reason) => give_up(&mut tx, c, &cur, status, reason).await?,
        Decision::Claim => claim_rows(&mut tx, c, vec![cur])
            .await?
            .pop()
            .unwrap_or(ClaimResult::Missing),
    };
    tx.commit().await?;
    Ok(answer)
}

/// Claims the jobs of several deliveries with one transaction and a few
/// statements for all of them (DESIGN "Performance shape"). Returns one
/// answer per request, in order.
pub(crate) async fn claim_batch(
    pool: &PgPool,
    c: &Claimer,
    requests: &[ClaimRequest],
) -> Result<Vec<ClaimResult>, sqlx::Error> {
    if let [one] = requests {
        return Ok(vec![claim(pool, c, *one).await?]);
    }
    let mut tx = pool.begin().await?;
    db::no_fsync_wait(&mut tx).await?;
    let ids: Vec<Uuid> = requests.iter().map(|r| r.job_id).collect();
    let rows: Vec<Current> = sqlx::query_as(CURRENT_MANY)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    let mut rows: HashMap<Uuid, Current> = rows.into_iter().map(|r| (r.job_id, r)).collect();
    let mut answers: Vec<Option<ClaimResult>> = requests.iter().map(|_| None).collect();
    let mut to_claim = Vec::new();
    let mut claim_slots = Vec::new();
    let mut later = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        // A second delivery of a job in the same batch waits for the first.
        let Some(cur) = rows.remove(&request.job_id) else {
            if ids[..i].contains(&request.job_id) {
                answers[i] = Some(ClaimResult::Busy);
            } else {
                later.push(i);
            }
            continue;
        };
        match decide(&cur, request.own_stale, c) {
            Decision::Answer(a) => answers[i] = Some(a),
            Decision::GiveUp(status, reason) => {
                answers[i] = Some(give_up(&mut tx, c, &cur, status, reason).await?);
            }
            Decision::Claim => {
                claim_slots.push(i);
                to_claim.push(cur);
            }
        }
    }
    for (i, answer) in claim_slots
        .into_iter()
        .zip(claim_rows(&mut tx, c, to_claim).await?)
    {
        answers[i] = Some(answer);
    }
    tx.commit().await?;
    // Locked or missing rows: one by one, now that this batch holds nothing.
    // The batch is committed, so a failure here is that request's alone.
    for i in later {
        answers[i] = Some(match claim(pool, c, requests[i]).await {
            Ok(answer) => answer,
            Err(error) => ClaimResult::Again(error.to_string()),
        });
    }
    Ok(answers.into_iter().flatten().collect())
}

/// Records a job as ended without running it.
async fn give_up(
    tx: &mut PgConnection,
    c: &Claimer,
    cur: &Current,
    status: JobStatus,
    reason: String,
) -> Result<ClaimResult, sqlx::Error> {
    let new: Value = sqlx::query_scalar(
        "UPDATE jobs SET status = $2, status_reason = $3, completed_at = now(), success = false,
                claim_expiry = NULL
         WHERE job_id = $1 RETURNING to_jsonb(jobs.*)",
    )
    .bind(cur.job_id)
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
    .bind(cur.job_id)
    .bind(c.node_id)
    .bind(cur.attempt + 1)
    .bind(status.as_str())
    .bind(&cur.triggered_by)
    .bind(changelog::gzip(reason.as_bytes()))
    .execute(&mut *tx)
    .await?;
    changelog::record(
        &mut *tx,
        record_job_change(
            cur.job_id,
            Some(&cur.row),
            &new,
            c.node_id,
            &c.node_name,
            &reason,
        ),
    )
    .await?;
    if let Some(task_id) = cur.task_id {
        tasks::record_run_end(
            &mut *tx,
            task_id,
            status.as_str(),
            false,
            &c.node_name,
            Some(c.node_id),
        )
        .await?;
    }
    Ok(if status == JobStatus::Dead {
        ClaimResult::Dead(reason)
    } else {
        ClaimResult::Finished(status)
    })
}

/// Claims rows already locked by this transaction: one UPDATE and one
/// change-log INSERT for all of them (plus the schedule of task runs).
async fn claim_rows(
    tx: &mut PgConnection,
    c: &Claimer,
    rows: Vec<Current>,
) -> Result<Vec<ClaimResult>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.job_id).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempt + 1).collect();
    let updated: Vec<(Uuid, Value)> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempt = v.attempt, claimed_by = $3,
                claim_expiry = now() + make_interval(secs => $4), started_at = now(), retry_at = NULL
         FROM UNNEST($1::uuid[], $2::int4[]) AS v(id, attempt)
         WHERE jobs.job_id = v.id
         RETURNING jobs.job_id, to_jsonb(jobs.*)",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(c.node_id)
    .bind(c.lease.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let new: HashMap<Uuid, Value> = updated.into_iter().collect();
    let changes: Vec<Change<'_>> = rows
        .iter()
        .filter_map(|r| {
            new.get(&r.job_id).map(|n| {
                record_job_change(
                    r.job_id,
                    Some(&r.row),
                    n,
                    c.node_id,
                    &c.node_name,
                    "claimed",
                )
            })
        })
        .collect();
    changelog::record_many(&mut *tx, &changes).await?;
    // Schedule rows in task id order, so batches lock them in one order.
    let mut task_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.task_id).collect();
    task_ids.sort_unstable();
    for task_id in task_ids {
        tasks::record_run_start(&mut *tx, task_id, c.node_id, &c.node_name).await?;
    }
    Ok(rows
        .into_iter()
        .map(|cur| {
            let attempt = cur.attempt + 1;
            ClaimResult::Claimed(Claimed {
                job_id: cur.job_id,
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
            })
        })
        .collect())
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
async fn finish_in(
    tx: &mut PgConnection,
    claimed: &Claimed,
    run: &JobRun,
    node_id: Uuid,
    node_name: &str,
    fin: &Finish,
) -> Result<Finished, sqlx::Error> {
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
        &mut *tx,
        record_job_change(claimed.job_id, Some(&old), &new, node_id, node_name, why),
    )
    .await?;
    if retry {
        let again = JobRun {
            attempt: claimed.attempt,
            ..run.clone()
        };
        insert_outbox_delayed(&mut *tx, &claimed.routing_key, &again, delay).await?;
    } else if let Some(task_id) = claimed.task_id {
        tasks::record_run_end(
            &mut *tx,
            task_id,
            fin.status.as_str(),
            fin.status == JobStatus::Succeeded,
            node_name,
            Some(node_id),
        )
        .await?;
    }
    Ok(if retry {
        Finished::Retry(delay)
    } else {
        Finished::Final
    })
}

/// One end of an attempt to record.
#[derive(Debug, Clone)]
pub(crate) struct FinishRequest {
    /// The claim the attempt ran under.
    pub claimed: Claimed,
    /// Its work message (republished for a retry).
    pub run: JobRun,
    /// How it ended.
    pub fin: Finish,
}

/// Records the ends of several attempts in one transaction that waits for
/// the disk once. Attempts that may be retried take the one-by-one path
/// above; the rest share one UPDATE, one history INSERT and one change-log
/// INSERT. Returns one answer per request, in order.
pub(crate) async fn finish_batch(
    pool: &PgPool,
    node_id: Uuid,
    node_name: &str,
    requests: &[FinishRequest],
) -> Result<Vec<Finished>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut answers: Vec<Option<Finished>> = requests.iter().map(|_| None).collect();
    let mut simple = Vec::new();
    // Task runs first in task id order, so batches lock schedule rows in
    // one order.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (requests[i].claimed.task_id, requests[i].claimed.job_id));
    for i in order {
        let r = &requests[i];
        let retryable = matches!(r.fin.status, JobStatus::Failed | JobStatus::TimedOut);
        if retryable && r.claimed.max_retries > 0 {
            answers[i] =
                Some(finish_in(&mut tx, &r.claimed, &r.run, node_id, node_name, &r.fin).await?);
        } else {
            simple.push(i);
        }
    }
    if !simple.is_empty() {
        let done = finish_final(&mut tx, node_id, node_name, requests, &simple).await?;
        for i in simple {
            let key = (requests[i].claimed.job_id, requests[i].claimed.attempt);
            answers[i] = Some(if done.contains(&key) {
                Finished::Final
            } else {
                Finished::Fenced
            });
        }
    }
    tx.commit().await?;
    Ok(answers.into_iter().flatten().collect())
}

/// Final ends (no retry) of `which` requests, set-based. Returns the
/// (job, attempt) pairs written; the others no longer belonged to their
/// attempt (fenced).
async fn finish_final(
    tx: &mut PgConnection,
    node_id: Uuid,
    node_name: &str,
    requests: &[FinishRequest],
    which: &[usize],
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    let pick = |i: &usize| &requests[*i];
    let ids: Vec<Uuid> = which.iter().map(|i| pick(i).claimed.job_id).collect();
    let attempts: Vec<i32> = which.iter().map(|i| pick(i).claimed.attempt).collect();
    let statuses: Vec<&str> = which.iter().map(|i| pick(i).fin.status.as_str()).collect();
    let reasons: Vec<Option<&str>> = which
        .iter()
        .map(|i| pick(i).fin.reason.as_deref())
        .collect();
    let codes: Vec<Option<i32>> = which.iter().map(|i| pick(i).fin.exit_code).collect();
    let successes: Vec<bool> = which
        .iter()
        .map(|i| pick(i).fin.status == JobStatus::Succeeded)
        .collect();
    let changed: Vec<(Uuid, i32, Value, Value)> = sqlx::query_as(
        "WITH v AS (
             SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::bool[])
                 AS v(id, attempt, status, reason, exit_code, success)
         ), old AS (
             SELECT j.job_id, j.attempt, to_jsonb(j.*) AS row FROM jobs j
             JOIN v ON j.job_id = v.id AND j.attempt = v.attempt
             WHERE j.status = 'running'
             ORDER BY j.job_id
             FOR UPDATE OF j
         )
         UPDATE jobs SET status = v.status, status_reason = v.reason, exit_code = v.exit_code,
                success = v.success, completed_at = now(), claim_expiry = NULL, retry_at = NULL
         FROM old JOIN v ON v.id = old.job_id AND v.attempt = old.attempt
         WHERE jobs.job_id = old.job_id
         RETURNING jobs.job_id, jobs.attempt, old.row, to_jsonb(jobs.*)",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&codes)
    .bind(&successes)
    .fetch_all(&mut *tx)
    .await?;
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    let written: HashMap<(Uuid, i32), usize> = changed
        .iter()
        .enumerate()
        .map(|(k, (id, attempt, _, _))| ((*id, *attempt), k))
        .collect();
    let key = |r: &FinishRequest| (r.claimed.job_id, r.claimed.attempt);
    let done: Vec<&FinishRequest> = which
        .iter()
        .map(pick)
        .filter(|r| written.contains_key(&key(r)))
        .collect();
    let h_task: Vec<Option<Uuid>> = done.iter().map(|r| r.claimed.task_id).collect();
    let h_job: Vec<Uuid> = done.iter().map(|r| r.claimed.job_id).collect();
    let h_attempt: Vec<i32> = done.iter().map(|r| r.claimed.attempt).collect();
    let h_start: Vec<DateTime<Utc>> = done.iter().map(|r| r.fin.started_at).collect();
    let h_ms: Vec<i64> = done
        .iter()
        .map(|r| r.fin.duration.as_millis() as i64)
        .collect();
    let h_state: Vec<&str> = done.iter().map(|r| r.fin.status.as_str()).collect();
    let h_code: Vec<Option<i32>> = done.iter().map(|r| r.fin.exit_code).collect();
    let h_out: Vec<&[u8]> = done.iter().map(|r| r.fin.output.as_slice()).collect();
    let h_err: Vec<&[u8]> = done.iter().map(|r| r.fin.error.as_slice()).collect();
    let h_trunc: Vec<bool> = done.iter().map(|r| r.fin.truncated).collect();
    let h_by: Vec<&str> = done
        .iter()
        .map(|r| r.claimed.triggered_by.as_str())
        .collect();
    sqlx::query(
        "INSERT INTO task_history (task_id, job_id, node_id, attempt, start_time, end_time, duration_ms,
                                   state, is_final, exit_code, output, error, output_truncated, triggered_by)
         SELECT t, j, $3, a, s, now(), d, st, true, e, o, er, tr, tb
         FROM UNNEST($1::uuid[], $2::uuid[], $4::int4[], $5::timestamptz[], $6::int8[], $7::text[],
                     $8::int4[], $9::bytea[], $10::bytea[], $11::bool[], $12::text[])
             AS x(t, j, a, s, d, st, e, o, er, tr, tb)",
    )
    .bind(&h_task)
    .bind(&h_job)
    .bind(node_id)
    .bind(&h_attempt)
    .bind(&h_start)
    .bind(&h_ms)
    .bind(&h_state)
    .bind(&h_code)
    .bind(&h_out)
    .bind(&h_err)
    .bind(&h_trunc)
    .bind(&h_by)
    .execute(&mut *tx)
    .await?;
    let changes: Vec<Change<'_>> = done
        .iter()
        .map(|r| {
            let (_, _, old, new) = &changed[written[&key(r)]];
            record_job_change(
                r.claimed.job_id,
                Some(old),
                new,
                node_id,
                node_name,
                r.fin.status.as_str(),
            )
        })
        .collect();
    changelog::record_many(&mut *tx, &changes).await?;
    // Schedule rows in task id order, so batches lock them in one order.
    let mut task_runs: Vec<&&FinishRequest> = done
        .iter()
        .filter(|r| r.claimed.task_id.is_some())
        .collect();
    task_runs.sort_by_key(|r| r.claimed.task_id);
    for r in task_runs {
        if let Some(task_id) = r.claimed.task_id {
            tasks::record_run_end(
                &mut *tx,
                task_id,
                r.fin.status.as_str(),
                r.fin.status == JobStatus::Succeeded,
                node_name,
                Some(node_id),
            )
            .await?;
        }
    }
    Ok(done.iter().map(|r| key(r)).collect())
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
