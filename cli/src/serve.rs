//! The service subcommands: api, worker, scheduler, standalone, migrate, keys.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use taskhost_common::{Settings, db, keys, shutdown, startup, telemetry};

use crate::cli::{KeysCommand, SyncArgs, SyncCommand, SyncTarget};
use taskhost_common::replica::{self, Replica, ReplicaError, Target};

/// Logs, the trace exporter (README, "Tracing") with `component` as the
/// default `service.name`, and the shutdown token.
fn start(
    settings: &Settings,
    component: &str,
) -> anyhow::Result<(taskhost_common::CancellationToken, telemetry::Tracing)> {
    let tracing = telemetry::init_traced(&settings.log, &settings.telemetry, component)
        .map_err(startup::StartupError)?;
    Ok((shutdown::on_signals(), tracing))
}

/// Exports the spans still buffered, whether the service ended well or
/// not, then hands on its result.
async fn finish(
    tracing: telemetry::Tracing,
    result: anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    tracing.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn api(settings: Settings) -> anyhow::Result<ExitCode> {
    let (stop, tracing) = start(&settings, "taskhost-api")?;
    let result = taskhost_api::run(settings, stop).await;
    finish(tracing, result).await
}

pub(crate) async fn worker(settings: Settings) -> anyhow::Result<ExitCode> {
    let (stop, tracing) = start(&settings, "taskhost-worker")?;
    let result = taskhost_worker::run(settings, stop).await;
    finish(tracing, result).await
}

pub(crate) async fn scheduler(settings: Settings) -> anyhow::Result<ExitCode> {
    let (stop, tracing) = start(&settings, "taskhost-scheduler")?;
    let result = taskhost_scheduler::run(settings, stop).await;
    finish(tracing, result).await
}

/// All three services in one process, after applying pending migrations.
/// Everything that can stop it is checked first (the API port, Postgres,
/// RabbitMQ), so a mistake ends in one line within seconds; once running,
/// a service that fails stops the other two.
pub(crate) async fn standalone(settings: Settings) -> anyhow::Result<ExitCode> {
    let (stop, tracing) = start(&settings, "taskhost-standalone")?;
    let result = standalone_services(settings, stop).await;
    finish(tracing, result).await
}

async fn standalone_services(
    settings: Settings,
    stop: taskhost_common::CancellationToken,
) -> anyhow::Result<()> {
    let listener = startup::bind(&settings.api.bind).await?;
    let report = db::migrate(&settings.database)
        .await
        .map_err(|e| startup::StartupError(startup::explain(&settings.database.url, &e)))?;
    tracing::info!(
        applied = report.applied,
        created_database = report.created_database,
        "schema ready"
    );
    startup::reach_broker(&settings.amqp, "taskhost-standalone start-up check").await?;
    // One process, one metrics registry: the api's `/metrics`, `/livez` and
    // `/readyz` cover the worker and the scheduler, which serve no port of
    // their own here.
    let mut settings = settings;
    settings.worker.metrics_bind = "off".to_owned();
    settings.scheduler.metrics_bind = "off".to_owned();
    let mut services = tokio::task::JoinSet::new();
    services.spawn(taskhost_api::run_on(
        listener,
        settings.clone(),
        stop.clone(),
    ));
    services.spawn(taskhost_scheduler::run(settings.clone(), stop.clone()));
    services.spawn(taskhost_worker::run(settings, stop.clone()));
    let mut failed = None;
    while let Some(done) = services.join_next().await {
        // The first service to end, for whatever reason, ends the others.
        stop.cancel();
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result
            && failed.is_none()
        {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(crate) async fn migrate(settings: Settings) -> anyhow::Result<ExitCode> {
    telemetry::init(&settings.log);
    let report = db::migrate(&settings.database)
        .await
        .map_err(|e| startup::StartupError(startup::explain(&settings.database.url, &e)))?;
    if report.created_database {
        eprintln!("created database");
    }
    eprintln!(
        "applied {} migration(s); schema is current ({} in all)",
        report.applied, report.total
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn keys(settings: Settings, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let pool = startup::database(&settings.database, 2).await?;
    match cmd {
        KeysCommand::Create { user, roles, name } => {
            let roles = match keys::parse_roles(&roles) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("taskhost: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let (key, secret) = match keys::create(&pool, &user, &roles, &name).await {
                Ok(k) => k,
                Err(keys::KeyError::Db(e)) => return Err(e.into()),
                Err(e) => {
                    eprintln!("taskhost: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            eprintln!(
                "created key {} for user {} with roles [{}]; it is shown once, store it now:",
                key.key_id,
                key.user_id,
                key.roles.join(",")
            );
            outln!("{secret}");
        }
        KeysCommand::List => {
            let fmt = |t: Option<DateTime<Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                )
            };
            let mut table = crate::console::table(&[
                "ID",
                "USER",
                "NAME",
                "PREFIX",
                "ROLES",
                "CREATED",
                "LAST USED",
                "REVOKED",
            ]);
            for k in keys::list(&pool).await? {
                table.add_row(vec![
                    k.key_id.to_string(),
                    k.user_id,
                    if k.name.is_empty() {
                        "-".to_owned()
                    } else {
                        k.name
                    },
                    k.prefix,
                    k.roles.join(","),
                    fmt(Some(k.created_at)),
                    fmt(k.last_used_at),
                    fmt(k.revoked_at),
                ]);
            }
            crate::console::print_table(&table);
        }
        KeysCommand::Revoke { id } => {
            if keys::revoke(&pool, id).await? {
                eprintln!("revoked key {id}");
            } else {
                eprintln!("taskhost: no active key with id {id}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn open_replica(
    settings: &Settings,
    target: &SyncTarget,
    batch: i64,
) -> anyhow::Result<Result<Replica, ExitCode>> {
    let fail = |e: ReplicaError| {
        eprintln!("taskhost sync: {e}");
        Ok(Err(ExitCode::from(2)))
    };
    let Some(url) = target.into.as_deref() else {
        eprintln!("taskhost sync: --into is required");
        return Ok(Err(ExitCode::from(2)));
    };
    let tables = match replica::parse_tables(&target.tables) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let name = target
        .name
        .clone()
        .unwrap_or_else(|| replica::default_name(url));
    if let Err(e) = replica::check_name(&name) {
        return fail(e);
    }
    let source = startup::database(&settings.database, 2).await?;
    let into = match Target::open(url).await {
        Ok(t) => t,
        Err(e) => {
            // The URL may hold a password: name the replica, not the URL.
            eprintln!("taskhost sync: cannot open the replica {name}: {e}");
            return Ok(Err(ExitCode::from(1)));
        }
    };
    match Replica::prepare(source, into, &tables, &name, batch).await {
        Ok(r) => Ok(Ok(r)),
        Err(ReplicaError::Invalid(m)) => {
            eprintln!("taskhost sync: {m}");
            Ok(Err(ExitCode::from(1)))
        }
        Err(e) => Err(e.into()),
    }
}

fn summary_line(tables: &[String], s: &replica::PassSummary) -> String {
    let snap: Vec<String> = s
        .snapshots
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    let snap = if snap.is_empty() {
        String::new()
    } else {
        format!("; snapshot copied rows {}", snap.join(" "))
    };
    format!(
        "synced: {} change(s) applied, {} conflict(s); tables {}; cursor {} (head {}){snap}",
        s.applied,
        s.conflicts,
        tables.join(","),
        s.cursor,
        s.head
    )
}

/// `taskhost sync` and `taskhost sync verify`.
pub(crate) async fn sync(settings: Settings, args: SyncArgs) -> anyhow::Result<ExitCode> {
    telemetry::init(&settings.log);
    if let Some(SyncCommand::Verify(target)) = &args.verify {
        let replica = match open_replica(&settings, target, args.batch).await? {
            Ok(r) => r,
            Err(code) => return Ok(code),
        };
        let report = replica.verify().await?;
        for t in &report.tables {
            if t.differing.is_empty() {
                outln!(
                    "{}: equal ({} rows, checksum {})",
                    t.table,
                    t.source_rows,
                    t.source_checksum
                );
            } else {
                let shown: Vec<&str> = t.differing.iter().take(50).map(String::as_str).collect();
                let more = t.differing.len().saturating_sub(shown.len());
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                outln!(
                    "{}: DIFFERENT (source {} rows, checksum {}; replica {} rows, checksum {}); rows that differ: {}{more}",
                    t.table,
                    t.source_rows,
                    t.source_checksum,
                    t.replica_rows,
                    t.replica_checksum,
                    shown.join(", ")
                );
            }
        }
        outln!("conflicts recorded on the replica: {}", report.conflicts);
        for (seq, table, key, action) in &report.recent_conflicts {
            outln!("  conflict: change {seq} {action} {table} {key}");
        }
        return Ok(if report.equal() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let replica = match open_replica(&settings, &args.target, args.batch).await? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let tables = replica.tables();
    if !args.follow {
        let s = replica.run_once().await?;
        outln!("{}", summary_line(&tables, &s));
        return Ok(ExitCode::SUCCESS);
    }
    let stop = shutdown::on_signals();
    let interval = std::time::Duration::from_millis(args.interval_ms);
    tracing::info!(tables = %tables.join(","), interval_ms = args.interval_ms, "replica: following the change feed");
    while !stop.is_cancelled() {
        match replica.run_once().await {
            Ok(s) if s.applied > 0 || !s.snapshots.is_empty() => {
                outln!("{}", summary_line(&tables, &s));
            }
            Ok(_) => {}
            Err(ReplicaError::Invalid(m)) => {
                eprintln!("taskhost sync: {m}");
                return Ok(ExitCode::from(1));
            }
            Err(e) => tracing::warn!(error = %e, "replica: pass failed; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}
