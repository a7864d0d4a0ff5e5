//! The job store: the one owner of the `jobs` row. Every write to `jobs`
//! lives here, as functions named after the arrows of
//! `docs/state_machine.md`, each set-based over a batch and writing its
//! `data_change` rows in the same transaction:
//!
//! | arrow | function |
//! |---|---|
//! | → pending (HTTP, queue) | [`accept::accept`], [`accept::accept_batch`] |
//! | → pending (a task fires) | [`fire::fire_batch`] |
//! | → pending (an upstream run ended, `after`) | `chain::upstream_ended`, inside the finishes |
//! | pending → queued | [`publish::mark_queued`] |
//! | queued → running | [`claim::claim`], and claims inside [`settle`] |
//! | running → running (lease) | [`finish::renew`] |
//! | running → terminal | finishes inside [`settle`] |
//! | running → queued (retry) | inside the finishes (`retry_at`, a delayed outbox row) |
//! | running → queued (shutdown) | [`finish::release`] |
//! | queued → cancelled / dead without running | inside the claims (give up) |
//! | running → queued (lease expired) | [`reap::requeue_expired`] |
//! | → cancelled (user) | [`cancel::cancel`] |
//! | terminal → deleted | [`cancel::delete`], [`reap::prune`] |
//!
//! A worker's claims and run endings that arrive together share one
//! transaction ([`settle`]); an `inline` job is claimed, run and recorded in
//! that one transaction.
//!
//! Every statement is written with sqlx's query macros (`query!`,
//! `query_as!`, `query_scalar!`), so its SQL, parameter and column types are
//! checked at compile time against the offline data in `.sqlx/`
//! (`scripts/sqlx-prepare` regenerates it). An argument cast to its own
//! type (`&names as &[&str]`, `&codes as &[Option<i32>]`,
//! `states as &[JobStatus]`) binds an array the macro's type check would not
//! match to the parameter's type (`&[String]`, `&[i32]`); the value sent is
//! the same.
//! Column aliases such as `"row!"` or `"status: JobStatus"` set a column's
//! nullability or Rust type where the macro cannot infer it.

pub mod accept;
pub mod cancel;
pub mod chain;
pub mod claim;
pub mod finish;
pub mod fire;
pub mod publish;
pub mod reap;

use sqlx::PgPool;
use uuid::Uuid;

pub use claim::{ClaimRequest, ClaimResult, Claimed, Claimer, claim};
pub use finish::{Finish, FinishRequest, Finished, release, renew};

use crate::db;
use crate::model::ExecutionMode;

/// One step a worker asks of the store.
#[derive(Debug, Clone)]
pub enum Step {
    /// Claim the job a delivery names.
    Claim(ClaimRequest),
    /// Record the end of an attempt.
    Finish(Box<FinishRequest>),
}

/// The answer to a [`Step`].
#[derive(Debug)]
pub enum StepResult {
    /// The answer to a claim (run the job when it is `Claimed`).
    Claim(ClaimResult),
    /// The answer to a finish.
    Finish(Finished),
    /// An `inline` job was claimed, run and recorded in the claim's
    /// transaction: nothing is left to do but ack and tell.
    Ran {
        /// The claim it ran under.
        claimed: Claimed,
        /// How it ended.
        fin: Finish,
        /// What recording it did.
        finished: Finished,
    },
}

/// Runs an `inline` command inside the worker process (the worker's own
/// built-in commands; they return at once).
pub type InlineRunner = dyn Fn(&Claimed) -> Finish + Send + Sync;

