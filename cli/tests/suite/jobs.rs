//! The job life cycle as users and other systems see it, end to end on the
//! real local Postgres and RabbitMQ: failures, timeouts, cancel, roles,
//! isolation between users, bad input, idempotency, queue ingress, a broker
//! outage at submit time, a worker killed mid-job, events, the change log,
//! inline diagnostics, the output cap and the results listing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use taskhost_common::amqp;
use taskhost_common::changelog;
use taskhost_common::messages::{JOB_SUBMIT_V1, REASON_HEADER};
use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, Api, ChildGuard, TestEnv, get, job_id, submit};
use uuid::Uuid;

const TERMINAL: &[&str] = &["succeeded", "failed", "timed_out", "cancelled", "dead"];

// ---------------------------------------------------------------- helpers

/// Sends a request with a key and returns `(status, JSON body or Null)`.
async fn call(api: &Api, method: reqwest::Method, key: &str, path: &str) -> (u16, Value) {
    taskhost_testkit::call(api, method, key, path, None).await
}

async fn post(api: &Api, key: &str, path: &str) -> (u16, Value) {
    call(api, reqwest::Method::POST, key, path).await
}

async fn delete(api: &Api, key: &str, path: &str) -> (u16, Value) {
    call(api, reqwest::Method::DELETE, key, path).await
}

/// POSTs raw bytes to `/jobs/submit`, optionally with an `Idempotency-Key`.
async fn submit_raw(
    api: &Api,
    key: &str,
    body: &[u8],
    idempotency_key: Option<&str>,
) -> (u16, Value) {
    let mut req = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.expect("submit request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Submits and asserts 202; returns the job id.
async fn submit_ok(api: &Api, key: &str, body: Value) -> Uuid {
    let (status, resp) = submit(api, key, &body).await;
    assert_eq!(status, 202, "submit {body} answered {resp}");
    assert_eq!(resp["success"], true, "{resp}");
    job_id(&resp)
}

async fn job_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count jobs")
}

async fn job_field<T>(env: &TestEnv, id: Uuid, sql: &'static str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("job field")
}

/// The `state` of every final history row of a job.
async fn final_states(env: &TestEnv, id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT state FROM task_history WHERE job_id = $1 AND is_final")
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .expect("history rows")
}

fn node_name(env: &TestEnv, short: &str) -> String {
    format!("{}-{short}", env.prefix)
}

/// Asserts an error answer: the status, `success: false` and the code.
fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["success"], false, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
    assert!(
        body["error"]["message"].is_string(),
        "{what}: error.message missing: {body}"
    );
}

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A dead-lettered message as read back from `<p>.dead`.
#[derive(Debug, Clone)]
pub(crate) struct DeadMsg {
    pub(crate) message_id: String,
    pub(crate) reason: Option<String>,
    pub(crate) body: Vec<u8>,
}

fn reason_of(headers: Option<&FieldTable>) -> Option<String> {
    headers?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == REASON_HEADER)
        .map(|(_, v)| match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => format!("{other:?}"),
        })
}

