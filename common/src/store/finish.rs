//! The end of an attempt: renew its lease while it runs, then finish it
//! (terminal), retry it (back to `queued` after a backoff) or release it
//! (back to `queued` at worker shutdown). Every write is fenced by
//! `(job_id, attempt, status = 'running')`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::claim::{Claimed, record_job_change};
use crate::changelog::{self, Change};
use crate::jobs::{insert_outbox, insert_outbox_delayed};
use crate::messages::JobRun;
use crate::model::JobStatus;
use crate::tasks;

/// Extends the claim. `None` means the claim is no longer ours (taken over
/// or the job ended); `Some(true)` means a cancel was requested.
pub async fn renew(
    pool: &PgPool,
    job_id: Uuid,
    attempt: i32,
    lease: Duration,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar!(
        "UPDATE jobs SET claim_expiry = now() + make_interval(secs => $3)
         WHERE job_id = $1 AND attempt = $2 AND status = 'running'
         RETURNING cancel_requested",
        job_id,
        attempt,
        lease.as_secs_f64(),
    )
    .fetch_optional(pool)
    .await
}

/// The end of one attempt.
#[derive(Debug, Clone)]
pub struct Finish {
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
pub enum Finished {
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
    node_id: Uuid,
    node_name: &str,
    fin: &Finish,
) -> Result<Finished, sqlx::Error> {
    let retryable = matches!(fin.status, JobStatus::Failed | JobStatus::TimedOut);
    let retries_done: i64 = if retryable && claimed.max_retries > 0 {
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM task_history WHERE job_id = $1 AND NOT is_final"#,
            claimed.job_id,
        )
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
    // `$6::boolean`: the macro describes the statement without parameter
    // types, and Postgres alone would take `$6` (beside a NULL) for text.
    let changed: Option<(String, String)> = sqlx::query!(
        r#"WITH old AS (
             SELECT job_id, to_jsonb(j.*)::text AS row FROM jobs j
             WHERE job_id = $1 AND attempt = $2 AND status = 'running' FOR UPDATE
         )
         UPDATE jobs SET status = CASE WHEN $7 THEN 'queued' ELSE $3 END, status_reason = $4, exit_code = $5,
                success = CASE WHEN $7 THEN NULL ELSE $6::boolean END,
                completed_at = CASE WHEN $7 THEN NULL ELSE now() END,
                claimed_by = CASE WHEN $7 THEN NULL ELSE claimed_by END, claim_expiry = NULL,
                retry_at = CASE WHEN $7 THEN now() + make_interval(secs => $8) END
         FROM old WHERE jobs.job_id = old.job_id
         RETURNING old.row AS "old!", to_jsonb(jobs.*)::text AS "new!""#,
        claimed.job_id,
        claimed.attempt,
        fin.status.as_str(),
        reason.as_deref(),
        fin.exit_code,
        fin.status == JobStatus::Succeeded,
        retry,
        delay,
    )
    .map(|r| (r.old, r.new))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((old, new)) = changed else {
        return Ok(Finished::Fenced);
    };
    sqlx::query!(
        "INSERT INTO task_history (task_id, job_id, node_id, attempt, start_time, end_time, duration_ms,
                                   state, is_final, exit_code, output, error, output_truncated, triggered_by)
         VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10, $11, $12, $13)",
        claimed.task_id,
        claimed.job_id,
        node_id,
        claimed.attempt,
        fin.started_at,
        fin.duration.as_millis() as i64,
        fin.status.as_str(),
        !retry,
        fin.exit_code,
        &fin.output,
        &fin.error,
        fin.truncated,
        claimed.triggered_by.as_str(),
    )
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
    if !retry {
        crate::notify::enqueue_jobs(&mut *tx, &[claimed.job_id]).await?;
    }
    if retry {
        let again = claimed.work_message();
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
        super::chain::upstream_ended(
            &mut *tx,
            task_id,
            claimed.job_id,
            fin.status.as_str(),
            node_name,
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
pub struct FinishRequest {
    /// The claim the attempt ran under.
    pub claimed: Claimed,
    /// How it ended.
    pub fin: Finish,
}

/// Records the ends of several attempts inside the caller's transaction
/// (a worker's `settle` batch). Attempts that may be retried take the
/// one-by-one path above; the rest share one UPDATE, one history INSERT
/// and one change-log INSERT. Returns one answer per request, in order.
pub(super) async fn finish_many(
    tx: &mut PgConnection,
    node_id: Uuid,
    node_name: &str,
    requests: &[FinishRequest],
) -> Result<Vec<Finished>, sqlx::Error> {
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
            answers[i] = Some(finish_in(&mut *tx, &r.claimed, node_id, node_name, &r.fin).await?);
        } else {
            simple.push(i);
        }
    }
    if !simple.is_empty() {
        let done = finish_final(&mut *tx, node_id, node_name, requests, &simple).await?;
        for i in simple {
            let key = (requests[i].claimed.job_id, requests[i].claimed.attempt);
            answers[i] = Some(if done.contains(&key) {
                Finished::Final
            } else {
                Finished::Fenced
            });
        }
    }
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
    let done_pairs: Vec<(&Claimed, &Finish)> = which
        .iter()
        .map(|i| (&pick(i).claimed, &pick(i).fin))
        .collect();
    let h = HistoryColumns::of(&done_pairs);
    // The final history rows are inserted from the UPDATE's RETURNING, so
    // a fenced attempt gets none.
    let changed: Vec<(Uuid, i32, String, String)> = sqlx::query!(
        r#"WITH v AS (
             SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::bool[])
                 AS v(id, attempt, status, reason, exit_code, success)
         ), old AS (
             SELECT j.job_id, j.attempt, to_jsonb(j.*)::text AS row FROM jobs j
             JOIN v ON j.job_id = v.id AND j.attempt = v.attempt
             -- `|| ''`: found by primary key, not through the partial
             -- indexes on running jobs, whose entries for every job that
             -- ever ran (dead until a vacuum) a scan would walk in full.
             WHERE j.status || '' = 'running'
             ORDER BY j.job_id
             FOR UPDATE OF j
         ), upd AS (
             UPDATE jobs SET status = v.status, status_reason = v.reason, exit_code = v.exit_code,
                    success = v.success, completed_at = now(), claim_expiry = NULL, retry_at = NULL
             FROM old JOIN v ON v.id = old.job_id AND v.attempt = old.attempt
             WHERE jobs.job_id = old.job_id
             RETURNING jobs.job_id, jobs.attempt, old.row AS old_row, to_jsonb(jobs.*)::text AS new_row
         ), hist AS (
             INSERT INTO task_history (task_id, job_id, node_id, attempt, start_time, end_time, duration_ms,
                                       state, is_final, exit_code, output, error, output_truncated, triggered_by)
             SELECT h.t, h.j, $7, h.a, h.s, now(), h.d, h.st, true, h.e, h.o, h.er, h.tr, h.tb
             FROM UNNEST($8::uuid[], $9::uuid[], $10::int4[], $11::timestamptz[], $12::int8[], $13::text[],
                         $14::int4[], $15::bytea[], $16::bytea[], $17::bool[], $18::text[])
                     WITH ORDINALITY AS h(t, j, a, s, d, st, e, o, er, tr, tb, ord)
             JOIN upd ON upd.job_id = h.j AND upd.attempt = h.a
             ORDER BY h.ord
         )
         SELECT job_id AS "job_id!", attempt AS "attempt!", old_row AS "old!", new_row AS "new!" FROM upd"#,
        &ids,
        &attempts,
        &statuses as &[&str],
        &reasons as &[Option<&str>],
        &codes as &[Option<i32>],
        &successes,
        node_id,
        &h.tasks as &[Option<Uuid>],
        &h.jobs,
        &h.attempts,
        &h.starts,
        &h.millis,
        &h.states as &[&str],
        &h.codes as &[Option<i32>],
        &h.outputs as &[&[u8]],
        &h.errors as &[&[u8]],
        &h.truncated,
        &h.triggers as &[&str],
    )
    .map(|r| (r.job_id, r.attempt, r.old, r.new))
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
    let ended: Vec<Uuid> = done.iter().map(|r| r.claimed.job_id).collect();
    crate::notify::enqueue_jobs(&mut *tx, &ended).await?;
    // Downstream runs after every schedule row of the batch is written
    // (their schedule rows are locked after the batch's own).
    for r in &done {
        if let Some(task_id) = r.claimed.task_id {
            super::chain::upstream_ended(
                &mut *tx,
                task_id,
                r.claimed.job_id,
                r.fin.status.as_str(),
                node_name,
            )
            .await?;
        }
    }
    Ok(done.iter().map(|r| key(r)).collect())
}

