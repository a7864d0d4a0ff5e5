//! The OpenAPI document served at `/openapi.json` matches the router: every
//! route of `api/src/lib.rs` is documented with its methods, the submit body
//! schema lists exactly the fields `SubmitRequest` accepts, and `/docs`
//! serves the page that renders it. When a route or the submit body changes,
//! this fails until `api/openapi.json` is updated too. It also holds the
//! document to what `scripts/fuzz-api` (schemathesis) found missing: every
//! operation that reads a body documents 400, 413 and 422, every one with a
//! path id documents 404, and the error codes are every code the api answers.

use std::collections::BTreeSet;

use serde_json::Value;
use taskhost_testkit::TestEnv;

/// Every route of the router, with its methods (from `api/src/lib.rs`).
const ROUTES: &[(&str, &[&str])] = &[
    ("/api/v1/jobs", &["get"]),
    ("/api/v1/jobs/submit", &["post"]),
    ("/api/v1/jobs/results", &["get", "delete"]),
    ("/api/v1/jobs/{jobId}", &["get", "delete"]),
    ("/api/v1/jobs/{jobId}/cancel", &["post"]),
    ("/api/v1/jobs/{jobId}/output", &["get"]),
    ("/api/v1/jobs/{jobId}/rerun", &["post"]),
    ("/api/v1/overview", &["get"]),
    ("/api/v1/me", &["get"]),
    ("/api/v1/nodes", &["get"]),
    ("/api/v1/nodes/{nodeId}", &["get"]),
    ("/api/v1/changes", &["get"]),
    ("/api/v1/events/stream", &["get"]),
    ("/api/v1/sync/status", &["get"]),
    ("/api/v1/sync/trigger", &["post"]),
    ("/api/v1/tasks", &["get", "post"]),
    ("/api/v1/tasks/{taskId}", &["get", "put", "delete"]),
    ("/api/v1/tasks/{taskId}/history", &["get"]),
    (
        "/api/v1/tasks/{taskId}/history/{historyId}/output",
        &["get"],
    ),
    ("/api/v1/tasks/{taskId}/schedule", &["get"]),
    ("/api/v1/tasks/{taskId}/run", &["post"]),
    ("/livez", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
    ("/docs", &["get"]),
    ("/dashboard", &["get"]),
    ("/", &["get"]),
];

/// The fields of `SubmitRequest` (common/src/model.rs), camelCase.
const SUBMIT_FIELDS: &[&str] = &[
    "jobName",
    "command",
    "description",
    "executionMode",
    "timeoutSeconds",
    "priority",
    "target",
    "env",
    "secretEnv",
    "limits",
];

/// Every `error.code` the api answers (`api/src/error.rs`, and the 405 of
/// `json_errors` in `api/src/lib.rs`).
const ERROR_CODES: &[&str] = &[
    "bad_request",
    "invalid",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
];

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Follows a local `$ref` (`#/components/...`) to what it names.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..10 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} names nothing in the document"));
    }
    panic!("$ref chain too long");
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;

    // The document: open (no key), JSON, OpenAPI 3.1.
    let resp = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = content_type(&resp);
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let doc: Value = resp.json().await.expect("/openapi.json is JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "openapi version: {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths object");

    // Every route is documented with exactly its methods, and nothing else is.
    let mut problems = Vec::new();
    for (path, methods) in ROUTES {
        let Some(item) = paths.get(*path) else {
            problems.push(format!("{path}: not documented"));
            continue;
        };
        let documented: BTreeSet<&str> = HTTP_METHODS
            .iter()
            .copied()
            .filter(|m| item.get(*m).is_some())
            .collect();
        let expected: BTreeSet<&str> = methods.iter().copied().collect();
        if documented != expected {
            problems.push(format!(
                "{path}: documents {documented:?}, the router has {expected:?}"
            ));
        }
        for m in &documented {
            let op = &item[*m];
            if op["operationId"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{m} {path}: no operationId"));
            }
            if op["tags"].as_array().is_none_or(Vec::is_empty) {
                problems.push(format!("{m} {path}: no tag"));
            }
            if op["responses"].as_object().is_none_or(|r| r.is_empty()) {
                problems.push(format!("{m} {path}: no responses"));
            }
            // A body can be not JSON (400), too large (413) or wrong (422);
            // a path id can name nothing (404).
            let mut needed = Vec::new();
            if op.get("requestBody").is_some() {
                needed.extend(["400", "413", "422"]);
            }
            if path.contains('{') {
                needed.push("404");
            }
            for status in needed {
                if op["responses"].get(status).is_none() {
                    problems.push(format!("{m} {path}: answers {status}, not documented"));
                }
            }
            // Only /api/v1 needs a key.
            let security = op.get("security").unwrap_or(&doc["security"]);
            let secured = security.as_array().is_some_and(|s| !s.is_empty());
            if secured != path.starts_with("/api/v1/") {
                problems.push(format!(
                    "{m} {path}: security {security} (a key is needed exactly on /api/v1)"
                ));
            }
        }
    }
    for path in paths.keys() {
        if !ROUTES.iter().any(|(p, _)| p == path) {
            problems.push(format!("{path}: documented but not routed"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The error codes: exactly those the api answers.
    let codes: BTreeSet<&str> =
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .expect("error code enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
    assert_eq!(codes, ERROR_CODES.iter().copied().collect::<BTreeSet<_>>());

    // operationIds are unique.
    let mut ids = BTreeSet::new();
    for item in paths.values() {
        for m in HTTP_METHODS {
            if let Some(id) = item.get(*m).and_then(|op| op["operationId"].as_str()) {
                assert!(ids.insert(id), "operationId {id} is used twice");
            }
        }
    }

    // The submit body: exactly the fields SubmitRequest accepts, closed.
    let body = resolve(
        &doc,
        &doc["paths"]["/api/v1/jobs/submit"]["post"]["requestBody"],
    );
    let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);
    let props: BTreeSet<&str> = schema["properties"]
        .as_object()
        .expect("submit schema has properties")
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = SUBMIT_FIELDS.iter().copied().collect();
    assert_eq!(
        props, want,
        "the submit body schema drifted from SubmitRequest"
    );
    assert_eq!(
        schema["additionalProperties"],
        Value::Bool(false),
        "unknown submit fields are rejected, so the schema must say so"
    );
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .expect("required list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["jobName", "command"]));

    // The page that renders it.
    let resp = api
        .http
        .get(format!("{}/docs", api.base))
        .send()
        .await
        .expect("GET /docs");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = content_type(&resp);
    assert!(ct.starts_with("text/html"), "content-type {ct}");
    let page = resp.text().await.expect("page text");
    assert!(
        page.contains("openapi.json"),
        "/docs does not load openapi.json"
    );

    env.cleanup().await;
}
