//! The foundation a user checks first: configuration layering and errors,
//! migrations and the schema guards, services refusing a database that is
//! behind, the gzip change log, idempotent broker topology, API keys and
//! authentication, readiness, and `taskhost standalone` starting from nothing
//! and stopping cleanly on SIGTERM. Real Postgres and RabbitMQ, no mocks.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::PgPool;
use taskhost_common::Settings;
use taskhost_common::amqp::{self, Names};
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::keys::hash_key;
use taskhost_testkit::{AMQP_URL, PG_SERVER, TestEnv, drop_database, get};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

/// An environment map from pairs.
fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A database name that does not exist yet.
fn fresh_db_name(tag: &str) -> String {
    taskhost_testkit::test_db_name(&format!("{tag}_"))
}

/// Runs `taskhost <args>` with exactly `env` (plus PATH), capturing stdout
/// and stderr; fails the test if it does not exit within `within`.
async fn run_cli(args: &[&str], env: &HashMap<String, String>, within: Duration) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(within, cmd.output()).await {
        Ok(out) => out.expect("run taskhost"),
        Err(_) => panic!(
            "`taskhost {}` did not exit within {within:?}",
            args.join(" ")
        ),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Kills and reaps a child process when dropped (a failed assertion must
/// not leave a service running).
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

async fn public_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(pool)
    .await
    .expect("list tables")
}

// 1 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_layers_defaults_file_env_and_bare_urls() {
    // Defaults: nothing set at all.
    let s = Settings::load_from(None, &HashMap::new()).expect("defaults load");
    assert_eq!(s.api.bind, "127.0.0.1:8080");
    assert_eq!(s.amqp.prefix, "taskhost");
    assert_eq!(s.worker.shell, "/bin/sh -c");
    assert_eq!(s.worker.shell_argv(), vec!["/bin/sh", "-c"]);
    assert_eq!(
        s.database.url,
        "postgres://postgres@127.0.0.1:5432/taskhost"
    );
    assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(s.worker.group, "default");
    assert_eq!(s.worker.role, "worker");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        s.worker.concurrency, cpus,
        "default concurrency is the CPU count"
    );

    // A TOML file, then the environment over it.
    let path: PathBuf =
        std::env::temp_dir().join(format!("taskhost-foundation-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        "[worker]\ngroup = \"fromfile\"\n\n[amqp]\nprefix = \"fileprefix\"\n\n[database]\nurl = \"postgres://postgres@127.0.0.1:5432/fromfile\"\n",
    )
    .expect("write config file");

    let file_only = Settings::load_from(Some(&path), &HashMap::new()).expect("file loads");
    assert_eq!(file_only.worker.group, "fromfile");
    assert_eq!(file_only.amqp.prefix, "fileprefix");
    assert_eq!(
        file_only.database.url,
        "postgres://postgres@127.0.0.1:5432/fromfile"
    );

    let layered = Settings::load_from(
        Some(&path),
        &env_of(&[("TASKHOST__WORKER__GROUP", "fromenv")]),
    )
    .expect("file + env loads");
    assert_eq!(layered.worker.group, "fromenv", "env wins over the file");
    assert_eq!(
        layered.amqp.prefix, "fileprefix",
        "file value kept when env is silent"
    );
    assert_eq!(
        layered.api.bind, "127.0.0.1:8080",
        "default kept when nobody sets it"
    );

    // The file can be named by TASKHOST_CONFIG instead of an argument.
    let path_str = path.to_str().expect("utf-8 temp path");
    let via_env = Settings::load_from(
        None,
        &env_of(&[
            ("TASKHOST_CONFIG", path_str),
            ("TASKHOST__WORKER__GROUP", "fromenv"),
        ]),
    )
    .expect("TASKHOST_CONFIG loads");
    assert_eq!(via_env.worker.group, "fromenv");
    assert_eq!(via_env.amqp.prefix, "fileprefix");

    // Bare DATABASE_URL is honoured (over the default and over the file).
    let bare = "postgres://postgres@127.0.0.1:5432/from_bare";
    let s = Settings::load_from(None, &env_of(&[("DATABASE_URL", bare)])).expect("bare url");
    assert_eq!(s.database.url, bare);
    let s = Settings::load_from(Some(&path), &env_of(&[("DATABASE_URL", bare)]))
        .expect("bare url over file");
    assert_eq!(s.database.url, bare, "environment wins over the file");

    // TASKHOST__DATABASE__URL wins over DATABASE_URL.
    let specific = "postgres://postgres@127.0.0.1:5432/from_specific";
    let s = Settings::load_from(
        None,
        &env_of(&[
            ("DATABASE_URL", bare),
            ("TASKHOST__DATABASE__URL", specific),
        ]),
    )
    .expect("both urls");
    assert_eq!(s.database.url, specific);

    // The same for AMQP_URL / TASKHOST__AMQP__URL.
    let amqp_bare = "amqp://guest:guest@127.0.0.1:5672/bare";
    let amqp_specific = "amqp://guest:guest@127.0.0.1:5672/specific";
    let s = Settings::load_from(None, &env_of(&[("AMQP_URL", amqp_bare)])).expect("amqp bare");
    assert_eq!(s.amqp.url, amqp_bare);
    let s = Settings::load_from(
        None,
        &env_of(&[
            ("AMQP_URL", amqp_bare),
            ("TASKHOST__AMQP__URL", amqp_specific),
        ]),
    )
    .expect("amqp both");
    assert_eq!(s.amqp.url, amqp_specific);

    let _ = std::fs::remove_file(&path);
}

