//! Firing recurring tasks. One pass ([`tick`]) locks the due `task_schedule`
//! rows with `FOR UPDATE SKIP LOCKED` (in task id order), so several
//! schedulers never fire the same row at once, and the unique
//! (task, fire time, node) index on `jobs` is the backstop: each due fire
//! time fires exactly once.
//!
//! A pass catches a task up on every fire time that is due at `now` and
//! within the misfire grace, each its own job with its own `fire_at`. All
//! single-target jobs of the pass are written set-based
//! ([`taskhost_common::store::fire::fire_batch`]), and every touched
//! `task_schedule` row is updated by one statement, all in one transaction.
//! A pass takes at most [`TASK_BATCH`] tasks and [`JOB_BUDGET`] fire times;
//! when it is full it reports [`TickReport::more`] and the loop runs the next
//! pass at once. See `docs/scheduler.md`.

use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::jobs::{self, Accepted, NewJob, OutboxMessage, TaskRun};
use taskhost_common::model::{
    Fanout, JobSpec, JobStatus, MisfirePolicy, NoNodePolicy, OverlapPolicy, TriggeredBy,
};
use taskhost_common::schedule::Schedule;
use taskhost_common::store::fire::{self, Fire};
use taskhost_common::tasks::{TASK_COLUMNS, Task};
use tracing::Instrument;
use uuid::Uuid;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Jobs created, one per fired fire time (more with fan-out).
    pub fired_jobs: Vec<Uuid>,
    /// Fire times skipped (misfire policy `skip`, or overlap policy `skip`).
    pub skipped: usize,
    /// Of `skipped`, those skipped because the previous run was still
    /// going (overlap policy `skip`).
    pub overlaps_skipped: usize,
    /// The fire time of each run created, in `fired_jobs` order of tasks
    /// (one per fire time, also for a fan-out).
    pub fire_times: Vec<DateTime<Utc>>,
    /// Tasks whose backlog was missed past the grace (a misfire), each
    /// counted once per pass; recorded in `task_schedule.misfire_count`.
    pub misfires: usize,
    /// Outbox rows committed by this pass (the caller publishes them).
    pub outbox: Vec<OutboxMessage>,
    /// Jobs recorded `dead` because no node matched (the caller publishes
    /// their events).
    pub dead_jobs: Vec<Uuid>,
    /// The pass was full (a task or fire-time limit was reached): more may
    /// be due at `now`, so the caller runs another pass at once.
    pub more: bool,
    /// Due rows this pass locked and left due: tasks held for a node
    /// (`hold`), tasks whose stored schedule or job no longer validates,
    /// and tasks that never fire again. The loop retries them after its
    /// longest sleep rather than at once.
    pub stuck: usize,
    /// Wall time of the pass, from `BEGIN` to the end of `COMMIT`.
    pub elapsed: StdDuration,
    /// Wall time of the `COMMIT` alone.
    pub commit: StdDuration,
}

/// Task rows one pass locks at most.
pub const TASK_BATCH: i64 = 1000;
/// Fire times one pass fires (or skips) at most.
pub const JOB_BUDGET: usize = 2000;

/// Policies a tick decides with.
#[derive(Debug, Clone, Copy)]
pub struct TickPolicy {
    /// A fire time older than this counts as missed.
    pub misfire_grace: Duration,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    next_run: Option<DateTime<Utc>>,
    is_running: bool,
    schedule_row: Value,
    #[sqlx(flatten)]
    task: Task,
}

/// The set-based update of one `task_schedule` row, and why.
struct ScheduleUpdate {
    task_id: Uuid,
    old: Value,
    next_run: Option<DateTime<Utc>>,
    /// The latest fire time fired (None: keep `last_run`).
    last_run: Option<DateTime<Utc>>,
    /// None: keep `last_state`.
    last_state: Option<&'static str>,
    /// Whether a fired run now counts as running.
    running: bool,
    runs: i64,
    failures: i64,
    /// The oldest fire time of a backlog missed past the grace (a misfire).
    misfire: Option<DateTime<Utc>>,
    reason: &'static str,
}

impl ScheduleUpdate {
    /// A new `next_run` for a due row, nothing else changed yet.
    fn next_run(row: &DueRow, next_run: Option<DateTime<Utc>>, reason: &'static str) -> Self {
        Self {
            task_id: row.task.task_id,
            old: row.schedule_row.clone(),
            next_run,
            last_run: None,
            last_state: None,
            running: false,
            runs: 0,
            failures: 0,
            misfire: None,
            reason,
        }
    }
}

