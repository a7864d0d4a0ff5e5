//! Jobs run unprivileged and bounded: a root worker runs them as `nobody`
//! (keeping root only on `worker.run_as = "root"`), each in a directory of
//! its own that is removed afterwards, inside the operator's rlimits; a CPU
//! hog, a memory hog and a fork bomb are stopped and recorded, and the
//! worker keeps serving.

use std::time::Duration;

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, get, job_id, submit};

async fn run_job(env: &TestEnv, api: &Api, key: &str, command: &str) -> Value {
    let (status, body) = submit(
        api,
        key,
        &json!({"jobName": "sandboxed", "command": command, "timeoutSeconds": 30}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    env.wait_terminal(id, Duration::from_secs(40)).await;
    let (status, job) = get(api, key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    job
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test]
async fn a_root_worker_runs_jobs_unprivileged_in_their_own_directory_within_limits() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let mut settings = env.worker_settings(&format!("{}-sb", env.prefix), "default", "worker");
    settings.worker.job_cpu_secs = 1;
    settings.worker.job_memory_mb = 256;
    settings.worker.job_max_processes = 64;
    // Its own unprivileged user (the process limit counts per user, so the
    // fork bomb below must not take other tests' `nobody` jobs with it).
    settings.worker.run_as = "daemon".into();
    let work = std::env::temp_dir().join(format!("taskhost-test-{}", env.prefix));
    settings.worker.work_dir = work.display().to_string();
    env.start_worker_with(settings).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let job = run_job(&env, &api, &key, "id -un; pwd; touch made-here; ls").await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = job["output"].as_str().unwrap_or_default().to_owned();
    let lines: Vec<&str> = out.lines().collect();
    if is_root() {
        assert_eq!(
            lines[0], "daemon",
            "a root worker drops jobs to run_as: {out}"
        );
    }
    assert!(
        lines[1].starts_with(&work.display().to_string()),
        "its own directory: {out}"
    );
    assert_eq!(lines[2], "made-here", "{out}");
    assert!(
        !std::path::Path::new(lines[1]).exists(),
        "the directory is removed afterwards"
    );

    let hog = run_job(&env, &api, &key, "while :; do :; done").await;
    assert_eq!(hog["status"], "failed", "{hog}");
    assert!(
        hog["statusReason"]
            .as_str()
            .unwrap_or_default()
            .contains("CPU time limit"),
        "{hog}"
    );

    let memory = run_job(&env, &api, &key, "python3 -c 'bytearray(1024*1024*1024)'").await;
    assert_eq!(memory["status"], "failed", "{memory}");
    assert!(
        memory["output"]
            .as_str()
            .unwrap_or_default()
            .contains("MemoryError"),
        "{memory}"
    );

    if is_root() {
        // RLIMIT_NPROC binds the job's (unprivileged) user; root ignores it.
        let bomb = run_job(
            &env,
            &api,
            &key,
            "i=0; while [ $i -lt 200 ]; do sleep 5 & i=$((i+1)); done; echo started $i",
        )
        .await;
        assert_eq!(bomb["status"], "failed", "{bomb}");
        assert!(
            bomb["error"].as_str().unwrap_or_default().contains("fork"),
            "{bomb}"
        );
    }

    let after = run_job(&env, &api, &key, "echo still serving").await;
    assert_eq!(after["status"], "succeeded", "{after}");
    assert_eq!(after["output"], "still serving\n");
    let _ = std::fs::remove_dir_all(&work);
    env.cleanup().await;
}

#[tokio::test]
async fn a_root_worker_defaults_to_nobody_and_keeps_root_only_on_request() {
    if !is_root() {
        eprintln!("SKIPPED: needs a worker started as root");
        return;
    }
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("plain", "default", "worker").await;
    let mut settings = env.worker_settings(&format!("{}-root", env.prefix), "keep", "worker");
    settings.worker.run_as = "root".into();
    env.start_worker_with(settings).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    for (group, expect) in [("default", "nobody\n"), ("keep", "root\n")] {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": "who", "command": "id -un", "target": {"nodeGroup": group}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let id = job_id(&body);
        env.wait_terminal(id, Duration::from_secs(30)).await;
        let (_, job) = get(&api, &key, &format!("/jobs/{id}")).await;
        assert_eq!(job["output"], expect, "group {group}: {job}");
    }
    env.cleanup().await;
}
