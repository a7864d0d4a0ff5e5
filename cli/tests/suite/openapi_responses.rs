//! Real answers match the OpenAPI document: every route is driven through
//! a real api, worker and database (its success and its main errors: 400,
//! 401, 403, 404, 409, 413, 422, and 429 and 503 from apis with a tight
//! budget and an unreachable database), and
//! each answer must be documented for its status, with its content type,
//! and (for JSON) valid against that status's schema, `$ref`s resolved
//! into the document's components. Every operation of the document must
//! have been seen succeeding, so a new route without a case here fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{Api, TestEnv};
use uuid::Uuid;

const MISSING: &str = "00000000-0000-7000-8000-0000000000ff";

/// Sends requests and checks each answer against the document.
struct Checker {
    doc: Value,
    http: reqwest::Client,
    base: String,
    /// Operation (`METHOD path`) → statuses seen.
    seen: BTreeMap<String, BTreeSet<u16>>,
    problems: Vec<String>,
}

/// What one request sends.
struct Req<'a> {
    method: Method,
    /// The documented path (`/api/v1/jobs/{jobId}`).
    template: &'a str,
    /// The path with ids and query (`/api/v1/jobs/0193...?stream=stderr`).
    path: String,
    key: Option<&'a str>,
    body: Option<Vec<u8>>,
    headers: Vec<(&'a str, String)>,
}

