//! Claiming a job (`queued` → `running`: attempt + 1, a lease), or giving
//! it up without running it (→ `cancelled` / `dead`). The attempt number
//! fences every later write, so a worker whose claim was taken over cannot
//! overwrite the newer attempt.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::changelog::{self, Action, Change, RowJson};
use crate::db;
use crate::messages::JobRun;
use crate::model::{ExecutionMode, JobLimits, JobStatus, TriggeredBy};
use crate::tasks;

/// A job this worker now owns, for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job.
    pub job_id: Uuid,
    /// This attempt.
    pub attempt: i32,
    /// The recurring task, if a task fired it.
    pub task_id: Option<Uuid>,
    /// What caused it.
    pub triggered_by: TriggeredBy,
    /// How it runs (from Postgres, the source of truth).
    pub execution_mode: ExecutionMode,
    /// The job's command (from Postgres, the source of truth).
    pub command: String,
    /// Seconds before the run is killed.
    pub timeout_seconds: Option<i32>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// The sealed secret environment (`base64(nonce || ciphertext)`), which
    /// the worker opens with its `secrets.key`; never in a work message.
    pub secret_env: Option<String>,
    /// Limits of this job, which tighten the worker's (boxed: most jobs
    /// have none, and a claim stays small).
    pub limits: Option<Box<JobLimits>>,
    /// The work queue the job is addressed to.
    pub routing_key: String,
    /// Retries allowed after a failed attempt (task runs).
    pub max_retries: i32,
    /// First retry delay in seconds, doubled per retry.
    pub retry_delay_seconds: i32,
    /// Whether the run is killed at its timeout.
    pub kill_on_timeout: bool,
    /// 0..=9.
    pub priority: i16,
    /// When the job was accepted.
    pub submitted_at: DateTime<Utc>,
    /// The job's name (for the run's log line).
    pub job_name: String,
    /// Who submitted it (for the run's log line).
    pub user_id: String,
}

impl Claimed {
    /// The work message that runs this job again (a retry): the attempt
    /// it carries is this one, which the next claim increments.
    pub fn work_message(&self) -> JobRun {
        JobRun {
            job_id: self.job_id,
            attempt: self.attempt,
            command: self.command.clone(),
            execution_mode: self.execution_mode,
            timeout_seconds: self.timeout_seconds,
            env: self.env.clone(),
            priority: self.priority,
            submitted_at: self.submitted_at,
        }
    }
}

/// The answer to a claim.
#[derive(Debug)]
pub enum ClaimResult {
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
pub(super) struct Current {
    pub(super) job_id: Uuid,
    /// The row's JSON text, for the change log.
    row: String,
    status: JobStatus,
    attempt: i32,
    claimed_by: Option<Uuid>,
    claim_live: bool,
    pub(super) task_id: Option<Uuid>,
    triggered_by: TriggeredBy,
    execution_mode: ExecutionMode,
    command: String,
    timeout_seconds: Option<i32>,
    env: Json<BTreeMap<String, String>>,
    secret_env: Option<String>,
    limits: Option<Json<JobLimits>>,
    target_node_id: Option<Uuid>,
    target_node_group: Option<String>,
    target_node_role: Option<String>,
    max_retries: i32,
    retry_delay_seconds: i32,
    cancel_requested: bool,
    kill_on_timeout: bool,
    retry_pending: bool,
    priority: i16,
    submitted_at: DateTime<Utc>,
    job_name: String,
    user_id: String,
}

pub(super) fn record_job_change<'a>(
    job_id: Uuid,
    old: Option<&'a dyn RowJson>,
    new: &'a dyn RowJson,
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

/// One claim to make.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    /// The job.
    pub job_id: Uuid,
    /// The job is not running in this process, so a live claim held under
    /// this node's id is left over from a previous process of the same node
    /// and may be taken over at once.
    pub own_stale: bool,
    /// The delivery says the job is `inline`, so the claim will likely
    /// record its end too (a hint: the row decides).
    pub inline_hint: bool,
}

