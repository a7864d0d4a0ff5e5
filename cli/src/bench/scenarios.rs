//! The scenarios. Figures come from the jobs table and real timers.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Value, json};
use sqlx::PgPool;
use taskhost_common::model::Role;
use taskhost_common::{Settings, amqp, db};
use taskhost_testkit::{AMQP_URL, Api, TestEnv};
use uuid::Uuid;

use super::cpu::{CpuSnap, CpuUse};
use super::meter::{self, Costs, Meter};
use super::probes::{self, CONFIRM_WINDOW};
use super::report::{Report, max, percentile};
use super::{BenchArgs, Mode, Scenario};

/// The user every bench job belongs to.
const USER: &str = "bench";
const TERMINAL: Wait = Wait {
    count: "SELECT count(*) FROM jobs WHERE user_id = 'bench'
     AND status IN ('succeeded','failed','timed_out','cancelled','dead')",
    any_left: "SELECT EXISTS (SELECT 1 FROM jobs WHERE user_id = 'bench'
     AND status IN ('pending','queued','running'))",
};
const QUEUED: Wait = Wait {
    count: "SELECT count(*) FROM jobs WHERE user_id = 'bench' AND status = 'queued'",
    any_left: "SELECT EXISTS (SELECT 1 FROM jobs WHERE user_id = 'bench' AND status = 'pending')",
};

/// What the bench waits for. Counting thousands of rows costs Postgres
/// ~5 ms, which polled every 50 ms took about 4 % of the machine's CPU
/// from the run it measures; `any_left` finds one row in the small index
/// of unfinished jobs, so the count is read once a second and at the end.
struct Wait {
    /// How many jobs are there (progress and the result).
    count: &'static str,
    /// Whether any job is not there yet.
    any_left: &'static str,
}

/// How long the schedulers keep running after the schedule run's end.
const SCHEDULE_GRACE: Duration = Duration::from_secs(5);

/// submitted_at, started_at, completed_at, status.
#[rustfmt::skip]
type Row = (DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, String);

/// One run: the env, the services it started, the report being filled.
struct Run<'a> {
    env: &'a mut TestEnv,
    args: &'a BenchArgs,
    /// Services started so far; their indices in the env are 0..started.
    started: usize,
    report: Report,
    key: String,
    /// CPU use of the scenario's measured phase, with the jobs it ran.
    cpu: Option<(CpuUse, usize)>,
    /// The machine's busy share over the window the scenario's rate is
    /// measured in, where that is shorter than the CPU's phase (`http
    /// --no-workers`: its rate is the submit phase's, while its CPU phase
    /// runs on until the last job is marked queued).
    rate_busy: Option<f64>,
}