/// What a pass does with one fire time of a task.
enum Step {
    Fire(DateTime<Utc>),
    Skip(DateTime<Utc>, &'static str),
}

/// The fire times a due row covers at `now`, what to do with each, and
/// the row's next `next_run`. `budget` caps the fire times taken; a
/// truncated series leaves `next_run` at the first fire time not taken.
fn plan(
    schedule: &Schedule,
    task: &Task,
    first: DateTime<Utc>,
    is_running: bool,
    now: DateTime<Utc>,
    grace: Duration,
    budget: usize,
) -> (Vec<Step>, Option<DateTime<Utc>>) {
    let overlap_skip = task.overlap_policy == OverlapPolicy::Skip;
    if now - first > grace {
        // Missed: the whole backlog is one misfire. catch_up fires one run
        // (at the oldest missed fire time), skip fires none; either way the
        // task resumes at the first fire time after now.
        let next = schedule.next_after(now);
        let step = if task.misfire_policy == MisfirePolicy::Skip {
            Step::Skip(first, "misfire: fire time missed; policy skip")
        } else if is_running && overlap_skip {
            Step::Skip(first, "overlap: previous run still going; policy skip")
        } else {
            Step::Fire(first)
        };
        return (vec![step], next);
    }
    // Within the grace: every fire time up to now, each once. With overlap
    // skip the first fires (unless a run is going) and makes the task
    // running, so the rest of the series is skipped.
    let mut steps = Vec::new();
    let mut at = Some(first);
    let mut running = is_running;
    while let Some(t) = at.filter(|t| *t <= now) {
        if steps.len() >= budget.max(1) {
            return (steps, Some(t));
        }
        if running && overlap_skip {
            steps.push(Step::Skip(
                t,
                "overlap: previous run still going; policy skip",
            ));
        } else {
            steps.push(Step::Fire(t));
            // A fan-out fire with no node is recorded dead and leaves the
            // task idle; that is only known once fired, so a fan-out series
            // is decided step by step in `fire_fanout` instead.
            running = true;
        }
        at = schedule.next_after(t);
    }
    (steps, at)
}

/// One pass over due tasks at `now`: schedules tasks that have no
/// `next_run` yet, then fires, for every enabled task whose
/// `next_run <= now`, each of its fire times up to `now` (see [`plan`]),
/// in one transaction.
pub async fn tick(
    pool: &PgPool,
    now: DateTime<Utc>,
    policy: TickPolicy,
) -> Result<TickReport, sqlx::Error> {
    let started = Instant::now();
    let mut report = TickReport::default();
    let mut tx = pool.begin().await?;
    let sql = format!(
        "SELECT s.next_run, s.is_running, to_jsonb(s.*) AS schedule_row, {cols}
         FROM task_schedule s JOIN tasks t USING (task_id)
         WHERE t.enabled AND (s.next_run IS NULL OR s.next_run <= $1)
         ORDER BY s.task_id
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
        .bind(TASK_BATCH)
        .fetch_all(&mut *tx)
        .await?;
    if due.is_empty() {
        tx.commit().await?;
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    report.more = due.len() as i64 >= TASK_BATCH;

    let selected = started.elapsed();
    let mut updates: Vec<ScheduleUpdate> = Vec::with_capacity(due.len());
    // Single-target fire times, written together; each points at its
    // row's update.
    let mut specs: Vec<JobSpec> = Vec::new();
    // (update index, spec index, row index, the fire)
    let mut fires: Vec<(usize, usize, usize, TaskRun)> = Vec::new();
    let mut budget = JOB_BUDGET;
    for (row_index, row) in due.iter().enumerate() {
        let task = &row.task;
        let Some(schedule) = task.parsed_schedule() else {
            tracing::warn!(task_id = %task.task_id, schedule = task.schedule, "stored schedule does not parse; task skipped");
            report.stuck += 1;
            continue;
        };
        let Some(first) = row.next_run else {
            let next = schedule.next_after(now);
            if next.is_none() {
                report.stuck += 1;
            }
            updates.push(ScheduleUpdate::next_run(row, next, "scheduled"));
            continue;
        };
        if budget == 0 {
            // Left for the next pass (already reported as `more`).
            report.more = true;
            continue;
        }
        let spec = match task.job_spec() {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "task no longer valid; skipped");
                report.stuck += 1;
                continue;
            }
        };
        let fanout_all = spec.target.fanout == Fanout::All;
        if task.no_node_policy == NoNodePolicy::Hold
            && fanout_all
            && jobs::matching_active_nodes(&mut tx, &spec.target)
                .await?
                .is_empty()
        {
            // Hold: nothing is written and next_run stays, so the same fire
            // time is tried again (after the loop's longest sleep) until a
            // matching node is up.
            tracing::info!(task_id = %task.task_id, "no active node matches; task held");
            report.stuck += 1;
            report.skipped += 1;
            continue;
        }
        let (steps, next) = plan(
            &schedule,
            task,
            first,
            row.is_running,
            now,
            policy.misfire_grace,
            budget,
        );
        budget = budget.saturating_sub(steps.len());
        if matches!(next, Some(t) if t <= now) {
            report.more = true;
        }
        let index = updates.len();
        let mut update = ScheduleUpdate::next_run(row, next, "fired");
        if now - first > policy.misfire_grace {
            update.misfire = Some(first);
            report.misfires += 1;
        }
        if fanout_all {
            fire_fanout(
                &mut tx,
                task,
                &spec,
                row.is_running,
                &steps,
                &mut update,
                &mut report,
            )
            .await?;
        } else {
            let spec_index = specs.len();
            let mut any = false;
            for step in &steps {
                match step {
                    Step::Fire(at) => {
                        any = true;
                        fires.push((
                            index,
                            spec_index,
                            row_index,
                            TaskRun {
                                task_id: task.task_id,
                                fire_at: Some(*at),
                                max_retries: task.max_retries,
                                retry_delay_seconds: task.retry_delay_seconds,
                                kill_on_timeout: task.kill_on_timeout,
                                upstream_job_id: None,
                            },
                        ));
                        // Settled below once the batch insert answers.
                        update.last_state = Some("queued");
                    }
                    Step::Skip(at, reason) => {
                        report.skipped += 1;
                        report.overlaps_skipped += usize::from(reason.starts_with("overlap"));
                        tracing::debug!(task_id = %task.task_id, fire_at = %at, reason, "fire time skipped");
                        update.last_state = Some("skipped");
                        if !any {
                            update.reason = reason;
                        }
                    }
                }
            }
            if any {
                specs.push(spec);
            }
        }
        updates.push(update);
    }

    let planned = started.elapsed();
    // One INSERT of every single-target job (plus change and outbox rows).
    // Tracing: each fire starts its own trace (`task.fire`), kept open
    // until the pass commits.
    let mut fire_spans = Vec::new();
    let batch: Vec<Fire<'_>> = fires
        .iter()
        .map(|(_, spec_index, row_index, run)| {
            let job_id = Uuid::now_v7();
            let span = fire_span(run, job_id);
            let traceparent = taskhost_common::telemetry::traceparent(&span);
            fire_spans.push(span);
            Fire {
                job_id,
                user_id: &due[*row_index].task.created_by,
                spec: &specs[*spec_index],
                task: *run,
                traceparent,
            }
        })
        .collect();
    let outcome = fire::fire_batch(&mut tx, &batch, "scheduler").await?;
    let inserted = started.elapsed();
    for (((index, _, _, run), fired), job) in fires.iter().zip(outcome).zip(&batch) {
        let update = &mut updates[*index];
        match fired {
            Some(message) => {
                report.fired_jobs.push(job.job_id);
                report.fire_times.extend(run.fire_at);
                report.outbox.push(message);
                update.runs += 1;
                update.running = true;
                update.last_run = update.last_run.max(run.fire_at);
            }
            // Another scheduler fired this fire time already.
            None => {
                tracing::info!(task_id = %run.task_id, fire_at = ?run.fire_at, "fire time already fired");
                update.last_run = update.last_run.max(run.fire_at);
            }
        }
    }

    if updates.is_empty() {
        // Only stuck rows: another pass at once would find the same ones.
        report.more = false;
    }
    write_schedule_updates(&mut tx, &updates).await?;
    if !report.fired_jobs.is_empty() {
        // Fault tests: the scheduler dies or freezes mid-pass, holding its
        // row locks with the fires not yet committed.
        taskhost_common::failpoint::hit("scheduler.fire.before_commit");
    }
    let commit = Instant::now();
    tx.commit().await?;
    report.commit = commit.elapsed();
    drop(fire_spans);
    record_metrics(&report);
    report.elapsed = started.elapsed();
    if !report.fired_jobs.is_empty() || report.skipped > 0 {
        tracing::info!(
            fired = report.fired_jobs.len(),
            skipped = report.skipped,
            tasks = due.len(),
            elapsed_ms = report.elapsed.as_secs_f64() * 1000.0,
            commit_ms = report.commit.as_secs_f64() * 1000.0,
            select_ms = selected.as_secs_f64() * 1000.0,
            plan_ms = (planned - selected).as_secs_f64() * 1000.0,
            jobs_ms = (inserted - planned).as_secs_f64() * 1000.0,
            "scheduler pass"
        );
    }
    Ok(report)
}

/// Counts a committed pass: runs created with how late each was after
/// its fire time, misfires and skipped overlaps.
fn record_metrics(report: &TickReport) {
    let now = Utc::now();
    metrics::counter!("taskhost_scheduler_fires_total").increment(report.fire_times.len() as u64);
    taskhost_common::metrics::submitted("schedule", report.fired_jobs.len());
    let lateness = metrics::histogram!("taskhost_scheduler_tick_lateness_seconds");
    for at in &report.fire_times {
        lateness.record((now - *at).as_seconds_f64().max(0.0));
    }
    metrics::counter!("taskhost_scheduler_misfires_total").increment(report.misfires as u64);
    metrics::counter!("taskhost_scheduler_overlaps_skipped_total")
        .increment(report.overlaps_skipped as u64);
}

/// Tracing (README, "Tracing"): the root span of one fire of a task, a
/// new trace whose context the fired job's work message carries.
/// Disabled when tracing is off.
fn fire_span(run: &TaskRun, job_id: Uuid) -> tracing::Span {
    if !taskhost_common::telemetry::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        parent: None,
        "task.fire",
        otel.kind = "producer",
        task.id = %run.task_id,
        task.fire_at = %run.fire_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        job.id = %job_id,
    )
}

