//! Prometheus metrics of every process, through the `metrics` crate and its
//! Prometheus exporter, and the small HTTP server (`/livez`, `/readyz`,
//! `/metrics`) that a worker and a scheduler run on `worker.metrics_bind`
//! and `scheduler.metrics_bind` (README, "Metrics, health and logs").
//!
//! One recorder per process, installed by the first caller of [`handle`]:
//! in `taskhost standalone` the api's `/metrics` shows the worker's and the
//! scheduler's families too. Every family is described once, here, and
//! every labelled family a dashboard sums over (jobs by state, slots by
//! kind) is registered at zero, so a series exists before its first event.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::CancellationToken;
use crate::model::{ExecutionMode, JobStatus};

/// Histogram buckets of every `_seconds` family: a millisecond to an hour.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .map(PrometheusBuilder::build_recorder);
        let recorder = match recorder {
            Ok(r) => r,
            // The buckets are a non-empty constant: this cannot fail.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // A recorder installed before us (a test harness) keeps recording;
        // ours then renders nothing, which the scrape test would notice.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        handle
    })
}

/// HELP texts and units of every family (names: Prometheus conventions).
fn describe() {
    describe_counter!(
        "taskhost_jobs_submitted_total",
        "Jobs accepted by this process, by source (api, queue, schedule, manual: a task run now, rerun)."
    );
    describe_counter!(
        "taskhost_jobs_rejected_total",
        "Job submissions refused by this process (HTTP 4xx, dead-lettered submit messages)."
    );
    describe_counter!(
        "taskhost_jobs_published_total",
        "Work messages confirmed by the broker on the api's fast path."
    );
    describe_counter!(
        "taskhost_publish_failures_total",
        "Fast-path publishes that failed and were left to the outbox relay."
    );
    describe_counter!(
        "taskhost_api_rate_limited_total",
        "Requests refused with 429 because their key spent its budget."
    );
    describe_histogram!(
        "taskhost_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP requests by route template, method and status."
    );
    describe_counter!(
        "taskhost_jobs_started_total",
        "Runs started by this worker, by execution mode."
    );
    describe_counter!(
        "taskhost_jobs_finished_total",
        "Runs whose end this worker recorded, by execution mode and state (a retried attempt counts under its own state)."
    );
    describe_histogram!(
        "taskhost_job_run_duration_seconds",
        Unit::Seconds,
        "How long runs took, by execution mode and state."
    );
    describe_histogram!(
        "taskhost_job_queue_wait_seconds",
        Unit::Seconds,
        "From acceptance (or a retry's due time) to the start of the run, by execution mode and state."
    );
    describe_counter!(
        "taskhost_job_claims_lost_total",
        "Runs whose claim was taken over by a newer attempt (their result is dropped)."
    );
    describe_counter!(
        "taskhost_job_retries_total",
        "Failed attempts that were scheduled to run again."
    );
    describe_counter!(
        "taskhost_dead_letters_total",
        "Messages this process sent to the dead-letter exchange, by the queue they came from (work, submit)."
    );
    describe_gauge!(
        "taskhost_worker_slots",
        "Slots of this worker, by kind (pool: pool and inline jobs; background)."
    );
    describe_gauge!(
        "taskhost_worker_slots_busy",
        "Slots of this worker running a job now, by kind."
    );
    describe_counter!(
        "taskhost_job_output_bytes_total",
        Unit::Bytes,
        "Output bytes captured from runs (before the cap), by stream."
    );
    describe_counter!(
        "taskhost_broker_reconnects_total",
        "Connections to RabbitMQ made again after one was lost, by component."
    );
    describe_gauge!(
        "taskhost_broker_connected",
        "Whether this component's consumer is connected to RabbitMQ (1) or not (0)."
    );
    describe_gauge!(
        "taskhost_queue_messages_ready",
        "Messages ready in a queue this process consumes, read every heartbeat."
    );
    describe_gauge!(
        "taskhost_queue_consumers",
        "Consumers of a queue this process consumes, read every heartbeat."
    );
    describe_counter!(
        "taskhost_scheduler_fires_total",
        "Task runs this scheduler created (one per task, fire time and node)."
    );
    describe_counter!(
        "taskhost_scheduler_misfires_total",
        "Fire times older than scheduler.misfire_grace_secs, handled by the task's misfire policy."
    );
    describe_counter!(
        "taskhost_scheduler_overlaps_skipped_total",
        "Fire times skipped because the task's previous run was still going (overlap policy skip)."
    );
    describe_histogram!(
        "taskhost_scheduler_tick_lateness_seconds",
        Unit::Seconds,
        "How late a task run was created after its fire time."
    );
    describe_gauge!(
        "taskhost_scheduler_last_pass_timestamp_seconds",
        Unit::Seconds,
        "Unix time of this scheduler's last completed pass over the due tasks."
    );
    describe_gauge!(
        "taskhost_relay_lag_seconds",
        Unit::Seconds,
        "Age of the oldest due outbox message not yet marked published (0: none; confirmed ones are marked within 0.1 s)."
    );
    describe_counter!(
        "taskhost_relay_published_total",
        "Outbox messages the relay published (what the fast path left)."
    );
    describe_gauge!(
        "taskhost_change_feed_lag",
        "Changes of the data_change feed a consumer has not processed yet, by consumer."
    );
    describe_gauge!(
        "taskhost_change_feed_lag_seconds",
        Unit::Seconds,
        "Age of the oldest change a consumer has not processed yet, by consumer."
    );
    describe_gauge!(
        "taskhost_database_up",
        "Whether Postgres answered this scrape."
    );
    describe_gauge!("taskhost_jobs", "Jobs by status.");
    describe_gauge!(
        "taskhost_nodes",
        "Registered nodes by group and state (active, inactive)."
    );
    describe_gauge!(
        "taskhost_outbox_pending",
        "Outbox messages not yet marked published (confirmed ones are marked within 0.1 s)."
    );
}