/// Runs the probes, then the scenario; returns the report.
pub(super) async fn run(env: &mut TestEnv, args: &BenchArgs) -> anyhow::Result<Report> {
    let mut report = Report {
        scenario: args.scenario.name().to_owned(),
        ..Report::default()
    };
    let p = &mut report.params;
    p.insert("workers".into(), json!(args.workers));
    p.insert("slots".into(), json!(args.slots));
    p.insert("prefetch".into(), json!(args.prefetch));
    p.insert("db_connections".into(), json!(args.db_connections));
    match args.scenario {
        Scenario::Schedule => {
            p.insert("tasks".into(), json!(args.tasks));
            p.insert("schedulers".into(), json!(args.schedulers));
            p.insert("seconds".into(), json!(args.seconds_or(20)));
            p.insert("mode".into(), json!("inline"));
            p.insert("command".into(), json!("noop"));
        }
        s => {
            p.insert("mode".into(), json!(args.mode.as_str()));
            p.insert("command".into(), json!(args.command_template()));
            if s == Scenario::Latency {
                p.insert("rate".into(), json!(args.rate));
                p.insert("seconds".into(), json!(args.seconds_or(10)));
            } else {
                p.insert("jobs".into(), json!(args.jobs));
            }
            if matches!(s, Scenario::Burn | Scenario::Http) {
                p.insert("concurrency".into(), json!(args.concurrency));
            }
            if s == Scenario::Http {
                p.insert("no_workers".into(), json!(args.no_workers));
            }
        }
    }
    if !args.skip_probes {
        report.limits = probes::run(env).await?;
        if !args.json {
            report.print_limits();
        }
    }

    // Production defaults (not the testkit's short leases), on this run's
    // database and prefix; `TASKHOST__WORKER__*` from the environment apply,
    // so an operator can measure their own worker settings.
    let mut vars: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("TASKHOST__WORKER__"))
        .collect();
    vars.extend([
        ("DATABASE_URL".to_owned(), env.db_url()),
        ("AMQP_URL".to_owned(), AMQP_URL.to_owned()),
        ("TASKHOST__AMQP__PREFIX".to_owned(), env.prefix.clone()),
        ("TASKHOST__API__BIND".to_owned(), "127.0.0.1:0".to_owned()),
    ]);
    let mut settings = Settings::load_from(None, &vars)?;
    settings.database.max_connections = args.db_connections;
    settings.worker.concurrency = args.slots;
    settings.worker.prefetch = args.prefetch;
    // One key submits everything: its per-key rate limit would measure the
    // limiter, not the job path.
    settings.api.rate_limit_per_sec = 0;
    // One process, as `standalone`: the api's /metrics covers all of it,
    // and several workers must not contend for one port.
    settings.worker.metrics_bind = "off".to_owned();
    settings.scheduler.metrics_bind = "off".to_owned();
    settings.validate()?;
    env.settings = settings;
    let key = env
        .key(USER, &[Role::Debug, Role::TaskManager, Role::SystemAdmin])
        .await;
    // A fresh pool for the bench's own queries: closing the old one ends its
    // backends, which flushes their statistics before the count starts.
    let old = std::mem::replace(&mut env.pool, db::pool(&env.settings.database)?);
    old.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut run = Run {
        env,
        args,
        started: 0,
        report,
        key,
        cpu: None,
        rate_busy: None,
    };
    let meter = Meter::start(&run.env.db_name, &run.env.names()).await?;
    let jobs = match args.scenario {
        Scenario::Burn => run.burn().await?,
        Scenario::Http => run.http().await?,
        Scenario::Queue => run.queue().await?,
        Scenario::Latency => run.latency().await?,
        Scenario::Schedule => run.schedule().await?,
        Scenario::Suite => anyhow::bail!("the suite runs the other scenarios; it is not one"),
    };
    // Stop every service and close the bench's pool so all statistics are
    // flushed, then read the costs.
    run.stop_all().await;
    run.env.pool.close().await;
    let costs = meter.finish().await?;
    run.costs(costs, jobs);
    run.cpu_figures();
    if !args.skip_probes {
        run.idle_rss().await;
    }
    Ok(run.report)
}

