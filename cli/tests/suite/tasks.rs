//! Recurring tasks end to end on the real local Postgres and RabbitMQ: the
//! tasks API (CRUD, validation, roles, change log), schedules across DST
//! changes, exactly-once firing with several schedulers, misfire, overlap and
//! no-node policies, a task firing on a worker, run-now with retries and
//! backoff, cancelling a task run, retention, and the `taskhost tasks` CLI.
//!
//! The scheduler is driven one deterministic pass at a time with
//! `cron::tick(pool, now, policy)` wherever a real clock is not the point.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Timelike, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use taskhost_common::amqp::Publisher;
use taskhost_common::changelog;
use taskhost_common::config::RetentionSettings;
use taskhost_common::model::Role;
use taskhost_common::tasks::{self, TaskRequest};
use taskhost_common::{db, jobs};
use taskhost_scheduler::cron::{self, TickPolicy, TickReport};
use taskhost_scheduler::retention;
use taskhost_testkit::{AMQP_URL, Api, BUILTIN_DIAGNOSTICS_TASK, TestEnv, call, get};
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

/// Sends a request with a key (and an optional JSON body); returns
/// `(status, JSON body or Null)`.
/// POST /tasks, asserting 201; returns the task id and the response body.
async fn create_task_api(api: &Api, key: &str, body: &Value) -> (Uuid, Value) {
    let (status, resp) = call(api, Method::POST, key, "/tasks", Some(body)).await;
    assert_eq!(status, 201, "POST /tasks {body} answered {resp}");
    assert_eq!(resp["success"], true, "{resp}");
    let id = resp["taskId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("taskId in response");
    (id, resp)
}

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a 422 whose message names `field`.
fn assert_invalid(status: u16, body: &Value, field: &str, what: &str) {
    assert_eq!(status, 422, "{what}: {body}");
    assert_eq!(body["success"], false, "{what}: {body}");
    assert_eq!(body["error"]["code"], "invalid", "{what}: {body}");
    assert!(
        error_message(body).contains(field),
        "{what}: the message should name `{field}`: {body}"
    );
}

fn utc(s: &str) -> DateTime<Utc> {
    s.parse().expect("an RFC 3339 time")
}

fn json_time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("expected a timestamp, got {v}"))
}

/// Now, to the whole second (Postgres keeps microseconds, chrono nanos).
/// The "now" the cron tests tick at: half past the current minute, so that
/// a fire time a few seconds earlier never has its next minute boundary at
/// or before it (a tick at exactly :00 would make that boundary due at once).
fn now_s() -> DateTime<Utc> {
    let now = Utc::now();
    now.with_nanosecond(0)
        .and_then(|t| t.with_second(30))
        .expect("half past the minute")
}

fn policy(grace_secs: i64) -> TickPolicy {
    TickPolicy {
        misfire_grace: chrono::Duration::seconds(grace_secs),
    }
}

async fn tick_at(pool: &PgPool, now: DateTime<Utc>) -> TickReport {
    cron::tick(pool, now, policy(60)).await.expect("tick")
}

/// Creates a task straight through `taskhost_common::tasks::create` (the
/// same code the api runs), as user `alice`.
async fn new_task(
    env: &TestEnv,
    name: &str,
    schedule: &str,
    tz: &str,
    edit: impl FnOnce(&mut TaskRequest),
) -> Uuid {
    let mut req = TaskRequest {
        task_name: Some(name.to_owned()),
        command: Some("echo hi".to_owned()),
        schedule: Some(schedule.to_owned()),
        timezone: Some(tz.to_owned()),
        ..Default::default()
    };
    edit(&mut req);
    tasks::create(&env.pool, req, "alice")
        .await
        .expect("create task")
        .task_id
}

/// Lets a task fire while its previous run is still queued (these tests run
/// no worker for most fired jobs).
fn allow(r: &mut TaskRequest) {
    r.overlap_policy = Some("allow".into());
}

async fn set_next_run(env: &TestEnv, task: Uuid, at: DateTime<Utc>) {
    sqlx::query("UPDATE task_schedule SET next_run = $2 WHERE task_id = $1")
        .bind(task)
        .bind(at)
        .execute(&env.pool)
        .await
        .expect("set next_run");
}

async fn disable(env: &TestEnv, task: Uuid) {
    sqlx::query("UPDATE tasks SET enabled = false WHERE task_id = $1")
        .bind(task)
        .execute(&env.pool)
        .await
        .expect("disable task");
}

/// The scheduling state of a task.
#[derive(Debug, sqlx::FromRow)]
struct Sched {
    next_run: Option<DateTime<Utc>>,
    last_run: Option<DateTime<Utc>>,
    last_state: Option<String>,
    is_running: bool,
    total_runs: i64,
    success_count: i64,
    failure_count: i64,
}

async fn sched(env: &TestEnv, task: Uuid) -> Sched {
    sqlx::query_as(
        "SELECT next_run, last_run, last_state, is_running, total_runs, success_count, failure_count
         FROM task_schedule WHERE task_id = $1",
    )
    .bind(task)
    .fetch_one(&env.pool)
    .await
    .expect("task_schedule row")
}

/// `(job_id, fire_at, status)` of every job of a task, oldest fire first.
async fn task_jobs(env: &TestEnv, task: Uuid) -> Vec<(Uuid, Option<DateTime<Utc>>, String)> {
    sqlx::query_as(
        "SELECT job_id, fire_at, status FROM jobs WHERE task_id = $1 ORDER BY fire_at, submitted_at",
    )
    .bind(task)
    .fetch_all(&env.pool)
    .await
    .expect("jobs of task")
}

/// data_change rows of one record, as `(table, action)` → count.
async fn change_counts(env: &TestEnv, record: Uuid) -> BTreeMap<(String, String), i64> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT table_name, action, count(*) FROM data_change WHERE record_id = $1
         GROUP BY table_name, action",
    )
    .bind(record.to_string())
    .fetch_all(&env.pool)
    .await
    .expect("data_change counts");
    rows.into_iter().map(|(t, a, n)| ((t, a), n)).collect()
}

