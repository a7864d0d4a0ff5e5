//! End-to-end benchmark against the real local Postgres and RabbitMQ.
//!
//! ```sh
//! cargo run --release -p taskhost --example bench -- \
//!     [--jobs 2000] [--mode inline|pool] [--command CMD] [--concurrency 32] [--workers 1] \
//!     [--slots SLOTS] [--db-connections 20] [--via http|queue]
//! ```
//!
//! It starts an api, a scheduler and `--workers` workers in-process on a fresh
//! test database and AMQP prefix (taskhost-testkit), measures what this
//! machine can do on its own (shell spawns, Postgres commits, confirmed AMQP
//! publishes), then submits `--jobs` jobs over HTTP with `--concurrency`
//! clients (or, with `--via queue`, publishes them to `<p>.submit` as another
//! system would, with confirms in flight), waits for all of them to finish and
//! prints throughput and latency
//! beside the machine limits and DESIGN.md's targets. Logs go to stderr
//! (`RUST_LOG`, default `warn`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::Parser;
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::json;
use taskhost_common::config::{LogFormat, LogSettings};
use taskhost_common::model::Role;
use taskhost_common::{amqp, telemetry};
use taskhost_testkit::{AMQP_URL, TestEnv};

/// Each machine-limit probe runs this long.
const PROBE: Duration = Duration::from_millis(1500);
/// Publisher confirms kept in flight by the AMQP probe.
const CONFIRM_WINDOW: usize = 1024;
const TERMINAL: &str = "SELECT count(*) FROM jobs WHERE status IN ('succeeded','failed','timed_out','cancelled','dead')";

#[derive(Parser, Debug)]
struct Args {
    /// Jobs to submit.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// `inline` (built-in, no process) or `pool` (a shell child per job).
    #[arg(long, default_value = "inline", value_parser = ["inline", "pool"])]
    mode: String,
    /// The command: default `noop` for inline, `true` for pool.
    #[arg(long)]
    command: Option<String>,
    /// Concurrent HTTP clients submitting.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// In-process workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Slots per worker (`worker.concurrency`); default CPUs × 4 for pool,
    /// 64 for inline.
    #[arg(long)]
    slots: Option<usize>,
    /// Database pool size of each service.
    #[arg(long, default_value_t = 20)]
    db_connections: u32,
    /// `http` (POST /jobs/submit) or `queue` (publish job.submit.v1 to
    /// `<p>.submit`; "submit" latency is then publish → broker confirm).
    #[arg(long, default_value = "http", value_parser = ["http", "queue"])]
    via: String,
}

/// What this machine does on its own.
struct Limits {
    spawns_per_s: f64,
    commits_per_s: f64,
    confirms_per_s: f64,
    cpus: usize,
    mem_total_mib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(&LogSettings {
        format: LogFormat::Human,
        level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    });
    let mut env = TestEnv::new().await;
    let result = run(&mut env, &args).await;
    env.cleanup().await;
    result
}

