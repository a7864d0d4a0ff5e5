//! The taskhost worker: registers its node, heartbeats, consumes its work
//! queues, runs jobs, records every run, and obeys cancel.
//!
//! - [`run`] is the whole process: register, heartbeat, and a supervised
//!   consumer loop that reconnects and re-declares the topology after the
//!   broker goes away.
//! - `exec` runs a shell command in its own process group; `procinfo` reads
//!   this process for heartbeats and the `diagnostics` inline command;
//!   `store` is the Postgres side (claim, renew, finish, release); `node` the
//!   registry side.
//!
//! Invariant: a delivery is acked only after the run's history row is
//! committed (for `background` jobs, after the claim is committed: their
//! liveness is the claim lease, not the broker's ack timeout).

pub mod exec;
mod node;
pub mod procinfo;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::select_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use taskhost_common::amqp::{self, Names, Publisher};
use taskhost_common::batch::Batcher;
use taskhost_common::changelog;
use taskhost_common::jobs;
use taskhost_common::messages::{Control, JOB_RUN_V1, JobRun};
use taskhost_common::model::{ExecutionMode, JobStatus};
use taskhost_common::{CancellationToken, Settings, db};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::exec::{CommandSpec, Ending, Outcome};
use crate::store::{ClaimRequest, ClaimResult, Claimed, Claimer, Finish, FinishRequest, Finished};

/// Why a running job was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// A user asked.
    Cancelled,
    /// The claim was taken over by a newer attempt.
    Lost,
    /// This worker is shutting down.
    Shutdown,
}

struct Running {
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl Running {
    fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.cancel.cancel();
    }
}

struct Ctx {
    pool: sqlx::PgPool,
    settings: Settings,
    names: Names,
    node_id: Uuid,
    node_name: String,
    publisher: Publisher,
    running: Mutex<HashMap<Uuid, Running>>,
    /// Deliveries of each job this process is claiming right now.
    claiming: Arc<Mutex<HashMap<Uuid, usize>>>,
    pool_slots: Arc<Semaphore>,
    background_slots: Arc<Semaphore>,
    started: Instant,
    tracker: TaskTracker,
    /// Cancelled when the process should stop taking work.
    shutdown: CancellationToken,
    /// Claims of concurrent deliveries, written together.
    claims: Batcher<ClaimRequest, ClaimResult>,
    /// Ends of concurrent runs, written together.
    finishes: Batcher<FinishRequest, Finished>,
}

/// Requests one batch takes at most, and batches in flight at once.
const BATCH_MAX: usize = 128;
const BATCH_RUNNERS: usize = 2;