fn publisher(env: &TestEnv) -> Publisher {
    Publisher::new(AMQP_URL, env.names(), "tasks-test")
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after
/// `within` with `what`.
async fn poll<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------ 1. tasks API: CRUD, roles

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_api_crud_validation_roles_and_change_log() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let tm = env.key("alice", &[Role::TaskManager]).await;
    let nobody = env.key("bob", &[]).await;
    let tm_debug = env.key("carol", &[Role::TaskManager, Role::Debug]).await;

    // Create.
    let before = Utc::now();
    let body = json!({
        "taskName": "report", "command": "echo report", "schedule": "*/5 * * * *",
        "timezone": "Europe/Berlin", "assignedNodeGroup": "prod", "maxRetries": 2,
        "retryDelaySeconds": 10,
    });
    let (id, created) = create_task_api(&api, &tm, &body).await;
    let task = &created["task"];
    assert_eq!(task["taskId"], json!(id), "{created}");
    let next = json_time(&task["nextRun"]);
    assert!(next > before, "nextRun {next} should be in the future");
    assert!(
        next <= before + chrono::Duration::minutes(5) + chrono::Duration::seconds(1),
        "nextRun {next} should be within 5 minutes"
    );
    assert_eq!(next.minute() % 5, 0, "*/5 fires on a multiple of 5: {next}");
    assert_eq!(next.second(), 0, "{next}");

    // List: ours and the built-in diagnostics task.
    let (status, list) = get(&api, &tm, "/tasks").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["success"], true);
    let all = list["tasks"].as_array().expect("tasks array");
    assert_eq!(list["count"], json!(all.len()));
    assert!(
        all.iter()
            .any(|t| t["taskId"] == json!(id) && t["taskName"] == "report"),
        "{list}"
    );
    let builtin = all
        .iter()
        .find(|t| t["taskName"] == "diagnostics")
        .unwrap_or_else(|| panic!("built-in diagnostics task missing: {list}"));
    assert_eq!(builtin["appName"], "taskhost");
    assert_eq!(builtin["taskId"], json!(BUILTIN_DIAGNOSTICS_TASK));

    // Get one: camelCase fields as created.
    let (status, one) = get(&api, &tm, &format!("/tasks/{id}")).await;
    assert_eq!(status, 200, "{one}");
    for (k, v) in [
        ("taskId", json!(id)),
        ("taskName", json!("report")),
        ("appName", json!("default")),
        ("command", json!("echo report")),
        ("schedule", json!("*/5 * * * *")),
        ("timezone", json!("Europe/Berlin")),
        ("assignedNodeGroup", json!("prod")),
        ("assignedNodeId", Value::Null),
        ("maxRetries", json!(2)),
        ("retryDelaySeconds", json!(10)),
        ("timeoutSeconds", Value::Null),
        ("enabled", json!(true)),
        ("executionMode", json!("pool")),
        ("fanout", json!("one")),
        ("createdBy", json!("alice")),
    ] {
        assert!(one.get(k).is_some(), "field {k} missing: {one}");
        assert_eq!(one[k], v, "field {k}: {one}");
    }
    assert_eq!(json_time(&one["nextRun"]), next);
    assert!(
        one.get("task_name").is_none(),
        "fields must be camelCase: {one}"
    );

    // Disable: nextRun null.
    let (status, upd) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{upd}");
    assert_eq!(upd["enabled"], false, "{upd}");
    assert_eq!(upd["nextRun"], Value::Null, "{upd}");
    assert_eq!(upd["modifiedBy"], "alice", "{upd}");
    assert_eq!(sched(&env, id).await.next_run, None);

    // Re-enable hourly: nextRun on a whole hour.
    let now = Utc::now();
    let (status, upd) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"schedule": "@hourly", "enabled": true})),
    )
    .await;
    assert_eq!(status, 200, "{upd}");
    assert_eq!(upd["enabled"], true);
    assert_eq!(upd["schedule"], "@hourly");
    assert_eq!(
        upd["assignedNodeGroup"], "prod",
        "untouched fields stay: {upd}"
    );
    let hourly = json_time(&upd["nextRun"]);
    assert!(hourly > now && hourly <= now + chrono::Duration::hours(1));
    assert_eq!((hourly.minute(), hourly.second()), (0, 0), "{hourly}");

    // Validation: each names its field.
    let base = |extra: Value| {
        let mut b = json!({"taskName": "v", "command": "echo v", "schedule": "@daily"});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let cases = [
        (base(json!({"schedule": "61 * * * *"})), "schedule"),
        (base(json!({"schedule": "not a cron"})), "schedule"),
        (base(json!({"timezone": "Mars/Base"})), "timezone"),
        (
            base(json!({"assignedNodeGroup": "Bad Group"})),
            "assignedNodeGroup",
        ),
        (base(json!({"bogusField": 1})), "bogusField"),
        (json!({"taskName": "v", "schedule": "@daily"}), "command"),
    ];
    for (b, field) in &cases {
        let (status, resp) = call(&api, Method::POST, &tm, "/tasks", Some(b)).await;
        assert_invalid(status, &resp, field, &format!("POST {b}"));
    }
    // The same rules on update; nothing changes.
    let (status, resp) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"timezone": "Mars/Base"})),
    )
    .await;
    assert_invalid(status, &resp, "timezone", "PUT bad timezone");
    let (status, resp) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"schedule": "* * *"})),
    )
    .await;
    assert_invalid(status, &resp, "schedule", "PUT bad schedule");

    // Roles: any key reads, writers write.
    let (status, resp) = call(
        &api,
        Method::POST,
        &nobody,
        "/tasks",
        Some(&base(json!({}))),
    )
    .await;
    assert_eq!(status, 403, "no-role key creating a task: {resp}");
    assert_eq!(resp["error"]["code"], "forbidden");
    let (status, _) = get(&api, &nobody, "/tasks").await;
    assert_eq!(status, 200);
    let (status, _) = get(&api, &nobody, &format!("/tasks/{id}")).await;
    assert_eq!(status, 200);
    let (status, resp) = call(
        &api,
        Method::PUT,
        &nobody,
        &format!("/tasks/{id}"),
        Some(&json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 403, "no-role key updating: {resp}");
    let (status, resp) = call(&api, Method::DELETE, &nobody, &format!("/tasks/{id}"), None).await;
    assert_eq!(status, 403, "no-role key deleting: {resp}");
    let (status, resp) = call(
        &api,
        Method::POST,
        &nobody,
        &format!("/tasks/{id}/run"),
        None,
    )
    .await;
    assert_eq!(status, 403, "no-role key running: {resp}");
    // inline needs debug on top of a writer role.
    let inline = json!({"taskName": "diag", "command": "noop", "schedule": "@daily",
                        "executionMode": "inline"});
    let (status, resp) = call(&api, Method::POST, &tm, "/tasks", Some(&inline)).await;
    assert_eq!(status, 403, "task_manager creating an inline task: {resp}");
    let (status, resp) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"executionMode": "inline", "command": "noop"})),
    )
    .await;
    assert_eq!(
        status, 403,
        "task_manager switching a task to inline: {resp}"
    );
    let (inline_id, resp) = create_task_api(&api, &tm_debug, &inline).await;
    assert_eq!(resp["task"]["executionMode"], "inline");
    // Duplicate name in the same app → 409; another app is fine.
    let (status, resp) = call(
        &api,
        Method::POST,
        &tm,
        "/tasks",
        Some(&json!({"taskName": "report", "command": "x", "schedule": "@daily"})),
    )
    .await;
    assert_eq!(status, 409, "duplicate taskName: {resp}");
    assert_eq!(resp["error"]["code"], "conflict");
    create_task_api(
        &api,
        &tm,
        &json!({"taskName": "report", "appName": "other", "command": "x", "schedule": "@daily"}),
    )
    .await;
    // Renaming onto an existing name is a conflict too.
    let (status, resp) = call(
        &api,
        Method::PUT,
        &tm_debug,
        &format!("/tasks/{inline_id}"),
        Some(&json!({"taskName": "report"})),
    )
    .await;
    assert_eq!(status, 409, "rename onto an existing name: {resp}");

    // Delete, then 404.
    let (status, resp) = call(&api, Method::DELETE, &tm, &format!("/tasks/{id}"), None).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["success"], true);
    let (status, resp) = get(&api, &tm, &format!("/tasks/{id}")).await;
    assert_eq!(status, 404, "{resp}");
    assert_eq!(resp["error"]["code"], "not_found");
    let (status, _) = call(&api, Method::DELETE, &tm, &format!("/tasks/{id}"), None).await;
    assert_eq!(status, 404);
    let (status, _) = get(&api, &tm, "/tasks/not-a-uuid").await;
    assert_eq!(status, 404);
    let gone: i64 = sqlx::query_scalar("SELECT count(*) FROM task_schedule WHERE task_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(gone, 0, "the schedule row goes with the task");

    // The change log: every write, in both tables; failed writes none.
    let counts = change_counts(&env, id).await;
    let want: BTreeMap<(String, String), i64> = [
        (("tasks", "INSERT"), 1),
        (("tasks", "UPDATE"), 2),
        (("tasks", "DELETE"), 1),
        (("task_schedule", "INSERT"), 1),
        (("task_schedule", "UPDATE"), 2),
        (("task_schedule", "DELETE"), 1),
    ]
    .into_iter()
    .map(|((t, a), n)| ((t.to_owned(), a.to_owned()), n))
    .collect();
    assert_eq!(counts, want, "data_change rows of task {id}");
    // The rows decode to the old and new task rows.
    type ChangeRow = (String, Option<Vec<u8>>, Option<Vec<u8>>, String);
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "SELECT action, old_data, new_data, changed_by FROM data_change
         WHERE table_name = 'tasks' AND record_id = $1 ORDER BY change_seq",
    )
    .bind(id.to_string())
    .fetch_all(&env.pool)
    .await
    .expect("task changes");
    let decode = |b: &Option<Vec<u8>>| {
        b.as_deref()
            .map(|b| changelog::gunzip_json(b).expect("gzip json"))
    };
    assert_eq!(rows[0].0, "INSERT");
    assert_eq!(decode(&rows[0].2).expect("new")["task_name"], "report");
    assert!(rows[0].1.is_none());
    assert_eq!(rows[1].0, "UPDATE");
    assert_eq!(decode(&rows[1].1).expect("old")["enabled"], true);
    assert_eq!(decode(&rows[1].2).expect("new")["enabled"], false);
    assert_eq!(rows[3].0, "DELETE");
    assert_eq!(decode(&rows[3].1).expect("old")["schedule"], "@hourly");
    assert!(rows[3].2.is_none());
    assert!(
        rows.iter().all(|r| r.3 == "alice"),
        "changed_by is the caller"
    );
    env.cleanup().await;
}

