//! `docs/asyncapi.json` describes the RabbitMQ interface the code has: every
//! message type, exchange and queue name, header and payload field the code
//! uses appears in it, and its examples are messages the code accepts.
//! When one of these fails, update the document with the code.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use taskhost_common::amqp::Names;
use taskhost_common::changelog::{ChangeEntry, RawChangeEntry};
use taskhost_common::messages::{
    CONTROL_V1, Control, JOB_EVENTS_V1, JOB_RUN_V1, JOB_SUBMIT_V1, JobEvent, JobRun, JobSubmit,
    REASON_HEADER,
};
use taskhost_common::model::{ExecutionMode, JobStatus, SubmitRequest, Target, TargetRequest};
use taskhost_common::sync::CHANGES_V1;
use taskhost_common::{events, sync};
use uuid::Uuid;

const PREFIX: &str = "taskhost";

fn doc() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/asyncapi.json");
    let text = std::fs::read_to_string(path).expect("docs/asyncapi.json is readable");
    serde_json::from_str(&text).expect("docs/asyncapi.json is JSON")
}

/// Follows a local `$ref` (`#/components/...`) until it reaches a value.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r.strip_prefix('#').expect("only local $refs");
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} points nowhere"));
    }
    v
}

fn message<'a>(doc: &'a Value, message_type: &str) -> &'a Value {
    let messages = doc["components"]["messages"]
        .as_object()
        .expect("components.messages");
    let found: Vec<&Value> = messages
        .values()
        .filter(|m| m["x-message-type"] == message_type)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one message has x-message-type {message_type}"
    );
    let m = found[0];
    assert_eq!(m["name"], message_type, "name of {message_type}");
    assert_eq!(m["title"], message_type, "title of {message_type}");
    assert_eq!(
        m["bindings"]["amqp"]["messageType"], message_type,
        "AMQP messageType of {message_type}"
    );
    assert_eq!(m["x-amqp-properties"]["type"], message_type);
    m
}

fn payload_schema<'a>(doc: &'a Value, message_type: &str) -> &'a Value {
    resolve(doc, &message(doc, message_type)["payload"])
}

fn property_names(doc: &Value, schema: &Value) -> BTreeSet<String> {
    resolve(doc, schema)["properties"]
        .as_object()
        .expect("schema has properties")
        .keys()
        .cloned()
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect()
}

fn example_payload<'a>(doc: &'a Value, message_type: &str) -> &'a Value {
    &message(doc, message_type)["examples"][0]["payload"]
}

/// Every channel address with its parameters filled in: `{prefix}` with
/// the prefix, any other parameter with each of its examples.
fn addresses(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for channel in doc["channels"].as_object().expect("channels").values() {
        let address = channel["address"]
            .as_str()
            .expect("every channel has an address");
        let mut filled = vec![address.replace("{prefix}", PREFIX)];
        for (name, param) in channel["parameters"].as_object().expect("parameters") {
            if name == "prefix" {
                continue;
            }
            let examples = resolve(doc, param)["examples"]
                .as_array()
                .unwrap_or_else(|| panic!("parameter {name} has examples"))
                .iter()
                .map(|e| e.as_str().expect("string examples").to_owned())
                .collect::<Vec<_>>();
            let hole = format!("{{{name}}}");
            let hole = hole.as_str();
            filled = filled
                .iter()
                .flat_map(|a| examples.iter().map(move |e| a.replace(hole, e)))
                .collect();
        }
        out.extend(filled);
    }
    out
}

fn example_node_id(doc: &Value) -> Uuid {
    doc["components"]["parameters"]["nodeId"]["examples"][0]
        .as_str()
        .expect("a nodeId example")
        .parse()
        .expect("the nodeId example is a UUID")
}

