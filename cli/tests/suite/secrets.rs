//! Secret environment values (README, "Secrets"): a job's `secretEnv` and
//! a task's `secretEnvironment` reach the command, are masked in its stored
//! output, show as names with `***` in every answer, and are never stored
//! in clear: not in `jobs`, `tasks`, `data_change`, `task_history` or the
//! outbox (whose messages are what the broker carries).

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use taskhost_common::changelog;
use taskhost_common::messages::JOB_SUBMIT_V1;
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TEST_SECRETS_KEY, TestEnv, call, get, job_id, submit};
use uuid::Uuid;

/// The secret every test hides.
const SECRET: &str = "s3cr3t-value";
/// A command that proves the value arrived, then prints it (to be masked).
/// Its own text does not hold the value (the shell joins the two halves).
const CHECK: &str =
    r#"test "$TOKEN" = "s3cr3t-""value" && echo match; echo "$TOKEN"; echo "$TOKEN" >&2"#;

/// Two gzip columns of one row (old and new data, output and error).
type GzPair = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Every place a value could be stored, as text: the `jobs` and `tasks`
/// rows, each `data_change` row decompressed, each `task_history` row with
/// its output and error decompressed, and every outbox payload.
async fn stored_text(pool: &PgPool) -> String {
    let mut all = String::new();
    for sql in [
        "SELECT to_jsonb(j.*)::text FROM jobs j",
        "SELECT to_jsonb(t.*)::text FROM tasks t",
        "SELECT payload::text FROM outbox",
        "SELECT to_jsonb(h.*)::text FROM task_history h",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(pool)
            .await
            .expect("read rows");
        for r in rows {
            all.push_str(&r);
            all.push('\n');
        }
    }
    let changes: Vec<GzPair> = sqlx::query_as("SELECT old_data, new_data FROM data_change")
        .fetch_all(pool)
        .await
        .expect("read data_change");
    for (old, new) in changes {
        for gz in [old, new].into_iter().flatten() {
            let row = changelog::gunzip_json(&gz).expect("decode a data_change row");
            all.push_str(&row.to_string());
            all.push('\n');
        }
    }
    let outputs: Vec<GzPair> = sqlx::query_as("SELECT output, error FROM task_history")
        .fetch_all(pool)
        .await
        .expect("read task_history");
    for (out, err) in outputs {
        for gz in [out, err].into_iter().flatten() {
            let text = changelog::gunzip(&gz).expect("decode an output");
            all.push_str(&String::from_utf8_lossy(&text));
            all.push('\n');
        }
    }
    all
}

async fn assert_never_stored_in_clear(env: &TestEnv) {
    let text = stored_text(&env.pool).await;
    assert!(
        !text.contains(SECRET),
        "the secret is stored in clear somewhere:\n{text}"
    );
}

