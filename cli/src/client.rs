//! Client verbs: talk to a running api over HTTP.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

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
    pub(crate) fn key(&self) -> anyhow::Result<&str> {
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
    /// Follow the job to its end, printing its output as it comes; exits
    /// with its code.
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
    /// Show one job as a readable block (--json for the raw answer).
    Get {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's output; -f follows a running job until it ends.
    Logs {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
        /// Follow the output as it comes, until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only stderr.
        #[arg(long)]
        stderr: bool,
    },
    /// Run a job again with the same spec (a new job, linked to it).
    Rerun {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
        /// Follow the new job to its end, printing its output.
        #[arg(long)]
        wait: bool,
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

pub(crate) fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Sends a request and returns the JSON body, or an error with the api's
/// own message.
pub(crate) async fn call(req: reqwest::RequestBuilder, conn: &Conn) -> anyhow::Result<Value> {
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

pub(crate) fn url(conn: &Conn, path: &str) -> String {
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
    crate::console::wait_live(&a.conn, &job_id).await
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
    let mut t =
        crate::console::table(&["JOB ID", "STATUS", "EXIT", "SECONDS", "COMPLETED", "NAME"]);
    for r in resp["results"].as_array().into_iter().flatten() {
        t.add_row(vec![
            r["jobId"].as_str().unwrap_or("-").to_owned(),
            r["status"].as_str().unwrap_or("-").to_owned(),
            r["exitCode"]
                .as_i64()
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            r["runtime"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")),
            r["dateCompleted"]
                .as_str()
                .map_or("-", |d| d.get(..19).unwrap_or(d))
                .replace('T', " "),
            r["jobName"].as_str().unwrap_or("-").to_owned(),
        ]);
    }
    crate::console::print_table(&t);
    eprintln!("{} result(s)", resp["count"]);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn job(cmd: &JobCommand) -> anyhow::Result<ExitCode> {
    let client = http()?;
    match cmd {
        JobCommand::Get { conn, id, json } => {
            let resp = call(client.get(url(conn, &format!("/jobs/{id}"))), conn).await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&resp)?);
            } else {
                crate::console::print_job(&resp);
            }
        }
        JobCommand::Logs {
            conn,
            id,
            follow,
            stderr,
        } => return crate::console::logs(conn, id, *follow, *stderr).await,
        JobCommand::Rerun { conn, id, wait } => {
            return crate::console::rerun(conn, id, *wait).await;
        }
        JobCommand::Cancel { conn, id } => {
            let resp = call(client.post(url(conn, &format!("/jobs/{id}/cancel"))), conn).await?;
            eprintln!("{}", resp["message"].as_str().unwrap_or("done"));
        }
        JobCommand::Delete { conn, id } => {
            let resp = call(client.delete(url(conn, &format!("/jobs/{id}"))), conn).await?;
            eprintln!("{}", resp["message"].as_str().unwrap_or("done"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// List recurring tasks with their next run.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a recurring task.
    Create(Box<TaskCreateArgs>),
    /// Run a task now.
    Run {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
        /// A parameter value, NAME=VALUE (repeat for several); the others
        /// take their defaults.
        #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Show a task's runs, newest first, a page at a time.
    History {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
        /// Runs per page (1 to 500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Older than this page position (printed at the end of a page).
        #[arg(long)]
        before: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the tasks as a versioned task file (JSON) on stdout, e.g.
    /// `taskhost tasks export > tasks.json`.
    Export {
        #[command(flatten)]
        conn: Conn,
        /// Only this app's tasks.
        #[arg(long)]
        app: Option<String>,
    },
    /// Create or update the tasks of a task file by app and name.
    Import {
        #[command(flatten)]
        conn: Conn,
        /// The task file (`-` for stdin).
        file: String,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
    },
    #[command(flatten)]
    Control(crate::console::TaskControl),
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
        TasksCommand::List { conn, json } => {
            let resp = call(client.get(url(conn, "/tasks")), conn).await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&resp)?);
                return Ok(ExitCode::SUCCESS);
            }
            // Node names instead of ids.
            let nodes = call(client.get(url(conn, "/nodes")), conn)
                .await
                .unwrap_or(Value::Null);
            let node_name = |id: &str| -> String {
                nodes["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|n| n["nodeId"] == json!(id))
                    .and_then(|n| n["nodeName"].as_str())
                    .unwrap_or(id)
                    .to_owned()
            };
            let mut t = crate::console::table(&[
                "TASK ID", "NAME", "APP", "ENABLED", "SCHEDULE", "TIMEZONE", "NEXT RUN", "LAST",
                "TARGET",
            ]);
            let tasks = resp["tasks"].as_array().cloned().unwrap_or_default();
            for task in &tasks {
                let target = [
                    ("node", task["assignedNodeId"].as_str().map(node_name)),
                    (
                        "group",
                        task["assignedNodeGroup"].as_str().map(str::to_owned),
                    ),
                    ("role", task["assignedNodeRole"].as_str().map(str::to_owned)),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                .chain(std::iter::once(format!(
                    "fanout={}",
                    task["fanout"].as_str().unwrap_or("one")
                )))
                .collect::<Vec<_>>()
                .join(" ");
                t.add_row(vec![
                    task["taskId"].as_str().unwrap_or("-").to_owned(),
                    task["taskName"].as_str().unwrap_or("-").to_owned(),
                    task["appName"].as_str().unwrap_or("-").to_owned(),
                    if task["enabled"] == json!(false) {
                        "no"
                    } else {
                        "yes"
                    }
                    .to_owned(),
                    task["schedule"].as_str().unwrap_or("-").to_owned(),
                    task["timezone"].as_str().unwrap_or("UTC").to_owned(),
                    task["nextRun"]
                        .as_str()
                        .map_or("-", |d| d.get(..19).unwrap_or(d))
                        .replace('T', " "),
                    task["lastState"].as_str().unwrap_or("-").to_owned(),
                    target,
                ]);
            }
            crate::console::print_table(&t);
            eprintln!("{} task(s)", tasks.len());
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
        TasksCommand::Export { conn, app } => {
            let mut request = client.get(url(conn, "/tasks/export"));
            if let Some(app) = app {
                request = request.query(&[("app", app)]);
            }
            let resp = call(request, conn).await?;
            outln!("{}", serde_json::to_string_pretty(&resp)?);
            eprintln!(
                "exported {} task(s)",
                resp["tasks"].as_array().map_or(0, Vec::len)
            );
        }
        TasksCommand::Import {
            conn,
            file,
            dry_run,
        } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read {file}: {e}"))?
            };
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{file} is not JSON: {e}"))?;
            let resp = call(
                client
                    .post(url(conn, "/tasks/import"))
                    .query(&[("dryRun", dry_run.to_string())])
                    .json(&body),
                conn,
            )
            .await?;
            for t in resp["tasks"].as_array().into_iter().flatten() {
                let name = format!(
                    "{}/{}",
                    t["appName"].as_str().unwrap_or("-"),
                    t["taskName"].as_str().unwrap_or("-")
                );
                let changed: Vec<&str> = t["changed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                match t["action"].as_str() {
                    Some("created") => outln!("+ {name}"),
                    Some("updated") => outln!("~ {name}: {}", changed.join(", ")),
                    _ => outln!("= {name}"),
                }
            }
            eprintln!(
                "{}{} created, {} updated, {} unchanged",
                if *dry_run {
                    "dry run, nothing written: "
                } else {
                    ""
                },
                resp["created"],
                resp["updated"],
                resp["unchanged"]
            );
        }
        TasksCommand::Run { conn, id, params } => {
            let mut values = serde_json::Map::new();
            for p in params {
                let Some((name, value)) = p.split_once('=') else {
                    anyhow::bail!("--param `{p}`: give NAME=VALUE");
                };
                values.insert(name.trim().to_owned(), json!(value));
            }
            let resp = call(
                client
                    .post(url(conn, &format!("/tasks/{id}/run")))
                    .json(&json!({ "parameters": values })),
                conn,
            )
            .await?;
            eprintln!("{}", resp["message"].as_str().unwrap_or("queued"));
            outln!("{}", resp["jobId"].as_str().unwrap_or_default());
        }
        TasksCommand::History {
            conn,
            id,
            limit,
            before,
            json,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(b) = before {
                query.push(("before", b.clone()));
            }
            let resp = call(
                client
                    .get(url(conn, &format!("/tasks/{id}/history")))
                    .query(&query),
                conn,
            )
            .await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&resp)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = crate::console::table(&[
                "JOB ID", "ATTEMPT", "STATE", "EXIT", "NODE", "SECONDS", "ENDED",
            ]);
            let rows = resp["history"].as_array().cloned().unwrap_or_default();
            for h in &rows {
                t.add_row(vec![
                    h["jobId"].as_str().unwrap_or("-").to_owned(),
                    h["attempt"].as_i64().unwrap_or(0).to_string(),
                    h["state"].as_str().unwrap_or("-").to_owned(),
                    h["exitCode"]
                        .as_i64()
                        .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    h["nodeName"]
                        .as_str()
                        .or_else(|| h["nodeId"].as_str())
                        .unwrap_or("-")
                        .to_owned(),
                    h["durationMs"]
                        .as_f64()
                        .map_or_else(|| "-".to_owned(), |ms| format!("{:.3}", ms / 1000.0)),
                    h["endTime"]
                        .as_str()
                        .map_or("-", |d| d.get(..19).unwrap_or(d))
                        .replace('T', " "),
                ]);
            }
            crate::console::print_table(&t);
            match resp["nextBefore"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| resp["nextBefore"].as_i64().map(|n| n.to_string()))
            {
                Some(b) => eprintln!("{} run(s); older: --before {b}", rows.len()),
                None => eprintln!("{} run(s)", rows.len()),
            }
        }
        TasksCommand::Control(c) => return crate::console::task_control(c).await,
    }
    Ok(ExitCode::SUCCESS)
}