impl Run<'_> {
    async fn api(&mut self) -> Api {
        let api = self.env.start_api_with(self.env.settings.clone()).await;
        self.started += 1;
        api
    }

    async fn scheduler(&mut self) -> usize {
        self.started += 1;
        self.env.start_scheduler().await
    }

    async fn workers(&mut self, n: usize) {
        for i in 0..n {
            eprintln!("bench: starting worker {}/{n}", i + 1);
            let s = self
                .env
                .worker_settings(&format!("bench{i}"), "default", "worker");
            self.env.start_worker_with(s).await;
            self.started += 1;
        }
    }

    async fn stop_all(&mut self) {
        for i in 0..self.started {
            self.env.stop(i).await;
        }
    }

    fn pool(&self) -> PgPool {
        self.env.pool.clone()
    }

    /// Waits until every accepted job has ended, reads the jobs and counts
    /// them by outcome into the report.
    async fn finished_rows(
        &mut self,
        label: &str,
        sub: &Submitted,
        within: Duration,
    ) -> anyhow::Result<Vec<Row>> {
        wait_count(&self.pool(), label, "done", TERMINAL, sub.accepted, within).await?;
        let rows = read_rows(&self.pool()).await?;
        job_counts(&mut self.report, sub, &rows);
        Ok(rows)
    }

    /// Queue N jobs with no worker, then drain them with the workers.
    async fn burn(&mut self) -> anyhow::Result<usize> {
        let n = self.args.jobs;
        let api = self.api().await;
        self.scheduler().await;
        let sub = submit_closed(&api, &self.key, self.args, n, "burn").await?;
        let queued = wait_count(
            &self.pool(),
            "burn",
            "queued",
            QUEUED,
            sub.accepted,
            deadline(n),
        )
        .await?;
        if queued < sub.accepted {
            bail!(
                "only {queued} of {} accepted jobs became queued",
                sub.accepted
            );
        }
        let workers_started = Instant::now();
        let cpu = CpuSnap::take();
        self.workers(self.args.workers).await;
        eprintln!(
            "bench: workers started in {:.1} s",
            workers_started.elapsed().as_secs_f64()
        );
        let rows = self.finished_rows("burn", &sub, deadline(n)).await?;
        self.cpu = Some((cpu.until(&CpuSnap::take()), sub.accepted));
        let r = &mut self.report;
        r.add(
            "submit_accepted_per_sec",
            "queueing phase accepted/s (HTTP)",
            Some(sub.accepted as f64 / sub.secs),
            "/s",
        );
        let first_start = rows.iter().filter_map(|r| r.1).min();
        let last_done = rows.iter().filter_map(|r| r.2).max();
        let completed = count(&rows, "succeeded");
        let rate = span_rate(completed, first_start, last_done);
        let (limit, target) = match self.args.mode {
            Mode::Inline => (
                format!(
                    "amqp pub+consume+ack {} /s",
                    lim(r.limit(probes::AMQP_ROUNDTRIP))
                ),
                "≥ 8000 jobs/s (inline noop)".to_owned(),
            ),
            Mode::Pool | Mode::Background => (
                {
                    // A root worker's jobs start through a user switch, unless
                    // `worker.run_as = "root"` keeps them root.
                    let switched = r
                        .limit(probes::SPAWN_SWITCHED)
                        .filter(|_| self.env.settings.worker.run_as != "root");
                    match switched {
                        Some(switched) => format!(
                            "sh -c {} /s ×2; as nobody {} /s ×2; 70% = {}",
                            lim(r.limit(probes::SPAWN_PAR)),
                            lim(Some(switched)),
                            lim(Some(switched * 0.7))
                        ),
                        None => format!(
                            "sh -c {} /s seq, {} /s ×2; 70% = {}",
                            lim(r.limit(probes::SPAWN_SEQ)),
                            lim(r.limit(probes::SPAWN_PAR)),
                            lim(r.limit(probes::SPAWN_PAR).map(|v| v * 0.7))
                        ),
                    }
                },
                "≥ 1800 jobs/s (shell)".to_owned(),
            ),
        };
        r.add_full(
            "jobs_per_sec",
            "throughput (first start → last done)",
            rate,
            "jobs/s",
            limit,
            target,
        );
        let run_ms: Vec<f64> = rows.iter().filter_map(|r| Some(ms(r.1?, r.2?))).collect();
        r.add(
            "start_to_complete_p50_ms",
            "start→complete p50",
            percentile(&run_ms, 0.5),
            "ms",
        );
        r.add(
            "start_to_complete_p99_ms",
            "start→complete p99",
            percentile(&run_ms, 0.99),
            "ms",
        );
        Ok(n)
    }

    /// N submissions over C connections with the workers running.
    async fn http(&mut self) -> anyhow::Result<usize> {
        let n = self.args.jobs;
        let api = self.api().await;
        self.scheduler().await;
        if !self.args.no_workers {
            self.workers(self.args.workers).await;
        }
        let cpu = CpuSnap::take();
        let sub = submit_closed(&api, &self.key, self.args, n, "http").await?;
        if self.args.no_workers {
            self.rate_busy = Some(cpu.until(&CpuSnap::take()).busy_share);
        }
        let (sql, what) = if self.args.no_workers {
            (QUEUED, "queued")
        } else {
            (TERMINAL, "done")
        };
        wait_count(&self.pool(), "http", what, sql, sub.accepted, deadline(n)).await?;
        self.cpu = Some((cpu.until(&CpuSnap::take()), sub.accepted));
        let rows = read_rows(&self.pool()).await?;
        let r = &mut self.report;
        job_counts(r, &sub, &rows);
        r.add_full(
            "accepted_per_sec",
            "HTTP submit accepted/s (submit phase)",
            Some(sub.accepted as f64 / sub.secs),
            "/s",
            format!("pg batched {} rows/s", lim(r.limit(probes::PG_BATCH_ROWS))),
            "≥ 10000 /s",
        );
        if !self.args.no_workers {
            let first = rows.iter().map(|r| r.0).min();
            let last = rows.iter().filter_map(|r| r.2).max();
            r.add_full(
                "jobs_per_sec",
                "end-to-end (first submit → last done)",
                span_rate(count(&rows, "succeeded"), first, last),
                "jobs/s",
                format!(
                    "amqp pub+consume+ack {} /s",
                    lim(r.limit(probes::AMQP_ROUNDTRIP))
                ),
                "≥ 5000 jobs/s",
            );
        }
        http_latency(r, &sub.http_ms, false);
        if !self.args.no_workers {
            submit_to_start(r, &rows, false);
        }
        Ok(n)
    }

    /// N job.submit.v1 messages to `<p>.submit`, confirms in flight.
    async fn queue(&mut self) -> anyhow::Result<usize> {
        let n = self.args.jobs;
        self.api().await;
        self.scheduler().await;
        self.workers(self.args.workers).await;
        let started_at = Utc::now();
        let t = Instant::now();
        let cpu = CpuSnap::take();
        let confirm_ms = publish_to_ingress(self.env, self.args).await?;
        let secs = t.elapsed().as_secs_f64();
        let sub = Submitted {
            http_ms: Vec::new(),
            accepted: confirm_ms.len(),
            rejected: 0,
            secs,
        };
        let rows = self.finished_rows("queue", &sub, deadline(n)).await?;
        self.cpu = Some((cpu.until(&CpuSnap::take()), sub.accepted));
        let r = &mut self.report;
        r.add_full(
            "accepted_per_sec",
            "publish to <p>.submit, confirmed/s",
            Some(sub.accepted as f64 / secs),
            "/s",
            format!("amqp confirms {} /s", lim(r.limit(probes::AMQP_CONFIRMS))),
            "",
        );
        let last = rows.iter().filter_map(|r| r.2).max();
        r.add_full(
            "jobs_per_sec",
            "end-to-end (first publish → last done)",
            span_rate(count(&rows, "succeeded"), Some(started_at), last),
            "jobs/s",
            format!(
                "amqp pub+consume+ack {} /s",
                lim(r.limit(probes::AMQP_ROUNDTRIP))
            ),
            "≥ 5000 jobs/s",
        );
        r.add(
            "confirm_p50_ms",
            "publish→confirm p50",
            percentile(&confirm_ms, 0.5),
            "ms",
        );
        r.add(
            "confirm_p99_ms",
            "publish→confirm p99",
            percentile(&confirm_ms, 0.99),
            "ms",
        );
        submit_to_start(r, &rows, false);
        Ok(n)
    }

    /// A fixed offered rate over HTTP, open loop.
    async fn latency(&mut self) -> anyhow::Result<usize> {
        let rate = self.args.rate;
        if rate <= 0.0 || !rate.is_finite() {
            bail!("--rate must be positive");
        }
        let secs = self.args.seconds_or(10);
        let total = (rate * secs as f64).round() as usize;
        let api = self.api().await;
        self.scheduler().await;
        self.workers(self.args.workers).await;

        let url = api.v1("/jobs/submit");
        let sent = Arc::new(AtomicUsize::new(0));
        let progress = progress_task("latency", "sent", sent.clone(), total);
        let t0 = tokio::time::Instant::now();
        let cpu = CpuSnap::take();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..total {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            let (http, url, key) = (api.http.clone(), url.clone(), self.key.clone());
            let body = job_body(self.args, i);
            set.spawn(async move {
                let t = Instant::now();
                let ok = match http.post(&url).bearer_auth(&key).json(&body).send().await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        ok && resp.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                (t.elapsed().as_secs_f64() * 1e3, ok)
            });
            sent.fetch_add(1, Ordering::Relaxed);
        }
        let send_secs = t0.elapsed().as_secs_f64();
        let mut http_ms = Vec::with_capacity(total);
        let mut rejected = 0;
        while let Some(res) = set.join_next().await {
            let (lat, ok) = res.context("a request task failed")?;
            http_ms.push(lat);
            rejected += usize::from(!ok);
        }
        progress.abort();
        let sub = Submitted {
            accepted: http_ms.len() - rejected,
            rejected,
            http_ms,
            secs: send_secs,
        };
        let rows = self.finished_rows("latency", &sub, deadline(total)).await?;
        self.cpu = Some((cpu.until(&CpuSnap::take()), sub.accepted));
        let r = &mut self.report;
        r.add_full(
            "offered_per_sec",
            "offered rate (requests sent/s)",
            Some(total as f64 / send_secs),
            "/s",
            "",
            format!("{rate:.0} /s"),
        );
        let first = rows.iter().map(|r| r.0).min();
        let last = rows.iter().filter_map(|r| r.2).max();
        r.add(
            "jobs_per_sec",
            "end-to-end (first submit → last done)",
            span_rate(count(&rows, "succeeded"), first, last),
            "jobs/s",
        );
        submit_to_start(r, &rows, true);
        http_latency(r, &sub.http_ms, true);
        Ok(total)
    }

    /// K every-second tasks, S schedulers, 1 worker.
    async fn schedule(&mut self) -> anyhow::Result<usize> {
        let k = self.args.tasks;
        let secs = self.args.seconds_or(20);
        if secs < 5 {
            bail!("--seconds must be at least 5 for schedule (the window drops 2 s at each end)");
        }
        let api = self.api().await;
        self.workers(1).await;
        eprintln!("schedule: creating {k} tasks");
        let task_ids = create_tasks(&api, &self.key, k).await?;
        let mut schedulers = Vec::new();
        let start = Utc::now();
        let t = Instant::now();
        for _ in 0..self.args.schedulers {
            schedulers.push(self.scheduler().await);
        }
        // The CPU of the firing phase, per job fired in it (and run by the
        // worker meanwhile).
        let cpu = CpuSnap::take();
        let mut fired_in_phase = 0;
        while t.elapsed() < Duration::from_secs(secs) {
            let left = Duration::from_secs(secs).saturating_sub(t.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            meter::own();
            let fired: i64 =
                sqlx::query_scalar("SELECT count(*) FROM jobs WHERE task_id IS NOT NULL")
                    .fetch_one(&self.env.pool)
                    .await?;
            eprintln!(
                "schedule: {:.0}/{secs} s, {fired} jobs fired",
                t.elapsed().as_secs_f64()
            );
            fired_in_phase = usize::try_from(fired).unwrap_or(0);
        }
        let end = Utc::now();
        self.cpu = Some((cpu.until(&CpuSnap::take()), fired_in_phase));
        // Fires near the window's end may still be due; give the schedulers
        // a grace so that "missed" means more than 7 s late or never.
        eprintln!("schedule: {SCHEDULE_GRACE:?} grace for late fires");
        tokio::time::sleep(SCHEDULE_GRACE).await;
        for i in schedulers {
            self.env.stop(i).await;
        }
        // Let the worker finish what was fired last.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let w0 = start + chrono::Duration::seconds(2);
        let w1 = end - chrono::Duration::seconds(2);
        // Whole-second fire times inside the window.
        let first = w0.timestamp() + i64::from(w0.timestamp_subsec_nanos() > 0);
        let last = w1.timestamp();
        let fire_secs = (last - first + 1).max(0);
        meter::own();
        let rows: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>, String)> = sqlx::query_as(
            "SELECT task_id, fire_at, submitted_at, status FROM jobs
             WHERE task_id = ANY($1) AND fire_at IS NOT NULL",
        )
        .bind(&task_ids)
        .fetch_all(&self.env.pool)
        .await
        .context("read task jobs")?;
        let total_jobs = rows.len();
        let mut pairs: HashMap<(Uuid, i64), usize> = HashMap::new();
        let mut lateness = Vec::new();
        for (task, fire_at, submitted_at, _) in &rows {
            let s = fire_at.timestamp();
            if (first..=last).contains(&s) {
                *pairs.entry((*task, s)).or_default() += 1;
                lateness.push(ms(*fire_at, *submitted_at));
            }
        }
        let expected = k as i64 * fire_secs;
        let fired_in_window = lateness.len();
        let missed = expected - pairs.len() as i64;
        let doubled = pairs.values().filter(|&&c| c > 1).count();
        let succeeded = rows.iter().filter(|r| r.3 == "succeeded").count();
        let r = &mut self.report;
        r.add("tasks", "tasks (every second)", Some(k as f64), "");
        r.add(
            "window_secs",
            "measured window (start+2 s … end−2 s)",
            Some(fire_secs as f64),
            "s",
        );
        r.add(
            "expected",
            "expected fires in window",
            Some(expected as f64),
            "",
        );
        r.add(
            "fired",
            "fires in window (jobs)",
            Some(fired_in_window as f64),
            "",
        );
        r.add(
            "jobs_total",
            "task jobs, whole run",
            Some(total_jobs as f64),
            "",
        );
        r.add(
            "completed",
            "task jobs succeeded",
            Some(succeeded as f64),
            "",
        );
        r.add_full(
            "fires_per_sec",
            "fires per second in window",
            (fire_secs > 0).then(|| fired_in_window as f64 / fire_secs as f64),
            "/s",
            format!("offered: {k} tasks × 1/s"),
            "1000 /s (--tasks 1000)",
        );
        r.add_full(
            "lateness_p50_ms",
            "submitted_at − fire_at p50",
            percentile(&lateness, 0.5),
            "ms",
            "",
            "",
        );
        r.add_full(
            "lateness_p99_ms",
            "submitted_at − fire_at p99",
            percentile(&lateness, 0.99),
            "ms",
            "",
            "≤ 20 ms",
        );
        r.add(
            "lateness_max_ms",
            "submitted_at − fire_at max",
            max(&lateness),
            "ms",
        );
        r.add_full(
            "missed",
            "missed (task, fire_at): >7 s late/never",
            Some(missed as f64),
            "",
            "",
            "0",
        );
        r.add_full(
            "doubled",
            "doubled (task, fire_at)",
            Some(doubled as f64),
            "",
            "",
            "0",
        );
        Ok(total_jobs)
    }

    /// Per-job Postgres transactions and broker messages.
    fn costs(&mut self, c: Costs, jobs: usize) {
        let r = &mut self.report;
        let per = |v: f64| (jobs > 0).then(|| v / jobs as f64);
        r.add(
            "pg_xacts",
            "pg transactions (services, whole run)",
            Some(c.xacts as f64),
            "",
        );
        r.add_full(
            "pg_xacts_per_job",
            "pg transactions per job",
            per(c.xacts as f64),
            "",
            format!("{} commits/s (1 conn)", lim(r.limit(probes::PG_COMMITS))),
            "≤ 3",
        );
        let p = c.published;
        r.add(
            "broker_msgs",
            "broker messages published (whole run)",
            Some(p.total() as f64),
            "",
        );
        r.add_full(
            "broker_msgs_per_job",
            "broker messages per job",
            per(p.total() as f64),
            "",
            format!("{} confirms/s", lim(r.limit(probes::AMQP_CONFIRMS))),
            "≤ 1.25",
        );
        r.add(
            "work_msgs_per_job",
            "  of which <p>.work (job runs)",
            per(p.work as f64),
            "",
        );
        r.add(
            "event_msgs_per_job",
            "  of which <p>.events",
            per(p.events as f64),
            "",
        );
        r.add(
            "other_msgs_per_job",
            "  of which <p>.control + <p>.dead",
            per((p.control + p.dead) as f64),
            "",
        );
        r.notes.push(
            "per-job costs cover the services from their start to their stop \
             (startup, idle polling and, for schedule, task creation included); \
             the bench's own queries are subtracted; messages are counted by \
             temporary queues bound to <p>.work (key any), <p>.events (#), \
             <p>.control (#) and <p>.dead"
                .into(),
        );
    }

    /// Busy share of the machine's CPU (%) from which a run counts as held
    /// by the CPU rather than by waiting.
    const CPU_BOUND_PCT: f64 = 85.0;

    /// Where the CPU went in the measured phase, per job, and the rate the
    /// machine's cores would allow at that cost: when the machine was near
    /// fully busy, the CPU is the ceiling and these say who spends it.
    fn cpu_figures(&mut self) {
        let Some((u, jobs)) = self.cpu else {
            return;
        };
        if jobs == 0 || u.secs <= 0.0 {
            return;
        }
        let r = &mut self.report;
        let cores = r.limit(probes::CPUS).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        let per = |cpu_s: f64| Some(cpu_s * 1e3 / jobs as f64);
        r.add_full(
            "cpu_busy_pct",
            "machine CPU busy (measured phase)",
            Some(u.busy_share * 100.0),
            "%",
            format!("{cores:.0} cores"),
            "",
        );
        r.add(
            "cpu_ms_per_job_taskhost",
            "CPU/job: taskhost process",
            per(u.own),
            "ms",
        );
        r.add(
            "cpu_ms_per_job_children",
            "CPU/job: job processes (sh -c)",
            per(u.children),
            "ms",
        );
        r.add(
            "cpu_ms_per_job_postgres",
            "CPU/job: postgres",
            per(u.postgres),
            "ms",
        );
        r.add(
            "cpu_ms_per_job_broker",
            "CPU/job: rabbitmq",
            per(u.broker),
            "ms",
        );
        let total_ms = u.total() * 1e3 / jobs as f64;
        let ceiling = (total_ms > 0.0).then(|| cores * 1e3 / total_ms);
        r.add_full(
            "cpu_ceiling_jobs_per_sec",
            "CPU ceiling (cores ÷ CPU/job)",
            ceiling,
            "jobs/s",
            format!("{total_ms:.3} ms CPU/job in all"),
            "",
        );
        // The scenario's own rate against that ceiling, and whether the CPU
        // is what held it there (a machine with idle cores was held by
        // something else: batches waiting on round trips, too few slots).
        let rate = r
            .value("jobs_per_sec")
            .or_else(|| r.value("accepted_per_sec"))
            .or_else(|| r.value("fires_per_sec"));
        let busy = self.rate_busy.unwrap_or(u.busy_share) * 100.0;
        r.add_full(
            "cpu_ceiling_share_pct",
            "reached (rate ÷ CPU ceiling)",
            rate.zip(ceiling).map(|(rate, c)| rate / c * 100.0),
            "%",
            if busy >= Self::CPU_BOUND_PCT {
                format!("the CPU sets the ceiling ({busy:.0} % busy)")
            } else {
                format!("not CPU-bound ({busy:.0} % busy)")
            },
            "≥ 70 % where a target is out of reach",
        );
        r.notes.push(
            "CPU figures cover the measured phase (burn: workers start → last \
             done; http, queue, latency: first submission → last done; \
             schedule: schedulers start → end of the run, per job fired), read \
             from /proc; \"taskhost process\" is the in-process api, scheduler \
             and workers together with the bench's own HTTP client"
                .into(),
        );
    }

    /// RSS of a `taskhost worker` child process after it has been idle 2 s.
    async fn idle_rss(&mut self) {
        let value = match measure_idle_rss(self.env).await {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("bench: worker idle RSS not measured: {e:#}");
                None
            }
        };
        self.report.add_full(
            "worker_idle_rss_mib",
            "worker idle RSS (child process)",
            value,
            "MiB",
            "",
            "≤ 30 MiB",
        );
    }
}