/// PUT changes the fields it names: naming an optional field with `null`
/// clears it (the only way back to "any node" or "no timeout"), instead of
/// answering 200 and keeping the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_null_clears_an_optional_field() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let tm = env.key("alice", &[Role::TaskManager]).await;
    let (id, _) = create_task_api(
        &api,
        &tm,
        &json!({"taskName": "pinned", "command": "echo", "schedule": "@daily",
                "assignedNodeGroup": "prod", "timeoutSeconds": 30}),
    )
    .await;
    let (status, upd) = call(
        &api,
        Method::PUT,
        &tm,
        &format!("/tasks/{id}"),
        Some(&json!({"assignedNodeGroup": null, "timeoutSeconds": null})),
    )
    .await;
    assert_eq!(status, 200, "{upd}");
    let (_, now) = get(&api, &tm, &format!("/tasks/{id}")).await;
    // Clean up first, so a failing assertion leaves no database behind.
    env.cleanup().await;
    assert_eq!(
        (&now["assignedNodeGroup"], &now["timeoutSeconds"]),
        (&Value::Null, &Value::Null),
        "PUT {{assignedNodeGroup: null, timeoutSeconds: null}} answered 200 but the task is {now}"
    );
}

// ------------------------------------------------------ 2. DST via the tick

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_run_keeps_local_time_across_dst_changes() {
    let env = TestEnv::new().await;

    // Europe/Berlin leaves summer time on 2026-10-25 (03:00 CEST → 02:00 CET).
    let berlin = new_task(&env, "berlin-9", "0 9 * * *", "Europe/Berlin", allow).await;
    set_next_run(&env, berlin, utc("2026-10-24T07:00:00Z")).await; // 09:00 CEST
    let r = tick_at(&env.pool, utc("2026-10-24T07:00:30Z")).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    let jobs = task_jobs(&env, berlin).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, Some(utc("2026-10-24T07:00:00Z")));
    let s = sched(&env, berlin).await;
    assert_eq!(
        s.next_run,
        Some(utc("2026-10-25T08:00:00Z")),
        "09:00 CET after the change"
    );
    assert_eq!(s.last_run, Some(utc("2026-10-24T07:00:00Z")));
    assert_eq!(s.total_runs, 1);
    // And it fires there.
    let r = tick_at(&env.pool, utc("2026-10-25T08:00:01Z")).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(
        task_jobs(&env, berlin).await[1].1,
        Some(utc("2026-10-25T08:00:00Z"))
    );
    assert_eq!(
        sched(&env, berlin).await.next_run,
        Some(utc("2026-10-26T08:00:00Z"))
    );
    disable(&env, berlin).await;

    // America/New_York springs forward on 2026-03-08 (02:00 EST → 03:00 EDT).
    let ny9 = new_task(&env, "ny-9", "0 9 * * *", "America/New_York", allow).await;
    set_next_run(&env, ny9, utc("2026-03-07T14:00:00Z")).await; // 09:00 EST
    let r = tick_at(&env.pool, utc("2026-03-07T14:00:30Z")).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(
        sched(&env, ny9).await.next_run,
        Some(utc("2026-03-08T13:00:00Z")),
        "09:00 EDT after the change"
    );
    disable(&env, ny9).await;

    // A time inside the spring-forward gap (02:30 does not exist on
    // 2026-03-08) runs once, at the first valid time after the gap (03:00
    // EDT, as Vixie cron and croner do), and is back to 02:30 the next day.
    let gap = new_task(&env, "ny-gap", "30 2 * * *", "America/New_York", allow).await;
    set_next_run(&env, gap, utc("2026-03-07T07:30:00Z")).await; // 02:30 EST
    let r = tick_at(&env.pool, utc("2026-03-07T07:30:10Z")).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    let in_gap = sched(&env, gap).await.next_run.expect("next_run");
    assert_eq!(
        in_gap,
        utc("2026-03-08T07:00:00Z"),
        "the 02:30 run of the spring-forward day"
    );
    let r = tick_at(&env.pool, in_gap + chrono::Duration::seconds(10)).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(
        sched(&env, gap).await.next_run,
        Some(utc("2026-03-09T06:30:00Z")),
        "02:30 EDT the day after"
    );
    disable(&env, gap).await;

    // A time inside the repeated hour at fall-back (01:30 happens twice on
    // 2026-11-01 in New York) runs once that day, not twice.
    let fold = new_task(&env, "ny-fold", "30 1 * * *", "America/New_York", allow).await;
    set_next_run(&env, fold, utc("2026-11-01T05:30:00Z")).await; // 01:30 EDT
    let r = tick_at(&env.pool, utc("2026-11-01T05:30:10Z")).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(
        sched(&env, fold).await.next_run,
        Some(utc("2026-11-02T06:30:00Z")),
        "a daily 01:30 task must not fire again at 01:30 EST the same day"
    );
    disable(&env, fold).await;
    env.cleanup().await;
}

// ------------------------------------------- 3. exactly once, two schedulers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_fire_each_tick_exactly_once() {
    let mut env = TestEnv::new().await;

    // The real loop: two schedulers, an every-second task, overlap allowed
    // (no worker runs the fired jobs).
    env.settings.scheduler.tick_ms = 200;
    let secs = new_task(&env, "every-second", "* * * * * *", "UTC", allow).await;
    let a = env.start_scheduler().await;
    let b = env.start_scheduler().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    disable(&env, secs).await;
    env.stop(a).await;
    env.stop(b).await;
    let by_fire = jobs_by_fire_at(&env, secs).await;
    assert!(
        by_fire.len() >= 2,
        "an every-second task fires in 4 s: {by_fire:?}"
    );
    let dups: Vec<_> = by_fire.iter().filter(|(_, n)| *n > 1).collect();
    assert!(dups.is_empty(), "fire times fired twice: {dups:?}");
    let total: i64 = by_fire.iter().map(|(_, n)| n).sum();
    assert_eq!(sched(&env, secs).await.total_runs, total);

    // Deterministic, one scheduler first: ticking minute by minute fires
    // every minute once.
    let t0 = utc("2026-12-01T00:00:00Z");
    let minutes = |from: DateTime<Utc>| -> Vec<DateTime<Utc>> {
        (0..30)
            .map(|k| from + chrono::Duration::minutes(k))
            .collect()
    };
    let single = new_task(&env, "every-minute-1", "* * * * *", "UTC", allow).await;
    set_next_run(&env, single, t0).await;
    for now in minutes(t0) {
        tick_at(&env.pool, now).await;
    }
    let got: Vec<DateTime<Utc>> = jobs_by_fire_at(&env, single)
        .await
        .into_iter()
        .map(|(t, n)| {
            assert_eq!(n, 1, "fire time {t}");
            t
        })
        .collect();
    assert_eq!(got, minutes(t0), "one scheduler");
    disable(&env, single).await;

    // Two loops on their own pools tick the same 30 minutes concurrently.
    // The grace is an hour, so no fire time here is ever a misfire: each
    // must fire exactly once, however the two loops interleave. Three
    // rounds, as the interleaving differs from run to run.
    let mut problems = Vec::new();
    for round in 0..3 {
        let t1 = utc("2026-12-02T00:00:00Z") + chrono::Duration::days(round);
        let task = new_task(
            &env,
            &format!("every-minute-2-{round}"),
            "* * * * *",
            "UTC",
            allow,
        )
        .await;
        set_next_run(&env, task, t1).await;
        let mut loops = Vec::new();
        for _ in 0..2 {
            let pool = db::pool(&env.settings.database).expect("pool");
            let times = minutes(t1);
            loops.push(tokio::spawn(async move {
                let mut fired = 0;
                for now in times {
                    let r = cron::tick(&pool, now, policy(3600))
                        .await
                        .unwrap_or_else(|e| panic!("tick at {now} failed: {e}"));
                    fired += r.fired_jobs.len();
                }
                pool.close().await;
                fired
            }));
        }
        let mut fired = 0;
        for l in loops {
            fired += l.await.expect("tick loop");
        }
        // The loops may end a pass or two behind: the scheduler keeps
        // ticking at the last instant until nothing is due.
        let last = t1 + chrono::Duration::minutes(29);
        for _ in 0..30 {
            let r = cron::tick(&env.pool, last, policy(3600))
                .await
                .expect("settling tick");
            if r.fired_jobs.is_empty() {
                break;
            }
            fired += r.fired_jobs.len();
        }
        disable(&env, task).await;
        let by_fire = jobs_by_fire_at(&env, task).await;
        let s = sched(&env, task).await;
        let dups: Vec<_> = by_fire.iter().filter(|(_, n)| *n != 1).collect();
        let got: Vec<DateTime<Utc>> = by_fire.iter().map(|(t, _)| *t).collect();
        let missing: Vec<_> = minutes(t1)
            .into_iter()
            .filter(|t| !got.contains(t))
            .collect();
        if !dups.is_empty() {
            problems.push(format!(
                "round {round}: fire times with more than one job: {dups:?}"
            ));
        }
        if !missing.is_empty() || got.len() != 30 {
            problems.push(format!(
                "round {round}: {} of 30 minutes fired; missing fire times {missing:?}",
                got.len()
            ));
        }
        if fired != 30 || s.total_runs != 30 {
            problems.push(format!(
                "round {round}: tick reports counted {fired} jobs, total_runs {}; want 30",
                s.total_runs
            ));
        }
        if s.next_run != Some(t1 + chrono::Duration::minutes(30)) {
            problems.push(format!(
                "round {round}: next_run {:?}, want {}",
                s.next_run,
                t1 + chrono::Duration::minutes(30)
            ));
        }
    }
    // Clean up first, so a failing assertion leaves no database behind.
    env.cleanup().await;
    assert!(
        problems.is_empty(),
        "with two schedulers every minute T0..T0+29 fires exactly once:\n{}",
        problems.join("\n")
    );
}

