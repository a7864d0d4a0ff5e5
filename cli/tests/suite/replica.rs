//! `taskhost sync`: replicas (a second PostgreSQL database and an SQLite
//! file) follow the change feed, survive a syncer killed mid-batch without
//! skipping or doubling a change, report rows changed on the replica (the
//! source wins), and `sync verify` finds them equal; `/sync/status` lists
//! the replica with its lag.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use taskhost_common::model::Role;
use taskhost_common::tasks::{self, TaskRequest};
use taskhost_testkit::{ChildGuard, PG_SERVER, TestEnv, drop_database, get, test_db_name};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

/// Output of one `taskhost` run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `taskhost <args>` with the test's environment and waits for it.
async fn taskhost(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .envs(env.env())
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run taskhost");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A second, empty database on the same server: (name, url).
async fn second_database(env: &TestEnv) -> (String, String) {
    let name = test_db_name("replica");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&env.pool)
        .await
        .expect("create the replica database");
    let url = format!("{PG_SERVER}/{name}");
    (name, url)
}

fn sqlite_path() -> String {
    std::env::temp_dir()
        .join(format!("th-replica-{}.db", Uuid::new_v4().simple()))
        .to_string_lossy()
        .into_owned()
}

/// Removes an SQLite file and its WAL files.
fn remove_sqlite(path: &str) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
}

async fn sqlite(path: &str) -> SqlitePool {
    SqlitePool::connect(&format!("sqlite:{path}"))
        .await
        .expect("open the SQLite replica")
}

async fn new_task(env: &TestEnv, name: &str) -> Uuid {
    tasks::create(
        &env.pool,
        TaskRequest {
            task_name: Some(name.to_owned()),
            command: Some("true".to_owned()),
            schedule: Some("0 3 * * *".to_owned()),
            ..Default::default()
        },
        "alice",
    )
    .await
    .expect("create task")
    .task_id
}

async fn describe_task(env: &TestEnv, id: Uuid, text: &str) {
    tasks::update(
        &env.pool,
        id,
        TaskRequest {
            description: Some(text.to_owned()),
            ..Default::default()
        },
        "alice",
    )
    .await
    .expect("update task");
}

async fn source_names(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar("SELECT task_name FROM tasks ORDER BY task_name")
        .fetch_all(&env.pool)
        .await
        .expect("source tasks")
}

async fn sync_once(env: &TestEnv, into: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "sync",
        "--once",
        "--into",
        into,
        "--tables",
        "tasks,task_schedule,nodes",
    ];
    args.extend_from_slice(extra);
    taskhost(env, &args, &[]).await
}

async fn verify(env: &TestEnv, into: &str) -> Run {
    taskhost(
        env,
        &[
            "sync",
            "verify",
            "--into",
            into,
            "--tables",
            "tasks,task_schedule,nodes",
        ],
        &[],
    )
    .await
}