/// A fan-out (`all`) task: each fire time through `jobs::accept_in` (one
/// job per matching node), inside the pass's transaction. A fire with no
/// node is recorded dead and leaves the task idle, so with overlap skip the
/// next fire time of the series fires too.
async fn fire_fanout(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task: &Task,
    spec: &JobSpec,
    is_running: bool,
    steps: &[Step],
    update: &mut ScheduleUpdate,
    report: &mut TickReport,
) -> Result<(), sqlx::Error> {
    let overlap_skip = task.overlap_policy == OverlapPolicy::Skip;
    let mut running = is_running;
    let mut any = false;
    for step in steps {
        let (at, skip) = match step {
            Step::Skip(at, reason) => (*at, Some(*reason)),
            // `plan` assumed every fire starts a run; recheck here.
            Step::Fire(at) if running && overlap_skip => {
                (*at, Some("overlap: previous run still going; policy skip"))
            }
            Step::Fire(at) => (*at, None),
        };
        if let Some(reason) = skip {
            report.skipped += 1;
            report.overlaps_skipped += usize::from(reason.starts_with("overlap"));
            tracing::debug!(task_id = %task.task_id, fire_at = %at, reason, "fire time skipped");
            update.last_state = Some("skipped");
            if !any {
                update.reason = reason;
            }
            continue;
        }
        any = true;
        update.reason = "fired";
        let job_id = Uuid::now_v7();
        let task_run = TaskRun {
            task_id: task.task_id,
            fire_at: Some(at),
            max_retries: task.max_retries,
            retry_delay_seconds: task.retry_delay_seconds,
            kill_on_timeout: task.kill_on_timeout,
            upstream_job_id: None,
        };
        let accepted = jobs::accept_in(
            tx,
            &NewJob {
                job_id,
                user_id: &task.created_by,
                spec,
                triggered_by: TriggeredBy::Schedule,
                idempotency_key: None,
                request_hash: None,
                changed_by: "scheduler",
                task: Some(task_run),
                rerun_of: None,
            },
        )
        .instrument(fire_span(&task_run, job_id))
        .await?;
        update.last_run = Some(at);
        match accepted {
            Accepted::Created {
                job_ids,
                outbox,
                status,
            } => {
                update.runs += 1;
                if status == JobStatus::Dead {
                    report.dead_jobs.extend(&job_ids);
                    // Recorded dead at once (no node matches): a final run,
                    // whose downstream tasks hear of it like any other.
                    for dead in &job_ids {
                        taskhost_common::store::chain::upstream_ended(
                            tx,
                            task.task_id,
                            *dead,
                            "dead",
                            "scheduler",
                        )
                        .await?;
                    }
                    update.failures += 1;
                    update.last_state = Some("dead");
                } else {
                    running = true;
                    update.running = true;
                    update.last_state = Some("queued");
                }
                report.fired_jobs.extend(job_ids);
                report.fire_times.push(at);
                report.outbox.extend(outbox);
            }
            // Another scheduler fired this fire time already.
            Accepted::Duplicate { .. } | Accepted::Conflict => {
                update.last_state = Some("queued");
            }
        }
    }
    Ok(())
}

