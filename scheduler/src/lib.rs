//! The taskhost scheduler: fires due recurring tasks, relays the outbox,
//! consumes the ingress queue, reaps dead nodes and expired claims, and
//! prunes old rows. Every duty is safe with several
//! schedulers running against one database (rows are claimed with
//! `FOR UPDATE SKIP LOCKED`). It never executes commands.
//!
//! - [`run`] runs all duties until shutdown.
//! - [`cron`] fires due tasks, one pass per [`cron::tick`].
//! - [`ingress`] turns `<p>.submit` messages into jobs.
//! - [`reaper`] handles dead nodes and expired claims.
//! - [`retention`] prunes old rows.
//! - The change relay publishes the `data_change` feed onto `<p>.events`
//!   (`taskhost_common::sync`).

pub mod cron;
pub mod ingress;
pub mod reaper;
pub mod retention;

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use taskhost_common::amqp::{Names, Publisher};
use taskhost_common::jobs;
use taskhost_common::{CancellationToken, Settings, db};

/// Runs every scheduler duty until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database).context("database.url")?;
    db::ensure_current(&pool).await?;
    let names = Names::new(settings.amqp.prefix.clone());
    let publisher = Publisher::new(settings.amqp.url.clone(), names, "taskhost-scheduler");
    tracing::info!("scheduler started");
    tokio::join!(
        tick_loop(&pool, &publisher, &settings, &shutdown),
        retention_loop(&pool, &settings, &shutdown),
        relay_loop(&pool, &publisher, &settings, &shutdown),
        reaper_loop(&pool, &publisher, &settings, &shutdown),
        ingress::run(pool.clone(), &settings, shutdown.clone()),
        change_relay_loop(&pool, &publisher, &settings, &shutdown),
    );
    publisher.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}

async fn relay_loop(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &Settings,
    shutdown: &CancellationToken,
) {
    let every = Duration::from_millis(settings.scheduler.relay_interval_ms.max(10));
    loop {
        match jobs::relay_outbox(pool, publisher, settings.scheduler.relay_grace_ms, 500).await {
            // A full batch means more may be waiting: go again at once.
            Ok(n) if n >= 500 && !shutdown.is_cancelled() => continue,
            Ok(n) if n > 0 => tracing::info!(published = n, "outbox relay published messages"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox relay pass failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Publishes the change feed onto `<p>.events` as
/// `change.<table>.<action>` (the `events` cursor in `sync_state`).
async fn change_relay_loop(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &Settings,
    shutdown: &CancellationToken,
) {
    if !settings.sync.relay_events {
        return;
    }
    let every = Duration::from_millis(settings.sync.interval_ms);
    let batch = i64::from(settings.sync.batch);
    let watermark = taskhost_common::sync::Watermark::new();
    loop {
        match taskhost_common::sync::relay_once(pool, &watermark, publisher, batch).await {
            // A full batch means more may be waiting: go again at once.
            Ok(pass) if pass.published as i64 >= batch && !shutdown.is_cancelled() => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "change relay pass failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn reaper_loop(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &Settings,
    shutdown: &CancellationToken,
) {
    let every = Duration::from_secs(settings.scheduler.reaper_interval_secs.max(1));
    let dead_after = settings.worker.heartbeat_secs as f64
        * f64::from(settings.scheduler.dead_after_missed_heartbeats);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match reaper::reap(pool, dead_after).await {
            Ok(r) => {
                if r.dead_nodes > 0 || !r.requeued_jobs.is_empty() {
                    tracing::info!(
                        dead_nodes = r.dead_nodes,
                        requeued_jobs = r.requeued_jobs.len(),
                        "reaper pass"
                    );
                }
                let events: Vec<_> = r
                    .requeued_jobs
                    .iter()
                    .map(|(id, attempt)| {
                        jobs::job_event(
                            *id,
                            taskhost_common::model::JobStatus::Queued,
                            *attempt,
                            None,
                            None,
                        )
                    })
                    .collect();
                jobs::publish_events(publisher, &events).await;
            }
            Err(error) => tracing::warn!(%error, "reaper pass failed"),
        }
    }
}

async fn tick_loop(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &Settings,
    shutdown: &CancellationToken,
) {
    let every = Duration::from_millis(settings.scheduler.tick_ms);
    let policy = cron::TickPolicy {
        misfire_grace: chrono::Duration::seconds(settings.scheduler.misfire_grace_secs as i64),
    };
    loop {
        match cron::tick(pool, chrono::Utc::now(), policy).await {
            Ok(report) => {
                let dead: Vec<_> = report
                    .dead_jobs
                    .iter()
                    .map(|id| {
                        jobs::job_event(*id, taskhost_common::model::JobStatus::Dead, 0, None, None)
                    })
                    .collect();
                jobs::publish_events(publisher, &dead).await;
                if let Err(error) =
                    jobs::publish_outbox(pool, publisher, &report.outbox, "scheduler").await
                {
                    tracing::warn!(%error, "publishing fired jobs failed; the relay will publish them");
                }
            }
            Err(error) => tracing::warn!(%error, "scheduler tick failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn retention_loop(pool: &PgPool, settings: &Settings, shutdown: &CancellationToken) {
    let every = Duration::from_secs(settings.retention.interval_secs);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match retention::prune(pool, &settings.retention).await {
            Ok(p) => tracing::info!(
                succeeded_jobs = p.succeeded_jobs,
                failed_jobs = p.failed_jobs,
                changes = p.changes,
                outbox = p.outbox,
                "retention pass"
            ),
            Err(error) => tracing::warn!(%error, "retention pass failed"),
        }
    }
}
