//! Test support: every test gets its own Postgres database and its own AMQP
//! prefix on the real local services, and can start the api, scheduler and
//! workers in-process (or the `taskhost` binary as a child process).
//! Nothing here mocks Postgres or RabbitMQ.

pub mod otlp;
pub mod webhook;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::amqp::{self, Names};
use taskhost_common::model::Role;
use taskhost_common::{CancellationToken, Settings, db, keys};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Base URL of the local Postgres server (no database).
pub const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Id of the seeded `diagnostics` task (migrations/…_tasks_retries.sql).
pub const BUILTIN_DIAGNOSTICS_TASK: Uuid = Uuid::from_u128(0x00000000_0000_7000_8000_000000000001);
/// The local RabbitMQ.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// A `secrets.key` for tests (base64 of 32 bytes), see
/// [`TestEnv::set_secrets_key`].
pub const TEST_SECRETS_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// One test's world: a fresh database, a unique prefix, settings for both.
pub struct TestEnv {
    /// Settings pointing at this test's database and prefix, tuned for
    /// quick tests (short leases and heartbeats).
    pub settings: Settings,
    /// A pool on this test's database.
    pub pool: PgPool,
    /// The database name.
    pub db_name: String,
    /// The AMQP prefix.
    pub prefix: String,
    services: Vec<Service>,
}

/// An in-process service started by a test.
pub struct Service {
    /// Cancel to stop it gracefully.
    pub shutdown: CancellationToken,
    /// Its task.
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Stops it and waits (bounded) for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }
}

/// A running api.
pub struct Api {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// HTTP client.
    pub http: reqwest::Client,
}

impl Api {
    /// Full URL of an `/api/v1` path.
    pub fn v1(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }
}

/// The environment map of a test's settings, for `Settings::load_from` and
/// for child processes.
pub fn env_map(db_url: &str, prefix: &str) -> HashMap<String, String> {
    HashMap::from([
        ("DATABASE_URL".into(), db_url.to_owned()),
        ("AMQP_URL".into(), AMQP_URL.to_owned()),
        ("TASKHOST__AMQP__PREFIX".into(), prefix.to_owned()),
        ("TASKHOST__API__BIND".into(), "127.0.0.1:0".into()),
        ("TASKHOST__DATABASE__MAX_CONNECTIONS".into(), "5".into()),
        ("TASKHOST__WORKER__HEARTBEAT_SECS".into(), "1".into()),
        ("TASKHOST__WORKER__CLAIM_LEASE_SECS".into(), "3".into()),
        ("TASKHOST__WORKER__CONCURRENCY".into(), "4".into()),
        ("TASKHOST__WORKER__DRAIN_TIMEOUT_SECS".into(), "5".into()),
        (
            "TASKHOST__SCHEDULER__RELAY_INTERVAL_MS".into(),
            "100".into(),
        ),
        ("TASKHOST__SCHEDULER__RELAY_GRACE_MS".into(), "300".into()),
        (
            "TASKHOST__SCHEDULER__REAPER_INTERVAL_SECS".into(),
            "1".into(),
        ),
        // Any free port: several workers and schedulers run side by side.
        (
            "TASKHOST__WORKER__METRICS_BIND".into(),
            "127.0.0.1:0".into(),
        ),
        (
            "TASKHOST__SCHEDULER__METRICS_BIND".into(),
            "127.0.0.1:0".into(),
        ),
        ("TASKHOST__LOG__FORMAT".into(), "human".into()),
        (
            "TASKHOST__LOG__LEVEL".into(),
            "info,sqlx=warn,lapin=warn".into(),
        ),
    ])
}

/// Installs a test log subscriber once (shown on failure by the test
/// runner).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,lapin=warn")
        .with_test_writer()
        .try_init();
}

/// A fresh test database name: `th_test_<run>_<tag><random>`, where
/// `<run>` is `TASKHOST_TEST_RUN` (set by `scripts/test`, so it can drop
/// exactly its own leftovers and never another run's), or `local`.
pub fn test_db_name(tag: &str) -> String {
    let run: String = std::env::var("TASKHOST_TEST_RUN")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(20)
        .collect();
    let run = if run.is_empty() {
        "local".to_owned()
    } else {
        run
    };
    let id = Uuid::new_v4().simple().to_string();
    format!("th_test_{run}_{tag}{}", &id[..16])
}

