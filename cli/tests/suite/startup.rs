//! The first hour: every start-up mistake ends within seconds in one line
//! that names the endpoint (password hidden) and the fix; a second process
//! never takes over a running node; the CLI survives a closed pipe and says
//! how to give it a key. Real Postgres and RabbitMQ, the built binary.

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use taskhost_common::model::Role;
use taskhost_testkit::{PG_SERVER, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");
/// A mistake must be reported well within this.
const FAST: Duration = Duration::from_secs(15);

/// Runs `taskhost <args>` with the test's environment plus `extra`; fails
/// the test if it does not exit within [`FAST`]. Returns the output and how
/// long it took.
pub(crate) async fn run(
    env: &TestEnv,
    args: &[&str],
    extra: &[(&str, &str)],
) -> (Output, Duration) {
    let mut vars: HashMap<String, String> = env.env();
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&vars)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t = Instant::now();
    match tokio::time::timeout(FAST, cmd.output()).await {
        Ok(out) => (out.expect("run taskhost"), t.elapsed()),
        Err(_) => panic!("`taskhost {}` did not exit within {FAST:?}", args.join(" ")),
    }
}

/// The `taskhost: ...` lines of stderr (log lines are left out).
fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("taskhost: "))
        .map(str::to_owned)
        .collect()
}

/// The one error line of a failed run, checked for a non-zero exit.
pub(crate) fn one_error(what: &str, out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{what}: exited 0\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = error_lines(out);
    assert_eq!(
        lines.len(),
        1,
        "{what}: one error line expected\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{what}: panicked"
    );
    lines[0].clone()
}

/// A TCP port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn start_up_mistakes_end_in_one_line_with_the_endpoint_and_the_fix() {
    let env = TestEnv::new().await;
    let port = closed_port();
    let wrong_pg = format!("postgres://postgres:s3cret@127.0.0.1:{port}/taskhost");
    let missing_db = format!("{PG_SERVER}/th_missing_{}", &env.prefix);
    let wrong_mq = format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f");
    for service in ["worker", "scheduler", "api", "standalone"] {
        let (out, took) = run(&env, &[service], &[("DATABASE_URL", &wrong_pg)]).await;
        let line = one_error(&format!("{service} with Postgres down"), &out);
        assert!(took < Duration::from_secs(10), "{service}: took {took:?}");
        assert!(line.contains("PostgreSQL"), "{line}");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        assert!(!line.contains("s3cret"), "password shown: {line}");
        assert!(line.contains("***"), "{line}");
        assert!(line.contains("is it running"), "{line}");

        if service != "standalone" {
            // standalone creates the database; the others say how.
            let (out, _) = run(&env, &[service], &[("DATABASE_URL", &missing_db)]).await;
            let line = one_error(&format!("{service} with no database"), &out);
            assert!(line.contains("does not exist"), "{line}");
            assert!(line.contains("taskhost migrate"), "{line}");
        }

        let (out, took) = run(&env, &[service], &[("AMQP_URL", &wrong_mq)]).await;
        let line = one_error(&format!("{service} with RabbitMQ down"), &out);
        assert!(took < Duration::from_secs(10), "{service}: took {took:?}");
        assert!(line.contains("RabbitMQ"), "{line}");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        assert!(!line.contains("s3cret"), "password shown: {line}");
        assert!(line.contains("amqp.url"), "{line}");
    }
    // A worker that could not reach the broker registered no node.
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&env.pool)
        .await
        .expect("count nodes");
    assert_eq!(nodes, 0, "a failed start registered a node");

    // A schema behind the binary.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&env.pool)
    .await
    .expect("forget a migration");
    let (out, _) = run(&env, &["worker"], &[]).await;
    let line = one_error("worker on an old schema", &out);
    assert!(line.contains("behind"), "{line}");
    assert!(line.contains("taskhost migrate"), "{line}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_busy_api_port_stops_standalone_before_any_part_starts() {
    let env = TestEnv::new().await;
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("addr").to_string();
    let name = format!("{}-busy", env.prefix);
    let (out, took) = run(
        &env,
        &["standalone", "--node-name", &name],
        &[("TASKHOST__API__BIND", &addr)],
    )
    .await;
    let line = one_error("standalone on a busy port", &out);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(line.contains(&addr), "{line}");
    assert!(line.contains("api.bind"), "{line}");
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE node_name = $1")
        .bind(&name)
        .fetch_one(&env.pool)
        .await
        .expect("count nodes");
    assert_eq!(nodes, 0, "the refused standalone started a worker");
    drop(holder);
    env.cleanup().await;
}

