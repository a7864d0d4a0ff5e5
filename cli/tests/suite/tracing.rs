//! Tracing across the hop (README, "Tracing"): each `taskhost` process
//! exports its spans over OTLP/HTTP to an in-test collector, and one job's
//! trace shows the api (or the ingress), the broker hop and the worker's
//! run, whichever way the work message was published. Processes stop with
//! SIGTERM before the spans are checked, so the flush at shutdown is what
//! delivers the last of them.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use taskhost_common::messages::JOB_SUBMIT_V1;
use taskhost_common::model::Role;
use taskhost_testkit::otlp::{Collector, Span, ancestry, describe};
use taskhost_testkit::{Api, ChildGuard, TestEnv, job_id};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

/// A fresh trace id and the caller's span id, as a client would send them.
fn caller_context() -> (String, String) {
    let trace = Uuid::new_v4().simple().to_string();
    let span = Uuid::new_v4().simple().to_string()[..16].to_owned();
    (trace, span)
}

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// `POST /jobs/submit` with a `traceparent` header; returns the job id.
async fn submit_traced(api: &Api, key: &str, traceparent: &str, command: &str) -> Uuid {
    let resp = api
        .http
        .post(api.v1("/jobs/submit"))
        .bearer_auth(key)
        .header("traceparent", traceparent)
        .header("tracestate", "caller=1")
        .json(&json!({"jobName": "traced", "command": command}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status().as_u16(), 202);
    job_id(&resp.json().await.expect("json"))
}

/// Stops a child with SIGTERM and waits for it: a graceful shutdown, which
/// exports the spans still buffered.
async fn stop(mut child: ChildGuard) {
    child.signal(Signal::SIGTERM);
    let status = child.wait_exit(Duration::from_secs(45)).await;
    assert!(status.success(), "stopped with SIGTERM: {status:?}");
}

/// The one span of `trace` from `service` named `name`.
fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span from {service}; the trace has: {}",
        describe(spans)
    );
    found[0]
}

/// The worker's run span of `job`, checked, with its parent chain up to
/// the caller's span.
fn check_run<'a>(spans: &'a [Span], job: Uuid, env: &TestEnv) -> &'a Span {
    let run = one(spans, "taskhost-worker", "job.run");
    let id = job.to_string();
    assert_eq!(run.kind, 5, "a consumer span: {run:?}");
    assert_eq!(run.attr("job.id"), Some(id.as_str()), "{run:?}");
    assert_eq!(run.attr("job.state"), Some("succeeded"), "{run:?}");
    assert_eq!(run.attr("job.attempt"), Some("1"), "{run:?}");
    assert_eq!(run.attr("job.mode"), Some("pool"), "{run:?}");
    assert_eq!(run.attr("messaging.system"), Some("rabbitmq"), "{run:?}");
    assert_eq!(run.attr("messaging.message.id"), Some(id.as_str()));
    assert_eq!(
        run.attr("messaging.destination.name"),
        Some(env.names().work().as_str())
    );
    run
}

/// The api's submit span and its publish span, checked: the submit span is
/// the caller's child, the publish span the submit span's.
fn check_api<'a>(
    spans: &'a [Span],
    job: Uuid,
    caller: &str,
    env: &TestEnv,
) -> (&'a Span, &'a Span) {
    let id = job.to_string();
    let submit = one(spans, "taskhost-api", "job.submit");
    assert_eq!(submit.kind, 2, "a server span: {submit:?}");
    assert_eq!(submit.parent_span_id, caller, "the caller's child");
    assert_eq!(submit.attr("job.id"), Some(id.as_str()));
    assert_eq!(submit.attr("job.name"), Some("traced"));
    assert_eq!(submit.attr("http.response.status_code"), Some("202"));
    let publish = one(
        spans,
        "taskhost-api",
        &format!("publish {}", env.names().work()),
    );
    assert_eq!(publish.kind, 4, "a producer span: {publish:?}");
    assert_eq!(publish.parent_span_id, submit.span_id);
    assert_eq!(publish.attr("messaging.message.id"), Some(id.as_str()));
    assert_eq!(
        publish.attr("messaging.rabbitmq.destination.routing_key"),
        Some("any")
    );
    (submit, publish)
}

