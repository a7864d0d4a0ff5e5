//! `docs/asyncapi.json` against a running system (api, scheduler and a
//! worker on this test's prefix): the api serves the document; every valid
//! example of job.submit.v1 becomes a job that reaches the documented final
//! state; a valid job.run.v1 is acked without running anything when its job
//! has no row or is finished; the control.v1 example cancels a running job;
//! every one of `x-invalid-examples` arrives in `<p>.dead` with exactly its
//! documented `x-taskhost-reason`; and every job event and change event
//! published meanwhile matches the document's schemas for its `type`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::{Map, Value, json};
use taskhost_common::amqp;
use taskhost_common::messages::REASON_HEADER;
use taskhost_common::model::Role;
use taskhost_testkit::{AMQP_URL, TestEnv, job_id, submit};
use uuid::Uuid;

/// The document as the api embeds it.
const DOC: &str = include_str!("../../../docs/asyncapi.json");

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/asyncapi.json is JSON")
}

/// A component message by its key (`jobSubmit`, ...).
fn message<'a>(doc: &'a Value, key: &str) -> &'a Value {
    let m = &doc["components"]["messages"][key];
    assert!(m.is_object(), "no message {key} in components.messages");
    m
}

/// The component message whose `x-message-type` is `message_type`.
fn message_of_type<'a>(doc: &'a Value, message_type: &str) -> Option<&'a Value> {
    doc["components"]["messages"]
        .as_object()?
        .values()
        .find(|m| m["x-message-type"] == message_type)
}

/// A validator of `schema`, a schema of the document whose `$ref`s point
/// into its `#/components` (AsyncAPI schemas are a superset of draft 7).
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({ "allOf": [schema], "components": doc["components"] });
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

/// What is wrong with `instance` under `schema`, one line per error.
fn violations(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    validator(doc, schema)
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// An AMQP field value as JSON (header tables, `x-death` arrays).
fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => headers_json(Some(t)),
        other => Value::String(format!("{other:?}")),
    }
}

fn headers_json(table: Option<&FieldTable>) -> Value {
    let mut out = Map::new();
    if let Some(t) = table {
        for (k, v) in t.inner() {
            out.insert(k.as_str().to_owned(), amqp_json(v));
        }
    }
    Value::Object(out)
}

/// The AMQP properties an example is published with: JSON content,
/// persistent, `type` and `message_id` as given (absent: not set), the
/// priority and the example's headers.
fn properties(
    message_type: Option<&str>,
    message_id: Option<&str>,
    priority: u8,
    headers: &Value,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(priority);
    if let Some(t) = message_type {
        props = props.with_type(ShortString::from(t.to_owned()));
    }
    if let Some(id) = message_id {
        props = props.with_message_id(ShortString::from(id.to_owned()));
    }
    if let Some(h) = headers.as_object() {
        let mut table = FieldTable::default();
        for (k, v) in h {
            let v = v.as_str().expect("example headers are strings");
            table.insert(
                k.clone().into(),
                AMQPValue::LongString(LongString::from(v.to_owned())),
            );
        }
        props = props.with_headers(table);
    }
    props
}

/// Publishes with confirms; panics unless the broker acks.
async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack(),
        "the broker did not ack a publish to {exchange}"
    );
}

/// The body an example stands for: `body` as raw text, else `payload` as
/// compact JSON (the bytes a reason's `at line 1 column N` counts).
fn example_body(example: &Value) -> Vec<u8> {
    match example["body"].as_str() {
        Some(text) => text.as_bytes().to_vec(),
        None => serde_json::to_vec(&example["payload"]).expect("payload serializes"),
    }
}