async fn node_active(env: &TestEnv, name: &str) -> bool {
    sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_name = $1")
        .bind(name)
        .fetch_optional(&env.pool)
        .await
        .expect("read node")
        .unwrap_or(false)
}

#[tokio::test]
async fn a_second_worker_with_a_running_nodes_name_is_refused_and_leaves_it_alone() {
    let env = TestEnv::new().await;
    let name = format!("{}-dup", env.prefix);
    let mut first = env.spawn_binary(BIN, &["worker", "--node-name", &name], &[]);
    let node = env.wait_node(&name).await;

    let (out, took) = run(
        &env,
        &["worker", "--node-name", &name, "--group", "other"],
        &[],
    )
    .await;
    let line = one_error("a second worker with the same name", &out);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(line.contains(&name), "{line}");
    assert!(line.contains("--node-name"), "{line}");
    // The running node is untouched: still active, same group, and after a
    // heartbeat or two it is still active.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        node_active(&env, &name).await,
        "the refused worker stopped the node"
    );
    let group: String = sqlx::query_scalar("SELECT node_group FROM nodes WHERE node_id = $1")
        .bind(node)
        .fetch_one(&env.pool)
        .await
        .expect("group");
    assert_eq!(group, "default", "the refused worker changed the node");

    // A worker that died (SIGKILL) may be replaced at once under its name.
    first.kill().expect("kill");
    first.wait().expect("reap");
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .expect("now");
    let mut second = env.spawn_binary(BIN, &["worker", "--node-name", &name], &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = second.try_wait().expect("try_wait") {
            panic!("the replacement worker exited: {status}");
        }
        let beat: bool = sqlx::query_scalar(
            "SELECT is_active AND last_heartbeat > $2 FROM nodes WHERE node_id = $1",
        )
        .bind(node)
        .bind(since)
        .fetch_one(&env.pool)
        .await
        .expect("heartbeat");
        if beat {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replacement never took the node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = second.kill();
    let _ = second.wait();
    env.cleanup().await;
}

#[tokio::test]
async fn the_cli_survives_a_closed_pipe_and_names_the_key_variable() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (out, _) = run(&env, &["results"], &[("TASKHOST_URL", &api.base)]).await;
    let line = one_error("results without a key", &out);
    assert!(line.contains("--key"), "{line}");
    assert!(line.contains("TASKHOST_API_KEY"), "{line}");

    // `taskhost results | head -0`: the reader is gone before the first
    // line is written.
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("results")
        .env("TASKHOST_URL", &api.base)
        .env("TASKHOST_API_KEY", &key)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    drop(child.stdout.take());
    let out = tokio::time::timeout(FAST, child.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "closed pipe: {:?} {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_database_migrated_before_the_comment_fix_still_migrates() {
    let env = TestEnv::new().await;
    // The checksum the first migration had when its first comment named a
    // file outside the repository.
    let original = "4f8676b3451fbd27a3f97d199c810ac13d2bdc49d2b347a773b5c41516d3d055a13ea16631456f3a7f09cddf54254cfa";
    let set = |checksum: &'static str| {
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 20261123000001",
        )
        .bind(checksum)
    };
    set(original)
        .execute(&env.pool)
        .await
        .expect("old checksum");
    let (out, _) = run(&env, &["migrate"], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: String = sqlx::query_scalar(
        "SELECT encode(checksum, 'hex') FROM _sqlx_migrations WHERE version = 20261123000001",
    )
    .fetch_one(&env.pool)
    .await
    .expect("checksum");
    assert_ne!(now, original, "re-recorded as the file's checksum");
    // Any other difference is still refused.
    set("00").execute(&env.pool).await.expect("odd checksum");
    let (out, _) = run(&env, &["migrate"], &[]).await;
    let line = one_error("migrate over a modified migration", &out);
    assert!(line.contains("migrat"), "{line}");
    env.cleanup().await;
}