#[test]
fn is_asyncapi_3() {
    let doc = doc();
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
    for (name, channel) in doc["channels"].as_object().expect("channels") {
        // Every parameter an address uses is defined, and the prefix
        // defaults to the configuration's default.
        let address = channel["address"].as_str().expect("address");
        for part in address.split('{').skip(1) {
            let param = part.split('}').next().expect("closed parameter");
            let defined = resolve(&doc, &channel["parameters"][param]);
            assert!(
                defined.is_object(),
                "channel {name}: parameter {param} not defined"
            );
        }
        assert_eq!(
            resolve(&doc, &channel["parameters"]["prefix"])["default"],
            PREFIX,
            "channel {name}: prefix default"
        );
        // The AMQP binding names the same exchange or queue.
        let amqp = &channel["bindings"]["amqp"];
        let bound = match amqp["is"].as_str() {
            Some("routingKey") => &amqp["exchange"]["name"],
            Some("queue") => &amqp["queue"]["name"],
            other => panic!("channel {name}: amqp binding is {other:?}"),
        };
        assert_eq!(bound, address, "channel {name}: binding name");
        for (key, m) in channel["messages"].as_object().expect("messages") {
            assert!(
                resolve(&doc, m)["payload"].is_object(),
                "channel {name}: message {key} resolves"
            );
        }
    }
    for (name, op) in doc["operations"].as_object().expect("operations") {
        assert!(
            resolve(&doc, &op["channel"])["address"].is_string(),
            "operation {name}: channel resolves"
        );
        for m in op["messages"].as_array().expect("messages") {
            assert!(
                resolve(&doc, m)["payload"].is_object(),
                "operation {name}: message resolves"
            );
        }
    }
}

#[test]
fn every_message_type_is_described() {
    let doc = doc();
    for t in [
        JOB_SUBMIT_V1,
        JOB_RUN_V1,
        JOB_EVENTS_V1,
        CHANGES_V1,
        CONTROL_V1,
    ] {
        message(&doc, t);
    }
    let dead = doc["components"]["messages"]
        .as_object()
        .expect("messages")
        .values()
        .find(|m| m["name"] == "dead-letter")
        .expect("a dead-letter message");
    assert!(
        property_names(&doc, &dead["headers"]).contains(REASON_HEADER),
        "dead letters carry {REASON_HEADER}"
    );
}

#[test]
fn every_exchange_and_queue_is_a_channel() {
    let doc = doc();
    let addresses = addresses(&doc);
    let n = Names::new(PREFIX);
    for exact in [n.work(), n.submit(), n.events(), n.control(), n.dead()] {
        assert!(
            addresses.iter().any(|a| a == &exact),
            "no channel has the address {exact}"
        );
    }
    let group_role = Target {
        node_group: Some("prod".into()),
        node_role: Some("db".into()),
        ..Target::default()
    };
    let node_id = example_node_id(&doc);
    let node = Target {
        node_id: Some(node_id),
        ..Target::default()
    };
    for queue in [
        n.work_queue(&Target::default().routing_key()),
        n.work_queue(&group_role.routing_key()),
        n.work_queue(&node.routing_key()),
        n.control_queue(node_id),
    ] {
        assert!(
            addresses.contains(&queue),
            "no channel address (with its parameters' examples) is the queue {queue}"
        );
    }
}

#[test]
fn job_submit_matches_the_submit_request() {
    let doc = doc();
    let request = SubmitRequest {
        job_name: "n".into(),
        command: "true".into(),
        description: Some(String::new()),
        execution_mode: Some("pool".into()),
        timeout_seconds: Some(1),
        priority: Some(5),
        target: Some(TargetRequest::default()),
        env: Some(Default::default()),
        secret_env: Some(Default::default()),
        limits: Some(Default::default()),
    };
    let submit = JobSubmit {
        user_id: "alice".into(),
        request,
    };
    let schema = payload_schema(&doc, JOB_SUBMIT_V1);
    let value = serde_json::to_value(&submit).expect("serializes");
    assert_eq!(keys(&value), property_names(&doc, schema));
    let target = serde_json::to_value(TargetRequest::default()).expect("serializes");
    assert_eq!(
        keys(&target),
        property_names(&doc, &schema["properties"]["target"])
    );
    let example: JobSubmit = serde_json::from_value(example_payload(&doc, JOB_SUBMIT_V1).clone())
        .expect("the job.submit.v1 example parses");
    example
        .request
        .validate()
        .expect("the job.submit.v1 example is a valid job");
}