/// What every claim of one worker shares.
#[derive(Debug, Clone)]
pub struct Claimer {
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
    let status = cur.status;
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

/// Claims one job in its own transaction, waiting for its row if another
/// transaction holds it. Losing this commit in a Postgres crash is harmless
/// (see db::begin_no_fsync_wait), so it does not wait for the disk.
pub async fn claim(
    pool: &PgPool,
    c: &Claimer,
    request: ClaimRequest,
) -> Result<ClaimResult, sqlx::Error> {
    let mut tx = db::begin_no_fsync_wait(pool).await?;
    // The columns a claim decides on (`Current`; `plan` reads the same
    // list), the row locked.
    let current: Option<Current> = sqlx::query_as!(
        Current,
        r#"SELECT job_id, to_jsonb(j.*)::text AS "row!", status AS "status: JobStatus", attempt,
                claimed_by, coalesce(claim_expiry > now(), false) AS "claim_live!", task_id,
                triggered_by AS "triggered_by: TriggeredBy",
                execution_mode AS "execution_mode: ExecutionMode", command, timeout_seconds,
                env AS "env: Json<BTreeMap<String, String>>", secret_env,
                limits AS "limits: Json<JobLimits>", target_node_id, target_node_group,
                target_node_role, max_retries, retry_delay_seconds, cancel_requested,
                kill_on_timeout, coalesce(retry_at > now(), false) AS "retry_pending!",
                priority, submitted_at, job_name, user_id
         FROM jobs j
         WHERE job_id = $1 FOR UPDATE"#,
        request.job_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(cur) = current else {
        return Ok(ClaimResult::Missing);
    };
    let decision = decide(&cur, request.own_stale, c);
    // An end recorded without running (acked right after) and a background
    // claim (acked once claimed) must survive a Postgres crash.
    if matches!(decision, Decision::GiveUp(..))
        || (matches!(decision, Decision::Claim) && cur.execution_mode == ExecutionMode::Background)
    {
        sqlx::query!("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
    }
    let answer = match decision {
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

/// The rows of a batch of claims, read and locked, and what to do with each.
pub(super) struct ClaimPlan {
    /// One answer per request, where it is known already.
    pub(super) answers: Vec<Option<ClaimResult>>,
    /// Requests whose rows another transaction holds (or that are missing):
    /// claimed one by one after the batch committed.
    pub(super) later: Vec<usize>,
    /// Rows to claim, with the index of their request.
    pub(super) to_claim: Vec<(usize, Current)>,
    /// Rows to end without running them.
    give_ups: Vec<(usize, Current, JobStatus, String)>,
}

impl ClaimPlan {
    /// Answers `Busy` for claims of jobs in `finishing` (their run's end is
    /// recorded in the same transaction; the claim asks again, then finds
    /// the job finished).
    pub(super) fn defer(&mut self, finishing: &std::collections::HashSet<Uuid>) {
        if finishing.is_empty() {
            return;
        }
        let (busy, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.to_claim)
            .into_iter()
            .partition(|(_, cur)| finishing.contains(&cur.job_id));
        self.to_claim = keep;
        for (i, _) in busy {
            self.answers[i] = Some(ClaimResult::Busy);
        }
        let (busy, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.give_ups)
            .into_iter()
            .partition(|(_, cur, _, _)| finishing.contains(&cur.job_id));
        self.give_ups = keep;
        for (i, ..) in busy {
            self.answers[i] = Some(ClaimResult::Busy);
        }
    }

    /// Whether carrying the plan out records an end that is acked at once
    /// (a give-up) or claims a `background` job (acked once claimed): then
    /// the commit must wait for the disk.
    pub(super) fn needs_durable_commit(&self) -> bool {
        !self.give_ups.is_empty()
            || self
                .to_claim
                .iter()
                .any(|(_, cur)| cur.execution_mode == ExecutionMode::Background)
    }

    /// The tasks whose schedule rows this plan writes.
    pub(super) fn task_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.to_claim
            .iter()
            .map(|(_, cur)| cur)
            .chain(self.give_ups.iter().map(|(_, cur, _, _)| cur))
            .filter_map(|cur| cur.task_id)
    }
}

/// Reads and locks the rows of `requests`, skipping rows another
/// transaction holds so a batch never waits behind someone else's lock,
/// and decides what to do with each.
pub(super) async fn plan(
    tx: &mut PgConnection,
    c: &Claimer,
    requests: &[ClaimRequest],
) -> Result<ClaimPlan, sqlx::Error> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.job_id).collect();
    let rows: Vec<Current> = if ids.is_empty() {
        Vec::new()
    } else {
        // The columns of `claim`'s read. Rows another transaction holds
        // (the api marking them queued, a claim of the same job elsewhere)
        // are skipped here and claimed one by one after the batch, so a
        // batch never waits behind someone else's lock.
        sqlx::query_as!(
            Current,
            r#"SELECT job_id, to_jsonb(j.*)::text AS "row!", status AS "status: JobStatus", attempt,
                    claimed_by, coalesce(claim_expiry > now(), false) AS "claim_live!", task_id,
                    triggered_by AS "triggered_by: TriggeredBy",
                    execution_mode AS "execution_mode: ExecutionMode", command, timeout_seconds,
                    env AS "env: Json<BTreeMap<String, String>>", secret_env,
                    limits AS "limits: Json<JobLimits>", target_node_id, target_node_group,
                    target_node_role, max_retries, retry_delay_seconds, cancel_requested,
                    kill_on_timeout, coalesce(retry_at > now(), false) AS "retry_pending!",
                    priority, submitted_at, job_name, user_id
             FROM jobs j
             WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE SKIP LOCKED"#,
            &ids,
        )
        .fetch_all(&mut *tx)
        .await?
    };
    let mut rows: HashMap<Uuid, Current> = rows.into_iter().map(|r| (r.job_id, r)).collect();
    let mut plan = ClaimPlan {
        answers: requests.iter().map(|_| None).collect(),
        later: Vec::new(),
        to_claim: Vec::new(),
        give_ups: Vec::new(),
    };
    for (i, request) in requests.iter().enumerate() {
        // A second delivery of a job in the same batch waits for the first.
        let Some(cur) = rows.remove(&request.job_id) else {
            if ids[..i].contains(&request.job_id) {
                plan.answers[i] = Some(ClaimResult::Busy);
            } else {
                plan.later.push(i);
            }
            continue;
        };
        match decide(&cur, request.own_stale, c) {
            Decision::Answer(a) => plan.answers[i] = Some(a),
            Decision::GiveUp(status, reason) => plan.give_ups.push((i, cur, status, reason)),
            Decision::Claim => plan.to_claim.push((i, cur)),
        }
    }
    Ok(plan)
}

/// Carries out a plan: gives up what it must, claims the rest (one UPDATE
/// and one change-log INSERT for all of them). Fills in the plan's answers.
pub(super) async fn carry_out(
    tx: &mut PgConnection,
    c: &Claimer,
    plan: &mut ClaimPlan,
) -> Result<(), sqlx::Error> {
    for (i, cur, status, reason) in std::mem::take(&mut plan.give_ups) {
        plan.answers[i] = Some(give_up(&mut *tx, c, &cur, status, reason).await?);
    }
    let (slots, rows): (Vec<usize>, Vec<Current>) =
        std::mem::take(&mut plan.to_claim).into_iter().unzip();
    for (i, answer) in slots.into_iter().zip(claim_rows(&mut *tx, c, rows).await?) {
        plan.answers[i] = Some(answer);
    }
    Ok(())
}

/// Records a job as ended without running it.
async fn give_up(
    tx: &mut PgConnection,
    c: &Claimer,
    cur: &Current,
    status: JobStatus,
    reason: String,
) -> Result<ClaimResult, sqlx::Error> {
    let new: String = sqlx::query_scalar!(
        r#"UPDATE jobs SET status = $2, status_reason = $3, completed_at = now(), success = false,
                claim_expiry = NULL
         WHERE job_id = $1 RETURNING to_jsonb(jobs.*)::text AS "new!""#,
        cur.job_id,
        status.as_str(),
        &reason,
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO task_history (task_id, job_id, node_id, attempt, state, is_final, triggered_by, error, duration_ms)
         VALUES ($1, $2, $3, $4, $5, true, $6, $7, 0)
         ON CONFLICT DO NOTHING",
        cur.task_id,
        cur.job_id,
        c.node_id,
        cur.attempt + 1,
        status.as_str(),
        cur.triggered_by.as_str(),
        changelog::gzip(reason.as_bytes()),
    )
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
        // A run that ends without starting (given up: dead; cancelled) is
        // a final run of its task too: its downstream tasks hear of it.
        super::chain::upstream_ended(&mut *tx, task_id, cur.job_id, status.as_str(), &c.node_name)
            .await?;
    }
    crate::notify::enqueue_jobs(&mut *tx, &[cur.job_id]).await?;
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
    let updated: Vec<(Uuid, String)> = sqlx::query!(
        r#"UPDATE jobs SET status = 'running', attempt = v.attempt, claimed_by = $3,
                claim_expiry = now() + make_interval(secs => $4), started_at = now(), retry_at = NULL
         FROM UNNEST($1::uuid[], $2::int4[]) AS v(id, attempt)
         WHERE jobs.job_id = v.id
         RETURNING jobs.job_id, to_jsonb(jobs.*)::text AS "new!""#,
        &ids,
        &attempts,
        c.node_id,
        c.lease.as_secs_f64(),
    )
    .map(|r| (r.job_id, r.new))
    .fetch_all(&mut *tx)
    .await?;
    let new: HashMap<Uuid, String> = updated.into_iter().collect();
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
        .map(|cur| ClaimResult::Claimed(cur.claimed()))
        .collect())
}

