//! Routing and node life, end to end on the real local Postgres and
//! RabbitMQ: the routing-key matrix (group, role, group+role, node, any),
//! fan-out to all matching nodes, targets no node matches, a job waiting for
//! a worker that starts later, a worker process killed mid-job (the reaper
//! marks its node dead and another worker finishes the job), fencing of a
//! stale attempt, priorities, and the nodes API.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, ChildGuard, TestEnv, get, job_id, submit};
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

/// The columns of a job row these tests look at.
#[derive(Debug, Clone, sqlx::FromRow)]
struct JobRow {
    status: String,
    status_reason: Option<String>,
    claimed_by: Option<Uuid>,
    attempt: i32,
    target_node_id: Option<Uuid>,
    started_at: Option<DateTime<Utc>>,
}

async fn job_row(env: &TestEnv, id: Uuid) -> JobRow {
    sqlx::query_as(
        "SELECT status, status_reason, claimed_by, attempt, target_node_id, started_at
         FROM jobs WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("job row")
}

/// Submits and asserts 202; returns the whole response body.
async fn submit_body(api: &Api, key: &str, body: &Value) -> Value {
    let (status, resp) = submit(api, key, body).await;
    assert_eq!(status, 202, "submit {body} answered {status} {resp}");
    assert_eq!(resp["success"], true, "{resp}");
    resp
}

/// Submits and asserts 202; returns the job id.
async fn submit_ok(api: &Api, key: &str, body: &Value) -> Uuid {
    job_id(&submit_body(api, key, body).await)
}

/// The `jobIds` of a fan-out answer.
fn job_ids(body: &Value) -> Vec<Uuid> {
    body["jobIds"]
        .as_array()
        .unwrap_or_else(|| panic!("jobIds in {body}"))
        .iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("a job id, got {v}"))
        })
        .collect()
}

/// Waits until `f` returns `Some`, polling; panics with `what` at the
/// deadline.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the job succeeded, ran on a node of `allowed`, and printed that
/// node's id (the command is `echo $TASKHOST_NODE_ID`). Returns the node.
async fn assert_ran_on(
    env: &TestEnv,
    api: &Api,
    key: &str,
    id: Uuid,
    allowed: &BTreeSet<Uuid>,
    label: &str,
) -> Uuid {
    let status = env.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(status, "succeeded", "{label}: job {id}");
    let row = job_row(env, id).await;
    let node = row
        .claimed_by
        .unwrap_or_else(|| panic!("{label}: job {id} has no claimed_by"));
    assert!(
        allowed.contains(&node),
        "{label}: job {id} ran on {node}, allowed only {allowed:?}"
    );
    let (code, job) = get(api, key, &format!("/jobs/{id}")).await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["nodeId"], json!(node), "{label}: {job}");
    assert_eq!(
        job["output"].as_str().map(str::trim),
        Some(node.to_string().as_str()),
        "{label}: the output is the id of the node that ran it: {job}"
    );
    assert_eq!(env.final_history_rows(id).await, 1, "{label}: job {id}");
    node
}

/// The three workers of the routing tests.
struct Three {
    a: Uuid,
    b: Uuid,
    c: Uuid,
}

/// Starts A (prod/web), B (prod/db) and C (dev/web).
async fn start_three(env: &mut TestEnv) -> Three {
    env.start_worker("a", "prod", "web").await;
    env.start_worker("b", "prod", "db").await;
    env.start_worker("c", "dev", "web").await;
    Three {
        a: env.wait_node(&format!("{}-a", env.prefix)).await,
        b: env.wait_node(&format!("{}-b", env.prefix)).await,
        c: env.wait_node(&format!("{}-c", env.prefix)).await,
    }
}

fn set(ids: &[Uuid]) -> BTreeSet<Uuid> {
    ids.iter().copied().collect()
}