#[test]
fn job_run_matches_the_code() {
    let doc = doc();
    let run = JobRun {
        job_id: Uuid::nil(),
        attempt: 0,
        command: "true".into(),
        execution_mode: ExecutionMode::Pool,
        timeout_seconds: None,
        env: Default::default(),
        priority: 5,
        submitted_at: chrono::Utc::now(),
    };
    let value = serde_json::to_value(&run).expect("serializes");
    assert_eq!(
        keys(&value),
        property_names(&doc, payload_schema(&doc, JOB_RUN_V1))
    );
    let _: JobRun = serde_json::from_value(example_payload(&doc, JOB_RUN_V1).clone())
        .expect("the job.run.v1 example parses");
}

#[test]
fn job_events_match_the_code() {
    let doc = doc();
    let event = events::job_event(Uuid::nil(), JobStatus::Succeeded, 1, None, Some(0));
    let batch = payload_schema(&doc, JOB_EVENTS_V1);
    let item = &batch["properties"]["events"]["items"];
    let value = serde_json::to_value(&event).expect("serializes");
    assert_eq!(keys(&value), property_names(&doc, item));
    let out = events::messages(std::slice::from_ref(&event));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].exchange, "events");
    assert_eq!(out[0].routing_key, "job.succeeded");
    assert_eq!(out[0].message_type, JOB_EVENTS_V1);
    let body: Value = serde_json::from_slice(&out[0].payload).expect("JSON body");
    assert_eq!(keys(&body), property_names(&doc, batch));
    let headers = property_names(&doc, &message(&doc, JOB_EVENTS_V1)["headers"]);
    for (name, _) in &out[0].headers {
        assert!(headers.contains(name), "header {name} is not described");
    }
    let example = example_payload(&doc, JOB_EVENTS_V1);
    let _: Vec<JobEvent> = serde_json::from_value(example["events"].clone())
        .expect("the job.events.v1 example parses");
}

#[test]
fn change_events_match_the_code() {
    let doc = doc();
    let entry = ChangeEntry {
        change_seq: 42,
        change_id: Uuid::nil(),
        table_name: "jobs".into(),
        record_id: Uuid::nil().to_string(),
        action: "UPDATE".into(),
        old_data: Some(json!({})),
        new_data: Some(json!({})),
        changed_by: "alice".into(),
        changed_at: chrono::Utc::now(),
        node_id: None,
        change_reason: None,
    };
    let batch = payload_schema(&doc, CHANGES_V1);
    let item = &batch["properties"]["changes"]["items"];
    let value = serde_json::to_value(&entry).expect("serializes");
    assert_eq!(keys(&value), property_names(&doc, item));

    let raw = RawChangeEntry {
        change_seq: 42,
        change_id: Uuid::nil(),
        table_name: "jobs".into(),
        record_id: Uuid::nil().to_string(),
        action: "UPDATE".into(),
        old_data: None,
        new_data: serde_json::value::to_raw_value(&json!({})).ok(),
        changed_by: "alice".into(),
        changed_at: chrono::Utc::now(),
        node_id: None,
        change_reason: None,
    };
    let out = sync::change_events(&[raw]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].exchange, "events");
    assert_eq!(out[0].routing_key, "change.jobs.update");
    assert_eq!(out[0].message_type, CHANGES_V1);
    assert_eq!(out[0].message_id, "changes:42-42");
    let body: Value = serde_json::from_slice(&out[0].payload).expect("JSON body");
    assert_eq!(keys(&body), property_names(&doc, batch));
    let headers = property_names(&doc, &message(&doc, CHANGES_V1)["headers"]);
    let sent: BTreeSet<String> = out[0].headers.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(sent, headers, "changes.v1 headers");
}

#[test]
fn control_matches_the_code() {
    let doc = doc();
    let value = serde_json::to_value(Control::Cancel {
        job_id: Uuid::nil(),
    })
    .expect("serializes");
    assert_eq!(
        keys(&value),
        property_names(&doc, payload_schema(&doc, CONTROL_V1))
    );
    let example: Control = serde_json::from_value(example_payload(&doc, CONTROL_V1).clone())
        .expect("the control.v1 example parses");
    assert!(matches!(example, Control::Cancel { .. }));
}

