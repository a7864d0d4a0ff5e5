//! Every process measurable (README, "Metrics, health and logs"): a worker
//! and a scheduler run on their own, without an api, serve `/livez`,
//! `/readyz` and `/metrics` on `worker.metrics_bind` and
//! `scheduler.metrics_bind`; the families an operator alerts on move as
//! jobs run; a stuck queue shows in them; a finished job logs one typed
//! line, failures at WARN; the api writes an access log line per request
//! with the key id and never the key.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskhost_common::model::Role;
use taskhost_testkit::{ChildGuard, TestEnv};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_taskhost");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The value of the series `name` whose labels include `labels`, from a
/// Prometheus text exposition.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.parse().ok())
}

async fn scrape(http: &reqwest::Client, port: u16) -> String {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

/// Waits until `/livez` of a child answers.
async fn wait_live(http: &reqwest::Client, port: u16, child: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/livez"))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            panic!("the child exited with {status} before serving /livez on {port}");
        }
        assert!(Instant::now() < deadline, "no /livez on port {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes until `check` holds (counters move as the runs are recorded).
async fn until_metrics(
    http: &reqwest::Client,
    port: u16,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(http, port).await;
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; last scrape:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish_job(env: &TestEnv, body: Value) -> Uuid {
    let id = Uuid::new_v4();
    env.publish_raw(
        &env.names().submit(),
        "submit",
        body.to_string().as_bytes(),
        Some("job.submit.v1"),
        Some(&id.to_string()),
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_scheduler_alone_serve_health_and_metrics() {
    let env = TestEnv::new().await;
    // The ingress accepts only users with a key.
    let _key = env.key("alice", &[Role::TaskManager]).await;
    let http = reqwest::Client::new();
    let (wport, sport) = (free_port(), free_port());
    let (wbind, sbind) = (format!("127.0.0.1:{wport}"), format!("127.0.0.1:{sport}"));
    let node = format!("{}-obs", env.names().prefix());
    let mut scheduler = ChildGuard(env.spawn_binary(
        BIN,
        &["scheduler"],
        &[("TASKHOST__SCHEDULER__METRICS_BIND", &sbind)],
    ));
    let mut worker = ChildGuard(env.spawn_binary(
        BIN,
        &["worker"],
        &[
            ("TASKHOST__WORKER__METRICS_BIND", &wbind),
            ("TASKHOST__WORKER__NODE_NAME", &node),
            ("TASKHOST__WORKER__CONCURRENCY", "1"),
        ],
    ));
    wait_live(&http, sport, &mut scheduler).await;
    wait_live(&http, wport, &mut worker).await;

    // Ready, naming each dependency it checked.
    for (port, component) in [(wport, "worker"), (sport, "scheduler")] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let body: Value = loop {
            let r = http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .expect("readyz");
            let (status, body) = (r.status(), r.json::<Value>().await.expect("json"));
            if status == 200 {
                break body;
            }
            assert!(Instant::now() < deadline, "{component} never ready: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(body["component"], component, "{body}");
        assert_eq!(body["checks"]["database"], "up", "{body}");
        assert_eq!(body["checks"]["broker"], "up", "{body}");
    }

    // Every (mode, state) series exists before the first run, at zero.
    let text = scrape(&http, wport).await;
    for state in ["succeeded", "failed", "timed_out", "cancelled", "dead"] {
        assert_eq!(
            metric(
                &text,
                "taskhost_jobs_finished_total",
                &[("mode", "pool"), ("state", state)]
            ),
            Some(0.0),
            "{state} at zero before any run:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, "taskhost_worker_slots", &[("kind", "pool")]),
        Some(1.0)
    );

    // Work submitted over the queue (no api anywhere): one job succeeds,
    // one fails, one is refused.
    let ok = publish_job(
        &env,
        json!({"userId": "alice", "jobName": "obs-ok", "command": "echo hi"}),
    )
    .await;
    let bad = publish_job(
        &env,
        json!({"userId": "alice", "jobName": "obs-bad", "command": "exit 3"}),
    )
    .await;
    publish_job(
        &env,
        json!({"userId": "nobody-has-this", "jobName": "x", "command": "true"}),
    )
    .await;
    assert_eq!(
        env.wait_terminal(ok, Duration::from_secs(30)).await,
        "succeeded"
    );
    assert_eq!(
        env.wait_terminal(bad, Duration::from_secs(30)).await,
        "failed"
    );

    let text = until_metrics(&http, wport, "the worker counted both runs", |t| {
        metric(
            t,
            "taskhost_jobs_finished_total",
            &[("mode", "pool"), ("state", "failed")],
        ) == Some(1.0)
            && metric(
                t,
                "taskhost_jobs_finished_total",
                &[("mode", "pool"), ("state", "succeeded")],
            ) == Some(1.0)
    })
    .await;
    assert_eq!(
        metric(&text, "taskhost_jobs_started_total", &[("mode", "pool")]),
        Some(2.0),
        "{text}"
    );
    for family in [
        "taskhost_job_run_duration_seconds_count",
        "taskhost_job_queue_wait_seconds_count",
    ] {
        assert_eq!(
            metric(&text, family, &[("mode", "pool"), ("state", "failed")]),
            Some(1.0),
            "{family}:\n{text}"
        );
    }
    assert!(
        text.contains("taskhost_job_run_duration_seconds_bucket{"),
        "a histogram with buckets:\n{text}"
    );
    assert!(
        metric(
            &text,
            "taskhost_job_output_bytes_total",
            &[("stream", "stdout")]
        )
        .is_some_and(|b| b >= 3.0),
        "`hi\\n` counted:\n{text}"
    );
    assert_eq!(
        metric(&text, "taskhost_worker_slots_busy", &[("kind", "pool")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "taskhost_broker_connected",
            &[("component", "worker")]
        ),
        Some(1.0)
    );

    let text = until_metrics(&http, sport, "the scheduler counted its work", |t| {
        metric(t, "taskhost_jobs_submitted_total", &[("source", "queue")]) == Some(2.0)
            && metric(t, "taskhost_dead_letters_total", &[("queue", "submit")]) == Some(1.0)
            // The change relay's cursor exists once it has passed once.
            && metric(t, "taskhost_change_feed_lag", &[("consumer", "events")]).is_some()
            // The publisher marks confirmed jobs 0.1 s after the confirm.
            && metric(t, "taskhost_outbox_pending", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        metric(&text, "taskhost_relay_lag_seconds", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "taskhost_nodes",
            &[("group", "default"), ("state", "active")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "taskhost_scheduler_fires_total", &[]),
        Some(0.0),
        "{text}"
    );
    let last_pass = metric(&text, "taskhost_scheduler_last_pass_timestamp_seconds", &[])
        .unwrap_or_else(|| panic!("no last pass:\n{text}"));
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - last_pass).abs() < 30.0,
        "a recent pass: {last_pass} vs {now}"
    );

    // A task firing every second: the scheduler counts its fires and how
    // late each was created.
    let request: taskhost_common::tasks::TaskRequest = serde_json::from_value(json!({
        "taskName": "obs-every-second", "command": "true", "schedule": "* * * * * *"
    }))
    .expect("a task request");
    let task = taskhost_common::tasks::create(&env.pool, request, "alice")
        .await
        .expect("create the task");
    let text = until_metrics(&http, sport, "the task's fires", |t| {
        metric(t, "taskhost_scheduler_fires_total", &[]).is_some_and(|n| n >= 2.0)
    })
    .await;
    let fires = metric(&text, "taskhost_scheduler_fires_total", &[]).unwrap_or_default();
    assert_eq!(
        metric(&text, "taskhost_scheduler_tick_lateness_seconds_count", &[]),
        Some(fires),
        "one lateness observation per fire:\n{text}"
    );
    assert!(
        metric(
            &text,
            "taskhost_jobs_submitted_total",
            &[("source", "schedule")]
        )
        .is_some_and(|n| n >= fires),
        "task runs count as submitted:\n{text}"
    );
    taskhost_common::tasks::delete(&env.pool, task.task_id, "alice")
        .await
        .expect("delete the task");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status IN ('pending', 'queued', 'running')",
        )
        .fetch_one(&env.pool)
        .await
        .expect("count");
        if unfinished == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the task's runs never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A stuck queue: the one slot is held by a long job and work piles up
    // in the broker, which the worker reports every heartbeat.
    let long = publish_job(
        &env,
        json!({"userId": "alice", "jobName": "obs-long", "command": "sleep 30"}),
    )
    .await;
    env.wait_status(long, "running", Duration::from_secs(20))
        .await;
    for n in 0..3 {
        publish_job(
            &env,
            json!({"userId": "alice", "jobName": format!("obs-wait-{n}"), "command": "true"}),
        )
        .await;
    }
    let queue = env.names().work_queue("any");
    let text = until_metrics(&http, wport, "the queue's backlog in the metrics", |t| {
        metric(t, "taskhost_queue_messages_ready", &[("queue", &queue)]) == Some(3.0)
    })
    .await;
    assert_eq!(
        metric(&text, "taskhost_worker_slots_busy", &[("kind", "pool")]),
        Some(1.0),
        "{text}"
    );

    // Draining, the worker says it takes no more work.
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let body: Value = loop {
        let r = http
            .get(format!("http://127.0.0.1:{wport}/readyz"))
            .send()
            .await
            .expect("readyz while draining");
        let (status, body) = (r.status(), r.json::<Value>().await.expect("json"));
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still ready while draining: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["checks"]["accepting work"], "down", "{body}");
    assert!(
        body["down"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "accepting work")),
        "{body}"
    );
    drop(worker);
    drop(scheduler);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_worker_with_the_setting_named() {
    let env = TestEnv::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let bind = taken.local_addr().expect("addr").to_string();
    let node = format!("{}-taken", env.names().prefix());
    let out = tokio::process::Command::new(BIN)
        .arg("worker")
        .envs(env.env())
        .env("TASKHOST__WORKER__METRICS_BIND", &bind)
        .env("TASKHOST__WORKER__NODE_NAME", &node)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the worker stops at once")
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("worker.metrics_bind") && stderr.contains(&bind),
        "the message names the setting and the address:\n{stderr}"
    );
    env.cleanup().await;
}

/// The JSON lines of a log file that satisfy `pick`.
fn log_lines(path: &std::path::Path, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| pick(v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_and_requests_log_one_typed_line_each() {
    let env = TestEnv::new().await;
    let key = env.key("alice", &[Role::TaskManager]).await;
    let key_id: Uuid = sqlx::query_scalar("SELECT key_id FROM api_keys WHERE user_id = 'alice'")
        .fetch_one(&env.pool)
        .await
        .expect("key id");
    let dir = std::env::temp_dir().join(format!("{}-logs", env.names().prefix()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let (api_log, worker_log) = (dir.join("api.log"), dir.join("worker.log"));
    let json_logs = [
        ("TASKHOST__LOG__FORMAT", "json"),
        ("TASKHOST__LOG__LEVEL", "info,sqlx=warn,lapin=warn"),
    ];
    let (_api_child, api) = env.spawn_api_logged(BIN, &json_logs, &api_log).await;
    let node = format!("{}-logs", env.names().prefix());
    let mut worker_env = json_logs.to_vec();
    worker_env.push(("TASKHOST__WORKER__NODE_NAME", &node));
    let _worker = ChildGuard(env.spawn_binary_logged(BIN, &["worker"], &worker_env, &worker_log));
    env.wait_node(&node).await;

    let submit = |name: &str, command: &str| {
        let body = json!({"jobName": name, "command": command});
        let (api, key) = (&api, &key);
        async move {
            let (status, body) = taskhost_testkit::submit(api, key, &body).await;
            assert_eq!(status, 202, "{body}");
            taskhost_testkit::job_id(&body)
        }
    };
    let ok = submit("log-ok", "true").await;
    let failed = submit("log-failed", "exit 3").await;
    let timed_out = taskhost_testkit::submit(
        &api,
        &key,
        &json!({"jobName": "log-timeout", "command": "sleep 5", "timeoutSeconds": 1}),
    )
    .await;
    assert_eq!(timed_out.0, 202, "{}", timed_out.1);
    let timed_out = taskhost_testkit::job_id(&timed_out.1);
    for id in [ok, failed, timed_out] {
        env.wait_terminal(id, Duration::from_secs(30)).await;
    }
    let missing = Uuid::now_v7();
    let (status, _) = taskhost_testkit::get(&api, &key, &format!("/jobs/{missing}")).await;
    assert_eq!(status, 404);

    // One line per finished job, typed, at the level its end deserves.
    let deadline = Instant::now() + Duration::from_secs(10);
    let runs = loop {
        let runs = log_lines(&worker_log, |v| v["message"] == "job finished");
        if runs.len() >= 3 || Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let line = |id: Uuid| {
        runs.iter()
            .find(|v| v["job_id"] == id.to_string())
            .unwrap_or_else(|| panic!("no `job finished` line for {id} in {runs:?}"))
            .clone()
    };
    let ok_line = line(ok);
    assert_eq!(ok_line["level"], "INFO", "{ok_line}");
    assert_eq!(ok_line["job_name"], "log-ok");
    assert_eq!(ok_line["user_id"], "alice");
    assert_eq!(ok_line["node"], node.as_str());
    assert_eq!(ok_line["state"], "succeeded");
    assert_eq!(ok_line["exit_code"], 0, "a number: {ok_line}");
    assert!(ok_line["duration_ms"].is_u64(), "a number: {ok_line}");
    let failed_line = line(failed);
    assert_eq!(failed_line["level"], "WARN", "{failed_line}");
    assert_eq!(failed_line["state"], "failed");
    assert_eq!(failed_line["exit_code"], 3, "a number: {failed_line}");
    assert_eq!(failed_line["reason"], "exited with code 3");
    let timeout_line = line(timed_out);
    assert_eq!(timeout_line["level"], "WARN", "{timeout_line}");
    assert_eq!(timeout_line["state"], "timed_out");

    // The access log: route template, status and latency as numbers, the
    // key's id, and never the key itself.
    let access = log_lines(&api_log, |v| v["target"] == "taskhost_api::access");
    let submits: Vec<&Value> = access
        .iter()
        .filter(|v| v["route"] == "/api/v1/jobs/submit")
        .collect();
    assert_eq!(submits.len(), 3, "one line per submit: {access:?}");
    let s = submits[0];
    assert_eq!(s["status"], 202, "{s}");
    assert_eq!(s["method"], "POST");
    assert!(s["latency_ms"].is_f64(), "{s}");
    assert_eq!(s["key_id"], key_id.to_string(), "{s}");
    let lookup = access
        .iter()
        .find(|v| v["route"] == "/api/v1/jobs/{jobId}")
        .unwrap_or_else(|| panic!("no line for the lookup: {access:?}"));
    assert_eq!(lookup["status"], 404, "{lookup}");
    let whole = std::fs::read_to_string(&api_log).expect("api log");
    assert!(!whole.contains(&key), "the key reached the log");
    assert!(
        !whole.to_lowercase().contains("bearer"),
        "an Authorization header reached the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

/// The "Done when" of observability: a real Prometheus scrapes a worker and
/// a scheduler running alone (no api) and the stuck-queue alert of
/// `docs/prometheus/alerts.yml` fires. The rules are the committed ones with
/// their windows shortened (5m → 10s, `for` → 0s) so this takes seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_worker_and_a_scheduler_fires_the_stuck_queue_alert() {
    // scripts/test sets this only when it was not allowed to install
    // Prometheus, and says so.
    if std::env::var_os("TASKHOST_TEST_SKIP_PROMETHEUS").is_some() {
        eprintln!("SKIPPED: prometheus is not installed (scripts/test --install)");
        return;
    }
    let env = TestEnv::new().await;
    let _key = env.key("alice", &[Role::TaskManager]).await;
    let http = reqwest::Client::new();
    let (wport, sport, pport) = (free_port(), free_port(), free_port());
    let node = format!("{}-prom", env.names().prefix());
    let mut scheduler = ChildGuard(env.spawn_binary(
        BIN,
        &["scheduler"],
        &[(
            "TASKHOST__SCHEDULER__METRICS_BIND",
            &format!("127.0.0.1:{sport}"),
        )],
    ));
    let mut worker = ChildGuard(env.spawn_binary(
        BIN,
        &["worker"],
        &[
            (
                "TASKHOST__WORKER__METRICS_BIND",
                &format!("127.0.0.1:{wport}"),
            ),
            ("TASKHOST__WORKER__NODE_NAME", &node),
            ("TASKHOST__WORKER__CONCURRENCY", "1"),
        ],
    ));
    wait_live(&http, sport, &mut scheduler).await;
    wait_live(&http, wport, &mut worker).await;

    let dir = std::env::temp_dir().join(format!("{}-prometheus", env.names().prefix()));
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/prometheus/alerts.yml"
    ))
    .expect("docs/prometheus/alerts.yml");
    let rules = rules
        .replace("[5m]", "[10s]")
        .replace("[10m]", "[10s]")
        .replace("[15m]", "[10s]")
        .replace("for: 10m", "for: 0s")
        .replace("for: 2m", "for: 0s");
    std::fs::write(dir.join("alerts.yml"), rules).expect("write rules");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [alerts.yml]\n\
         scrape_configs:\n\
         \x20 - job_name: taskhost-scheduler\n\
         \x20   static_configs: [{{targets: [\"127.0.0.1:{sport}\"]}}]\n\
         \x20 - job_name: taskhost-worker\n\
         \x20   static_configs: [{{targets: [\"127.0.0.1:{wport}\"]}}]\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
    let _prometheus = ChildGuard(
        std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian: apt-get install prometheus)"),
    );

    // The one slot is taken by a long job; two more wait in the broker.
    let long = publish_job(
        &env,
        json!({"userId": "alice", "jobName": "prom-long", "command": "sleep 60"}),
    )
    .await;
    env.wait_status(long, "running", Duration::from_secs(20))
        .await;
    for n in 0..2 {
        publish_job(
            &env,
            json!({"userId": "alice", "jobName": format!("prom-wait-{n}"), "command": "true"}),
        )
        .await;
    }

    let alerts = |body: &Value, name: &str, state: &str| {
        body["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["labels"]["alertname"] == name && x["state"] == state)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        let body: Value = match http
            .get(format!("http://127.0.0.1:{pport}/api/v1/alerts"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        if alerts(&body, "TaskhostQueueStuck", "firing") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "TaskhostQueueStuck never fired; alerts: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The rules read real series: the scheduler passes and the worker's
    // group has a node, so those alerts stay quiet.
    assert!(
        !alerts(&body, "TaskhostSchedulerNotFiring", "firing"),
        "{body}"
    );
    assert!(
        !alerts(&body, "TaskhostNoWorkerForGroup", "firing"),
        "{body}"
    );
    drop(worker);
    drop(scheduler);
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}
