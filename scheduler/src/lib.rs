//! The taskhost scheduler: fires due recurring tasks, relays the outbox,
//! consumes the ingress queue, reaps dead nodes and expired claims, and
//! prunes old rows. Every duty is safe with several
//! schedulers running against one database (rows are claimed with
//! `FOR UPDATE SKIP LOCKED`). It never executes commands.
//!
//! - [`run`] runs all duties until shutdown.
//! - [`cron`] fires due tasks, one pass per [`cron::tick`]; the loop sleeps
//!   until the next due fire time or a task change (LISTEN `taskhost_tasks`).
//! - [`ingress`] turns `<p>.submit` messages into jobs.
//! - [`reaper`] handles dead nodes and expired claims.
//! - [`retention`] prunes old rows.
//! - The webhook loop sends the notification outbox
//!   (`taskhost_common::notify::deliver_due`).
//! - The change relay publishes the `data_change` feed onto `<p>.events`
//!   (`taskhost_common::sync`).

pub mod cron;
pub mod ingress;
pub mod reaper;
pub mod retention;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use taskhost_common::amqp::{Names, Publisher};
use taskhost_common::{CancellationToken, Settings, db, metrics};
use taskhost_common::{jobs, tasks};
use tokio::sync::Notify;

/// Runs every scheduler duty until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    taskhost_common::startup::check_services(&settings, "taskhost-scheduler start-up check")
        .await?;
    let pool = db::pool(&settings.database).context("database.url")?;
    let names = Names::new(settings.amqp.prefix.clone());
    let publisher = Publisher::new(&settings.amqp, names, "taskhost-scheduler");
    metrics::register_scheduler();
    let broker = metrics::BrokerLink::new("scheduler");
    // Health and metrics stop when this function returns, after the duties.
    let ops = CancellationToken::new();
    let _ops = ops.clone().drop_guard();
    if let Some(bind) = metrics::bind_address(&settings.scheduler.metrics_bind) {
        metrics::serve(bind, "scheduler.metrics_bind", probes(&pool, &broker), ops).await?;
    }
    tracing::info!("scheduler started");
    tokio::join!(
        tick_loop(&pool, &publisher, &settings, &shutdown),
        retention_loop(&pool, &settings, &shutdown),
        relay_loop(&pool, &publisher, &settings, &shutdown),
        reaper_loop(&pool, &publisher, &settings, &shutdown),
        ingress::run(pool.clone(), &settings, broker.clone(), shutdown.clone()),
        change_relay_loop(&pool, &publisher, &settings, &shutdown),
        webhook_loop(&pool, &settings, &shutdown),
    );
    publisher.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// `/readyz` of a scheduler: Postgres answers and the ingress consumer is
/// connected to the broker; `/metrics` reads the relay, change-feed and
/// node gauges from Postgres at scrape time.
fn probes(pool: &PgPool, broker: &Arc<metrics::BrokerLink>) -> metrics::Probes {
    let (ready_pool, refresh_pool) = (pool.clone(), pool.clone());
    let broker = broker.clone();
    metrics::Probes {
        component: "scheduler",
        ready: Arc::new(move || {
            let (pool, broker) = (ready_pool.clone(), broker.clone());
            Box::pin(async move {
                let database = metrics::database_up(&pool).await;
                vec![("database", database), ("broker", broker.is_up())]
            })
        }),
        refresh: Some(Arc::new(move || {
            let pool = refresh_pool.clone();
            Box::pin(async move { refresh_gauges(&pool).await })
        })),
    }
}