// 2 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_values_are_reported_by_key() {
    let err = Settings::load_from(None, &env_of(&[("TASKHOST__WORKER__CONCURRENCY", "abc")]))
        .expect_err("concurrency=abc must be refused")
        .to_string();
    assert!(
        err.contains("worker.concurrency"),
        "error does not name the key: {err}"
    );

    let err = Settings::load_from(None, &env_of(&[("TASKHOST__WORKER__GROUP", "Bad")]))
        .expect_err("group=Bad must be refused")
        .to_string();
    assert!(
        err.contains("worker.group"),
        "error does not name the key: {err}"
    );

    // Through the binary: exit code 2 and one line on stderr naming the key.
    // A database that does not exist, so a wrongly accepted config fails fast.
    let base = [
        ("TASKHOST__API__BIND", "127.0.0.1:0"),
        (
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/th_test_never_created_db",
        ),
    ];
    for (var, value, key) in [
        ("TASKHOST__WORKER__CONCURRENCY", "abc", "worker.concurrency"),
        ("TASKHOST__WORKER__GROUP", "Bad", "worker.group"),
    ] {
        let mut env = env_of(&base);
        env.insert(var.to_owned(), value.to_owned());
        let out = run_cli(&["api"], &env, Duration::from_secs(20)).await;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{var}={value}: expected exit code 2, got {:?}; stderr: {stderr}",
            out.status
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{var}={value}: stderr must be one line, got: {stderr:?}"
        );
        assert!(
            stderr.contains(key),
            "{var}={value}: stderr does not name `{key}`: {stderr}"
        );
    }
}

