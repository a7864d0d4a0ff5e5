//! Failures of the real services while jobs run: nothing accepted is lost
//! and every job ends with exactly one terminal history row.
//!
//! The broker test restarts the shared RabbitMQ application, so this binary
//! runs on its own after the rest of the suite, one test at a time
//! (scripts/test passes `--test-threads 1` to nextest; under `cargo test` the
//! lock below serializes them).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, job_id, submit};
use tokio::sync::Mutex;
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn all_finished_once(env: &TestEnv, ids: &[Uuid], within: Duration) {
    for id in ids {
        let status = env.wait_terminal(*id, within).await;
        assert_eq!(status, "succeeded", "job {id}");
        assert_eq!(env.final_history_rows(*id).await, 1, "job {id}");
    }
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = ANY($1)")
            .bind(ids)
            .fetch_one(&env.pool)
            .await
            .expect("count history rows");
    assert_eq!(
        history,
        ids.len() as i64,
        "one history row per job, no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let mut ids = Vec::new();
    for i in 0..12 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("before-{i}"), "command": "sleep 1; echo ok"}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    // Some are running, some wait in the queue, when the broker goes away.
    env.wait_status(ids[0], "running", Duration::from_secs(10))
        .await;
    rabbitmqctl(&["stop_app"]);
    let restarted = scopeguard(|| rabbitmqctl(&["start_app"]));
    for i in 0..4 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("during-{i}"), "command": "echo ok"}),
        )
        .await;
        assert_eq!(
            status, 202,
            "a job is accepted while the broker is down: {body}"
        );
        ids.push(job_id(&body));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(restarted);
    rabbitmqctl(&["await_startup"]);
    for i in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = submit(
                &api,
                &key,
                &json!({"jobName": format!("after-{i}"), "command": "echo ok"}),
            )
            .await;
            if status == 202 {
                ids.push(job_id(&body));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "submit after restart: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    all_finished_once(&env, &ids, Duration::from_secs(90)).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropping_connections_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let mut ids = Vec::new();
    for i in 0..16 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("pg-{i}"), "command": "sleep 0.5; echo ok"}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    env.wait_status(ids[0], "running", Duration::from_secs(10))
        .await;
    // Kill every server process of this test's database, twice, while jobs
    // are claimed, run and recorded.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", taskhost_testkit::PG_SERVER))
        .await
        .unwrap();
    for _ in 0..2 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&env.db_name)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(!killed.is_empty(), "there were connections to drop");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    admin.close().await;
    all_finished_once(&env, &ids, Duration::from_secs(60)).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_resource_alarm_answers_fast_reports_blocked_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

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
            &json!({"jobName": format!("alarm-{i}"), "command": "echo ok"}),
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
    all_finished_once(&env, &ids, Duration::from_secs(90)).await;
    env.cleanup().await;
}

/// Runs `f` when dropped, so a failing assertion still restarts the broker.
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
