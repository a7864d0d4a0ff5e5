//! One delivery's steps: slot → claim → run → record → settle. The claim
//! and the record go through the worker's step batcher
//! (`taskhost_common::store::settle`), so the claims and run endings of
//! concurrent deliveries share one transaction; an `inline` job is claimed,
//! run and recorded in one. A delivery is acked only after the run's end is
//! committed (`background` jobs: once claimed; their liveness is the lease).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use taskhost_common::messages::{JOB_RUN_V1, JobRun};
use taskhost_common::model::{ExecutionMode, JobStatus};
use taskhost_common::store::{
    self, ClaimRequest, ClaimResult, Claimed, Finish, FinishRequest, Finished, Step, StepResult,
};
use taskhost_common::{CancellationToken, changelog, events, secrets};
use tracing::Instrument;
use uuid::Uuid;

use crate::consumer::Acks;
use crate::exec::{self, CommandSpec, Ending, Outcome};
use crate::{Ctx, Running, StopReason, inline};

fn parse_run(delivery: &Delivery) -> Result<JobRun, String> {
    if let Some(kind) = delivery.properties.kind().as_ref()
        && kind.as_str() != JOB_RUN_V1
    {
        return Err(format!(
            "unknown message type `{kind}` (expected {JOB_RUN_V1})"
        ));
    }
    serde_json::from_slice(&delivery.data).map_err(|e| format!("invalid {JOB_RUN_V1} message: {e}"))
}

fn publish_event(ctx: &Ctx, job_id: Uuid, status: JobStatus, attempt: i32, exit_code: Option<i32>) {
    ctx.events.send(events::job_event(
        job_id,
        status,
        attempt,
        Some(ctx.node_id),
        exit_code,
    ));
}

/// Holds a delivery's place among the deliveries of its job that this
/// process is claiming (or, after a run, recording) while it lives. The
/// oldest asks the store first; the others wait for it, so a copy that came
/// in a moment earlier never takes over a claim another delivery of this
/// process just made.
struct Claiming {
    map: Arc<Mutex<HashMap<Uuid, Vec<u64>>>>,
    job_id: Uuid,
    ticket: u64,
}

static NEXT_TICKET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Claiming {
    fn enter(map: &Arc<Mutex<HashMap<Uuid, Vec<u64>>>>, job_id: Uuid) -> Self {
        let ticket = NEXT_TICKET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut m) = map.lock() {
            m.entry(job_id).or_default().push(ticket);
        }
        Self {
            map: map.clone(),
            job_id,
            ticket,
        }
    }

    /// No other delivery of this job is being claimed in this process.
    fn alone(&self) -> bool {
        self.map
            .lock()
            .is_ok_and(|m| m.get(&self.job_id).is_none_or(|t| t.len() <= 1))
    }

    /// This delivery is the oldest of its job here: it may ask the store.
    fn first(&self) -> bool {
        self.map
            .lock()
            .is_ok_and(|m| m.get(&self.job_id).and_then(|t| t.first()) == Some(&self.ticket))
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(t) = m.get_mut(&self.job_id)
        {
            t.retain(|&x| x != self.ticket);
            if t.is_empty() {
                m.remove(&self.job_id);
            }
        }
    }
}

/// Sleeps `d` unless shutdown comes first; false on shutdown.
async fn pause(ctx: &Ctx, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = ctx.shutdown.cancelled() => false,
    }
}

pub(crate) async fn handle(ctx: Arc<Ctx>, acks: Arc<Acks>, delivery: Delivery) {
    let run = match parse_run(&delivery) {
        Ok(r) => r,
        Err(reason) => return acks.dead_letter(&ctx.publisher, &delivery, &reason).await,
    };
    let span = crate::trace::run_span(&ctx, &delivery, &run);
    process(ctx, &acks, delivery, run).instrument(span).await;
}