// 3 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_database_is_idempotent_and_guards_final_history() {
    let name = fresh_db_name("mig");
    let url = format!("{PG_SERVER}/{name}");
    let env = env_of(&[("DATABASE_URL", &url)]);

    let first = run_cli(&["migrate"], &env, Duration::from_secs(30)).await;
    let first_err = text(&first.stderr);
    assert!(first.status.success(), "first migrate failed: {first_err}");
    assert!(
        !first_err.contains("applied 0"),
        "the first run must apply the schema: {first_err}"
    );

    let pool = PgPool::connect(&url)
        .await
        .expect("connect to the migrated database");
    let tables = public_tables(&pool).await;
    for t in [
        "nodes",
        "tasks",
        "task_schedule",
        "jobs",
        "task_history",
        "data_change",
        "sync_state",
        "api_keys",
        "outbox",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "table {t} missing; have {tables:?}"
        );
    }

    let second = run_cli(&["migrate"], &env, Duration::from_secs(30)).await;
    let second_err = text(&second.stderr);
    assert!(
        second.status.success(),
        "second migrate failed: {second_err}"
    );
    assert!(
        second_err.contains("applied 0"),
        "second run must apply nothing: {second_err}"
    );

    // At most one terminal history row per job.
    let job = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (job_id, user_id, job_name, command) VALUES ($1, 'u', 'j', 'true')",
    )
    .bind(job)
    .execute(&pool)
    .await
    .expect("insert job");
    let insert_history = |attempt: i32, is_final: bool, job: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO task_history (job_id, attempt, state, is_final)
                 VALUES ($1, $2, 'succeeded', $3)",
            )
            .bind(job)
            .bind(attempt)
            .bind(is_final)
            .execute(&pool)
            .await
        }
    };
    insert_history(0, true, job)
        .await
        .expect("first terminal row");
    // A different attempt, so only the "one final row per job" rule can refuse it.
    let err = insert_history(1, true, job)
        .await
        .expect_err("a second terminal row for the same job must be refused");
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    assert_eq!(
        code.as_deref(),
        Some("23505"),
        "expected a unique violation, got {err}"
    );

    // A retried (non-final) attempt plus one final row is fine.
    let job2 = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (job_id, user_id, job_name, command) VALUES ($1, 'u', 'j2', 'true')",
    )
    .bind(job2)
    .execute(&pool)
    .await
    .expect("insert job 2");
    insert_history(0, false, job2)
        .await
        .expect("non-final attempt");
    insert_history(1, true, job2)
        .await
        .expect("final attempt after a retried one");

    pool.close().await;
    drop_database(&name).await;
}

// 4 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_refuse_a_database_that_is_behind() {
    let name = fresh_db_name("behind");
    let admin = PgPool::connect(&format!("{PG_SERVER}/postgres"))
        .await
        .expect("connect to postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("create empty database");
    admin.close().await;

    let url = format!("{PG_SERVER}/{name}");
    let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let env = env_of(&[
        ("DATABASE_URL", &url),
        ("AMQP_URL", AMQP_URL),
        ("TASKHOST__AMQP__PREFIX", &prefix),
        ("TASKHOST__API__BIND", "127.0.0.1:0"),
        ("TASKHOST__WORKER__NODE_NAME", &format!("{prefix}-behind")),
    ]);
    let within = Duration::from_secs(20);
    let (api, worker, scheduler) = tokio::join!(
        run_cli(&["api"], &env, within),
        run_cli(&["worker"], &env, within),
        run_cli(&["scheduler"], &env, within),
    );
    for (what, out) in [("api", api), ("worker", worker), ("scheduler", scheduler)] {
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "`taskhost {what}` started on an unmigrated database; stderr: {stderr}"
        );
        assert!(
            stderr.contains("taskhost migrate"),
            "`taskhost {what}` should tell the user to run `taskhost migrate`: {stderr}"
        );
    }

    // Nothing migrated or wrote to it behind the user's back.
    let pool = PgPool::connect(&url).await.expect("connect");
    let tables = public_tables(&pool).await;
    assert!(tables.is_empty(), "services created tables: {tables:?}");
    pool.close().await;
    drop_database(&name).await;
    taskhost_testkit::delete_broker_objects(&prefix).await;
}

