//! Task chains and parameters (README, "Chains and parameters") on the
//! real Postgres and RabbitMQ with an in-process api, worker and
//! scheduler: a chain of three tasks run in order with parameters, `on:
//! failed`, cycles refused naming the path, fan-in firing once, parameter
//! values checked on run-now, and `taskhost tasks run ID --param k=v`.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, call, get};
use uuid::Uuid;

use crate::tasks::taskhost;

async fn create(api: &Api, key: &str, body: Value) -> Uuid {
    let (status, resp) = call(api, Method::POST, key, "/tasks", Some(&body)).await;
    assert_eq!(status, 201, "POST /tasks {body} answered {resp}");
    resp["taskId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("taskId")
}

/// The jobs of a task, oldest first.
async fn jobs_of(env: &TestEnv, task: Uuid) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT job_id FROM jobs WHERE task_id = $1 ORDER BY submitted_at, job_id")
        .bind(task)
        .fetch_all(&env.pool)
        .await
        .expect("jobs of the task")
}

/// Waits until a task has `n` jobs; returns them, oldest first.
async fn wait_jobs(env: &TestEnv, task: Uuid, n: usize) -> Vec<Uuid> {
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let jobs = jobs_of(env, task).await;
        if jobs.len() >= n {
            return jobs;
        }
        assert!(
            Instant::now() < until,
            "task {task} has {} job(s), waited for {n}",
            jobs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a task now with parameter values; returns the job id.
async fn run_now(api: &Api, key: &str, task: Uuid, params: Value) -> Uuid {
    let body = json!({ "parameters": params });
    let (status, resp) = call(
        api,
        Method::POST,
        key,
        &format!("/tasks/{task}/run"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 202, "run now {body}: {resp}");
    resp["jobId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("jobId")
}

/// The job as `GET /jobs/{id}` shows it, after it ended.
async fn finished(env: &TestEnv, api: &Api, key: &str, job: Uuid) -> Value {
    env.wait_terminal(job, Duration::from_secs(40)).await;
    let (status, j) = get(api, key, &format!("/jobs/{job}")).await;
    assert_eq!(status, 200, "{j}");
    j
}

fn assert_invalid(status: u16, body: &Value, needle: &str) {
    assert_eq!(status, 422, "expected 422 naming `{needle}`: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "the message should contain `{needle}`: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_tasks_runs_in_order_with_parameters() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("c1", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let a = create(
        &api,
        &key,
        json!({"taskName": "extract", "schedule": "@yearly",
               "command": "echo \"A day=$TASKHOST_PARAM_DAY region=$TASKHOST_PARAM_REGION\"",
               "parameters": {
                   "day": {"type": "string", "default": "today"},
                   "region": {"type": "enum", "values": ["eu", "us"], "default": "eu"}}}),
    )
    .await;
    // B has no schedule of its own (disabled) and a required parameter
    // that its `after` edge gives; `day` comes from the upstream run.
    let b = create(
        &api,
        &key,
        json!({"taskName": "transform", "schedule": "@yearly", "enabled": false,
               "command": "echo \"B day=$TASKHOST_PARAM_DAY mode=$TASKHOST_PARAM_MODE\"",
               "parameters": {
                   "day": {"type": "string", "default": "unset"},
                   "mode": {"type": "enum", "values": ["fast", "slow"], "required": true}},
               "after": {"taskId": a, "on": "succeeded", "parameters": {"mode": "fast"}}}),
    )
    .await;
    let c = create(
        &api,
        &key,
        json!({"taskName": "load", "schedule": "@yearly", "enabled": false,
               "command": "echo \"C day=$TASKHOST_PARAM_DAY level=$TASKHOST_PARAM_LEVEL\"",
               "parameters": {
                   "day": {"type": "string"},
                   "level": {"type": "int", "default": 3}},
               "after": [{"taskId": b, "on": "finished"}]}),
    )
    .await;

    // The schedule view, the CLI and the task show the chain.
    let (status, s) = get(&api, &key, &format!("/tasks/{b}/schedule")).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["after"][0]["taskId"], json!(a), "{s}");
    assert_eq!(s["after"][0]["taskName"], "extract", "{s}");
    assert_eq!(s["after"][0]["on"], "succeeded", "{s}");
    assert_eq!(s["downstream"][0]["taskId"], json!(c), "{s}");
    assert_eq!(s["downstream"][0]["on"], "finished", "{s}");
    let (code, out, err) = taskhost(&[
        "tasks",
        "get",
        &b.to_string(),
        "--url",
        &api.base,
        "--key",
        &key,
    ])
    .await;
    assert_eq!(code, 0, "tasks get: {err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("after") && l.contains("extract") && l.contains("succeeded")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("then") && l.contains("load")),
        "{out}"
    );
    assert!(out.contains("mode:enum(fast|slow) required"), "{out}");

    // A runs now from the CLI with parameters.
    let (code, out, err) = taskhost(&[
        "tasks",
        "run",
        &a.to_string(),
        "--param",
        "day=2026-11-30",
        "--param",
        "region=us",
        "--url",
        &api.base,
        "--key",
        &key,
    ])
    .await;
    assert_eq!(code, 0, "tasks run --param: {err}");
    let job_a: Uuid = out.trim().parse().expect("the job id on stdout");

    let ja = finished(&env, &api, &key, job_a).await;
    assert_eq!(ja["status"], "succeeded", "{ja}");
    assert_eq!(ja["triggeredBy"], "manual", "{ja}");
    assert_eq!(
        ja["output"].as_str().unwrap_or_default().trim(),
        "A day=2026-11-30 region=us",
        "{ja}"
    );
    // Values are never put into the command text.
    assert_eq!(
        ja["command"],
        "echo \"A day=$TASKHOST_PARAM_DAY region=$TASKHOST_PARAM_REGION\""
    );

    let job_b = wait_jobs(&env, b, 1).await[0];
    let jb = finished(&env, &api, &key, job_b).await;
    assert_eq!(jb["status"], "succeeded", "{jb}");
    assert_eq!(jb["triggeredBy"], "dependency", "{jb}");
    assert_eq!(jb["upstreamJobId"], json!(job_a), "{jb}");
    assert_eq!(
        jb["output"].as_str().unwrap_or_default().trim(),
        "B day=2026-11-30 mode=fast",
        "{jb}"
    );

    let job_c = wait_jobs(&env, c, 1).await[0];
    let jc = finished(&env, &api, &key, job_c).await;
    assert_eq!(jc["status"], "succeeded", "{jc}");
    assert_eq!(jc["triggeredBy"], "dependency", "{jc}");
    assert_eq!(jc["upstreamJobId"], json!(job_b), "{jc}");
    assert_eq!(
        jc["output"].as_str().unwrap_or_default().trim(),
        "C day=2026-11-30 level=3",
        "{jc}"
    );

    // In order: each started after its upstream ended.
    let time = |j: &Value, f: &str| {
        j[f].as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .unwrap_or_else(|| panic!("{f} of {j}"))
    };
    assert!(time(&jb, "dateStarted") >= time(&ja, "dateCompleted"));
    assert!(time(&jc, "dateStarted") >= time(&jb, "dateCompleted"));
    // One run each, and the history says how it was triggered.
    assert_eq!(jobs_of(&env, b).await.len(), 1);
    assert_eq!(jobs_of(&env, c).await.len(), 1);
    let (status, h) = get(&api, &key, &format!("/tasks/{c}/history")).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["history"][0]["triggeredBy"], "dependency", "{h}");
    let (_, s) = get(&api, &key, &format!("/tasks/{c}/schedule")).await;
    assert_eq!(s["dependencyRuns"], 1, "{s}");
    assert_eq!(s["lastDependencyJobId"], json!(job_c), "{s}");
    assert_eq!(s["totalRuns"], 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failed_fires_only_when_the_upstream_fails() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("c2", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let a = create(
        &api,
        &key,
        json!({"taskName": "risky", "schedule": "@yearly",
               "command": "exit $TASKHOST_PARAM_CODE",
               "parameters": {"code": {"type": "int", "default": 0}}}),
    )
    .await;
    let alert = create(
        &api,
        &key,
        json!({"taskName": "alert", "schedule": "@yearly", "enabled": false,
               "command": "echo alert", "after": {"taskId": a, "on": "failed"}}),
    )
    .await;

    let ok = run_now(&api, &key, a, json!({})).await;
    assert_eq!(
        env.wait_terminal(ok, Duration::from_secs(40)).await,
        "succeeded"
    );
    // The downstream run is written with the upstream's end: none now.
    assert!(
        jobs_of(&env, alert).await.is_empty(),
        "a success fired `on: failed`"
    );

    let bad = run_now(&api, &key, a, json!({"code": "3"})).await;
    assert_eq!(
        env.wait_terminal(bad, Duration::from_secs(40)).await,
        "failed"
    );
    let fired = jobs_of(&env, alert).await;
    assert_eq!(fired.len(), 1, "one alert run for one failure");
    let j = finished(&env, &api, &key, fired[0]).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["upstreamJobId"], json!(bad), "{j}");
    assert_eq!(j["triggeredBy"], "dependency", "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_is_refused_naming_its_path() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let base = |name: &str| json!({"taskName": name, "schedule": "@yearly", "command": "true"});
    let a = create(&api, &key, base("a")).await;
    let mut body = base("b");
    body["after"] = json!({"taskId": a});
    let b = create(&api, &key, body).await;
    let mut body = base("c");
    body["after"] = json!([{"taskId": b, "on": "finished"}]);
    let c = create(&api, &key, body).await;

    let (status, resp) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{a}"),
        Some(&json!({"after": {"taskId": c}})),
    )
    .await;
    assert_invalid(status, &resp, "after: cycle: a -> b -> c -> a");
    let (status, resp) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{a}"),
        Some(&json!({"after": {"taskId": a}})),
    )
    .await;
    assert_invalid(status, &resp, "cycle: a -> a");
    // Nothing was stored.
    let (_, t) = get(&api, &key, &format!("/tasks/{a}")).await;
    assert_eq!(t["after"], json!([]), "{t}");

    // An upstream that does not exist, a bad `on`, the same upstream twice.
    let missing = Uuid::now_v7();
    for (after, needle) in [
        (json!({"taskId": missing}), "after: [0].taskId: no task"),
        (json!({"taskId": a, "on": "sometimes"}), "after: [0]"),
        (json!([{"taskId": a}, {"taskId": a}]), "[1].taskId"),
        (json!("a"), "after"),
    ] {
        let mut body = base("d");
        body["after"] = after;
        let (status, resp) = call(&api, Method::POST, &key, "/tasks", Some(&body)).await;
        assert_invalid(status, &resp, needle);
    }
    // A chain without a cycle is fine, and `[]` clears it.
    let (status, resp) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{c}"),
        Some(&json!({"after": [{"taskId": a}, {"taskId": b}]})),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{c}"),
        Some(&json!({"after": []})),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["after"], json!([]), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_fires_once_after_every_upstream_succeeded() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("c3", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let base = |name: &str| json!({"taskName": name, "schedule": "@yearly", "command": "echo up"});
    let u1 = create(&api, &key, base("u1")).await;
    let u2 = create(&api, &key, base("u2")).await;
    let mut body = base("join");
    body["after"] = json!([{"taskId": u1}, {"taskId": u2}]);
    body["enabled"] = json!(false);
    let join = create(&api, &key, body).await;

    // u1 twice: still waiting on u2.
    for _ in 0..2 {
        let j = run_now(&api, &key, u1, json!({})).await;
        assert_eq!(
            env.wait_terminal(j, Duration::from_secs(40)).await,
            "succeeded"
        );
    }
    assert!(jobs_of(&env, join).await.is_empty(), "fired before u2 ran");
    let (_, s) = get(&api, &key, &format!("/tasks/{join}/schedule")).await;
    assert_eq!(s["waitingOn"], json!([u2]), "{s}");

    let j2 = run_now(&api, &key, u2, json!({})).await;
    assert_eq!(
        env.wait_terminal(j2, Duration::from_secs(40)).await,
        "succeeded"
    );
    let fired = jobs_of(&env, join).await;
    assert_eq!(fired.len(), 1, "one run once both succeeded");
    let j = finished(&env, &api, &key, fired[0]).await;
    assert_eq!(j["upstreamJobId"], json!(j2), "{j}");
    let (_, s) = get(&api, &key, &format!("/tasks/{join}/schedule")).await;
    assert_eq!(
        s["waitingOn"],
        json!([u1, u2]),
        "the count starts again: {s}"
    );

    // Both at once: exactly one more run.
    let x = run_now(&api, &key, u1, json!({})).await;
    let y = run_now(&api, &key, u2, json!({})).await;
    env.wait_terminal(x, Duration::from_secs(40)).await;
    env.wait_terminal(y, Duration::from_secs(40)).await;
    let fired = jobs_of(&env, join).await;
    assert_eq!(fired.len(), 2, "{fired:?}");
    let up: Option<Uuid> = sqlx::query_scalar("SELECT upstream_job_id FROM jobs WHERE job_id = $1")
        .bind(fired[1])
        .fetch_one(&env.pool)
        .await
        .expect("job");
    assert!(up == Some(x) || up == Some(y), "{up:?}");
    env.wait_terminal(fired[1], Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_values_are_checked_and_named() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let t = create(
        &api,
        &key,
        json!({"taskName": "p", "schedule": "@yearly", "enabled": false, "command": "true",
               "parameters": {
                   "count": {"type": "int", "required": true},
                   "dry": {"type": "bool", "default": false},
                   "region": {"type": "enum", "values": ["eu", "us"], "default": "eu"}}}),
    )
    .await;
    for (params, needle) in [
        (json!({}), "parameters.count: required"),
        (
            json!({"count": "ten"}),
            "parameters.count: `ten` is not an integer",
        ),
        (json!({"count": 1, "dry": "yes"}), "parameters.dry"),
        (
            json!({"count": 1, "region": "mars"}),
            "parameters.region: `mars` is not one of eu, us",
        ),
        (
            json!({"count": 1, "nope": "x"}),
            "parameters.nope: unknown parameter",
        ),
    ] {
        let (status, resp) = call(
            &api,
            Method::POST,
            &key,
            &format!("/tasks/{t}/run"),
            Some(&json!({ "parameters": params })),
        )
        .await;
        assert_invalid(status, &resp, needle);
    }
    assert!(
        jobs_of(&env, t).await.is_empty(),
        "a refused run made a job"
    );

    // The CLI says the same and fails.
    let (code, _, err) = taskhost(&[
        "tasks",
        "run",
        &t.to_string(),
        "--param",
        "count=ten",
        "--url",
        &api.base,
        "--key",
        &key,
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("parameters.count"), "{err}");
    let (code, out, err) = taskhost(&[
        "tasks",
        "run",
        &t.to_string(),
        "-p",
        "count=7",
        "--url",
        &api.base,
        "--key",
        &key,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let job: Uuid = out.trim().parse().expect("job id");
    let envs: Value = sqlx::query_scalar("SELECT env FROM jobs WHERE job_id = $1")
        .bind(job)
        .fetch_one(&env.pool)
        .await
        .expect("job env");
    assert_eq!(
        envs,
        json!({"TASKHOST_PARAM_COUNT": "7", "TASKHOST_PARAM_DRY": "false", "TASKHOST_PARAM_REGION": "eu"})
    );

    // Definitions are checked too.
    for (params, needle) in [
        (json!({"1st": {"type": "string"}}), "parameters: `1st`"),
        (json!({"x": {"type": "float"}}), "parameters"),
        (json!({"x": {"type": "enum"}}), "an enum needs `values`"),
        (
            json!({"x": {"type": "int", "default": "many"}}),
            "`x`: default",
        ),
        (
            json!({"x": {"type": "int", "required": true}}),
            "`x` is required and has no default",
        ),
    ] {
        let body = json!({"taskName": "q", "schedule": "@yearly", "command": "true", "parameters": params});
        let (status, resp) = call(&api, Method::POST, &key, "/tasks", Some(&body)).await;
        assert_invalid(status, &resp, needle);
    }
    let body = json!({"taskName": "q", "schedule": "@yearly", "command": "true",
                      "environment": {"TASKHOST_PARAM_X": "1"}});
    let (status, resp) = call(&api, Method::POST, &key, "/tasks", Some(&body)).await;
    assert_invalid(status, &resp, "environment");
}

/// A run that ends without running is a final run too: cancelled while
/// queued, it fires an `on: finished` downstream (and not an `on:
/// succeeded` one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_before_it_starts_fires_on_finished() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let a = create(
        &api,
        &key,
        json!({"taskName": "never-runs", "schedule": "@yearly", "command": "true"}),
    )
    .await;
    let after_any = create(
        &api,
        &key,
        json!({"taskName": "cleanup", "schedule": "@yearly", "enabled": false,
               "command": "echo cleanup", "after": {"taskId": a, "on": "finished"}}),
    )
    .await;
    let after_ok = create(
        &api,
        &key,
        json!({"taskName": "report", "schedule": "@yearly", "enabled": false,
               "command": "echo report", "after": {"taskId": a, "on": "succeeded"}}),
    )
    .await;
    // No worker: the run waits in its queue, and is cancelled there.
    let queued = run_now(&api, &key, a, json!({})).await;
    env.wait_status(queued, "queued", Duration::from_secs(20))
        .await;
    let (status, body) = call(
        &api,
        Method::POST,
        &key,
        &format!("/jobs/{queued}/cancel"),
        None,
    )
    .await;
    assert!(status == 202 || status == 200, "{status} {body}");
    let fired = wait_jobs(&env, after_any, 1).await;
    let (_, job) = get(&api, &key, &format!("/jobs/{}", fired[0])).await;
    assert_eq!(job["triggeredBy"], "dependency", "{job}");
    assert_eq!(job["upstreamJobId"], json!(queued), "{job}");
    assert!(
        jobs_of(&env, after_ok).await.is_empty(),
        "a cancelled run fired `on: succeeded`"
    );
}

/// A fan-out run recorded dead at once (no node matches) is a final run
/// too: an `on: failed` downstream fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_dead_for_want_of_a_node_fires_on_failed() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let a = create(
        &api,
        &key,
        json!({"taskName": "everywhere", "schedule": "@yearly", "command": "true",
               "fanout": "all", "assignedNodeRole": "no-such-role"}),
    )
    .await;
    let alert = create(
        &api,
        &key,
        json!({"taskName": "alert", "schedule": "@yearly", "enabled": false,
               "command": "echo alert", "after": {"taskId": a, "on": "failed"}}),
    )
    .await;
    let dead = run_now(&api, &key, a, json!({})).await;
    assert_eq!(env.job_status(dead).await.as_deref(), Some("dead"));
    let fired = wait_jobs(&env, alert, 1).await;
    let (_, job) = get(&api, &key, &format!("/jobs/{}", fired[0])).await;
    assert_eq!(job["upstreamJobId"], json!(dead), "{job}");
    assert_eq!(job["triggeredBy"], "dependency", "{job}");
}