/// The next message of `queue`, waiting up to `within`.
async fn next_message(ch: &Channel, queue: &str, within: Duration) -> Option<BasicGetMessage> {
    let deadline = Instant::now() + within;
    loop {
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        if got.is_some() || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes every one of `x-invalid-examples` of `message_key`, one at a
/// time, and checks what arrives in `<p>.dead`: the same body, type,
/// message id and routing key, exactly the documented reason, and headers
/// that match the dead-letter schema. Returns the mismatches.
async fn check_invalid_examples(
    doc: &Value,
    ch: &Channel,
    env: &TestEnv,
    message_key: &str,
    exchange: &str,
    node: Uuid,
) -> Vec<String> {
    let dead_headers = &message(doc, "deadLetter")["headers"];
    let mut wrong = Vec::new();
    let examples = message(doc, message_key)["x-invalid-examples"]
        .as_array()
        .unwrap_or_else(|| panic!("{message_key} has x-invalid-examples"));
    assert!(!examples.is_empty(), "{message_key}: no invalid examples");
    for example in examples {
        let name = example["name"].as_str().expect("example name");
        assert!(name.starts_with("invalid-"), "{message_key}: {name}");
        let props = &example["properties"];
        let message_type = props["type"].as_str();
        let message_id = props["message_id"].as_str();
        let routing_key = example["routingKey"].as_str().map_or_else(
            || "submit".to_owned(),
            |k| k.replace("<nodeId>", &node.to_string()),
        );
        let body = example_body(example);
        publish(
            ch,
            exchange,
            &routing_key,
            &body,
            properties(message_type, message_id, 0, &example["headers"]),
        )
        .await;
        let Some(dead) = next_message(ch, &env.names().dead(), Duration::from_secs(15)).await
        else {
            wrong.push(format!(
                "{message_key} {name}: nothing arrived in the dead-letter queue"
            ));
            continue;
        };
        let headers = headers_json(dead.properties.headers().as_ref());
        let reason = headers[REASON_HEADER]
            .as_str()
            .unwrap_or("<no reason header>");
        if reason != example["reason"] {
            wrong.push(format!(
                "{message_key} {name}: reason {reason:?}, documented {}",
                example["reason"]
            ));
        }
        if dead.data != body {
            wrong.push(format!(
                "{message_key} {name}: the dead letter's body changed"
            ));
        }
        let got_type = dead.properties.kind().as_ref().map(|t| t.to_string());
        if got_type.as_deref() != Some(message_type.unwrap_or("unknown")) {
            wrong.push(format!(
                "{message_key} {name}: dead letter type {got_type:?}"
            ));
        }
        let got_id = dead.properties.message_id().as_ref().map(|t| t.to_string());
        if got_id.as_deref() != Some(message_id.unwrap_or("")) {
            wrong.push(format!(
                "{message_key} {name}: dead letter message_id {got_id:?}"
            ));
        }
        if dead.routing_key.as_str() != routing_key {
            wrong.push(format!(
                "{message_key} {name}: dead letter routing key {}",
                dead.routing_key
            ));
        }
        for v in violations(doc, dead_headers, &headers) {
            wrong.push(format!("{message_key} {name}: dead letter headers: {v}"));
        }
    }
    wrong
}

/// Checks one message read from `<p>.events` against the document and
/// returns its body.
fn check_event(doc: &Value, msg: &BasicGetMessage, wrong: &mut Vec<String>) -> Value {
    let rk = msg.routing_key.to_string();
    let props = &msg.properties;
    let kind = props
        .kind()
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&msg.data).unwrap_or(Value::Null);
    let Some(m) = message_of_type(doc, &kind) else {
        wrong.push(format!("{rk}: type {kind:?} is not in the document"));
        return body;
    };
    let what = format!("{kind} {rk}");
    if props.content_type().as_ref().map(|c| c.as_str()) != Some("application/json") {
        wrong.push(format!("{what}: content_type {:?}", props.content_type()));
    }
    if *props.delivery_mode() != Some(2) {
        wrong.push(format!("{what}: delivery_mode {:?}", props.delivery_mode()));
    }
    if props.timestamp().is_none() {
        wrong.push(format!("{what}: no timestamp"));
    }
    let id = props
        .message_id()
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_default();
    for v in violations(doc, &m["payload"], &body) {
        wrong.push(format!("{what}: payload: {v}"));
    }
    if m["headers"].is_object() {
        let headers = headers_json(props.headers().as_ref());
        for v in violations(doc, &m["headers"], &headers) {
            wrong.push(format!("{what}: headers {headers}: {v}"));
        }
    }
    match kind.as_str() {
        "job.events.v1" => {
            if Uuid::parse_str(&id).is_err() {
                wrong.push(format!("{what}: message_id {id:?} is not a UUID"));
            }
            for e in body["events"].as_array().into_iter().flatten() {
                if rk != format!("job.{}", e["status"].as_str().unwrap_or_default()) {
                    wrong.push(format!("{what}: event of another status {e}"));
                }
            }
        }
        "changes.v1" => {
            let changes = body["changes"].as_array().cloned().unwrap_or_default();
            for c in &changes {
                let want = format!(
                    "change.{}.{}",
                    c["tableName"].as_str().unwrap_or_default(),
                    c["action"].as_str().unwrap_or_default().to_lowercase()
                );
                if rk != want {
                    wrong.push(format!("{what}: change routed {rk}, not {want}"));
                }
            }
            if let (Some(first), Some(last)) = (changes.first(), changes.last()) {
                let want = format!("changes:{}-{}", first["changeSeq"], last["changeSeq"]);
                if id != want {
                    wrong.push(format!("{what}: message_id {id}, not {want}"));
                }
            }
        }
        _ => wrong.push(format!("{what}: not an event type")),
    }
    body
}

/// Every valid example of the document matches its own schemas.
fn check_valid_examples_offline(doc: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    for (key, m) in doc["components"]["messages"].as_object().expect("messages") {
        for example in m["examples"].as_array().expect("examples") {
            let name = example["name"].as_str().unwrap_or("?");
            if key != "deadLetter" {
                for v in violations(doc, &m["payload"], &example["payload"]) {
                    wrong.push(format!("{key} example {name}: payload: {v}"));
                }
            }
            if m["headers"].is_object() {
                let headers = example.get("headers").cloned().unwrap_or_else(|| json!({}));
                for v in violations(doc, &m["headers"], &headers) {
                    wrong.push(format!("{key} example {name}: headers: {v}"));
                }
            }
        }
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_accepted_or_refused_as_documented() {
    let doc = doc();
    let mut wrong = check_valid_examples_offline(&doc);

    let mut env = TestEnv::new().await;
    let names = env.names();

    let conn = amqp::connect(AMQP_URL, "asyncapi-examples")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    amqp::declare_topology(&ch, &names).await.expect("topology");
    // Every event published from here on, job events and change events.
    let events = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("events queue");
    let events = events.name().to_string();
    ch.queue_bind(
        events.clone().into(),
        names.events().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind events");

    // Started after the events queue is bound, so their changes (the
    // node's registration) are on it too.
    let api = env.start_api().await;
    env.start_scheduler().await;
    // A job submitted before any worker runs waits on its queue and is
    // marked `queued` (one taken at once goes from `pending` to `running`).
    let early = env.key("early", &[Role::TaskManager]).await;
    let (status, body) = submit(
        &api,
        &early,
        &json!({"jobName": "waits", "command": "true"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(job_id(&body), "queued", Duration::from_secs(10))
        .await;
    // Group prod, role db: the nightlyExport example targets group prod.
    env.start_worker("w1", "prod", "db").await;
    let node = env.wait_node(&format!("{}-w1", env.prefix)).await;

    // The api serves the document as it is in the repository.
    let resp = api
        .http
        .get(format!("{}/asyncapi.json", api.base))
        .send()
        .await
        .expect("GET /asyncapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(
        resp.text().await.expect("body") == DOC,
        "/asyncapi.json is not docs/asyncapi.json"
    );

    // ------------------------------------------------------ job.submit.v1
    let submit_doc = message(&doc, "jobSubmit");
    let mut alice = String::new();
    for (user, roles) in submit_doc["x-example-users"]
        .as_object()
        .expect("x-example-users")
    {
        let roles: Vec<Role> = roles
            .as_array()
            .expect("roles")
            .iter()
            .map(|r| r.as_str().expect("a role").parse().expect("a known role"))
            .collect();
        let key = env.key(user, &roles).await;
        if user == "alice" {
            alice = key;
        }
    }
    let mut submitted = Vec::new();
    for example in submit_doc["examples"].as_array().expect("examples") {
        let name = example["name"].as_str().expect("name").to_owned();
        let id = Uuid::now_v7();
        publish(
            &ch,
            &names.submit(),
            "submit",
            &example_body(example),
            properties(
                Some("job.submit.v1"),
                Some(&id.to_string()),
                0,
                &example["headers"],
            ),
        )
        .await;
        submitted.push((name, id, example["payload"].clone()));
    }
    for (name, id, payload) in &submitted {
        let want = submit_doc["x-example-outcomes"][name.as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("no x-example-outcomes for {name}"));
        let got = env.wait_terminal(*id, Duration::from_secs(30)).await;
        if got != want {
            wrong.push(format!(
                "jobSubmit example {name}: ended {got}, documented {want}"
            ));
        }
        let (user, job_name, by): (String, String, String) =
            sqlx::query_as("SELECT user_id, job_name, triggered_by FROM jobs WHERE job_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .expect("the example's job");
        assert_eq!(
            (user.as_str(), job_name.as_str(), by.as_str()),
            (
                payload["userId"].as_str().unwrap_or_default(),
                payload["jobName"].as_str().unwrap_or_default(),
                "queue"
            ),
            "jobSubmit example {name}"
        );
    }
    wrong.extend(check_invalid_examples(&doc, &ch, &env, "jobSubmit", &names.submit(), node).await);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count jobs");
    // The examples' jobs and the one that waited for the worker.
    assert_eq!(
        jobs,
        submitted.len() as i64 + 1,
        "a refused message made a job"
    );

    // --------------------------------------------------------- job.run.v1
    // A work message is taskhost's own (from a committed job's outbox row);
    // the job's row decides what it does. For a job id with no row it is
    // acked and nothing runs; for a finished job it is acked and the job
    // does not run again. Neither is dead-lettered.
    let run_doc = message(&doc, "jobRun");
    let finished = submitted[0].1;
    for job in [Uuid::now_v7(), finished] {
        for example in run_doc["examples"].as_array().expect("examples") {
            let mut payload = example["payload"].clone();
            payload["job_id"] = json!(job);
            let priority = payload["priority"].as_u64().unwrap_or(0) as u8;
            publish(
                &ch,
                &names.work(),
                "any",
                &serde_json::to_vec(&payload).expect("serializes"),
                properties(
                    Some("job.run.v1"),
                    Some(&format!("{job}:0")),
                    priority,
                    &example["headers"],
                ),
            )
            .await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while env.queue_depths(&names.work_queue("any")).await > 0 {
            assert!(
                Instant::now() < deadline,
                "the job.run.v1 examples were never acked"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(
        env.final_history_rows(finished).await,
        1,
        "a finished job ran again"
    );
    assert_eq!(env.job_status(finished).await.as_deref(), Some("succeeded"));
    let jobs_now: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.pool)
        .await
        .expect("count jobs");
    assert_eq!(jobs_now, jobs, "a work message made a job");
    wrong.extend(check_invalid_examples(&doc, &ch, &env, "jobRun", &names.work(), node).await);

    // --------------------------------------------------------- control.v1
    let (status, body) = submit(
        &api,
        &alice,
        &json!({"jobName": "to-cancel", "command": "sleep 30"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let victim = job_id(&body);
    env.wait_running_on(victim, node).await;
    // Running in Postgres a moment before its process is registered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let control_doc = message(&doc, "control");
    let mut example = control_doc["examples"][0]["payload"].clone();
    example["job_id"] = json!(victim);
    publish(
        &ch,
        &names.control(),
        &format!("node.{node}"),
        &serde_json::to_vec(&example).expect("serializes"),
        properties(
            Some("control.v1"),
            Some(&format!("cancel:{victim}:1")),
            9,
            &Value::Null,
        ),
    )
    .await;
    let got = env.wait_terminal(victim, Duration::from_secs(15)).await;
    if got != "cancelled" {
        wrong.push(format!(
            "control example: the job ended {got}, not cancelled"
        ));
    }
    wrong.extend(check_invalid_examples(&doc, &ch, &env, "control", &names.control(), node).await);

    // ------------------------------------------------------------ events
    // Until the cancel is seen both as a job event and as a change.
    let mut statuses = BTreeSet::new();
    let mut tables = BTreeSet::new();
    let mut cancel_changed = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(statuses.contains("cancelled") && cancel_changed) && Instant::now() < deadline {
        let Some(msg) = next_message(&ch, &events, Duration::from_millis(500)).await else {
            continue;
        };
        let body = check_event(&doc, &msg, &mut wrong);
        for e in body["events"].as_array().into_iter().flatten() {
            statuses.insert(e["status"].as_str().unwrap_or_default().to_owned());
        }
        for c in body["changes"].as_array().into_iter().flatten() {
            tables.insert(c["tableName"].as_str().unwrap_or_default().to_owned());
            if c["recordId"] == victim.to_string() && c["newData"]["status"] == "cancelled" {
                cancel_changed = true;
            }
        }
    }
    for want in ["queued", "running", "succeeded", "timed_out", "cancelled"] {
        if !statuses.contains(want) {
            wrong.push(format!("no job.{want} event; saw {statuses:?}"));
        }
    }
    for want in ["jobs", "nodes"] {
        if !tables.contains(want) {
            wrong.push(format!("no change.{want}.* event; saw {tables:?}"));
        }
    }
    if !cancel_changed {
        wrong.push("the cancel never appeared on change.jobs.update".into());
    }

    // Nothing else was refused (the valid work messages included).
    if let Some(extra) = next_message(&ch, &names.dead(), Duration::from_millis(500)).await {
        wrong.push(format!(
            "an unexpected dead letter: {:?} {}",
            extra.properties.headers(),
            String::from_utf8_lossy(&extra.data)
        ));
    }
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
    assert!(
        wrong.is_empty(),
        "docs/asyncapi.json and the system disagree:\n{}",
        wrong.join("\n")
    );
}