/// Waits for the job, then returns its `GET /jobs/{id}` answer.
async fn finished(env: &TestEnv, api: &Api, key: &str, id: Uuid) -> Value {
    env.wait_terminal(id, Duration::from_secs(30)).await;
    let (status, job) = get(api, key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    job
}

/// The job ran with the secret, and its stored output shows `***`.
fn assert_ran_with_the_secret_masked(job: &Value) {
    assert_eq!(job["status"], "succeeded", "{job}");
    let output = job["output"].as_str().unwrap_or_default();
    assert!(output.contains("match"), "the value reached the job: {job}");
    assert_eq!(output, "match\n***\n***\n", "{job}");
    assert_eq!(job["error"], "***\n", "{job}");
    assert!(!job.to_string().contains(SECRET), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_secret_env_reaches_it_masked_and_is_never_stored_in_clear() {
    let mut env = TestEnv::new().await;
    env.set_secrets_key(TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let admin = env.key("ops", &[Role::SystemAdmin]).await;

    // The batched path (a plain submission).
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "secret", "command": CHECK,
                "env": {"PLAIN": "visible"}, "secretEnv": {"TOKEN": SECRET}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let plain_id = job_id(&body);
    let job = finished(&env, &api, &alice, plain_id).await;
    assert_ran_with_the_secret_masked(&job);
    assert_eq!(job["secretEnv"], json!({"TOKEN": "***"}), "{job}");

    // The one-by-one path (an Idempotency-Key), and its repeat.
    let idem = json!({"jobName": "secret-idem", "command": CHECK, "secretEnv": {"TOKEN": SECRET}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = api
            .http
            .post(api.v1("/jobs/submit"))
            .bearer_auth(&alice)
            .header("Idempotency-Key", "secret-once")
            .json(&idem)
            .send()
            .await
            .expect("submit");
        assert_eq!(resp.status().as_u16(), 202);
        ids.push(job_id(&resp.json::<Value>().await.expect("json")));
    }
    assert_eq!(ids[0], ids[1], "the same key and body are the same job");
    let job = finished(&env, &api, &alice, ids[0]).await;
    assert_ran_with_the_secret_masked(&job);

    // A results entry shows the names too.
    let (status, results) = get(&api, &alice, "/jobs/results").await;
    assert_eq!(status, 200, "{results}");
    let entry = results["results"]
        .as_array()
        .and_then(|r| r.iter().find(|e| e["jobId"] == json!(plain_id.to_string())))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(entry["secretEnv"], json!({"TOKEN": "***"}), "{results}");
    assert!(!results.to_string().contains(SECRET));

    // The change feed: sealed in the stored rows, names only in the answer.
    // (The feed stops at its safe head, which may lag a moment.)
    let mut feed = Value::Null;
    for _ in 0..100 {
        let (status, body) = get(&api, &admin, "/changes?table=jobs&limit=1000").await;
        assert_eq!(status, 200, "{body}");
        feed = body;
        if feed.to_string().contains(&ids[0].to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!feed.to_string().contains(SECRET), "{feed}");
    assert!(
        feed.to_string().contains(r#""secret_env":{"TOKEN":"***"}"#),
        "{feed}"
    );
    let sealed: String = sqlx::query_scalar("SELECT secret_env FROM jobs WHERE job_id = $1")
        .bind(plain_id)
        .fetch_one(&env.pool)
        .await
        .expect("read the sealed column");
    assert!(!sealed.contains("TOKEN") && !sealed.is_empty(), "{sealed}");
    let sealed_in_log: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change WHERE table_name = 'jobs' AND record_id = $1",
    )
    .bind(plain_id.to_string())
    .fetch_one(&env.pool)
    .await
    .expect("count change rows");
    assert!(
        sealed_in_log >= 3,
        "the job has its change rows: {sealed_in_log}"
    );

    // A name in both maps is refused, naming it.
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "both", "command": "true",
                "env": {"TOKEN": "a"}, "secretEnv": {"TOKEN": "b"}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("secretEnv") && message.contains("TOKEN"),
        "{body}"
    );

    assert_never_stored_in_clear(&env).await;
    env.cleanup().await;
}

/// Runs a task now; returns the job id.
async fn run_now(api: &Api, key: &str, task: &str) -> Uuid {
    let (status, body) = call(
        api,
        reqwest::Method::POST,
        key,
        &format!("/tasks/{task}/run"),
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    job_id(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_secret_environment_reaches_its_runs_and_survives_edits_that_leave_it_out() {
    let mut env = TestEnv::new().await;
    env.set_secrets_key(TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;

    let (status, created) = call(
        &api,
        reqwest::Method::POST,
        &alice,
        "/tasks",
        Some(
            &json!({"taskName": "secret-task", "command": CHECK, "schedule": "0 0 1 1 *",
                     "environment": {"PLAIN": "x"}, "secretEnvironment": {"TOKEN": SECRET}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["task"]["secretEnvironment"],
        json!({"TOKEN": "***"}),
        "{created}"
    );
    let task = created["taskId"].as_str().expect("taskId").to_owned();
    let (_, one) = get(&api, &alice, &format!("/tasks/{task}")).await;
    assert_eq!(one["secretEnvironment"], json!({"TOKEN": "***"}), "{one}");
    let (_, list) = get(&api, &alice, "/tasks").await;
    assert!(!list.to_string().contains(SECRET), "{list}");

    let job = finished(&env, &api, &alice, run_now(&api, &alice, &task).await).await;
    assert_ran_with_the_secret_masked(&job);
    assert_eq!(job["secretEnv"], json!({"TOKEN": "***"}), "{job}");

    // An edit without secretEnvironment keeps the stored secrets.
    let (status, edited) = call(
        &api,
        reqwest::Method::PUT,
        &alice,
        &format!("/tasks/{task}"),
        Some(&json!({"description": "edited"})),
    )
    .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["secretEnvironment"], json!({"TOKEN": "***"}));
    let job = finished(&env, &api, &alice, run_now(&api, &alice, &task).await).await;
    assert_ran_with_the_secret_masked(&job);

    // A plain variable may not take a kept secret's name.
    let (status, body) = call(
        &api,
        reqwest::Method::PUT,
        &alice,
        &format!("/tasks/{task}"),
        Some(&json!({"environment": {"TOKEN": "plain"}})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("TOKEN"),
        "{body}"
    );

    // `{}` clears them: the next run has no TOKEN.
    let (status, cleared) = call(
        &api,
        reqwest::Method::PUT,
        &alice,
        &format!("/tasks/{task}"),
        Some(&json!({"secretEnvironment": {}})),
    )
    .await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["secretEnvironment"], Value::Null, "{cleared}");
    let job = finished(&env, &api, &alice, run_now(&api, &alice, &task).await).await;
    assert_eq!(job["output"], "\n\n", "no secret any more: {job}");
    assert_eq!(job["secretEnv"], Value::Null, "{job}");

    assert_never_stored_in_clear(&env).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_without_a_key_are_refused_and_a_worker_without_it_fails_the_job() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "nokey", "command": "true", "secretEnv": {"TOKEN": SECRET}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("secretEnv") && message.contains("secrets.key"),
        "{body}"
    );
    let (status, body) = call(
        &api,
        reqwest::Method::POST,
        &alice,
        "/tasks",
        Some(
            &json!({"taskName": "t", "command": "true", "schedule": "@daily",
                     "secretEnvironment": {"TOKEN": SECRET}}),
        ),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("secretEnvironment") && message.contains("secrets.key"),
        "{body}"
    );
    // No values, no key needed.
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "empty", "command": "true", "secretEnv": {}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");

    // An api with the key, a worker without it: the job fails, saying why.
    env.set_secrets_key(TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    let mut keyless = env.worker_settings("keyless", "default", "worker");
    keyless.secrets.key = String::new();
    env.start_worker_with(keyless).await;
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "keyless", "command": "echo ran", "secretEnv": {"TOKEN": SECRET}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = finished(&env, &api, &alice, job_id(&body)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["statusReason"]
            .as_str()
            .unwrap_or_default()
            .contains("secret environment cannot be decrypted"),
        "{job}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("secrets.key"),
        "{job}"
    );
    assert!(!job["output"].as_str().unwrap_or_default().contains("ran"));
    assert_never_stored_in_clear(&env).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_submitted_job_with_secret_env_runs_masked() {
    let mut env = TestEnv::new().await;
    env.set_secrets_key(TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let id = Uuid::new_v4();
    let body = json!({"userId": "alice", "jobName": "queued-secret", "command": CHECK,
                      "secretEnv": {"TOKEN": SECRET}});
    env.publish_raw(
        &env.names().submit(),
        "submit",
        body.to_string().as_bytes(),
        Some(JOB_SUBMIT_V1),
        Some(&id.to_string()),
    )
    .await;
    let job = finished(&env, &api, &alice, id).await;
    assert_ran_with_the_secret_masked(&job);
    assert_eq!(job["secretEnv"], json!({"TOKEN": "***"}), "{job}");
    assert_never_stored_in_clear(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_secrets_key_stops_each_service_in_one_line_that_does_not_show_it() {
    let env = TestEnv::new().await;
    let short = "c2hvcnQta2V5LXZhbHVl"; // base64 of 15 bytes
    for (key, says) in [
        ("hunter2!!", "is not base64"),
        (short, "decodes to 15 bytes"),
    ] {
        for service in ["api", "worker", "scheduler"] {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskhost"))
                .arg(service)
                .envs(env.env())
                .env("TASKHOST__SECRETS__KEY", key)
                .stdin(std::process::Stdio::null())
                .output();
            let out = tokio::time::timeout(Duration::from_secs(15), out)
                .await
                .expect("exits at once")
                .expect("run taskhost");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{service}: {stderr}");
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("taskhost: "))
                .collect();
            assert_eq!(lines.len(), 1, "{service}: {stderr}");
            assert!(
                lines[0].contains("secrets.key") && lines[0].contains(says),
                "{service}: {stderr}"
            );
            assert!(!stderr.contains(key), "{service} shows the key: {stderr}");
        }
    }
    env.cleanup().await;
}
