//! The service subcommands: api, worker, scheduler, standalone, migrate, keys.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use taskhost_common::{Settings, db, keys, shutdown, startup, telemetry};

use crate::cli::KeysCommand;

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
