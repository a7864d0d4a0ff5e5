//! Client verbs: talk to a running api over HTTP.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

/// Where the api is and which key to use.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Conn {
    /// API base URL.
    #[arg(long, env = "TASKHOST_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (create one with `taskhost keys create`).
    #[arg(long, env = "TASKHOST_API_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl Conn {
    /// The key, or an error that says both ways to give one.
    fn key(&self) -> anyhow::Result<&str> {
        self.key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no API key: pass --key KEY or set TASKHOST_API_KEY \
                 (an admin creates one with `taskhost keys create --user NAME --roles ...`)"
                )
            })
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    conn: Conn,
    /// The shell command (or `noop` / `diagnostics` with --mode inline).
    #[arg(long, short = 'c')]
    command: String,
    /// Job name.
    #[arg(long, default_value = "cli")]
    name: String,
    /// Description.
    #[arg(long)]
    description: Option<String>,
    /// pool, background or inline.
    #[arg(long)]
    mode: Option<String>,
    /// Seconds before the job is killed.
    #[arg(long)]
    timeout: Option<i64>,
    /// 0 (lowest) to 9.
    #[arg(long)]
    priority: Option<i64>,
    /// Run on this node id.
    #[arg(long)]
    node_id: Option<String>,
    /// Run on a node of this group.
    #[arg(long)]
    group: Option<String>,
    /// Run on a node of this role.
    #[arg(long)]
    role: Option<String>,
    /// one or all.
    #[arg(long)]
    fanout: Option<String>,
    /// NAME=VALUE, repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Idempotency-Key header.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the job to its end and print its output; exits with its code.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ResultsArgs {
    #[command(flatten)]
    conn: Conn,
    /// How many (1 to 1000).
    #[arg(long, default_value_t = 20)]
    max: u32,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Show one job as JSON.
    Get {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
    },
    /// Cancel a job wherever it runs.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
    },
    /// Delete a finished job's result.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
    },
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Sends a request and returns the JSON body, or an error with the api's
/// own message.
async fn call(req: reqwest::RequestBuilder, conn: &Conn) -> anyhow::Result<Value> {
    let resp =
        req.bearer_auth(conn.key()?).send().await.with_context(|| {
            format!("cannot reach the api at {} (--url, TASKHOST_URL)", conn.url)
        })?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{} {}", status.as_u16(), msg);
    }
    Ok(body)
}

fn url(conn: &Conn, path: &str) -> String {
    format!("{}/api/v1{path}", conn.url.trim_end_matches('/'))
}