fn nodes_by_id(body: &Value) -> HashMap<String, Value> {
    body["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("nodes in {body}"))
        .iter()
        .map(|n| {
            (
                n["nodeId"].as_str().unwrap_or_default().to_owned(),
                n.clone(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------- tests

/// Each target reaches exactly the nodes whose queues it maps to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matrix_reaches_only_matching_nodes() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let Three { a, b, c } = start_three(&mut env).await;

    let cases: Vec<(&str, Value, BTreeSet<Uuid>)> = vec![
        ("group prod", json!({"nodeGroup": "prod"}), set(&[a, b])),
        ("group dev", json!({"nodeGroup": "dev"}), set(&[c])),
        ("role web", json!({"nodeRole": "web"}), set(&[a, c])),
        ("role db", json!({"nodeRole": "db"}), set(&[b])),
        (
            "group prod + role web",
            json!({"nodeGroup": "prod", "nodeRole": "web"}),
            set(&[a]),
        ),
        ("node B", json!({"nodeId": b}), set(&[b])),
        ("no target", Value::Null, set(&[a, b, c])),
    ];
    let mut submitted = Vec::new();
    for (label, target, allowed) in &cases {
        for i in 0..4 {
            let mut body = json!({
                "jobName": format!("{label} {i}"),
                "command": "echo $TASKHOST_NODE_ID",
            });
            if !target.is_null() {
                body["target"] = target.clone();
            }
            submitted.push((*label, submit_ok(&api, &key, &body).await, allowed));
        }
    }
    for (label, id, allowed) in submitted {
        assert_ran_on(&env, &api, &key, id, allowed, label).await;
    }
    env.cleanup().await;
}

/// `fanout: all` becomes one job per active matching node, each routed to
/// and run by its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_all_runs_once_on_every_matching_node() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let Three { a, b, c } = start_three(&mut env).await;

    for (label, target, want) in [
        (
            "role web, all",
            json!({"nodeRole": "web", "fanout": "all"}),
            set(&[a, c]),
        ),
        ("everyone", json!({"fanout": "all"}), set(&[a, b, c])),
    ] {
        let resp = submit_body(
            &api,
            &key,
            &json!({"jobName": label, "command": "echo $TASKHOST_NODE_ID", "target": target}),
        )
        .await;
        let ids = job_ids(&resp);
        assert_eq!(ids.len(), want.len(), "{label}: {resp}");
        assert_eq!(
            job_id(&resp),
            ids[0],
            "{label}: jobId is the first of jobIds"
        );
        assert_eq!(set(&ids).len(), ids.len(), "{label}: distinct ids: {resp}");
        let mut ran_on = BTreeSet::new();
        for id in ids {
            let node = assert_ran_on(&env, &api, &key, id, &want, label).await;
            assert!(
                ran_on.insert(node),
                "{label}: two fan-out jobs ran on the same node {node}"
            );
            assert_eq!(
                job_row(&env, id).await.target_node_id,
                Some(node),
                "{label}: job {id} is addressed to the node that ran it"
            );
        }
        assert_eq!(ran_on, want, "{label}");
    }
    env.cleanup().await;
}

/// A fan-out that matches no active node is recorded dead at once; a plain
/// job for a group nobody serves waits in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_node_fanout_is_dead_and_single_job_waits() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    env.start_worker("w", "default", "worker").await;

    let resp = submit_body(
        &api,
        &key,
        &json!({"jobName": "to nobody", "command": "true",
                "target": {"nodeGroup": "nobody", "fanout": "all"}}),
    )
    .await;
    let dead = job_id(&resp);
    let (code, job) = get(&api, &key, &format!("/jobs/{dead}")).await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["status"], "dead", "{job}");
    let reason = job["statusReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no active node"),
        "statusReason should say no active node matches: {job}"
    );
    let row = job_row(&env, dead).await;
    assert_eq!(row.status, "dead", "{row:?}");
    assert!(
        row.status_reason
            .as_deref()
            .is_some_and(|r| r.contains("no active node")),
        "{row:?}"
    );
    assert_eq!(env.final_history_rows(dead).await, 1);
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM task_history WHERE job_id = $1")
            .bind(dead)
            .fetch_all(&env.pool)
            .await
            .expect("history");
    assert_eq!(states, vec!["dead".to_owned()]);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count jobs");
    assert_eq!(jobs, 1, "a fan-out to no node is one dead job, not zero");

    let waiting = submit_ok(
        &api,
        &key,
        &json!({"jobName": "waits", "command": "true", "target": {"nodeGroup": "nobody"}}),
    )
    .await;
    env.wait_status(waiting, "queued", Duration::from_secs(5))
        .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let row = job_row(&env, waiting).await;
        assert_eq!(row.status, "queued", "a job for an unserved group waits");
        assert_eq!(row.claimed_by, None);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.final_history_rows(waiting).await, 0);
    // It waits in the group's durable queue, not nowhere.
    let msg = env
        .get_one(&env.names().work_queue("group.nobody"))
        .await
        .expect("the job's message waits in <p>.work.group.nobody");
    assert_eq!(
        msg.properties.message_id().as_ref().map(|m| m.to_string()),
        Some(format!("{waiting}:0"))
    );
    env.cleanup().await;
}

