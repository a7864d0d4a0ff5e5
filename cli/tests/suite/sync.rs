//! The change feed as consumers use it: the safe head never lets a cursor
//! skip a change that commits late, the events relay publishes
//! `change.<table>.<action>`, `/sync/status` and `/sync/trigger` show and
//! move cursors; plus per-key rate limiting (429) and the dashboard page.

use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, TestEnv, call, get, submit};
use uuid::Uuid;

/// Declares a queue bound to this test's `<p>.events` with `pattern`.
async fn bind_events(env: &TestEnv, queue: &str, pattern: &str) -> String {
    let names = env.names();
    let queue = format!("{}.{queue}", env.prefix);
    let conn = taskhost_common::amqp::connect(AMQP_URL, "test-events")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    taskhost_common::amqp::declare_topology(&ch, &names)
        .await
        .expect("topology");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.queue_bind(
        queue.as_str().into(),
        names.events().into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "done".into()).await;
    queue
}

/// Writes a change the way the services do: the row first, then its change
/// row, in `tx`.
async fn change_in(tx: &mut sqlx::PgConnection, node: Uuid, name: &str) -> i64 {
    let row = json!({ "node_id": node, "node_name": name });
    sqlx::query(
        "INSERT INTO nodes (node_id, node_name, hostname, node_group, node_role)
         VALUES ($1, $2, 'h', 'g', 'r')",
    )
    .bind(node)
    .bind(name)
    .execute(&mut *tx)
    .await
    .expect("insert node");
    changelog::record(
        tx,
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
    .expect("record")
}

fn seqs(body: &Value) -> Vec<i64> {
    body["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["changeSeq"].as_i64().expect("changeSeq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_late_is_not_skipped_by_a_cursor() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let admin = env.key("root", &[Role::SystemAdmin]).await;
    let (status, body) = get(&api, &admin, "/changes?table=nodes").await;
    assert_eq!(status, 200, "{body}");
    let since = body["nextSince"].as_i64().expect("nextSince");

    // A draws the lower number but commits after B.
    let mut a = env.pool.begin().await.expect("begin a");
    let seq_a = change_in(&mut a, Uuid::now_v7(), "late").await;
    let mut b = env.pool.begin().await.expect("begin b");
    let seq_b = change_in(&mut b, Uuid::now_v7(), "early").await;
    assert!(seq_a < seq_b);
    b.commit().await.expect("commit b");

    // B is committed, but handing it out would move the cursor past A.
    let (status, body) = get(&api, &admin, &format!("/changes?table=nodes&since={since}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        seqs(&body).is_empty(),
        "the feed must stop below {seq_a} while it is uncommitted: {body}"
    );
    let next = body["nextSince"].as_i64().expect("nextSince");
    assert!(next < seq_a, "nextSince {next} would skip {seq_a}");

    a.commit().await.expect("commit a");
    let (status, body) = get(&api, &admin, &format!("/changes?table=nodes&since={next}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seqs(&body), vec![seq_a, seq_b], "{body}");
    assert!(body["headSeq"].as_i64().expect("headSeq") >= seq_b);
    assert!(body["nextSince"].as_i64().expect("nextSince") >= seq_b);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_publishes_change_events_and_status_shows_cursors() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let admin = env.key("root", &[Role::SiteAdmin]).await;
    let manager = env.key("tm", &[Role::TaskManager]).await;
    let queue = bind_events(&env, "audit-tasks", "change.tasks.*").await;

    let (status, task) = call(
        &api,
        Method::POST,
        &manager,
        "/tasks",
        Some(&json!({"taskName": "nightly", "command": "true", "schedule": "0 3 * * *"})),
    )
    .await;
    assert_eq!(status, 201, "{task}");
    let task_id = task["taskId"].as_str().expect("taskId").to_owned();

    // Admins only.
    for (method, path) in [
        (Method::GET, "/sync/status"),
        (Method::POST, "/sync/trigger"),
    ] {
        let (status, body) = call(&api, method.clone(), &manager, path, None).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        let (status, _) = call(&api, method.clone(), "thk_nope", path, None).await;
        assert_eq!(status, 401, "{method} {path} without a valid key");
    }

    // The relay runs now and publishes the task's INSERT.
    let (status, body) = call(
        &api,
        Method::POST,
        &admin,
        "/sync/trigger",
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["published"].as_u64().expect("published") >= 1,
        "{body}"
    );
    let msg = env.get_one(&queue).await.expect("a change event");
    assert_eq!(msg.delivery.routing_key.as_str(), "change.tasks.insert");
    assert_eq!(
        msg.delivery.properties.kind().as_ref().map(|t| t.as_str()),
        Some("changes.v1")
    );
    let batch: Value = serde_json::from_slice(&msg.delivery.data).expect("event JSON");
    let event = &batch["changes"][0];
    assert_eq!(event["recordId"], json!(task_id));
    assert_eq!(event["action"], "INSERT");
    assert_eq!(event["newData"]["task_name"], "nightly");

    // Caught up: a second trigger publishes nothing; status shows lag 0.
    let (status, body) = call(&api, Method::POST, &admin, "/sync/trigger", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["published"], 0, "{body}");
    let (status, st) = get(&api, &admin, "/sync/status").await;
    assert_eq!(status, 200, "{st}");
    let head = st["headSeq"].as_i64().expect("headSeq");
    let cursor = |st: &Value, consumer: &str| -> Value {
        st["consumers"]
            .as_array()
            .expect("consumers")
            .iter()
            .find(|c| c["consumer"] == consumer)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let events = cursor(&st, "events");
    assert_eq!(events["tableName"], "*");
    assert_eq!(events["lastChangeSeq"], json!(head), "{st}");
    assert_eq!(events["lag"], 0, "{st}");

    // An external consumer reports progress by reading with its name.
    let (status, page) = get(&api, &admin, "/changes?consumer=audit&since=0&limit=1").await;
    assert_eq!(status, 200, "{page}");
    let (_, st) = get(&api, &admin, "/sync/status").await;
    let audit = cursor(&st, "audit");
    assert_eq!(audit["lastChangeSeq"], 0, "{st}");
    assert_eq!(
        audit["lag"],
        json!(head),
        "every change is still ahead: {st}"
    );
    assert!(audit["lagSeconds"].as_f64().expect("lagSeconds") >= 0.0);
    // Without since, it continues from its cursor.
    let (_, again) = get(&api, &admin, "/changes?consumer=audit&limit=1").await;
    assert_eq!(seqs(&again), seqs(&page));
    let (_, _) = get(
        &api,
        &admin,
        &format!("/changes?consumer=audit&since={head}"),
    )
    .await;
    let (_, st) = get(&api, &admin, "/sync/status").await;
    assert_eq!(cursor(&st, "audit")["lag"], 0, "{st}");

    // Rewinding a cursor; bad requests name the problem.
    let (status, body) = call(
        &api,
        Method::POST,
        &admin,
        "/sync/trigger",
        Some(&json!({"consumer": "audit", "resetTo": 0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cursor(&body, "audit")["lastChangeSeq"], 0, "{body}");
    for (bad, needle) in [
        (json!({"consumer": "audit"}), "resetTo"),
        (json!({"resetTo": head + 1000}), "resetTo"),
        (json!({"consumer": "bad name!"}), "consumer"),
        (
            json!({"table": "secrets", "consumer": "audit", "resetTo": 0}),
            "table",
        ),
        (json!({"colour": "red"}), "colour"),
    ] {
        let (status, body) = call(&api, Method::POST, &admin, "/sync/trigger", Some(&bad)).await;
        assert_eq!(status, 422, "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{bad}: {message}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_relays_job_changes_onto_the_events_exchange() {
    let mut env = TestEnv::new().await;
    let queue = bind_events(&env, "audit-jobs", "change.jobs.#").await;
    env.settings.sync.interval_ms = 100;
    let api = env.start_api().await;
    env.start_scheduler().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    // No worker: the job waits, and its INSERT is still published.
    let (status, body) = submit(&api, &key, &json!({"jobName": "j", "command": "true"})).await;
    assert_eq!(status, 202, "{body}");
    let job = body["jobId"].as_str().expect("jobId").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(msg) = env.get_one(&queue).await {
            let batch: Value = serde_json::from_slice(&msg.delivery.data).expect("JSON");
            let changes = batch["changes"].as_array().cloned().unwrap_or_default();
            if let Some(event) = changes
                .iter()
                .find(|e| e["recordId"] == json!(job) && e["action"] == "INSERT")
            {
                assert_eq!(msg.delivery.routing_key.as_str(), "change.jobs.insert");
                assert_eq!(event["newData"]["command"], "true");
                break;
            }
            continue;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no change.jobs.insert for {job} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let mut env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.api.rate_limit_per_sec = 2;
    settings.api.rate_limit_burst = 3;
    let api = env.start_api_with(settings).await;
    let busy = env.key("busy", &[Role::Debug]).await;
    let calm = env.key("calm", &[Role::Debug]).await;
    for i in 0..3 {
        let (status, body) = get(&api, &busy, "/jobs/results").await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let resp = api
        .http
        .get(api.v1("/jobs/results"))
        .bearer_auth(&busy)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.expect("JSON error");
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "rate_limited");
    // Submissions are limited too, and nothing is accepted.
    let (status, _) = submit(
        &api,
        &busy,
        &json!({"jobName": "j", "command": "noop", "executionMode": "inline"}),
    )
    .await;
    assert_eq!(status, 429);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(jobs, 0);
    // Another key has its own budget.
    let (status, _) = get(&api, &calm, "/jobs/results").await;
    assert_eq!(status, 200);
    // Half a second refills one token.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = get(&api, &busy, "/jobs/results").await;
    assert_eq!(status, 200, "{body}");
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("taskhost_api_rate_limited_total 2"),
        "{metrics}"
    );
    // Every job state has its line, zeros included.
    for state in [
        "pending",
        "queued",
        "running",
        "succeeded",
        "failed",
        "timed_out",
        "cancelled",
        "dead",
    ] {
        assert!(
            metrics.contains(&format!("taskhost_jobs{{status=\"{state}\"}} 0")),
            "{state}: {metrics}"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_without_a_key() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = http
        .get(format!("{}/", api.base))
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/dashboard")
    );
    let resp = http
        .get(format!("{}/dashboard", api.base))
        .send()
        .await
        .expect("GET /dashboard");
    assert_eq!(resp.status().as_u16(), 200);
    let headers = resp.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/html")
    );
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap_or_default()
            .contains("connect-src 'self'")
    );
    let page = resp.text().await.expect("page");
    // It drives the real endpoints, keeps the key per tab, loads nothing
    // from elsewhere.
    for needle in [
        "\"/api/v1\"",
        "/jobs/submit",
        "\"/jobs?\"",
        "/overview",
        "/events/stream",
        "/me",
        "/nodes",
        "/tasks",
        "/sync/status",
        "sessionStorage",
        "id=\"key\"",
    ] {
        assert!(page.contains(needle), "the page lacks {needle}");
    }
    assert!(
        !page.contains("localStorage"),
        "the key must not outlive the tab"
    );
    assert!(!page.contains("src=\"http"), "no external scripts");
    env.cleanup().await;
}
