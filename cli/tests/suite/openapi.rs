//! The OpenAPI document served at `/openapi.json` is the one the code
//! generates (`api/src/doc.rs`; the routes are registered from the same
//! `#[utoipa::path]` annotations), and the committed `api/openapi.json` is
//! that document byte for byte. The router answers every documented path
//! and method. The document also holds what `scripts/fuzz-api`
//! (schemathesis) found missing once: every operation that reads a body
//! documents 400, 413 and 422, every one with a path id documents 404, the
//! error codes are every code the api answers, and a key is needed exactly
//! on `/api/v1`. The answers themselves are checked against it in
//! `openapi_responses.rs`.

use std::collections::BTreeSet;

use serde_json::Value;
use taskhost_testkit::TestEnv;

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
pub(crate) fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
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

/// The committed copy is what the code generates: a route or type changed
/// without `api/openapi.json` being regenerated fails here.
#[test]
fn committed_openapi_json_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/openapi.json");
    let committed = std::fs::read_to_string(path).expect("read api/openapi.json");
    let generated = taskhost_api::openapi_json();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "api/openapi.json is not what the code generates (first difference at line {}: \
             committed {:?}, generated {:?}).\nRegenerate it with:\n\n    \
             cargo run -p taskhost -- openapi > api/openapi.json\n",
            first + 1,
            committed.lines().nth(first).unwrap_or("<end>"),
            generated.lines().nth(first).unwrap_or("<end>"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");

    // The document: open (no key), JSON, OpenAPI 3.1, and the generated one.
    let resp = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = content_type(&resp);
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let text = resp.text().await.expect("document text");
    assert_eq!(
        text,
        taskhost_api::openapi_json(),
        "/openapi.json is not the generated document"
    );
    let doc: Value = serde_json::from_str(&text).expect("/openapi.json is JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "openapi version: {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths object");
    assert!(paths.len() >= 28, "only {} paths documented", paths.len());

    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    for (path, item) in paths {
        let documented: Vec<&str> = HTTP_METHODS
            .iter()
            .copied()
            .filter(|m| item.get(*m).is_some())
            .collect();
        if documented.is_empty() {
            problems.push(format!("{path}: no operation"));
        }
        for m in &documented {
            let op = &item[*m];
            match op["operationId"].as_str() {
                Some(id) if !id.is_empty() => {
                    if !ids.insert(id.to_owned()) {
                        problems.push(format!("operationId {id} is used twice"));
                    }
                }
                _ => problems.push(format!("{m} {path}: no operationId")),
            }
            if op["tags"].as_array().is_none_or(Vec::is_empty) {
                problems.push(format!("{m} {path}: no tag"));
            }
            if op["summary"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{m} {path}: no summary"));
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

            // The router has it: without a key, an /api/v1 route answers
            // 401 and an open one its own answer; never the 405 of a wrong
            // method or the 404 of an unknown route.
            let concrete = path
                .replace("{historyId}", "1")
                .replace('{', "")
                .replace("jobId}", "00000000-0000-7000-8000-00000000000a")
                .replace("taskId}", "00000000-0000-7000-8000-00000000000b")
                .replace("nodeId}", "00000000-0000-7000-8000-00000000000c");
            let method: reqwest::Method = m.to_uppercase().parse().expect("method");
            let mut req = no_redirects.request(method, format!("{}{concrete}", api.base));
            if op.get("requestBody").is_some() {
                req = req.json(&serde_json::json!({}));
            }
            if path == "/api/v1/events/stream" {
                // Endless when it works; the status is enough.
                req = req.timeout(std::time::Duration::from_secs(5));
            }
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let routed = match status {
                405 => false,
                404 => {
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    body["error"]["message"] != "route not found"
                }
                _ => true,
            };
            if !routed {
                problems.push(format!(
                    "{m} {path}: documented, but the router answers {status}"
                ));
            } else if path.starts_with("/api/v1/") && status != 401 {
                problems.push(format!("{m} {path}: answered {status} without a key"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The error codes: exactly those the api answers.
    let error = resolve(&doc, &doc["components"]["schemas"]["Error"]);
    let detail = resolve(&doc, &error["properties"]["error"]);
    let codes: BTreeSet<&str> = detail["properties"]["code"]["enum"]
        .as_array()
        .expect("error code enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(codes, ERROR_CODES.iter().copied().collect::<BTreeSet<_>>());

    // The submit body is closed (unknown fields answer 422), and needs
    // jobName and command.
    let body = resolve(
        &doc,
        &doc["paths"]["/api/v1/jobs/submit"]["post"]["requestBody"],
    );
    let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);
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
    // The limits the handlers enforce are in it.
    let props = &schema["properties"];
    assert_eq!(props["jobName"]["maxLength"], 200);
    assert_eq!(props["command"]["maxLength"], 65536);
    assert_eq!(props["description"]["maxLength"], 2000);
    assert_eq!(props["timeoutSeconds"]["maximum"], 604_800);
    assert_eq!(props["priority"]["maximum"], 9);
    assert_eq!(props["env"]["maxProperties"], 100);
    let target = resolve(&doc, &doc["components"]["schemas"]["TargetRequest"]);
    assert_eq!(
        target["properties"]["nodeGroup"]["pattern"],
        "^[a-z0-9][a-z0-9_-]{0,63}$"
    );
    assert!(
        target.get("not").is_some(),
        "nodeId excludes nodeGroup and nodeRole: {target}"
    );

    // The page that renders it, with its files served here.
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
    for (file, want) in [
        ("docs/swagger-ui-bundle.js", "text/javascript"),
        ("docs/swagger-ui.css", "text/css"),
        ("docs/docs.js", "text/javascript"),
    ] {
        assert!(page.contains(file), "/docs does not load {file}");
        let resp = api
            .http
            .get(format!("{}/{file}", api.base))
            .send()
            .await
            .expect("asset");
        assert_eq!(resp.status().as_u16(), 200, "{file}");
        assert!(
            content_type(&resp).starts_with(want),
            "{file}: {}",
            content_type(&resp)
        );
        let cache = resp
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            cache.contains("max-age="),
            "{file}: cache-control {cache:?}"
        );
    }
    let resp = api
        .http
        .get(format!("{}/docs/nothing.js", api.base))
        .send()
        .await
        .expect("missing asset");
    assert_eq!(resp.status().as_u16(), 404);
    let script = api
        .http
        .get(format!("{}/docs/docs.js", api.base))
        .send()
        .await
        .expect("docs.js")
        .text()
        .await
        .expect("docs.js text");
    assert!(
        script.contains("openapi.json"),
        "/docs does not load openapi.json"
    );

    env.cleanup().await;
}
