//! The shortest whole path: submit over HTTP, a worker runs it, the result
//! reads back with its output.

use std::time::Duration;

use serde_json::json;
use taskhost_common::model::Role;
use taskhost_testkit::{TestEnv, get, job_id, submit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_job_runs_and_reads_back() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (status, body) = submit(
        &api,
        &key,
        &json!({"jobName": "hello", "command": "echo hello"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["executionMode"], "pool");
    let id = job_id(&body);

    assert_eq!(
        env.wait_terminal(id, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (status, job) = get(&api, &key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["exitCode"], 0);
    assert_eq!(job["output"], "hello\n");
    assert_eq!(env.final_history_rows(id).await, 1);
    env.cleanup().await;
}
