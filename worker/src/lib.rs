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

mod consumer;
pub mod exec;
mod inline;
mod job;
mod live;
mod node;
pub mod procinfo;
pub mod sandbox;
mod trace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use taskhost_common::amqp::{self, Names, Publisher};
use taskhost_common::batch::Batcher;
use taskhost_common::events::EventSink;
use taskhost_common::store::{self, Claimer, Step, StepResult};
use taskhost_common::{CancellationToken, Settings, db, metrics, startup};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Why a running job was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A user asked.
    Cancelled,
    /// The claim was taken over by a newer attempt.
    Lost,
    /// This worker is shutting down.
    Shutdown,
}

pub(crate) struct Running {
    pub(crate) cancel: CancellationToken,
    pub(crate) reason: Arc<Mutex<Option<StopReason>>>,
}

impl Running {
    pub(crate) fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.cancel.cancel();
    }
}

pub(crate) struct Ctx {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) settings: Settings,
    pub(crate) names: Names,
    pub(crate) node_id: Uuid,
    pub(crate) node_name: String,
    pub(crate) publisher: Arc<Publisher>,
    /// Job events, published in batches.
    pub(crate) events: EventSink,
    pub(crate) running: Mutex<HashMap<Uuid, Running>>,
    /// Deliveries of each job this process is claiming right now.
    pub(crate) claiming: Arc<Mutex<HashMap<Uuid, Vec<u64>>>>,
    pub(crate) pool_slots: Arc<Semaphore>,
    pub(crate) background_slots: Arc<Semaphore>,
    pub(crate) started: Instant,
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the process should stop taking work.
    pub(crate) shutdown: CancellationToken,
    /// Claims and run endings of concurrent deliveries, written together
    /// in one transaction per batch (`store::settle`).
    pub(crate) steps: Batcher<Step, StepResult>,
    /// Who shell jobs run as, within what limits, where.
    pub(crate) sandbox: sandbox::Sandbox,
    /// Whether the consumer is connected (`/readyz`).
    pub(crate) broker: Arc<metrics::BrokerLink>,
    /// The connection of the start-up identity check, which holds the
    /// node's exclusive control queue; the consumer's first life takes it
    /// over, so no second worker with this name can slip in between.
    pub(crate) identity: Mutex<Option<lapin::Connection>>,
}

/// Steps one batch takes at most, and batches in flight at once.
const BATCH_MAX: usize = 256;
const BATCH_RUNNERS: usize = 2;