impl TestEnv {
    /// A fresh, migrated database and a unique prefix.
    pub async fn new() -> Self {
        init_logs();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = test_db_name("");
        let prefix = format!("t{}", &id[..12]);
        let url = format!("{PG_SERVER}/{db_name}");
        let settings = Settings::load_from(None, &env_map(&url, &prefix)).expect("test settings");
        db::migrate(&settings.database)
            .await
            .expect("migrate test database");
        let pool = db::pool(&settings.database).expect("pool");
        // The seeded diagnostics task would fire on the half hour in the
        // middle of unrelated tests; tests that want it enable it.
        sqlx::query("UPDATE tasks SET enabled = false WHERE task_id = $1")
            .bind(BUILTIN_DIAGNOSTICS_TASK)
            .execute(&pool)
            .await
            .expect("disable the built-in task");
        Self {
            settings,
            pool,
            db_name,
            prefix,
            services: Vec::new(),
        }
    }

    /// The database URL.
    pub fn db_url(&self) -> String {
        self.settings.database.url.clone()
    }

    /// Topology names of this test.
    pub fn names(&self) -> Names {
        Names::new(self.prefix.clone())
    }

    /// The environment a child `taskhost` process needs for this test.
    pub fn env(&self) -> HashMap<String, String> {
        let mut env = env_map(&self.db_url(), &self.prefix);
        if !self.settings.secrets.key.is_empty() {
            env.insert(
                "TASKHOST__SECRETS__KEY".into(),
                self.settings.secrets.key.clone(),
            );
        }
        env
    }

    /// Sets `secrets.key` for every service this env starts from now on
    /// (api, scheduler, workers, child processes); `""` removes it.
    pub fn set_secrets_key(&mut self, key: &str) {
        self.settings.secrets.key = key.to_owned();
        self.settings.validate().expect("a valid secrets.key");
    }

    /// Creates an API key and returns it.
    pub async fn key(&self, user: &str, roles: &[Role]) -> String {
        keys::create(&self.pool, user, roles, "test")
            .await
            .expect("create key")
            .1
    }

    /// Starts the api on a free port.
    pub async fn start_api(&mut self) -> Api {
        self.start_api_with(self.settings.clone()).await
    }