// 5 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_log_round_trips_gzip_json_and_follows_the_transaction() {
    let env = TestEnv::new().await;
    let old = json!({"jobId": "a", "status": "queued", "n": 1, "nested": {"list": [1, null, "x"]}, "text": "é ✓"});
    let new = json!({"jobId": "a", "status": "running", "n": 2, "nested": {"list": []}, "big": "z".repeat(5000)});
    let record_id = Uuid::new_v4().to_string();

    let mut tx = env.pool.begin().await.expect("begin");
    let seq = changelog::record(
        &mut tx,
        Change {
            table: "jobs",
            record_id: record_id.clone(),
            action: Action::Update,
            old: Some(&old),
            new: Some(&new),
            changed_by: "foundation-test",
            node_id: None,
            reason: Some("round trip"),
        },
    )
    .await
    .expect("record change");
    tx.commit().await.expect("commit");

    let mut conn = env.pool.acquire().await.expect("acquire");
    let entries = changelog::read_since(&mut conn, Some("jobs"), seq - 1, 100)
        .await
        .expect("read_since");
    let entry = entries
        .iter()
        .find(|e| e.change_seq == seq)
        .expect("the recorded change reads back");
    assert_eq!(entry.record_id, record_id);
    assert_eq!(entry.action, "UPDATE");
    assert_eq!(entry.table_name, "jobs");
    assert_eq!(entry.changed_by, "foundation-test");
    assert_eq!(entry.change_reason.as_deref(), Some("round trip"));
    assert_eq!(entry.old_data.as_ref(), Some(&old));
    assert_eq!(entry.new_data.as_ref(), Some(&new));
    drop(conn);

    let (raw_old, raw_new): (Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT old_data, new_data FROM data_change WHERE change_seq = $1")
            .bind(seq)
            .fetch_one(&env.pool)
            .await
            .expect("raw row");
    for (what, raw, want) in [("old", raw_old, &old), ("new", raw_new, &new)] {
        let raw = raw.unwrap_or_else(|| panic!("{what}_data is NULL"));
        assert!(
            raw.starts_with(&[0x1f, 0x8b]),
            "{what}_data is not gzip: starts {:02x?}",
            &raw[..raw.len().min(4)]
        );
        assert_eq!(
            &changelog::gunzip_json(&raw).expect("gunzip"),
            want,
            "{what}_data decodes to the original"
        );
    }

    // Rolled back: no row.
    let gone_id = Uuid::new_v4().to_string();
    let mut tx = env.pool.begin().await.expect("begin");
    let gone_seq = changelog::record(
        &mut tx,
        Change {
            table: "jobs",
            record_id: gone_id.clone(),
            action: Action::Insert,
            old: None,
            new: Some(&new),
            changed_by: "foundation-test",
            node_id: None,
            reason: Some("rolled back"),
        },
    )
    .await
    .expect("record change in doomed tx");
    tx.rollback().await.expect("rollback");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change WHERE change_seq = $1 OR record_id = $2",
    )
    .bind(gone_seq)
    .bind(&gone_id)
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(left, 0, "a rolled-back change left a data_change row");

    env.cleanup().await;
}

