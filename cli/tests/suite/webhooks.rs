//! Notifications (README, "Notifications (webhooks)"): a failing job's
//! webhook arrives signed, once, even across a receiver outage; only the
//! subscribed events notify; a task failing N times in a row notifies once
//! at N; a dead node notifies; the API is admins' only and validates; the
//! secret appears in no answer and no log.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_common::notify::sign;
use taskhost_testkit::webhook::{Received, Receiver};
use taskhost_testkit::{Api, ChildGuard, TestEnv, call, get, job_id, submit};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");
const SECRET: &str = "whsec-test-7f3a9c1e5b";

/// POST /webhooks, asserting 201; returns the webhook id.
async fn create_webhook(api: &Api, key: &str, body: &Value) -> Uuid {
    let (status, resp) = call(api, Method::POST, key, "/webhooks", Some(body)).await;
    assert_eq!(status, 201, "POST /webhooks {body} answered {resp}");
    resp["webhookId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("webhookId")
}

/// Checks the signature and timestamp of a received delivery, as a
/// receiver should.
fn assert_signed(r: &Received) {
    let ts: i64 = r
        .header("x-taskhost-timestamp")
        .and_then(|t| t.parse().ok())
        .expect("X-Taskhost-Timestamp");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - ts).abs() < 300,
        "timestamp {ts} within 5 min of {now}"
    );
    assert_eq!(
        r.header("x-taskhost-signature"),
        Some(sign(SECRET, ts, &r.body).as_str()),
        "HMAC-SHA256 of \"<timestamp>.<body>\""
    );
    // A tampered body or another timestamp does not verify.
    assert_ne!(
        r.header("x-taskhost-signature"),
        Some(sign(SECRET, ts - 1, &r.body).as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
}

async fn deliveries(api: &Api, key: &str, hook: Uuid) -> Value {
    let (status, log) = get(api, key, &format!("/webhooks/{hook}/deliveries")).await;
    assert_eq!(status, 200, "{log}");
    log
}

/// Waits until the delivery log's newest row satisfies `pred`.
async fn wait_log(
    api: &Api,
    key: &str,
    hook: Uuid,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = deliveries(api, key, hook).await;
        if log["deliveries"].get(0).is_some_and(&pred) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}: delivery log {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_notifies_signed_once_across_a_receiver_outage() {
    let mut env = TestEnv::new().await;
    env.settings.notifications.secret = SECRET.into();
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let user = env.key("alice", &[Role::TaskManager]).await;

    let mut receiver = Receiver::start().await;
    receiver.answer(503);
    let hook = create_webhook(
        &api,
        &admin,
        &json!({"url": receiver.url(), "events": ["job.failed", "job.timed_out"]}),
    )
    .await;

    // A job that succeeds is not heard by a webhook of failures only.
    let (status, ok) = submit(&api, &user, &json!({"jobName": "fine", "command": "true"})).await;
    assert_eq!(status, 202, "{ok}");
    let ok = job_id(&ok);
    assert_eq!(
        env.wait_terminal(ok, Duration::from_secs(30)).await,
        "succeeded"
    );
    let (status, bad) = submit(
        &api,
        &user,
        &json!({"jobName": "broken", "command": "exit 7"}),
    )
    .await;
    assert_eq!(status, 202, "{bad}");
    let bad = job_id(&bad);
    assert_eq!(
        env.wait_terminal(bad, Duration::from_secs(30)).await,
        "failed"
    );
    // No scheduler runs yet: the notification waits in the outbox, written
    // with the job's final state.
    let log = deliveries(&api, &admin, hook).await;
    assert_eq!(log["count"], 1, "{log}");
    assert_eq!(log["deliveries"][0]["status"], "pending", "{log}");
    assert_eq!(log["deliveries"][0]["attempts"], 0, "{log}");

    // The scheduler is a child process, so its log can be searched for
    // the secret; it reads the secret from the environment.
    let log_path = std::env::temp_dir().join(format!("{}-webhooks-scheduler.log", env.prefix));
    let mut scheduler = ChildGuard(env.spawn_binary_logged(
        BIN,
        &["scheduler"],
        &[
            ("TASKHOST__NOTIFICATIONS__SECRET", SECRET),
            ("TASKHOST__NOTIFICATIONS__INTERVAL_MS", "100"),
            (
                "TASKHOST__LOG__LEVEL",
                "debug,sqlx=warn,lapin=warn,hyper=warn,reqwest=warn",
            ),
        ],
        &log_path,
    ));

    // Down, answering 503: tried twice (1 s apart).
    receiver
        .wait_until(Duration::from_secs(30), "two 503 attempts", |got| {
            got.len() >= 2
        })
        .await;
    // Down, not listening: the next attempt cannot connect.
    receiver.stop().await;
    let log = wait_log(&api, &admin, hook, "a refused attempt", |d| {
        d["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("connect"))
    })
    .await;
    let row = &log["deliveries"][0];
    assert_eq!(row["status"], "pending", "{log}");
    assert!(
        row["lastStatusCode"].is_null(),
        "no answer from a closed port: {log}"
    );
    let refused_at = row["attempts"].as_i64().expect("attempts");
    assert!(refused_at >= 3, "{log}");
    // Back: the next retry (backoff 4 s or more) is answered 200.
    receiver.answer(200);
    receiver.restart().await;
    let got = receiver
        .wait_until(Duration::from_secs(40), "a 200", |got| {
            got.iter().any(|r| r.answered == 200)
        })
        .await;
    let log = wait_log(&api, &admin, hook, "delivered", |d| {
        d["status"] == "delivered"
    })
    .await;
    // Nothing more comes once delivered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_after = receiver.received();
    assert_eq!(got_after.len(), got.len(), "no request after the 2xx");

    let delivered: Vec<&Received> = got.iter().filter(|r| r.answered == 200).collect();
    assert_eq!(delivered.len(), 1, "delivered once");
    let id = delivered[0]
        .header("x-taskhost-delivery")
        .expect("X-Taskhost-Delivery")
        .to_owned();
    for r in &got {
        assert_signed(r);
        // Every attempt is the same delivery: receivers deduplicate on it.
        assert_eq!(r.header("x-taskhost-delivery"), Some(id.as_str()));
        assert_eq!(r.header("x-taskhost-event"), Some("job.failed"));
        let body = r.json();
        assert_eq!(body["id"], json!(id), "{body}");
        assert_eq!(body["event"], "job.failed");
        assert_eq!(body["job"]["id"], json!(bad), "{body}");
        assert_eq!(body["job"]["state"], "failed");
        assert_eq!(body["job"]["exitCode"], 7);
        assert_eq!(body["job"]["user"], "alice");
        assert_eq!(body["job"]["name"], "broken");
        assert!(body["occurredAt"].is_string(), "{body}");
    }
    // The log: one row, delivered, every attempt counted (the 503s, the
    // refused ones, the 200).
    assert_eq!(log["count"], 1, "one event, one delivery: {log}");
    let row = &log["deliveries"][0];
    assert_eq!(row["id"], json!(id));
    assert_eq!(row["event"], "job.failed");
    assert_eq!(row["lastStatusCode"], 200, "{log}");
    assert!(row["lastError"].is_null(), "{log}");
    assert!(row["deliveredAt"].is_string(), "{log}");
    let attempts = row["attempts"].as_i64().expect("attempts");
    assert!(attempts > refused_at, "{log}");
    let answered_503 = got.iter().filter(|r| r.answered == 503).count() as i64;
    assert!(answered_503 >= 2, "two or more 503s");
    let refused = refused_at - answered_503;
    assert!(refused >= 1, "{log}");
    assert_eq!(
        attempts,
        got.len() as i64 + refused,
        "attempts = requests received + refused connections: {log}"
    );
    let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(enqueued, 1, "the succeeded job enqueued nothing");

    // The secret is in no answer, no request and no log line.
    let (_, list) = get(&api, &admin, "/webhooks").await;
    assert!(!list.to_string().contains(SECRET), "{list}");
    assert!(!log.to_string().contains(SECRET), "{log}");
    for r in &got {
        assert!(!String::from_utf8_lossy(&r.body).contains(SECRET));
        assert!(r.headers.values().all(|v| !v.contains(SECRET)));
    }
    scheduler.signal(Signal::SIGTERM);
    scheduler.wait_exit(Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(&log_path).expect("scheduler log");
    assert!(
        text.contains("webhook delivery failed"),
        "the failures are logged"
    );
    assert!(
        !text.contains(SECRET),
        "the secret is not in the scheduler's log"
    );
    let _ = std::fs::remove_file(&log_path);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_n_times_in_a_row_notifies_once_and_a_dead_node_notifies() {
    let mut env = TestEnv::new().await;
    env.settings.notifications.secret = SECRET.into();
    env.settings.notifications.interval_ms = 100;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    // Two schedulers: each delivery is sent by one of them.
    env.start_scheduler().await;
    env.start_scheduler().await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let receiver = Receiver::start().await;

    let (status, resp) = call(
        &api,
        Method::POST,
        &admin,
        "/tasks",
        Some(&json!({"taskName": "flaky", "command": "exit 2", "schedule": "@yearly"})),
    )
    .await;
    assert_eq!(status, 201, "{resp}");
    let task: Uuid = resp["taskId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("taskId");
    let repeated = create_webhook(
        &api,
        &admin,
        &json!({"url": receiver.url(), "events": ["task.failed_repeatedly"],
                "taskId": task, "failuresInARow": 2}),
    )
    .await;
    let nodes = create_webhook(
        &api,
        &admin,
        &json!({"url": receiver.url(), "events": ["node.dead"]}),
    )
    .await;

    let mut runs = Vec::new();
    for _ in 0..3 {
        let (status, resp) = call(
            &api,
            Method::POST,
            &admin,
            &format!("/tasks/{task}/run"),
            None,
        )
        .await;
        assert_eq!(status, 202, "{resp}");
        let job = job_id(&resp);
        assert_eq!(
            env.wait_terminal(job, Duration::from_secs(30)).await,
            "failed"
        );
        runs.push(job);
    }
    let got = receiver
        .wait_until(Duration::from_secs(20), "task.failed_repeatedly", |got| {
            got.iter()
                .any(|r| r.header("x-taskhost-event") == Some("task.failed_repeatedly"))
        })
        .await;
    // A node whose heartbeats stopped: the reaper marks it dead.
    let node = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO nodes (node_id, node_name, hostname, last_heartbeat)
         VALUES ($1, $2, 'gone.example', now() - interval '1 hour')",
    )
    .bind(node)
    .bind(format!("{}-gone", env.prefix))
    .execute(&env.pool)
    .await
    .expect("insert a silent node");
    let got_node = receiver
        .wait_until(Duration::from_secs(20), "node.dead", |got| {
            got.iter()
                .any(|r| r.header("x-taskhost-event") == Some("node.dead"))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = receiver.received();
    assert!(all.len() >= got.len().max(got_node.len()));

    let repeated_got: Vec<&Received> = all
        .iter()
        .filter(|r| r.header("x-taskhost-event") == Some("task.failed_repeatedly"))
        .collect();
    assert_eq!(
        repeated_got.len(),
        1,
        "fires once, at the 2nd failure, not at the 3rd"
    );
    assert_signed(repeated_got[0]);
    let body = repeated_got[0].json();
    assert_eq!(body["task"]["id"], json!(task), "{body}");
    assert_eq!(body["task"]["failuresInARow"], 2, "{body}");
    assert_eq!(body["job"]["id"], json!(runs[1]), "the 2nd run: {body}");

    let dead: Vec<&Received> = all
        .iter()
        .filter(|r| r.header("x-taskhost-event") == Some("node.dead"))
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_signed(dead[0]);
    let body = dead[0].json();
    assert_eq!(body["node"]["id"], json!(node), "{body}");
    assert_eq!(all.len(), 2, "nothing else was subscribed");

    for hook in [repeated, nodes] {
        let log = deliveries(&api, &admin, hook).await;
        assert_eq!(log["count"], 1, "{log}");
        assert_eq!(log["deliveries"][0]["status"], "delivered", "{log}");
        assert_eq!(log["deliveries"][0]["attempts"], 1, "{log}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_api_is_for_admins_and_validates_its_input() {
    let mut env = TestEnv::new().await;
    env.settings.notifications.secret = SECRET.into();
    let api = env.start_api().await;
    let admin = env.key("root", &[Role::SiteAdmin]).await;
    let user = env.key("alice", &[Role::TaskManager]).await;
    let url = "http://127.0.0.1:9/hook";

    // Not an admin: 403 on every route, and nothing is created.
    let some = Uuid::now_v7();
    for (method, path, body) in [
        (
            Method::POST,
            "/webhooks".to_owned(),
            Some(json!({"url": url, "events": ["job.failed"]})),
        ),
        (Method::GET, "/webhooks".to_owned(), None),
        (Method::DELETE, format!("/webhooks/{some}"), None),
        (Method::GET, format!("/webhooks/{some}/deliveries"), None),
    ] {
        let (status, resp) = call(&api, method.clone(), &user, &path, body.as_ref()).await;
        assert_eq!(status, 403, "{method} {path}: {resp}");
    }

    // Bad input: 422 naming the field.
    for (body, field) in [
        (
            json!({"url": "ftp://example.com/x", "events": ["job.failed"]}),
            "url",
        ),
        (json!({"url": "not a url", "events": ["job.failed"]}), "url"),
        (json!({"url": "/relative", "events": ["job.failed"]}), "url"),
        (json!({"url": url, "events": []}), "events"),
        (json!({"url": url, "events": ["job.exploded"]}), "events"),
        (
            json!({"url": url, "events": ["node.dead"], "taskId": Uuid::now_v7()}),
            "events",
        ),
        (
            json!({"url": url, "events": ["job.failed"], "taskId": Uuid::now_v7()}),
            "taskId",
        ),
        (
            json!({"url": url, "events": ["task.failed_repeatedly"], "failuresInARow": 0}),
            "failuresInARow",
        ),
        (
            json!({"url": url, "events": ["job.failed"], "secret": "x"}),
            "secret",
        ),
        (json!({"events": ["job.failed"]}), "url"),
    ] {
        let (status, resp) = call(&api, Method::POST, &admin, "/webhooks", Some(&body)).await;
        assert_eq!(status, 422, "{body}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{body}: the message names {field}: {resp}"
        );
    }
    let (_, list) = get(&api, &admin, "/webhooks").await;
    assert_eq!(list["count"], 0, "{list}");

    // Create, list, read the (empty) log, delete.
    let hook = create_webhook(
        &api,
        &admin,
        &json!({"url": url, "events": ["job.dead", "job.dead", "job.succeeded"]}),
    )
    .await;
    let (status, list) = get(&api, &admin, "/webhooks").await;
    assert_eq!(status, 200);
    assert_eq!(list["count"], 1, "{list}");
    let shown = &list["webhooks"][0];
    assert_eq!(shown["id"], json!(hook));
    assert_eq!(shown["url"], url);
    assert_eq!(
        shown["events"],
        json!(["job.dead", "job.succeeded"]),
        "duplicates dropped"
    );
    assert!(shown["taskId"].is_null());
    assert_eq!(shown["createdBy"], "root");
    assert!(!list.to_string().contains(SECRET), "{list}");
    let log = deliveries(&api, &admin, hook).await;
    assert_eq!(log["count"], 0, "{log}");
    let (status, _) = get(
        &api,
        &admin,
        &format!("/webhooks/{hook}/deliveries?limit=0"),
    )
    .await;
    assert_eq!(status, 422);
    // The change log has the creation.
    let changes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM data_change WHERE table_name = 'webhooks' AND record_id = $1",
    )
    .bind(hook.to_string())
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(changes, 1);
    let (status, resp) = call(
        &api,
        Method::DELETE,
        &admin,
        &format!("/webhooks/{hook}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let (status, _) = call(
        &api,
        Method::DELETE,
        &admin,
        &format!("/webhooks/{hook}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(&api, &admin, &format!("/webhooks/{hook}/deliveries")).await;
    assert_eq!(status, 404);
    let (status, _) = call(&api, Method::DELETE, &admin, "/webhooks/not-an-id", None).await;
    assert_eq!(status, 404);

    // Without a secret configured, webhooks cannot be created (409).
    let mut plain = env.settings.clone();
    plain.notifications.secret = String::new();
    let bare = env.start_api_with(plain).await;
    let (status, resp) = call(
        &bare,
        Method::POST,
        &admin,
        "/webhooks",
        Some(&json!({"url": url, "events": ["job.failed"]})),
    )
    .await;
    assert_eq!(status, 409, "{resp}");
    assert!(resp.to_string().contains("notifications.secret"), "{resp}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_gives_up_after_max_attempts_and_the_log_says_failed() {
    let mut env = TestEnv::new().await;
    env.settings.notifications.secret = SECRET.into();
    env.settings.notifications.interval_ms = 100;
    env.settings.notifications.max_attempts = 2;
    let api = env.start_api().await;
    env.start_worker("w1", "default", "worker").await;
    env.start_scheduler().await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let hook = create_webhook(
        &api,
        &admin,
        &json!({"url": receiver.url(), "events": ["job.timed_out"]}),
    )
    .await;
    let (status, resp) = submit(
        &api,
        &admin,
        &json!({"jobName": "slow", "command": "sleep 30", "timeoutSeconds": 1}),
    )
    .await;
    assert_eq!(status, 202, "{resp}");
    let job = job_id(&resp);
    assert_eq!(
        env.wait_terminal(job, Duration::from_secs(30)).await,
        "timed_out"
    );
    let log = wait_log(&api, &admin, hook, "given up", |d| d["status"] == "failed").await;
    let row = &log["deliveries"][0];
    assert_eq!(row["attempts"], 2, "{log}");
    assert_eq!(row["lastStatusCode"], 500, "{log}");
    assert!(
        row["lastError"].as_str().is_some_and(|e| e.contains("500")),
        "{log}"
    );
    assert!(row["deliveredAt"].is_null(), "{log}");
    assert_eq!(row["payload"]["job"]["state"], "timed_out", "{log}");
    // No third attempt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 2, "max_attempts = 2");
    for r in &got {
        assert_signed(r);
        assert_eq!(r.header("x-taskhost-event"), Some("job.timed_out"));
    }
    env.cleanup().await;
}