    /// Starts the api with explicit settings (e.g. a bad AMQP URL).
    pub async fn start_api_with(&mut self, settings: Settings) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = taskhost_api::state(&settings).expect("api state");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(taskhost_api::serve(listener, state, shutdown.clone()));
        self.services.push(Service { shutdown, handle });
        Api {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    /// Worker settings for a node of `group` and `role`.
    pub fn worker_settings(&self, node_name: &str, group: &str, role: &str) -> Settings {
        let mut s = self.settings.clone();
        s.worker.node_name = format!("{}-{node_name}", self.prefix);
        s.worker.group = group.to_owned();
        s.worker.role = role.to_owned();
        s
    }

    /// Starts an in-process worker and waits until its node is registered
    /// and its queues are consumed. Returns its index for [`Self::stop`].
    pub async fn start_worker(&mut self, node_name: &str, group: &str, role: &str) -> usize {
        let s = self.worker_settings(node_name, group, role);
        self.start_worker_with(s).await
    }

    /// Starts an in-process worker with explicit settings.
    pub async fn start_worker_with(&mut self, settings: Settings) -> usize {
        let name = settings.worker.node_name.clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(taskhost_worker::run(settings, shutdown.clone()));
        // A worker that fails to start says why instead of timing out.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut registered = false;
        while !handle.is_finished() && Instant::now() < deadline {
            let active: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM nodes WHERE node_name = $1 AND is_active)",
            )
            .bind(&name)
            .fetch_one(&self.pool)
            .await
            .expect("query nodes");
            if active {
                registered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if handle.is_finished() {
            match handle.await {
                Ok(Ok(())) => panic!("worker {name} stopped at once"),
                Ok(Err(e)) => panic!("worker {name} failed to start: {e:#}"),
                Err(e) => panic!("worker {name} panicked: {e}"),
            }
        }
        assert!(registered, "node {name} never registered");
        self.services.push(Service { shutdown, handle });
        // Give the consumer a moment to declare and consume its queues.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.services.len() - 1
    }

    /// Starts an in-process scheduler.
    pub async fn start_scheduler(&mut self) -> usize {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(taskhost_scheduler::run(
            self.settings.clone(),
            shutdown.clone(),
        ));
        self.services.push(Service { shutdown, handle });
        self.services.len() - 1
    }

    /// Stops one service started by this env (gracefully).
    pub async fn stop(&mut self, index: usize) {
        let s = &self.services[index];
        s.shutdown.cancel();
        let handle = std::mem::replace(
            &mut self.services[index].handle,
            tokio::spawn(async { Ok(()) }),
        );
        let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
    }

    /// Waits until a node named `name` is registered and active.
    pub async fn wait_node(&self, name: &str) -> Uuid {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let id: Option<Uuid> =
                sqlx::query_scalar("SELECT node_id FROM nodes WHERE node_name = $1 AND is_active")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .expect("query nodes");
            if let Some(id) = id {
                return id;
            }
            assert!(Instant::now() < deadline, "node {name} never registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The job's status, or None when there is no such job.
    pub async fn job_status(&self, job_id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .expect("query job")
    }

    /// Waits until the job reaches a terminal status and returns it.
    pub async fn wait_terminal(&self, job_id: Uuid, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let status = self.job_status(job_id).await;
            if let Some(s) = &status
                && ["succeeded", "failed", "timed_out", "cancelled", "dead"].contains(&s.as_str())
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} did not finish in {within:?}; status {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job has the given status.
    pub async fn wait_status(&self, job_id: Uuid, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let status = self.job_status(job_id).await;
            if status.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} never became {want}; it is {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (30 s at most) until the job is `running` with its claim held
    /// by `node`.
    pub async fn wait_running_on(&self, job_id: Uuid, node: Uuid) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, by): (String, Option<Uuid>) =
                sqlx::query_as("SELECT status, claimed_by FROM jobs WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_one(&self.pool)
                    .await
                    .expect("job");
            if status == "running" && by == Some(node) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} never ran on node {node}: {status} {by:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Terminal history rows of a job.
    pub async fn final_history_rows(&self, job_id: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = $1 AND is_final")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await
            .expect("count history")
    }

    /// Jobs of this test's database with more than one final history row
    /// (the unique index should keep it at 0).
    pub async fn doubled_final_rows(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT job_id FROM task_history WHERE is_final
                                   GROUP BY job_id HAVING count(*) > 1) d",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count doubled final rows")
    }

    /// A `taskhost` child process with this test's environment.
    pub fn spawn_binary(&self, bin: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Child {
        self.spawn_binary_to(bin, args, extra_env, Stdio::inherit())
    }

    /// [`Self::spawn_binary`] with its log (stderr) written to `log`.
    pub fn spawn_binary_logged(
        &self,
        bin: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Child {
        let file = std::fs::File::create(log).expect("create the log file");
        self.spawn_binary_to(bin, args, extra_env, Stdio::from(file))
    }

    fn spawn_binary_to(
        &self,
        bin: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Child {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(self.env())
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        cmd.spawn().expect("spawn taskhost")
    }

    /// `taskhost api` as a child process on a free port, once its `/livez`
    /// answers (`extra_env` e.g. turns on a failpoint).
    pub async fn spawn_api(&self, bin: &str, extra_env: &[(&str, &str)]) -> (ChildGuard, Api) {
        self.spawn_api_to(bin, extra_env, None).await
    }

    /// [`Self::spawn_api`] with its log (stderr) written to `log`.
    pub async fn spawn_api_logged(
        &self,
        bin: &str,
        extra_env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> (ChildGuard, Api) {
        self.spawn_api_to(bin, extra_env, Some(log)).await
    }

    async fn spawn_api_to(
        &self,
        bin: &str,
        extra_env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> (ChildGuard, Api) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let bind = format!("127.0.0.1:{port}");
        let mut env: Vec<(&str, &str)> = vec![("TASKHOST__API__BIND", &bind)];
        env.extend_from_slice(extra_env);
        let child = ChildGuard(match log {
            Some(log) => self.spawn_binary_logged(bin, &["api"], &env, log),
            None => self.spawn_binary(bin, &["api"], &env),
        });
        let api = Api {
            base: format!("http://{bind}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while api
            .http
            .get(format!("{}/livez", api.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the api child never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (child, api)
    }

    /// The invariants every fault case ends with, checked in SQL and on the
    /// broker: every accepted job ends `succeeded` with exactly one final
    /// history row; no job of this database has two; no outbox row waits
    /// longer than the relay period; the work queues drain; the dead-letter
    /// queue holds exactly `dead_letters` messages (the expected poison);
    /// and no process whose command line contains `marker` is left.
    pub async fn assert_invariants(&self, accepted: &[Uuid], marker: &str, dead_letters: u32) {
        for id in accepted {
            let status = self.wait_terminal(*id, Duration::from_secs(90)).await;
            assert_eq!(status, "succeeded", "job {id}");
            assert_eq!(
                self.final_history_rows(*id).await,
                1,
                "job {id}: one final row"
            );
        }
        assert_eq!(
            self.doubled_final_rows().await,
            0,
            "a job with two final rows"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let stale_outbox: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL
                   AND available_at < now() - interval '5 seconds'",
            )
            .fetch_one(&self.pool)
            .await
            .expect("outbox");
            let work = self.queue_depths(&format!("{}.work.", self.prefix)).await;
            if stale_outbox == 0 && work == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{stale_outbox} outbox rows left unpublished, {work} messages left in the work queues"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let dead = self.queue_depths(&self.names().dead()).await;
        assert_eq!(
            dead,
            u64::from(dead_letters),
            "messages in {}",
            self.names().dead()
        );
        let out = Command::new("pgrep")
            .args(["-f", marker])
            .output()
            .expect("pgrep");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "job processes left running: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Messages (ready and unacknowledged) in this test's queues whose name
    /// starts with `prefix`, as the broker counts them.
    pub async fn queue_depths(&self, prefix: &str) -> u64 {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages"])
            .output()
            .await
            .expect("rabbitmqctl list_queues");
        assert!(out.status.success(), "rabbitmqctl list_queues failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(name, _)| name.starts_with(prefix))
            .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
            .sum()
    }

    /// Publishes raw bytes to an exchange of this test's prefix (for
    /// ingress tests), as another system would.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_type: Option<&str>,
        message_id: Option<&str>,
    ) {
        self.publish_raw_with_headers(exchange, routing_key, body, message_type, message_id, &[])
            .await;
    }

    /// [`Self::publish_raw`] with string headers (e.g. `traceparent`).
    pub async fn publish_raw_with_headers(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_type: Option<&str>,
        message_id: Option<&str>,
        headers: &[(&str, &str)],
    ) {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        let conn = amqp::connect(AMQP_URL, "test-publisher")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        amqp::declare_topology(&ch, &self.names())
            .await
            .expect("topology");
        let mut props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(t) = message_type {
            props = props.with_type(t.into());
        }
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        if !headers.is_empty() {
            let mut table = lapin::types::FieldTable::default();
            for (k, v) in headers {
                table.insert(
                    (*k).into(),
                    lapin::types::AMQPValue::LongString((*v).into()),
                );
            }
            props = props.with_headers(table);
        }
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        let _ = conn.close(200, "done".into()).await;
    }

    /// Reads one message from a queue (basic.get), acking it; None if empty.
    pub async fn get_one(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        use lapin::options::BasicGetOptions;
        let conn = amqp::connect(AMQP_URL, "test-reader")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let msg = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        let _ = conn.close(200, "done".into()).await;
        msg
    }

    /// Stops every service, drops the database and deletes this prefix's
    /// queues and exchanges.
    pub async fn cleanup(mut self) {
        for s in self.services.drain(..) {
            s.stop().await;
        }
        self.pool.close().await;
        drop_database(&self.db_name).await;
        delete_broker_objects(&self.prefix).await;
    }
}

/// A TCP proxy between a service and the broker (or any upstream) that a
/// test can cut: while [`Proxy::partition`] is on, bytes in both
/// directions are read and dropped, so both ends see a silent network, as
/// in a partition (no reset, no FIN).
pub struct Proxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port and forwards each connection to `upstream`.
    pub async fn start(upstream: &str) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_owned();
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, flag.clone()));
                tokio::spawn(pipe(sr, cw, flag.clone()));
            }
        });
        Self { port, cut, task }
    }

    /// Cuts (true) or heals (false) every connection through the proxy.
    pub fn partition(&self, on: bool) {
        self.cut.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // A close does not cross a partition either: the other end
                // hears of it only once the network heals.
                while cut.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                return;
            }
            Ok(n) => n,
        };
        if cut.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A child process that is resumed, killed and reaped when dropped, so a
/// failing test leaves nothing running (or frozen).
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig)
            .expect("signal the child");
    }

    /// Waits (bounded) for the child to exit and returns how it ended.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the child did not exit in {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Drops a test database, disconnecting its sessions.
pub async fn drop_database(name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(&format!("{PG_SERVER}/postgres")).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

/// Deletes queues and exchanges named `<prefix>.*`, listed with rabbitmqctl
/// when it is available (best effort: leftovers are harmless).
pub async fn delete_broker_objects(prefix: &str) {
    let list = |what: &str| -> Vec<String> {
        Command::new("rabbitmqctl")
            .args(["-q", what, "name"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|n| n.starts_with(&format!("{prefix}.")))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let queues = list("list_queues");
    let exchanges = list("list_exchanges");
    let Ok(conn) = amqp::connect(AMQP_URL, "test-cleanup").await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch
                .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                .await;
        }
        for e in exchanges {
            let _ = ch
                .exchange_delete(e.into(), lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Submits a job over HTTP and returns `(status, body)`.
pub async fn submit(api: &Api, key: &str, body: &Value) -> (u16, Value) {
    let resp = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("submit request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Any `/api/v1` request with a key and an optional JSON body; returns
/// `(status, body)` (`Null` when the body is not JSON).
pub async fn call(
    api: &Api,
    method: reqwest::Method,
    key: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = api.http.request(method, api.v1(path)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// GET with a key; returns `(status, body)`.
pub async fn get(api: &Api, key: &str, path: &str) -> (u16, Value) {
    call(api, reqwest::Method::GET, key, path, None).await
}

/// The job id in a submit response.
pub fn job_id(body: &Value) -> Uuid {
    body["jobId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("jobId in response")
}