#[test]
fn exchanges_and_queues_are_declared_as_documented() {
    let doc = doc();
    // Every exchange's type and durability, as `amqp::EXCHANGES` declares it.
    for (logical, kind) in &taskhost_common::amqp::EXCHANGES {
        let kind = match kind {
            lapin::ExchangeKind::Direct => "direct",
            lapin::ExchangeKind::Fanout => "fanout",
            lapin::ExchangeKind::Topic => "topic",
            lapin::ExchangeKind::Headers => "headers",
            lapin::ExchangeKind::Custom(k) => k.as_str(),
        };
        let address = format!("{{prefix}}.{logical}");
        let channel = doc["channels"]
            .as_object()
            .expect("channels")
            .values()
            .find(|c| {
                c["address"] == address.as_str() && c["bindings"]["amqp"]["is"] == "routingKey"
            })
            .unwrap_or_else(|| panic!("no exchange channel {address}"));
        let exchange = &channel["bindings"]["amqp"]["exchange"];
        assert_eq!(exchange["type"], kind, "type of {address}");
        assert_eq!(exchange["durable"], true, "{address} is durable");
        assert!(
            channel["x-amqp-routing-keys"].is_array(),
            "{address}: x-amqp-routing-keys"
        );
    }
    // Queue arguments, as `declare_topology` and `declare_work_queue` pass them.
    let queue = |id: &str| doc["channels"][id]["x-amqp-queue"].clone();
    let dlx = json!("{prefix}.dead");
    assert_eq!(
        queue("workQueue")["arguments"],
        json!({"x-max-priority": taskhost_common::amqp::MAX_PRIORITY, "x-dead-letter-exchange": dlx})
    );
    assert_eq!(
        queue("submitQueue")["arguments"],
        json!({"x-dead-letter-exchange": dlx})
    );
    assert_eq!(
        queue("submitQueue")["bindings"],
        json!([{"exchange": "{prefix}.submit", "routingKey": "submit"}])
    );
    assert_eq!(queue("controlQueue")["arguments"], json!({}));
    assert_eq!(queue("deadQueue")["arguments"], json!({}));
}

#[test]
fn examples_are_complete() {
    let doc = doc();
    // The messages a taskhost consumer checks list what it refuses and why.
    for key in ["jobSubmit", "jobRun", "control"] {
        let m = &doc["components"]["messages"][key];
        let invalid = m["x-invalid-examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: x-invalid-examples"));
        assert!(invalid.len() >= 3, "{key}: a few invalid examples");
        let mut names = BTreeSet::new();
        for e in invalid {
            let name = e["name"].as_str().expect("name");
            assert!(name.starts_with("invalid-"), "{key}: {name}");
            assert!(names.insert(name), "{key}: {name} twice");
            assert!(
                e["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{key} {name}: the reason"
            );
            assert!(
                e["payload"].is_null() != e["body"].is_null(),
                "{key} {name}: either payload or body"
            );
            assert!(e["properties"].is_object(), "{key} {name}: properties");
        }
    }
    // Submit and work messages may carry a W3C trace context.
    for t in [JOB_SUBMIT_V1, JOB_RUN_V1] {
        assert!(
            property_names(&doc, &message(&doc, t)["headers"]).contains("traceparent"),
            "{t}: traceparent header"
        );
    }
    // Every valid submit example has a documented outcome and its users.
    let submit = &doc["components"]["messages"]["jobSubmit"];
    for e in submit["examples"].as_array().expect("examples") {
        let name = e["name"].as_str().expect("name");
        let outcome = submit["x-example-outcomes"][name]
            .as_str()
            .unwrap_or_else(|| panic!("no outcome for {name}"));
        outcome
            .parse::<JobStatus>()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let user = e["payload"]["userId"].as_str().expect("userId");
        assert!(
            submit["x-example-users"][user].is_array(),
            "{name}: user {user} is not in x-example-users"
        );
    }
}