async fn jobs_by_fire_at(env: &TestEnv, task: Uuid) -> Vec<(DateTime<Utc>, i64)> {
    sqlx::query_as(
        "SELECT fire_at, count(*) FROM jobs WHERE task_id = $1 GROUP BY fire_at ORDER BY fire_at",
    )
    .bind(task)
    .fetch_all(&env.pool)
    .await
    .expect("jobs by fire_at")
}

/// A tick that runs a little late (within the misfire grace) still fires
/// every fire time it passed: "each due tick fires exactly once".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tick_within_the_grace_drops_no_fire_time() {
    let env = TestEnv::new().await;
    let task = new_task(&env, "every-second", "* * * * * *", "UTC", allow).await;
    let t0 = utc("2026-12-01T00:00:00Z");
    set_next_run(&env, task, t0).await;
    // The loop's pass meant for t0 runs 1.5 s late (a slow pass, a busy
    // host): fire times t0 and t0+1 s are both due and on time (60 s grace).
    let late = t0 + chrono::Duration::milliseconds(1500);
    for _ in 0..3 {
        tick_at(&env.pool, late).await;
    }
    tick_at(&env.pool, t0 + chrono::Duration::milliseconds(2500)).await;
    let fired: Vec<Option<DateTime<Utc>>> = task_jobs(&env, task)
        .await
        .into_iter()
        .map(|j| j.1)
        .collect();
    // Clean up first, so a failing assertion leaves no database behind.
    env.cleanup().await;
    assert_eq!(
        fired,
        vec![
            Some(t0),
            Some(t0 + chrono::Duration::seconds(1)),
            Some(t0 + chrono::Duration::seconds(2)),
        ],
        "fire times t0, t0+1s, t0+2s each fire once"
    );
}

// --------------------------------------------------------------- 4. misfire

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_catch_up_fires_once_and_skip_fires_none() {
    let env = TestEnv::new().await;
    let now = now_s();
    let old = now - chrono::Duration::minutes(10);

    // catch_up (the default): one run for the whole gap, at the old time.
    let catch_up = new_task(&env, "catch-up", "* * * * *", "UTC", |_| {}).await;
    set_next_run(&env, catch_up, old).await;
    let r = cron::tick(&env.pool, now, policy(60)).await.expect("tick");
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(r.skipped, 0);
    assert_eq!(r.outbox.len(), 1, "one work message to publish");
    let jobs = task_jobs(&env, catch_up).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, r.fired_jobs[0]);
    assert_eq!(jobs[0].1, Some(old));
    let s = sched(&env, catch_up).await;
    let next = s.next_run.expect("next_run");
    assert!(next > now, "next_run {next} must be after now {now}");
    assert!(next <= now + chrono::Duration::minutes(1));
    assert_eq!(s.last_run, Some(old));
    assert_eq!(s.total_runs, 1);
    // A second pass at the same instant fires nothing more.
    let r = cron::tick(&env.pool, now, policy(60)).await.expect("tick");
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    disable(&env, catch_up).await;

    // skip: no run, the tick counts as skipped.
    let skip = new_task(&env, "skip", "* * * * *", "UTC", |r| {
        r.misfire_policy = Some("skip".into());
    })
    .await;
    set_next_run(&env, skip, old).await;
    let r = cron::tick(&env.pool, now, policy(60)).await.expect("tick");
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    assert_eq!(r.skipped, 1, "{r:?}");
    assert!(task_jobs(&env, skip).await.is_empty());
    let s = sched(&env, skip).await;
    assert!(s.next_run.expect("next_run") > now);
    assert_eq!(s.last_state.as_deref(), Some("skipped"));
    assert_eq!(s.total_runs, 0);

    // A task without a next_run yet (the seeded built-in) is scheduled by
    // the pass, not fired.
    sqlx::query("UPDATE tasks SET enabled = true WHERE task_id = $1")
        .bind(BUILTIN_DIAGNOSTICS_TASK)
        .execute(&env.pool)
        .await
        .expect("enable built-in");
    let r = cron::tick(&env.pool, now, policy(60)).await.expect("tick");
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    let builtin = sched(&env, BUILTIN_DIAGNOSTICS_TASK)
        .await
        .next_run
        .expect("next_run set by the pass");
    assert!(builtin > now && builtin <= now + chrono::Duration::minutes(30));
    assert_eq!(
        (builtin.minute() % 30, builtin.second()),
        (0, 0),
        "{builtin}"
    );
    disable(&env, BUILTIN_DIAGNOSTICS_TASK).await;

    // Within the grace a fire time is not a misfire, even with skip.
    set_next_run(&env, skip, now - chrono::Duration::seconds(30)).await;
    let r = cron::tick(&env.pool, now, policy(60)).await.expect("tick");
    assert_eq!(
        r.fired_jobs.len(),
        1,
        "30 s late is within a 60 s grace: {r:?}"
    );
    assert_eq!(r.skipped, 0);
    disable(&env, skip).await;
    env.cleanup().await;
}

// --------------------------------------------------------------- 5. overlap

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_waits_for_the_running_run_and_allow_fires() {
    let env = TestEnv::new().await;
    let now = now_s();
    let due = now - chrono::Duration::seconds(5);
    let task = new_task(&env, "overlap", "* * * * *", "UTC", |r| {
        r.overlap_policy = Some("skip".into());
    })
    .await;
    sqlx::query("UPDATE task_schedule SET is_running = true, next_run = $2 WHERE task_id = $1")
        .bind(task)
        .bind(due)
        .execute(&env.pool)
        .await
        .expect("mark running");
    let r = tick_at(&env.pool, now).await;
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    assert_eq!(r.skipped, 1);
    assert!(task_jobs(&env, task).await.is_empty());
    let s = sched(&env, task).await;
    assert_eq!(s.last_state.as_deref(), Some("skipped"));
    assert!(s.next_run.expect("next_run") > now);
    assert!(s.is_running, "the running run is still running");

    // allow: fires although a run is going.
    tasks::update(
        &env.pool,
        task,
        TaskRequest {
            overlap_policy: Some("allow".into()),
            ..Default::default()
        },
        "alice",
    )
    .await
    .expect("update");
    set_next_run(&env, task, due).await;
    let r = tick_at(&env.pool, now).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(r.skipped, 0);
    let jobs = task_jobs(&env, task).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, Some(due));
    disable(&env, task).await;
    env.cleanup().await;
}

