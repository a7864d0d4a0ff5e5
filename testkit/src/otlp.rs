//! An in-test OTLP/HTTP collector: `POST /v1/traces` with a JSON body
//! (what taskhost's exporter sends), every span kept with its service so a
//! test can check that one job's trace joins up across processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::task::JoinHandle;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// The `service.name` of its resource.
    pub service: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a trace's root.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// OTLP span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i64,
    /// Its attributes, each value as text.
    pub attributes: HashMap<String, String>,
}

impl Span {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running collector; stops when dropped.
pub struct Collector {
    /// `http://127.0.0.1:<port>`, for `telemetry.otlp_endpoint`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Listens on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            endpoint,
            spans,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits (up to `within`) until `done` holds for the spans received,
    /// and returns them; panics with what arrived otherwise.
    pub async fn wait_for(&self, within: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not get the spans in {within:?}; it got: {}",
                describe(&spans)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The chain of parents of `span` within `spans`, from `span` up to the
/// first span whose parent is not among them (the root, or a remote
/// parent such as the caller's traceparent).
pub fn ancestry<'a>(spans: &'a [Span], span: &'a Span) -> Vec<&'a Span> {
    let mut chain = vec![span];
    let mut current = span;
    while let Some(parent) = spans
        .iter()
        .find(|s| !current.parent_span_id.is_empty() && s.span_id == current.parent_span_id)
    {
        if chain.len() > 64 {
            break;
        }
        chain.push(parent);
        current = parent;
    }
    chain
}

/// One line per span, for failure messages.
pub fn describe(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "\n  {} {} trace={} span={} parent={} {:?}",
                s.service, s.name, s.trace_id, s.span_id, s.parent_span_id, s.attributes
            )
        })
        .collect()
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Span>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}");
    }
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "{}");
    };
    let mut received = Vec::new();
    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&rs["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                received.push(Span {
                    service: service.clone(),
                    trace_id: text(&s["traceId"]).to_lowercase(),
                    span_id: text(&s["spanId"]).to_lowercase(),
                    parent_span_id: text(&s["parentSpanId"]).to_lowercase(),
                    name: text(&s["name"]),
                    kind: s["kind"].as_i64().unwrap_or_default(),
                    attributes: attributes(&s["attributes"]),
                });
            }
        }
    }
    if let Ok(mut all) = spans.lock() {
        all.extend(received);
    }
    (StatusCode::OK, "{}")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// OTLP JSON attributes (`[{key, value: {stringValue | intValue | ...}}]`)
/// as text.
fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_owned();
            let value = kv["value"].as_object()?.values().next().map(text)?;
            Some((key, value))
        })
        .collect()
}