/// A job for a group with no worker waits, and the first worker of that
/// group to start runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_waits_for_a_worker_that_starts_later() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    env.start_worker("other", "default", "worker").await;

    let id = submit_ok(
        &api,
        &key,
        &json!({"jobName": "later", "command": "echo $TASKHOST_NODE_ID",
                "target": {"nodeGroup": "later"}}),
    )
    .await;
    env.wait_status(id, "queued", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(job_row(&env, id).await.status, "queued");

    env.start_worker("late", "later", "worker").await;
    let late = env.wait_node(&format!("{}-late", env.prefix)).await;
    assert_ran_on(&env, &api, &key, id, &set(&[late]), "later").await;
    env.cleanup().await;
}

/// A worker process killed mid-job: the reaper marks its node dead, and the
/// only other worker of its group runs the job to the end, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_reaped_and_its_job_rescued() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    env.start_scheduler().await;

    let victim_name = format!("{}-victim", env.prefix);
    let mut child = ChildGuard(env.spawn_binary(
        env!("CARGO_BIN_EXE_taskhost"),
        &["worker", "--node-name", &victim_name, "--group", "solo"],
        &[],
    ));
    let victim = env.wait_node(&victim_name).await;
    // Let it declare and consume its queues.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = submit_ok(
        &api,
        &key,
        &json!({"jobName": "survivor", "command": "sleep 5; echo finished",
                "target": {"nodeGroup": "solo"}}),
    )
    .await;
    env.wait_status(id, "running", Duration::from_secs(20))
        .await;
    let row = job_row(&env, id).await;
    assert_eq!(row.claimed_by, Some(victim), "{row:?}");
    assert_eq!(row.attempt, 1);

    child.0.kill().expect("SIGKILL the worker");
    child.0.wait().expect("reap the worker");
    let killed_at = Instant::now();

    env.start_worker("rescuer", "solo", "worker").await;
    let rescuer = env.wait_node(&format!("{}-rescuer", env.prefix)).await;

    // The reaper marks the victim dead (3 missed 1 s heartbeats).
    wait_for(
        "the victim to be marked dead",
        Duration::from_secs(10),
        || async {
            let active: bool = sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_id = $1")
                .bind(victim)
                .fetch_one(&env.pool)
                .await
                .expect("node");
            (!active).then_some(())
        },
    )
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the victim should be marked dead within ~10 s of its death"
    );
    let reaped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change
         WHERE table_name = 'nodes' AND record_id = $1 AND change_reason = 'missed heartbeats'",
    )
    .bind(victim.to_string())
    .fetch_one(&env.pool)
    .await
    .expect("data_change");
    assert_eq!(reaped, 1, "one change-log row for the node's death");

    // The rescuer takes the job over as a new attempt.
    let row = wait_for(
        "the rescuer to run the job",
        Duration::from_secs(20),
        || async {
            let row = job_row(&env, id).await;
            (row.claimed_by == Some(rescuer) && row.status == "running"
                || ["succeeded", "failed", "timed_out", "cancelled", "dead"]
                    .contains(&row.status.as_str()))
            .then_some(row)
        },
    )
    .await;
    if row.status == "running" {
        let (code, body) = get(&api, &key, "/nodes").await;
        assert_eq!(code, 200, "{body}");
        let nodes = nodes_by_id(&body);
        assert_eq!(
            nodes[&rescuer.to_string()]["runningJobs"],
            1,
            "the rescuer runs the job: {body}"
        );
        assert_eq!(nodes[&victim.to_string()]["runningJobs"], 0, "{body}");
    }

    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(30)).await,
        "succeeded"
    );
    let row = job_row(&env, id).await;
    assert_eq!(row.claimed_by, Some(rescuer), "{row:?}");
    assert!(row.attempt >= 2, "a rescued job is a new attempt: {row:?}");
    assert_eq!(env.final_history_rows(id).await, 1);
    let (code, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["output"], "finished\n", "{job}");
    assert_eq!(job["nodeId"], json!(rescuer), "{job}");

    let (code, body) = get(&api, &key, "/nodes").await;
    assert_eq!(code, 200, "{body}");
    let nodes = nodes_by_id(&body);
    let v = &nodes[&victim.to_string()];
    assert_eq!(v["status"], "dead", "{body}");
    assert_eq!(v["isActive"], false, "{body}");
    let r = &nodes[&rescuer.to_string()];
    assert_eq!(r["status"], "active", "{body}");
    assert_eq!(r["isActive"], true, "{body}");
    assert!(r["runningJobs"].is_i64(), "runningJobs present: {body}");
    assert!(v["runningJobs"].is_i64(), "runningJobs present: {body}");

    let (code, one) = get(&api, &key, &format!("/nodes/{victim}")).await;
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["nodeId"], json!(victim), "{one}");
    assert_eq!(one["nodeName"], victim_name, "{one}");
    assert_eq!(one["nodeGroup"], "solo", "{one}");
    assert_eq!(one["status"], "dead", "{one}");
    let (code, body) = get(&api, &key, &format!("/nodes/{}", Uuid::new_v4())).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["success"], false, "{body}");
    let (code, body) = get(&api, &key, "/nodes/not-a-uuid").await;
    assert_eq!(code, 404, "{body}");
    env.cleanup().await;
}

