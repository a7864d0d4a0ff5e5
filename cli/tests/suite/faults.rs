//! The fault matrix, the cases that do not stop the shared broker or
//! Postgres (those are in `cli/tests/chaos.rs`, run alone, last). Each case
//! ends with the same invariants ([`TestEnv::assert_invariants`]), checked
//! in SQL and on the broker: every accepted job ended with exactly one final
//! history row, none has two, the work queues drained, the dead-letter queue
//! holds only the expected poison, no outbox row is left behind, and no
//! process of a job is left running. Crashes at exact moments use the
//! failpoints of debug builds (`taskhost_common::failpoint`).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use taskhost_common::model::Role;
use taskhost_testkit::{ChildGuard as Guard, TestEnv, job_id, submit};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

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
    env.wait_running_on(id, node).await;
    worker.signal(Signal::SIGTERM);
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
    env.assert_invariants(&[id], &marker, 0).await;
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
    env.wait_running_on(id, frozen_node).await;
    // Frozen past its lease (3 s in the tests): the reaper requeues the
    // job, and another worker runs it.
    frozen.signal(Signal::SIGSTOP);
    env.start_worker("rescuer", "default", "worker").await;
    let rescuer = env.wait_node(&format!("{}-rescuer", env.prefix)).await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(40)).await,
        "succeeded"
    );
    // Woken up, the frozen worker finds its run ended long ago and tries
    // to record it: the attempt is fenced, the rescuer's record stands.
    frozen.signal(Signal::SIGCONT);
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
    env.assert_invariants(&[id], &marker, 0).await;
    drop(frozen);
    env.cleanup().await;
}

/// `(jobs, distinct fire times)` of a task's scheduled runs, and the fire
/// times missing between its first and last one (a per-second task).
async fn fire_record(env: &TestEnv, task: Uuid) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT fire_at),
                COALESCE(EXTRACT(EPOCH FROM max(fire_at) - min(fire_at))::bigint + 1
                         - count(DISTINCT fire_at), 0)
         FROM jobs WHERE task_id = $1 AND triggered_by = 'schedule'",
    )
    .bind(task)
    .fetch_one(&env.pool)
    .await
    .expect("fire record")
}