// ------------------------------------------------------- 6. no matching node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_node_fails_or_holds_per_policy() {
    let mut env = TestEnv::new().await;
    let now = now_s();
    let due = now - chrono::Duration::seconds(2);

    // fail: a dead job with a reason and one final history row.
    let fail = new_task(&env, "fail", "* * * * *", "UTC", |r| {
        r.fanout = Some("all".into());
        r.assigned_node_group = Some(Some("nobody".into()));
        r.no_node_policy = Some("fail".into());
    })
    .await;
    set_next_run(&env, fail, due).await;
    let r = tick_at(&env.pool, now).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert!(r.outbox.is_empty(), "nothing to publish for a dead job");
    let job = r.fired_jobs[0];
    let (status, reason, fire_at, triggered, success): (
        String,
        Option<String>,
        Option<DateTime<Utc>>,
        String,
        Option<bool>,
    ) = sqlx::query_as(
        "SELECT status, status_reason, fire_at, triggered_by, success FROM jobs WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&env.pool)
    .await
    .expect("job");
    assert_eq!(status, "dead");
    assert!(
        reason
            .as_deref()
            .unwrap_or_default()
            .contains("no active node"),
        "status_reason {reason:?}"
    );
    assert_eq!(fire_at, Some(due));
    assert_eq!(triggered, "schedule");
    assert_eq!(success, Some(false));
    let hist: Vec<(String, bool, Option<Uuid>)> =
        sqlx::query_as("SELECT state, is_final, task_id FROM task_history WHERE job_id = $1")
            .bind(job)
            .fetch_all(&env.pool)
            .await
            .expect("history");
    assert_eq!(hist, vec![("dead".to_owned(), true, Some(fail))]);
    let s = sched(&env, fail).await;
    assert_eq!(s.last_state.as_deref(), Some("dead"));
    assert_eq!(s.failure_count, 1);
    assert!(!s.is_running);
    assert!(s.next_run.expect("next_run") > now);
    disable(&env, fail).await;

    // hold: nothing is written and the fire time waits for a node.
    let hold = new_task(&env, "hold", "* * * * *", "UTC", |r| {
        r.fanout = Some("all".into());
        r.assigned_node_group = Some(Some("later".into()));
        r.no_node_policy = Some("hold".into());
        r.command = Some("echo held".into());
    })
    .await;
    set_next_run(&env, hold, due).await;
    let r = tick_at(&env.pool, now).await;
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    assert!(task_jobs(&env, hold).await.is_empty());
    assert_eq!(sched(&env, hold).await.next_run, Some(due), "held");
    let r = tick_at(&env.pool, now + chrono::Duration::seconds(1)).await;
    assert!(r.fired_jobs.is_empty(), "still held: {r:?}");
    assert_eq!(sched(&env, hold).await.next_run, Some(due), "still held");

    // A node of the group comes up: the held fire time fires on it and runs.
    env.start_worker("later-1", "later", "worker").await;
    let r = tick_at(&env.pool, now + chrono::Duration::seconds(2)).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(r.outbox.len(), 1);
    assert!(
        r.outbox[0].routing_key.starts_with("node."),
        "{:?}",
        r.outbox[0]
    );
    let jobs = task_jobs(&env, hold).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, Some(due), "the held fire time");
    let p = publisher(&env);
    let published = jobs::publish_outbox(&env.pool, &p, &r.outbox, "test")
        .await
        .expect("publish");
    assert_eq!(published, 1);
    assert_eq!(
        env.wait_terminal(jobs[0].0, Duration::from_secs(20)).await,
        "succeeded"
    );
    p.close().await;
    disable(&env, hold).await;
    env.cleanup().await;
}