/// When another claimant takes a job over (attempt 2), the worker running
/// attempt 1 notices at its next lease renewal, kills its run, and never
/// records attempt 1's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_attempt_is_fenced_off() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    env.start_worker("w", "default", "worker").await;
    let node = env.wait_node(&format!("{}-w", env.prefix)).await;

    let id = submit_ok(
        &api,
        &key,
        &json!({"jobName": "fenced", "command": "sleep 4"}),
    )
    .await;
    env.wait_status(id, "running", Duration::from_secs(20))
        .await;
    let row = job_row(&env, id).await;
    assert_eq!((row.attempt, row.claimed_by), (1, Some(node)), "{row:?}");

    let usurper = Uuid::new_v4();
    let taken = sqlx::query(
        "UPDATE jobs SET attempt = attempt + 1, claimed_by = $2,
                claim_expiry = now() + interval '1 minute'
         WHERE job_id = $1 AND attempt = 1 AND status = 'running'",
    )
    .bind(id)
    .bind(usurper)
    .execute(&env.pool)
    .await
    .expect("take the claim over");
    assert_eq!(taken.rows_affected(), 1);
    let taken_at = Instant::now();

    // The run is killed at the next renewal (every lease/3 = 1 s), well
    // before `sleep 4` would end: the node reports no running job.
    wait_for(
        "the worker to stop its stale run",
        Duration::from_millis(3300),
        || async {
            let running: Option<i64> = sqlx::query_scalar(
                "SELECT (stats->>'runningJobs')::bigint FROM nodes WHERE node_id = $1",
            )
            .bind(node)
            .fetch_one(&env.pool)
            .await
            .expect("node stats");
            (running == Some(0)).then_some(())
        },
    )
    .await;

    // Past the end of `sleep 4` and more: nothing of attempt 1 is written
    // and the newer claim stands.
    while taken_at.elapsed() < Duration::from_secs(6) {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("history");
        assert_eq!(
            rows, 0,
            "attempt 1 wrote a history row after losing its claim"
        );
        let row = job_row(&env, id).await;
        assert_eq!(row.status, "running", "{row:?}");
        assert_eq!(row.attempt, 2, "{row:?}");
        assert_eq!(row.claimed_by, Some(usurper), "{row:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    env.cleanup().await;
}

/// With one slot busy, queued higher-priority jobs start before lower ones
/// submitted earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_jobs_start_first() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let mut s = env.worker_settings("single", "default", "worker");
    s.worker.concurrency = 1;
    env.start_worker_with(s).await;

    let blocker = submit_ok(
        &api,
        &key,
        &json!({"jobName": "blocker", "command": "sleep 2", "priority": 5}),
    )
    .await;
    env.wait_status(blocker, "running", Duration::from_secs(20))
        .await;
    let mut low = Vec::new();
    for i in 0..3 {
        let body = json!({"jobName": format!("low {i}"), "command": "true", "priority": 1});
        low.push(submit_ok(&api, &key, &body).await);
    }
    let mut high = Vec::new();
    for i in 0..3 {
        let body = json!({"jobName": format!("high {i}"), "command": "true", "priority": 9});
        high.push(submit_ok(&api, &key, &body).await);
    }
    assert_eq!(
        job_row(&env, blocker).await.status,
        "running",
        "the blocker must still hold the only slot while the others are queued"
    );
    let mut started = Vec::new();
    for (prio, id) in low
        .iter()
        .map(|id| (1, *id))
        .chain(high.iter().map(|id| (9, *id)))
    {
        assert_eq!(
            env.wait_terminal(id, Duration::from_secs(30)).await,
            "succeeded"
        );
        let at = job_row(&env, id).await.started_at.expect("started_at");
        started.push((at, prio, id));
    }
    started.sort();
    let order: Vec<i32> = started.iter().map(|s| s.1).collect();
    assert_eq!(
        order,
        vec![9, 9, 9, 1, 1, 1],
        "every priority-9 job should start before every priority-1 job; by start time: {started:?}"
    );
    env.cleanup().await;
}