/// The gauges an operator alerts on, read at scrape time: relay lag and
/// outbox backlog, change-feed consumer lag, nodes by group and state.
async fn refresh_gauges(pool: &PgPool) {
    let outbox: Result<(f64, i64), _> = sqlx::query_as(
        "SELECT coalesce(extract(epoch FROM now() - min(available_at))::float8, 0),
                count(*)
         FROM outbox WHERE published_at IS NULL AND available_at <= now()",
    )
    .fetch_one(pool)
    .await;
    ::metrics::gauge!("taskhost_database_up").set(if outbox.is_ok() { 1.0 } else { 0.0 });
    let Ok((lag, pending)) = outbox else { return };
    ::metrics::gauge!("taskhost_relay_lag_seconds").set(lag.max(0.0));
    ::metrics::gauge!("taskhost_outbox_pending").set(pending as f64);
    if let Ok(mut conn) = pool.acquire().await {
        let head = taskhost_common::sync::Watermark::new()
            .safe_head_local(&mut conn)
            .await;
        if let Ok(head) = head
            && let Ok(consumers) = taskhost_common::sync::status(&mut conn, head).await
        {
            for c in consumers {
                let labels = [("consumer", c.consumer), ("table", c.table_name)];
                ::metrics::gauge!("taskhost_change_feed_lag", &labels).set(c.lag as f64);
                ::metrics::gauge!("taskhost_change_feed_lag_seconds", &labels).set(c.lag_seconds);
            }
        }
    }
    metrics::record_nodes(pool).await;
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
            Ok(n) if n >= 500 && !shutdown.is_cancelled() => {
                ::metrics::counter!("taskhost_relay_published_total").increment(n as u64);
                continue;
            }
            Ok(n) if n > 0 => {
                ::metrics::counter!("taskhost_relay_published_total").increment(n as u64);
                tracing::info!(published = n, "outbox relay published messages");
            }
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

/// Sends due webhook deliveries every `notifications.interval_ms` (at once
/// again while passes find a full batch). Idle when no secret is set.
async fn webhook_loop(pool: &PgPool, settings: &Settings, shutdown: &CancellationToken) {
    let secret = settings.notifications.secret.clone();
    if secret.is_empty() {
        return;
    }
    let client = taskhost_common::notify::client();
    let every = Duration::from_millis(settings.notifications.interval_ms.max(10));
    loop {
        let pass = tokio::select! {
            pass = taskhost_common::notify::deliver_due(
                pool, &client, &secret, settings.notifications.max_attempts,
            ) => pass,
            () = shutdown.cancelled() => return,
        };
        match pass {
            Ok(p) if p.attempted() >= 32 && !shutdown.is_cancelled() => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "webhook delivery pass failed"),
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
                    // A node died or lost its claims: worth an operator's look.
                    tracing::warn!(
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

/// How long the tick loop waits before it looks again when due rows are
/// locked by another scheduler's pass (that scheduler fires them).
const CONTENDED_WAIT: Duration = Duration::from_millis(20);

/// Fires due tasks: one pass ([`cron::tick`]), then, unless the pass was
/// full, sleeps until the earliest `next_run` of an enabled task (at most
/// `scheduler.tick_ms`), or until a task write wakes it (NOTIFY
/// `taskhost_tasks`, see [`listen_loop`]). A full pass is followed by the
/// next one at once while its outbox rows are published.
async fn tick_loop(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &Settings,
    shutdown: &CancellationToken,
) {
    let max_sleep = Duration::from_millis(settings.scheduler.tick_ms);
    let policy = cron::TickPolicy {
        misfire_grace: chrono::Duration::seconds(settings.scheduler.misfire_grace_secs as i64),
    };
    let wake = Notify::new();
    let listener = listen_loop(&settings.database.url, &wake, shutdown);
    let ticks = async {
        // The fire time the loop slept until: the pass runs "at" it even if
        // the local clock reads a hair earlier, so `next_run <= now` holds.
        let mut target: Option<DateTime<Utc>> = None;
        // Outbox rows of a full pass, published while the next pass runs.
        let mut carry: Vec<jobs::OutboxMessage> = Vec::new();
        loop {
            let now = target.take().map_or_else(Utc::now, |t| t.max(Utc::now()));
            let (result, ()) = tokio::join!(
                cron::tick(pool, now, policy),
                publish_fired(pool, publisher, std::mem::take(&mut carry)),
            );
            let mut stuck = 0;
            let mut failed = false;
            let mut fired = Vec::new();
            match result {
                Ok(report) => {
                    ::metrics::gauge!("taskhost_scheduler_last_pass_timestamp_seconds")
                        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                    let dead: Vec<_> = report
                        .dead_jobs
                        .iter()
                        .map(|id| {
                            jobs::job_event(
                                *id,
                                taskhost_common::model::JobStatus::Dead,
                                0,
                                None,
                                None,
                            )
                        })
                        .collect();
                    jobs::publish_events(publisher, &dead).await;
                    if report.more && !shutdown.is_cancelled() {
                        carry = report.outbox;
                        continue;
                    }
                    stuck = report.stuck;
                    fired = report.outbox;
                }
                Err(error) => {
                    failed = true;
                    tracing::warn!(%error, "scheduler tick failed");
                }
            }
            let (next, ()) = tokio::join!(
                cron::next_due(pool, now),
                publish_fired(pool, publisher, fired),
            );
            let wait = match next {
                _ if failed => max_sleep.min(Duration::from_secs(1)),
                Ok(next) if next.due_now > stuck as i64 => CONTENDED_WAIT,
                Ok(cron::NextDue { next: Some(at), .. }) => {
                    // The fire instant on the local monotonic clock (the
                    // database's clock and ours are assumed to agree).
                    let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    if wait <= max_sleep {
                        target = Some(at);
                    }
                    wait.min(max_sleep)
                }
                Ok(_) => max_sleep,
                Err(error) => {
                    tracing::warn!(%error, "reading the next due time failed");
                    max_sleep.min(Duration::from_secs(1))
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::now() + wait) => {}
                () = wake.notified() => {
                    target = None;
                    tracing::debug!("scheduler woken by a task change");
                }
                () = shutdown.cancelled() => return,
            }
        }
    };
    tokio::join!(listener, ticks);
}

/// Publishes a pass's committed outbox rows; what fails stays for the
/// relay.
async fn publish_fired(pool: &PgPool, publisher: &Publisher, rows: Vec<jobs::OutboxMessage>) {
    if rows.is_empty() {
        return;
    }
    if let Err(error) = jobs::publish_outbox(pool, publisher, &rows, "scheduler").await {
        tracing::warn!(%error, "publishing fired jobs failed; the relay will publish them");
    }
}

/// Listens on the `taskhost_tasks` channel (its own connection) and wakes
/// the tick loop on every notification. Whenever the connection is
/// (re)established the loop is woken too, since notifications sent while it
/// was down are lost; meanwhile the loop falls back to its longest sleep.
async fn listen_loop(url: &str, wake: &Notify, shutdown: &CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let connect = async {
            let pool = taskhost_common::db::listener_pool(url)?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(tasks::NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let connected = tokio::select! {
            r = connect => r,
            () = shutdown.cancelled() => return,
        };
        match connected {
            Ok(mut listener) => {
                backoff = Duration::from_millis(250);
                wake.notify_one();
                loop {
                    let received = tokio::select! {
                        r = listener.try_recv() => r,
                        () = shutdown.cancelled() => return,
                    };
                    match received {
                        Ok(Some(_)) => wake.notify_one(),
                        // The connection dropped (and was made again):
                        // anything sent meanwhile is lost.
                        Ok(None) => {
                            tracing::info!("task change listener reconnected");
                            wake.notify_one();
                        }
                        Err(error) => {
                            tracing::warn!(%error, "task change listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "task change listener cannot connect; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