// ---------------------------------------------------------- 7. end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_task_runs_on_a_worker_and_reads_back() {
    let mut env = TestEnv::new().await;
    env.settings.scheduler.tick_ms = 250;
    let api = env.start_api().await;
    env.start_worker("p1", "prod", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (id, _) = create_task_api(
        &api,
        &key,
        &json!({"taskName": "tick", "command": "echo tick", "schedule": "* * * * * *",
                "assignedNodeGroup": "prod"}),
    )
    .await;
    let pool = env.pool.clone();
    let (job, node): (Uuid, Option<Uuid>) =
        poll(Duration::from_secs(15), "a succeeded run", || {
            let pool = pool.clone();
            async move {
                sqlx::query_as(
                    "SELECT job_id, claimed_by FROM jobs
                 WHERE task_id = $1 AND status = 'succeeded' AND triggered_by = 'schedule'
                 ORDER BY completed_at LIMIT 1",
                )
                .bind(id)
                .fetch_optional(&pool)
                .await
                .expect("jobs")
            }
        })
        .await;
    let worker_node = env.wait_node(&format!("{}-p1", env.prefix)).await;
    assert_eq!(node, Some(worker_node), "ran on the prod worker");

    // Stop it firing, then the schedule state settles on the last run.
    let (status, resp) = call(
        &api,
        Method::PUT,
        &key,
        &format!("/tasks/{id}"),
        Some(&json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let state: Value = poll(Duration::from_secs(15), "schedule settles", || {
        let api = &api;
        let key = &key;
        async move {
            let (status, s) = get(api, key, &format!("/tasks/{id}/schedule")).await;
            assert_eq!(status, 200, "{s}");
            (s["isRunning"] == false && s["lastState"] == "succeeded").then_some(s)
        }
    })
    .await;
    let total = state["totalRuns"].as_i64().expect("totalRuns");
    let ok = state["successCount"].as_i64().expect("successCount");
    assert!(total >= 1 && ok >= 1, "{state}");
    assert_eq!(state["failureCount"], 0, "{state}");
    assert_eq!(state["nextRun"], Value::Null, "disabled: {state}");
    let finished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE task_id = $1 AND status = 'succeeded'")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(ok, finished, "successCount counts the succeeded runs");

    // History: newest first, output decoded.
    let (status, hist) = get(&api, &key, &format!("/tasks/{id}/history")).await;
    assert_eq!(status, 200, "{hist}");
    let entries = hist["history"].as_array().expect("history");
    assert!(!entries.is_empty(), "{hist}");
    assert_eq!(hist["count"], json!(entries.len()));
    let ids: Vec<i64> = entries
        .iter()
        .map(|h| h["historyId"].as_i64().expect("historyId"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let ours = entries
        .iter()
        .find(|h| h["jobId"] == json!(job))
        .unwrap_or_else(|| panic!("job {job} in history: {hist}"));
    assert_eq!(ours["output"], "tick\n", "{ours}");
    assert_eq!(ours["state"], "succeeded");
    assert_eq!(ours["exitCode"], 0);
    assert_eq!(ours["triggeredBy"], "schedule");
    assert_eq!(ours["isFinal"], true);
    assert_eq!(ours["attempt"], 1);
    assert_eq!(ours["nodeId"], json!(worker_node));
    assert_eq!(
        ours["nodeName"],
        json!(format!("{}-p1", env.prefix)),
        "people read node names"
    );
    // Paging.
    let (status, page) = get(&api, &key, &format!("/tasks/{id}/history?limit=1")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["count"], 1);
    assert_eq!(page["history"][0]["historyId"], json!(ids[0]));
    let (status, _) = get(&api, &key, &format!("/tasks/{id}/history?limit=0")).await;
    assert_eq!(status, 422);
    env.cleanup().await;
}

// ---------------------------------------------------- 8. run now + retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_copy_does_not_cut_a_retry_backoff_short() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("r1", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (id, _) = create_task_api(
        &api,
        &key,
        &json!({"taskName": "slow-retry", "command": "exit 3", "schedule": "@yearly",
                "maxRetries": 1, "retryDelaySeconds": 60}),
    )
    .await;
    let (status, resp) = call(&api, Method::POST, &key, &format!("/tasks/{id}/run"), None).await;
    assert_eq!(status, 202, "{resp}");
    let job: Uuid = resp["jobId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("jobId");
    // The first attempt fails; the retry waits a minute.
    let deadline = Instant::now() + Duration::from_secs(20);
    let retry_at = loop {
        let row: (String, i32, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT status, attempt, retry_at FROM jobs WHERE job_id = $1")
                .bind(job)
                .fetch_one(&env.pool)
                .await
                .expect("job");
        if let (s, 1, Some(at)) = &row
            && s == "queued"
        {
            break *at;
        }
        assert!(Instant::now() < deadline, "no retry scheduled: {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        retry_at > Utc::now() + chrono::Duration::seconds(50),
        "{retry_at}"
    );

    // A copy of the first work message turns up (a broker redelivery).
    let copy = json!({"job_id": job, "attempt": 0, "command": "exit 3",
        "execution_mode": "pool", "timeout_seconds": null, "env": {}, "priority": 5,
        "submitted_at": Utc::now()});
    env.publish_raw(
        &env.names().work(),
        "any",
        copy.to_string().as_bytes(),
        Some("job.run.v1"),
        Some(&format!("{job}:0")),
    )
    .await;
    // It is acked without running: the queue empties, the job still waits.
    let queue = env.names().work_queue("any");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, unacked): (i64, i64) = queue_depth(&queue);
        if ready == 0 && unacked == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the copy was not consumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, attempt): (String, i32) =
        sqlx::query_as("SELECT status, attempt FROM jobs WHERE job_id = $1")
            .bind(job)
            .fetch_one(&env.pool)
            .await
            .expect("job");
    assert_eq!(
        (status.as_str(), attempt),
        ("queued", 1),
        "the copy ran the retry early"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM task_history WHERE job_id = $1")
        .bind(job)
        .fetch_one(&env.pool)
        .await
        .expect("history");
    assert_eq!(runs, 1);

    // Cancelled while it waits for its retry: one final history row, after
    // the failed attempt's.
    let (status, resp) = call(
        &api,
        Method::POST,
        &key,
        &format!("/jobs/{job}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{resp}");
    env.wait_status(job, "cancelled", Duration::from_secs(5))
        .await;
    let rows: Vec<(i32, String, bool)> = sqlx::query_as(
        "SELECT attempt, state, is_final FROM task_history WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(job)
    .fetch_all(&env.pool)
    .await
    .expect("history");
    assert_eq!(
        rows,
        vec![
            (1, "failed".to_owned(), false),
            (2, "cancelled".to_owned(), true)
        ]
    );
    let reason: Option<String> =
        sqlx::query_scalar("SELECT status_reason FROM jobs WHERE job_id = $1")
            .bind(job)
            .fetch_one(&env.pool)
            .await
            .expect("reason");
    assert_eq!(
        reason.as_deref(),
        Some("cancelled while waiting for its retry")
    );
    env.cleanup().await;
}

/// Ready and unacknowledged messages of a queue, from rabbitmqctl.
fn queue_depth(queue: &str) -> (i64, i64) {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(queue)).then(|| {
                let n = |x: Option<&str>| x.and_then(|v| v.parse().ok()).unwrap_or(0);
                (n(f.next()), n(f.next()))
            })
        })
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_retries_with_exponential_backoff() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("r1", "default", "worker").await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (id, _) = create_task_api(
        &api,
        &key,
        &json!({"taskName": "flaky", "command": "exit 3", "schedule": "@yearly",
                "maxRetries": 2, "retryDelaySeconds": 1}),
    )
    .await;

    let (status, resp) = call(&api, Method::POST, &key, &format!("/tasks/{id}/run"), None).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["success"], true);
    assert_eq!(resp["taskId"], json!(id));
    let job: Uuid = resp["jobId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("jobId");
    assert_eq!(
        env.wait_terminal(job, Duration::from_secs(30)).await,
        "failed"
    );
    let (exit_code, triggered, task_id, attempt, fire_at): (
        Option<i32>,
        String,
        Option<Uuid>,
        i32,
        Option<DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT exit_code, triggered_by, task_id, attempt, fire_at FROM jobs WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&env.pool)
    .await
    .expect("job");
    assert_eq!(exit_code, Some(3));
    assert_eq!(triggered, "manual");
    assert_eq!(task_id, Some(id));
    assert_eq!(attempt, 3);
    assert_eq!(fire_at, None, "a manual run has no fire time");

    type Row = (
        i32,
        String,
        bool,
        Option<i32>,
        Option<DateTime<Utc>>,
        DateTime<Utc>,
        String,
        Option<Uuid>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT attempt, state, is_final, exit_code, start_time, end_time, triggered_by, task_id
         FROM task_history WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(job)
    .fetch_all(&env.pool)
    .await
    .expect("history");
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.0, i as i32 + 1, "attempt numbers: {rows:?}");
        assert_eq!(r.1, "failed", "{rows:?}");
        assert_eq!(r.2, i == 2, "only the last row is final: {rows:?}");
        assert_eq!(r.3, Some(3));
        assert_eq!(r.6, "manual");
        assert_eq!(r.7, Some(id));
    }
    let gap = |a: &Row, b: &Row| b.4.expect("start_time") - a.5;
    let g1 = gap(&rows[0], &rows[1]);
    let g2 = gap(&rows[1], &rows[2]);
    assert!(
        g1 >= chrono::Duration::seconds(1),
        "first retry waits retryDelaySeconds (1 s): {g1}"
    );
    assert!(
        g2 >= chrono::Duration::seconds(2),
        "second retry waits twice as long (2 s): {g2}"
    );

    let s = sched(&env, id).await;
    assert_eq!(s.failure_count, 1, "one run failed: {s:?}");
    assert_eq!(s.success_count, 0);
    assert_eq!(s.total_runs, 1);
    assert_eq!(s.last_state.as_deref(), Some("failed"));
    assert!(!s.is_running);
    let (status, state) = get(&api, &key, &format!("/tasks/{id}/schedule")).await;
    assert_eq!(status, 200);
    assert_eq!(state["failureCount"], 1, "{state}");
    assert_eq!(state["lastState"], "failed");
    // The manual run did not move the yearly schedule.
    let yearly = s.next_run.expect("next_run");
    assert!(yearly > Utc::now());
    assert_eq!(
        (yearly.month(), yearly.day(), yearly.hour(), yearly.minute()),
        (1, 1, 0, 0),
        "@yearly in UTC: {yearly}"
    );
    env.cleanup().await;
}

// ------------------------------------------------ cancelling a queued run

/// Cancelling a task's run before it starts ends that run for the task too:
/// the schedule is free again (an overlap-skip task fires at its next time)
/// and the cancelled run shows in the task's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_task_run_frees_the_schedule() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    // No worker of this group: the run waits in its queue.
    let task = new_task(&env, "waits", "* * * * *", "UTC", |r| {
        r.assigned_node_group = Some(Some("idle".into()));
    })
    .await;
    let now = now_s();
    set_next_run(&env, task, now - chrono::Duration::seconds(1)).await;
    let r = tick_at(&env.pool, now).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    let job = r.fired_jobs[0];
    assert!(sched(&env, task).await.is_running);

    let (status, resp) = call(
        &api,
        Method::POST,
        &key,
        &format!("/jobs/{job}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{resp}");
    env.wait_status(job, "cancelled", Duration::from_secs(5))
        .await;

    // Every consequence is checked, then reported together.
    let mut problems = Vec::new();
    // The cancelled run is in the task's history.
    let (status, hist) = get(&api, &key, &format!("/tasks/{task}/history")).await;
    assert_eq!(status, 200, "{hist}");
    if !hist["history"]
        .as_array()
        .expect("history")
        .iter()
        .any(|h| h["jobId"] == json!(job) && h["state"] == "cancelled")
    {
        let row: Option<(Option<Uuid>, String)> =
            sqlx::query_as("SELECT task_id, state FROM task_history WHERE job_id = $1")
                .bind(job)
                .fetch_optional(&env.pool)
                .await
                .expect("history row");
        problems.push(format!(
            "GET /tasks/{{id}}/history lacks the cancelled run {job} (its task_history row, as \
             (task_id, state): {row:?}): {hist}"
        ));
    }
    // The schedule no longer counts the run as going.
    let s = sched(&env, task).await;
    if s.is_running || s.last_state.as_deref() != Some("cancelled") {
        problems.push(format!(
            "task_schedule after the cancel: want is_running false and last_state \
             \"cancelled\"; got {s:?}"
        ));
    }
    // The next fire time fires (overlap policy skip).
    let next = s.next_run.expect("next_run");
    let r = tick_at(&env.pool, next + chrono::Duration::seconds(1)).await;
    if r.fired_jobs.len() != 1 {
        problems.push(format!(
            "the next fire time {next} did not fire after the run was cancelled: {r:?}"
        ));
    }
    // Clean up first: the assertion below fails on known product bugs.
    env.cleanup().await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------- 9. retention

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_rows_by_outcome() {
    let env = TestEnv::new().await;
    let insert = |status: &'static str, days: i64| {
        let pool = env.pool.clone();
        async move {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO jobs (job_id, user_id, job_name, command, status, submitted_at, completed_at, success)
                 VALUES ($1, 'x', 'old', 'true', $2, now() - make_interval(days => $3::int) - interval '1 minute',
                         now() - make_interval(days => $3::int), $2 = 'succeeded')",
            )
            .bind(id)
            .bind(status)
            .bind(days as i32)
            .execute(&pool)
            .await
            .expect("insert job");
            id
        }
    };
    let old_ok = insert("succeeded", 10).await;
    let old_failed = insert("failed", 10).await;
    let recent_ok = insert("succeeded", 1).await;
    let ancient_dead = insert("dead", 40).await;
    let ancient_running: Uuid = {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (job_id, user_id, job_name, command, status, submitted_at)
             VALUES ($1, 'x', 'long', 'sleep 1000', 'running', now() - interval '40 days')",
        )
        .bind(id)
        .execute(&env.pool)
        .await
        .expect("insert running job");
        id
    };
    for (job, state) in [
        (old_ok, "succeeded"),
        (old_failed, "failed"),
        (recent_ok, "succeeded"),
    ] {
        sqlx::query(
            "INSERT INTO task_history (job_id, attempt, state, is_final, end_time)
             VALUES ($1, 1, $2, true, now() - interval '10 days')",
        )
        .bind(job)
        .bind(state)
        .execute(&env.pool)
        .await
        .expect("insert history");
    }
    let old_change: i64 = sqlx::query_scalar(
        "INSERT INTO data_change (change_id, table_name, record_id, action, changed_by, changed_at)
         VALUES ($1, 'jobs', 'x', 'UPDATE', 'test', now() - interval '40 days') RETURNING change_seq",
    )
    .bind(Uuid::now_v7())
    .fetch_one(&env.pool)
    .await
    .expect("insert change");
    let recent_change: i64 = sqlx::query_scalar(
        "INSERT INTO data_change (change_id, table_name, record_id, action, changed_by, changed_at)
         VALUES ($1, 'jobs', 'y', 'UPDATE', 'test', now() - interval '20 days') RETURNING change_seq",
    )
    .bind(Uuid::now_v7())
    .fetch_one(&env.pool)
    .await
    .expect("insert change");

    let pruned = retention::prune(
        &env.pool,
        &RetentionSettings {
            success_days: 7,
            failure_days: 30,
            change_days: 30,
            interval_secs: 3600,
        },
    )
    .await
    .expect("prune");
    assert_eq!(pruned.succeeded_jobs, 1, "{pruned:?}");
    assert_eq!(pruned.failed_jobs, 1, "{pruned:?}");
    assert_eq!(pruned.changes, 1, "{pruned:?}");

    let left: BTreeSet<Uuid> = sqlx::query_scalar("SELECT job_id FROM jobs WHERE user_id = 'x'")
        .fetch_all(&env.pool)
        .await
        .expect("jobs left")
        .into_iter()
        .collect();
    assert_eq!(
        left,
        BTreeSet::from([old_failed, recent_ok, ancient_running]),
        "kept: the 10-day failure, the recent success, the unfinished job"
    );
    assert!(!left.contains(&ancient_dead));
    let hist: BTreeSet<Uuid> = sqlx::query_scalar("SELECT job_id FROM task_history")
        .fetch_all(&env.pool)
        .await
        .expect("history left")
        .into_iter()
        .collect();
    assert_eq!(
        hist,
        BTreeSet::from([old_failed, recent_ok]),
        "history goes with its job"
    );
    let changes: Vec<i64> = sqlx::query_scalar(
        "SELECT change_seq FROM data_change WHERE change_seq = ANY($1) ORDER BY change_seq",
    )
    .bind(vec![old_change, recent_change])
    .fetch_all(&env.pool)
    .await
    .expect("changes left");
    assert_eq!(changes, vec![recent_change]);
    // A second pass has nothing to do.
    let again = retention::prune(
        &env.pool,
        &RetentionSettings {
            success_days: 7,
            failure_days: 30,
            change_days: 30,
            interval_secs: 3600,
        },
    )
    .await
    .expect("prune");
    assert_eq!(
        (again.succeeded_jobs, again.failed_jobs, again.changes),
        (0, 0, 0)
    );
    env.cleanup().await;
}

