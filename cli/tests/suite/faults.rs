//! The fault matrix, the cases that do not touch the shared broker or
//! Postgres (those are in `cli/tests/chaos.rs`, run alone): a worker
//! stopped with SIGTERM mid-job, and a worker frozen with SIGSTOP past its
//! lease and then resumed. Each case ends with the same invariants, checked
//! in SQL and on the broker: every accepted job ended with exactly one final
//! history row, the work queue drained, no outbox row is left behind, and no
//! process of a job is left running.

use std::process::Child;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use taskhost_common::amqp;
use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, TestEnv, job_id, submit};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

/// Kills and reaps a child process even when the test panics.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal the worker");
}

/// The invariants every fault case ends with.
async fn invariants(env: &TestEnv, accepted: &[Uuid], marker: &str) {
    for id in accepted {
        let status = env.wait_terminal(*id, Duration::from_secs(40)).await;
        assert_eq!(status, "succeeded", "job {id}");
        assert_eq!(
            env.final_history_rows(*id).await,
            1,
            "job {id}: one final row"
        );
    }
    let doubled = env.doubled_final_rows().await;
    assert_eq!(doubled, 0, "a job with two final rows");
    let stale_outbox: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL
           AND available_at < now() - interval '5 seconds'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("outbox");
    assert_eq!(stale_outbox, 0, "outbox rows left unpublished");
    // The work queue drains (redelivered copies are acked without running).
    let conn = amqp::connect(AMQP_URL, "fault-check")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let q = ch
            .queue_declare(
                env.names().work_queue("any").into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        if q.message_count() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages left in the work queue",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    // No process of a job is left.
    let out = std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "job processes left running: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

async fn running_on(env: &TestEnv, id: Uuid, node: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, by): (String, Option<Uuid>) =
            sqlx::query_as("SELECT status, claimed_by FROM jobs WHERE job_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .expect("job");
        if status == "running" && by == Some(node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never ran on the node: {status} {by:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_mid_job_finishes_it_and_leaves() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let name = format!("{}-term", env.prefix);
    let worker = Guard(env.spawn_binary(BIN, &["worker", "--node-name", &name], &[]));
    let node = env.wait_node(&name).await;
    let marker = format!("fault-term-{}", env.prefix);
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "t", "command": format!("sleep 2; echo {marker}")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    running_on(&env, id, node).await;
    signal(&worker.0, Signal::SIGTERM);
    let mut worker = worker;
    let exit = tokio::task::spawn_blocking(move || {
        let status = worker.0.wait();
        (worker, status)
    })
    .await
    .expect("join");
    assert!(
        exit.1.expect("wait").success(),
        "a clean exit after draining"
    );
    let by: Option<Uuid> = sqlx::query_scalar("SELECT claimed_by FROM jobs WHERE job_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("job");
    assert_eq!(by, Some(node), "the draining worker finished its job");
    let active: bool = sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_id = $1")
        .bind(node)
        .fetch_one(&env.pool)
        .await
        .expect("node");
    assert!(!active, "a stopped worker marks its node inactive");
    invariants(&env, &[id], &marker).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_is_fenced_when_it_wakes() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let name = format!("{}-frozen", env.prefix);
    let frozen = Guard(env.spawn_binary(BIN, &["worker", "--node-name", &name], &[]));
    let frozen_node = env.wait_node(&name).await;
    let marker = format!("fault-stop-{}", env.prefix);
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "s", "command": format!("sleep 1; echo {marker}")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    running_on(&env, id, frozen_node).await;
    // Frozen past its lease (3 s in the tests): the reaper requeues the
    // job, and another worker runs it.
    signal(&frozen.0, Signal::SIGSTOP);
    env.start_worker("rescuer", "default", "worker").await;
    let rescuer = env.wait_node(&format!("{}-rescuer", env.prefix)).await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(40)).await,
        "succeeded"
    );
    // Woken up, the frozen worker finds its run ended long ago and tries
    // to record it: the attempt is fenced, the rescuer's record stands.
    signal(&frozen.0, Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (by, attempt): (Option<Uuid>, i32) =
        sqlx::query_as("SELECT claimed_by, attempt FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("job");
    assert_eq!(by, Some(rescuer), "the rescuer's record stands");
    assert!(attempt >= 2, "attempt {attempt}");
    let node_of_final: Option<Uuid> =
        sqlx::query_scalar("SELECT node_id FROM task_history WHERE job_id = $1 AND is_final")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("final row");
    assert_eq!(node_of_final, Some(rescuer));
    invariants(&env, &[id], &marker).await;
    drop(frozen);
    env.cleanup().await;
}