async fn run(env: &mut TestEnv, args: &Args) -> anyhow::Result<()> {
    let limits = measure_limits(env).await?;
    println!("machine limits (each probe ~{:.1} s)", PROBE.as_secs_f64());
    for (name, value) in [
        ("sh -c true, sequential (runs/s)", fmt0(limits.spawns_per_s)),
        (
            "pg INSERT+COMMIT, 1 connection (commits/s)",
            fmt0(limits.commits_per_s),
        ),
        (
            "amqp persistent publish + confirm (msgs/s)",
            fmt0(limits.confirms_per_s),
        ),
        ("CPUs", limits.cpus.to_string()),
        ("memory total (MiB)", limits.mem_total_mib.to_string()),
    ] {
        println!("  {name:<44} {value:>10}");
    }
    println!();

    // Services with larger pools than the quick-test defaults.
    let inline = args.mode == "inline";
    let slots = args
        .slots
        .unwrap_or(if inline { 64 } else { limits.cpus * 4 });
    env.settings.database.max_connections = args.db_connections;
    env.settings.worker.concurrency = slots;
    // One key submits everything: its per-key rate limit would measure the
    // limiter, not the job path.
    env.settings.api.rate_limit_per_sec = 0;
    let api = env.start_api_with(env.settings.clone()).await;
    env.start_scheduler().await;
    for i in 0..args.workers {
        let s = env.worker_settings(&format!("bench{i}"), "default", "worker");
        env.start_worker_with(s).await;
    }
    let key = env.key("bench", &[Role::Debug, Role::TaskManager]).await;
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| if inline { "noop" } else { "true" }.into());
    println!(
        "run: {} jobs, mode {}, command {command:?}, {} clients, {} worker(s) × {slots} slots, db pool {}",
        args.jobs, args.mode, args.concurrency, args.workers, args.db_connections
    );

    if args.via == "queue" {
        let started = Instant::now();
        let confirm_ms = publish_to_ingress(env, args, &command).await?;
        let submit_secs = started.elapsed().as_secs_f64();
        let accepted = confirm_ms.len();
        wait_all(env, args, accepted).await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT submitted_at, started_at, completed_at, status FROM jobs WHERE user_id = 'bench'",
        )
        .fetch_all(&env.pool)
        .await
        .context("read jobs")?;
        report(
            args,
            &limits,
            &Run {
                rows: &rows,
                http_ms: &confirm_ms,
                accepted,
                rejected: 0,
                submit_secs,
            },
        );
        return Ok(());
    }

    // Submit with C concurrent clients, each taking the next index.
    let next = Arc::new(AtomicUsize::new(0));
    let url = api.v1("/jobs/submit");
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, http, url, key) = (next.clone(), api.http.clone(), url.clone(), key.clone());
        let (mode, command, n) = (args.mode.clone(), command.clone(), args.jobs);
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rejected = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let body = json!({"jobName": "bench", "command": command, "executionMode": mode});
                let t = Instant::now();
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await?;
                let ok = resp.status().is_success();
                let _ = resp.bytes().await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                if !ok {
                    rejected += 1;
                }
            }
            anyhow::Ok((lat, rejected))
        }));
    }
    let mut http_ms = Vec::with_capacity(args.jobs);
    let mut rejected = 0;
    for c in clients {
        let (lat, rej) = c.await??;
        http_ms.extend(lat);
        rejected += rej;
    }
    let submit_secs = started.elapsed().as_secs_f64();
    let accepted = http_ms.len() - rejected;
    if accepted == 0 {
        bail!("no job was accepted ({rejected} rejected)");
    }

    wait_all(env, args, accepted).await?;

    let rows: Vec<Row> = sqlx::query_as(
        "SELECT submitted_at, started_at, completed_at, status FROM jobs WHERE user_id = 'bench'",
    )
    .fetch_all(&env.pool)
    .await
    .context("read jobs")?;
    let http_ms = &http_ms;
    report(
        args,
        &limits,
        &Run {
            rows: &rows,
            http_ms,
            accepted,
            rejected,
            submit_secs,
        },
    );
    Ok(())
}