/// Runs a worker until `shutdown`, then drains: running jobs get
/// `worker.drain_timeout_secs` to finish, after which they are killed and
/// handed back to the queue.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sandbox = sandbox::Sandbox::from_settings(&settings.worker)?;
    sandbox.apply_inherited()?;
    sandbox::protect_worker_process()?;
    startup::check_services(&settings, "taskhost-worker start-up check").await?;
    let pool = db::pool(&settings.database).context("database.url")?;
    let node_name = settings.worker.node_name.clone();
    let names = Names::new(settings.amqp.prefix.clone());
    // One process per node: a second worker with this name is refused
    // before it changes the node's row, and checked again after a first
    // registration (two new workers racing for one name).
    let identity = startup::broker(&settings.amqp, &format!("taskhost-worker@{node_name}")).await?;
    if let Some(id) = node::id_of(&pool, &node_name).await? {
        node::ensure_not_running(&identity, &names, id, &node_name).await?;
    }
    let node_id = node::register(&pool, &settings.worker)
        .await
        .context("registering the node")?;
    // From here the identity connection holds the node's control queue
    // until the consumer takes the connection over.
    node::ensure_not_running(&identity, &names, node_id, &node_name).await?;
    tracing::info!(%node_id, node_name, group = settings.worker.group, role = settings.worker.role,
        concurrency = settings.worker.concurrency, "worker registered");
    if sandbox.ids.is_none() && nix::unistd::Uid::effective().is_root() {
        tracing::warn!(
            "{} (worker.run_as = \"root\": jobs keep root)",
            sandbox.describe()
        );
    } else {
        tracing::info!("{}", sandbox.describe());
    }
    let claimer = Claimer {
        node_id,
        node_name: node_name.clone(),
        lease: Duration::from_secs(settings.worker.claim_lease_secs),
        delivery_limit: settings.amqp.delivery_limit,
    };
    let step_pool = pool.clone();
    // Inline commands run inside the claim's transaction; `diagnostics`
    // reports on this process, so it reads the context once it exists.
    let inline_ctx: Arc<std::sync::OnceLock<std::sync::Weak<Ctx>>> = Arc::default();
    let inline_seen = inline_ctx.clone();
    let inline_runner: Arc<store::InlineRunner> = Arc::new(move |claimed: &store::Claimed| {
        let ctx = inline_seen.get().and_then(std::sync::Weak::upgrade);
        job::finish_of(&inline::run(ctx.as_deref(), &claimed.command), false)
    });
    let steps = Batcher::spawn(BATCH_MAX, BATCH_RUNNERS, move |batch: Vec<Step>| {
        let (pool, claimer, inline_runner) =
            (step_pool.clone(), claimer.clone(), inline_runner.clone());
        async move {
            store::settle(&pool, &claimer, &*inline_runner, &batch)
                .await
                .map_err(|e| e.to_string())
        }
    });
    let publisher = Arc::new(Publisher::new(
        &settings.amqp,
        names.clone(),
        format!("taskhost-worker@{node_name}"),
    ));
    let ctx = Arc::new(Ctx {
        steps,
        events: EventSink::spawn(publisher.clone()),
        publisher,
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
        broker: metrics::BrokerLink::new("worker"),
        identity: Mutex::new(Some(identity)),
        settings,
        sandbox,
    });
    let _ = inline_ctx.set(Arc::downgrade(&ctx));
    metrics::register_worker(
        ctx.settings.worker.concurrency,
        ctx.settings.worker.background_slots,
    );
    // Health and metrics outlive the drain (a draining worker answers
    // `/readyz` with 503); they stop when this function returns.
    let ops = CancellationToken::new();
    let _ops = ops.clone().drop_guard();
    if let Some(bind) = metrics::bind_address(&ctx.settings.worker.metrics_bind) {
        metrics::serve(bind, "worker.metrics_bind", probes(&ctx), ops).await?;
    }
    let heartbeat = tokio::spawn(heartbeat_loop(ctx.clone()));
    amqp::supervise(
        "the worker's consumer",
        "worker",
        &ctx.settings.amqp.url,
        &shutdown,
        || consumer::consume(&ctx),
    )
    .await;
    // The consumer returned without draining only if it never connected.
    consumer::drain(&ctx).await;
    ctx.sandbox.remove_spares();
    heartbeat.abort();
    if let Err(error) = node::deactivate(&ctx.pool, ctx.node_id, &ctx.node_name).await {
        tracing::warn!(%error, "could not mark the node inactive");
    }
    ctx.publisher.close().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// `/readyz` of a worker: Postgres answers, the consumer is connected, and
/// the worker is not draining.
fn probes(ctx: &Arc<Ctx>) -> metrics::Probes {
    let ctx = Arc::downgrade(ctx);
    metrics::Probes {
        component: "worker",
        ready: Arc::new(move || {
            let ctx = ctx.upgrade();
            Box::pin(async move {
                let Some(ctx) = ctx else {
                    return vec![("worker", false)];
                };
                vec![
                    ("database", metrics::database_up(&ctx.pool).await),
                    ("broker", ctx.broker.is_up()),
                    ("accepting work", !ctx.shutdown.is_cancelled()),
                ]
            })
        }),
        refresh: None,
    }
}

/// The depth of this worker's work queues, read on the consumer's own
/// connection every heartbeat while it is up (a passive declare each): what
/// a "stuck queue" alert compares with the runs started. The consumer's
/// connection, not the publisher's: an idle worker then holds one broker
/// connection (each costs a thread and about 8 MB of memory).
pub(crate) async fn record_queue_depths(ctx: &Ctx, connection: &lapin::Connection) {
    let queues: Vec<String> = consumer::queue_keys(ctx)
        .iter()
        .map(|k| ctx.names.work_queue(k))
        .collect();
    let depths = amqp::queue_depths(connection, &queues).await;
    for (queue, depth) in queues.into_iter().zip(depths) {
        if let Some((ready, consumers)) = depth {
            ::metrics::gauge!("taskhost_queue_messages_ready", "queue" => queue.clone())
                .set(f64::from(ready));
            ::metrics::gauge!("taskhost_queue_consumers", "queue" => queue)
                .set(f64::from(consumers));
        }
    }
}

pub(crate) fn running_count(ctx: &Ctx) -> usize {
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