/// What a submit phase did.
struct Submitted {
    http_ms: Vec<f64>,
    accepted: usize,
    rejected: usize,
    secs: f64,
}

fn job_body(args: &BenchArgs, n: usize) -> Value {
    json!({"jobName": "bench", "command": args.command_for(n), "executionMode": args.mode.as_str()})
}

/// Prints `label: x/total what` on stderr every second until aborted.
fn progress_task(
    label: &'static str,
    what: &'static str,
    done: Arc<AtomicUsize>,
    total: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            eprintln!(
                "{label}: {}/{total} {what}",
                done.load(Ordering::Relaxed).min(total)
            );
        }
    })
}

/// N submissions over `--concurrency` keep-alive connections, each client
/// taking the next index (closed loop).
async fn submit_closed(
    api: &Api,
    key: &str,
    args: &BenchArgs,
    n: usize,
    label: &'static str,
) -> anyhow::Result<Submitted> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = progress_task(label, "submitted", done.clone(), n);
    let url = api.v1("/jobs/submit");
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, done, http, url, key) = (
            next.clone(),
            done.clone(),
            api.http.clone(),
            url.clone(),
            key.to_owned(),
        );
        let args = args.clone();
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rejected = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let body = job_body(&args, i);
                let t = Instant::now();
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await?;
                let ok = resp.status().is_success();
                let _ = resp.bytes().await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                rejected += usize::from(!ok);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok((lat, rejected))
        }));
    }
    let mut http_ms = Vec::with_capacity(n);
    let mut rejected = 0;
    for c in clients {
        let (lat, rej) = c.await??;
        http_ms.extend(lat);
        rejected += rej;
    }
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    let accepted = http_ms.len() - rejected;
    if accepted == 0 {
        bail!("no job was accepted ({rejected} rejected)");
    }
    eprintln!("{label}: {accepted} accepted, {rejected} rejected in {secs:.2} s");
    Ok(Submitted {
        http_ms,
        accepted,
        rejected,
        secs,
    })
}