/// A worker child exporting to `collector`, once its node is registered.
async fn traced_worker(env: &TestEnv, otel: &[(&str, &str)]) -> ChildGuard {
    let name = format!("{}-traced", env.prefix);
    let worker = ChildGuard(env.spawn_binary(BIN, &["worker", "--node-name", &name], otel));
    env.wait_node(&name).await;
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_job_with_a_traceparent_is_one_trace_from_the_api_to_the_worker_run() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    let otel = [(
        "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
        collector.endpoint.as_str(),
    )];
    let (api_child, api) = env.spawn_api(BIN, &otel).await;
    let worker = traced_worker(&env, &otel).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (trace, caller) = caller_context();
    let job = submit_traced(&api, &key, &traceparent(&trace, &caller), "echo traced").await;
    assert_eq!(
        env.wait_terminal(job, Duration::from_secs(30)).await,
        "succeeded"
    );
    stop(worker).await;
    stop(api_child).await;

    let spans = collector
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|s| s.trace_id == trace && s.name == "job.run")
        })
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
    let (submit, publish) = check_api(&spans, job, &caller, &env);
    let run = check_run(&spans, job, &env);
    // The hop: the run is the child of the api's publish span.
    assert_eq!(run.parent_span_id, publish.span_id, "{}", describe(&spans));
    let chain: Vec<&str> = ancestry(&spans, run)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let top = ancestry(&spans, run).last().map(|s| s.span_id.clone());
    assert_eq!(top.as_deref(), Some(submit.span_id.as_str()), "{chain:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_outbox_relay_publishes_keeps_its_trace() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    let otel = [(
        "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
        collector.endpoint.as_str(),
    )];
    let mut api_env = otel.to_vec();
    api_env.push(("TASKHOST_FAILPOINTS", "api.submit.skip_publish=skip"));
    let (api_child, api) = env.spawn_api(BIN, &api_env).await;
    let worker = traced_worker(&env, &otel).await;
    let key = env.key("alice", &[Role::TaskManager]).await;

    let (trace, caller) = caller_context();
    let job = submit_traced(&api, &key, &traceparent(&trace, &caller), "echo relayed").await;
    // The api left the message in the outbox, with the trace on its row.
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox WHERE job_id = $1")
            .bind(job)
            .fetch_one(&env.pool)
            .await
            .expect("outbox row");
    assert!(
        stored
            .as_deref()
            .is_some_and(|t| t.starts_with(&format!("00-{trace}-"))),
        "outbox.traceparent {stored:?}"
    );
    let scheduler = ChildGuard(env.spawn_binary(BIN, &["scheduler"], &otel));
    assert_eq!(
        env.wait_terminal(job, Duration::from_secs(30)).await,
        "succeeded"
    );
    stop(worker).await;
    stop(scheduler).await;
    stop(api_child).await;

    let spans = collector
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|s| s.trace_id == trace && s.name == "job.run")
        })
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
    let (submit, publish) = check_api(&spans, job, &caller, &env);
    let relay = one(
        &spans,
        "taskhost-scheduler",
        &format!("publish {}", env.names().work()),
    );
    assert_eq!(
        relay.attr("taskhost.outbox.relay"),
        Some("true"),
        "{relay:?}"
    );
    assert_eq!(
        relay.parent_span_id,
        publish.span_id,
        "{}",
        describe(&spans)
    );
    let run = check_run(&spans, job, &env);
    assert_eq!(run.parent_span_id, relay.span_id, "{}", describe(&spans));
    let top = ancestry(&spans, run).last().map(|s| s.span_id.clone());
    assert_eq!(top.as_deref(), Some(submit.span_id.as_str()));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_from_the_ingress_queue_with_a_traceparent_joins_its_trace() {
    let env = TestEnv::new().await;
    let collector = Collector::start().await;
    let otel = [(
        "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
        collector.endpoint.as_str(),
    )];
    let scheduler = ChildGuard(env.spawn_binary(BIN, &["scheduler"], &otel));
    let worker = traced_worker(&env, &otel).await;
    env.key("alice", &[Role::TaskManager]).await;

    let (trace, caller) = caller_context();
    let job = Uuid::new_v4();
    let tp = traceparent(&trace, &caller);
    env.publish_raw_with_headers(
        &env.names().submit(),
        "submit",
        br#"{"userId":"alice","jobName":"q","command":"echo from-queue"}"#,
        Some(JOB_SUBMIT_V1),
        Some(&job.to_string()),
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!(
        env.wait_terminal(job, Duration::from_secs(30)).await,
        "succeeded"
    );
    stop(worker).await;
    stop(scheduler).await;

    let spans = collector
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|s| s.trace_id == trace && s.name == "job.run")
        })
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
    let id = job.to_string();
    let ingress = one(
        &spans,
        "taskhost-scheduler",
        &format!("process {}", env.names().submit()),
    );
    assert_eq!(ingress.kind, 5, "a consumer span: {ingress:?}");
    assert_eq!(ingress.parent_span_id, caller, "the publisher's child");
    assert_eq!(ingress.attr("messaging.message.id"), Some(id.as_str()));
    let publish = one(
        &spans,
        "taskhost-scheduler",
        &format!("publish {}", env.names().work()),
    );
    assert_eq!(publish.parent_span_id, ingress.span_id);
    let run = check_run(&spans, job, &env);
    assert_eq!(run.parent_span_id, publish.span_id, "{}", describe(&spans));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_no_trace_context_is_stored_or_sent() {
    // The in-process services of this test binary export nothing (no
    // endpoint): a caller's traceparent goes no further than the api.
    let mut env = TestEnv::new().await;
    let api = env.start_api().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (trace, caller) = caller_context();
    let job = submit_traced(&api, &key, &traceparent(&trace, &caller), "true").await;
    // No worker: the message waits in its queue to be read here.
    env.wait_status(job, "queued", Duration::from_secs(20))
        .await;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox WHERE job_id = $1")
            .bind(job)
            .fetch_one(&env.pool)
            .await
            .expect("outbox row");
    assert_eq!(stored, None);
    let msg = env
        .get_one(&env.names().work_queue("any"))
        .await
        .expect("the work message");
    assert!(
        msg.delivery.properties.headers().is_none(),
        "headers {:?}",
        msg.delivery.properties.headers()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fire_of_a_task_starts_a_trace_that_reaches_its_run() {
    let mut env = TestEnv::new().await;
    let collector = Collector::start().await;
    let otel = [(
        "TASKHOST__TELEMETRY__OTLP_ENDPOINT",
        collector.endpoint.as_str(),
    )];
    // The api only creates the task (in-process, not traced).
    let api = env.start_api().await;
    let scheduler = ChildGuard(env.spawn_binary(BIN, &["scheduler"], &otel));
    let worker = traced_worker(&env, &otel).await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let (status, resp) = taskhost_testkit::call(
        &api,
        reqwest::Method::POST,
        &key,
        "/tasks",
        Some(&json!({"taskName": "tick", "command": "true", "schedule": "* * * * * *"})),
    )
    .await;
    assert_eq!(status, 201, "{resp}");
    let task = resp["taskId"].as_str().expect("taskId").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job: Uuid = loop {
        let done: Option<Uuid> = sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE task_id = $1::uuid AND status = 'succeeded' LIMIT 1",
        )
        .bind(&task)
        .fetch_optional(&env.pool)
        .await
        .expect("jobs");
        if let Some(id) = done {
            break id;
        }
        assert!(std::time::Instant::now() < deadline, "the task never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop(worker).await;
    stop(scheduler).await;

    let id = job.to_string();
    let spans = collector
        .wait_for(Duration::from_secs(10), |s| {
            s.iter()
                .any(|s| s.name == "job.run" && s.attr("job.id") == Some(id.as_str()))
        })
        .await;
    let run = spans
        .iter()
        .find(|s| s.name == "job.run" && s.attr("job.id") == Some(id.as_str()))
        .expect("the run span");
    let fire = spans
        .iter()
        .find(|s| s.span_id == run.parent_span_id)
        .unwrap_or_else(|| panic!("the run's parent: {}", describe(&spans)));
    assert_eq!(fire.service, "taskhost-scheduler");
    assert_eq!(fire.name, "task.fire");
    assert_eq!(fire.parent_span_id, "", "a trace of its own: {fire:?}");
    assert_eq!(fire.trace_id, run.trace_id);
    assert_eq!(fire.attr("task.id"), Some(task.as_str()));
    assert_eq!(fire.attr("job.id"), Some(id.as_str()));
    // Another fire is another trace.
    let traces: std::collections::HashSet<&str> = spans
        .iter()
        .filter(|s| s.name == "task.fire")
        .map(|s| s.trace_id.as_str())
        .collect();
    let fires = spans.iter().filter(|s| s.name == "task.fire").count();
    assert_eq!(traces.len(), fires, "one trace per fire");
    env.cleanup().await;
}
