//! Edges of the HTTP API found while documenting it: errors produced by the
//! framework get the JSON error body, a fan-out submission with an
//! Idempotency-Key is accepted once, idempotency ignores JSON formatting, and
//! a cancelled task run keeps its task. Found by fuzzing it
//! (`scripts/fuzz-api`): an id that is not UTF-8 once percent-decoded is a
//! malformed id like any other (404, not the framework's 400).

use std::time::Duration;

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, job_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_gets_the_json_error_body() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let resp = api.http.put(api.v1("/jobs/submit")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_is_not_utf8_answers_404_like_any_malformed_id() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env
        .key(
            "alice",
            &[Role::TaskManager, Role::SystemAdmin, Role::Debug],
        )
        .await;
    let task = "00000000-0000-7000-8000-000000000001";
    let routes = [
        ("GET", "/jobs/%FF".to_owned()),
        ("DELETE", "/jobs/%FF".to_owned()),
        ("POST", "/jobs/%FF/cancel".to_owned()),
        ("GET", "/jobs/%C3%28/output".to_owned()),
        ("GET", "/nodes/%FF".to_owned()),
        ("GET", "/tasks/%FF".to_owned()),
        ("PUT", "/tasks/%FF".to_owned()),
        ("DELETE", "/tasks/%FF".to_owned()),
        ("GET", "/tasks/%FF/history".to_owned()),
        ("GET", "/tasks/%FF/schedule".to_owned()),
        ("POST", "/tasks/%FF/run".to_owned()),
        ("GET", "/tasks/%FF/history/1/output".to_owned()),
        ("GET", format!("/tasks/{task}/history/%FF/output")),
    ];
    for (method, path) in routes {
        let resp = api
            .http
            .request(method.parse().unwrap(), api.v1(&path))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(
            body["error"]["code"], "not_found",
            "{method} {path}: {body}"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_an_idempotency_key_is_accepted_once() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("a", "fan", "worker").await;
    env.start_worker("b", "fan", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let body = json!({"jobName": "fan", "command": "true", "target": {"nodeGroup": "fan", "fanout": "all"}});
    let send = |b: String| {
        api.http
            .post(api.v1("/jobs/submit"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "fan-1")
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    let first = send(body.to_string()).await.unwrap();
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await.unwrap();
    let ids = first["jobIds"].as_array().expect("jobIds").clone();
    assert_eq!(ids.len(), 2, "{first}");
    for id in &ids {
        let id = id.as_str().unwrap().parse().unwrap();
        assert_eq!(
            env.wait_terminal(id, Duration::from_secs(20)).await,
            "succeeded"
        );
    }
    // The same request again, formatted differently: the original job.
    let pretty = serde_json::to_string_pretty(&body).unwrap();
    let again = send(pretty).await.unwrap();
    assert_eq!(again.status().as_u16(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(job_id(&again), job_id(&first));
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_cancelled_before_it_starts_stays_in_the_task_history() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let created: Value = api
        .http
        .post(api.v1("/tasks"))
        .bearer_auth(&key)
        .json(&json!({"taskName": "t", "command": "true", "schedule": "@yearly", "assignedNodeGroup": "nobody"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = created["taskId"].as_str().unwrap().to_owned();
    let run: Value = api
        .http
        .post(api.v1(&format!("/tasks/{task}/run")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = job_id(&run);
    env.wait_status(job, "queued", Duration::from_secs(10))
        .await;
    let cancel = api
        .http
        .post(api.v1(&format!("/jobs/{job}/cancel")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 202);
    let history: Value = api
        .http
        .get(api.v1(&format!("/tasks/{task}/history")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["count"], 1, "{history}");
    assert_eq!(history["history"][0]["state"], "cancelled");
    assert_eq!(history["history"][0]["jobId"], job.to_string());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_on_timeout_decides_whether_a_task_run_is_killed() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let mut outcomes = Vec::new();
    for (name, kill) in [("killed", true), ("left", false)] {
        let created: Value = api
            .http
            .post(api.v1("/tasks"))
            .bearer_auth(&key)
            .json(
                &json!({"taskName": name, "command": "sleep 2; echo done", "schedule": "@yearly",
                          "timeoutSeconds": 1, "killOnTimeout": kill}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let task = created["taskId"].as_str().expect("taskId").to_owned();
        let run: Value = api
            .http
            .post(api.v1(&format!("/tasks/{task}/run")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        outcomes.push(job_id(&run));
    }
    assert_eq!(
        env.wait_terminal(outcomes[0], Duration::from_secs(20))
            .await,
        "timed_out"
    );
    assert_eq!(
        env.wait_terminal(outcomes[1], Duration::from_secs(20))
            .await,
        "succeeded"
    );
    let (reason, output): (Option<String>, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT j.status_reason, h.output FROM jobs j JOIN task_history h USING (job_id) WHERE j.job_id = $1",
    )
    .bind(outcomes[1])
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(reason.unwrap_or_default().contains("ran past its timeout"));
    let output = taskhost_common::changelog::gunzip(&output.unwrap()).unwrap();
    assert_eq!(output, b"done\n");
    env.cleanup().await;
}
