//! Dispatching accepted jobs: their outbox messages are published with
//! confirms in flight together and then marked (jobs `pending` → `queued`,
//! through [`crate::store::publish`]); whatever is not confirmed is left
//! for the scheduler's outbox relay ([`relay_outbox`]). The writes to the
//! job rows themselves live in [`crate::store`]; the names below are
//! re-exported from there for the api, the ingress and the scheduler.

use sqlx::PgPool;

use crate::amqp::{Outgoing, Publisher};
use crate::batch::Batcher;
pub use crate::events::job_event;
use crate::messages::JobEvent;
pub use crate::store::accept::{
    Accepted, NO_NODE_REASON, NewJob, OutboxMessage, PlainJob, TaskRun, accept, accept_batch,
    accept_in, insert_outbox, insert_outbox_delayed, matching_active_nodes,
};
pub use crate::store::publish::mark_queued;

/// Publishes events after the change they describe was committed, as
/// batched `job.events.v1` messages (see [`crate::events`]). Events are
/// notifications: they are not confirmed and a failure is logged, never
/// retried (the durable record is `task_history` and `data_change`).
pub async fn publish_events(publisher: &Publisher, events: &[JobEvent]) {
    if events.is_empty() {
        return;
    }
    if let Err(error) = publisher
        .publish_unconfirmed(&crate::events::messages(events))
        .await
    {
        tracing::debug!(%error, count = events.len(), "events not published");
    }
}
/// Publishes committed outbox rows with confirms in flight together, then
/// marks the confirmed ones (and their jobs `pending` → `queued`). Returns
/// how many were confirmed; the rest stay for the relay.
pub async fn publish_outbox(
    pool: &PgPool,
    publisher: &Publisher,
    rows: &[OutboxMessage],
    changed_by: &str,
) -> Result<usize, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let counts = publish_and_mark(pool, publisher, &[(rows, changed_by)]).await?;
    Ok(counts.first().copied().unwrap_or(0))
}

/// Publishes the rows of every group (rows and the author of their change
/// rows) with confirms in flight together, then marks the confirmed ones in
/// one transaction and publishes their `job.queued` events. Returns how
/// many rows of each group the broker confirmed.
async fn publish_and_mark(
    pool: &PgPool,
    publisher: &Publisher,
    groups: &[(&[OutboxMessage], &str)],
) -> Result<Vec<usize>, sqlx::Error> {
    let confirmed = publish_groups(publisher, groups).await;
    let counts = confirmed.iter().map(|(rows, _)| rows.len()).collect();
    let events = mark_groups(pool, &confirmed).await?;
    publish_events(publisher, &events).await;
    Ok(counts)
}

/// Publishes the rows of every group with their confirms in flight
/// together; returns each group's confirmed rows with its author.
async fn publish_groups(
    publisher: &Publisher,
    groups: &[(&[OutboxMessage], &str)],
) -> Vec<(Vec<OutboxMessage>, String)> {
    let outgoing: Vec<Outgoing> = groups
        .iter()
        .flat_map(|(rows, _)| rows.iter().map(OutboxMessage::to_outgoing))
        .collect();
    let mut results = publisher.publish_all(&outgoing).await.into_iter();
    groups
        .iter()
        .map(|(rows, by)| {
            let confirmed = rows
                .iter()
                .filter(|row| match results.next() {
                    Some(Ok(())) => true,
                    Some(Err(error)) => {
                        tracing::warn!(%error, outbox_id = row.outbox_id, "publish failed; the relay will retry");
                        false
                    }
                    None => false,
                })
                .cloned()
                .collect();
            (confirmed, (*by).to_owned())
        })
        .collect()
}

