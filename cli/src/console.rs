//! Operator verbs: nodes, jobs across the system, one job as a readable
//! block, its output (followed live), re-runs, and task control. Every
//! listing has `--json` for scripts; tables are drawn by comfy-table.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use comfy_table::{Table, presets};
use serde_json::{Value, json};

use crate::client::{Conn, call, http, url};

/// A borderless table with a header row, as the other listings print.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    t
}

/// Prints a table line by line (so a closed pipe ends quietly).
pub(crate) fn print_table(t: &Table) {
    for line in t.to_string().lines() {
        outln!("{}", line.trim_end());
    }
}

fn text<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().unwrap_or(default)
}

/// `2026-11-30T17:01:02.123Z` → `2026-11-30 17:01:02`.
fn when(v: &Value) -> String {
    v.as_str().map_or_else(
        || "-".to_owned(),
        |d| d.get(..19).unwrap_or(d).replace('T', " "),
    )
}

fn print_json(v: &Value) -> anyhow::Result<ExitCode> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------ nodes

#[derive(Debug, clap::Args)]
pub(crate) struct NodesArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn nodes(a: &NodesArgs) -> anyhow::Result<ExitCode> {
    let resp = call(http()?.get(url(&a.conn, "/nodes")), &a.conn).await?;
    if a.json {
        return print_json(&resp);
    }
    let mut t = table(&[
        "NAME",
        "GROUP",
        "ROLE",
        "STATUS",
        "RUNNING",
        "SLOTS",
        "HEARTBEAT",
        "RSS",
        "NODE ID",
    ]);
    let nodes = resp["nodes"].as_array().cloned().unwrap_or_default();
    for n in &nodes {
        t.add_row(vec![
            text(&n["nodeName"], "-").to_owned(),
            text(&n["nodeGroup"], "-").to_owned(),
            text(&n["nodeRole"], "-").to_owned(),
            text(&n["status"], "-").to_owned(),
            n["runningJobs"].as_i64().unwrap_or(0).to_string(),
            n["maxConcurrentTasks"].as_i64().unwrap_or(0).to_string(),
            n["heartbeatAgeSeconds"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s ago")),
            n["stats"]["rssBytes"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |b| format!("{:.0} MB", b / 1_000_000.0)),
            text(&n["nodeId"], "-").to_owned(),
        ]);
    }
    print_table(&t);
    eprintln!("{} node(s)", nodes.len());
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------- jobs

#[derive(Debug, clap::Args)]
pub(crate) struct JobsArgs {
    #[command(flatten)]
    conn: Conn,
    /// States, comma-separated (failed,timed_out).
    #[arg(long)]
    status: Option<String>,
    /// The owner (admins see every user's jobs; others only their own).
    #[arg(long)]
    user: Option<String>,
    /// Job name prefix.
    #[arg(long)]
    name: Option<String>,
    /// The task that fired them (id).
    #[arg(long)]
    task: Option<String>,
    /// The node that ran them (name or id).
    #[arg(long)]
    node: Option<String>,
    /// Target group.
    #[arg(long)]
    group: Option<String>,
    /// Target role.
    #[arg(long)]
    role: Option<String>,
    /// Execution mode.
    #[arg(long)]
    mode: Option<String>,
    /// Submitted at or after (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Submitted before (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Text searched in the name and the command.
    #[arg(long, short = 'q')]
    search: Option<String>,
    /// Jobs per page (1 to 500).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Start after this page position (printed at the end of a page).
    #[arg(long)]
    cursor: Option<String>,
    /// Print the raw JSON of the page.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn jobs(a: &JobsArgs) -> anyhow::Result<ExitCode> {
    let mut query: Vec<(&str, String)> = vec![("limit", a.limit.to_string())];
    for (k, v) in [
        ("status", &a.status),
        ("user", &a.user),
        ("name", &a.name),
        ("task", &a.task),
        ("node", &a.node),
        ("group", &a.group),
        ("role", &a.role),
        ("mode", &a.mode),
        ("submittedAfter", &a.since),
        ("submittedBefore", &a.until),
        ("q", &a.search),
        ("cursor", &a.cursor),
    ] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    let resp = call(http()?.get(url(&a.conn, "/jobs")).query(&query), &a.conn).await?;
    if a.json {
        return print_json(&resp);
    }
    let mut t = table(&[
        "JOB ID",
        "STATUS",
        "EXIT",
        "USER",
        "NAME",
        "NODE",
        "SUBMITTED",
        "SECONDS",
    ]);
    let jobs = resp["jobs"].as_array().cloned().unwrap_or_default();
    for j in &jobs {
        t.add_row(vec![
            text(&j["jobId"], "-").to_owned(),
            text(&j["status"], "-").to_owned(),
            j["exitCode"]
                .as_i64()
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            text(&j["userId"], "-").to_owned(),
            text(&j["jobName"], "-").to_owned(),
            text(&j["nodeName"], "-").to_owned(),
            when(&j["submittedAt"]),
            j["runtime"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")),
        ]);
    }
    print_table(&t);
    match resp["nextCursor"].as_str() {
        Some(c) => eprintln!("{} job(s); more: --cursor {c}", jobs.len()),
        None => eprintln!("{} job(s)", jobs.len()),
    }
    Ok(ExitCode::SUCCESS)
}

/// One job as a readable block.
pub(crate) fn print_job(j: &Value) {
    let field = |label: &str, value: String| outln!("{label:<11}{value}");
    field(
        "job",
        format!("{}  {}", text(&j["jobId"], "-"), text(&j["jobName"], "-")),
    );
    let mut status = text(&j["status"], "-").to_owned();
    if let Some(code) = j["exitCode"].as_i64() {
        status.push_str(&format!(" (exit {code})"));
    }
    if let Some(reason) = j["statusReason"].as_str() {
        status.push_str(&format!(": {reason}"));
    }
    field("status", status);
    field("user", text(&j["userId"], "-").to_owned());
    field(
        "mode",
        format!(
            "{}  priority {}  attempt {}  triggered by {}",
            text(&j["executionMode"], "-"),
            j["priority"],
            j["attempt"],
            text(&j["triggeredBy"], "-")
        ),
    );
    let target: Vec<String> = [
        ("node", &j["targetNodeId"]),
        ("group", &j["targetNodeGroup"]),
        ("role", &j["targetNodeRole"]),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
    .collect();
    if !target.is_empty() {
        field("target", target.join(" "));
    }
    if let Some(node) = j["nodeId"].as_str() {
        field(
            "ran on",
            format!("{} ({node})", text(&j["nodeName"], "unknown node")),
        );
    }
    field("submitted", when(&j["submittedAt"]));
    if !j["dateStarted"].is_null() {
        field("started", when(&j["dateStarted"]));
    }
    if !j["dateCompleted"].is_null() {
        let took = j["runtime"]
            .as_f64()
            .map_or_else(String::new, |s| format!("  ({s:.3} s)"));
        field("finished", format!("{}{took}", when(&j["dateCompleted"])));
    }
    if let Some(t) = j["timeoutSeconds"].as_i64() {
        field("timeout", format!("{t} s"));
    }
    if let Some(task) = j["taskId"].as_str() {
        field("task", task.to_owned());
    }
    if let Some(of) = j["rerunOf"].as_str() {
        field("rerun of", of.to_owned());
    }
    if let Some(up) = j["upstreamJobId"].as_str() {
        field("after job", up.to_owned());
    }
    field("command", text(&j["command"], "").to_owned());
    if let Some(d) = j["description"].as_str().filter(|d| !d.is_empty()) {
        field("about", d.to_owned());
    }
    let stdout = j["output"].as_str().unwrap_or_default();
    let stderr = j["error"].as_str().unwrap_or_default();
    // `output` is stdout then stderr; show them apart.
    let stdout = stdout.strip_suffix(stderr).unwrap_or(stdout);
    for (label, body) in [("stdout", stdout), ("stderr", stderr)] {
        if !body.is_empty() {
            outln!("--- {label} ---");
            outln!("{}", body.trim_end_matches('\n'));
        }
    }
    if j["outputTruncated"] == json!(true) {
        outln!("(output was cut at the worker's output cap)");
    }
}

/// `job logs`: the output, or with `follow` the output as it comes.
pub(crate) async fn logs(
    conn: &Conn,
    id: &str,
    follow: bool,
    only_stderr: bool,
) -> anyhow::Result<ExitCode> {
    let client = http_streaming()?;
    let streams: &[&str] = if only_stderr {
        &["stderr"]
    } else {
        &["stdout", "stderr"]
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, Vec<u8>)>(64);
    let mut readers = Vec::new();
    for stream in streams {
        let req = client
            .get(url(conn, &format!("/jobs/{id}/output")))
            .query(&[
                ("stream", *stream),
                ("follow", if follow { "true" } else { "false" }),
            ])
            .bearer_auth(conn.key()?);
        readers.push(tokio::spawn(pump(req, *stream == "stderr", tx.clone())));
    }
    drop(tx);
    while let Some((is_err, bytes)) = rx.recv().await {
        write_out(is_err, &bytes);
    }
    for r in readers {
        r.await.context("output reader")??;
    }
    Ok(ExitCode::SUCCESS)
}

/// A client without the 30 s whole-request timeout: a followed output lasts
/// as long as its job.
fn http_streaming() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// Sends one output request and forwards its body as it arrives.
async fn pump(
    req: reqwest::RequestBuilder,
    is_err: bool,
    tx: tokio::sync::mpsc::Sender<(bool, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut resp = req.send().await.context("cannot reach the api")?;
    let status = resp.status();
    if status.as_u16() == 404 && !is_err {
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::bail!(
            "404 {}",
            body["error"]["message"].as_str().unwrap_or("not found")
        );
    }
    if !status.is_success() {
        // A missing stderr of a job that printed none is not an error.
        return Ok(());
    }
    while let Some(chunk) = resp.chunk().await.context("reading the output")? {
        if tx.send((is_err, chunk.to_vec())).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn write_out(is_err: bool, bytes: &[u8]) {
    let written = if is_err {
        let mut e = std::io::stderr().lock();
        e.write_all(bytes).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(bytes).and_then(|()| o.flush())
    };
    if let Err(e) = written
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Follows a submitted job to its end: its output as it comes (stdout to
/// stdout, stderr to stderr), its state changes on stderr, and on a
/// terminal an elapsed-time line while it waits. Exits with the job's code.
pub(crate) async fn wait_live(conn: &Conn, job_id: &str) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let client = http_streaming()?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, Vec<u8>)>(64);
    for stream in ["stdout", "stderr"] {
        let req = client
            .get(url(conn, &format!("/jobs/{job_id}/output")))
            .query(&[("stream", stream), ("follow", "true")])
            .bearer_auth(conn.key()?);
        tokio::spawn(pump(req, stream == "stderr", tx.clone()));
    }
    drop(tx);
    let mut last = String::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut indicator = false;
    let mut outputs_done = false;
    let mut job;
    loop {
        tokio::select! {
            chunk = rx.recv(), if !outputs_done => match chunk {
                Some((is_err, bytes)) => {
                    if indicator {
                        eprint!("\r\x1b[K");
                        indicator = false;
                    }
                    write_out(is_err, &bytes);
                }
                None => outputs_done = true,
            },
            _ = ticker.tick() => {
                job = call(client.get(url(conn, &format!("/jobs/{job_id}"))), conn).await?;
                let status = text(&job["status"], "unknown").to_owned();
                let secs = started.elapsed().as_secs_f64();
                if status != last {
                    if indicator {
                        eprint!("\r\x1b[K");
                        indicator = false;
                    }
                    eprintln!("[{secs:>6.1}s] {job_id} {status}");
                    last.clone_from(&status);
                } else if tty {
                    eprint!("\r[{secs:>6.1}s] {status} …");
                    indicator = true;
                }
                let terminal = matches!(
                    status.as_str(),
                    "succeeded" | "failed" | "timed_out" | "cancelled" | "dead"
                );
                if terminal && outputs_done {
                    break;
                }
            }
        }
    }
    if indicator {
        eprint!("\r\x1b[K");
    }
    let status = text(&job["status"], "unknown");
    if let Some(reason) = job["statusReason"].as_str() {
        eprintln!("{status}: {reason}");
    }
    let code = match status {
        "succeeded" => 0,
        _ => job["exitCode"]
            .as_i64()
            .filter(|c| (1..=255).contains(c))
            .unwrap_or(1) as u8,
    };
    Ok(ExitCode::from(code))
}

/// `job rerun`: a new job with the same spec.
pub(crate) async fn rerun(conn: &Conn, id: &str, wait: bool) -> anyhow::Result<ExitCode> {
    let resp = call(http()?.post(url(conn, &format!("/jobs/{id}/rerun"))), conn).await?;
    let job_id = text(&resp["jobId"], "").to_owned();
    eprintln!("re-run of {id} accepted");
    outln!("{job_id}");
    if wait {
        return wait_live(conn, &job_id).await;
    }
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------ tasks

#[derive(Debug, clap::Args)]
pub(crate) struct TaskEditArgs {
    #[command(flatten)]
    conn: Conn,
    /// Task id.
    id: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// New command.
    #[arg(long, short = 'c')]
    command: Option<String>,
    /// New cron pattern.
    #[arg(long)]
    schedule: Option<String>,
    /// New IANA timezone.
    #[arg(long)]
    timezone: Option<String>,
    /// New description.
    #[arg(long)]
    description: Option<String>,
    /// Seconds before a run is killed.
    #[arg(long)]
    timeout: Option<i64>,
    /// Retries of a failed run.
    #[arg(long)]
    max_retries: Option<i64>,
    /// 0 (lowest) to 9.
    #[arg(long)]
    priority: Option<i64>,
    /// Run on nodes of this group.
    #[arg(long)]
    group: Option<String>,
    /// Run on nodes of this role.
    #[arg(long)]
    role: Option<String>,
    /// one or all.
    #[arg(long)]
    fanout: Option<String>,
}

impl TaskEditArgs {
    /// The PUT body: only what was given.
    fn body(&self) -> Value {
        let mut body = serde_json::Map::new();
        for (k, v) in [
            ("taskName", &self.name),
            ("command", &self.command),
            ("schedule", &self.schedule),
            ("timezone", &self.timezone),
            ("description", &self.description),
            ("assignedNodeGroup", &self.group),
            ("assignedNodeRole", &self.role),
            ("fanout", &self.fanout),
        ] {
            if let Some(v) = v {
                body.insert(k.to_owned(), json!(v));
            }
        }
        for (k, v) in [
            ("timeoutSeconds", self.timeout),
            ("maxRetries", self.max_retries),
            ("priority", self.priority),
        ] {
            if let Some(v) = v {
                body.insert(k.to_owned(), json!(v));
            }
        }
        Value::Object(body)
    }
}

/// The operator's task verbs.
#[derive(Debug, Subcommand)]
pub(crate) enum TaskControl {
    /// Show one task with its schedule.
    Get {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let a task fire again on its schedule.
    Enable {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
    },
    /// Stop a task from firing (runs already going finish).
    Disable {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
    },
    /// Delete a task (asks first on a terminal; --yes to skip).
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Task id.
        id: String,
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Change the fields given.
    Edit(Box<TaskEditArgs>),
}

pub(crate) async fn task_control(cmd: &TaskControl) -> anyhow::Result<ExitCode> {
    let client = http()?;
    match cmd {
        TaskControl::Get { conn, id, json } => {
            let task = call(client.get(url(conn, &format!("/tasks/{id}"))), conn).await?;
            let schedule = call(
                client.get(url(conn, &format!("/tasks/{id}/schedule"))),
                conn,
            )
            .await
            .unwrap_or(Value::Null);
            if *json {
                return print_json(&json!({"task": task, "schedule": schedule}));
            }
            print_task(&task, &schedule);
        }
        TaskControl::Enable { conn, id } | TaskControl::Disable { conn, id } => {
            let enabled = matches!(cmd, TaskControl::Enable { .. });
            let resp = call(
                client
                    .put(url(conn, &format!("/tasks/{id}")))
                    .json(&json!({ "enabled": enabled })),
                conn,
            )
            .await?;
            let t = if resp["task"].is_object() {
                &resp["task"]
            } else {
                &resp
            };
            eprintln!(
                "task {} {}; next run {}",
                text(&t["taskName"], id),
                if enabled { "enabled" } else { "disabled" },
                when(&t["nextRun"])
            );
        }
        TaskControl::Delete { conn, id, yes } => {
            if !yes && !confirm(&format!("delete task {id}? its history is kept"))? {
                eprintln!("not deleted");
                return Ok(ExitCode::from(1));
            }
            let resp = call(client.delete(url(conn, &format!("/tasks/{id}"))), conn).await?;
            eprintln!("{}", text(&resp["message"], "task deleted"));
        }
        TaskControl::Edit(a) => {
            let body = a.body();
            if body.as_object().is_none_or(serde_json::Map::is_empty) {
                anyhow::bail!(
                    "nothing to change: give at least one of --name, --command, --schedule, ..."
                );
            }
            let resp = call(
                client
                    .put(url(&a.conn, &format!("/tasks/{}", a.id)))
                    .json(&body),
                &a.conn,
            )
            .await?;
            let t = if resp["task"].is_object() {
                &resp["task"]
            } else {
                &resp
            };
            eprintln!(
                "task {} updated; next run {}",
                text(&t["taskName"], &a.id),
                when(&t["nextRun"])
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks yes/no on the terminal; without one, refuses (scripts pass --yes).
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} — refusing without a terminal to ask; pass --yes");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn print_task(t: &Value, s: &Value) {
    let field = |label: &str, value: String| outln!("{label:<11}{value}");
    field(
        "task",
        format!("{}  {}", text(&t["taskId"], "-"), text(&t["taskName"], "-")),
    );
    field("app", text(&t["appName"], "-").to_owned());
    field(
        "enabled",
        if t["enabled"] == json!(false) {
            "no"
        } else {
            "yes"
        }
        .to_owned(),
    );
    field(
        "schedule",
        format!(
            "{}  ({})",
            text(&t["schedule"], "-"),
            text(&t["timezone"], "UTC")
        ),
    );
    field("mode", text(&t["executionMode"], "-").to_owned());
    field("command", text(&t["command"], "").to_owned());
    if let Some(defs) = t["parameters"].as_object().filter(|d| !d.is_empty()) {
        let shown: Vec<String> = defs
            .iter()
            .map(|(name, d)| {
                let mut one = format!("{name}:{}", text(&d["type"], "string"));
                if let Some(values) = d["values"].as_array() {
                    let values: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                    one.push_str(&format!("({})", values.join("|")));
                }
                if !d["default"].is_null() {
                    one.push_str(&format!("={}", d["default"]));
                }
                if d["required"] == json!(true) {
                    one.push_str(" required");
                }
                one
            })
            .collect();
        field("parameters", shown.join(", "));
    }
    for e in s["after"].as_array().into_iter().flatten() {
        field(
            "after",
            format!(
                "{} ({})  on {}",
                text(&e["taskName"], "(deleted)"),
                text(&e["taskId"], "-"),
                text(&e["on"], "succeeded")
            ),
        );
    }
    for d in s["downstream"].as_array().into_iter().flatten() {
        field(
            "then",
            format!(
                "{} ({})  on {}",
                text(&d["taskName"], "-"),
                text(&d["taskId"], "-"),
                text(&d["on"], "succeeded")
            ),
        );
    }
    field("next run", when(&s["nextRun"]));
    field("last run", when(&s["lastRun"]));
    field("last state", text(&s["lastState"], "-").to_owned());
    field(
        "runs",
        format!(
            "{} total, {} succeeded, {} failed",
            s["totalRuns"].as_i64().unwrap_or(0),
            s["successCount"].as_i64().unwrap_or(0),
            s["failureCount"].as_i64().unwrap_or(0)
        ),
    );
}