/// Registers the worker's labelled families at zero, so every (mode,
/// state) series exists before its first run.
pub fn register_worker(pool_slots: usize, background_slots: usize) {
    let _ = handle();
    for mode in ExecutionMode::ALL {
        metrics::counter!("taskhost_jobs_started_total", "mode" => mode.as_str()).absolute(0);
        for state in JobStatus::ALL.iter().filter(|s| s.is_terminal()) {
            metrics::counter!("taskhost_jobs_finished_total", "mode" => mode.as_str(), "state" => state.as_str())
                .absolute(0);
        }
    }
    for (kind, n) in [("pool", pool_slots), ("background", background_slots)] {
        metrics::gauge!("taskhost_worker_slots", "kind" => kind).set(n as f64);
        metrics::gauge!("taskhost_worker_slots_busy", "kind" => kind).set(0.0);
    }
    for stream in ["stdout", "stderr"] {
        metrics::counter!("taskhost_job_output_bytes_total", "stream" => stream).absolute(0);
    }
    metrics::counter!("taskhost_job_claims_lost_total").absolute(0);
    metrics::counter!("taskhost_job_retries_total").absolute(0);
    metrics::counter!("taskhost_dead_letters_total", "queue" => "work").absolute(0);
    metrics::counter!("taskhost_broker_reconnects_total", "component" => "worker").absolute(0);
}

/// Registers the scheduler's families at zero.
pub fn register_scheduler() {
    let _ = handle();
    for name in [
        "taskhost_scheduler_fires_total",
        "taskhost_scheduler_misfires_total",
        "taskhost_scheduler_overlaps_skipped_total",
        "taskhost_relay_published_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::counter!("taskhost_dead_letters_total", "queue" => "submit").absolute(0);
    metrics::counter!("taskhost_broker_reconnects_total", "component" => "scheduler").absolute(0);
    metrics::gauge!("taskhost_relay_lag_seconds").set(0.0);
}

/// Counts a job accepted from `source`.
pub fn submitted(source: &'static str, n: usize) {
    metrics::counter!("taskhost_jobs_submitted_total", "source" => source).increment(n as u64);
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What `/readyz` reports: each dependency with whether it is up.
pub type Readiness = Arc<dyn Fn() -> BoxFuture<Vec<(&'static str, bool)>> + Send + Sync>;

/// Sets the gauges read from Postgres at scrape time.
pub type Refresh = Arc<dyn Fn() -> BoxFuture<()> + Send + Sync>;

/// How a component answers `/readyz`, and what it refreshes before a
/// `/metrics` scrape.
#[derive(Clone)]
pub struct Probes {
    /// The component's name in the answers (`worker`, `scheduler`).
    pub component: &'static str,
    /// Each dependency and whether it is up.
    pub ready: Readiness,
    /// Gauges to read at scrape time, if any.
    pub refresh: Option<Refresh>,
}

/// Where a component serves its health and metrics, or `None` for "off".
pub fn bind_address(setting: &str) -> Option<&str> {
    let s = setting.trim();
    (!s.is_empty() && !s.eq_ignore_ascii_case("off")).then_some(s)
}

/// Binds `bind` now (so a taken port fails the start-up with a clear
/// message) and serves `/livez`, `/readyz` and `/metrics` until `shutdown`.
pub async fn serve(
    bind: &str,
    setting: &str,
    probes: Probes,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let component = probes.component;
    let _ = handle();
    let listener = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
        anyhow::anyhow!(
            "{setting} = \"{bind}\": cannot listen there ({e}); choose a free address, \
             or \"off\" to serve no health and metrics endpoint"
        )
    })?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, component, "health and metrics at http://{addr}/metrics");
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(probes);
    tokio::spawn(async move {
        let stop = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, component, "the health and metrics server stopped");
        }
    });
    Ok(addr)
}

