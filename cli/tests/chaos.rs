//! The fault matrix's cases that stop the shared services: the broker
//! restarted under a 500-job burst, the broker killed with SIGKILL, a broker
//! resource alarm, Postgres dropping every connection, and Postgres stopped
//! for 30 s under load. Each ends with the invariants of
//! [`TestEnv::assert_invariants`]: every accepted job ran and has exactly
//! one final history row, none has two, the queues drain, nothing is left in
//! the outbox or the dead-letter queue, no job process is left.
//!
//! They stop RabbitMQ or PostgreSQL for everyone, so this binary runs on its
//! own after the rest of the suite, one test at a time (scripts/test passes
//! `--test-threads 1` to nextest; under `cargo test` the lock below
//! serializes them).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, job_id, submit};
use tokio::sync::Mutex;
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rabbitmqctl(args: &[&str]) {
    run("rabbitmqctl", args);
}

/// Waits until the broker has booted (after a restart or a new start).
async fn broker_up() {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !Command::new("rabbitmqctl")
        .args(["-q", "await_startup"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(Instant::now() < deadline, "RabbitMQ did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn pg_cluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a PostgreSQL cluster");
    let mut args = vec!["--skip-systemctl-redirect", &version, "main", action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    run("pg_ctlcluster", &args);
}

/// Submits until accepted (the api may answer 503 while a service is
/// coming back), for at most `within`.
async fn submit_until_accepted(
    api: &Api,
    key: &str,
    body: &serde_json::Value,
    within: Duration,
) -> Uuid {
    let deadline = Instant::now() + within;
    loop {
        let (status, resp) = submit(api, key, body).await;
        if status == 202 {
            return job_id(&resp);
        }
        assert!(Instant::now() < deadline, "submit: {status} {resp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// api, scheduler and one worker, and a task_manager key.
async fn system() -> (TestEnv, Api, String) {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    (env, api, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_under_a_500_job_burst_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (env, api, key) = system().await;
    let marker = format!("chaos-restart-{}", env.prefix);
    // 500 jobs submitted over 16 connections; the broker restarts in the
    // middle of the burst.
    let api = std::sync::Arc::new(api);
    let mut clients = Vec::new();
    for c in 0..16 {
        let (api, key, marker) = (api.clone(), key.clone(), marker.clone());
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..32 {
                let body = json!({"jobName": format!("burst-{c}-{i}"), "command": format!("echo {marker}")});
                ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(60)).await);
            }
            ids
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    rabbitmqctl(&["stop_app"]);
    let restarted = scopeguard(|| rabbitmqctl(&["start_app"]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(restarted);
    broker_up().await;
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.expect("client"));
    }
    assert_eq!(ids.len(), 512);
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_with_sigkill_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (env, api, key) = system().await;
    let marker = format!("chaos-kill-{}", env.prefix);
    let mut ids = Vec::new();
    for i in 0..20 {
        let body =
            json!({"jobName": format!("k{i}"), "command": format!("sleep 0.5; echo {marker}")});
        ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(10)).await);
    }
    env.wait_status(ids[0], "running", Duration::from_secs(10))
        .await;
    // No clean shutdown: the Erlang VM is killed outright.
    run("pkill", &["-KILL", "-f", "beam.smp"]);
    let started = scopeguard(|| {
        let _ = Command::new("rabbitmq-server").arg("-detached").status();
    });
    for i in 0..3 {
        // Accepted while the broker is gone: committed, published later.
        let body = json!({"jobName": format!("down-{i}"), "command": format!("echo {marker}")});
        ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(10)).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(started);
    broker_up().await;
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropping_connections_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (env, api, key) = system().await;
    let marker = format!("chaos-drop-{}", env.prefix);
    let mut ids = Vec::new();
    for i in 0..16 {
        let body =
            json!({"jobName": format!("pg-{i}"), "command": format!("sleep 0.5; echo {marker}")});
        ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(10)).await);
    }
    env.wait_status(ids[0], "running", Duration::from_secs(10))
        .await;
    // Kill every server process of this test's database, twice, while jobs
    // are claimed, run and recorded.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", taskhost_testkit::PG_SERVER))
        .await
        .expect("admin pool");
    for _ in 0..2 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&env.db_name)
        .fetch_all(&admin)
        .await
        .expect("terminate");
        assert!(!killed.is_empty(), "there were connections to drop");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    admin.close().await;
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_30_seconds_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (env, api, key) = system().await;
    let marker = format!("chaos-pgstop-{}", env.prefix);
    let mut ids = Vec::new();
    for i in 0..20 {
        let body =
            json!({"jobName": format!("s{i}"), "command": format!("sleep 1; echo {marker}")});
        ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(10)).await);
    }
    env.wait_status(ids[0], "running", Duration::from_secs(10))
        .await;
    pg_cluster("stop");
    let started = scopeguard(|| pg_cluster("start"));
    // Nothing can be committed: submissions are refused at once with 503
    // and a Retry-After, never accepted and lost.
    for _ in 0..5 {
        let t = Instant::now();
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": "refused", "command": format!("echo {marker}")}),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "answered in {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(started);
    for i in 0..3 {
        let body = json!({"jobName": format!("after-{i}"), "command": format!("echo {marker}")});
        ids.push(submit_until_accepted(&api, &key, &body, Duration::from_secs(60)).await);
    }
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_resource_alarm_answers_fast_reports_blocked_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (env, api, key) = system().await;
    let marker = format!("chaos-alarm-{}", env.prefix);

    // A disk alarm: free space is below the limit, so the broker blocks
    // every publishing connection.
    rabbitmqctl(&["set_disk_free_limit", "100000GB"]);
    let cleared = scopeguard(|| rabbitmqctl(&["set_disk_free_limit", "50MB"]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("alarm-{i}"), "command": format!("echo {marker}")}),
        )
        .await;
        assert_eq!(status, 202, "accepted during the alarm: {body}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a submit waited {:?} on the blocked broker",
            t.elapsed()
        );
        ids.push(job_id(&body));
    }
    // /readyz names the blocked broker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = api
            .http
            .get(format!("{}/readyz", api.base))
            .send()
            .await
            .expect("readyz");
        let code = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if code == 503 && body["down"] == json!(["rabbitmq"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz during the alarm: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(cleared);
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

/// Runs `f` when dropped, so a failing assertion still restarts the service.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