// ------------------------------------------------------------------ 10. CLI

/// Runs the `taskhost` binary without the caller's URL and key variables;
/// returns `(exit code, stdout, stderr)`. (Also used by `console`.)
pub(crate) async fn taskhost(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskhost"))
        .args(args)
        .env_remove("TASKHOST_URL")
        .env_remove("TASKHOST_API_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run taskhost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_lists_and_runs_tasks() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let conn = ["--url", api.base.as_str(), "--key", key.as_str()];

    let mut args = vec![
        "tasks",
        "create",
        "--name",
        "cli-task",
        "--command",
        "echo hi",
        "--schedule",
        "@daily",
        "--group",
        "prod",
    ];
    args.extend(conn);
    let (code, out, err) = taskhost(&args).await;
    assert_eq!(code, 0, "tasks create failed: {err}");
    let id: Uuid = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("stdout should be the task id alone: {out:?} ({err})"));
    let t = tasks::get(&env.pool, id)
        .await
        .expect("get")
        .expect("task exists");
    assert_eq!(t.task_name, "cli-task");
    assert_eq!(t.command, "echo hi");
    assert_eq!(t.schedule, "@daily");
    assert_eq!(t.assigned_node_group.as_deref(), Some("prod"));
    assert_eq!(t.created_by, "alice");

    let mut args = vec!["tasks", "list"];
    args.extend(conn);
    let (code, out, err) = taskhost(&args).await;
    assert_eq!(code, 0, "tasks list failed: {err}");
    let line = out
        .lines()
        .find(|l| l.contains("cli-task"))
        .unwrap_or_else(|| panic!("cli-task not listed: {out}"));
    assert!(line.contains(&id.to_string()), "{line}");
    assert!(line.contains("group=prod"), "{line}");
    assert!(out.contains("diagnostics"), "{out}");

    let id_s = id.to_string();
    let mut args = vec!["tasks", "run", id_s.as_str()];
    args.extend(conn);
    let (code, out, err) = taskhost(&args).await;
    assert_eq!(code, 0, "tasks run failed: {err}");
    let job: Uuid = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("stdout should be the job id alone: {out:?} ({err})"));
    let (task_id, triggered, user): (Option<Uuid>, String, String) =
        sqlx::query_as("SELECT task_id, triggered_by, user_id FROM jobs WHERE job_id = $1")
            .bind(job)
            .fetch_one(&env.pool)
            .await
            .expect("the job exists");
    assert_eq!(task_id, Some(id));
    assert_eq!(triggered, "manual");
    assert_eq!(user, "alice");

    let mut args = vec!["tasks", "history", id_s.as_str()];
    args.extend(conn);
    let (code, out, err) = taskhost(&args).await;
    assert_eq!(code, 0, "tasks history failed: {err}");
    assert!(out.contains("JOB ID"), "{out}");

    let mut args = vec![
        "tasks",
        "create",
        "--name",
        "cli-bad",
        "--command",
        "echo hi",
        "--schedule",
        "every day",
    ];
    args.extend(conn);
    let (code, out, err) = taskhost(&args).await;
    assert_ne!(code, 0, "a bad schedule must fail: {out} {err}");
    assert!(
        err.contains("schedule"),
        "stderr should name schedule: {err}"
    );
    assert!(out.trim().is_empty(), "nothing on stdout: {out}");
    assert!(
        tasks::list(&env.pool)
            .await
            .expect("list")
            .iter()
            .all(|t| t.task_name != "cli-bad")
    );

    // A key without task roles is refused, non-zero.
    let reader = env.key("bob", &[]).await;
    let (code, _, err) =
        taskhost(&["tasks", "run", &id_s, "--url", &api.base, "--key", &reader]).await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    env.cleanup().await;
}

// ------------------------------------- 11. catch-up, batches, wake on change

/// A per-second task 5 s behind fires all 5 missed fire times in one pass,
/// each its own job; with overlap skip only the first fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pass_catches_up_every_fire_time_within_the_grace() {
    let env = TestEnv::new().await;
    let t = now_s();
    let now = t - chrono::Duration::milliseconds(500);
    let secs = |k: i64| t + chrono::Duration::seconds(k);

    let task = new_task(&env, "every-second", "* * * * * *", "UTC", allow).await;
    set_next_run(&env, task, secs(-5)).await;
    let r = tick_at(&env.pool, now).await;
    assert_eq!(r.fired_jobs.len(), 5, "{r:?}");
    assert_eq!(r.outbox.len(), 5);
    assert_eq!(r.skipped, 0);
    assert!(!r.more, "{r:?}");
    let jobs = task_jobs(&env, task).await;
    let fire_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.1).collect();
    assert_eq!(
        fire_ats,
        (-5..0).map(|k| Some(secs(k))).collect::<Vec<_>>(),
        "five distinct consecutive fire times"
    );
    let ids: BTreeSet<Uuid> = jobs.iter().map(|j| j.0).collect();
    assert_eq!(ids, r.fired_jobs.iter().copied().collect());
    let s = sched(&env, task).await;
    assert_eq!(s.next_run, Some(t), "the first fire time after now");
    assert_eq!(s.last_run, Some(secs(-1)));
    assert_eq!(s.total_runs, 5);
    assert_eq!(s.last_state.as_deref(), Some("queued"));
    // One change row per job, one for the schedule row.
    assert_eq!(
        change_counts(&env, jobs[0].0).await,
        BTreeMap::from([(("jobs".to_owned(), "INSERT".to_owned()), 1)])
    );
    let schedule_updates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change WHERE table_name = 'task_schedule' AND record_id = $1
         AND action = 'UPDATE' AND changed_by = 'scheduler'",
    )
    .bind(task.to_string())
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(schedule_updates, 1, "one schedule update for the pass");
    // The same instant again fires nothing.
    let r = tick_at(&env.pool, now).await;
    assert!(r.fired_jobs.is_empty(), "{r:?}");
    disable(&env, task).await;

    // Overlap skip: the first fire time fires and makes the task running,
    // so the rest of the series is skipped.
    let skip = new_task(&env, "every-second-skip", "* * * * * *", "UTC", |_| {}).await;
    set_next_run(&env, skip, secs(-5)).await;
    let r = tick_at(&env.pool, now).await;
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(r.skipped, 4, "{r:?}");
    let jobs = task_jobs(&env, skip).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, Some(secs(-5)));
    let s = sched(&env, skip).await;
    assert_eq!(s.next_run, Some(t));
    assert!(s.is_running);
    assert_eq!(s.total_runs, 1);
    assert_eq!(s.last_state.as_deref(), Some("skipped"));
    env.cleanup().await;
}

