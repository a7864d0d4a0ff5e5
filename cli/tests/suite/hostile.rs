//! Hostile and careless input, as the defects of issue #10 found it: each
//! test failed before its fix. NUL characters anywhere, poison queue
//! messages, a message id that is another user's job, a cursor beyond the
//! feed's head, run-now racing a delete, an inline task changed without
//! `debug`, contract slips, Postgres going away under the api, and (found
//! by `scripts/fuzz-api`) a task changed or deleted while a worker records
//! one of its runs.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::messages::JOB_SUBMIT_V1;
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, call, get, job_id, submit};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::jobs::{DeadMsg, wait_dead};

fn message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn publish_submit(env: &TestEnv, body: &Value, id: Uuid) {
    env.publish_raw(
        &env.names().submit(),
        "submit",
        body.to_string().as_bytes(),
        Some(JOB_SUBMIT_V1),
        Some(&id.to_string()),
    )
    .await;
}

#[tokio::test]
async fn poison_messages_go_to_dead_at_once_and_never_stall_the_submit_queue() {
    let mut env = TestEnv::new().await;
    env.start_scheduler().await;
    env.start_worker("w", "default", "worker").await;
    env.key("alice", &[Role::TaskManager]).await;
    let mut poison = Vec::new();
    for i in 0..30 {
        let id = Uuid::now_v7();
        let body = json!({"userId": format!("al\u{0}ice{i}"), "jobName": "p", "command": "true"});
        publish_submit(&env, &body, id).await;
        poison.push(id);
    }
    let good = Uuid::now_v7();
    publish_submit(
        &env,
        &json!({"userId": "alice", "jobName": "good", "command": "echo ok"}),
        good,
    )
    .await;
    let t = Instant::now();
    let status = env.wait_terminal(good, Duration::from_secs(15)).await;
    assert_eq!(status, "succeeded", "the good message behind the poison");
    assert!(t.elapsed() < Duration::from_secs(15));
    let mut seen: Vec<DeadMsg> = Vec::new();
    for id in &poison {
        let dead = wait_dead(&env, &mut seen, &id.to_string(), Duration::from_secs(10)).await;
        let reason = dead.reason.unwrap_or_default();
        assert!(reason.contains("userId"), "{reason}");
        assert!(reason.contains("NUL"), "{reason}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_id_naming_another_users_job_is_dead_lettered() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    env.key("mallory", &[Role::TaskManager]).await;
    let (status, body) = submit(&api, &bob, &json!({"jobName": "b", "command": "true"})).await;
    assert_eq!(status, 202, "{body}");
    let bobs = job_id(&body);
    publish_submit(
        &env,
        &json!({"userId": "mallory", "jobName": "m", "command": "id"}),
        bobs,
    )
    .await;
    let mut seen = Vec::new();
    let dead = wait_dead(&env, &mut seen, &bobs.to_string(), Duration::from_secs(10)).await;
    let reason = dead.reason.unwrap_or_default();
    assert!(reason.contains("another user's job"), "{reason}");
    let owner: String = sqlx::query_scalar("SELECT user_id FROM jobs WHERE job_id = $1")
        .bind(bobs)
        .fetch_one(&env.pool)
        .await
        .expect("bob's job");
    assert_eq!(owner, "bob");
    env.cleanup().await;
}

#[tokio::test]
async fn nul_in_any_text_field_or_url_is_422_naming_the_field() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env
        .key(
            "alice",
            &[Role::TaskManager, Role::Debug, Role::SystemAdmin],
        )
        .await;
    let task = json!({"taskName": "t", "command": "true", "schedule": "@hourly"});
    let (status, created) = call(&api, Method::POST, &key, "/tasks", Some(&task)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["taskId"].as_str().expect("taskId").to_owned();
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/tasks".into(),
            json!({"taskName": "t2", "command": "true", "schedule": "@hourly", "tags": ["ok", "b\u{0}d"]}),
            "tags[1]",
        ),
        (
            Method::POST,
            "/tasks".into(),
            json!({"taskName": "t3", "appName": "a\u{0}", "command": "true", "schedule": "@hourly"}),
            "appName",
        ),
        (
            Method::PUT,
            format!("/tasks/{id}"),
            json!({"parameters": {"k\u{0}": "v"}}),
            "parameters.k\\u0000 (a key)",
        ),
        (
            Method::PUT,
            format!("/tasks/{id}"),
            json!({"parameters": {"k": "v\u{0}"}}),
            "parameters.k",
        ),
        (
            Method::POST,
            "/jobs/submit".into(),
            json!({"jobName": "j", "command": "true", "env": {"A": "\u{0}"}}),
            "env.A",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, answer) = call(&api, method.clone(), &key, &path, Some(&body)).await;
        assert_eq!(status, 422, "{method} {path} {body}: {answer}");
        let msg = message(&answer);
        assert!(msg.contains(field), "{field} not named in {msg}");
        assert!(msg.contains("NUL"), "{msg}");
    }
    // A body is an object, never the fields as an array.
    let resp = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"["j","echo hi",null,null,null,null,null,null]"#)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 422, "an array body");
    let (status, answer) = get(&api, &key, "/changes?consumer=a%00b").await;
    assert_eq!(status, 422, "{answer}");
    assert!(message(&answer).contains("NUL"), "{answer}");
    let names: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE task_name IN ('t2', 't3')")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(names, 0, "nothing refused was stored");
    env.cleanup().await;
}

