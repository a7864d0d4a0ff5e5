//! `taskhost bench`: end-to-end benchmarks against the local Postgres and
//! RabbitMQ. Every run gets a fresh database and AMQP prefix
//! (taskhost-testkit), starts the api, scheduler(s) and workers in-process,
//! and drops the database and the prefix's broker objects at the end, also
//! after an error, a panic or Ctrl-C. See docs/benchmark.md.

mod cpu;
mod meter;
mod probes;
mod report;
mod scenarios;
mod suite;

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

use anyhow::anyhow;
use futures_util::FutureExt;
use taskhost_common::config::{LogFormat, LogSettings};
use taskhost_common::telemetry;
use taskhost_testkit::TestEnv;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// Queue N jobs with no worker, then start the workers and measure how
    /// fast they drain the queue.
    Burn,
    /// N submissions over C concurrent HTTP connections, workers running.
    Http,
    /// N job.submit.v1 messages published to `<p>.submit`.
    Queue,
    /// A fixed offered rate over HTTP (open loop); submit→start latency.
    Latency,
    /// K every-second cron tasks; fire lateness, missed and doubled fires.
    Schedule,
    /// Every scenario of the README's Performance list, one after another,
    /// as one Markdown table beside the targets (`--readme FILE` writes it
    /// into FILE).
    Suite,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Burn => "burn",
            Scenario::Http => "http",
            Scenario::Queue => "queue",
            Scenario::Latency => "latency",
            Scenario::Schedule => "schedule",
            Scenario::Suite => "suite",
        }
    }
}

/// Execution mode of the bench jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Built-in command in the worker process (no child process).
    Inline,
    /// A shell child per job, in a worker slot.
    Pool,
    /// A shell child per job, in a background slot.
    Background,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Pool => "pool",
            Mode::Background => "background",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub(crate) scenario: Scenario,
    /// Jobs to submit (burn, http, queue).
    #[arg(long, default_value_t = 3000)]
    pub(crate) jobs: usize,
    /// Concurrent HTTP connections submitting (burn, http).
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// In-process workers.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Slots per worker (`worker.concurrency`).
    #[arg(long, default_value_t = 16)]
    pub(crate) slots: usize,
    /// Deliveries each worker holds at once (`worker.prefetch`; 0: the
    /// slots, so waiting jobs stay in the broker where priorities apply).
    #[arg(long, default_value_t = 0)]
    pub(crate) prefetch: usize,
    /// Execution mode of the jobs.
    #[arg(long, value_enum, default_value = "inline")]
    pub(crate) mode: Mode,
    /// The command (default `noop` for inline, `true` otherwise); a literal
    /// `{n}` is replaced by the job index.
    #[arg(long)]
    pub(crate) command: Option<String>,
    /// Database pool size of each service.
    #[arg(long, default_value_t = 20)]
    pub(crate) db_connections: u32,
    /// Print one JSON object with every figure, limit and target.
    #[arg(long)]
    pub(crate) json: bool,
    /// Skip the machine probes (and the worker idle RSS).
    #[arg(long)]
    pub(crate) skip_probes: bool,
    /// http: start no worker; measures the submit path alone.
    #[arg(long)]
    pub(crate) no_workers: bool,
    /// latency: offered jobs per second.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// latency (default 10) and schedule (default 20): run length.
    #[arg(long)]
    pub(crate) seconds: Option<u64>,
    /// schedule: every-second tasks to create.
    #[arg(long, default_value_t = 200)]
    pub(crate) tasks: usize,
    /// schedule: scheduler instances.
    #[arg(long, default_value_t = 2)]
    pub(crate) schedulers: usize,
    /// suite: write the table into this file, between its
    /// `<!-- bench suite: begin … -->` and `<!-- bench suite: end -->` lines.
    #[arg(long, value_name = "FILE")]
    pub(crate) readme: Option<std::path::PathBuf>,
    /// suite: small sizes (100 jobs, 3 s runs, 10 tasks for 5 s), to check that
    /// every run works, not to measure.
    #[arg(long)]
    pub(crate) quick: bool,
}

impl BenchArgs {
    /// The command as given (or its default), `{n}` not yet replaced.
    fn command_template(&self) -> &str {
        self.command.as_deref().unwrap_or(match self.mode {
            Mode::Inline => "noop",
            Mode::Pool | Mode::Background => "true",
        })
    }

    /// The command of job `n`.
    fn command_for(&self, n: usize) -> String {
        self.command_template().replace("{n}", &n.to_string())
    }

    fn seconds_or(&self, default: u64) -> u64 {
        self.seconds.unwrap_or(default)
    }
}

/// Runs the bench (or, for `suite`, every scenario of the README's list).
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    telemetry::init(&LogSettings {
        format: LogFormat::Human,
        // lapin logs an ERROR for every orderly connection close and sqlx
        // warns about the slow DROP DATABASE; RUST_LOG shows them again.
        level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,lapin=off,sqlx=error".into()),
    });
    if args.scenario == Scenario::Suite {
        suite::run(&args).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.readme.is_some() || args.quick {
        return Err(anyhow!(
            "--readme and --quick belong to `taskhost bench suite`"
        ));
    }
    let report = run_one(&args).await?;
    if args.json {
        outln!("{}", report.to_json());
    } else {
        report.print_table();
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one scenario on its own database and prefix, and always cleans
/// them up.
async fn run_one(args: &BenchArgs) -> anyhow::Result<report::Report> {
    // TestEnv::new panics when Postgres is unreachable; keep that an error.
    let mut env = match tokio::spawn(TestEnv::new()).await {
        Ok(env) => env,
        Err(e) => return Err(anyhow!("cannot prepare a bench database: {e}")),
    };
    eprintln!(
        "bench: database {}, AMQP prefix {}",
        env.db_name, env.prefix
    );
    let outcome = {
        let fut = AssertUnwindSafe(scenarios::run(&mut env, args)).catch_unwind();
        tokio::select! {
            r = fut => match r {
                Ok(r) => r,
                Err(panic) => Err(anyhow!("bench panicked: {}", panic_message(&panic))),
            },
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    };
    eprintln!(
        "bench: cleaning up database {} and prefix {}",
        env.db_name, env.prefix
    );
    env.cleanup().await;
    outcome
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into())
}