/// One UPDATE of every touched `task_schedule` row (UNNEST), then one
/// INSERT of their change rows.
async fn write_schedule_updates(
    conn: &mut PgConnection,
    updates: &[ScheduleUpdate],
) -> Result<(), sqlx::Error> {
    if updates.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = updates.iter().map(|u| u.task_id).collect();
    let next: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.next_run).collect();
    let last_run: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.last_run).collect();
    let last_state: Vec<Option<&str>> = updates.iter().map(|u| u.last_state).collect();
    let running: Vec<bool> = updates.iter().map(|u| u.running).collect();
    let runs: Vec<i64> = updates.iter().map(|u| u.runs).collect();
    let failures: Vec<i64> = updates.iter().map(|u| u.failures).collect();
    let misfires: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.misfire).collect();
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE task_schedule s
         SET next_run = u.next_run,
             last_run = coalesce(u.last_run, s.last_run),
             last_state = coalesce(u.last_state, s.last_state),
             is_running = s.is_running OR u.running,
             total_runs = s.total_runs + u.runs,
             failure_count = s.failure_count + u.failures,
             misfire_count = s.misfire_count + (u.misfire IS NOT NULL)::int,
             last_misfire_at = coalesce(u.misfire, s.last_misfire_at)
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::bool[],
                     $6::int8[], $7::int8[], $8::timestamptz[])
              AS u(task_id, next_run, last_run, last_state, running, runs, failures, misfire)
         WHERE s.task_id = u.task_id
         RETURNING s.task_id, to_jsonb(s.*)::text",
    )
    .bind(&ids)
    .bind(&next)
    .bind(&last_run)
    .bind(&last_state)
    .bind(&running)
    .bind(&runs)
    .bind(&failures)
    .bind(&misfires)
    .fetch_all(&mut *conn)
    .await?;
    let new: std::collections::HashMap<Uuid, String> = rows.into_iter().collect();
    let changes: Vec<Change<'_>> = updates
        .iter()
        .filter_map(|u| {
            new.get(&u.task_id).map(|n| Change {
                table: "task_schedule",
                record_id: u.task_id.to_string(),
                action: Action::Update,
                old: Some(&u.old),
                new: Some(n),
                changed_by: "scheduler",
                node_id: None,
                reason: Some(u.reason),
            })
        })
        .collect();
    changelog::record_many(conn, &changes).await
}

/// When the loop should run its next pass, read after a pass at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextDue {
    /// Enabled tasks still due at `now` (or without a `next_run`): rows the
    /// pass left (see [`TickReport::stuck`]) or rows another scheduler
    /// holds in its pass.
    pub due_now: i64,
    /// The earliest `next_run` after `now` of an enabled task.
    pub next: Option<DateTime<Utc>>,
}

/// Reads [`NextDue`] from `task_schedule`.
pub async fn next_due(pool: &PgPool, now: DateTime<Utc>) -> Result<NextDue, sqlx::Error> {
    let (due_now, next): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM (
                  SELECT 1 FROM task_schedule s JOIN tasks t USING (task_id)
                  WHERE t.enabled AND (s.next_run IS NULL OR s.next_run <= $1)
                  LIMIT 100000) d),
             (SELECT s.next_run FROM task_schedule s JOIN tasks t USING (task_id)
              WHERE t.enabled AND s.next_run > $1
              ORDER BY s.next_run LIMIT 1)",
    )
    .bind(now)
    .fetch_one(pool)
    .await?;
    Ok(NextDue { due_now, next })
}