/// Polls `<p>.dead` until a message with `message_id` arrives; messages for
/// other ids are kept in `seen` for later calls.
pub(crate) async fn wait_dead(
    env: &TestEnv,
    seen: &mut Vec<DeadMsg>,
    message_id: &str,
    within: Duration,
) -> DeadMsg {
    let deadline = Instant::now() + within;
    loop {
        if let Some(m) = seen.iter().find(|m| m.message_id == message_id) {
            return m.clone();
        }
        match env.get_one(&env.names().dead()).await {
            Some(msg) => seen.push(DeadMsg {
                message_id: msg
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                reason: reason_of(msg.properties.headers().as_ref()),
                body: msg.data.clone(),
            }),
            None => {
                assert!(
                    Instant::now() < deadline,
                    "no dead-lettered message with id {message_id} within {within:?}; saw {seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    }
}

/// Pids of live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            text.contains(needle)
                .then(|| (e.file_name().to_string_lossy().into_owned(), text))
        })
        .collect()
}

/// A temporary queue bound to `<p>.events` with `job.#`.
async fn events_queue(env: &TestEnv) -> (lapin::Connection, lapin::Channel, String) {
    let conn = amqp::connect(AMQP_URL, "jobs-test-events")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    amqp::declare_topology(&ch, &env.names())
        .await
        .expect("topology");
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    ch.queue_bind(
        queue.name().clone(),
        env.names().events().into(),
        "job.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    (conn, ch, queue.name().to_string())
}

/// Reads events from `queue` until one for `job` with routing key `rk`
/// arrives or `within` passes; every event read is appended to `seen`.
async fn wait_event(
    ch: &lapin::Channel,
    queue: &str,
    seen: &mut Vec<(String, Value)>,
    job: Uuid,
    rk: &str,
    within: Duration,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some((_, body)) = seen
            .iter()
            .find(|(k, b)| k == rk && b["jobId"] == job.to_string())
        {
            return Some(body.clone());
        }
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            // A `job.events.v1` message carries a batch of events of one
            // status, each with its own id.
            Some(msg) => {
                assert_eq!(
                    msg.properties.kind().as_ref().map(|t| t.as_str()),
                    Some("job.events.v1")
                );
                let batch: Value = serde_json::from_slice(&msg.data).unwrap_or(Value::Null);
                for event in batch["events"].as_array().cloned().unwrap_or_default() {
                    let status = event["status"].as_str().unwrap_or_default().to_owned();
                    assert_eq!(msg.routing_key.as_str(), format!("job.{status}"));
                    assert_eq!(
                        event["eventId"],
                        format!(
                            "{}:{}:{status}",
                            event["jobId"].as_str().unwrap_or_default(),
                            event["attempt"]
                        )
                    );
                    seen.push((msg.routing_key.to_string(), event));
                }
            }
            None if Instant::now() >= deadline => return None,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_is_failed_with_exit_code_and_both_streams() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let node = env.wait_node(&node_name(&env, "w1")).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let command = "echo out; echo boom >&2; exit 7";
    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "fails", "command": command, "description": "exits with 7"}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "failed"
    );

    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["exitCode"], 7, "{job}");
    assert_eq!(job["success"], false, "{job}");
    let output = job["output"].as_str().unwrap_or_default();
    assert!(output.contains("out"), "stdout missing from output: {job}");
    assert!(output.contains("boom"), "stderr missing from output: {job}");

    let (status, res) = get(&api, &key, "/jobs/results").await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["success"], true, "{res}");
    assert_eq!(res["count"], 1, "{res}");
    let entry = &res["results"][0];
    for field in [
        "jobId",
        "jobName",
        "command",
        "description",
        "executionMode",
        "status",
        "success",
        "exitCode",
        "dateStarted",
        "dateCompleted",
        "runtime",
        "output",
        "nodeId",
    ] {
        assert!(
            entry.get(field).is_some_and(|v| !v.is_null()),
            "results entry has no `{field}`: {entry}"
        );
    }
    assert_eq!(entry["jobId"], id.to_string(), "{entry}");
    assert_eq!(entry["jobName"], "fails", "{entry}");
    assert_eq!(entry["command"], command, "{entry}");
    assert_eq!(entry["description"], "exits with 7", "{entry}");
    assert_eq!(entry["executionMode"], "pool", "{entry}");
    assert_eq!(entry["status"], "failed", "{entry}");
    assert_eq!(entry["success"], false, "{entry}");
    assert_eq!(entry["exitCode"], 7, "{entry}");
    assert_eq!(entry["nodeId"], node.to_string(), "{entry}");
    assert!(
        entry["runtime"].as_f64().is_some_and(|r| r >= 0.0),
        "{entry}"
    );
    // A results entry previews stdout in `output` and stderr in `error`
    // (each once; GET /jobs/{id} keeps stdout then stderr in `output`).
    assert_eq!(entry["output"], "out\n", "{entry}");
    assert_eq!(entry["error"], "boom\n", "{entry}");
    assert_eq!(entry["outputBytes"], 4, "{entry}");
    assert_eq!(entry["errorBytes"], 5, "{entry}");
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(entry["dateStarted"].clone()).expect("dateStarted is a timestamp");
    let completed: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(entry["dateCompleted"].clone())
            .expect("dateCompleted is a timestamp");
    assert!(started <= completed, "{entry}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_group() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let digits = format!("{:012}", Uuid::new_v4().as_u128() % 1_000_000_000_000);
    let marker = format!("4321.{digits}");
    let command = format!("sleep {marker} & sleep {marker}; echo never");
    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "slow", "command": command, "timeoutSeconds": 1}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "timed_out"
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "timed_out", "{job}");
    assert_eq!(job["success"], false, "{job}");
    assert!(
        !job["output"].as_str().unwrap_or_default().contains("never"),
        "{job}"
    );

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the timed-out job are still alive: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs_and_refuses_finished_ones() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    // Queued, no worker: it ends at once.
    let queued = submit_ok(&api, &key, json!({"jobName": "q", "command": "sleep 30"})).await;
    env.wait_status(queued, "queued", Duration::from_secs(10))
        .await;
    let (status, body) = post(&api, &key, &format!("/jobs/{queued}/cancel")).await;
    assert_eq!(status, 202, "{body}");
    let now: String = job_field(&env, queued, "SELECT status FROM jobs WHERE job_id = $1").await;
    assert_eq!(now, "cancelled", "a queued job is cancelled immediately");
    assert_eq!(
        final_states(&env, queued).await,
        vec!["cancelled".to_owned()]
    );

    // Running: the worker kills it.
    env.start_worker("w1", "default", "worker").await;
    let running = submit_ok(&api, &key, json!({"jobName": "r", "command": "sleep 30"})).await;
    env.wait_status(running, "running", Duration::from_secs(20))
        .await;
    let (status, body) = post(&api, &key, &format!("/jobs/{running}/cancel")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        env.wait_terminal(running, Duration::from_secs(10)).await,
        "cancelled"
    );
    assert_eq!(
        final_states(&env, running).await,
        vec!["cancelled".to_owned()]
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{running}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["success"], false, "{job}");

    // Finished: 409, and nothing changes.
    let done = submit_ok(&api, &key, json!({"jobName": "d", "command": "true"})).await;
    assert_eq!(
        env.wait_terminal(done, Duration::from_secs(20)).await,
        "succeeded"
    );
    for id in [done, running, queued] {
        let (status, body) = post(&api, &key, &format!("/jobs/{id}/cancel")).await;
        assert_error(status, &body, 409, "conflict", "cancel of a finished job");
    }
    let st: String = job_field(&env, done, "SELECT status FROM jobs WHERE job_id = $1").await;
    assert_eq!(st, "succeeded");

    // The cancelled queued job's message reached the worker by now and was
    // dropped without running.
    let st: String = job_field(&env, queued, "SELECT status FROM jobs WHERE job_id = $1").await;
    assert_eq!(st, "cancelled");
    assert_eq!(env.final_history_rows(queued).await, 1);
    let attempt: i32 = job_field(&env, queued, "SELECT attempt FROM jobs WHERE job_id = $1").await;
    assert_eq!(attempt, 0, "a job cancelled before it started never ran");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_modes_follow_the_role_matrix() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let cases: Vec<(&str, Vec<Role>)> = vec![
        ("debug", vec![Role::Debug]),
        ("task_manager", vec![Role::TaskManager]),
        ("system_admin", vec![Role::SystemAdmin]),
        ("site_admin", vec![Role::SiteAdmin]),
        ("none", vec![]),
    ];
    let mut keys = Vec::new();
    for (label, roles) in &cases {
        keys.push((*label, env.key(&format!("user-{label}"), roles).await));
    }
    let mut wrong = Vec::new();
    let mut accepted = 0;
    for (label, key) in &keys {
        for mode in ["pool", "background", "inline"] {
            let command = if mode == "inline" { "noop" } else { "true" };
            let want = match (*label, mode) {
                ("none", _) => 403,
                ("debug", _) => 202,
                (_, "inline") => 403,
                _ => 202,
            };
            let (status, body) = submit(
                &api,
                key,
                &json!({"jobName": "m", "command": command, "executionMode": mode}),
            )
            .await;
            if status != want {
                wrong.push(format!(
                    "{label} × {mode}: want {want}, got {status} {body}"
                ));
            } else if status == 202 {
                accepted += 1;
                if body["executionMode"] != mode {
                    wrong.push(format!(
                        "{label} × {mode}: executionMode {}",
                        body["executionMode"]
                    ));
                }
            } else if body["error"]["code"] != "forbidden" {
                wrong.push(format!(
                    "{label} × {mode}: 403 without code forbidden: {body}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "role matrix mismatches:\n{}",
        wrong.join("\n")
    );

    // The seed names are aliases.
    let debug = &keys[0].1;
    for (alias, canonical, command) in [
        ("Runspace", "pool", "true"),
        ("BackgroundJob", "background", "true"),
        ("MainLoop", "inline", "noop"),
    ] {
        let (status, body) = submit(
            &api,
            debug,
            &json!({"jobName": "alias", "command": command, "executionMode": alias}),
        )
        .await;
        assert_eq!(status, 202, "{alias}: {body}");
        assert_eq!(body["executionMode"], canonical, "{alias}: {body}");
        let mode: String = job_field(
            &env,
            job_id(&body),
            "SELECT execution_mode FROM jobs WHERE job_id = $1",
        )
        .await;
        assert_eq!(mode, canonical);
        accepted += 1;
    }
    // The alias does not bypass the role check.
    let task_manager = &keys[1].1;
    let (status, body) = submit(
        &api,
        task_manager,
        &json!({"jobName": "alias", "command": "noop", "executionMode": "MainLoop"}),
    )
    .await;
    assert_error(status, &body, 403, "forbidden", "MainLoop for task_manager");
    assert_eq!(
        job_count(&env).await,
        accepted,
        "refused submissions must not create jobs"
    );

    for (label, key) in &keys {
        let (status, body) = get(&api, key, "/jobs/results").await;
        assert_eq!(status, 200, "results with the {label} key: {body}");
        assert_eq!(body["success"], true, "{body}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_see_or_touch_each_others_jobs() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;

    let a1 = submit_ok(&api, &alice, json!({"jobName": "a1", "command": "echo a1"})).await;
    let a2 = submit_ok(&api, &alice, json!({"jobName": "a2", "command": "echo a2"})).await;
    assert_eq!(
        env.wait_terminal(a1, Duration::from_secs(20)).await,
        "succeeded"
    );
    assert_eq!(
        env.wait_terminal(a2, Duration::from_secs(20)).await,
        "succeeded"
    );

    let random = Uuid::new_v4().to_string();
    let malformed = "not-a-uuid".to_owned();
    type Probe = (&'static str, reqwest::Method, fn(&str) -> String);
    let probes: [Probe; 4] = [
        ("GET /jobs/{id}", reqwest::Method::GET, |id| {
            format!("/jobs/{id}")
        }),
        ("DELETE /jobs/{id}", reqwest::Method::DELETE, |id| {
            format!("/jobs/{id}")
        }),
        (
            "DELETE /jobs/results?jobId=",
            reqwest::Method::DELETE,
            |id| format!("/jobs/results?jobId={id}"),
        ),
        ("POST /jobs/{id}/cancel", reqwest::Method::POST, |id| {
            format!("/jobs/{id}/cancel")
        }),
    ];
    for (what, method, path) in &probes {
        let (st_a, body_a) = call(&api, method.clone(), &bob, &path(&a1.to_string())).await;
        let (st_r, body_r) = call(&api, method.clone(), &bob, &path(&random)).await;
        let (st_m, body_m) = call(&api, method.clone(), &bob, &path(&malformed)).await;
        assert_error(
            st_a,
            &body_a,
            404,
            "not_found",
            &format!("bob: {what} on alice's job"),
        );
        assert_error(
            st_r,
            &body_r,
            404,
            "not_found",
            &format!("bob: {what} on a random id"),
        );
        assert_error(
            st_m,
            &body_m,
            404,
            "not_found",
            &format!("bob: {what} on a malformed id"),
        );
        assert_eq!(
            body_a, body_r,
            "{what}: another user's job must look like a missing one"
        );
    }
    let (status, res) = get(&api, &bob, "/jobs/results").await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["count"], 0, "bob sees alice's results: {res}");

    // A running job: bob cannot stop it; alice cannot delete it before it
    // ends; an admin may cancel it.
    let a3 = submit_ok(
        &api,
        &alice,
        json!({"jobName": "a3", "command": "sleep 30"}),
    )
    .await;
    env.wait_status(a3, "running", Duration::from_secs(20))
        .await;
    let (status, body) = post(&api, &bob, &format!("/jobs/{a3}/cancel")).await;
    assert_error(
        status,
        &body,
        404,
        "not_found",
        "bob cancels alice's running job",
    );
    let (status, body) = delete(&api, &alice, &format!("/jobs/{a3}")).await;
    assert_error(status, &body, 409, "conflict", "deleting a running job");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st: String = job_field(&env, a3, "SELECT status FROM jobs WHERE job_id = $1").await;
    assert_eq!(st, "running", "bob's refused cancel must not stop the job");
    let root = env.key("root", &[Role::SystemAdmin]).await;
    let (status, body) = post(&api, &root, &format!("/jobs/{a3}/cancel")).await;
    assert_eq!(status, 202, "an admin may cancel any job: {body}");
    assert_eq!(
        env.wait_terminal(a3, Duration::from_secs(10)).await,
        "cancelled"
    );
    let (status, body) = delete(&api, &alice, &format!("/jobs/{a3}")).await;
    assert_eq!(status, 200, "{body}");

    // Alice's jobs are untouched.
    for id in [a1, a2] {
        let (status, job) = get(&api, &alice, &format!("/jobs/{id}")).await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["status"], "succeeded", "{job}");
    }

    // Alice deletes her own results, both ways.
    let (status, body) = delete(&api, &alice, &format!("/jobs/{a1}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = delete(&api, &alice, &format!("/jobs/results?jobId={a2}")).await;
    assert_eq!(status, 200, "{body}");
    for id in [a1, a2] {
        let (status, body) = get(&api, &alice, &format!("/jobs/{id}")).await;
        assert_error(status, &body, 404, "not_found", "deleted job");
        let (status, body) = delete(&api, &alice, &format!("/jobs/{id}")).await;
        assert_error(status, &body, 404, "not_found", "deleting twice");
        let deletes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM data_change
             WHERE table_name = 'jobs' AND record_id = $1 AND action = 'DELETE' AND changed_by = 'alice'",
        )
        .bind(id.to_string())
        .fetch_one(&env.pool)
        .await
        .expect("data_change");
        assert_eq!(deletes, 1, "a DELETE change row for {id}");
    }
    let (_, res) = get(&api, &alice, "/jobs/results").await;
    assert_eq!(res["count"], 0, "{res}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_without_creating_jobs() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (status, body) = submit_raw(
        &api,
        &key,
        br#"{"jobName":"x","command":"true","bogus":1}"#,
        None,
    )
    .await;
    assert_error(status, &body, 422, "invalid", "unknown field");
    assert!(error_message(&body).contains("bogus"), "{body}");

    let (status, body) = submit_raw(&api, &key, b"this is not json", None).await;
    assert_error(status, &body, 400, "bad_request", "not JSON");

    for (what, request, field) in [
        (
            "empty command",
            json!({"jobName": "x", "command": ""}),
            "command",
        ),
        (
            "bad target group",
            json!({"jobName": "x", "command": "true", "target": {"nodeGroup": "Bad Group"}}),
            "nodeGroup",
        ),
        (
            "priority 10",
            json!({"jobName": "x", "command": "true", "priority": 10}),
            "priority",
        ),
        (
            "timeoutSeconds 0",
            json!({"jobName": "x", "command": "true", "timeoutSeconds": 0}),
            "timeoutSeconds",
        ),
    ] {
        let (status, body) = submit(&api, &key, &request).await;
        assert_error(status, &body, 422, "invalid", what);
        assert!(
            error_message(&body).contains(field),
            "{what}: message should name {field}: {body}"
        );
    }

    let big = json!({"jobName": "big", "command": "x".repeat(300_000)});
    let (status, body) = submit(&api, &key, &big).await;
    assert_error(status, &body, 413, "too_large", "body over 262144 bytes");
    let too_large = body;

    assert_eq!(
        job_count(&env).await,
        0,
        "refused requests created job rows"
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&env.pool)
        .await
        .expect("count outbox");
    assert_eq!(outbox, 0);
    // Last, after cleanup, so the checks above run whatever the wording
    // and a failure leaves nothing behind.
    env.cleanup().await;
    assert!(
        error_message(&too_large).contains("262144"),
        "the 413 message should state the real limit (262144 bytes): {too_large}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_repeats_return_the_same_job() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let idem = format!("order-{}", Uuid::new_v4());
    let body = br#"{"jobName":"idem","command":"echo once"}"#;

    let (s1, b1) = submit_raw(&api, &alice, body, Some(&idem)).await;
    let (s2, b2) = submit_raw(&api, &alice, body, Some(&idem)).await;
    assert_eq!(s1, 202, "{b1}");
    assert_eq!(s2, 202, "{b2}");
    assert_eq!(
        job_id(&b1),
        job_id(&b2),
        "a repeat must answer the same job"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = $1")
        .bind(&idem)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);

    let other = br#"{"jobName":"idem","command":"echo twice"}"#;
    let (status, resp) = submit_raw(&api, &alice, other, Some(&idem)).await;
    assert_error(status, &resp, 409, "conflict", "same key, different body");
    assert_eq!(job_count(&env).await, 1);

    // Retries racing each other still make one job.
    let raced = format!("race-{}", Uuid::new_v4());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (http, url, key, raced) = (
            api.http.clone(),
            api.v1("/jobs/submit"),
            alice.clone(),
            raced.clone(),
        );
        set.spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .header("Idempotency-Key", raced)
                .body(r#"{"jobName":"race","command":"echo race"}"#)
                .send()
                .await
                .expect("submit");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(joined) = set.join_next().await {
        let (status, body) = joined.expect("task");
        assert_eq!(status, 202, "concurrent repeat: {body}");
        ids.insert(job_id(&body));
    }
    assert_eq!(
        ids.len(),
        1,
        "concurrent repeats answered different jobs: {ids:?}"
    );
    assert_eq!(job_count(&env).await, 2);

    // The key belongs to its user: another user's identical request is a new job.
    let (status, resp) = submit_raw(&api, &bob, body, Some(&idem)).await;
    assert_eq!(status, 202, "{resp}");
    assert_ne!(job_id(&resp), job_id(&b1));
    assert_eq!(job_count(&env).await, 3);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_queue_accepts_dead_letters_and_deduplicates() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let names = env.names();
    let mut dead = Vec::new();

    // Garbage is dead-lettered with a reason.
    let bad_id = Uuid::new_v4().to_string();
    env.publish_raw(
        &names.submit(),
        "submit",
        b"\xff not json",
        Some(JOB_SUBMIT_V1),
        Some(&bad_id),
    )
    .await;
    let msg = wait_dead(&env, &mut dead, &bad_id, Duration::from_secs(15)).await;
    assert!(
        msg.reason.as_deref().is_some_and(|r| !r.is_empty()),
        "dead letter without {REASON_HEADER}: {msg:?}"
    );
    assert_eq!(msg.body, b"\xff not json");

    // A valid message becomes a job with the message id as its id.
    let id = Uuid::new_v4();
    let body = br#"{"userId":"alice","jobName":"q","command":"echo from-queue"}"#;
    env.publish_raw(
        &names.submit(),
        "submit",
        body,
        Some(JOB_SUBMIT_V1),
        Some(&id.to_string()),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (status, job) = get(&api, &alice, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["output"], "from-queue\n", "{job}");
    let by: String = job_field(&env, id, "SELECT triggered_by FROM jobs WHERE job_id = $1").await;
    assert_eq!(by, "queue");
    let by: String = job_field(
        &env,
        id,
        "SELECT triggered_by FROM task_history WHERE job_id = $1 AND is_final",
    )
    .await;
    assert_eq!(by, "queue");

    // The same message again is a duplicate. The unknown-user message after
    // it is a barrier: the consumer handles messages in order.
    env.publish_raw(
        &names.submit(),
        "submit",
        body,
        Some(JOB_SUBMIT_V1),
        Some(&id.to_string()),
    )
    .await;
    let stranger_id = Uuid::new_v4().to_string();
    env.publish_raw(
        &names.submit(),
        "submit",
        br#"{"userId":"nobody-here","jobName":"x","command":"true"}"#,
        Some(JOB_SUBMIT_V1),
        Some(&stranger_id),
    )
    .await;
    let msg = wait_dead(&env, &mut dead, &stranger_id, Duration::from_secs(15)).await;
    let reason = msg.reason.unwrap_or_default();
    assert!(
        reason.contains("nobody-here"),
        "reason should name the user: {reason:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        job_count(&env).await,
        1,
        "a repeated message_id created another job"
    );
    assert_eq!(
        env.final_history_rows(id).await,
        1,
        "a repeated message_id ran the job again"
    );
    assert!(
        !dead.iter().any(|m| m.message_id == id.to_string()),
        "a duplicate is not an error: {dead:?}"
    );

    // Publishing straight to the queue through the default exchange works too.
    let id2 = Uuid::new_v4();
    env.publish_raw(
        "",
        &names.submit(),
        br#"{"userId":"alice","jobName":"q2","command":"echo via-default"}"#,
        Some(JOB_SUBMIT_V1),
        Some(&id2.to_string()),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id2, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (_, job) = get(&api, &alice, &format!("/jobs/{id2}")).await;
    assert_eq!(job["output"], "via-default\n", "{job}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_while_the_broker_is_down_is_relayed_later() {
    let mut env = TestEnv::new().await;
    let mut broken = env.settings.clone();
    broken.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let api = env.start_api_with(broken).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let started = Instant::now();
    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "later", "command": "echo relayed"}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "submit hung on the broker"
    );
    let status: String = job_field(&env, id, "SELECT status FROM jobs WHERE job_id = $1").await;
    assert_eq!(status, "pending");
    let unpublished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE job_id = $1 AND published_at IS NULL",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("outbox");
    assert_eq!(unpublished, 1);

    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["output"], "relayed\n", "{job}");
    let unpublished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE job_id = $1 AND published_at IS NULL",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("outbox");
    assert_eq!(unpublished, 0);
    env.cleanup().await;
}

/// A worker usually takes a job before the api marks its publish (0.1 s
/// after the broker's confirm) and claims it straight from `pending`; the
/// mark must then still record the outbox row as published (or a relay
/// would publish it again) and never move the job back. No scheduler runs
/// here, so no relay can be what marked the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_before_its_publish_is_marked_runs_once_and_its_outbox_row_is_marked() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let mut ids = Vec::new();
    for n in 0..20 {
        let body = json!({"jobName": format!("quick-{n}"), "command": format!("echo quick-{n}")});
        ids.push(submit_ok(&api, &key, body).await);
    }
    for &id in &ids {
        assert_eq!(
            env.wait_terminal(id, Duration::from_secs(20)).await,
            "succeeded"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let unpublished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE job_id = ANY($1) AND published_at IS NULL",
        )
        .bind(&ids)
        .fetch_one(&env.pool)
        .await
        .expect("outbox");
        if unpublished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unpublished} outbox rows of finished jobs still unpublished after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut conn = env.pool.acquire().await.expect("connection");
    let changes = changelog::read_since(&mut conn, Some("jobs"), 0, 1000)
        .await
        .expect("read changes");
    drop(conn);
    for &id in &ids {
        let statuses: Vec<String> = changes
            .iter()
            .filter(|c| c.record_id == id.to_string() && c.action == "UPDATE")
            .filter_map(|c| c.new_data.as_ref()?["status"].as_str().map(str::to_owned))
            .collect();
        assert!(
            statuses == ["running", "succeeded"] || statuses == ["queued", "running", "succeeded"],
            "job {id} moved {statuses:?}"
        );
        let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("history");
        assert_eq!(runs, 1, "job {id}: one history row");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_of_a_killed_worker_is_finished_by_another() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let victim_name = node_name(&env, "victim");
    let mut victim = ChildGuard(env.spawn_binary(
        env!("CARGO_BIN_EXE_taskhost"),
        &["worker", "--node-name", &victim_name, "--concurrency", "2"],
        &[("TASKHOST__LOG__LEVEL", "warn")],
    ));
    let victim_id = env.wait_node(&victim_name).await;

    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "survivor", "command": "sleep 3; echo done"}),
    )
    .await;
    env.wait_running_on(id, victim_id).await;
    victim.0.kill().expect("SIGKILL the victim");
    victim.0.wait().expect("reap the victim");

    env.start_worker("rescuer", "default", "worker").await;
    let rescuer_id = env.wait_node(&node_name(&env, "rescuer")).await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(40)).await,
        "succeeded"
    );
    let (by, attempt): (Option<Uuid>, i32) =
        sqlx::query_as("SELECT claimed_by, attempt FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("job");
    assert_eq!(
        by,
        Some(rescuer_id),
        "the rescuer should own the finished job"
    );
    assert!(attempt >= 2, "attempt {attempt}");
    assert_eq!(env.final_history_rows(id).await, 1);
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["nodeId"], rescuer_id.to_string(), "{job}");
    assert_eq!(job["output"], "done\n", "{job}");

    // The scheduler notices the dead node.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: bool = sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_id = $1")
            .bind(victim_id)
            .fetch_one(&env.pool)
            .await
            .expect("node");
        if !active {
            break;
        }
        assert!(Instant::now() < deadline, "the killed node is still active");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(victim);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_state_changes_are_published_as_events() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (conn, ch, queue) = events_queue(&env).await;

    let id = submit_ok(&api, &key, json!({"jobName": "ev", "command": "echo ev"})).await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );

    let mut seen = Vec::new();
    let succeeded = wait_event(
        &ch,
        &queue,
        &mut seen,
        id,
        "job.succeeded",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        succeeded.is_some(),
        "no job.succeeded event for {id}; saw {seen:?}"
    );
    let running = wait_event(
        &ch,
        &queue,
        &mut seen,
        id,
        "job.running",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        running.is_some(),
        "no job.running event for {id}; saw {seen:?}"
    );
    let event = succeeded.unwrap_or_default();
    assert_eq!(event["status"], "succeeded", "{event}");
    assert_eq!(event["exitCode"], 0, "{event}");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

/// `job.<status>` events on every job state change, not only the ones a
/// worker makes (README, "Submitting over RabbitMQ"; docs/asyncapi.json).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_side_state_changes_are_published_as_events_too() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (conn, ch, queue) = events_queue(&env).await;
    let mut seen = Vec::new();

    // No worker: the job is queued, then cancelled by the api.
    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "never-runs", "command": "true"}),
    )
    .await;
    env.wait_status(id, "queued", Duration::from_secs(10)).await;
    let (status, body) = post(&api, &key, &format!("/jobs/{id}/cancel")).await;
    assert_eq!(status, 202, "{body}");
    let cancelled = wait_event(
        &ch,
        &queue,
        &mut seen,
        id,
        "job.cancelled",
        Duration::from_secs(5),
    )
    .await;
    let queued = wait_event(
        &ch,
        &queue,
        &mut seen,
        id,
        "job.queued",
        Duration::from_secs(1),
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
    assert!(
        cancelled.is_some(),
        "no job.cancelled event for a job cancelled while queued; events seen: {seen:?}"
    );
    assert!(
        queued.is_some(),
        "no job.queued event when the job was queued; events seen: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_change_is_in_the_change_log() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    // No worker yet, so the job is visibly queued before it runs.
    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "logged", "command": "echo logged"}),
    )
    .await;
    env.wait_status(id, "queued", Duration::from_secs(10)).await;
    env.start_worker("w1", "default", "worker").await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );

    let mut conn = env.pool.acquire().await.expect("connection");
    let changes = changelog::read_since(&mut conn, Some("jobs"), 0, 1000)
        .await
        .expect("read changes");
    drop(conn);
    let mine: Vec<_> = changes
        .iter()
        .filter(|c| c.record_id == id.to_string())
        .collect();
    assert_eq!(
        mine.iter().filter(|c| c.action == "INSERT").count(),
        1,
        "one INSERT: {mine:?}"
    );
    let statuses: BTreeSet<String> = mine
        .iter()
        .filter(|c| c.action == "UPDATE")
        .filter_map(|c| c.new_data.as_ref()?["status"].as_str().map(str::to_owned))
        .collect();
    for want in ["queued", "running", "succeeded"] {
        assert!(
            statuses.contains(want),
            "no UPDATE to {want}; saw {statuses:?}"
        );
    }
    let insert = mine.iter().find(|c| c.action == "INSERT").expect("insert");
    let row = insert.new_data.clone().unwrap_or_default();
    assert_eq!(row["job_id"], id.to_string(), "INSERT new_data: {row}");
    assert_eq!(row["status"], "pending", "INSERT new_data: {row}");
    assert_eq!(row["command"], "echo logged", "INSERT new_data: {row}");

    let (status, body) = get(&api, &admin, "/changes?table=jobs&limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let entries: Vec<&Value> = body["changes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["recordId"] == id.to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        entries.len() >= 4,
        "change feed entries for the job: {entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|c| c["newData"]["status"] == "succeeded"),
        "decoded newData in the feed: {entries:?}"
    );
    let (status, body) = get(&api, &key, "/changes?table=jobs").await;
    assert_error(
        status,
        &body,
        403,
        "forbidden",
        "change feed for task_manager",
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_diagnostics_reports_the_worker_process() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("dev", &[Role::Debug]).await;

    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "diag", "command": "diagnostics", "executionMode": "inline"}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["executionMode"], "inline", "{job}");
    let report: Value = serde_json::from_str(job["output"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("diagnostics output is not JSON ({e}): {job}"));
    let p = &report["process"];
    assert!(p["rssBytes"].as_u64().is_some_and(|v| v > 0), "{report}");
    assert!(p["threads"].as_u64().is_some_and(|v| v > 0), "{report}");
    assert!(p["openFds"].as_u64().is_some_and(|v| v > 0), "{report}");
    assert!(p["childProcesses"].as_u64().is_some(), "{report}");
    assert!(
        p["uptimeSeconds"].as_f64().is_some_and(|v| v >= 0.0),
        "{report}"
    );
    env.cleanup().await;
}