/// Past the grace the misfire policy decides for the whole backlog:
/// catch_up fires one run (the oldest fire time), skip none; both resume at
/// the first fire time after now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_past_the_grace_follows_the_misfire_policy() {
    let env = TestEnv::new().await;
    let t = now_s();
    let now = t - chrono::Duration::milliseconds(500);
    let old = t - chrono::Duration::seconds(5);
    let catch_up = new_task(&env, "catch-up", "* * * * * *", "UTC", allow).await;
    let skip = new_task(&env, "skip", "* * * * * *", "UTC", |r| {
        allow(r);
        r.misfire_policy = Some("skip".into());
    })
    .await;
    set_next_run(&env, catch_up, old).await;
    set_next_run(&env, skip, old).await;
    // A 3 s grace: t-5 s is 4.5 s old, a misfire.
    let r = cron::tick(&env.pool, now, policy(3)).await.expect("tick");
    assert_eq!(r.fired_jobs.len(), 1, "{r:?}");
    assert_eq!(r.skipped, 1, "{r:?}");
    let jobs = task_jobs(&env, catch_up).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, r.fired_jobs[0]);
    assert_eq!(
        jobs[0].1,
        Some(old),
        "the catch-up run keeps the missed time"
    );
    assert!(task_jobs(&env, skip).await.is_empty());
    for task in [catch_up, skip] {
        assert_eq!(sched(&env, task).await.next_run, Some(t), "first after now");
    }
    assert_eq!(sched(&env, catch_up).await.total_runs, 1);
    assert_eq!(
        sched(&env, skip).await.last_state.as_deref(),
        Some("skipped")
    );
    env.cleanup().await;
}

/// Inserts `n` enabled per-minute tasks (overlap allow) due at `at`,
/// straight into `tasks` and `task_schedule`; returns their ids.
async fn insert_due_tasks(env: &TestEnv, n: i64, at: DateTime<Utc>) -> Vec<Uuid> {
    sqlx::query_scalar(
        "WITH t AS (
             INSERT INTO tasks (task_id, task_name, app_name, command, execution_mode, schedule,
                                timezone, overlap_policy, created_by)
             SELECT gen_random_uuid(), 'bulk-' || k, 'bulk', 'noop', 'inline', '* * * * *', 'UTC',
                    'allow', 'alice'
             FROM generate_series(1, $1) AS k
             RETURNING task_id)
         INSERT INTO task_schedule (task_id, next_run) SELECT task_id, $2 FROM t
         RETURNING task_id",
    )
    .bind(n)
    .bind(at)
    .fetch_all(&env.pool)
    .await
    .expect("insert tasks")
}

/// A full pass and more of due tasks fire in set-based passes
/// until drained, one job each; two concurrent ticks share the work and
/// never fire a (task, fire time) twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_due_tasks_fire_in_batches_exactly_once_with_two_ticks() {
    let env = TestEnv::new().await;
    let t0 = utc("2026-12-01T00:00:00Z");
    // One full pass and a bit more.
    let n = cron::TASK_BATCH + 50;
    let ids = insert_due_tasks(&env, n, t0).await;
    let n = n as usize;
    let now = t0 + chrono::Duration::seconds(1);
    let mut fired = Vec::new();
    let mut passes = 0;
    loop {
        let r = tick_at(&env.pool, now).await;
        passes += 1;
        assert!(
            r.fired_jobs.len() <= cron::TASK_BATCH as usize,
            "a pass fires a batch at most: {}",
            r.fired_jobs.len()
        );
        assert_eq!(r.outbox.len(), r.fired_jobs.len());
        fired.extend(r.fired_jobs);
        if !r.more {
            break;
        }
        assert!(passes < 10, "passes never drain");
    }
    assert_eq!(passes, 2, "{n} tasks: a full pass, then 50");
    let per_task: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT t, count(j.job_id) FROM UNNEST($1::uuid[]) AS t
         LEFT JOIN jobs j ON j.task_id = t AND j.fire_at = $2 GROUP BY t",
    )
    .bind(&ids)
    .bind(t0)
    .fetch_all(&env.pool)
    .await
    .expect("per task");
    assert_eq!(per_task.len(), n);
    assert!(
        per_task.iter().all(|(_, n)| *n == 1),
        "one job per task: {:?}",
        per_task.iter().filter(|(_, n)| *n != 1).collect::<Vec<_>>()
    );
    assert_eq!(fired.iter().collect::<BTreeSet<_>>().len(), n);
    let (changes, outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM data_change WHERE table_name = 'jobs' AND action = 'INSERT'),
                (SELECT count(*) FROM outbox)",
    )
    .fetch_one(&env.pool)
    .await
    .expect("counts");
    assert_eq!((changes, outbox), (n as i64, n as i64));
    let next: Vec<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT DISTINCT next_run FROM task_schedule WHERE task_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .expect("next_run");
    assert_eq!(next, vec![Some(t0 + chrono::Duration::minutes(1))]);

    // Two ticks at once on the same pool, pass after pass until drained.
    let t1 = t0 + chrono::Duration::minutes(1);
    let now = t1 + chrono::Duration::seconds(1);
    let mut a_jobs = Vec::new();
    let mut b_jobs = Vec::new();
    for round in 0.. {
        assert!(round < 20, "two ticks never drain");
        let (a, b) = tokio::join!(tick_at(&env.pool, now), tick_at(&env.pool, now));
        let done = !a.more && !b.more && a.fired_jobs.is_empty() && b.fired_jobs.is_empty();
        a_jobs.extend(a.fired_jobs);
        b_jobs.extend(b.fired_jobs);
        if done {
            break;
        }
    }
    assert_eq!(a_jobs.len() + b_jobs.len(), n, "together they fire all");
    let a_set: BTreeSet<Uuid> = a_jobs.iter().copied().collect();
    assert!(b_jobs.iter().all(|j| !a_set.contains(j)));
    let dups: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT task_id, count(*) FROM jobs WHERE fire_at = $1 GROUP BY task_id HAVING count(*) <> 1",
    )
    .bind(t1)
    .fetch_all(&env.pool)
    .await
    .expect("dups");
    assert!(dups.is_empty(), "fired twice: {dups:?}");
    let fired_t1: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT task_id) FROM jobs WHERE fire_at = $1")
            .bind(t1)
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(fired_t1, n as i64);
    let runs: i64 = sqlx::query_scalar(
        "SELECT sum(total_runs)::int8 FROM task_schedule WHERE task_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&env.pool)
    .await
    .expect("runs");
    assert_eq!(runs, 2 * n as i64);
    sqlx::query("UPDATE tasks SET enabled = false WHERE app_name = 'bulk'")
        .execute(&env.pool)
        .await
        .expect("disable");
    env.cleanup().await;
}

/// A running scheduler with a 30 s longest sleep wakes when a task is
/// created (NOTIFY), then sleeps until each due fire time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_task_wakes_a_sleeping_scheduler() {
    let mut env = TestEnv::new().await;
    env.settings.scheduler.tick_ms = 30_000;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    // Let the scheduler run its first pass and go to sleep (nothing is due).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let created = Instant::now();
    let (id, _) = create_task_api(
        &api,
        &key,
        &json!({"taskName": "wake", "command": "true", "schedule": "* * * * * *",
                "overlapPolicy": "allow"}),
    )
    .await;
    let pool = env.pool.clone();
    let count = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE task_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    poll(Duration::from_secs(2), "the first job within ~2 s", || {
        let c = count();
        async move { (c.await >= 1).then_some(()) }
    })
    .await;
    let first = created.elapsed();
    // Later fire times come without a wake-up: the loop sleeps until each.
    poll(Duration::from_secs(4), "three jobs within ~4 s", || {
        let c = count();
        async move { (c.await >= 3).then_some(()) }
    })
    .await;
    let late: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM submitted_at - fire_at)::float8 FROM jobs WHERE task_id = $1",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .expect("lateness");
    assert!(
        late.iter().all(|s| *s < 0.5),
        "fired on time, not on a poll: {late:?}"
    );
    tracing::info!(?first, ?late, "wake test");
    disable(&env, id).await;
    env.cleanup().await;
}