/// Marks confirmed rows published (jobs `pending` → `queued`) in one
/// transaction; returns their `job.queued` events to publish.
async fn mark_groups(
    pool: &PgPool,
    confirmed: &[(Vec<OutboxMessage>, String)],
) -> Result<Vec<JobEvent>, sqlx::Error> {
    if confirmed.iter().all(|(rows, _)| rows.is_empty()) {
        return Ok(Vec::new());
    }
    // Losing this commit in a Postgres crash is harmless (see
    // crate::db::begin_no_fsync_wait), so it does not wait for the disk.
    let mut tx = crate::db::begin_no_fsync_wait(pool).await?;
    let mut events = Vec::new();
    // One statement set per distinct author (usually one or a few).
    let mut authors: Vec<&str> = confirmed.iter().map(|(_, by)| by.as_str()).collect();
    authors.sort_unstable();
    authors.dedup();
    for author in authors {
        let rows: Vec<&OutboxMessage> = confirmed
            .iter()
            .filter(|(_, by)| by == author)
            .flat_map(|(rows, _)| rows.iter())
            .collect();
        events.extend(mark_queued(&mut tx, &rows, author).await?);
    }
    tx.commit().await?;
    Ok(events)
}

/// One pass of the outbox relay: publishes unpublished rows older than
/// `grace_ms`, locking them so several relays never publish the same row at
/// once. Returns how many were confirmed.
pub async fn relay_outbox(
    pool: &PgPool,
    publisher: &Publisher,
    grace_ms: u64,
    batch: i64,
) -> Result<usize, sqlx::Error> {
    // Losing this commit in a Postgres crash is harmless (see
    // crate::db::begin_no_fsync_wait), so it does not wait for the disk.
    let mut tx = crate::db::begin_no_fsync_wait(pool).await?;
    let rows: Vec<OutboxMessage> = sqlx::query_as(
        "SELECT outbox_id, exchange, routing_key, message_type, message_id, priority, payload::text AS payload, job_id,
                traceparent
         FROM outbox
         WHERE published_at IS NULL AND available_at <= now()
           AND created_at < now() - make_interval(secs => $1::float8 / 1000.0)
         ORDER BY outbox_id
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(grace_ms as f64)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut outgoing: Vec<Outgoing> = rows.iter().map(OutboxMessage::to_outgoing).collect();
    let spans = relay_spans(publisher, &rows, &mut outgoing);
    let results = publisher.publish_all(&outgoing).await;
    drop(spans);
    crate::failpoint::hit("relay.after_publish");
    let mut confirmed = Vec::new();
    for (row, result) in rows.iter().zip(&results) {
        match result {
            Ok(()) => confirmed.push(row),
            Err(e) => {
                sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE outbox_id = $1")
                    .bind(row.outbox_id)
                    .bind(e.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    let queued = mark_queued(&mut tx, &confirmed, "outbox-relay").await?;
    tx.commit().await?;
    publish_events(publisher, &queued).await;
    Ok(confirmed.len())
}

/// Tracing (README, "Tracing"): for each row that carries a trace, this
/// relay's `publish` span, a child of the stored context, whose own
/// `traceparent` the message carries instead, so the trace shows the hop
/// the relay made. Nothing when tracing is off here (the stored
/// `traceparent` then travels as it is).
fn relay_spans(
    publisher: &Publisher,
    rows: &[OutboxMessage],
    outgoing: &mut [Outgoing],
) -> Vec<tracing::Span> {
    if !crate::telemetry::enabled() {
        return Vec::new();
    }
    let mut spans = Vec::new();
    for (row, out) in rows.iter().zip(outgoing.iter_mut()) {
        let (Some(stored), Some(job_id)) = (row.traceparent.as_deref(), row.job_id) else {
            continue;
        };
        let destination = publisher.names().exchange(&row.exchange);
        let span = crate::telemetry::publish_span(&destination, &row.routing_key, job_id);
        crate::telemetry::set_parent(&span, Some(stored), None);
        span.record("taskhost.outbox.relay", true);
        if let Some(own) = crate::telemetry::traceparent(&span) {
            for (name, value) in &mut out.headers {
                if name == crate::telemetry::TRACEPARENT {
                    *value = own.clone();
                }
            }
        }
        spans.push(span);
    }
    spans
}

/// One submission's committed outbox rows, for the [`PublishBatcher`].
#[derive(Debug, Clone)]
struct PublishRequest {
    rows: Vec<OutboxMessage>,
    changed_by: String,
}

/// Publishes committed outbox rows for many concurrent submissions
/// together: one burst of publishes with their confirms in flight, then one
/// transaction that marks them all published (jobs `pending` → `queued`,
/// with their change rows). While a batch is out, the next one gathers, so
/// the batch size follows the load with no timer.
#[derive(Clone)]
pub struct PublishBatcher {
    inner: std::sync::Arc<Batcher<PublishRequest, Result<usize, String>>>,
}

/// Submissions one batch takes at most.
const PUBLISH_BATCH: usize = 256;

impl PublishBatcher {
    /// Starts the batching task (it ends when every handle is dropped).
    pub fn spawn(pool: PgPool, publisher: std::sync::Arc<Publisher>) -> Self {
        // Two batches may be out at once. A batch answers once the broker
        // confirmed its messages; marking them `queued` happens later, off
        // the answer's path (see [`spawn_marker`]; a lost mark only makes
        // the relay publish the message again, which the claim absorbs). A
        // failed batch is never retried request by request (that would
        // publish its messages again): each request is answered with the
        // batch's outcome.
        let marker = spawn_marker(pool, crate::events::EventSink::spawn(publisher.clone()));
        let inner = Batcher::spawn(PUBLISH_BATCH, 2, move |batch: Vec<PublishRequest>| {
            let (publisher, marker) = (publisher.clone(), marker.clone());
            async move {
                let groups: Vec<(&[OutboxMessage], &str)> = batch
                    .iter()
                    .map(|r| (r.rows.as_slice(), r.changed_by.as_str()))
                    .collect();
                let confirmed = publish_groups(&publisher, &groups).await;
                let counts: Vec<Result<usize, String>> =
                    confirmed.iter().map(|(rows, _)| Ok(rows.len())).collect();
                // The marker outlives every batcher handle; a send after it
                // stopped (shutdown) leaves the rows to the relay.
                let _ = marker.send(confirmed);
                Ok(counts)
            }
        });
        Self {
            inner: std::sync::Arc::new(inner),
        }
    }

    /// Publishes `rows` (committed) and marks them; returns how many the
    /// broker confirmed. What is not confirmed stays for the relay.
    pub async fn publish(
        &self,
        rows: Vec<OutboxMessage>,
        changed_by: &str,
    ) -> Result<usize, String> {
        if rows.is_empty() {
            return Ok(0);
        }
        let request = PublishRequest {
            rows,
            changed_by: changed_by.to_owned(),
        };
        self.inner.call(request).await?
    }
}

/// How long after the broker's confirm published jobs are marked `queued`.
/// A worker usually takes a job sooner and moves it from `pending` itself
/// (docs/state_machine.md), so the mark then only records its outbox row as
/// published: it no longer competes with the claim for the job's row lock
/// (a claim that meets a locked row waits for it), and the job has no
/// `queued` change row or event. A job still waiting is marked as before.
const MARK_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// Publish batches one mark takes at most.
const MARK_MAX: usize = 64;

/// Starts the task that marks confirmed outbox rows (and their jobs still
/// `pending`) [`MARK_AFTER`] the first of them was confirmed, gathering
/// every batch confirmed meanwhile into one transaction, and queues their
/// `job.queued` events on `sink`. When every sender is gone it marks what
/// it holds at once and ends; rows it never marks (a crash) are published
/// again by the relay.
fn spawn_marker(
    pool: PgPool,
    sink: crate::events::EventSink,
) -> tokio::sync::mpsc::UnboundedSender<Vec<(Vec<OutboxMessage>, String)>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(Vec<OutboxMessage>, String)>>();
    tokio::spawn(async move {
        let mut batches = Vec::new();
        while crate::batch::gather(&mut rx, &mut batches, MARK_MAX, MARK_AFTER).await > 0 {
            let confirmed: Vec<(Vec<OutboxMessage>, String)> =
                batches.drain(..).flatten().collect();
            match mark_groups(&pool, &confirmed).await {
                Ok(events) => sink.send_all(events),
                Err(error) => {
                    tracing::warn!(%error, "marking published jobs failed; the relay will finish them");
                }
            }
        }
    });
    tx
}

/// Starts the batcher that accepts [`PlainJob`]s (the api and the queue
/// ingress share it).
pub fn plain_accepter(pool: PgPool) -> Batcher<PlainJob, Accepted> {
    Batcher::spawn(256, 2, move |jobs: Vec<PlainJob>| {
        let pool = pool.clone();
        async move {
            accept_batch(&pool, &jobs)
                .await
                .map_err(|e| crate::db::describe(&e))
        }
    })
}