impl Current {
    /// The claim this row becomes (attempt + 1).
    fn claimed(self) -> Claimed {
        Claimed {
            job_id: self.job_id,
            attempt: self.attempt + 1,
            task_id: self.task_id,
            triggered_by: self.triggered_by,
            execution_mode: self.execution_mode,
            command: self.command,
            timeout_seconds: self.timeout_seconds,
            env: self.env.0,
            secret_env: self.secret_env,
            limits: self.limits.map(|l| Box::new(l.0)),
            routing_key: crate::model::Target {
                node_id: self.target_node_id,
                node_group: self.target_node_group,
                node_role: self.target_node_role,
                fanout: crate::model::Fanout::One,
            }
            .routing_key(),
            max_retries: self.max_retries,
            retry_delay_seconds: self.retry_delay_seconds,
            kill_on_timeout: self.kill_on_timeout,
            priority: self.priority,
            submitted_at: self.submitted_at,
            job_name: self.job_name,
            user_id: self.user_id,
        }
    }
}

/// Takes out of `plan` the claims that can be run inline in one step: an
/// `inline` job that is not a task run (no schedule row to keep, no retry
/// to plan). The rest stay for the two-step path.
pub(super) fn take_inline(plan: &mut ClaimPlan) -> Vec<(usize, Current)> {
    let (inline, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut plan.to_claim)
        .into_iter()
        .partition(|(_, cur)| cur.execution_mode == ExecutionMode::Inline && cur.task_id.is_none());
    plan.to_claim = rest;
    inline
}