/// Carries out the steps of many deliveries in one transaction: the run
/// endings first, then the claims (rows another transaction holds are
/// skipped and claimed one by one after the commit). `inline` jobs among
/// the claims run at once and are recorded in the same transaction. The
/// commit waits for the disk when it records any run's end (the worker
/// acks right after); a transaction of claims alone does not (see
/// [`db::begin_no_fsync_wait`]). Returns one answer per step, in order.
///
/// Locking: claimed rows are locked `SKIP LOCKED` (never waiting); then
/// the schedule rows of every task run in the batch are locked at once in
/// task id order, before any job row is waited for; then the finished jobs'
/// rows, in job id order.
pub async fn settle(
    pool: &PgPool,
    c: &Claimer,
    inline: &InlineRunner,
    steps: &[Step],
) -> Result<Vec<StepResult>, sqlx::Error> {
    let claims: Vec<ClaimRequest> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Claim(r) => Some(*r),
            Step::Finish(_) => None,
        })
        .collect();
    let finishes: Vec<FinishRequest> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Finish(r) => Some((**r).clone()),
            Step::Claim(_) => None,
        })
        .collect();
    if let ([], [one]) = (finishes.as_slice(), claims.as_slice())
        && !one.inline_hint
    {
        // A lone claim may wait for its row instead of going round again
        // (an inline one takes the batch path, which runs it in one step).
        let answer = claim(pool, c, *one).await?;
        return Ok(vec![StepResult::Claim(answer)]);
    }
    // The commit waits for the disk when it records any run's end: the
    // finishes asked for, or inline jobs the deliveries announce.
    let durable = !finishes.is_empty() || claims.iter().any(|c| c.inline_hint);
    let mut tx = if durable {
        pool.begin().await?
    } else {
        db::begin_no_fsync_wait(pool).await?
    };
    let mut plan = claim::plan(&mut tx, c, &claims).await?;
    // A redelivered copy of a job whose end this batch records must not
    // claim it in the same transaction: it asks again and finds it ended.
    let finishing: std::collections::HashSet<Uuid> =
        finishes.iter().map(|f| f.claimed.job_id).collect();
    plan.defer(&finishing);
    let one_step = claim::take_inline(&mut plan);
    let plan_durable = plan.needs_durable_commit();
    let mut task_ids: Vec<Uuid> = plan
        .task_ids()
        .chain(finishes.iter().filter_map(|f| f.claimed.task_id))
        .collect();
    task_ids.sort_unstable();
    task_ids.dedup();
    if !task_ids.is_empty() {
        // The rows are fetched only to lock them (the macro's query with an
        // output column has no `execute`).
        sqlx::query_scalar!(
            r#"SELECT 1 AS "locked!" FROM task_schedule WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE"#,
            &task_ids,
        )
        .fetch_all(&mut *tx)
        .await?;
    }
    let finished = finish::finish_many(&mut tx, c.node_id, &c.node_name, &finishes).await?;
    claim::carry_out(&mut tx, c, &mut plan).await?;

    // Inline jobs run now, inside this transaction: plain ones in one step
    // (queued → final), task runs through their claim and a finish, so
    // their schedule and retries are kept as on any worker.
    let (slots, rows): (Vec<usize>, Vec<_>) = one_step.into_iter().unzip();
    let one_step_ran = claim::run_inline(&mut tx, c, rows, inline).await?;
    let mut ran: Vec<(usize, FinishRequest)> = Vec::new();
    for (k, answer) in plan.answers.iter().enumerate() {
        if let Some(ClaimResult::Claimed(claimed)) = answer
            && claimed.execution_mode == ExecutionMode::Inline
        {
            let fin = inline(claimed);
            ran.push((
                k,
                FinishRequest {
                    claimed: claimed.clone(),
                    fin,
                },
            ));
        }
    }
    let ran_finished = if ran.is_empty() {
        Vec::new()
    } else {
        let requests: Vec<FinishRequest> = ran.iter().map(|(_, r)| r.clone()).collect();
        finish::finish_many(&mut tx, c.node_id, &c.node_name, &requests).await?
    };
    if !durable && (plan_durable || !ran.is_empty() || !one_step_ran.is_empty()) {
        sqlx::query!("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;

    // Locked or missing rows: one by one, now that this batch holds nothing.
    // The batch is committed, so a failure here is that request's alone.
    for k in std::mem::take(&mut plan.later) {
        plan.answers[k] = Some(match claim(pool, c, claims[k]).await {
            Ok(answer) => answer,
            Err(error) => ClaimResult::Again(error.to_string()),
        });
    }
    let mut claim_answers: Vec<Option<StepResult>> = plan
        .answers
        .into_iter()
        .map(|a| a.map(StepResult::Claim))
        .collect();
    for (k, (claimed, fin)) in slots.into_iter().zip(one_step_ran) {
        claim_answers[k] = Some(StepResult::Ran {
            claimed,
            fin,
            finished: Finished::Final,
        });
    }
    for ((k, request), finished) in ran.into_iter().zip(ran_finished) {
        claim_answers[k] = Some(StepResult::Ran {
            claimed: request.claimed,
            fin: request.fin,
            finished,
        });
    }
    let mut claim_answers = claim_answers.into_iter();
    let mut finished = finished.into_iter();
    // Every step has its answer; a missing one is answered as a failed
    // claim (asked again) rather than shifting the others.
    Ok(steps
        .iter()
        .map(|s| match s {
            Step::Claim(_) => claim_answers.next().flatten().unwrap_or_else(|| {
                StepResult::Claim(ClaimResult::Again("no answer for this claim".into()))
            }),
            Step::Finish(_) => finished.next().map_or(
                StepResult::Claim(ClaimResult::Again("no answer".into())),
                StepResult::Finish,
            ),
        })
        .collect())
}