// 6 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declaration_is_idempotent() {
    let env = TestEnv::new().await;
    let names: Names = env.names();
    let p = names.prefix().to_owned();

    let conn = amqp::connect(AMQP_URL, "foundation-topology")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    amqp::declare_topology(&ch, &names)
        .await
        .expect("first declare");
    amqp::declare_topology(&ch, &names)
        .await
        .expect("second declare, same channel");

    let conn2 = amqp::connect(AMQP_URL, "foundation-topology-2")
        .await
        .expect("connect again");
    let ch2 = conn2.create_channel().await.expect("channel 2");
    amqp::declare_topology(&ch2, &names)
        .await
        .expect("declare on a new connection");

    let passive_q = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for q in [
        format!("{p}.submit"),
        format!("{p}.dead"),
        format!("{p}.work.any"),
    ] {
        ch2.queue_declare(q.clone().into(), passive_q, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("queue {q} does not exist: {e}"));
    }
    let passive_x = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    for (x, kind) in [
        (format!("{p}.work"), ExchangeKind::Direct),
        (format!("{p}.dead"), ExchangeKind::Fanout),
        (format!("{p}.submit"), ExchangeKind::Direct),
        (format!("{p}.events"), ExchangeKind::Topic),
        (format!("{p}.control"), ExchangeKind::Topic),
    ] {
        ch2.exchange_declare(x.clone().into(), kind, passive_x, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("exchange {x} does not exist: {e}"));
    }

    // The passive check is real: a queue nobody declared is reported missing
    // (on its own channel, since the broker closes it).
    let ch3 = conn2.create_channel().await.expect("channel 3");
    assert!(
        ch3.queue_declare(format!("{p}.nope").into(), passive_q, FieldTable::default())
            .await
            .is_err(),
        "passive declare of a missing queue succeeded"
    );

    for q in [
        format!("{p}.submit"),
        format!("{p}.dead"),
        format!("{p}.work.any"),
    ] {
        let _ = ch2
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    for x in ["work", "dead", "submit", "events", "control"] {
        let _ = ch2
            .exchange_delete(format!("{p}.{x}").into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    let _ = conn2.close(200, "done".into()).await;
    env.cleanup().await;
}

// 7 -------------------------------------------------------------------------

fn sha256_hex_external(data: &str) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum digest")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_stored_hashed_listed_without_secret_and_revocable() {
    let mut env = TestEnv::new().await;
    let e = env.env();
    let within = Duration::from_secs(20);

    let out = run_cli(
        &[
            "keys",
            "create",
            "--user",
            "alice",
            "--roles",
            "debug,task_manager",
            "--name",
            "t",
        ],
        &e,
        within,
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "keys create failed: {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be exactly the key: {stdout:?}");
    let key = lines[0].trim().to_owned();
    assert!(
        key.starts_with("thk_"),
        "key {key:?} does not start with thk_"
    );
    let secret_part = key.rsplit('_').next().expect("secret part").to_owned();
    assert!(
        secret_part.len() >= 16,
        "key has no real secret part: {key}"
    );

    let (key_id, user, stored_hash, roles): (Uuid, String, String, Vec<String>) =
        sqlx::query_as("SELECT key_id, user_id, secret_sha256, roles FROM api_keys")
            .fetch_one(&env.pool)
            .await
            .expect("exactly one key row");
    assert_eq!(user, "alice");
    assert_eq!(roles, vec!["debug", "task_manager"]);
    assert_eq!(stored_hash, hash_key(&key), "stored hash is hash_key(key)");
    assert_eq!(
        stored_hash,
        sha256_hex_external(&key),
        "stored hash is hex sha256 of the key"
    );

    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE secret_sha256 = $1 OR prefix = $1 OR name = $1",
    )
    .bind(&key)
    .fetch_one(&env.pool)
    .await
    .expect("leak check");
    assert_eq!(leaked, 0, "a column holds the key itself");
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys a
         WHERE strpos(row_to_json(a)::text, $1) > 0 OR strpos(row_to_json(a)::text, $2) > 0",
    )
    .bind(&key)
    .bind(&secret_part)
    .fetch_one(&env.pool)
    .await
    .expect("leak check (any column)");
    assert_eq!(leaked, 0, "the key's secret appears in a stored column");

    let out = run_cli(&["keys", "list"], &e, within).await;
    let listing = text(&out.stdout);
    assert!(
        out.status.success(),
        "keys list failed: {}",
        text(&out.stderr)
    );
    assert!(listing.contains("alice"), "list lacks the user: {listing}");
    assert!(
        listing.contains("debug,task_manager"),
        "list lacks the roles: {listing}"
    );
    assert!(
        listing.contains(&key_id.to_string()),
        "list lacks the key id: {listing}"
    );
    assert!(!listing.contains(&key), "list shows the key: {listing}");
    assert!(
        !listing.contains(&secret_part),
        "list shows the secret: {listing}"
    );

    // The key works against the api until it is revoked.
    let api = env.start_api().await;
    let (status, body) = get(&api, &key, "/jobs/results").await;
    assert_eq!(status, 200, "fresh key refused: {body}");

    let out = run_cli(&["keys", "revoke", &key_id.to_string()], &e, within).await;
    assert!(
        out.status.success(),
        "keys revoke failed: {}",
        text(&out.stderr)
    );
    // The api caches authentications; a revocation reaches it as a
    // NOTIFY at once, and the cache's TTL bounds it in any case.
    let revoked_by = tokio::time::Instant::now()
        + taskhost_common::keys::CACHE_TTL
        + std::time::Duration::from_secs(1);
    let (status, body) = loop {
        let (status, body) = get(&api, &key, "/jobs/results").await;
        if status == 401 || tokio::time::Instant::now() >= revoked_by {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status, 401, "revoked key still accepted: {body}");

    let out = run_cli(&["keys", "revoke", &key_id.to_string()], &e, within).await;
    assert!(!out.status.success(), "revoking a revoked key should fail");

    // An unknown role is refused by name, and nothing is created.
    let out = run_cli(
        &["keys", "create", "--user", "bob", "--roles", "boss"],
        &e,
        within,
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "role `boss` was accepted");
    assert!(
        stderr.contains("boss"),
        "stderr does not name the bad role: {stderr}"
    );
    assert!(
        text(&out.stdout).trim().is_empty(),
        "a key was printed for a bad role"
    );
    let bobs: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE user_id = 'bob'")
        .fetch_one(&env.pool)
        .await
        .expect("count bob");
    assert_eq!(bobs, 0, "a key row was created for a bad role");

    env.cleanup().await;
}