/// Publishes `--jobs` job.submit.v1 messages to `<p>.submit` with up to
/// CONFIRM_WINDOW confirms in flight; returns each publish → confirm time.
async fn publish_to_ingress(env: &TestEnv, args: &BenchArgs) -> anyhow::Result<Vec<f64>> {
    let names = env.names();
    let conn = amqp::connect(AMQP_URL, "bench-ingress").await?;
    let result = async {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        amqp::declare_topology(&ch, &names).await?;
        let mut window = VecDeque::new();
        let mut latencies = Vec::with_capacity(args.jobs);
        let mut last_print = Instant::now();
        for i in 0..args.jobs {
            let body = json!({"userId": USER, "jobName": format!("bench{i}"),
                              "command": args.command_for(i), "executionMode": args.mode.as_str()});
            let props = lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type("job.submit.v1".into())
                .with_message_id(Uuid::now_v7().to_string().into());
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
            if last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!("queue: {}/{} published", i + 1, args.jobs);
                last_print = Instant::now();
            }
        }
        while let Some((t, c)) = window.pop_front() {
            ensure_ack(c.await?)?;
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::Ok(latencies)
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

fn ensure_ack(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => bail!("the broker refused a submit message"),
    }
}

/// Creates `k` every-second inline noop tasks over the API; their ids.
async fn create_tasks(api: &Api, key: &str, k: usize) -> anyhow::Result<Vec<Uuid>> {
    let url = api.v1("/tasks");
    let results: Vec<anyhow::Result<Uuid>> = futures_util::stream::iter(0..k)
        .map(|i| {
            let (http, url, key) = (api.http.clone(), url.clone(), key.to_owned());
            async move {
                let body = json!({
                    "taskName": format!("bench-{i}"),
                    "command": "noop",
                    "executionMode": "inline",
                    "schedule": "* * * * * *",
                    "overlapPolicy": "allow",
                });
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await?;
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!("POST /tasks answered {status}: {v}");
                }
                let id = v["taskId"]
                    .as_str()
                    .or_else(|| v["task"]["taskId"].as_str())
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("no taskId in {v}"))?;
                Ok(id)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Polls `sql` (a count) until it reaches `target` or the deadline passes;
/// progress on stderr every second. Returns the last count.
async fn wait_count(
    pool: &PgPool,
    label: &str,
    what: &str,
    wait: Wait,
    target: usize,
    deadline: Duration,
) -> anyhow::Result<usize> {
    let t = Instant::now();
    let mut last_print = Instant::now();
    let count = || async {
        meter::own();
        let n: i64 = sqlx::query_scalar(wait.count).fetch_one(pool).await?;
        anyhow::Ok(n as usize)
    };
    loop {
        meter::own();
        let any_left: bool = sqlx::query_scalar(wait.any_left).fetch_one(pool).await?;
        if !any_left {
            let n = count().await?;
            if n >= target {
                eprintln!("{label}: {n}/{target} {what}");
                return Ok(n);
            }
        }
        if t.elapsed() > deadline {
            let n = count().await?;
            eprintln!(
                "{label}: deadline {deadline:?} passed with {n}/{target} {what}; reporting what finished"
            );
            return Ok(n);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!("{label}: {}/{target} {what}", count().await?);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deadline(jobs: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(20) * jobs as u32
}

async fn read_rows(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
    meter::own();
    sqlx::query_as(
        "SELECT submitted_at, started_at, completed_at, status FROM jobs WHERE user_id = 'bench'",
    )
    .fetch_all(pool)
    .await
    .context("read jobs")
}

fn ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3
}

fn count(rows: &[Row], status: &str) -> usize {
    rows.iter().filter(|r| r.3 == status).count()
}

/// `n / (last − first)` per second.
fn span_rate(n: usize, first: Option<DateTime<Utc>>, last: Option<DateTime<Utc>>) -> Option<f64> {
    let (f, l) = (first?, last?);
    let secs = ms(f, l) / 1e3;
    (secs > 0.0).then(|| n as f64 / secs)
}

fn lim(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

fn job_counts(r: &mut Report, sub: &Submitted, rows: &[Row]) {
    let succeeded = count(rows, "succeeded");
    let failed = count(rows, "failed");
    r.add("accepted", "jobs accepted", Some(sub.accepted as f64), "");
    r.add("rejected", "jobs rejected", Some(sub.rejected as f64), "");
    r.add("completed", "jobs succeeded", Some(succeeded as f64), "");
    r.add("failed", "jobs failed", Some(failed as f64), "");
    r.add(
        "other",
        "jobs not finished (or other status)",
        Some((rows.len() - succeeded - failed) as f64),
        "",
    );
}

fn http_latency(r: &mut Report, http_ms: &[f64], with_max: bool) {
    r.add(
        "http_p50_ms",
        "HTTP submit latency p50",
        percentile(http_ms, 0.5),
        "ms",
    );
    r.add(
        "http_p99_ms",
        "HTTP submit latency p99",
        percentile(http_ms, 0.99),
        "ms",
    );
    if with_max {
        r.add("http_max_ms", "HTTP submit latency max", max(http_ms), "ms");
    }
}

fn submit_to_start(r: &mut Report, rows: &[Row], full: bool) {
    let v: Vec<f64> = rows.iter().filter_map(|r| Some(ms(r.0, r.1?))).collect();
    r.add_full(
        "submit_to_start_p50_ms",
        "submit→start p50",
        percentile(&v, 0.5),
        "ms",
        "",
        "≤ 2 ms at 1000/s offered",
    );
    if full {
        r.add(
            "submit_to_start_p95_ms",
            "submit→start p95",
            percentile(&v, 0.95),
            "ms",
        );
    }
    r.add_full(
        "submit_to_start_p99_ms",
        "submit→start p99",
        percentile(&v, 0.99),
        "ms",
        "",
        "≤ 10 ms at 1000/s offered",
    );
    if full {
        r.add("submit_to_start_max_ms", "submit→start max", max(&v), "ms");
    }
}

/// Spawns `taskhost worker` (this binary) on the run's database and prefix,
/// waits until its node is registered, lets it idle 2 s, reads VmRSS.
async fn measure_idle_rss(env: &TestEnv) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("current_exe")?;
    let node = format!("{}-rss", env.prefix);
    let mut child = tokio::process::Command::new(exe)
        .arg("worker")
        .envs(env.env())
        .env("TASKHOST__WORKER__NODE_NAME", &node)
        .env("TASKHOST__LOG__LEVEL", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn taskhost worker")?;
    let result = async {
        let pool = PgPool::connect(&env.db_url()).await?;
        let t = Instant::now();
        loop {
            let active: Option<bool> =
                sqlx::query_scalar("SELECT is_active FROM nodes WHERE node_name = $1")
                    .bind(&node)
                    .fetch_optional(&pool)
                    .await?;
            if active == Some(true) {
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!("the worker child never registered");
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("the worker child exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pool.close().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = child.id().context("worker child pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        anyhow::Ok(kb / 1024.0)
    }
    .await;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    result
}