#[tokio::test]
async fn run_now_on_a_task_deleted_meanwhile_is_404_and_inline_tasks_stay_debugs() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let debug = env.key("dev", &[Role::TaskManager, Role::Debug]).await;
    let manager = env.key("tm", &[Role::TaskManager]).await;

    // An inline task may not be changed or deleted without debug.
    let inline = json!({"taskName": "in", "command": "noop", "schedule": "@hourly", "executionMode": "inline"});
    let (status, created) = call(&api, Method::POST, &debug, "/tasks", Some(&inline)).await;
    assert_eq!(status, 201, "{created}");
    let id = created["taskId"].as_str().expect("taskId").to_owned();
    let (status, answer) = call(
        &api,
        Method::PUT,
        &manager,
        &format!("/tasks/{id}"),
        Some(&json!({"executionMode": "pool", "command": "id"})),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = call(
        &api,
        Method::DELETE,
        &manager,
        &format!("/tasks/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let command: String = sqlx::query_scalar("SELECT command FROM tasks WHERE task_id = $1::uuid")
        .bind(&id)
        .fetch_one(&env.pool)
        .await
        .expect("still there");
    assert_eq!(command, "noop");

    // Run-now racing a delete: the task vanishes between the handler's read
    // and the job's insert (a trigger deletes it at that moment).
    let pool_task = json!({"taskName": "race", "command": "true", "schedule": "@hourly"});
    let (status, created) = call(&api, Method::POST, &manager, "/tasks", Some(&pool_task)).await;
    assert_eq!(status, 201, "{created}");
    let race = created["taskId"].as_str().expect("taskId").to_owned();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION vanish() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN DELETE FROM tasks WHERE task_id = NEW.task_id; RETURN NEW; END $$;
         CREATE TRIGGER vanish BEFORE INSERT ON jobs FOR EACH ROW
         WHEN (NEW.task_id = '{race}'::uuid) EXECUTE FUNCTION vanish();"
    )))
    .execute(&env.pool)
    .await
    .expect("trigger");
    let (status, answer) = call(
        &api,
        Method::POST,
        &manager,
        &format!("/tasks/{race}/run"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    env.cleanup().await;
}

/// Sends `method path` while another transaction holds the task's schedule
/// row, as a worker recording one of the task's runs does, and once the
/// request waits, takes what that worker takes next: KEY SHARE on the task
/// row (the foreign key of the history row it inserts). Returns the answer.
async fn write_while_a_run_is_recorded(
    env: &TestEnv,
    api: &taskhost_testkit::Api,
    key: &str,
    method: Method,
    task: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let task_id: Uuid = task.parse().expect("task id");
    let mut worker = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM task_schedule WHERE task_id = $1 FOR UPDATE")
        .bind(task_id)
        .execute(&mut *worker)
        .await
        .expect("lock the schedule row");
    let path = format!("/tasks/{task}");
    let request = call(api, method, key, &path, body);
    let waiting = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiters: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&env.pool)
            .await
            .expect("pg_stat_activity");
            if waiters > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the request never waited for the row"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sqlx::query("SELECT 1 FROM tasks WHERE task_id = $1 FOR KEY SHARE")
            .bind(task_id)
            .execute(&mut *worker)
            .await
            .expect("key share on the task row");
        worker.commit().await.expect("commit");
    };
    let (answer, ()) = tokio::join!(request, waiting);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_changed_or_deleted_while_a_run_is_recorded_is_not_a_500() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let manager = env.key("mia", &[Role::TaskManager]).await;
    let create = |name: &str| json!({"taskName": name, "command": "true", "schedule": "@yearly"});
    let mut ids = Vec::new();
    for name in ["changed", "deleted"] {
        let (status, created) =
            call(&api, Method::POST, &manager, "/tasks", Some(&create(name))).await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["taskId"].as_str().expect("taskId").to_owned());
    }
    // Changing the schedule locks the task row, then its schedule row.
    let change = json!({"enabled": false});
    let (status, answer) =
        write_while_a_run_is_recorded(&env, &api, &manager, Method::PUT, &ids[0], Some(&change))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["enabled"], false, "{answer}");
    // Deleting it locks the task row, then (cascading) its schedule row.
    let (status, answer) =
        write_while_a_run_is_recorded(&env, &api, &manager, Method::DELETE, &ids[1], None).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = call(
        &api,
        Method::GET,
        &manager,
        &format!("/tasks/{}", ids[1]),
        None,
    )
    .await;
    assert_eq!(status, 404, "the deleted task is gone");
    env.cleanup().await;
}