/// Waits until `accepted` jobs are terminal (or a generous deadline passes).
async fn wait_all(env: &TestEnv, args: &Args, accepted: usize) -> anyhow::Result<()> {
    let deadline = Duration::from_secs(30) + Duration::from_millis(20) * args.jobs as u32;
    let waited = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(TERMINAL).fetch_one(&env.pool).await?;
        if done as usize >= accepted {
            return Ok(());
        }
        if waited.elapsed() > deadline {
            eprintln!(
                "deadline {deadline:?} passed with {done}/{accepted} jobs terminal; reporting what finished"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `--jobs` job.submit.v1 messages to `<p>.submit` with up to
/// CONFIRM_WINDOW confirms in flight; returns each publish → confirm time.
async fn publish_to_ingress(env: &TestEnv, args: &Args, command: &str) -> anyhow::Result<Vec<f64>> {
    let names = env.names();
    let conn = amqp::connect(AMQP_URL, "bench-ingress").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    amqp::declare_topology(&ch, &names).await?;
    let mut window = VecDeque::new();
    let mut latencies = Vec::with_capacity(args.jobs);
    for i in 0..args.jobs {
        let body = json!({"userId": "bench", "jobName": format!("bench{i}"),
                          "command": command, "executionMode": args.mode});
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type("job.submit.v1".into())
            .with_message_id(uuid::Uuid::now_v7().to_string().into());
        let t = Instant::now();
        let confirm = ch
            .basic_publish(
                names.submit().into(),
                "submit".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await?;
        window.push_back((t, confirm));
        if window.len() >= CONFIRM_WINDOW
            && let Some((t, c)) = window.pop_front()
        {
            ensure_ack(c.await?)?;
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    while let Some((t, c)) = window.pop_front() {
        ensure_ack(c.await?)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(latencies)
}

fn ensure_ack(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => bail!("the broker refused a submit message"),
    }
}

/// What the run measured.
struct Run<'a> {
    rows: &'a [Row],
    http_ms: &'a [f64],
    accepted: usize,
    rejected: usize,
    submit_secs: f64,
}

/// submitted_at, started_at, completed_at, status.
#[rustfmt::skip]
type Row = (DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, String);

fn report(args: &Args, lim: &Limits, run: &Run<'_>) {
    let rows = run.rows;
    let count = |s: &str| rows.iter().filter(|r| r.3 == s).count();
    let (succeeded, failed) = (count("succeeded"), count("failed"));
    let ms =
        |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3;
    let to_start: Vec<f64> = rows.iter().filter_map(|r| Some(ms(r.0, r.1?))).collect();
    let to_done: Vec<f64> = rows.iter().filter_map(|r| Some(ms(r.1?, r.2?))).collect();
    let first = rows.iter().map(|r| r.0).min();
    let last = rows.iter().filter_map(|r| r.2).max();
    let e2e = match (first, last) {
        (Some(f), Some(l)) if l > f => format!("{:.0} /s", rows.len() as f64 / (ms(f, l) / 1e3)),
        _ => "-".into(),
    };
    let inline = args.mode == "inline";
    let (e2e_limit, e2e_target) = if inline {
        (
            format!("{:.0} amqp confirms/s", lim.confirms_per_s),
            "~8000 /s inline noop",
        )
    } else {
        let n = lim.cpus as f64;
        let all = lim.spawns_per_s * n;
        (
            format!("{:.0} spawns/s × {n} cpu = {all:.0}", lim.spawns_per_s),
            "~1800 /s shell",
        )
    };
    let p = |v: &[f64], q: f64| percentile(v, q).map_or("-".into(), |x| format!("{x:.2} ms"));
    let submit = format!("{:.0} /s", run.accepted as f64 / run.submit_secs);
    let commits = format!("{:.0} commits/s (1 conn)", lim.commits_per_s);
    let commit_ms = format!("{:.2} ms per commit", 1e3 / lim.commits_per_s);
    let spawn_ms = format!("{:.2} ms per spawn", 1e3 / lim.spawns_per_s);
    let other = rows.len() - succeeded - failed;
    let (via, ok, refused) = if args.via == "queue" {
        ("queue", "confirmed", "nacked")
    } else {
        ("HTTP", "HTTP 2xx", "HTTP non-2xx")
    };
    #[rustfmt::skip]
    let table: [(String, String, &str, &str); 14] = [
        (format!("jobs submitted ({ok})"), run.accepted.to_string(), "", ""),
        (format!("jobs rejected ({refused})"), run.rejected.to_string(), "", ""),
        ("jobs succeeded".into(), succeeded.to_string(), "", ""),
        ("jobs failed".into(), failed.to_string(), "", ""),
        ("jobs other (not finished well)".into(), other.to_string(), "", ""),
        (format!("submit throughput ({via})"), submit, &commits, "-"),
        ("end-to-end throughput".into(), e2e, &e2e_limit, e2e_target),
        (format!("{via} submit p50"), p(run.http_ms, 0.50), &commit_ms, "-"),
        (format!("{via} submit p95"), p(run.http_ms, 0.95), "", "-"),
        (format!("{via} submit p99"), p(run.http_ms, 0.99), "", "-"),
        ("submit→start p50".into(), p(&to_start, 0.50), "", "~2 ms"),
        ("submit→start p95".into(), p(&to_start, 0.95), "", "-"),
        ("submit→start p99".into(), p(&to_start, 0.99), "", "-"),
        ("start→complete p50".into(), p(&to_done, 0.50), if inline { "" } else { &spawn_ms }, "-"),
    ];
    println!();
    println!(
        "{:<32} | {:>12} | {:<32} | target",
        "figure", "measured", "machine limit"
    );
    println!("{}", "-".repeat(100));
    for (name, value, limit, target) in table {
        println!("{name:<32} | {value:>12} | {limit:<32} | {target}");
    }
}

async fn measure_limits(env: &TestEnv) -> anyhow::Result<Limits> {
    // (a) Sequential shell spawns.
    let t = Instant::now();
    let mut spawns = 0u64;
    while t.elapsed() < PROBE {
        let status = tokio::process::Command::new("/bin/sh")
            .args(["-c", "true"])
            .stdin(std::process::Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("/bin/sh -c true failed: {status}");
        }
        spawns += 1;
    }
    let spawns_per_s = spawns as f64 / t.elapsed().as_secs_f64();

    // (b) One connection, one row per commit (each autocommit INSERT is its
    // own transaction and WAL flush).
    sqlx::query("CREATE TABLE bench_scratch (id bigserial PRIMARY KEY, v integer NOT NULL)")
        .execute(&env.pool)
        .await?;
    let mut conn = env.pool.acquire().await?;
    let t = Instant::now();
    let mut commits = 0u64;
    while t.elapsed() < PROBE {
        sqlx::query("INSERT INTO bench_scratch (v) VALUES ($1)")
            .bind(commits as i32)
            .execute(&mut *conn)
            .await?;
        commits += 1;
    }
    let commits_per_s = commits as f64 / t.elapsed().as_secs_f64();
    drop(conn);
    sqlx::query("DROP TABLE bench_scratch")
        .execute(&env.pool)
        .await?;

    // (c) Persistent publishes with up to CONFIRM_WINDOW confirms in flight.
    let queue = format!("{}.bench-scratch", env.prefix);
    let conn = amqp::connect(AMQP_URL, "bench-probe").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.clone().into(), durable, FieldTable::default())
        .await?;
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let payload = [0u8; 256];
    let mut in_flight = VecDeque::with_capacity(CONFIRM_WINDOW);
    let (mut sent, mut nacked) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < PROBE {
        if in_flight.len() >= CONFIRM_WINDOW
            && let Some(c) = in_flight.pop_front()
        {
            nacked += u64::from(!matches!(c.await?, Confirmation::Ack(_)));
        }
        let c = ch
            .basic_publish(
                "".into(),
                queue.clone().into(),
                BasicPublishOptions::default(),
                &payload,
                props.clone(),
            )
            .await?;
        in_flight.push_back(c);
        sent += 1;
    }
    for c in in_flight {
        nacked += u64::from(!matches!(c.await?, Confirmation::Ack(_)));
    }
    let confirms_per_s = (sent - nacked) as f64 / t.elapsed().as_secs_f64();
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;

    // (d) CPUs and memory.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024);
    Ok(Limits {
        spawns_per_s,
        commits_per_s,
        confirms_per_s,
        cpus,
        mem_total_mib,
    })
}

/// The `q` quantile (nearest rank) of `v`, or None when empty.
fn percentile(v: &[f64], q: f64) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1));
    s.get(rank - 1).copied()
}

fn fmt0(x: f64) -> String {
    format!("{x:.0}")
}