/// The final history rows of attempts that ended, as arrays for the
/// statement that records their ends (parameters `task_history` takes in
/// [`finish_final`] and `claim::run_inline`).
pub(super) struct HistoryColumns<'a> {
    /// The tasks they ran for.
    pub(super) tasks: Vec<Option<Uuid>>,
    /// The jobs.
    pub(super) jobs: Vec<Uuid>,
    /// The attempts.
    pub(super) attempts: Vec<i32>,
    /// When each run started.
    pub(super) starts: Vec<DateTime<Utc>>,
    /// How long each ran, in milliseconds.
    pub(super) millis: Vec<i64>,
    /// How each ended.
    pub(super) states: Vec<&'static str>,
    /// Exit codes.
    pub(super) codes: Vec<Option<i32>>,
    /// Stdout, gzip-compressed.
    pub(super) outputs: Vec<&'a [u8]>,
    /// Stderr, gzip-compressed.
    pub(super) errors: Vec<&'a [u8]>,
    /// Whether output was cut at the cap.
    pub(super) truncated: Vec<bool>,
    /// What caused each job.
    pub(super) triggers: Vec<&'static str>,
}

impl<'a> HistoryColumns<'a> {
    /// The columns of `done`, in order.
    pub(super) fn of(done: &[(&'a Claimed, &'a Finish)]) -> Self {
        Self {
            tasks: done.iter().map(|(c, _)| c.task_id).collect(),
            jobs: done.iter().map(|(c, _)| c.job_id).collect(),
            attempts: done.iter().map(|(c, _)| c.attempt).collect(),
            starts: done.iter().map(|(_, f)| f.started_at).collect(),
            millis: done
                .iter()
                .map(|(_, f)| f.duration.as_millis() as i64)
                .collect(),
            states: done.iter().map(|(_, f)| f.status.as_str()).collect(),
            codes: done.iter().map(|(_, f)| f.exit_code).collect(),
            outputs: done.iter().map(|(_, f)| f.output.as_slice()).collect(),
            errors: done.iter().map(|(_, f)| f.error.as_slice()).collect(),
            truncated: done.iter().map(|(_, f)| f.truncated).collect(),
            triggers: done.iter().map(|(c, _)| c.triggered_by.as_str()).collect(),
        }
    }
}

/// Gives a claimed job back (the worker is shutting down before it ended):
/// it returns to `queued` and, when `republish` is set, an outbox message is
/// written for the relay to publish again.
pub async fn release(
    pool: &PgPool,
    claimed: &Claimed,
    node_id: Uuid,
    node_name: &str,
    republish: Option<&JobRun>,
    routing_key: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed: Option<(String, String)> = sqlx::query!(
        r#"WITH old AS (
             SELECT job_id, to_jsonb(j.*)::text AS row FROM jobs j
             WHERE job_id = $1 AND attempt = $2 AND status = 'running' FOR UPDATE
         )
         UPDATE jobs SET status = 'queued', claimed_by = NULL, claim_expiry = NULL, started_at = NULL
         FROM old WHERE jobs.job_id = old.job_id
         RETURNING old.row AS "old!", to_jsonb(jobs.*)::text AS "new!""#,
        claimed.job_id,
        claimed.attempt,
    )
    .map(|r| (r.old, r.new))
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
        insert_outbox(&mut tx, routing_key, run).await?;
    }
    tx.commit().await?;
    Ok(true)
}