#[tokio::test]
async fn contract_slips_cursor_beyond_head_bearer_case_and_sync_trigger_bodies() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    let (status, answer) = get(&api, &admin, "/changes?consumer=c1&since=99999999999999").await;
    assert_eq!(status, 422, "{answer}");
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT last_change_seq FROM sync_state WHERE consumer = 'c1'")
            .fetch_optional(&env.pool)
            .await
            .expect("cursor");
    assert_eq!(stored, None, "a refused cursor was stored");

    let resp = api
        .http
        .get(api.v1("/nodes"))
        .header("Authorization", format!("BEARER {admin}"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "the scheme is case-insensitive"
    );

    let resp = api
        .http
        .post(api.v1("/sync/trigger"))
        .bearer_auth(&admin)
        .body("not json")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 400);
    let (status, answer) = call(
        &api,
        Method::POST,
        &admin,
        "/sync/trigger",
        Some(&json!({"consumer": "c2", "resetTo": null})),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    env.cleanup().await;
}

/// A TCP forwarder to Postgres that the test can cut and restore, so one
/// api (and only it) loses its database.
struct CutProxy {
    addr: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CutProxy {
    async fn start(addr: Option<String>) -> Self {
        let listener = TcpListener::bind(addr.as_deref().unwrap_or("127.0.0.1:0"))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                links.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    let _ = inbound.shutdown().await;
                });
            }
        });
        Self {
            addr,
            task: Some(task),
        }
    }

    /// Closes the listener and every forwarded connection.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[tokio::test]
async fn with_postgres_gone_the_api_answers_503_at_once_and_notices_its_return() {
    let mut env = TestEnv::new().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let mut proxy = CutProxy::start(None).await;
    let mut settings = env.settings.clone();
    settings.database.url = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    settings.database.acquire_timeout_secs = 2;
    let api = env.start_api_with(settings).await;
    let body = json!({"jobName": "j", "command": "true"});
    let (status, answer) = submit(&api, &key, &body).await;
    assert_eq!(status, 202, "{answer}");

    proxy.cut();
    // The first request finds out (within the acquire timeout) ...
    let (status, _) = submit(&api, &key, &body).await;
    assert_eq!(status, 503);
    // ... and the next ones are answered at once, with Retry-After.
    for _ in 0..5 {
        let t = Instant::now();
        let resp = api
            .http
            .post(api.v1("/jobs/submit"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 503);
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }
    // Postgres back: noticed within about a second.
    let _back = CutProxy::start(Some(proxy.addr.clone())).await;
    let t = Instant::now();
    loop {
        let (status, answer) = submit(&api, &key, &body).await;
        if status == 202 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still {status} after {:?}: {answer}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup().await;
}