/// A per-second shell task whose runs may overlap.
async fn every_second(
    api: &taskhost_testkit::Api,
    key: &str,
    name: &str,
    extra: &serde_json::Value,
) -> Uuid {
    let mut body = json!({"taskName": name, "command": "true", "schedule": "* * * * * *",
                          "overlapPolicy": "allow"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, resp) =
        taskhost_testkit::call(api, reqwest::Method::POST, key, "/tasks", Some(&body)).await;
    assert_eq!(status, 201, "{resp}");
    resp["taskId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("taskId")
}

/// The connection (its Erlang pid, which `close_connection` takes) whose
/// client-provided name contains `needle`.
fn broker_connection(needle: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closing_one_workers_connection_loses_nothing() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("closed", "default", "worker").await;
    let node_name = format!("{}-closed", env.prefix);
    let node = env.wait_node(&node_name).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let marker = format!("fault-close-{}", env.prefix);
    let mut ids = Vec::new();
    for i in 0..8 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("c{i}"), "command": format!("sleep 1; echo {marker}")}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    env.wait_running_on(ids[0], node).await;
    let name = broker_connection(&format!("taskhost-worker@{node_name}"))
        .expect("the worker's connection is listed");
    let out = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &name, "fault test"])
        .output()
        .expect("rabbitmqctl close_connection");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The worker reconnects by itself; a job submitted afterwards runs too.
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "after", "command": format!("echo {marker}")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    ids.push(job_id(&body));
    env.assert_invariants(&ids, &marker, 0).await;
    let active: bool = sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_id = $1")
        .bind(node)
        .fetch_one(&env.pool)
        .await
        .expect("node");
    assert!(active, "the node stayed up through the lost connection");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_broker_by_a_partition_loses_nothing() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let proxy = taskhost_testkit::Proxy::start("127.0.0.1:5672").await;
    let mut cut_off = env.worker_settings("cut", "default", "worker");
    cut_off.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    env.start_worker_with(cut_off).await;
    let cut_node = env.wait_node(&format!("{}-cut", env.prefix)).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let marker = format!("fault-cut-{}", env.prefix);
    let mut ids = Vec::new();
    for i in 0..8 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("p{i}"), "command": format!("sleep 2; echo {marker}")}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    env.wait_running_on(ids[0], cut_node).await;
    // The partition: the cut-off worker still reaches Postgres, so it
    // finishes and records what it runs, but its acks and heartbeats are
    // lost; the broker gives its unacked deliveries to the other worker,
    // which must absorb the copies of jobs already done.
    proxy.partition(true);
    env.start_worker("healthy", "default", "worker").await;
    for i in 0..4 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("during-{i}"), "command": format!("echo {marker}")}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    tokio::time::sleep(Duration::from_secs(25)).await;
    proxy.partition(false);
    env.assert_invariants(&ids, &marker, 0).await;
    // Healed, the cut-off worker is back on the broker: a job for its node
    // alone runs there.
    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "healed", "command": format!("echo {marker}"),
                "target": {"nodeId": cut_node}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let healed = job_id(&body);
    env.assert_invariants(&[healed], &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_killed_between_commit_and_answer_keeps_one_job_for_the_retry() {
    let mut env = TestEnv::new().await;
    env.start_scheduler().await;
    env.start_worker("w", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let marker = format!("fault-api-{}", env.prefix);
    let body = json!({"jobName": "once", "command": format!("echo {marker}")});
    let (mut dying, api) = env
        .spawn_api(
            BIN,
            &[("TASKHOST_FAILPOINTS", "api.submit.after_commit=abort")],
        )
        .await;
    let first = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "order-42")
        .json(&body)
        .send()
        .await;
    assert!(first.is_err(), "no answer from a dead api: {first:?}");
    let exit = dying.wait_exit(Duration::from_secs(10)).await;
    assert!(!exit.success(), "the failpoint killed it: {exit:?}");
    // The client retries against the restarted api with the same key.
    let (_api_guard, api) = env.spawn_api(BIN, &[]).await;
    let resp = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "order-42")
        .json(&body)
        .send()
        .await
        .expect("the retry is answered");
    assert_eq!(resp.status().as_u16(), 202);
    let answer: serde_json::Value = resp.json().await.expect("json");
    let id = job_id(&answer);
    let jobs: Vec<Uuid> =
        sqlx::query_scalar("SELECT job_id FROM jobs WHERE idempotency_key = 'order-42'")
            .fetch_all(&env.pool)
            .await
            .expect("jobs");
    assert_eq!(
        jobs,
        vec![id],
        "one job for the key, the one the retry names"
    );
    // Committed before the crash, its publish is the relay's: it runs once.
    env.assert_invariants(&[id], &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_killed_between_publish_and_mark_runs_each_job_once() {
    let mut env = TestEnv::new().await;
    env.start_worker("w", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let marker = format!("fault-relay-{}", env.prefix);
    // The api leaves every publish to the relay.
    let (_api_guard, api) = env
        .spawn_api(
            BIN,
            &[("TASKHOST_FAILPOINTS", "api.submit.skip_publish=skip")],
        )
        .await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": format!("r{i}"), "command": format!("echo {marker}")}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        ids.push(job_id(&body));
    }
    // A relay that dies after the broker confirmed, before it marked the
    // rows published: the messages are out, the rows still say unpublished.
    let mut relay = Guard(env.spawn_binary(
        BIN,
        &["scheduler"],
        &[("TASKHOST_FAILPOINTS", "relay.after_publish=abort")],
    ));
    let exit = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success(), "the failpoint killed the relay: {exit:?}");
    // The next relay publishes them again: every job has two work
    // messages, and runs once.
    env.start_scheduler().await;
    env.assert_invariants(&ids, &marker, 0).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_or_frozen_mid_pass_fires_each_time_once() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(every_second(&api, &key, &format!("tick-{i}"), &json!({})).await);
    }
    // Another scheduler runs all along.
    env.start_scheduler().await;
    // One dies inside its fire transaction (the fires roll back; the
    // other scheduler fires those times)...
    let mut killed = Guard(env.spawn_binary(
        BIN,
        &["scheduler"],
        &[("TASKHOST_FAILPOINTS", "scheduler.fire.before_commit=abort")],
    ));
    let exit = killed.wait_exit(Duration::from_secs(30)).await;
    assert!(
        !exit.success(),
        "the failpoint killed it mid-pass: {exit:?}"
    );
    // ...another freezes inside it, holding its row locks, for 4 s.
    let frozen = Guard(env.spawn_binary(
        BIN,
        &["scheduler"],
        &[("TASKHOST_FAILPOINTS", "scheduler.fire.before_commit=stop")],
    ));
    let pid = frozen.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .contains(") T ")
    {
        assert!(
            Instant::now() < deadline,
            "the scheduler never froze mid-pass"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    frozen.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(frozen);
    drop(killed);
    for task in tasks {
        let (jobs, distinct, missing) = fire_record(&env, task).await;
        assert!(jobs >= 8, "task {task} fired {jobs} times");
        assert_eq!(jobs, distinct, "task {task}: a fire time fired twice");
        assert_eq!(missing, 0, "task {task}: a fire time was missed");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_down_across_fire_times_follows_the_misfire_policy() {
    let mut env = TestEnv::new().await;
    env.settings.scheduler.misfire_grace_secs = 2;
    let api = env.start_api().await;
    env.start_worker("w", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let catch_up = every_second(
        &api,
        &key,
        "catch-up",
        &json!({"misfirePolicy": "catch_up"}),
    )
    .await;
    let skip = every_second(&api, &key, "skip", &json!({"misfirePolicy": "skip"})).await;
    let scheduler = env.start_scheduler().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.stop(scheduler).await;
    let down_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .expect("now");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let up_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .expect("now");
    env.start_scheduler().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Fire times more than the grace (2 s) before the restart are misfires:
    // catch_up fires one run for all of them, skip none.
    let misfired = |task: Uuid| {
        let pool = env.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs WHERE task_id = $1 AND triggered_by = 'schedule'
                   AND fire_at > $2 AND fire_at < $3 - interval '3 seconds'",
            )
            .bind(task)
            .bind(down_at)
            .bind(up_at)
            .fetch_one(&pool)
            .await
            .expect("count");
            n
        }
    };
    assert_eq!(
        misfired(catch_up).await,
        1,
        "catch_up fires one run for the backlog"
    );
    assert_eq!(misfired(skip).await, 0, "skip fires none of the backlog");
    // The overview counts both backlogs as misfires.
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let (status, overview) = taskhost_testkit::get(&api, &admin, "/overview").await;
    assert_eq!(status, 200, "{overview}");
    // At least the two backlogs (a pass late by more than the 2 s grace on
    // a loaded machine adds its own).
    assert!(
        overview["scheduler"]["misfires"].as_i64().unwrap_or(0) >= 2,
        "{overview}"
    );
    assert!(
        overview["scheduler"]["lastMisfireAt"].is_string(),
        "{overview}"
    );
    for task in [catch_up, skip] {
        let (jobs, distinct, _) = fire_record(&env, task).await;
        assert_eq!(jobs, distinct, "no fire time twice");
        let after: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE task_id = $1 AND fire_at > $2")
                .bind(task)
                .bind(up_at)
                .fetch_one(&env.pool)
                .await
                .expect("count");
        assert!(
            after >= 2,
            "task {task} fires again after the restart: {after}"
        );
    }
    env.cleanup().await;
}