fn assert_ok(run: &Run, what: &str) {
    assert_eq!(
        run.code,
        Some(0),
        "{what}: stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
}

/// The `N change(s) applied` of a sync summary line.
fn applied(run: &Run) -> i64 {
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("synced:"))
        .unwrap_or_else(|| panic!("no summary line: {}", run.stdout));
    line["synced: ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable summary: {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_sqlite_replicas_apply_the_feed_and_verify_equal() {
    let mut env = TestEnv::new().await;
    let (db, pg_url) = second_database(&env).await;
    let lite = sqlite_path();

    // Bad input is refused before anything is touched.
    let bad = taskhost(
        &env,
        &[
            "sync",
            "--once",
            "--into",
            &pg_url,
            "--tables",
            "tasks,users",
        ],
        &[],
    )
    .await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("--tables"), "{}", bad.stderr);

    let a = new_task(&env, "alpha").await;
    let b = new_task(&env, "beta").await;
    let c = new_task(&env, "gamma").await;
    describe_task(&env, a, "first edit").await;
    tasks::delete(&env.pool, b, "alice").await.expect("delete");

    for into in [pg_url.as_str(), lite.as_str()] {
        let run = sync_once(&env, into, &[]).await;
        assert_ok(&run, "first sync");
        assert!(
            run.stdout.contains("snapshot copied rows"),
            "{}",
            run.stdout
        );
    }
    let pg = PgPool::connect(&pg_url).await.expect("replica pool");
    let sq = sqlite(&lite).await;
    let names_pg: Vec<String> =
        sqlx::query_scalar("SELECT task_name FROM tasks ORDER BY task_name")
            .fetch_all(&pg)
            .await
            .unwrap();
    let names_sq: Vec<String> =
        sqlx::query_scalar("SELECT task_name FROM tasks ORDER BY task_name")
            .fetch_all(&sq)
            .await
            .unwrap();
    assert_eq!(names_pg, source_names(&env).await);
    assert_eq!(names_sq, source_names(&env).await);
    assert!(names_pg.contains(&"alpha".to_owned()) && !names_pg.contains(&"beta".to_owned()));

    // Changes after the first sync travel through the feed.
    describe_task(&env, c, "second edit").await;
    let d = new_task(&env, "delta").await;
    tasks::delete(&env.pool, a, "alice").await.expect("delete");
    for into in [pg_url.as_str(), lite.as_str()] {
        let run = sync_once(&env, into, &[]).await;
        assert_ok(&run, "second sync");
        assert!(applied(&run) >= 4, "{}", run.stdout);
        assert!(run.stdout.contains(" 0 conflict(s)"), "{}", run.stdout);
        let v = verify(&env, into).await;
        assert_ok(&v, "verify");
        assert!(v.stdout.contains("tasks: equal"), "{}", v.stdout);
        assert!(v.stdout.contains("task_schedule: equal"), "{}", v.stdout);
        // Idempotent: nothing new, nothing applied.
        let again = sync_once(&env, into, &[]).await;
        assert_ok(&again, "third sync");
        assert_eq!(applied(&again), 0, "{}", again.stdout);
    }
    let desc: String = sqlx::query_scalar("SELECT description FROM tasks WHERE task_id = $1")
        .bind(c)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(desc, "second edit");
    let (desc, enabled): (String, i64) =
        sqlx::query_as("SELECT description, enabled FROM tasks WHERE task_id = ?")
            .bind(c.to_string())
            .fetch_one(&sq)
            .await
            .unwrap();
    assert_eq!((desc.as_str(), enabled), ("second edit", 1));
    let created: String = sqlx::query_scalar("SELECT created_at FROM tasks WHERE task_id = ?")
        .bind(d.to_string())
        .fetch_one(&sq)
        .await
        .unwrap();
    assert!(
        created.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(&created).is_ok(),
        "timestamps are RFC 3339 UTC text: {created}"
    );
    let gone: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE task_id = ?")
        .bind(a.to_string())
        .fetch_one(&sq)
        .await
        .unwrap();
    assert_eq!(gone, 0, "a deleted task is deleted on the replica");

    // /sync/status lists each replica per table, caught up.
    let api = env.start_api().await;
    let admin = env.key("root", &[Role::SiteAdmin]).await;
    let (status, st) = get(&api, &admin, "/sync/status").await;
    assert_eq!(status, 200, "{st}");
    let replica_name = lite
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".db")
        .to_owned();
    for consumer in [format!("replica:{db}"), format!("replica:{replica_name}")] {
        let rows: Vec<&Value> = st["consumers"]
            .as_array()
            .expect("consumers")
            .iter()
            .filter(|c| c["consumer"] == consumer.as_str())
            .collect();
        assert_eq!(rows.len(), 3, "{consumer} per table: {st}");
        for r in rows {
            assert_eq!(r["lag"], 0, "{r}");
        }
    }

    pg.close().await;
    sq.close().await;
    drop_database(&db).await;
    remove_sqlite(&lite);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_sees_a_new_task_within_seconds() {
    let env = TestEnv::new().await;
    let lite = sqlite_path();
    let syncer = ChildGuard(
        Command::new(BIN)
            .args([
                "sync",
                "--follow",
                "--interval-ms",
                "200",
                "--into",
                &lite,
                "--tables",
                "tasks,task_schedule",
            ])
            .envs(env.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the syncer"),
    );
    // Let it make the replica (and its first copy) before the change.
    let started = Instant::now();
    while !std::path::Path::new(&lite).exists() && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = new_task(&env, "followed").await;
    let sq = sqlite(&lite).await;
    let started = Instant::now();
    loop {
        let seen: Option<String> =
            sqlx::query_scalar("SELECT task_name FROM tasks WHERE task_id = ?")
                .bind(id.to_string())
                .fetch_optional(&sq)
                .await
                .unwrap_or(None);
        if seen.as_deref() == Some("followed") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new task never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sq.close().await;
    drop(syncer);
    remove_sqlite(&lite);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncer_killed_mid_batch_neither_skips_nor_doubles() {
    let env = TestEnv::new().await;
    let (db, pg_url) = second_database(&env).await;
    assert_ok(&sync_once(&env, &pg_url, &[]).await, "first sync");
    let pg = PgPool::connect(&pg_url).await.expect("replica pool");
    let cursor_of = |pool: PgPool| async move {
        let c: i64 = sqlx::query_scalar("SELECT min(last_change_seq) FROM taskhost_replica_state")
            .fetch_one(&pool)
            .await
            .expect("cursor");
        c
    };
    let before = cursor_of(pg.clone()).await;
    let rows_before: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pg)
        .await
        .unwrap();

    // About 2,000 changes: 1,000 tasks, each with its schedule row.
    for i in 0..1000 {
        new_task(&env, &format!("bulk-{i:04}")).await;
    }
    let expected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change
         WHERE change_seq > $1 AND table_name IN ('tasks', 'task_schedule', 'nodes')",
    )
    .bind(before)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(expected >= 2000, "{expected}");

    // Killed half-way through applying one batch of all of them.
    let killed = taskhost(
        &env,
        &[
            "sync",
            "--once",
            "--batch",
            "5000",
            "--into",
            &pg_url,
            "--tables",
            "tasks,task_schedule,nodes",
        ],
        &[("TASKHOST_FAILPOINTS", "replica.mid_batch=abort")],
    )
    .await;
    assert_eq!(killed.code, None, "killed by a signal: {}", killed.stderr);
    assert!(
        killed.stderr.contains("replica.mid_batch"),
        "{}",
        killed.stderr
    );
    assert_eq!(cursor_of(pg.clone()).await, before, "nothing committed");
    let rows_now: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(rows_now, rows_before, "no half batch on the replica");

    // The next run applies each change exactly once.
    let run = sync_once(&env, &pg_url, &[]).await;
    assert_ok(&run, "sync after the kill");
    assert_eq!(applied(&run), expected, "{}", run.stdout);
    assert!(run.stdout.contains(" 0 conflict(s)"), "{}", run.stdout);
    let head: i64 = sqlx::query_scalar("SELECT max(change_seq) FROM data_change")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(cursor_of(pg.clone()).await, head, "the cursor is the head");
    let v = verify(&env, &pg_url).await;
    assert_ok(&v, "verify");
    let source_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        v.stdout
            .contains(&format!("tasks: equal ({source_rows} rows")),
        "{}",
        v.stdout
    );

    pg.close().await;
    drop_database(&db).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_on_the_replica_is_reported_and_the_source_wins() {
    let env = TestEnv::new().await;
    let (db, pg_url) = second_database(&env).await;
    let id = new_task(&env, "guarded").await;
    assert_ok(&sync_once(&env, &pg_url, &[]).await, "first sync");
    let pg = PgPool::connect(&pg_url).await.expect("replica pool");

    // Someone writes to the read-only replica.
    sqlx::query("UPDATE tasks SET description = 'tampered' WHERE task_id = $1")
        .bind(id)
        .execute(&pg)
        .await
        .unwrap();
    let v = verify(&env, &pg_url).await;
    assert_eq!(v.code, Some(1), "{}", v.stdout);
    assert!(v.stdout.contains("tasks: DIFFERENT"), "{}", v.stdout);
    assert!(
        v.stdout.contains(&id.to_string()),
        "names the row: {}",
        v.stdout
    );

    describe_task(&env, id, "from the source").await;
    let run = sync_once(&env, &pg_url, &[]).await;
    assert_ok(&run, "sync");
    assert!(run.stdout.contains(" 1 conflict(s)"), "{}", run.stdout);
    let desc: String = sqlx::query_scalar("SELECT description FROM tasks WHERE task_id = $1")
        .bind(id)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(desc, "from the source");
    let v = verify(&env, &pg_url).await;
    assert_ok(&v, "verify after the source won");
    assert!(
        v.stdout.contains("conflicts recorded on the replica: 1"),
        "{}",
        v.stdout
    );
    assert!(
        v.stdout.contains(&format!("UPDATE tasks {id}")),
        "lists the conflict: {}",
        v.stdout
    );

    // The replica refuses another source's feed.
    let other = TestEnv::new().await;
    let refused = sync_once(&other, &pg_url, &[]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("another source"),
        "{}",
        refused.stderr
    );

    pg.close().await;
    drop_database(&db).await;
    other.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_late_is_not_skipped_by_the_replica() {
    use taskhost_common::changelog::{self, Action, Change};
    let env = TestEnv::new().await;
    let lite = sqlite_path();
    assert_ok(&sync_once(&env, &lite, &[]).await, "first sync");

    // A node's change draws its number, then stays uncommitted while a
    // later task commits.
    let mut late = env.pool.begin().await.expect("begin");
    let node = Uuid::now_v7();
    let row: Value = sqlx::query_scalar(
        "INSERT INTO nodes (node_id, node_name, hostname) VALUES ($1, 'late-node', 'h')
         RETURNING to_jsonb(nodes.*)",
    )
    .bind(node)
    .fetch_one(&mut *late)
    .await
    .expect("insert node");
    changelog::record(
        &mut late,
        Change {
            table: "nodes",
            record_id: node.to_string(),
            action: Action::Insert,
            old: None,
            new: Some(&row),
            changed_by: "test",
            node_id: None,
            reason: Some("test"),
        },
    )
    .await
    .expect("record");
    let task = new_task(&env, "early").await;
    let run = sync_once(&env, &lite, &[]).await;
    assert_ok(&run, "sync with a change in flight");
    assert_eq!(
        applied(&run),
        0,
        "stops before the uncommitted change: {}",
        run.stdout
    );

    late.commit().await.expect("commit");
    let run = sync_once(&env, &lite, &[]).await;
    assert_ok(&run, "sync after the commit");
    assert_eq!(applied(&run), 3, "node, task, schedule: {}", run.stdout);
    let sq = sqlite(&lite).await;
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE node_id = ?")
        .bind(node.to_string())
        .fetch_one(&sq)
        .await
        .unwrap();
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE task_id = ?")
        .bind(task.to_string())
        .fetch_one(&sq)
        .await
        .unwrap();
    assert_eq!((nodes, tasks), (1, 1));
    assert_ok(&verify(&env, &lite).await, "verify");
    sq.close().await;
    remove_sqlite(&lite);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_syncers_of_one_replica_apply_each_change_once() {
    let env = TestEnv::new().await;
    let (db, pg_url) = second_database(&env).await;
    assert_ok(&sync_once(&env, &pg_url, &[]).await, "first sync");
    let before: i64 = sqlx::query_scalar("SELECT COALESCE(max(change_seq), 0) FROM data_change")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    for i in 0..300 {
        new_task(&env, &format!("pair-{i:03}")).await;
    }
    let expected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change
         WHERE change_seq > $1 AND table_name IN ('tasks', 'task_schedule', 'nodes')",
    )
    .bind(before)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let (one, two) = tokio::join!(
        sync_once(&env, &pg_url, &["--batch", "50"]),
        sync_once(&env, &pg_url, &["--batch", "50"]),
    );
    assert_ok(&one, "first syncer");
    assert_ok(&two, "second syncer");
    assert_eq!(
        applied(&one) + applied(&two),
        expected,
        "{} / {}",
        one.stdout,
        two.stdout
    );
    assert!(one.stdout.contains(" 0 conflict(s)") && two.stdout.contains(" 0 conflict(s)"));
    assert_ok(&verify(&env, &pg_url).await, "verify");
    drop_database(&db).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_replicate_into_sqlite_too() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("dora", &[Role::TaskManager]).await;
    let lite = sqlite_path();
    let (status, body) = taskhost_testkit::submit(
        &api,
        &key,
        &serde_json::json!({"jobName": "j1", "command": "true"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let args = [
        "sync",
        "--once",
        "--into",
        lite.as_str(),
        "--tables",
        "jobs",
    ];
    assert_ok(&taskhost(&env, &args, &[]).await, "first sync");
    let (status, body) = taskhost_testkit::submit(
        &api,
        &key,
        &serde_json::json!({"jobName": "j2", "command": "true"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run = taskhost(&env, &args, &[]).await;
    assert_ok(&run, "second sync");
    assert!(applied(&run) >= 1, "{}", run.stdout);
    // The api marks a job queued once the broker took it, which may land
    // after a sync: sync again until the replica has caught up.
    let mut v = None;
    for _ in 0..10 {
        let run = taskhost(
            &env,
            &[
                "sync",
                "verify",
                "--into",
                lite.as_str(),
                "--tables",
                "jobs",
            ],
            &[],
        )
        .await;
        if run.code == Some(0) {
            v = Some(run);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_ok(&taskhost(&env, &args, &[]).await, "catch-up sync");
    }
    let v = v.expect("the replica never verified equal");
    assert!(v.stdout.contains("jobs: equal (2 rows"), "{}", v.stdout);
    let sq = sqlite(&lite).await;
    let names: Vec<String> = sqlx::query_scalar("SELECT job_name FROM jobs ORDER BY job_name")
        .fetch_all(&sq)
        .await
        .unwrap();
    assert_eq!(names, ["j1", "j2"]);
    sq.close().await;
    remove_sqlite(&lite);
    env.cleanup().await;
}