/// `GET /nodes` shows every live worker with its group, role, heartbeat and
/// stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_api_lists_live_workers() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("bob", &[Role::Debug]).await;
    let Three { a, b, c } = start_three(&mut env).await;
    let want = [
        (a, "a", "prod", "web"),
        (b, "b", "prod", "db"),
        (c, "c", "dev", "web"),
    ];

    // Wait for a couple of heartbeats with stats.
    let body = wait_for("heartbeats with stats", Duration::from_secs(10), || async {
        let (code, body) = get(&api, &key, "/nodes").await;
        assert_eq!(code, 200, "{body}");
        let nodes = nodes_by_id(&body);
        let ready = want.iter().all(|(id, ..)| {
            nodes.get(&id.to_string()).is_some_and(|n| {
                n["stats"]["rssBytes"].as_u64().unwrap_or(0) > 0
                    && n["stats"]["uptimeSeconds"].as_f64().unwrap_or(0.0) >= 2.0
            })
        });
        ready.then_some(body)
    })
    .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["count"], 3, "{body}");
    let nodes = nodes_by_id(&body);
    assert_eq!(nodes.len(), 3, "{body}");
    for (id, name, group, role) in want {
        let n = &nodes[&id.to_string()];
        assert_eq!(n["nodeName"], format!("{}-{name}", env.prefix), "{n}");
        assert_eq!(n["nodeGroup"], group, "{n}");
        assert_eq!(n["nodeRole"], role, "{n}");
        assert_eq!(n["isActive"], true, "{n}");
        assert_eq!(n["status"], "active", "{n}");
        let age = n["heartbeatAgeSeconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("heartbeatAgeSeconds: {n}"));
        assert!((0.0..5.0).contains(&age), "heartbeat age {age}: {n}");
        assert!(n["stats"]["rssBytes"].as_u64().unwrap_or(0) > 0, "{n}");
        let max = n["maxConcurrentTasks"]
            .as_u64()
            .unwrap_or_else(|| panic!("maxConcurrentTasks: {n}"));
        assert!(
            max >= env.settings.worker.concurrency as u64,
            "maxConcurrentTasks {max} below the worker's concurrency: {n}"
        );
        assert_eq!(n["runningJobs"], 0, "{n}");

        let (code, one) = get(&api, &key, &format!("/nodes/{id}")).await;
        assert_eq!(code, 200, "{one}");
        assert_eq!(one["nodeId"], json!(id), "{one}");
        assert_eq!(one["nodeGroup"], group, "{one}");
        assert_eq!(one["nodeRole"], role, "{one}");
    }
    let (code, body) = api
        .http
        .get(api.v1("/nodes"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .expect("request");
    assert_eq!(code, 401, "the nodes API needs a key {body:?}");
    env.cleanup().await;
}