impl<'a> Req<'a> {
    fn new(method: Method, template: &'a str, path: impl Into<String>) -> Self {
        Self {
            method,
            template,
            path: path.into(),
            key: None,
            body: None,
            headers: Vec::new(),
        }
    }
    fn key(mut self, key: &'a str) -> Self {
        self.key = Some(key);
        self
    }
    fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string().into_bytes());
        self
    }
    fn raw(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }
    fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl Checker {
    async fn new(api: &Api) -> Self {
        let doc: Value = api
            .http
            .get(format!("{}/openapi.json", api.base))
            .send()
            .await
            .expect("GET /openapi.json")
            .json()
            .await
            .expect("document JSON");
        Self {
            doc,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            base: api.base.clone(),
            seen: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    /// Follows local `$ref`s.
    fn resolve<'v>(&'v self, v: &'v Value) -> &'v Value {
        crate::openapi::resolve(&self.doc, v)
    }

    /// Sends `req`, expects `want`, checks the answer against the document
    /// and returns its body (JSON, or the text as a string).
    async fn send(&mut self, req: Req<'_>, want: u16) -> Value {
        let op_name = format!("{} {}", req.method, req.template);
        let mut builder = self
            .http
            .request(req.method.clone(), format!("{}{}", self.base, req.path));
        if let Some(key) = req.key {
            builder = builder.bearer_auth(key);
        }
        for (name, value) in &req.headers {
            builder = builder.header(*name, value);
        }
        if let Some(body) = req.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let stream = req.template.ends_with("/events/stream");
        let resp = builder.send().await.expect("request");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // The event stream never ends: its first event is enough.
        let text = if stream && status == 200 {
            let mut resp = resp;
            let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
                .await
                .expect("first event in time")
                .expect("stream chunk")
                .unwrap_or_default();
            String::from_utf8_lossy(&chunk).into_owned()
        } else {
            resp.text().await.expect("body")
        };
        self.seen.entry(op_name.clone()).or_default().insert(status);
        if status != want {
            self.problems.push(format!(
                "{op_name} ({}): answered {status}, the test expects {want}: {text}",
                req.path
            ));
        }

        let method = req.method.as_str().to_lowercase();
        let Some(op) = self.doc["paths"][req.template].get(&method).cloned() else {
            self.problems
                .push(format!("{op_name}: not in the document"));
            return Value::Null;
        };
        let Some(documented) = op["responses"].get(status.to_string()).cloned() else {
            self.problems.push(format!(
                "{op_name}: answered {status}, which the document does not list: {text}"
            ));
            return Value::Null;
        };
        let documented = self.resolve(&documented).clone();
        let media = ct.split(';').next().unwrap_or_default().trim().to_owned();
        let content = &documented["content"];
        if content.is_null() {
            if !text.is_empty() {
                self.problems.push(format!(
                    "{op_name} {status}: a body ({ct}) where the document has none"
                ));
            }
            return Value::Null;
        }
        let Some(entry) = content.get(&media) else {
            self.problems.push(format!(
                "{op_name} {status}: content type {ct:?}, the document has {:?}",
                content.as_object().map(|c| c.keys().collect::<Vec<_>>())
            ));
            return Value::String(text);
        };
        if media != "application/json" {
            return Value::String(text);
        }
        let body: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                self.problems
                    .push(format!("{op_name} {status}: not JSON ({e}): {text}"));
                return Value::Null;
            }
        };
        // The schema with the document's components beside it, so its
        // `#/components/...` references resolve.
        let mut schema = entry["schema"].clone();
        if let Some(obj) = schema.as_object_mut() {
            obj.insert("components".into(), self.doc["components"].clone());
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{op_name} {status}: the schema does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if !errors.is_empty() {
            self.problems.push(format!(
                "{op_name} {status}: the answer does not match its schema:\n  {}\n  body: {}",
                errors.join("\n  "),
                truncate(&text)
            ));
        }
        body
    }

    /// Every operation of the document was seen answering 2xx or 3xx.
    fn covered(&mut self) {
        let paths = self.doc["paths"].as_object().cloned().unwrap_or_default();
        for (path, item) in paths {
            for method in ["get", "put", "post", "delete", "patch"] {
                if item.get(method).is_none() {
                    continue;
                }
                let name = format!("{} {path}", method.to_uppercase());
                let ok = self
                    .seen
                    .get(&name)
                    .is_some_and(|s| s.iter().any(|st| (200..400).contains(st)));
                if !ok {
                    self.problems.push(format!(
                        "{name}: never seen succeeding in this test (add a case for it)"
                    ));
                }
            }
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(600).collect()
}

fn id_of(body: &Value, field: &str) -> String {
    body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {body}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_what_the_document_says() {
    let mut env = TestEnv::new().await;
    // Webhooks need a signing secret.
    env.settings.notifications.secret = "doc-test-webhook-secret".to_owned();
    let api = env.start_api().await;
    env.start_worker("docs", "default", "worker").await;
    let admin = env.key("ada", &[Role::SystemAdmin]).await;
    let debug = env.key("dev", &[Role::Debug]).await;
    let mut c = Checker::new(&api).await;
    use Method as M;

    // Open routes.
    c.send(Req::new(M::GET, "/livez", "/livez"), 200).await;
    c.send(Req::new(M::GET, "/readyz", "/readyz"), 200).await;
    c.send(Req::new(M::GET, "/metrics", "/metrics"), 200).await;
    c.send(Req::new(M::GET, "/openapi.json", "/openapi.json"), 200)
        .await;
    c.send(Req::new(M::GET, "/asyncapi.json", "/asyncapi.json"), 200)
        .await;
    c.send(Req::new(M::GET, "/docs", "/docs"), 200).await;
    c.send(Req::new(M::GET, "/dashboard", "/dashboard"), 200)
        .await;
    c.send(Req::new(M::GET, "/", "/"), 303).await;

    // Jobs.
    let submit = "/api/v1/jobs/submit";
    let job = c
        .send(
            Req::new(M::POST, submit, submit).key(&admin).json(
                json!({"jobName": "doc", "command": "echo out; echo err >&2",
                             "target": {"nodeGroup": "default"}, "env": {"A": "1"},
                             "limits": {"cpuSeconds": 60}}),
            ),
            202,
        )
        .await;
    let job_id = id_of(&job, "jobId");
    c.send(
        Req::new(M::POST, submit, submit)
            .key(&admin)
            .header("Idempotency-Key", "k1")
            .json(json!({"jobName": "idem", "command": "true"})),
        202,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit)
            .key(&admin)
            .header("Idempotency-Key", "k1")
            .json(json!({"jobName": "idem", "command": "false"})),
        409,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit).key(&admin).raw("{nope"),
        400,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit)
            .key(&admin)
            .json(json!({"jobName": "", "command": "true"})),
        422,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit)
            .key(&admin)
            .json(json!({"jobName": "x", "command": "noop", "executionMode": "inline"})),
        403,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit).key(&admin).raw(format!(
            r#"{{"jobName":"big","command":"{}"}}"#,
            "x".repeat(300 * 1024)
        )),
        413,
    )
    .await;
    c.send(
        Req::new(M::POST, submit, submit).json(json!({"jobName": "x", "command": "true"})),
        401,
    )
    .await;
    let uuid: Uuid = job_id.parse().expect("uuid");
    env.wait_terminal(uuid, Duration::from_secs(60)).await;

    let one = "/api/v1/jobs/{jobId}";
    c.send(
        Req::new(M::GET, one, format!("/api/v1/jobs/{job_id}")).key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, one, format!("/api/v1/jobs/{MISSING}")).key(&admin),
        404,
    )
    .await;
    c.send(
        Req::new(M::GET, one, format!("/api/v1/jobs/{job_id}")).key(&debug),
        404,
    )
    .await;
    let list = "/api/v1/jobs";
    c.send(
        Req::new(M::GET, list, "/api/v1/jobs?limit=5").key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, list, "/api/v1/jobs?limit=0").key(&admin),
        422,
    )
    .await;
    let results = "/api/v1/jobs/results";
    c.send(Req::new(M::GET, results, results).key(&admin), 200)
        .await;
    c.send(
        Req::new(M::GET, results, "/api/v1/jobs/results?maxResults=0").key(&admin),
        422,
    )
    .await;
    let output = "/api/v1/jobs/{jobId}/output";
    let out = c
        .send(
            Req::new(M::GET, output, format!("/api/v1/jobs/{job_id}/output")).key(&admin),
            200,
        )
        .await;
    assert_eq!(out, json!("out\n"));
    c.send(
        Req::new(
            M::GET,
            output,
            format!("/api/v1/jobs/{job_id}/output?stream=bogus"),
        )
        .key(&admin),
        422,
    )
    .await;
    let rerun = "/api/v1/jobs/{jobId}/rerun";
    let again = c
        .send(
            Req::new(M::POST, rerun, format!("/api/v1/jobs/{job_id}/rerun")).key(&admin),
            202,
        )
        .await;
    let cancel = "/api/v1/jobs/{jobId}/cancel";
    c.send(
        Req::new(M::POST, cancel, format!("/api/v1/jobs/{job_id}/cancel")).key(&admin),
        409,
    )
    .await;
    // A job no node takes, cancelled before it starts.
    let waiting = c
        .send(
            Req::new(M::POST, submit, submit)
                .key(&admin)
                .json(json!({"jobName": "wait", "command": "true", "target": {"nodeId": MISSING}})),
            202,
        )
        .await;
    let waiting = id_of(&waiting, "jobId");
    c.send(
        Req::new(M::POST, cancel, format!("/api/v1/jobs/{waiting}/cancel")).key(&admin),
        202,
    )
    .await;
    let again: Uuid = id_of(&again, "jobId").parse().expect("uuid");
    env.wait_terminal(again, Duration::from_secs(60)).await;
    c.send(
        Req::new(M::DELETE, one, format!("/api/v1/jobs/{job_id}")).key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::DELETE, one, format!("/api/v1/jobs/{job_id}")).key(&admin),
        404,
    )
    .await;
    c.send(
        Req::new(
            M::DELETE,
            results,
            format!("/api/v1/jobs/results?jobId={again}"),
        )
        .key(&admin),
        200,
    )
    .await;
    c.send(Req::new(M::DELETE, results, results).key(&admin), 422)
        .await;

    // The console.
    c.send(
        Req::new(M::GET, "/api/v1/overview", "/api/v1/overview").key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, "/api/v1/overview", "/api/v1/overview").key(&debug),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, "/api/v1/me", "/api/v1/me").key(&debug),
        200,
    )
    .await;
    let stream = "/api/v1/events/stream";
    let first = c
        .send(Req::new(M::GET, stream, stream).key(&admin), 200)
        .await;
    assert!(
        first.as_str().is_some_and(|t| t.contains("event: ready")),
        "{first}"
    );
    c.send(
        Req::new(M::GET, stream, "/api/v1/events/stream?since=x").key(&admin),
        422,
    )
    .await;

    // Nodes.
    let nodes = c
        .send(
            Req::new(M::GET, "/api/v1/nodes", "/api/v1/nodes").key(&debug),
            200,
        )
        .await;
    let node_id = nodes["nodes"][0]["nodeId"]
        .as_str()
        .expect("a node")
        .to_owned();
    let node = "/api/v1/nodes/{nodeId}";
    c.send(
        Req::new(M::GET, node, format!("/api/v1/nodes/{node_id}")).key(&debug),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, node, "/api/v1/nodes/not-a-node").key(&debug),
        404,
    )
    .await;

    // The change feed and its consumers.
    let changes = "/api/v1/changes";
    c.send(
        Req::new(M::GET, changes, "/api/v1/changes?limit=50").key(&admin),
        200,
    )
    .await;
    c.send(Req::new(M::GET, changes, changes).key(&debug), 403)
        .await;
    c.send(
        Req::new(M::GET, changes, "/api/v1/changes?table=nope").key(&admin),
        422,
    )
    .await;
    c.send(
        Req::new(M::GET, "/api/v1/sync/status", "/api/v1/sync/status").key(&admin),
        200,
    )
    .await;
    let trigger = "/api/v1/sync/trigger";
    c.send(
        Req::new(M::POST, trigger, trigger)
            .key(&admin)
            .json(json!({})),
        200,
    )
    .await;
    // The body is optional.
    c.send(Req::new(M::POST, trigger, trigger).key(&admin), 200)
        .await;
    c.send(
        Req::new(M::POST, trigger, trigger)
            .key(&admin)
            .json(json!({"consumer": "docs-test", "resetTo": 0})),
        200,
    )
    .await;
    c.send(
        Req::new(M::POST, trigger, trigger)
            .key(&admin)
            .json(json!({"table": "nope"})),
        422,
    )
    .await;
    c.send(
        Req::new(M::POST, trigger, trigger)
            .key(&debug)
            .json(json!({})),
        403,
    )
    .await;

    // Tasks.
    let tasks = "/api/v1/tasks";
    let created = c
        .send(
            Req::new(M::POST, tasks, tasks).key(&admin).json(json!({
                "taskName": "doc-task", "command": "echo task", "schedule": "0 3 * * *",
                "assignedNodeGroup": "default", "limits": {"maxFiles": 64}
            })),
            201,
        )
        .await;
    let task_id = id_of(&created, "taskId");
    c.send(
        Req::new(M::POST, tasks, tasks)
            .key(&admin)
            .json(json!({"taskName": "doc-task", "command": "true", "schedule": "0 3 * * *"})),
        409,
    )
    .await;
    c.send(
        Req::new(M::POST, tasks, tasks)
            .key(&admin)
            .json(json!({"taskName": "no-schedule", "command": "true"})),
        422,
    )
    .await;
    c.send(
        Req::new(M::POST, tasks, tasks)
            .key(&debug)
            .json(json!({"taskName": "t", "command": "true", "schedule": "@hourly"})),
        403,
    )
    .await;
    c.send(Req::new(M::GET, tasks, tasks).key(&debug), 200)
        .await;
    let task = "/api/v1/tasks/{taskId}";
    let path = format!("/api/v1/tasks/{task_id}");
    c.send(Req::new(M::GET, task, path.clone()).key(&debug), 200)
        .await;
    c.send(
        Req::new(M::GET, task, format!("/api/v1/tasks/{MISSING}")).key(&debug),
        404,
    )
    .await;
    c.send(
        Req::new(M::PUT, task, path.clone())
            .key(&admin)
            .json(json!({"enabled": false, "timeoutSeconds": null})),
        200,
    )
    .await;
    c.send(
        Req::new(M::PUT, task, path.clone())
            .key(&admin)
            .json(json!({"priority": 10})),
        422,
    )
    .await;
    // Webhooks (admin).
    let hooks = "/api/v1/webhooks";
    let hook = c
        .send(
            Req::new(M::POST, hooks, hooks).key(&admin).json(json!({
                "url": "http://127.0.0.1:9/hook", "events": ["job.failed"], "taskId": task_id
            })),
            201,
        )
        .await;
    let hook_id = id_of(&hook, "webhookId");
    c.send(
        Req::new(M::POST, hooks, hooks)
            .key(&admin)
            .json(json!({"url": "ftp://x", "events": ["job.failed"]})),
        422,
    )
    .await;
    c.send(Req::new(M::GET, hooks, hooks).key(&debug), 403)
        .await;
    c.send(Req::new(M::GET, hooks, hooks).key(&admin), 200)
        .await;
    let log = "/api/v1/webhooks/{webhookId}/deliveries";
    c.send(
        Req::new(M::GET, log, format!("{hooks}/{hook_id}/deliveries")).key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::GET, log, format!("{hooks}/{MISSING}/deliveries")).key(&admin),
        404,
    )
    .await;
    let one = "/api/v1/webhooks/{webhookId}";
    c.send(
        Req::new(M::DELETE, one, format!("{hooks}/{hook_id}")).key(&admin),
        200,
    )
    .await;
    c.send(
        Req::new(M::DELETE, one, format!("{hooks}/{hook_id}")).key(&admin),
        404,
    )
    .await;

    // Export and import (the file as exported, so every task is unchanged).
    let export = "/api/v1/tasks/export";
    let file = c
        .send(Req::new(M::GET, export, export).key(&admin), 200)
        .await;
    c.send(Req::new(M::GET, export, export).key(&debug), 403)
        .await;
    let import = "/api/v1/tasks/import";
    c.send(
        Req::new(M::POST, import, format!("{import}?dryRun=true"))
            .key(&admin)
            .json(file.clone()),
        200,
    )
    .await;
    c.send(
        Req::new(M::POST, import, import).key(&admin).json(file),
        200,
    )
    .await;
    c.send(
        Req::new(M::POST, import, import)
            .key(&admin)
            .json(json!({"format": "taskhost.tasks", "version": 9, "tasks": []})),
        422,
    )
    .await;
    let schedule = "/api/v1/tasks/{taskId}/schedule";
    c.send(
        Req::new(M::GET, schedule, format!("{path}/schedule")).key(&debug),
        200,
    )
    .await;
    let run = "/api/v1/tasks/{taskId}/run";
    let ran = c
        .send(
            Req::new(M::POST, run, format!("{path}/run")).key(&admin),
            202,
        )
        .await;
    let ran: Uuid = id_of(&ran, "jobId").parse().expect("uuid");
    env.wait_terminal(ran, Duration::from_secs(60)).await;
    let history = "/api/v1/tasks/{taskId}/history";
    let page = c
        .send(
            Req::new(M::GET, history, format!("{path}/history?limit=10")).key(&debug),
            200,
        )
        .await;
    c.send(
        Req::new(M::GET, history, format!("{path}/history?limit=0")).key(&debug),
        422,
    )
    .await;
    let history_id = page["history"][0]["historyId"]
        .as_i64()
        .expect("a history entry");
    let history_output = "/api/v1/tasks/{taskId}/history/{historyId}/output";
    let text = c
        .send(
            Req::new(
                M::GET,
                history_output,
                format!("{path}/history/{history_id}/output"),
            )
            .key(&debug),
            200,
        )
        .await;
    assert_eq!(text, json!("task\n"));
    c.send(
        Req::new(
            M::GET,
            history_output,
            format!("{path}/history/{}/output", history_id + 1000),
        )
        .key(&debug),
        404,
    )
    .await;
    c.send(Req::new(M::DELETE, task, path.clone()).key(&debug), 403)
        .await;
    c.send(Req::new(M::DELETE, task, path.clone()).key(&admin), 200)
        .await;
    c.send(Req::new(M::DELETE, task, path.clone()).key(&admin), 404)
        .await;

    // A key out of budget: 429 with Retry-After.
    let mut tight = env.settings.clone();
    tight.api.rate_limit_per_sec = 1;
    tight.api.rate_limit_burst = 1;
    let tight_api = env.start_api_with(tight).await;
    let mut t = Checker::new(&tight_api).await;
    t.send(
        Req::new(M::GET, "/api/v1/me", "/api/v1/me").key(&debug),
        200,
    )
    .await;
    t.send(
        Req::new(M::GET, "/api/v1/me", "/api/v1/me").key(&debug),
        429,
    )
    .await;
    c.problems.append(&mut t.problems);

    // Postgres unreachable: 503, for readiness and for a keyed route.
    let mut down = env.settings.clone();
    down.database.url = format!("postgres://postgres@127.0.0.1:1/{}", env.db_name);
    down.database.acquire_timeout_secs = 1;
    let down_api = env.start_api_with(down).await;
    let mut d = Checker::new(&down_api).await;
    let ready = d.send(Req::new(M::GET, "/readyz", "/readyz"), 503).await;
    assert_eq!(ready["down"][0], "postgres", "{ready}");
    d.send(
        Req::new(M::GET, "/api/v1/me", "/api/v1/me").key(&debug),
        503,
    )
    .await;
    c.problems.append(&mut d.problems);

    c.covered();
    assert!(c.problems.is_empty(), "{}", c.problems.join("\n"));
    env.cleanup().await;
}