// 8 -------------------------------------------------------------------------

fn assert_error_shape(what: &str, body: &Value) {
    assert_eq!(body["success"], json!(false), "{what}: {body}");
    let code = body["error"]["code"].as_str();
    let message = body["error"]["message"].as_str();
    assert!(
        code.is_some_and(|c| !c.is_empty()),
        "{what}: no error.code: {body}"
    );
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{what}: no error.message: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_get_401_json() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let url = api.v1("/jobs/results");
    let unknown = format!("thk_00000000_{}", "0".repeat(48));

    let cases: [(&str, Option<String>); 3] = [
        ("missing Authorization", None),
        ("Bearer garbage", Some("Bearer garbage".to_owned())),
        ("unknown well-formed key", Some(format!("Bearer {unknown}"))),
    ];
    for (what, header) in cases {
        let mut req = api.http.get(&url);
        if let Some(h) = &header {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 401, "{what}: {body}");
        assert_error_shape(what, &body);
    }

    // A valid submit body without a key is refused for the key, not the body.
    let resp = api
        .http
        .post(api.v1("/jobs/submit"))
        .json(&json!({"jobName": "x", "command": "echo x"}))
        .send()
        .await
        .expect("submit");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 401, "unauthenticated submit: {body}");
    assert_error_shape("unauthenticated submit", &body);

    env.cleanup().await;
}

// 9 -------------------------------------------------------------------------

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let resp = http.get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_what_is_down_and_livez_stays_up() {
    let mut env = TestEnv::new().await;
    let good = env.start_api().await;
    let (status, body) = get_json(&good.http, &format!("{}/readyz", good.base)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    let (status, body) = get_json(&good.http, &format!("{}/livez", good.base)).await;
    assert_eq!(status, 200, "{body}");

    let mut bad = env.settings.clone();
    bad.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    bad.validate()
        .expect("settings with a closed AMQP port are valid");
    let broken = env.start_api_with(bad).await;
    let (status, body) = get_json(&broken.http, &format!("{}/readyz", broken.base)).await;
    assert_eq!(status, 503, "{body}");
    let down: Vec<&str> = body["down"]
        .as_array()
        .unwrap_or_else(|| panic!("no `down` array: {body}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        down.contains(&"rabbitmq"),
        "rabbitmq not reported down: {body}"
    );
    assert!(
        !down.contains(&"postgres"),
        "postgres wrongly reported down: {body}"
    );
    let (status, body) = get_json(&broken.http, &format!("{}/livez", broken.base)).await;
    assert_eq!(status, 200, "livez must not depend on the broker: {body}");

    env.cleanup().await;
}

// 10 ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_creates_its_database_serves_and_stops_on_sigterm() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let env = TestEnv::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let bind = format!("127.0.0.1:{port}");
    let name = fresh_db_name("standalone");
    let url = format!("{PG_SERVER}/{name}");
    let node_name = format!("{}-standalone", env.prefix);

    let mut child = ChildGuard(Some(env.spawn_binary(
        BIN,
        &["standalone", "--node-name", &node_name],
        &[("TASKHOST__API__BIND", &bind), ("DATABASE_URL", &url)],
    )));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let readyz = format!("http://{bind}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.child().try_wait().expect("try_wait") {
            panic!("standalone exited before becoming ready: {status}");
        }
        if let Ok(resp) = http.get(&readyz).send().await
            && resp.status().as_u16() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standalone not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It created and migrated the database itself.
    let pool = PgPool::connect(&url)
        .await
        .expect("standalone created its database");
    let tables = public_tables(&pool).await;
    for t in ["jobs", "nodes", "api_keys", "outbox"] {
        assert!(
            tables.iter().any(|x| x == t),
            "table {t} missing; have {tables:?}"
        );
    }
    pool.close().await;

    let pid = Pid::from_raw(i32::try_from(child.child().id()).expect("pid fits i32"));
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.child().try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "standalone did not exit within 20 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "standalone exited with {status} after SIGTERM"
    );
    drop(child);

    drop_database(&name).await;
    env.cleanup().await;
}