pub(crate) async fn submit(a: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let mut env = BTreeMap::new();
    for pair in &a.env {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair}: expected NAME=VALUE"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut body = json!({ "jobName": a.name, "command": a.command });
    let opt = |v: &Option<String>| v.as_ref().map(|s| json!(s));
    for (k, v) in [
        ("description", opt(&a.description)),
        ("executionMode", opt(&a.mode)),
    ] {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    if let Some(t) = a.timeout {
        body["timeoutSeconds"] = json!(t);
    }
    if let Some(p) = a.priority {
        body["priority"] = json!(p);
    }
    if !env.is_empty() {
        body["env"] = json!(env);
    }
    let mut target = serde_json::Map::new();
    for (k, v) in [
        ("nodeId", &a.node_id),
        ("nodeGroup", &a.group),
        ("nodeRole", &a.role),
        ("fanout", &a.fanout),
    ] {
        if let Some(v) = v {
            target.insert(k.to_owned(), json!(v));
        }
    }
    if !target.is_empty() {
        body["target"] = Value::Object(target);
    }
    let client = http()?;
    let mut req = client.post(url(&a.conn, "/jobs/submit")).json(&body);
    if let Some(k) = &a.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = call(req, &a.conn).await?;
    let job_id = resp["jobId"].as_str().unwrap_or_default().to_owned();
    eprintln!("{}", resp["message"].as_str().unwrap_or("accepted"));
    outln!("{job_id}");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for(&client, &a.conn, &job_id).await
}

async fn wait_for(client: &reqwest::Client, conn: &Conn, job_id: &str) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let job = call(client.get(url(conn, &format!("/jobs/{job_id}"))), conn).await?;
        let status = job["status"].as_str().unwrap_or("unknown").to_owned();
        if status != last {
            eprintln!(
                "[{:>6.1}s] {job_id} {status}",
                started.elapsed().as_secs_f64()
            );
            last.clone_from(&status);
        }
        if matches!(
            status.as_str(),
            "succeeded" | "failed" | "timed_out" | "cancelled" | "dead"
        ) {
            if let Some(out) = job["output"].as_str() {
                print!("{out}");
            }
            if let Some(reason) = job["statusReason"].as_str() {
                eprintln!("{status}: {reason}");
            }
            let code = match status.as_str() {
                "succeeded" => 0,
                _ => job["exitCode"]
                    .as_i64()
                    .filter(|c| (1..=255).contains(c))
                    .unwrap_or(1) as u8,
            };
            return Ok(ExitCode::from(code));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn results(a: &ResultsArgs) -> anyhow::Result<ExitCode> {
    let client = http()?;
    let resp = call(
        client
            .get(url(&a.conn, "/jobs/results"))
            .query(&[("maxResults", a.max)]),
        &a.conn,
    )
    .await?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<36}  {:<10}  {:>4}  {:>8}  {:<20}  NAME",
        "JOB ID",
        "STATUS",
        "EXIT",
        "SECONDS",
        "COMPLETED"
    );
    for r in resp["results"].as_array().into_iter().flatten() {
        outln!(
            "{:<36}  {:<10}  {:>4}  {:>8}  {:<20}  {}",
            r["jobId"].as_str().unwrap_or("-"),
            r["status"].as_str().unwrap_or("-"),
            r["exitCode"]
                .as_i64()
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            r["runtime"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")),
            r["dateCompleted"]
                .as_str()
                .map_or("-", |d| d.get(..19).unwrap_or(d)),
            r["jobName"].as_str().unwrap_or("-"),
        );
    }
    eprintln!("{} result(s)", resp["count"]);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn job(cmd: &JobCommand) -> anyhow::Result<ExitCode> {
    let client = http()?;
    let resp = match cmd {
        JobCommand::Get { conn, id } => {
            call(client.get(url(conn, &format!("/jobs/{id}"))), conn).await?
        }
        JobCommand::Cancel { conn, id } => {
            call(client.post(url(conn, &format!("/jobs/{id}/cancel"))), conn).await?
        }
        JobCommand::Delete { conn, id } => {
            call(client.delete(url(conn, &format!("/jobs/{id}"))), conn).await?
        }
    };
    match cmd {
        JobCommand::Get { .. } => outln!("{}", serde_json::to_string_pretty(&resp)?),
        _ => eprintln!("{}", resp["message"].as_str().unwrap_or("done")),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// List recurring tasks with their next run.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a recurring task.
    Create(Box<TaskCreateArgs>),
    /// Run a task now.
    Run {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
    },
    /// Show a task's runs, newest first.
    History {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct TaskCreateArgs {
    #[command(flatten)]
    conn: Conn,
    /// Task name (unique within its app).
    #[arg(long)]
    name: String,
    /// The command.
    #[arg(long, short = 'c')]
    command: String,
    /// Cron pattern: 5 or 6 fields, or @hourly, @daily, ...
    #[arg(long)]
    schedule: String,
    /// IANA timezone of the schedule.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// Run on nodes of this group.
    #[arg(long)]
    group: Option<String>,
    /// Run on nodes of this role.
    #[arg(long)]
    role: Option<String>,
    /// Run on this node id.
    #[arg(long)]
    node_id: Option<String>,
    /// one (default) or all.
    #[arg(long)]
    fanout: Option<String>,
    /// pool, background or inline.
    #[arg(long)]
    mode: Option<String>,
    /// Seconds before a run is killed.
    #[arg(long)]
    timeout: Option<i64>,
    /// Retries of a failed run.
    #[arg(long)]
    max_retries: Option<i64>,
    /// First retry delay in seconds (doubled per retry).
    #[arg(long)]
    retry_delay: Option<i64>,
    /// App the task belongs to.
    #[arg(long)]
    app: Option<String>,
}

pub(crate) async fn tasks(cmd: &TasksCommand) -> anyhow::Result<ExitCode> {
    let client = http()?;
    match cmd {
        TasksCommand::List { conn } => {
            let resp = call(client.get(url(conn, "/tasks")), conn).await?;
            outln!(
                "{:<36}  {:<24}  {:<16}  {:<20}  {:<22}  TARGET",
                "TASK ID",
                "NAME",
                "SCHEDULE",
                "NEXT RUN",
                "LAST"
            );
            for t in resp["tasks"].as_array().into_iter().flatten() {
                let target = [
                    ("node", &t["assignedNodeId"]),
                    ("group", &t["assignedNodeGroup"]),
                    ("role", &t["assignedNodeRole"]),
                ]
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
                .chain(std::iter::once(format!(
                    "fanout={}",
                    t["fanout"].as_str().unwrap_or("one")
                )))
                .collect::<Vec<_>>()
                .join(" ");
                outln!(
                    "{:<36}  {:<24}  {:<16}  {:<20}  {:<22}  {}{}",
                    t["taskId"].as_str().unwrap_or("-"),
                    t["taskName"].as_str().unwrap_or("-"),
                    t["schedule"].as_str().unwrap_or("-"),
                    t["nextRun"]
                        .as_str()
                        .map_or("-", |d| d.get(..19).unwrap_or(d)),
                    t["lastState"].as_str().unwrap_or("-"),
                    target,
                    if t["enabled"] == json!(false) {
                        " (disabled)"
                    } else {
                        ""
                    },
                );
            }
        }
        TasksCommand::Create(a) => {
            let mut body = json!({
                "taskName": a.name, "command": a.command, "schedule": a.schedule, "timezone": a.timezone,
            });
            for (k, v) in [
                ("assignedNodeGroup", &a.group),
                ("assignedNodeRole", &a.role),
                ("assignedNodeId", &a.node_id),
                ("fanout", &a.fanout),
                ("executionMode", &a.mode),
                ("appName", &a.app),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            for (k, v) in [
                ("timeoutSeconds", a.timeout),
                ("maxRetries", a.max_retries),
                ("retryDelaySeconds", a.retry_delay),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let resp = call(client.post(url(&a.conn, "/tasks")).json(&body), &a.conn).await?;
            eprintln!(
                "created task {}; next run {}",
                resp["task"]["taskName"].as_str().unwrap_or("-"),
                resp["task"]["nextRun"].as_str().unwrap_or("-")
            );
            outln!("{}", resp["taskId"].as_str().unwrap_or_default());
        }
        TasksCommand::Run { conn, id } => {
            let resp = call(client.post(url(conn, &format!("/tasks/{id}/run"))), conn).await?;
            eprintln!("{}", resp["message"].as_str().unwrap_or("queued"));
            outln!("{}", resp["jobId"].as_str().unwrap_or_default());
        }
        TasksCommand::History { conn, id } => {
            let resp = call(client.get(url(conn, &format!("/tasks/{id}/history"))), conn).await?;
            outln!(
                "{:<36}  {:>7}  {:<10}  {:>4}  {:<20}  ENDED",
                "JOB ID",
                "ATTEMPT",
                "STATE",
                "EXIT",
                "NODE"
            );
            for h in resp["history"].as_array().into_iter().flatten() {
                outln!(
                    "{:<36}  {:>7}  {:<10}  {:>4}  {:<20}  {}",
                    h["jobId"].as_str().unwrap_or("-"),
                    h["attempt"].as_i64().unwrap_or(0),
                    h["state"].as_str().unwrap_or("-"),
                    h["exitCode"]
                        .as_i64()
                        .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    h["nodeName"]
                        .as_str()
                        .or_else(|| h["nodeId"].as_str())
                        .unwrap_or("-"),
                    h["endTime"]
                        .as_str()
                        .map_or("-", |d| d.get(..19).unwrap_or(d)),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