/// Runs a worker until `shutdown`, then drains: running jobs get
/// `worker.drain_timeout_secs` to finish, after which they are killed and
/// handed back to the queue.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database).context("database.url")?;
    db::ensure_current(&pool).await?;
    let node_id = node::register(&pool, &settings.worker)
        .await
        .context("registering the node")?;
    let node_name = settings.worker.node_name.clone();
    tracing::info!(%node_id, node_name, group = settings.worker.group, role = settings.worker.role,
        concurrency = settings.worker.concurrency, "worker registered");
    let names = Names::new(settings.amqp.prefix.clone());
    let claimer = Claimer {
        node_id,
        node_name: node_name.clone(),
        lease: Duration::from_secs(settings.worker.claim_lease_secs),
        delivery_limit: settings.amqp.delivery_limit,
    };
    let claim_pool = pool.clone();
    let claims = Batcher::spawn(
        BATCH_MAX,
        BATCH_RUNNERS,
        move |requests: Vec<ClaimRequest>| {
            let (pool, claimer) = (claim_pool.clone(), claimer.clone());
            async move {
                store::claim_batch(&pool, &claimer, &requests)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    );
    let finish_pool = pool.clone();
    let finish_node = node_name.clone();
    let finishes = Batcher::spawn(
        BATCH_MAX,
        BATCH_RUNNERS,
        move |requests: Vec<FinishRequest>| {
            let (pool, node_name) = (finish_pool.clone(), finish_node.clone());
            async move {
                store::finish_batch(&pool, node_id, &node_name, &requests)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    );
    let ctx = Arc::new(Ctx {
        claims,
        finishes,
        publisher: Publisher::new(
            settings.amqp.url.clone(),
            names.clone(),
            format!("taskhost-worker@{node_name}"),
        ),
        pool,
        names,
        node_id,
        node_name,
        running: Mutex::new(HashMap::new()),
        claiming: Arc::new(Mutex::new(HashMap::new())),
        pool_slots: Arc::new(Semaphore::new(settings.worker.concurrency)),
        background_slots: Arc::new(Semaphore::new(settings.worker.background_slots)),
        started: Instant::now(),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        settings,
    });
    let heartbeat = tokio::spawn(heartbeat_loop(ctx.clone()));
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let connected_at = Instant::now();
        match consume(&ctx).await {
            Ok(()) => break,
            Err(error) => {
                // A connection that lived a while starts the backoff over.
                if connected_at.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "broker connection lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // The consumer returned without draining only if it never connected.
    drain(&ctx).await;
    heartbeat.abort();
    if let Err(error) = node::deactivate(&ctx.pool, ctx.node_id, &ctx.node_name).await {
        tracing::warn!(%error, "could not mark the node inactive");
    }
    ctx.publisher.close().await;
    tracing::info!("worker stopped");
    Ok(())
}

fn running_count(ctx: &Ctx) -> usize {
    ctx.running.lock().map_or(0, |r| r.len())
}

async fn heartbeat_loop(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.settings.worker.heartbeat_secs));
    let mut last_cpu: Option<(Instant, f64)> = None;
    loop {
        tick.tick().await;
        let report = procinfo::report(ctx.started);
        let now = Instant::now();
        let cpu_percent = last_cpu.map_or(0.0, |(t, c)| {
            let wall = now.duration_since(t).as_secs_f64();
            if wall > 0.0 {
                (report.cpu_seconds - c) / wall * 100.0
            } else {
                0.0
            }
        });
        last_cpu = Some((now, report.cpu_seconds));
        let stats = serde_json::json!({
            "rssBytes": report.rss_bytes,
            "cpuPercent": (cpu_percent * 10.0).round() / 10.0,
            "runningJobs": running_count(&ctx),
            "threads": report.threads,
            "openFds": report.open_fds,
            "uptimeSeconds": report.uptime_seconds.round(),
        });
        if let Err(error) = node::heartbeat(&ctx.pool, ctx.node_id, &ctx.node_name, &stats).await {
            tracing::warn!(%error, node_id = %ctx.node_id, "heartbeat failed");
        }
    }
}

fn queue_keys(ctx: &Ctx) -> Vec<String> {
    let w = &ctx.settings.worker;
    vec![
        "any".to_owned(),
        format!("group.{}", w.group),
        format!("role.{}", w.role),
        format!("group.{}.role.{}", w.group, w.role),
        format!("node.{}", ctx.node_id),
    ]
}

/// One connection's life: declare, consume until shutdown (then drain while
/// the channel is still open for acks) or until the connection fails.
async fn consume(ctx: &Arc<Ctx>) -> Result<(), lapin::Error> {
    let conn = amqp::connect(
        &ctx.settings.amqp.url,
        &format!("taskhost-worker@{}", ctx.node_name),
    )
    .await?;
    let ch = conn.create_channel().await?;
    amqp::declare_topology(&ch, &ctx.names).await?;
    let keys = queue_keys(ctx);
    for key in &keys {
        amqp::declare_work_queue(&ch, &ctx.names, key).await?;
    }
    // global = true: one prefetch window shared by all consumers of the
    // channel, equal to the pool slots, so queued jobs wait in the broker
    // (where priorities apply) rather than in this process. Background jobs
    // are acked once claimed, so they do not hold the window for long.
    let prefetch = ctx.settings.worker.concurrency.min(u16::MAX as usize) as u16;
    ch.basic_qos(prefetch, BasicQosOptions { global: true })
        .await?;
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for key in &keys {
        let tag = format!("{}.{}.{}", ctx.node_name, key, Uuid::new_v4().simple());
        let c = ch
            .basic_consume(
                ctx.names.work_queue(key).into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(tag);
        consumers.push(c);
    }
    let control_ch = conn.create_channel().await?;
    let control_queue = ctx.names.control_queue(ctx.node_id);
    control_ch
        .queue_declare(
            control_queue.clone().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for key in [format!("node.{}", ctx.node_id), "all".to_owned()] {
        control_ch
            .queue_bind(
                control_queue.clone().into(),
                ctx.names.control().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut control = control_ch
        .basic_consume(
            control_queue.into(),
            format!("{}.control", ctx.node_name).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queues = ?keys, prefetch, "consuming");
    let mut work = select_all(consumers);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => {
                for tag in &tags {
                    let _ = ch.basic_cancel(tag.clone().into(), BasicCancelOptions::default()).await;
                }
                drain(ctx).await;
                let _ = conn.close(200, "worker stopping".into()).await;
                return Ok(());
            }
            next = work.next() => match next {
                Some(Ok(delivery)) => {
                    let ctx2 = ctx.clone();
                    ctx.tracker.spawn(async move { handle(ctx2, delivery).await });
                }
                Some(Err(e)) => return Err(e),
                None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
            },
            Some(msg) = control.next() => {
                if let Ok(msg) = msg {
                    on_control(ctx, &msg.data);
                }
            }
        }
    }
}

fn on_control(ctx: &Ctx, data: &[u8]) {
    match serde_json::from_slice::<Control>(data) {
        Ok(Control::Cancel { job_id }) => {
            if let Some(r) = ctx
                .running
                .lock()
                .ok()
                .as_ref()
                .and_then(|m| m.get(&job_id))
            {
                tracing::info!(%job_id, "cancel received");
                r.stop(StopReason::Cancelled);
            }
        }
        Err(error) => tracing::warn!(%error, "ignoring malformed control message"),
    }
}

/// Waits for in-flight jobs; after the drain timeout, kills them and hands
/// them back.
async fn drain(ctx: &Ctx) {
    ctx.tracker.close();
    let limit = Duration::from_secs(ctx.settings.worker.drain_timeout_secs);
    if tokio::time::timeout(limit, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = running_count(ctx),
            "drain timeout; stopping running jobs"
        );
        if let Ok(running) = ctx.running.lock() {
            for r in running.values() {
                r.stop(StopReason::Shutdown);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), ctx.tracker.wait()).await;
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers, and the redelivery
        // finds the job finished and is acked without running again.
        tracing::debug!(%error, "ack failed");
    }
}

async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

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

fn publish_event(
    ctx: &Arc<Ctx>,
    job_id: Uuid,
    status: JobStatus,
    attempt: i32,
    exit_code: Option<i32>,
) {
    let msg = jobs::job_event(job_id, status, attempt, Some(ctx.node_id), exit_code);
    let ctx = ctx.clone();
    tokio::spawn(
        async move { jobs::publish_events(&ctx.publisher, std::slice::from_ref(&msg)).await },
    );
}

/// Counts a delivery as claiming its job while it lives.
struct Claiming {
    map: Arc<Mutex<HashMap<Uuid, usize>>>,
    job_id: Uuid,
}

impl Claiming {
    fn enter(map: &Arc<Mutex<HashMap<Uuid, usize>>>, job_id: Uuid) -> Self {
        if let Ok(mut m) = map.lock() {
            *m.entry(job_id).or_insert(0) += 1;
        }
        Self {
            map: map.clone(),
            job_id,
        }
    }

    /// No other delivery of this job is being claimed in this process.
    fn alone(&self) -> bool {
        self.map
            .lock()
            .is_ok_and(|m| m.get(&self.job_id).copied().unwrap_or(0) <= 1)
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(n) = m.get_mut(&self.job_id)
        {
            *n -= 1;
            if *n == 0 {
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

async fn handle(ctx: Arc<Ctx>, delivery: Delivery) {
    let run = match parse_run(&delivery) {
        Ok(r) => r,
        Err(reason) => return amqp::dead_letter(&ctx.publisher, &delivery, &reason).await,
    };
    let span = tracing::info_span!("job", job_id = %run.job_id, node_id = %ctx.node_id);
    process(ctx, delivery, run).instrument(span).await;
}

async fn process(ctx: Arc<Ctx>, delivery: Delivery, run: JobRun) {
    let job_id = run.job_id;
    let slots = match run.execution_mode {
        ExecutionMode::Background => ctx.background_slots.clone(),
        _ => ctx.pool_slots.clone(),
    };
    let permit = tokio::select! {
        p = slots.acquire_owned() => match p { Ok(p) => p, Err(_) => return requeue(&delivery).await },
        () = ctx.shutdown.cancelled() => return requeue(&delivery).await,
    };
    let lease = Duration::from_secs(ctx.settings.worker.claim_lease_secs);
    let mut wait = Duration::from_millis(100);
    // Held until the job is in `running`: another copy of the same job
    // delivered meanwhile must not take this process's claim for a stale one.
    let claiming = Claiming::enter(&ctx.claiming, job_id);
    let claimed = loop {
        let own_stale = claiming.alone()
            && ctx
                .running
                .lock()
                .map_or(true, |r| !r.contains_key(&job_id));
        match ctx.claims.call(ClaimRequest { job_id, own_stale }).await {
            Ok(ClaimResult::Claimed(c)) => break c,
            Ok(ClaimResult::Finished(status)) => {
                tracing::debug!(%job_id, %status, "redelivered message for a finished job; acked without running");
                return ack(&delivery).await;
            }
            Ok(ClaimResult::NotDue) => {
                tracing::info!(%job_id, "early copy of a job whose retry is not due yet; acked without running");
                return ack(&delivery).await;
            }
            Ok(ClaimResult::Missing) => {
                tracing::info!(%job_id, "message for a job that no longer exists; acked");
                return ack(&delivery).await;
            }
            Ok(ClaimResult::Dead(reason)) => {
                publish_event(&ctx, job_id, JobStatus::Dead, run.attempt, None);
                return amqp::dead_letter(&ctx.publisher, &delivery, &reason).await;
            }
            Ok(ClaimResult::Busy) => {
                // Another worker holds a live claim (e.g. this is a
                // redelivery after a broker hiccup): wait until it finishes
                // or its lease runs out.
                if !pause(&ctx, Duration::from_millis(500)).await {
                    return requeue(&delivery).await;
                }
            }
            Ok(ClaimResult::Again(error)) | Err(error) => {
                tracing::warn!(%error, %job_id, "claim failed; retrying");
                if !pause(&ctx, wait).await {
                    return requeue(&delivery).await;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    let background = run.execution_mode == ExecutionMode::Background;
    if background {
        ack(&delivery).await;
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
    publish_event(&ctx, job_id, JobStatus::Running, claimed.attempt, None);
    tracing::info!(%job_id, attempt = claimed.attempt, mode = %run.execution_mode, "job started");
    let renewer = tokio::spawn(renew_loop(ctx.clone(), claimed.clone(), lease));
    let outcome = execute(&ctx, &run, &claimed, cancel).await;
    renewer.abort();
    if let Ok(mut r) = ctx.running.lock() {
        r.remove(&job_id);
    }
    drop(permit);
    let stop = reason.lock().ok().and_then(|r| *r);
    match stop {
        Some(StopReason::Lost) => {
            tracing::warn!(%job_id, attempt = claimed.attempt, "claim was taken over; this attempt's result is dropped");
            if !background {
                ack(&delivery).await;
            }
            return;
        }
        Some(StopReason::Shutdown) => {
            let republish = background.then_some(&run);
            if let Err(error) = store::release(
                &ctx.pool,
                &claimed,
                ctx.node_id,
                &ctx.node_name,
                republish,
                &claimed.routing_key,
            )
            .await
            {
                tracing::warn!(%error, %job_id, "could not release the job; its lease will expire");
            }
            if !background {
                requeue(&delivery).await;
            }
            return;
        }
        Some(StopReason::Cancelled) | None => {}
    }
    let fin = finish_of(&outcome, stop == Some(StopReason::Cancelled));
    let mut wait = Duration::from_millis(100);
    loop {
        let request = FinishRequest {
            claimed: claimed.clone(),
            run: run.clone(),
            fin: fin.clone(),
        };
        match ctx.finishes.call(request).await {
            Ok(Finished::Final) => {
                tracing::info!(%job_id, status = %fin.status, exit_code = ?fin.exit_code, duration_ms = fin.duration.as_millis() as u64, "job finished");
                publish_event(&ctx, job_id, fin.status, claimed.attempt, fin.exit_code);
                break;
            }
            Ok(Finished::Retry(delay)) => {
                tracing::info!(%job_id, status = %fin.status, attempt = claimed.attempt, retry_in_secs = delay, "attempt failed; retry scheduled");
                publish_event(
                    &ctx,
                    job_id,
                    JobStatus::Queued,
                    claimed.attempt,
                    fin.exit_code,
                );
                break;
            }
            Ok(Finished::Fenced) => {
                tracing::warn!(%job_id, attempt = claimed.attempt, "result refused: a newer attempt owns the job");
                break;
            }
            Err(error) => {
                // Postgres is away: keep the result and the unacked delivery
                // until it is back, so nothing is lost.
                tracing::warn!(%error, %job_id, "recording the result failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    if !background {
        ack(&delivery).await;
    }
}

async fn renew_loop(ctx: Arc<Ctx>, claimed: Claimed, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        match store::renew(&ctx.pool, claimed.job_id, claimed.attempt, lease).await {
            Ok(Some(false)) => {}
            Ok(Some(true)) => stop_running(&ctx, claimed.job_id, StopReason::Cancelled),
            Ok(None) => stop_running(&ctx, claimed.job_id, StopReason::Lost),
            Err(error) => tracing::warn!(%error, job_id = %claimed.job_id, "lease renewal failed"),
        }
    }
}

fn stop_running(ctx: &Ctx, job_id: Uuid, reason: StopReason) {
    if let Some(r) = ctx
        .running
        .lock()
        .ok()
        .as_ref()
        .and_then(|m| m.get(&job_id))
    {
        r.stop(reason);
    }
}

async fn execute(ctx: &Ctx, run: &JobRun, claimed: &Claimed, cancel: CancellationToken) -> Outcome {
    if run.execution_mode == ExecutionMode::Inline {
        return inline(ctx, &claimed.command);
    }
    let timeout = match (claimed.timeout_seconds, run.execution_mode) {
        (Some(t), _) => Some(Duration::from_secs(t.max(1) as u64)),
        (None, ExecutionMode::Background) => None,
        (None, _) => Some(Duration::from_secs(
            ctx.settings.worker.default_timeout_secs,
        )),
    };
    let shell = ctx.settings.worker.shell_argv();
    let mut env = claimed.env.clone();
    env.insert("TASKHOST_JOB_ID".into(), claimed.job_id.to_string());
    env.insert("TASKHOST_ATTEMPT".into(), claimed.attempt.to_string());
    env.insert("TASKHOST_NODE_ID".into(), ctx.node_id.to_string());
    exec::run(
        CommandSpec {
            shell: &shell,
            command: &claimed.command,
            env: &env,
            timeout,
            output_cap: ctx.settings.worker.output_cap_bytes,
            kill_on_timeout: claimed.kill_on_timeout,
        },
        cancel,
    )
    .await
}

/// The built-in commands of `inline` mode, run inside the worker process.
fn inline(ctx: &Ctx, command: &str) -> Outcome {
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let (code, stdout, stderr) = match command.trim() {
        "noop" => (0, Vec::new(), Vec::new()),
        "diagnostics" => {
            let report = procinfo::report(ctx.started);
            let body = serde_json::json!({
                "nodeId": ctx.node_id,
                "nodeName": ctx.node_name,
                "process": report,
                "runningJobs": running_count(ctx),
                "freePoolSlots": ctx.pool_slots.available_permits(),
                "freeBackgroundSlots": ctx.background_slots.available_permits(),
            });
            let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
            text.push(b'\n');
            (0, text, Vec::new())
        }
        other => (
            127,
            Vec::new(),
            format!("unknown inline command `{other}`\n").into_bytes(),
        ),
    };
    Outcome {
        ending: Ending::Exited,
        exit_code: Some(code),
        stdout,
        stderr,
        truncated: false,
        overran: false,
        started_at,
        duration: clock.elapsed(),
    }
}

fn finish_of(outcome: &Outcome, cancelled: bool) -> Finish {
    let (status, mut reason) = match outcome.ending {
        Ending::Exited if outcome.exit_code == Some(0) => (JobStatus::Succeeded, None),
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
    };
    if outcome.overran {
        let note = "ran past its timeout (kill_on_timeout is off)";
        reason = Some(reason.map_or_else(|| note.to_owned(), |r| format!("{r}; {note}")));
    }
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
