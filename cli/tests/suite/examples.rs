//! `examples/publish_job.py`, as another system runs it: it tells an
//! accepted job (exit 0) from one taskhost refused (exit 1, with the
//! reason), instead of printing an id for a message that was dead-lettered.

use std::process::Stdio;
use std::time::Duration;

use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, TestEnv};

async fn publish_job(env: &TestEnv, user: &str) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/publish_job.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--user", user, "--command", "echo from python"])
        .args(["--prefix", &env.prefix, "--wait", "15"])
        .env("AMQP_URL", AMQP_URL)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("publish_job.py finished")
        .expect("run python3")
}

#[tokio::test]
async fn publish_job_py_exits_non_zero_when_taskhost_refuses_the_job() {
    // scripts/test sets this only when it was not allowed to install pika.
    if std::env::var_os("TASKHOST_TEST_SKIP_PYTHON").is_some() {
        eprintln!("SKIPPED: the Python package pika is not installed (scripts/test --install)");
        return;
    }
    let mut env = TestEnv::new().await;
    env.start_scheduler().await;
    env.start_worker("py", "default", "worker").await;
    env.key("alice", &[Role::TaskManager]).await;

    let ok = publish_job(&env, "alice").await;
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "accepted job: {stderr}");
    let id: uuid::Uuid = String::from_utf8_lossy(&ok.stdout)
        .trim()
        .parse()
        .expect("the job id on stdout");
    let status = env.wait_terminal(id, Duration::from_secs(20)).await;
    assert_eq!(status, "succeeded");

    let refused = publish_job(&env, "nobody").await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "refused job: {stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        stderr.contains("nobody"),
        "the reason names the user: {stderr}"
    );
    env.cleanup().await;
}
