//! Command-line arguments and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use taskhost_common::Settings;

use crate::{bench, client, console, serve};

/// taskhost: a distributed job and task runner.
#[derive(Debug, Parser)]
#[command(name = "taskhost", version, about)]
pub(crate) struct Args {
    /// TOML settings file (also TASKHOST_CONFIG).
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve the HTTP API.
    Api,
    /// Run a worker node.
    Worker(WorkerArgs),
    /// Run the scheduler (outbox relay, queue ingress, reaper).
    Scheduler,
    /// Apply pending migrations, then run api, scheduler and a worker in one process.
    Standalone(WorkerArgs),
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Submit a job through the API.
    Submit(Box<client::SubmitArgs>),
    /// List your finished jobs, newest first.
    Results(client::ResultsArgs),
    /// List jobs across the system (admins: every user's), filtered, newest first.
    Jobs(Box<console::JobsArgs>),
    /// List the worker nodes.
    Nodes(console::NodesArgs),
    /// Show one job, follow its output, re-run, cancel or delete it.
    #[command(subcommand)]
    Job(client::JobCommand),
    /// List, show, create, edit, enable, disable, delete and run recurring
    /// tasks, or show their history.
    #[command(subcommand)]
    Tasks(client::TasksCommand),
    /// Keep a replica (another PostgreSQL or an SQLite file) of the task
    /// tables up to date from the change feed, or verify one.
    Sync(Box<SyncArgs>),
    /// Benchmark on a fresh database and prefix of the local Postgres and
    /// RabbitMQ (see docs/benchmark.md).
    Bench(Box<bench::BenchArgs>),
    /// Print the HTTP API's OpenAPI document, as the api serves it at
    /// /openapi.json (`taskhost openapi > api/openapi.json` refreshes the
    /// committed copy).
    Openapi,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Node name (default: hostname); the node id is kept per name.
    #[arg(long)]
    pub(crate) node_name: Option<String>,
    /// Node group.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Node role.
    #[arg(long)]
    pub(crate) role: Option<String>,
    /// Slots for pool and inline jobs.
    #[arg(long)]
    pub(crate) concurrency: Option<usize>,
}

/// `taskhost sync`: apply the change feed to a replica.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct SyncArgs {
    #[command(subcommand)]
    pub(crate) verify: Option<SyncCommand>,
    #[command(flatten)]
    pub(crate) target: SyncTarget,
    /// Apply everything up to the head of the feed, then exit (the default).
    #[arg(long, conflicts_with = "follow")]
    pub(crate) once: bool,
    /// Keep following the feed until stopped (SIGINT/SIGTERM).
    #[arg(long)]
    pub(crate) follow: bool,
    /// With --follow: how often to look for new changes, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub(crate) interval_ms: u64,
    /// Changes applied per target transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub(crate) batch: i64,
}

/// The replica `taskhost sync` works on.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SyncTarget {
    /// The replica: a postgres:// URL, or an SQLite file (sqlite:PATH or a path).
    #[arg(long, required = true)]
    pub(crate) into: Option<String>,
    /// Comma-separated tables: tasks, task_schedule, nodes, jobs.
    #[arg(long, default_value = "tasks,task_schedule,nodes")]
    pub(crate) tables: String,
    /// The replica's name on the source (sync_state consumer `replica:<name>`;
    /// default: the database or file name).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum SyncCommand {
    /// Compare source and replica: row counts and a checksum per table, and
    /// the primary keys of rows that differ (exit 1 when any differ).
    Verify(SyncTarget),
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; prints it once, alone on stdout.
    Create {
        /// The user the key acts for.
        #[arg(long)]
        user: String,
        /// Comma-separated roles: debug, task_manager, system_admin, site_admin.
        #[arg(long, default_value = "")]
        roles: String,
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id.
    Revoke {
        /// Key id.
        id: uuid::Uuid,
    },
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    Ok(Settings::load(args.config.as_deref())?)
}

pub(crate) async fn dispatch(args: Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Submit(a) => return client::submit(a).await,
        Command::Results(a) => return client::results(a).await,
        Command::Jobs(a) => return console::jobs(a).await,
        Command::Nodes(a) => return console::nodes(a).await,
        Command::Job(c) => return client::job(c).await,
        Command::Tasks(c) => return client::tasks(c).await,
        Command::Bench(a) => return bench::run((**a).clone()).await,
        Command::Openapi => {
            outln!("{}", taskhost_api::openapi_json().trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("taskhost: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match args.command {
        Command::Api => serve::api(settings).await,
        Command::Worker(w) => serve::worker(apply_worker_args(settings, &w)?).await,
        Command::Scheduler => serve::scheduler(settings).await,
        Command::Standalone(w) => serve::standalone(apply_worker_args(settings, &w)?).await,
        Command::Migrate => serve::migrate(settings).await,
        Command::Keys(k) => serve::keys(settings, k).await,
        Command::Sync(a) => serve::sync(settings, *a).await,
        Command::Submit(_)
        | Command::Results(_)
        | Command::Job(_)
        | Command::Jobs(_)
        | Command::Nodes(_)
        | Command::Tasks(_)
        | Command::Bench(_)
        | Command::Openapi => Ok(ExitCode::SUCCESS),
    }
}

fn apply_worker_args(mut s: Settings, w: &WorkerArgs) -> anyhow::Result<Settings> {
    if let Some(v) = &w.node_name {
        s.worker.node_name.clone_from(v);
    }
    if let Some(v) = &w.group {
        s.worker.group.clone_from(v);
    }
    if let Some(v) = &w.role {
        s.worker.role.clone_from(v);
    }
    if let Some(v) = w.concurrency {
        s.worker.concurrency = v;
    }
    s.validate()?;
    Ok(s)
}