async fn process(ctx: Arc<Ctx>, acks: &Acks, delivery: Delivery, run: JobRun) {
    let job_id = run.job_id;
    // Inline jobs take no slot: they run inside their claim's transaction,
    // bounded by the prefetch window.
    let slots = match run.execution_mode {
        ExecutionMode::Background => Some((ctx.background_slots.clone(), "background")),
        ExecutionMode::Pool => Some((ctx.pool_slots.clone(), "pool")),
        ExecutionMode::Inline => None,
    };
    let permit = match slots {
        None => None,
        Some((slots, kind)) => tokio::select! {
            p = slots.acquire_owned() => match p { Ok(p) => Some(Slot::new(p, kind)), Err(_) => return acks.requeue(&delivery).await },
            () = ctx.shutdown.cancelled() => return acks.requeue(&delivery).await,
        },
    };
    let lease = Duration::from_secs(ctx.settings.worker.claim_lease_secs);
    let mut wait = Duration::from_millis(100);
    // Held until the job is in `running`: another copy of the same job
    // delivered meanwhile must not take this process's claim for a stale one.
    let claiming = Claiming::enter(&ctx.claiming, job_id);
    let claimed = loop {
        if !claiming.first() {
            // An older delivery of this job asks first; its answer decides.
            if !pause(&ctx, Duration::from_millis(100)).await {
                return acks.requeue(&delivery).await;
            }
            continue;
        }
        let own_stale = claiming.alone()
            && ctx
                .running
                .lock()
                .map_or(true, |r| !r.contains_key(&job_id));
        let answer = match ctx
            .steps
            .call(Step::Claim(ClaimRequest {
                job_id,
                own_stale,
                inline_hint: run.execution_mode == ExecutionMode::Inline,
            }))
            .await
        {
            Ok(StepResult::Claim(answer)) => answer,
            Ok(StepResult::Ran {
                claimed,
                fin,
                finished,
            }) => {
                // An inline job: claimed, run and recorded in one
                // transaction, so `running` was never visible and only its
                // end is told.
                drop(permit);
                started(&claimed);
                return settled(&ctx, acks, &delivery, &claimed, &fin, finished, false).await;
            }
            Ok(StepResult::Finish(_)) => ClaimResult::Again("a claim answered as a finish".into()),
            Err(error) => ClaimResult::Again(error),
        };
        match answer {
            ClaimResult::Claimed(c) => break c,
            ClaimResult::Finished(status) => {
                tracing::debug!(%job_id, %status, "redelivered message for a finished job; acked without running");
                return acks.ack(&delivery).await;
            }
            ClaimResult::NotDue => {
                tracing::info!(%job_id, "early copy of a job whose retry is not due yet; acked without running");
                return acks.ack(&delivery).await;
            }
            ClaimResult::Missing => {
                tracing::info!(%job_id, "message for a job that no longer exists; acked");
                return acks.ack(&delivery).await;
            }
            ClaimResult::Dead(reason) => {
                publish_event(&ctx, job_id, JobStatus::Dead, run.attempt, None);
                return acks.dead_letter(&ctx.publisher, &delivery, &reason).await;
            }
            ClaimResult::Busy => {
                // Another worker holds a live claim (e.g. this is a
                // redelivery after a broker hiccup): wait until it finishes
                // or its lease runs out.
                if !pause(&ctx, Duration::from_millis(500)).await {
                    return acks.requeue(&delivery).await;
                }
            }
            ClaimResult::Again(error) => {
                tracing::warn!(%error, %job_id, "claim failed; retrying");
                if !pause(&ctx, wait).await {
                    return acks.requeue(&delivery).await;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    let background = claimed.execution_mode == ExecutionMode::Background;
    if background {
        acks.ack(&delivery).await;
    }
    let cancel = CancellationToken::new();
    let reason = Arc::new(Mutex::new(None));
    if let Ok(mut r) = ctx.running.lock() {
        r.insert(
            job_id,
            Running {
                cancel: cancel.clone(),
                reason: reason.clone(),
            },
        );
    }
    drop(claiming);
    started(&claimed);
    crate::trace::claimed(&claimed);
    publish_event(&ctx, job_id, JobStatus::Running, claimed.attempt, None);
    tracing::debug!(%job_id, attempt = claimed.attempt, mode = %claimed.execution_mode, "job started");
    // An inline job that was not run inside its claim (its row was busy
    // then) runs here; it returns at once and needs no lease renewal.
    let inline_job = claimed.execution_mode == ExecutionMode::Inline;
    let renewer =
        (!inline_job).then(|| tokio::spawn(renew_loop(ctx.clone(), claimed.clone(), lease)));
    let outcome = if inline_job {
        inline::run(Some(&ctx), &claimed.command)
    } else {
        execute(&ctx, &claimed, cancel).await
    };
    if let Some(renewer) = renewer {
        renewer.abort();
    }
    // Until its end is recorded the job stays in this process's hands: a
    // copy of its message delivered meanwhile must see a live claim, not a
    // stale one of this node to take over (which would run it again).
    let finishing = Claiming::enter(&ctx.claiming, job_id);
    if let Ok(mut r) = ctx.running.lock() {
        r.remove(&job_id);
    }
    drop(permit);
    let stop = reason.lock().ok().and_then(|r| *r);
    match stop {
        Some(StopReason::Lost) => {
            metrics::counter!("taskhost_job_claims_lost_total").increment(1);
            crate::trace::ended("lost");
            tracing::warn!(%job_id, attempt = claimed.attempt, "claim was taken over; this attempt's result is dropped");
            if !background {
                acks.ack(&delivery).await;
            }
            return;
        }
        Some(StopReason::Shutdown) => {
            crate::trace::ended("released");
            let republish = background.then(|| claimed.work_message());
            if let Err(error) = store::release(
                &ctx.pool,
                &claimed,
                ctx.node_id,
                &ctx.node_name,
                republish.as_ref(),
                &claimed.routing_key,
            )
            .await
            {
                tracing::warn!(%error, %job_id, "could not release the job; its lease will expire");
            }
            if !background {
                acks.requeue(&delivery).await;
            }
            return;
        }
        Some(StopReason::Cancelled) | None => {}
    }
    let fin = finish_of(&outcome, stop == Some(StopReason::Cancelled));
    let mut wait = Duration::from_millis(100);
    let finished = loop {
        let request = FinishRequest {
            claimed: claimed.clone(),
            fin: fin.clone(),
        };
        match ctx.steps.call(Step::Finish(Box::new(request))).await {
            Ok(StepResult::Finish(finished)) => break finished,
            Ok(other) => tracing::warn!(?other, %job_id, "a finish answered as a claim; retrying"),
            Err(error) => {
                // Postgres is away: keep the result and the unacked delivery
                // until it is back, so nothing is lost.
                tracing::warn!(%error, %job_id, "recording the result failed; retrying");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    };
    drop(finishing);
    settled(&ctx, acks, &delivery, &claimed, &fin, finished, background).await;
}

/// After a run's end is recorded: tell (event, log) and ack.
async fn settled(
    ctx: &Ctx,
    acks: &Acks,
    delivery: &Delivery,
    claimed: &Claimed,
    fin: &Finish,
    finished: Finished,
    background: bool,
) {
    let job_id = claimed.job_id;
    if !matches!(finished, Finished::Fenced) {
        record_run(ctx, claimed, fin, &finished);
    }
    crate::trace::claimed(claimed);
    crate::trace::ended(fin.status.as_str());
    match finished {
        Finished::Final => {
            publish_event(ctx, job_id, fin.status, claimed.attempt, fin.exit_code);
        }
        Finished::Retry(_) => {
            publish_event(
                ctx,
                job_id,
                JobStatus::Queued,
                claimed.attempt,
                fin.exit_code,
            );
        }
        Finished::Fenced => {
            tracing::warn!(%job_id, attempt = claimed.attempt, "result refused: a newer attempt owns the job");
        }
    }
    if !background {
        acks.ack(delivery).await;
    }
}

/// A held slot, counted in `taskhost_worker_slots_busy` while it lives.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    kind: &'static str,
}

impl Slot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, kind: &'static str) -> Self {
        metrics::gauge!("taskhost_worker_slots_busy", "kind" => kind).increment(1.0);
        Self {
            _permit: permit,
            kind,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("taskhost_worker_slots_busy", "kind" => self.kind).decrement(1.0);
    }
}

fn started(claimed: &Claimed) {
    metrics::counter!("taskhost_jobs_started_total", "mode" => claimed.execution_mode.as_str())
        .increment(1);
}

/// The run's metrics and its one log line (README, "Logs"): at INFO when
/// it succeeded or was cancelled, at WARN when it failed, timed out or
/// died; a failed attempt that will be retried says when.
fn record_run(ctx: &Ctx, claimed: &Claimed, fin: &Finish, finished: &Finished) {
    let (mode, state) = (claimed.execution_mode.as_str(), fin.status.as_str());
    let seconds = fin.duration.as_secs_f64();
    metrics::counter!("taskhost_jobs_finished_total", "mode" => mode, "state" => state)
        .increment(1);
    metrics::histogram!("taskhost_job_run_duration_seconds", "mode" => mode, "state" => state)
        .record(seconds);
    // A retry waits its backoff on purpose: only first attempts say how
    // long work waited for a slot.
    if claimed.attempt == 1 {
        let waited = (fin.started_at - claimed.submitted_at).as_seconds_f64();
        metrics::histogram!("taskhost_job_queue_wait_seconds", "mode" => mode, "state" => state)
            .record(waited.max(0.0));
    }
    let retry_in_secs = match finished {
        Finished::Retry(delay) => {
            metrics::counter!("taskhost_job_retries_total").increment(1);
            Some(*delay)
        }
        _ => None,
    };
    macro_rules! run_line {
        ($level:ident, $message:literal) => {
            tracing::$level!(
                job_id = %claimed.job_id,
                job_name = claimed.job_name.as_str(),
                user_id = claimed.user_id.as_str(),
                node = ctx.node_name.as_str(),
                mode,
                state,
                exit_code = fin.exit_code,
                duration_ms = (seconds * 1000.0).round() as u64,
                attempt = claimed.attempt,
                reason = fin.reason.as_deref(),
                retry_in_secs,
                $message
            )
        };
    }
    match (fin.status, retry_in_secs) {
        (JobStatus::Succeeded | JobStatus::Cancelled, _) => run_line!(info, "job finished"),
        (_, Some(_)) => run_line!(warn, "job attempt failed; retry scheduled"),
        _ => run_line!(warn, "job finished"),
    }
}

async fn renew_loop(ctx: Arc<Ctx>, claimed: Claimed, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        match store::renew(&ctx.pool, claimed.job_id, claimed.attempt, lease).await {
            Ok(Some(false)) => {}
            Ok(Some(true)) => {
                stop_running(&ctx, claimed.job_id, StopReason::Cancelled);
            }
            Ok(None) => {
                stop_running(&ctx, claimed.job_id, StopReason::Lost);
            }
            Err(error) => tracing::warn!(%error, job_id = %claimed.job_id, "lease renewal failed"),
        }
    }
}

/// Stops a running job of this process; false when it is not running here.
pub(crate) fn stop_running(ctx: &Ctx, job_id: Uuid, reason: StopReason) -> bool {
    let running = ctx.running.lock();
    let Some(r) = running.as_ref().ok().and_then(|m| m.get(&job_id)) else {
        return false;
    };
    r.stop(reason);
    true
}

async fn execute(ctx: &Ctx, claimed: &Claimed, cancel: CancellationToken) -> Outcome {
    let timeout = match (claimed.timeout_seconds, claimed.execution_mode) {
        (Some(t), _) => Some(Duration::from_secs(t.max(1) as u64)),
        (None, ExecutionMode::Background) => None,
        (None, _) => Some(Duration::from_secs(
            ctx.settings.worker.default_timeout_secs,
        )),
    };
    let shell = ctx.settings.worker.shell_argv();
    let mut env = claimed.env.clone();
    // Secret values are opened now, at claim time, and only here.
    let secrets = match &claimed.secret_env {
        None => BTreeMap::new(),
        Some(sealed) => match secrets::open(ctx.settings.secrets.key().as_ref(), sealed) {
            Ok(values) => values,
            Err(error) => {
                tracing::warn!(%error, job_id = %claimed.job_id, "the job's secret environment cannot be decrypted; it is not run");
                return exec::not_started(
                    Ending::SecretsUnreadable,
                    chrono::Utc::now(),
                    std::time::Instant::now(),
                    format!("taskhost: worker {}: {error}\n", ctx.node_name),
                );
            }
        },
    };
    let masks = secrets::mask_patterns(secrets.values());
    env.extend(secrets);
    env.insert("TASKHOST_JOB_ID".into(), claimed.job_id.to_string());
    env.insert("TASKHOST_ATTEMPT".into(), claimed.attempt.to_string());
    env.insert("TASKHOST_NODE_ID".into(), ctx.node_id.to_string());
    let dir = match ctx.sandbox.make_dir(claimed.job_id, claimed.attempt) {
        Ok(dir) => {
            env.insert("HOME".into(), dir.display().to_string());
            env.insert("TASKHOST_WORK_DIR".into(), dir.display().to_string());
            env.insert("USER".into(), ctx.sandbox.user.clone());
            Some(dir)
        }
        Err(error) => {
            tracing::warn!(%error, job_id = %claimed.job_id, "no working directory for the job; it runs in the worker's");
            None
        }
    };
    let capture = Arc::new(exec::Capture::default());
    let live = crate::live::LiveOutput::start(
        &ctx.pool,
        claimed.job_id,
        claimed.attempt,
        capture.clone(),
        masks.clone(),
    );
    let mut outcome = exec::run(
        CommandSpec {
            shell: &shell,
            command: &claimed.command,
            env: &env,
            timeout,
            output_cap: ctx.settings.worker.output_cap_bytes,
            kill_on_timeout: claimed.kill_on_timeout,
            sandbox: Some(&ctx.sandbox),
            dir: dir.as_deref(),
            capture: Some(capture),
            limits: claimed.limits.as_deref(),
        },
        cancel,
    )
    .await;
    live.stop().await;
    if let Some(dir) = dir {
        ctx.sandbox.finish_dir(&dir);
    }
    // Secret values never reach the stored output (README, "Secrets").
    if !masks.is_empty() {
        outcome.stdout = secrets::mask_output(&outcome.stdout, &masks);
        outcome.stderr = secrets::mask_output(&outcome.stderr, &masks);
    }
    outcome
}

/// The built-in commands of `inline` mode, run inside the worker process.
/// How a run ended, as the store records it.
pub(crate) fn finish_of(outcome: &Outcome, cancelled: bool) -> Finish {
    let (status, mut reason) = match outcome.ending {
        Ending::Exited if outcome.exit_code == Some(0) => (JobStatus::Succeeded, None),
        // 128 + SIGXCPU: the kernel stopped it at its CPU limit.
        Ending::Exited if outcome.exit_code == Some(128 + 24) => (
            JobStatus::Failed,
            Some(
                "killed at its CPU time limit (the job's limits.cpuSeconds or worker.job_cpu_secs)"
                    .to_owned(),
            ),
        ),
        Ending::Exited => (
            JobStatus::Failed,
            Some(format!(
                "exited with code {}",
                outcome.exit_code.unwrap_or(-1)
            )),
        ),
        Ending::TimedOut => (
            JobStatus::TimedOut,
            Some("killed at its timeout".to_owned()),
        ),
        Ending::Cancelled if cancelled => (
            JobStatus::Cancelled,
            Some("cancelled on request".to_owned()),
        ),
        Ending::Cancelled => (JobStatus::Failed, Some("stopped".to_owned())),
        Ending::SpawnFailed => (JobStatus::Failed, Some("could not be started".to_owned())),
        Ending::SecretsUnreadable => (
            JobStatus::Failed,
            Some(
                "not started: its secret environment cannot be decrypted on this worker \
                 (secrets.key missing, or not the key that encrypted it)"
                    .to_owned(),
            ),
        ),
    };
    if outcome.overran {
        let note = "ran past its timeout (kill_on_timeout is off)";
        reason = Some(reason.map_or_else(|| note.to_owned(), |r| format!("{r}; {note}")));
    }
    metrics::counter!("taskhost_job_output_bytes_total", "stream" => "stdout")
        .increment(outcome.stdout.len() as u64);
    metrics::counter!("taskhost_job_output_bytes_total", "stream" => "stderr")
        .increment(outcome.stderr.len() as u64);
    Finish {
        status,
        reason,
        exit_code: outcome.exit_code,
        output: changelog::gzip(&outcome.stdout),
        error: changelog::gzip(&outcome.stderr),
        truncated: outcome.truncated,
        started_at: outcome.started_at,
        duration: outcome.duration,
    }
}
