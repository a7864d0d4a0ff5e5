//! The operator console's API: every job of the system with filters and
//! keyset paging (`GET /jobs`), the overview (`GET /overview`), re-runs
//! (`POST /jobs/{id}/rerun`) and who the key is (`GET /me`), checked as an
//! operator reads them, against the real services.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv, call, get, job_id, submit};

use crate::tasks::taskhost;
use uuid::Uuid;

async fn run(env: &TestEnv, api: &Api, key: &str, name: &str, command: &str) -> Uuid {
    let (status, body) = submit(api, key, &json!({"jobName": name, "command": command})).await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    env.wait_terminal(id, Duration::from_secs(30)).await;
    id
}

fn ids(page: &Value) -> Vec<Uuid> {
    page["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("jobs in {page}"))
        .iter()
        .map(|j| {
            j["jobId"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("jobId")
        })
        .collect()
}

async fn list(api: &Api, key: &str, query: &str) -> Value {
    let (status, body) = get(api, key, &format!("/jobs?{query}")).await;
    assert_eq!(status, 200, "GET /jobs?{query}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_across_the_system_filter_and_page_newest_first() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let node_name = format!("{}-w1", env.prefix);
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;

    let mut alices = Vec::new();
    for i in 0..4 {
        alices.push(run(&env, &api, &alice, &format!("report-{i}"), "echo fine").await);
    }
    let failing = run(
        &env,
        &api,
        &alice,
        "nightly-import",
        "echo needle-7; exit 3",
    )
    .await;
    alices.push(failing);
    let mut bobs = Vec::new();
    for i in 0..3 {
        bobs.push(run(&env, &api, &bob, &format!("bob-{i}"), "true").await);
    }

    // Alice sees her own, newest first; summaries carry no output.
    let page = list(&api, &alice, "").await;
    let mut newest_first = alices.clone();
    newest_first.reverse();
    assert_eq!(ids(&page), newest_first, "{page}");
    assert!(page["jobs"][0].get("output").is_none(), "summaries only");
    assert_eq!(page["jobs"][0]["nodeName"], node_name.as_str());
    assert_eq!(page["nextCursor"], Value::Null);
    // A user filter cannot reach another user's jobs.
    assert!(ids(&list(&api, &alice, "user=bob").await).is_empty());

    // An admin sees everyone's, and filters.
    assert_eq!(ids(&list(&api, &admin, "").await).len(), 8);
    assert_eq!(
        ids(&list(&api, &admin, "user=bob").await)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        bobs.iter().copied().collect()
    );
    assert_eq!(
        ids(&list(&api, &admin, "status=failed").await),
        vec![failing]
    );
    assert_eq!(
        ids(&list(&api, &admin, "status=failed,succeeded").await).len(),
        8
    );
    assert_eq!(
        ids(&list(&api, &admin, "status=running,queued").await).len(),
        0
    );
    assert_eq!(ids(&list(&api, &admin, "name=report-").await).len(), 4);
    assert_eq!(
        ids(&list(&api, &admin, "q=NEEDLE-7").await),
        vec![failing],
        "search is case-insensitive over the command"
    );
    assert_eq!(
        ids(&list(&api, &admin, "q=nightly").await),
        vec![failing],
        "and the name"
    );
    assert_eq!(
        ids(&list(&api, &admin, "q=100%25").await).len(),
        0,
        "% is literal"
    );
    assert_eq!(
        ids(&list(&api, &admin, &format!("node={node_name}")).await).len(),
        8
    );
    let node_id: Uuid = sqlx::query_scalar("SELECT node_id FROM nodes WHERE node_name = $1")
        .bind(&node_name)
        .fetch_one(&env.pool)
        .await
        .expect("node");
    assert_eq!(
        ids(&list(&api, &admin, &format!("node={node_id}")).await).len(),
        8
    );
    assert_eq!(ids(&list(&api, &admin, "node=nowhere").await).len(), 0);
    assert_eq!(ids(&list(&api, &admin, "mode=pool").await).len(), 8);
    assert_eq!(ids(&list(&api, &admin, "mode=inline").await).len(), 0);
    let first_bob: String = sqlx::query_scalar(
        "SELECT to_char(submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM jobs WHERE job_id = $1",
    )
    .bind(bobs[0])
    .fetch_one(&env.pool)
    .await
    .expect("time");
    assert_eq!(
        ids(&list(&api, &admin, &format!("submittedAfter={first_bob}")).await).len(),
        3,
        "bob's jobs came last"
    );
    assert_eq!(
        ids(&list(&api, &admin, &format!("submittedBefore={first_bob}")).await).len(),
        5
    );
    assert_eq!(
        ids(&list(&api, &admin, "finishedAfter=2000-01-01T00:00:00Z").await).len(),
        8
    );

    // Keyset paging: pages of 3 cover everything once, newest first.
    let mut seen = Vec::new();
    let mut query = "limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = list(&api, &admin, &query).await;
        pages += 1;
        seen.extend(ids(&page));
        match page["nextCursor"].as_str() {
            Some(c) => query = format!("limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut all: Vec<Uuid> = alices.iter().chain(&bobs).copied().collect();
    all.reverse();
    assert_eq!(seen, all, "every job once, newest first");

    // Bad filters are 422 naming the field.
    for (query, field) in [
        ("status=bogus", "status"),
        ("status=,", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=garbage", "cursor"),
        ("submittedAfter=yesterday", "submittedAfter"),
        ("task=nope", "task"),
        ("mode=fast", "mode"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get(&api, &admin, &format!("/jobs?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{query}: {body}"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_every_state_and_shows_queues_nodes_and_failures() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    for i in 0..3 {
        run(&env, &api, &alice, &format!("ok-{i}"), "true").await;
    }
    let failed = run(&env, &api, &alice, "broken", "exit 1").await;
    run(&env, &api, &bob, "bobs", "true").await;
    // One waiting for a node that is not there.
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "waits", "command": "true", "target": {"nodeGroup": "gpu"}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let waiting = job_id(&body);

    let (status, o) = get(&api, &admin, "/overview").await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["scope"], "all");
    let states = o["jobsByState"].as_object().expect("jobsByState");
    assert_eq!(states.len(), 8, "every state, zeros included: {o}");
    assert_eq!(o["jobsByState"]["succeeded"], 4);
    assert_eq!(o["jobsByState"]["failed"], 1);
    assert_eq!(o["jobsByState"]["running"], 0);
    assert_eq!(o["jobsByState"]["timed_out"], 0);
    let waiting_now = o["jobsByState"]["pending"].as_i64().unwrap_or(0)
        + o["jobsByState"]["queued"].as_i64().unwrap_or(0);
    assert_eq!(waiting_now, 1, "{o}");
    assert_eq!(o["oldestWaiting"]["jobId"], waiting.to_string());
    assert!(o["oldestWaiting"]["ageSeconds"].as_f64().unwrap_or(-1.0) >= 0.0);

    let per_minute = o["throughput"]["perMinute"].as_array().expect("perMinute");
    assert_eq!(per_minute.len(), 60);
    let sum = |key: &str| -> i64 {
        per_minute
            .iter()
            .map(|b| b[key].as_i64().unwrap_or(0))
            .sum()
    };
    assert_eq!(sum("succeeded"), 4);
    assert_eq!(sum("failed"), 1);
    assert_eq!(
        o["throughput"]["perHour"].as_array().map(Vec::len),
        Some(24)
    );

    let queues = o["queues"].as_array().expect("queues");
    let any = queues
        .iter()
        .find(|q| q["queue"] == format!("{}.work.any", env.prefix))
        .unwrap_or_else(|| panic!("the any queue in {o}"));
    assert_eq!(any["messages"], 0);
    assert!(any["consumers"].as_u64().unwrap_or(0) >= 1, "{any}");
    let gpu = queues
        .iter()
        .find(|q| q["queue"] == format!("{}.work.group.gpu", env.prefix));
    assert!(gpu.is_none(), "only queues of live nodes are listed");

    let nodes = o["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{o}");
    assert_eq!(nodes[0]["slotsBusy"], 0);
    assert!(nodes[0]["slotsTotal"].as_i64().unwrap_or(0) >= 4, "{o}");
    assert_eq!(o["recentFailures"][0]["jobId"], failed.to_string());
    assert_eq!(o["scheduler"]["misfires"], 0);
    assert!(o["scheduler"].get("nextFireAt").is_some());

    // Bob sees his own corner of it.
    let (status, mine) = get(&api, &bob, "/overview").await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["scope"], "own");
    assert_eq!(mine["jobsByState"]["succeeded"], 1);
    assert_eq!(mine["jobsByState"]["failed"], 0);
    assert_eq!(mine["recentFailures"], json!([]));
    assert_eq!(mine["oldestWaiting"], Value::Null);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_repeats_the_spec_for_whoever_may_see_it() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let debug = env.key("dev", &[Role::Debug]).await;
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "flaky", "command": "echo \"$GREETING\"; exit 2",
                "env": {"GREETING": "hello again"}, "priority": 7, "timeoutSeconds": 30}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let original = job_id(&body);
    assert_eq!(
        env.wait_terminal(original, Duration::from_secs(30)).await,
        "failed"
    );

    let (status, body) = call(
        &api,
        Method::POST,
        &alice,
        &format!("/jobs/{original}/rerun"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["rerunOf"], original.to_string());
    let again = job_id(&body);
    assert_ne!(again, original);
    assert_eq!(
        env.wait_terminal(again, Duration::from_secs(30)).await,
        "failed"
    );
    let (_, job) = get(&api, &alice, &format!("/jobs/{again}")).await;
    assert_eq!(job["jobName"], "flaky");
    assert_eq!(
        job["output"], "hello again\n",
        "same command and env: {job}"
    );
    assert_eq!(job["priority"], 7);
    assert_eq!(job["timeoutSeconds"], 30);
    let page = list(&api, &alice, "name=flaky").await;
    assert_eq!(page["jobs"][0]["jobId"], again.to_string());
    assert_eq!(page["jobs"][0]["rerunOf"], original.to_string());
    assert_eq!(page["jobs"][0]["triggeredBy"], "manual");

    // Another user: 404, as for any view of the job. An admin may.
    let (status, _) = call(
        &api,
        Method::POST,
        &bob,
        &format!("/jobs/{original}/rerun"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = call(
        &api,
        Method::POST,
        &admin,
        &format!("/jobs/{original}/rerun"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let by_admin = job_id(&body);
    let owner: String = sqlx::query_scalar("SELECT user_id FROM jobs WHERE job_id = $1")
        .bind(by_admin)
        .fetch_one(&env.pool)
        .await
        .expect("owner");
    assert_eq!(owner, "root", "a re-run belongs to who asked for it");
    env.wait_terminal(by_admin, Duration::from_secs(30)).await;
    // The roles rule of a submission: an inline job needs debug.
    let (status, body) = submit(
        &api,
        &debug,
        &json!({"jobName": "probe", "command": "noop", "executionMode": "inline"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let inline = job_id(&body);
    env.wait_terminal(inline, Duration::from_secs(30)).await;
    let (status, body) = call(
        &api,
        Method::POST,
        &admin,
        &format!("/jobs/{inline}/rerun"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = call(&api, Method::POST, &alice, "/jobs/not-an-id/rerun", None).await;
    assert_eq!(status, 404);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_names_the_user_roles_and_key() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let (_, key) = taskhost_common::keys::create(
        &env.pool,
        "carol",
        &[Role::TaskManager, Role::Debug],
        "laptop",
    )
    .await
    .expect("key");
    let (status, me) = get(&api, &key, "/me").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["userId"], "carol");
    assert_eq!(me["roles"], json!(["task_manager", "debug"]));
    assert_eq!(me["isAdmin"], false);
    assert_eq!(me["key"]["name"], "laptop");
    assert!(
        me["key"]["prefix"]
            .as_str()
            .is_some_and(|p| key.contains(&format!("{p}_"))),
        "{me}"
    );
    assert!(
        !me.to_string().contains(&key),
        "the key itself is never answered"
    );
    let (status, _) = get(&api, "not-a-key", "/me").await;
    assert_eq!(status, 401);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_output_is_followed_live_until_it_ends() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let bob = env.key("bob", &[Role::TaskManager]).await;
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "slow", "command": "for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.7; done; echo oops >&2"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = job_id(&body);
    let (status, _) = get(&api, &bob, &format!("/jobs/{id}/output?follow=true")).await;
    assert_eq!(status, 404, "another user's job");

    let mut resp = api
        .http
        .get(api.v1(&format!("/jobs/{id}/output?follow=true")))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("follow");
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    let mut seen_while_running = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
        .await
        .expect("a chunk within 30 s")
        .expect("the body")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("line-1") && !seen_while_running {
            let status = env.job_status(id).await.unwrap_or_default();
            seen_while_running = status == "running";
        }
    }
    assert!(
        seen_while_running,
        "output arrived while the job ran: {text:?}"
    );
    let want: String = (1..=6).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(text, want, "every line once, in order, then the end");
    assert_eq!(env.job_status(id).await.as_deref(), Some("succeeded"));
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM job_output_live")
        .fetch_one(&env.pool)
        .await
        .expect("live rows");
    assert_eq!(live, 0, "the live copy is gone once the run ended");

    // Following a finished job sends its stored output and ends; stderr too.
    let whole = api
        .http
        .get(api.v1(&format!("/jobs/{id}/output?follow=true&stream=stderr")))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("follow")
        .text()
        .await
        .expect("text");
    assert_eq!(whole, "oops\n");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_nodes_jobs_output_and_controls_tasks() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    env.start_scheduler().await;
    env.start_worker("w1", "default", "worker").await;
    let node_name = format!("{}-w1", env.prefix);
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let alice = env.key("alice", &[Role::TaskManager]).await;
    let conn = |key: &str| {
        vec![
            "--url".to_owned(),
            api.base.clone(),
            "--key".to_owned(),
            key.to_owned(),
        ]
    };
    let with = |args: &[&str], key: &str| -> Vec<String> {
        args.iter()
            .map(|s| (*s).to_owned())
            .chain(conn(key))
            .collect()
    };
    let run_cli = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        taskhost(&refs).await
    };

    let failing = run(
        &env,
        &api,
        &alice,
        "import",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    )
    .await;

    let (code, out, err) = run_cli(with(&["nodes"], &admin)).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .next()
            .is_some_and(|h| h.contains("NAME") && h.contains("SLOTS")),
        "{out}"
    );
    assert!(out.contains(&node_name), "{out}");

    let (code, out, err) = run_cli(with(&["jobs", "--status", "failed"], &admin)).await;
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&failing.to_string()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("alice") && line.contains(&node_name) && line.contains("import"),
        "{line}"
    );
    let (code, out, _) = run_cli(with(&["jobs", "--json", "--user", "alice"], &admin)).await;
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(page["jobs"][0]["jobId"], failing.to_string());
    let (code, out, err) = run_cli(with(&["jobs", "--status", "nope"], &admin)).await;
    assert_ne!(code, 0);
    assert!(err.contains("status") && out.is_empty(), "{err}");

    let id = failing.to_string();
    let (code, out, err) = run_cli(with(&["job", "get", &id], &alice)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("status     failed (exit 3)"), "{out}");
    assert!(out.contains(&format!("ran on     {node_name}")), "{out}");
    assert!(
        out.contains("--- stdout ---\nto-stdout\n--- stderr ---\nto-stderr"),
        "{out}"
    );
    let (code, out, err) = run_cli(with(&["job", "logs", &id], &alice)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "to-stdout\n");
    assert!(err.contains("to-stderr"), "{err}");

    let (code, out, err) = run_cli(with(&["job", "rerun", &id, "--wait"], &alice)).await;
    assert_eq!(
        code, 3,
        "a re-run waited for exits with the job's code: {err}"
    );
    let again: Uuid = out
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out.contains("to-stdout"), "{out}");
    let rerun_of: Option<Uuid> = sqlx::query_scalar("SELECT rerun_of FROM jobs WHERE job_id = $1")
        .bind(again)
        .fetch_one(&env.pool)
        .await
        .expect("rerun_of");
    assert_eq!(rerun_of, Some(failing));

    // submit --wait prints output as it comes, not only at the end.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskhost"))
        .args(with(
            &[
                "submit",
                "--wait",
                "-c",
                "for i in 1 2 3 4; do echo tick-$i; sleep 0.8; done",
            ],
            &alice,
        ))
        .env_remove("TASKHOST_URL")
        .env_remove("TASKHOST_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("submit --wait");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut tick_1_at = None;
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.expect("read") {
        if line == "tick-1" {
            tick_1_at = Some(std::time::Instant::now());
        }
        seen.push(line);
    }
    let ended = std::time::Instant::now();
    assert!(child.wait().await.expect("exit").success());
    let early = ended - tick_1_at.unwrap_or_else(|| panic!("no tick-1 in {seen:?}"));
    assert!(
        early > Duration::from_millis(1200),
        "tick-1 came only {early:?} before the end"
    );
    assert_eq!(
        &seen[1..],
        ["tick-1", "tick-2", "tick-3", "tick-4"],
        "{seen:?}"
    );

    // Task control.
    let (status, body) = call(
        &api,
        Method::POST,
        &alice,
        "/tasks",
        Some(&json!({"taskName": "nightly", "command": "true", "schedule": "@daily"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let task = body["taskId"].as_str().expect("taskId").to_owned();
    let enabled = |pool: sqlx::PgPool, task: String| async move {
        let e: bool = sqlx::query_scalar("SELECT enabled FROM tasks WHERE task_id = $1::uuid")
            .bind(task)
            .fetch_one(&pool)
            .await
            .expect("task");
        e
    };
    let (code, _, err) = run_cli(with(&["tasks", "disable", &task], &alice)).await;
    assert_eq!(code, 0, "{err}");
    assert!(!enabled(env.pool.clone(), task.clone()).await);
    let (code, out, _) = run_cli(with(&["tasks", "list"], &alice)).await;
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.contains("nightly"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(" no ") && line.contains("UTC"), "{line}");
    let (code, _, err) = run_cli(with(&["tasks", "enable", &task], &alice)).await;
    assert_eq!(code, 0, "{err}");
    assert!(enabled(env.pool.clone(), task.clone()).await);
    let (code, _, err) = run_cli(with(
        &[
            "tasks",
            "edit",
            &task,
            "--schedule",
            "@hourly",
            "--command",
            "echo edited",
        ],
        &alice,
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_cli(with(&["tasks", "get", &task], &alice)).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("@hourly") && out.contains("echo edited"),
        "{out}"
    );
    let (code, _, err) = run_cli(with(&["tasks", "edit", &task], &alice)).await;
    assert_ne!(code, 0, "nothing to change");
    assert!(err.contains("nothing to change"), "{err}");
    let (code, _, err) = run_cli(with(&["tasks", "delete", &task], &alice)).await;
    assert_ne!(code, 0, "no terminal to ask, no --yes: refused");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, err) = run_cli(with(&["tasks", "delete", &task, "--yes"], &alice)).await;
    assert_eq!(code, 0, "{err}");
    let (status, _) = get(&api, &alice, &format!("/tasks/{task}")).await;
    assert_eq!(status, 404);
    env.cleanup().await;
}