/// An inline job is claimed, run and recorded in one transaction: it goes
/// from `queued` to its end with one change row, one final history row, and
/// one event (its end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_jobs_run_inside_their_claim() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("dev", &[Role::Debug]).await;
    let (conn, ch, queue) = events_queue(&env).await;
    // Queued first, so the claim is what moves them.
    let ok = submit_ok(
        &api,
        &key,
        json!({"jobName": "n", "command": "noop", "executionMode": "inline"}),
    )
    .await;
    let diag = submit_ok(
        &api,
        &key,
        json!({"jobName": "d", "command": "diagnostics", "executionMode": "inline"}),
    )
    .await;
    env.wait_status(ok, "queued", Duration::from_secs(10)).await;
    env.wait_status(diag, "queued", Duration::from_secs(10))
        .await;
    env.start_worker("w1", "default", "worker").await;
    assert_eq!(
        env.wait_terminal(ok, Duration::from_secs(20)).await,
        "succeeded"
    );
    assert_eq!(
        env.wait_terminal(diag, Duration::from_secs(20)).await,
        "succeeded"
    );

    let (status, job) = get(&api, &key, &format!("/jobs/{diag}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["exitCode"], 0, "{job}");
    assert!(
        job["output"]
            .as_str()
            .unwrap_or_default()
            .contains("rssBytes"),
        "the diagnostics report is the output: {job}"
    );
    for id in [ok, diag] {
        assert_eq!(
            final_states(&env, id).await.len(),
            1,
            "one final history row"
        );
        let (attempt, started, completed): (i32, bool, bool) = sqlx::query_as(
            "SELECT attempt, started_at IS NOT NULL, completed_at IS NOT NULL FROM jobs WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("job row");
        assert_eq!((attempt, started, completed), (1, true, true));
        let mut c = env.pool.acquire().await.expect("connection");
        let changes = changelog::read_since(&mut c, Some("jobs"), 0, 1000)
            .await
            .expect("changes");
        let mine: Vec<_> = changes
            .iter()
            .filter(|c| c.record_id == id.to_string())
            .collect();
        let steps: Vec<(String, String)> = mine
            .iter()
            .map(|c| {
                let status = |d: &Option<Value>| {
                    d.as_ref()
                        .and_then(|v| v["status"].as_str())
                        .unwrap_or("-")
                        .to_owned()
                };
                (status(&c.old_data), status(&c.new_data))
            })
            .collect();
        let end = "succeeded";
        assert_eq!(
            steps,
            vec![
                ("-".to_owned(), "pending".to_owned()),
                ("pending".to_owned(), "queued".to_owned()),
                ("queued".to_owned(), end.to_owned()),
            ],
            "change rows of {id}"
        );
    }
    let mut seen = Vec::new();
    let done = wait_event(
        &ch,
        &queue,
        &mut seen,
        ok,
        "job.succeeded",
        Duration::from_secs(10),
    )
    .await;
    assert!(done.is_some(), "no job.succeeded event; saw {seen:?}");
    assert!(
        !seen
            .iter()
            .any(|(k, e)| k == "job.running" && e["jobId"] == ok.to_string()),
        "an inline job run in its claim never shows as running: {seen:?}"
    );
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_cut_at_the_cap_with_a_marker() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let mut s = env.worker_settings("capped", "default", "worker");
    s.worker.output_cap_bytes = 1000;
    env.start_worker_with(s).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let id = submit_ok(
        &api,
        &key,
        json!({"jobName": "loud", "command": "head -c 5000 /dev/zero | tr '\\0' a"}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    let output = job["output"].as_str().unwrap_or_default();
    assert!(output.starts_with(&"a".repeat(1000)), "{job}");
    assert!(output.contains("[output truncated by taskhost]"), "{job}");
    let kept = output.split('\n').next().unwrap_or_default();
    assert_eq!(
        kept.len(),
        1000,
        "exactly the cap is kept before the marker"
    );
    assert_eq!(job["outputTruncated"], true, "{job}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_newest_first_and_max_results_is_bounded() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    for bad in ["0", "1001", "-1"] {
        let (status, body) = get(&api, &key, &format!("/jobs/results?maxResults={bad}")).await;
        assert_error(status, &body, 422, "invalid", &format!("maxResults={bad}"));
    }

    let first = submit_ok(&api, &key, json!({"jobName": "first", "command": "echo 1"})).await;
    assert_eq!(
        env.wait_terminal(first, Duration::from_secs(20)).await,
        "succeeded"
    );
    let second = submit_ok(
        &api,
        &key,
        json!({"jobName": "second", "command": "echo 2"}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(second, Duration::from_secs(20)).await,
        "succeeded"
    );
    // A job that has not finished is not a result yet.
    let pending = submit_ok(
        &api,
        &key,
        json!({"jobName": "busy", "command": "sleep 30"}),
    )
    .await;
    env.wait_status(pending, "running", Duration::from_secs(20))
        .await;

    let (status, body) = get(&api, &key, "/jobs/results").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 2, "{body}");
    assert_eq!(
        body["results"][0]["jobId"],
        second.to_string(),
        "newest first: {body}"
    );
    assert_eq!(body["results"][1]["jobId"], first.to_string(), "{body}");

    for (limit, want) in [("1", 1), ("1000", 2)] {
        let (status, body) = get(&api, &key, &format!("/jobs/results?maxResults={limit}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["count"], want, "{body}");
        assert_eq!(body["results"][0]["jobId"], second.to_string(), "{body}");
    }
    let (status, _) = post(&api, &key, &format!("/jobs/{pending}/cancel")).await;
    assert_eq!(status, 202);
    assert!(
        TERMINAL.contains(
            &env.wait_terminal(pending, Duration::from_secs(10))
                .await
                .as_str()
        )
    );
    env.cleanup().await;
}

/// Many jobs at once: the worker claims and records them in shared
/// transactions (set-based statements); every job still gets exactly one
/// claim, one final history row, its exit code and its change rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_jobs_is_claimed_and_recorded_in_batches_exactly_once() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let mut settings = env.worker_settings("burst", "default", "worker");
    settings.worker.concurrency = 32;
    env.start_worker_with(settings).await;
    let key = env.key("alice", &[Role::Debug, Role::TaskManager]).await;
    let mut ids = Vec::new();
    let submissions: Vec<_> = (0..120)
        .map(|i| {
            let (api, key) = (&api, &key);
            async move {
                let body = if i % 3 == 0 {
                    json!({"jobName": format!("b{i}"), "command": format!("exit {}", i % 2)})
                } else {
                    json!({"jobName": format!("b{i}"), "command": "noop", "executionMode": "inline"})
                };
                submit_ok(api, key, body).await
            }
        })
        .collect();
    for id in futures_util::future::join_all(submissions).await {
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let want = if i % 3 == 0 && i % 2 == 1 {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(
            env.wait_terminal(*id, Duration::from_secs(60)).await,
            want,
            "job {i}"
        );
    }
    let rows: Vec<(Uuid, i32, i64, i64, Option<i32>)> = sqlx::query_as(
        "SELECT j.job_id, j.attempt,
                (SELECT count(*) FROM task_history h WHERE h.job_id = j.job_id AND h.is_final),
                -- An inline job is claimed, run and recorded in one step.
                (SELECT count(*) FROM data_change d WHERE d.record_id = j.job_id::text
                   AND (d.change_reason = 'claimed' OR d.change_reason LIKE 'ran inline:%')),
                j.exit_code
         FROM jobs j",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    assert_eq!(rows.len(), ids.len());
    for (id, attempt, finals, claims, code) in rows {
        assert_eq!((attempt, finals, claims), (1, 1, 1), "job {id}");
        assert!(code.is_some(), "job {id} has no exit code");
    }
    env.cleanup().await;
}

/// The batched acceptance path answers a repeated id inside one batch as a
/// duplicate and writes the job, its change row and its outbox row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_in_one_accept_batch_is_one_job() {
    use taskhost_common::jobs::{Accepted, PlainJob, accept_batch};
    use taskhost_common::model::{SubmitRequest, TriggeredBy};
    let env = TestEnv::new().await;
    let spec = serde_json::from_value::<SubmitRequest>(json!({"jobName": "j", "command": "true"}))
        .expect("request")
        .validate()
        .expect("valid");
    let job = |id: Uuid| PlainJob {
        job_id: id,
        user_id: "alice".into(),
        spec: spec.clone(),
        triggered_by: TriggeredBy::Queue,
        changed_by: "ingress".into(),
        traceparent: None,
    };
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let answers = accept_batch(&env.pool, &[job(a), job(b), job(a)])
        .await
        .expect("batch");
    assert!(
        matches!(&answers[0], Accepted::Created { job_ids, outbox, .. }
        if job_ids == &vec![a] && outbox.len() == 1 && outbox[0].job_id == Some(a))
    );
    assert!(matches!(&answers[1], Accepted::Created { job_ids, .. } if job_ids == &vec![b]));
    assert_eq!(answers[2], Accepted::Duplicate { job_id: a });
    // A later batch with the same id is a duplicate too.
    let again = accept_batch(&env.pool, &[job(a)]).await.expect("batch");
    assert_eq!(again, vec![Accepted::Duplicate { job_id: a }]);
    for (table, sql) in [
        ("jobs", "SELECT count(*) FROM jobs WHERE job_id = $1"),
        ("outbox", "SELECT count(*) FROM outbox WHERE job_id = $1"),
        (
            "data_change",
            "SELECT count(*) FROM data_change WHERE record_id = $1::text",
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(a)
            .fetch_one(&env.pool)
            .await
            .expect("count");
        assert_eq!(n, 1, "{table} rows for the repeated id");
    }
    let (status, by): (String, String) =
        sqlx::query_as("SELECT status, triggered_by FROM jobs WHERE job_id = $1")
            .bind(b)
            .fetch_one(&env.pool)
            .await
            .expect("job b");
    assert_eq!((status.as_str(), by.as_str()), ("pending", "queue"));
    env.cleanup().await;
}

/// A redelivered copy of a job whose end is recorded in the same worker
/// batch does not claim it again: the claim waits (`Busy`), the job keeps
/// its one final history row and its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_settled_with_its_jobs_end_does_not_run_it_again() {
    use taskhost_common::jobs::{PlainJob, accept_batch};
    use taskhost_common::model::{JobStatus, SubmitRequest, TriggeredBy};
    use taskhost_common::store::{
        self, ClaimRequest, ClaimResult, Claimer, Finish, FinishRequest, Finished, Step, StepResult,
    };
    let env = TestEnv::new().await;
    let spec = serde_json::from_value::<SubmitRequest>(json!({"jobName": "j", "command": "true"}))
        .expect("request")
        .validate()
        .expect("valid");
    let id = Uuid::now_v7();
    accept_batch(
        &env.pool,
        &[PlainJob {
            job_id: id,
            user_id: "alice".into(),
            spec,
            triggered_by: TriggeredBy::Api,
            changed_by: "alice".into(),
            traceparent: None,
        }],
    )
    .await
    .expect("accepted");
    let claimer = Claimer {
        node_id: Uuid::now_v7(),
        node_name: "n1".into(),
        lease: Duration::from_secs(30),
        delivery_limit: 5,
    };
    let request = ClaimRequest {
        job_id: id,
        own_stale: false,
        inline_hint: false,
    };
    let claimed = match store::claim(&env.pool, &claimer, request)
        .await
        .expect("claim")
    {
        ClaimResult::Claimed(c) => c,
        other => panic!("not claimed: {other:?}"),
    };
    let fin = Finish {
        status: JobStatus::Succeeded,
        reason: None,
        exit_code: Some(0),
        output: changelog::gzip(b"done\n"),
        error: changelog::gzip(b""),
        truncated: false,
        started_at: chrono::Utc::now(),
        duration: Duration::from_millis(3),
    };
    let no_inline = |_: &store::Claimed| -> Finish { panic!("no inline job here") };
    let steps = [
        Step::Finish(Box::new(FinishRequest { claimed, fin })),
        // The same node's own redelivery of the job, as after a reconnect.
        Step::Claim(ClaimRequest {
            own_stale: true,
            ..request
        }),
    ];
    let answers = store::settle(&env.pool, &claimer, &no_inline, &steps)
        .await
        .expect("settle");
    assert!(
        matches!(answers[0], StepResult::Finish(Finished::Final)),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], StepResult::Claim(ClaimResult::Busy)),
        "{answers:?}"
    );
    let (status, attempt): (String, i32) =
        sqlx::query_as("SELECT status, attempt FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("job");
    assert_eq!((status.as_str(), attempt), ("succeeded", 1));
    assert_eq!(final_states(&env, id).await, vec!["succeeded".to_owned()]);
    // Asked again, the copy finds the job finished.
    let again = store::claim(
        &env.pool,
        &claimer,
        ClaimRequest {
            own_stale: true,
            ..request
        },
    )
    .await
    .expect("claim again");
    assert!(
        matches!(again, ClaimResult::Finished(JobStatus::Succeeded)),
        "{again:?}"
    );
    env.cleanup().await;
}

/// Two copies of one job's work message reach the same worker at once (a
/// redelivery racing the original): the job runs once, on one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_job_on_one_worker_run_it_once() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let mut settings = env.worker_settings("copies", "default", "worker");
    settings.worker.concurrency = 8;
    env.start_worker_with(settings).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    for round in 0..5 {
        let id = submit_ok(
            &api,
            &key,
            json!({"jobName": format!("c{round}"), "command": "sleep 0.3; echo once"}),
        )
        .await;
        let copy = json!({"job_id": id, "attempt": 0, "command": "sleep 0.3; echo once",
            "execution_mode": "pool", "timeout_seconds": null, "env": {}, "priority": 5,
            "submitted_at": chrono::Utc::now()});
        for _ in 0..2 {
            env.publish_raw(
                &env.names().work(),
                "any",
                copy.to_string().as_bytes(),
                Some("job.run.v1"),
                Some(&format!("{id}:0")),
            )
            .await;
        }
        assert_eq!(
            env.wait_terminal(id, Duration::from_secs(20)).await,
            "succeeded"
        );
        // Let the copies be consumed and acked.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (attempt, runs): (i32, i64) = sqlx::query_as(
            "SELECT attempt, (SELECT count(*) FROM task_history h WHERE h.job_id = j.job_id)
             FROM jobs j WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("job");
        assert_eq!(
            (attempt, runs),
            (1, 1),
            "round {round}: job {id} ran more than once"
        );
    }
    env.cleanup().await;
}

/// Another system publishes a burst of jobs to `<p>.submit`, some message
/// ids twice: every distinct id becomes one job that runs once, handled many
/// at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_the_submit_queue_becomes_one_job_per_message_id() {
    let mut env = TestEnv::new().await;
    env.start_scheduler().await;
    let mut settings = env.worker_settings("ingress-burst", "default", "worker");
    settings.worker.concurrency = 16;
    env.start_worker_with(settings).await;
    env.key("alice", &[Role::Debug]).await;
    let names = env.names();
    let ids: Vec<Uuid> = (0..60).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids.iter().chain(ids.iter().take(10)).enumerate() {
        let body = json!({"userId": "alice", "jobName": format!("q{i}"), "command": "noop",
                          "executionMode": "inline"});
        env.publish_raw(
            &names.submit(),
            "submit",
            body.to_string().as_bytes(),
            Some(JOB_SUBMIT_V1),
            Some(&id.to_string()),
        )
        .await;
    }
    for id in &ids {
        assert_eq!(
            env.wait_terminal(*id, Duration::from_secs(60)).await,
            "succeeded",
            "job {id}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (jobs, finals, queue): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), (SELECT count(*) FROM task_history WHERE is_final),
                count(*) FILTER (WHERE triggered_by = 'queue')
         FROM jobs",
    )
    .fetch_one(&env.pool)
    .await
    .expect("counts");
    assert_eq!((jobs, finals, queue), (60, 60, 60));
    env.cleanup().await;
}
