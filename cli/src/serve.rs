//! The service subcommands: api, worker, scheduler, standalone, migrate, keys.

use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use taskhost_common::{Settings, db, keys, shutdown, telemetry};

use crate::cli::KeysCommand;

fn start(settings: &Settings) -> taskhost_common::CancellationToken {
    telemetry::init(&settings.log);
    shutdown::on_signals()
}

pub(crate) async fn api(settings: Settings) -> anyhow::Result<ExitCode> {
    let stop = start(&settings);
    taskhost_api::run(settings, stop).await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn worker(settings: Settings) -> anyhow::Result<ExitCode> {
    let stop = start(&settings);
    taskhost_worker::run(settings, stop).await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn scheduler(settings: Settings) -> anyhow::Result<ExitCode> {
    let stop = start(&settings);
    taskhost_scheduler::run(settings, stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// All three services in one process, after applying pending migrations.
pub(crate) async fn standalone(settings: Settings) -> anyhow::Result<ExitCode> {
    let stop = start(&settings);
    let report = db::migrate(&settings.database)
        .await
        .context("applying migrations")?;
    tracing::info!(
        applied = report.applied,
        created_database = report.created_database,
        "schema ready"
    );
    let (a, s, w) = tokio::join!(
        taskhost_api::run(settings.clone(), stop.clone()),
        taskhost_scheduler::run(settings.clone(), stop.clone()),
        taskhost_worker::run(settings.clone(), stop.clone()),
    );
    // One failing service stops the others.
    for r in [a, s, w] {
        if let Err(e) = r {
            stop.cancel();
            return Err(e);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn migrate(settings: Settings) -> anyhow::Result<ExitCode> {
    telemetry::init(&settings.log);
    let report = db::migrate(&settings.database).await?;
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
    let pool = db::pool(&settings.database)?;
    db::ensure_current(&pool).await?;
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
            println!("{secret}");
        }
        KeysCommand::List => {
            println!(
                "{:<36}  {:<16}  {:<28}  {:<20}  {:<20}  REVOKED",
                "ID", "USER", "ROLES", "CREATED", "LAST USED"
            );
            let fmt = |t: Option<DateTime<Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                )
            };
            for k in keys::list(&pool).await? {
                println!(
                    "{:<36}  {:<16}  {:<28}  {:<20}  {:<20}  {}",
                    k.key_id,
                    k.user_id,
                    k.roles.join(","),
                    fmt(Some(k.created_at)),
                    fmt(k.last_used_at),
                    fmt(k.revoked_at)
                );
            }
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