/// Claims, runs and records `inline` jobs (rows locked by this
/// transaction) in one step: the job moves from `queued` to its final
/// state with one UPDATE, one final history row and one change row each.
/// The `running` state is never committed, so it gets no change row of its
/// own. Returns each claim with how it ended, in order.
pub(super) async fn run_inline(
    tx: &mut PgConnection,
    c: &Claimer,
    rows: Vec<Current>,
    run: &super::InlineRunner,
) -> Result<Vec<(Claimed, super::Finish)>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let olds: Vec<(Uuid, String)> = rows.iter().map(|r| (r.job_id, r.row.clone())).collect();
    let ran: Vec<(Claimed, super::Finish)> = rows
        .into_iter()
        .map(|cur| {
            let claimed = cur.claimed();
            let fin = run(&claimed);
            (claimed, fin)
        })
        .collect();
    let ids: Vec<Uuid> = ran.iter().map(|(c, _)| c.job_id).collect();
    let attempts: Vec<i32> = ran.iter().map(|(c, _)| c.attempt).collect();
    let statuses: Vec<JobStatus> = ran.iter().map(|(_, f)| f.status).collect();
    let reasons: Vec<Option<&str>> = ran.iter().map(|(_, f)| f.reason.as_deref()).collect();
    let codes: Vec<Option<i32>> = ran.iter().map(|(_, f)| f.exit_code).collect();
    let successes: Vec<bool> = ran
        .iter()
        .map(|(_, f)| f.status == JobStatus::Succeeded)
        .collect();
    let done: Vec<(&Claimed, &super::Finish)> = ran.iter().map(|(c, f)| (c, f)).collect();
    let h = super::finish::HistoryColumns::of(&done);
    // The final history rows are inserted from the UPDATE's RETURNING, in
    // the same statement; its `hist` part is finish_final's (a `query!`
    // takes one literal, so the text is repeated; HistoryColumns is shared).
    let new: Vec<(Uuid, String)> = sqlx::query!(
        r#"WITH upd AS (
             UPDATE jobs SET status = v.status, attempt = v.attempt, claimed_by = $7,
                    status_reason = v.reason, exit_code = v.exit_code, success = v.success,
                    started_at = now(), completed_at = now(), claim_expiry = NULL, retry_at = NULL
             FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::bool[])
                  AS v(id, attempt, status, reason, exit_code, success)
             WHERE jobs.job_id = v.id
             RETURNING jobs.job_id, jobs.attempt, to_jsonb(jobs.*)::text AS new_row
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
         SELECT job_id AS "job_id!", new_row AS "new!" FROM upd"#,
        &ids,
        &attempts,
        &statuses as &[JobStatus],
        &reasons as &[Option<&str>],
        &codes as &[Option<i32>],
        &successes,
        c.node_id,
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
    .map(|r| (r.job_id, r.new))
    .fetch_all(&mut *tx)
    .await?;
    let new: HashMap<Uuid, String> = new.into_iter().collect();
    let reasons: Vec<String> = ran
        .iter()
        .map(|(_, f)| format!("ran inline: {}", f.status))
        .collect();
    let changes: Vec<Change<'_>> = olds
        .iter()
        .zip(&reasons)
        .filter_map(|((id, old), why)| {
            new.get(id)
                .map(|n| record_job_change(*id, Some(old), n, c.node_id, &c.node_name, why))
        })
        .collect();
    changelog::record_many(&mut *tx, &changes).await?;
    crate::notify::enqueue_jobs(&mut *tx, &ids).await?;
    Ok(ran)
}