async fn livez(State(ops): State<Probes>) -> Response {
    axum::Json(serde_json::json!({"status": "alive", "component": ops.component})).into_response()
}

async fn readyz(State(ops): State<Probes>) -> Response {
    let checks = match tokio::time::timeout(Duration::from_secs(3), (ops.ready)()).await {
        Ok(checks) => checks,
        Err(_) => vec![("readiness check", false)],
    };
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, up)| !up)
        .map(|(n, _)| *n)
        .collect();
    let body = serde_json::json!({
        "status": if down.is_empty() { "ready" } else { "not ready" },
        "component": ops.component,
        "checks": checks.iter().map(|(n, up)| (n.to_string(), serde_json::json!(if *up { "up" } else { "down" }))).collect::<serde_json::Map<_, _>>(),
        "down": down,
    });
    let status = if down.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn render(State(ops): State<Probes>) -> Response {
    if let Some(refresh) = &ops.refresh {
        // A slow Postgres leaves the last values rather than the scrape
        // hanging; `taskhost_database_up` says so.
        if tokio::time::timeout(Duration::from_secs(3), refresh())
            .await
            .is_err()
        {
            metrics::gauge!("taskhost_database_up").set(0.0);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle().render(),
    )
        .into_response()
}

/// Whether a component's consumer is connected to the broker now: the
/// broker check of `/readyz` and the `taskhost_broker_connected` gauge.
#[derive(Debug)]
pub struct BrokerLink {
    component: &'static str,
    up: AtomicBool,
}

impl BrokerLink {
    /// A link that is down until [`BrokerLink::connected`].
    pub fn new(component: &'static str) -> Arc<Self> {
        metrics::gauge!("taskhost_broker_connected", "component" => component).set(0.0);
        Arc::new(Self {
            component,
            up: AtomicBool::new(false),
        })
    }

    /// Marks the link up until the returned guard is dropped (the
    /// connection's life ends).
    pub fn connected(self: &Arc<Self>) -> BrokerUp {
        self.set(true);
        BrokerUp(self.clone())
    }

    /// Whether the consumer is connected.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        metrics::gauge!("taskhost_broker_connected", "component" => self.component).set(if up {
            1.0
        } else {
            0.0
        });
    }
}

/// Holds a [`BrokerLink`] up while it lives.
#[derive(Debug)]
pub struct BrokerUp(Arc<BrokerLink>);

impl Drop for BrokerUp {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Sets `taskhost_nodes{group, state}` from the node registry (the api and
/// the scheduler read it at scrape time).
pub async fn record_nodes(pool: &sqlx::PgPool) {
    let nodes: Result<Vec<(String, i64, i64)>, _> = sqlx::query_as(
        "SELECT node_group, count(*) FILTER (WHERE is_active), count(*) FILTER (WHERE NOT is_active)
         FROM nodes GROUP BY node_group",
    )
    .fetch_all(pool)
    .await;
    for (group, active, inactive) in nodes.unwrap_or_default() {
        metrics::gauge!("taskhost_nodes", "group" => group.clone(), "state" => "active")
            .set(active as f64);
        metrics::gauge!("taskhost_nodes", "group" => group, "state" => "inactive")
            .set(inactive as f64);
    }
}

/// `SELECT 1` within a second: the database check of `/readyz`.
pub async fn database_up(pool: &sqlx::PgPool) -> bool {
    let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(_))
    )
}
