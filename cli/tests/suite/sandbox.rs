//! Jobs run unprivileged and bounded: a root worker runs them as `nobody`
//! (keeping root only on `worker.run_as = "root"`), each in an empty
//! directory of its own, gone afterwards, inside the operator's rlimits; a CPU
//! hog, a memory hog and a fork bomb are stopped and recorded, and the
//! worker keeps serving.

use std::time::Duration;

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, call, get, job_id, submit};

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
        "the run's directory is gone afterwards"
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

    // A later run's directory (a spare of an earlier run, renamed) is
    // empty: nothing the first run made is seen. (Builtins only: the fork
    // bomb's sleepers still hold the user's processes.)
    let list = r#"for f in * .[!.]*; do [ -e "$f" ] && echo "left: $f"; done"#;
    let after = run_job(&env, &api, &key, &format!("{list}; echo still serving")).await;
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

/// Submits `body`, waits for the job and returns its answer.
async fn run_body(env: &TestEnv, api: &Api, key: &str, body: &Value) -> Value {
    let (status, answer) = submit(api, key, body).await;
    assert_eq!(status, 202, "{answer}");
    let id = job_id(&answer);
    env.wait_terminal(id, Duration::from_secs(40)).await;
    let (status, job) = get(api, key, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_or_tasks_own_limits_tighten_the_workers_and_never_loosen_them() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    // The defaults: no CPU or memory limit, open files 4096 (inherited).
    let settings = env.worker_settings("limits", "default", "worker");
    assert_eq!(settings.worker.job_cpu_secs, 0);
    assert_eq!(settings.worker.job_memory_mb, 0);
    env.start_worker_with(settings).await;
    let (workers_files, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .expect("getrlimit");
    let key = env.key("alice", &[Role::TaskManager]).await;

    // CPU seconds, where the worker has no limit at all.
    let hog = run_body(
        &env,
        &api,
        &key,
        &json!({"jobName": "hog", "command": "while :; do :; done", "timeoutSeconds": 30,
                "limits": {"cpuSeconds": 1}}),
    )
    .await;
    assert_eq!(hog["status"], "failed", "{hog}");
    assert!(
        hog["statusReason"]
            .as_str()
            .unwrap_or_default()
            .contains("CPU time limit"),
        "{hog}"
    );
    assert_eq!(hog["limits"], json!({"cpuSeconds": 1}), "{hog}");

    // Open files: 16, and 40 cannot be opened.
    let files = run_body(
        &env,
        &api,
        &key,
        &json!({"jobName": "files", "limits": {"maxFiles": 16, "maxProcesses": 50},
                "command": "ulimit -n; grep 'Max processes' /proc/self/limits; \
                            python3 -c \"fs = [open('/dev/null') for _ in range(40)]\""}),
    )
    .await;
    let out = files["output"].as_str().unwrap_or_default();
    assert!(out.starts_with("16\n"), "{files}");
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().filter(|w| *w == "50").count() == 2),
        "{files}"
    );
    assert_eq!(files["status"], "failed", "{files}");
    assert!(out.contains("Too many open files"), "{files}");

    // Memory (address space).
    let memory = run_body(
        &env,
        &api,
        &key,
        &json!({"jobName": "memory", "limits": {"memoryMb": 256},
                "command": "python3 -c 'bytearray(1024*1024*1024)'"}),
    )
    .await;
    assert_eq!(memory["status"], "failed", "{memory}");
    assert!(
        memory["output"]
            .as_str()
            .unwrap_or_default()
            .contains("MemoryError"),
        "{memory}"
    );

    // A looser value than the worker's changes nothing; no limits, neither.
    for limits in [json!({"maxFiles": 1_000_000}), Value::Null] {
        let loose = run_body(
            &env,
            &api,
            &key,
            &json!({"jobName": "loose", "command": "ulimit -n", "limits": limits}),
        )
        .await;
        assert_eq!(loose["output"], format!("{workers_files}\n"), "{loose}");
    }

    // A task's limits go to the jobs it fires (run now), and can be cleared.
    let (status, created) = call(
        &api,
        reqwest::Method::POST,
        &key,
        "/tasks",
        Some(
            &json!({"taskName": "bounded", "command": "ulimit -n", "schedule": "0 0 1 1 *",
                     "limits": {"maxFiles": 16}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["task"]["limits"],
        json!({"maxFiles": 16}),
        "{created}"
    );
    let task = created["taskId"].as_str().expect("taskId").to_owned();
    let run_now = || async {
        let (status, body) = call(
            &api,
            reqwest::Method::POST,
            &key,
            &format!("/tasks/{task}/run"),
            Some(&json!({})),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let id = job_id(&body);
        env.wait_terminal(id, Duration::from_secs(30)).await;
        get(&api, &key, &format!("/jobs/{id}")).await.1
    };
    let job = run_now().await;
    assert_eq!(job["output"], "16\n", "{job}");
    assert_eq!(job["limits"], json!({"maxFiles": 16}), "{job}");
    let (status, edited) = call(
        &api,
        reqwest::Method::PUT,
        &key,
        &format!("/tasks/{task}"),
        Some(&json!({"description": "kept"})),
    )
    .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["limits"], json!({"maxFiles": 16}), "{edited}");
    let (status, cleared) = call(
        &api,
        reqwest::Method::PUT,
        &key,
        &format!("/tasks/{task}"),
        Some(&json!({"limits": null})),
    )
    .await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["limits"], Value::Null, "{cleared}");
    let job = run_now().await;
    assert_eq!(job["output"], format!("{workers_files}\n"), "{job}");

    // Wrong limits are refused, naming the field.
    for (limits, field) in [
        (json!({"cpuSeconds": 0}), "limits.cpuSeconds"),
        (json!({"memoryMb": -5}), "limits.memoryMb"),
        (json!({"maxFiles": "many"}), "limits.maxFiles"),
        (json!({"maxProcesses": 1.5}), "limits.maxProcesses"),
        (json!({"cpuSeconds": 604_801}), "limits.cpuSeconds"),
        (json!({"cpu": 1}), "cpu"),
    ] {
        let (status, body) = submit(
            &api,
            &key,
            &json!({"jobName": "bad", "command": "true", "limits": limits}),
        )
        .await;
        assert_eq!(status, 422, "{limits}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{limits}: {body}"
        );
        let (status, body) = call(
            &api,
            reqwest::Method::POST,
            &key,
            "/tasks",
            Some(
                &json!({"taskName": "bad", "command": "true", "schedule": "@daily",
                         "limits": limits}),
            ),
        )
        .await;
        assert_eq!(status, 422, "task {limits}: {body}");
    }
    env.cleanup().await;
}

/// Fails when a job's `out` holds the worker's database or broker URL, the
/// secrets key, the name `DATABASE_URL`, or any of `more`.
fn assert_no_worker_secret(env: &TestEnv, out: &str, more: &[&str]) {
    let db_url = env.db_url();
    let secrets = [
        db_url.as_str(),
        taskhost_testkit::AMQP_URL,
        taskhost_testkit::TEST_SECRETS_KEY,
        "DATABASE_URL",
    ];
    for secret in secrets.iter().chain(more) {
        assert!(!out.contains(secret), "the job saw {secret:?}:\n{out}");
    }
}

/// A worker's environment holds its credentials (the database and broker
/// URLs, the secrets key): a job sees only what `worker.pass_env` lets
/// through, never a variable taskhost reads itself, plus its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sees_only_the_passed_part_of_the_workers_environment() {
    let mut env = TestEnv::new().await;
    env.set_secrets_key(taskhost_testkit::TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    let name = format!("{}-env", env.prefix);
    let _worker = taskhost_testkit::ChildGuard(env.spawn_binary(
        env!("CARGO_BIN_EXE_taskhost"),
        &["worker", "--node-name", &name],
        &[
            (
                "TASKHOST__WORKER__PASS_ENV",
                "PATH, TOOL_* TASKHOST* DATABASE_URL",
            ),
            ("TOOL_HOME", "/opt/tool"),
            ("WORKER_ONLY_SECRET", "hunter2"),
        ],
    ));
    env.wait_node(&name).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let job = run_body(
        &env,
        &api,
        &key,
        &json!({"jobName": "env", "command": "env", "env": {"GREETING": "hi"}, "timeoutSeconds": 30}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = job["output"].as_str().unwrap_or_default();
    let names: Vec<&str> = out.lines().filter_map(|l| l.split('=').next()).collect();
    for wanted in [
        "PATH",
        "TOOL_HOME",
        "GREETING",
        "HOME",
        "TASKHOST_JOB_ID",
        "TASKHOST_WORK_DIR",
    ] {
        assert!(names.contains(&wanted), "{wanted} is missing:\n{out}");
    }
    assert!(out.contains("TOOL_HOME=/opt/tool\n"), "{out}");
    // Its settings (TASKHOST__*) and its private variable too.
    assert_no_worker_secret(&env, out, &["hunter2", "TASKHOST__", "AMQP_URL"]);
    let allowed = |n: &&str| {
        [
            "PATH",
            "TOOL_HOME",
            "GREETING",
            "HOME",
            "USER",
            "PWD",
            "SHLVL",
            "_",
            "OLDPWD",
        ]
        .contains(n)
            || n.starts_with("TASKHOST_")
    };
    let unexpected: Vec<&&str> = names.iter().filter(|n| !allowed(n)).collect();
    assert!(
        unexpected.is_empty(),
        "more than was passed: {unexpected:?}\n{out}"
    );
}

/// A worker that is not root (the container image's) runs jobs as its own
/// user. Such a job must still not read the worker's credentials out of
/// `/proc/<worker>/environ` (or its memory): the worker makes itself
/// non-dumpable, so those files are root's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_as_the_workers_own_user_cannot_read_the_worker() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // Needs root to start the worker as another user; CI runs as root.
    if !is_root() {
        eprintln!("skipped: starting a worker as another user needs root");
        return;
    }
    let mut env = TestEnv::new().await;
    env.set_secrets_key(taskhost_testkit::TEST_SECRETS_KEY);
    let api = env.start_api().await;
    env.start_scheduler().await;
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("users")
        .expect("a `nobody` user");
    // The binary and a work dir where `nobody` can reach them.
    let dir = std::env::temp_dir().join(format!("taskhost-test-{}-own", env.prefix));
    std::fs::create_dir_all(&dir).expect("test dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = dir.join("taskhost");
    std::fs::copy(env!("CARGO_BIN_EXE_taskhost"), &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    nix::unistd::chown(&work, Some(nobody.uid), Some(nobody.gid)).expect("chown");
    let name = format!("{}-own", env.prefix);
    let worker = taskhost_testkit::ChildGuard(
        std::process::Command::new(&bin)
            .args(["worker", "--node-name", &name])
            .envs(env.env())
            .env("TASKHOST__WORKER__WORK_DIR", &work)
            .current_dir(&dir)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start a worker as nobody"),
    );
    env.wait_node(&name).await;
    let pid = worker.0.id();
    let key = env.key("alice", &[Role::TaskManager]).await;
    let job = run_job(
        &env,
        &api,
        &key,
        &format!("id -u; stat -c %u /proc/{pid}/environ; cat /proc/{pid}/environ 2>&1; echo"),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = job["output"].as_str().unwrap_or_default();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        nobody.uid.to_string(),
        "the job runs as the worker's own user: {out}"
    );
    assert_eq!(lines[1], "0", "the worker's /proc files are root's: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert_no_worker_secret(&env, out, &[]);
    drop(worker);
    env.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}
