//! Accepting a job: the job row, its `data_change` INSERT and its outbox
//! message are written in one transaction; the message is then published
//! (fast path) or left for the scheduler's relay. Shared by the HTTP api and
//! the queue ingress so both take exactly the same path.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::amqp::{Outgoing, Publisher};
use crate::batch::Batcher;
use crate::changelog::{self, Action, Change};
use crate::messages::{JOB_RUN_V1, JobEvent, JobRun};
use crate::model::{Fanout, JobSpec, JobStatus, TriggeredBy};

/// Reason recorded when a target matches no active node.
pub const NO_NODE_REASON: &str = "no active node matches the target";

/// A job to accept.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// The job id (UUIDv7, or the ingress message id).
    pub job_id: Uuid,
    /// Owner.
    pub user_id: &'a str,
    /// The validated request.
    pub spec: &'a JobSpec,
    /// What caused it.
    pub triggered_by: TriggeredBy,
    /// `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<&'a str>,
    /// Hash of the request body, to tell a repeat from a conflict.
    pub request_hash: Option<&'a str>,
    /// Recorded as `changed_by` in the change log.
    pub changed_by: &'a str,
    /// The task it runs, when a task fired it.
    pub task: Option<TaskRun>,
}

/// The task side of a job fired by a recurring task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRun {
    /// The task.
    pub task_id: Uuid,
    /// The scheduled fire time (None for a manual run).
    pub fire_at: Option<DateTime<Utc>>,
    /// Retries after a failed or timed-out attempt.
    pub max_retries: i32,
    /// First retry delay; doubled for every further retry.
    pub retry_delay_seconds: i32,
    /// Whether the run is killed at its timeout.
    pub kill_on_timeout: bool,
}

/// What happened to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// New job rows, and the outbox messages to publish for them.
    Created {
        /// The first id is the one answered to the client; fanout adds more.
        job_ids: Vec<Uuid>,
        /// Outbox rows to publish now.
        outbox: Vec<OutboxMessage>,
        /// Status of the jobs (`pending`, or `dead` when no node matches).
        status: JobStatus,
    },
    /// The same job was accepted before (same id, or same idempotency key
    /// and body).
    Duplicate {
        /// The original job.
        job_id: Uuid,
    },
    /// The idempotency key names a job with a different body.
    Conflict,
}

/// A committed outbox row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxMessage {
    /// Row id.
    pub outbox_id: i64,
    /// Logical exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP type.
    pub message_type: String,
    /// AMQP message id.
    pub message_id: String,
    /// Priority.
    pub priority: i16,
    /// Body.
    pub payload: Value,
    /// The job it carries, if any.
    pub job_id: Option<Uuid>,
}

impl OutboxMessage {
    /// The message as published.
    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            message_type: self.message_type.clone(),
            message_id: self.message_id.clone(),
            priority: self.priority.clamp(0, 9) as u8,
            payload: serde_json::to_vec(&self.payload).unwrap_or_default(),
            headers: Vec::new(),
        }
    }
}

pub use crate::events::job_event;

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

/// Inserts an outbox row on `conn`.
pub async fn insert_outbox(
    conn: &mut PgConnection,
    routing_key: &str,
    run: &JobRun,
) -> Result<OutboxMessage, sqlx::Error> {
    insert_outbox_delayed(conn, routing_key, run, 0.0).await
}

/// Inserts an outbox row that the relay publishes only after `delay_secs`.
pub async fn insert_outbox_delayed(
    conn: &mut PgConnection,
    routing_key: &str,
    run: &JobRun,
    delay_secs: f64,
) -> Result<OutboxMessage, sqlx::Error> {
    let payload = serde_json::to_value(run).unwrap_or(Value::Null);
    sqlx::query_as(
        "INSERT INTO outbox (exchange, routing_key, message_type, message_id, priority, payload, job_id, available_at)
         VALUES ('work', $1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
         RETURNING outbox_id, exchange, routing_key, message_type, message_id, priority, payload, job_id",
    )
    .bind(routing_key)
    .bind(JOB_RUN_V1)
    .bind(format!("{}:{}", run.job_id, run.attempt))
    .bind(run.priority)
    .bind(payload)
    .bind(run.job_id)
    .bind(delay_secs)
    .fetch_one(conn)
    .await
}

async fn find_by_idempotency_key(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
) -> Result<Option<(Uuid, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_id, request_hash FROM jobs WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Active nodes a target matches (what a fan-out expands to).
pub async fn matching_active_nodes(
    conn: &mut PgConnection,
    target: &crate::model::Target,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT node_id FROM nodes
         WHERE is_active
           AND ($1::uuid IS NULL OR node_id = $1)
           AND ($2::text IS NULL OR node_group = $2)
           AND ($3::text IS NULL OR node_role = $3)
         ORDER BY node_name",
    )
    .bind(target.node_id)
    .bind(target.node_group.as_deref())
    .bind(target.node_role.as_deref())
    .fetch_all(conn)
    .await
}

/// Accepts a job: one transaction for the row(s), change log and outbox.
pub async fn accept(pool: &PgPool, new: NewJob<'_>) -> Result<Accepted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let accepted = accept_in(&mut tx, &new).await?;
    if matches!(accepted, Accepted::Created { .. }) {
        tx.commit().await?;
    }
    Ok(accepted)
}

/// Accepts a job inside the caller's transaction (a scheduler tick fires
/// many tasks in one). Nothing is written unless it returns `Created`.
pub async fn accept_in(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewJob<'_>,
) -> Result<Accepted, sqlx::Error> {
    if let Some(key) = new.idempotency_key
        && let Some(found) = find_by_idempotency_key(tx, new.user_id, key).await?
    {
        return Ok(duplicate_or_conflict(found, new.request_hash));
    }
    // A fan-out to all nodes becomes one job per active matching node, each
    // routed to its node; the first keeps the requested id.
    let nodes: Vec<Option<Uuid>> = if new.spec.target.fanout == Fanout::All {
        matching_active_nodes(tx, &new.spec.target)
            .await?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None]
    };
    let no_node = nodes.is_empty();
    let status = if no_node {
        JobStatus::Dead
    } else {
        JobStatus::Pending
    };
    let targets = if no_node { vec![None] } else { nodes };

    let mut job_ids = Vec::with_capacity(targets.len());
    let mut outbox = Vec::with_capacity(targets.len());
    for (i, node) in targets.iter().enumerate() {
        let job_id = if i == 0 { new.job_id } else { Uuid::now_v7() };
        let Some((row, submitted_at)) =
            insert_job_row(tx, new, job_id, *node, status, i == 0).await?
        else {
            // A unique index said no: the same id (a repeated ingress
            // message), the same idempotency key (a racing repeat), or the
            // same task fire time (another scheduler fired it).
            if let Some(key) = new.idempotency_key
                && let Some(found) = find_by_idempotency_key(tx, new.user_id, key).await?
            {
                return Ok(duplicate_or_conflict(found, new.request_hash));
            }
            return Ok(Accepted::Duplicate { job_id });
        };
        changelog::record(
            tx,
            Change {
                table: "jobs",
                record_id: job_id.to_string(),
                action: Action::Insert,
                old: None,
                new: Some(&row),
                changed_by: new.changed_by,
                node_id: None,
                reason: Some(if no_node { NO_NODE_REASON } else { "submitted" }),
            },
        )
        .await?;
        if no_node {
            sqlx::query(
                "INSERT INTO task_history (task_id, job_id, attempt, state, is_final, triggered_by, start_time, duration_ms, error)
                 VALUES ($1, $2, 0, 'dead', true, $3, NULL, 0, $4)",
            )
            .bind(new.task.map(|t| t.task_id))
            .bind(job_id)
            .bind(new.triggered_by.as_str())
            .bind(changelog::gzip(NO_NODE_REASON.as_bytes()))
            .execute(&mut **tx)
            .await?;
        } else {
            let routing_key = match node {
                Some(id) => format!("node.{id}"),
                None => new.spec.target.routing_key(),
            };
            let run = JobRun {
                job_id,
                attempt: 0,
                command: new.spec.command.clone(),
                execution_mode: new.spec.execution_mode,
                timeout_seconds: new.spec.timeout_seconds,
                env: new.spec.env.clone(),
                priority: new.spec.priority,
                submitted_at,
            };
            outbox.push(insert_outbox(tx, &routing_key, &run).await?);
        }
        job_ids.push(job_id);
    }
    Ok(Accepted::Created {
        job_ids,
        outbox,
        status,
    })
}

/// A plain submission: no idempotency key, one target (no fan-out), not a
/// task run. These are the bulk of submissions and are accepted in batches.
#[derive(Debug, Clone)]
pub struct PlainJob {
    /// The job id (UUIDv7, or the ingress message id).
    pub job_id: Uuid,
    /// Owner.
    pub user_id: String,
    /// The validated request.
    pub spec: JobSpec,
    /// What caused it.
    pub triggered_by: TriggeredBy,
    /// Recorded as `changed_by` in the change log.
    pub changed_by: String,
}

impl PlainJob {
    /// Whether a submission may take the batched path.
    pub fn fits(spec: &JobSpec, idempotency_key: Option<&str>) -> bool {
        idempotency_key.is_none() && spec.target.fanout == Fanout::One
    }
}

/// Accepts plain submissions together: one transaction with one INSERT of
/// the job rows, one of their change rows and one of their outbox rows, so
/// Postgres does per-batch rather than per-job work. Answers one
/// [`Accepted`] per job, in order (`Duplicate` when the id exists).
pub async fn accept_plain_batch(
    pool: &PgPool,
    jobs: &[PlainJob],
) -> Result<Vec<Accepted>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.job_id).collect();
    let users: Vec<&str> = jobs.iter().map(|j| j.user_id.as_str()).collect();
    let names: Vec<&str> = jobs.iter().map(|j| j.spec.job_name.as_str()).collect();
    let commands: Vec<&str> = jobs.iter().map(|j| j.spec.command.as_str()).collect();
    let descriptions: Vec<&str> = jobs.iter().map(|j| j.spec.description.as_str()).collect();
    let modes: Vec<&str> = jobs
        .iter()
        .map(|j| j.spec.execution_mode.as_str())
        .collect();
    let node_ids: Vec<Option<Uuid>> = jobs.iter().map(|j| j.spec.target.node_id).collect();
    let groups: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.spec.target.node_group.as_deref())
        .collect();
    let roles: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.spec.target.node_role.as_deref())
        .collect();
    let priorities: Vec<i16> = jobs.iter().map(|j| j.spec.priority).collect();
    let timeouts: Vec<Option<i32>> = jobs.iter().map(|j| j.spec.timeout_seconds).collect();
    let envs: Vec<Value> = jobs
        .iter()
        .map(|j| serde_json::to_value(&j.spec.env).unwrap_or(Value::Null))
        .collect();
    let triggers: Vec<&str> = jobs.iter().map(|j| j.triggered_by.as_str()).collect();
    let inserted: Vec<(Uuid, Value, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO jobs (job_id, user_id, job_name, command, description, execution_mode, status,
                           target_node_id, target_node_group, target_node_role, fanout, priority,
                           timeout_seconds, env, triggered_by)
         SELECT id, u, n, c, d, m, 'pending', ni, ng, nr, 'one', p, t, e, tb
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::uuid[], $8::text[], $9::text[], $10::int2[], $11::int4[], $12::jsonb[],
                     $13::text[]) AS x(id, u, n, c, d, m, ni, ng, nr, p, t, e, tb)
         ON CONFLICT DO NOTHING
         RETURNING job_id, to_jsonb(jobs.*), submitted_at",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&names)
    .bind(&commands)
    .bind(&descriptions)
    .bind(&modes)
    .bind(&node_ids)
    .bind(&groups)
    .bind(&roles)
    .bind(&priorities)
    .bind(&timeouts)
    .bind(&envs)
    .bind(&triggers)
    .fetch_all(&mut *tx)
    .await?;
    let by_id: std::collections::HashMap<Uuid, usize> = inserted
        .iter()
        .enumerate()
        .map(|(k, (id, _, _))| (*id, k))
        .collect();
    // Inserted rows, each once (a repeated id in one batch is a duplicate).
    let mut seen = std::collections::HashSet::new();
    let fresh: Vec<&PlainJob> = jobs
        .iter()
        .filter(|j| by_id.contains_key(&j.job_id) && seen.insert(j.job_id))
        .collect();
    let changes: Vec<Change<'_>> = fresh
        .iter()
        .map(|j| Change {
            table: "jobs",
            record_id: j.job_id.to_string(),
            action: Action::Insert,
            old: None,
            new: Some(&inserted[by_id[&j.job_id]].1),
            changed_by: &j.changed_by,
            node_id: None,
            reason: Some("submitted"),
        })
        .collect();
    changelog::record_many(&mut tx, &changes).await?;
    let runs: Vec<JobRun> = fresh
        .iter()
        .map(|j| JobRun {
            job_id: j.job_id,
            attempt: 0,
            command: j.spec.command.clone(),
            execution_mode: j.spec.execution_mode,
            timeout_seconds: j.spec.timeout_seconds,
            env: j.spec.env.clone(),
            priority: j.spec.priority,
            submitted_at: inserted[by_id[&j.job_id]].2,
        })
        .collect();
    let keys: Vec<String> = fresh.iter().map(|j| j.spec.target.routing_key()).collect();
    let message_ids: Vec<String> = runs.iter().map(|r| format!("{}:0", r.job_id)).collect();
    let payloads: Vec<Value> = runs
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    let run_ids: Vec<Uuid> = runs.iter().map(|r| r.job_id).collect();
    let run_priorities: Vec<i16> = runs.iter().map(|r| r.priority).collect();
    let outbox: Vec<OutboxMessage> = sqlx::query_as(
        "INSERT INTO outbox (exchange, routing_key, message_type, message_id, priority, payload, job_id)
         SELECT 'work', rk, $2, mid, p, pl, j
         FROM UNNEST($1::text[], $3::text[], $4::int2[], $5::jsonb[], $6::uuid[]) AS x(rk, mid, p, pl, j)
         RETURNING outbox_id, exchange, routing_key, message_type, message_id, priority, payload, job_id",
    )
    .bind(&keys)
    .bind(JOB_RUN_V1)
    .bind(&message_ids)
    .bind(&run_priorities)
    .bind(&payloads)
    .bind(&run_ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut outbox: std::collections::HashMap<Uuid, OutboxMessage> = outbox
        .into_iter()
        .filter_map(|m| m.job_id.map(|id| (id, m)))
        .collect();
    Ok(jobs
        .iter()
        .map(|j| match outbox.remove(&j.job_id) {
            Some(message) if by_id.contains_key(&j.job_id) => Accepted::Created {
                job_ids: vec![j.job_id],
                outbox: vec![message],
                status: JobStatus::Pending,
            },
            _ => Accepted::Duplicate { job_id: j.job_id },
        })
        .collect())
}

fn duplicate_or_conflict(found: (Uuid, Option<String>), hash: Option<&str>) -> Accepted {
    if found.1.as_deref() == hash {
        Accepted::Duplicate { job_id: found.0 }
    } else {
        Accepted::Conflict
    }
}

async fn insert_job_row(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewJob<'_>,
    job_id: Uuid,
    node: Option<Uuid>,
    status: JobStatus,
    first: bool,
) -> Result<Option<(Value, DateTime<Utc>)>, sqlx::Error> {
    let spec = new.spec;
    let dead = status == JobStatus::Dead;
    sqlx::query_as(
        "INSERT INTO jobs (job_id, user_id, job_name, command, description, execution_mode, status,
                           status_reason, target_node_id, target_node_group, target_node_role, fanout,
                           priority, timeout_seconds, env, triggered_by, idempotency_key, request_hash,
                           completed_at, success, task_id, fire_at, max_retries, retry_delay_seconds,
                           kill_on_timeout)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                 CASE WHEN $19 THEN now() END, CASE WHEN $19 THEN false END, $20, $21, $22, $23, $24)
         ON CONFLICT DO NOTHING
         RETURNING to_jsonb(jobs.*), submitted_at",
    )
    .bind(job_id)
    .bind(new.user_id)
    .bind(&spec.job_name)
    .bind(&spec.command)
    .bind(&spec.description)
    .bind(spec.execution_mode.as_str())
    .bind(status.as_str())
    .bind(dead.then_some(NO_NODE_REASON))
    .bind(node.or(spec.target.node_id))
    .bind(spec.target.node_group.as_deref())
    .bind(spec.target.node_role.as_deref())
    .bind(spec.target.fanout.as_str())
    .bind(spec.priority)
    .bind(spec.timeout_seconds)
    .bind(serde_json::to_value(&spec.env).unwrap_or(Value::Null))
    .bind(new.triggered_by.as_str())
    // A fan-out answers with its first job, so only that one carries the
    // key (the key names one job per user).
    .bind(new.idempotency_key.filter(|_| first))
    .bind(new.request_hash.filter(|_| first))
    .bind(dead)
    .bind(new.task.map(|t| t.task_id))
    .bind(new.task.and_then(|t| t.fire_at))
    .bind(new.task.map_or(0, |t| t.max_retries))
    .bind(new.task.map_or(0, |t| t.retry_delay_seconds))
    .bind(new.task.is_none_or(|t| t.kill_on_timeout))
    .fetch_optional(&mut **tx)
    .await
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
    let outgoing: Vec<Outgoing> = groups
        .iter()
        .flat_map(|(rows, _)| rows.iter().map(OutboxMessage::to_outgoing))
        .collect();
    let mut results = publisher.publish_all(&outgoing).await.into_iter();
    let confirmed: Vec<Vec<&OutboxMessage>> = groups
        .iter()
        .map(|(rows, _)| {
            rows.iter()
                .filter(|row| match results.next() {
                    Some(Ok(())) => true,
                    Some(Err(error)) => {
                        tracing::warn!(%error, outbox_id = row.outbox_id, "publish failed; the relay will retry");
                        false
                    }
                    None => false,
                })
                .collect()
        })
        .collect();
    let mut tx = pool.begin().await?;
    // Losing this commit in a Postgres crash is harmless (see
    // crate::db::no_fsync_wait), so it does not wait for the disk.
    crate::db::no_fsync_wait(&mut tx).await?;
    let mut events = Vec::new();
    // One statement set per distinct author (usually one or a few).
    let mut authors: Vec<&str> = groups.iter().map(|(_, by)| *by).collect();
    authors.sort_unstable();
    authors.dedup();
    for author in authors {
        let rows: Vec<&OutboxMessage> = groups
            .iter()
            .zip(&confirmed)
            .filter(|((_, by), _)| *by == author)
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        events.extend(mark_published(&mut tx, &rows, author).await?);
    }
    tx.commit().await?;
    publish_events(publisher, &events).await;
    Ok(confirmed.iter().map(Vec::len).collect())
}

/// Marks outbox rows published and moves their jobs from `pending` to
/// `queued`, with change-log rows, on `conn`. Returns the `job.queued`
/// events to publish once the transaction is committed.
pub async fn mark_published(
    conn: &mut PgConnection,
    rows: &[&OutboxMessage],
    changed_by: &str,
) -> Result<Vec<JobEvent>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.outbox_id).collect();
    sqlx::query(
        "UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE outbox_id = ANY($1)",
    )
    .bind(&ids)
    .execute(&mut *conn)
    .await?;
    let job_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.job_id).collect();
    let changed: Vec<(Uuid, i32, Value, Value)> = sqlx::query_as(
        "WITH old AS (
             SELECT job_id, to_jsonb(j.*) AS row FROM jobs j
             WHERE job_id = ANY($1) AND status = 'pending'
             -- A locked row is being claimed by a worker, which moves it
             -- on from pending itself; waiting for it would only queue
             -- this batch behind every claim.
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs SET status = 'queued' FROM old
         WHERE jobs.job_id = old.job_id
         RETURNING jobs.job_id, jobs.attempt, old.row, to_jsonb(jobs.*)",
    )
    .bind(&job_ids)
    .fetch_all(&mut *conn)
    .await?;
    let changes: Vec<Change<'_>> = changed
        .iter()
        .map(|(job_id, _, old, new)| Change {
            table: "jobs",
            record_id: job_id.to_string(),
            action: Action::Update,
            old: Some(old),
            new: Some(new),
            changed_by,
            node_id: None,
            reason: Some("published"),
        })
        .collect();
    changelog::record_many(conn, &changes).await?;
    Ok(changed
        .iter()
        .map(|(job_id, attempt, _, _)| job_event(*job_id, JobStatus::Queued, *attempt, None, None))
        .collect())
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
    let mut tx = pool.begin().await?;
    // Losing this commit in a Postgres crash is harmless (see
    // crate::db::no_fsync_wait), so it does not wait for the disk.
    crate::db::no_fsync_wait(&mut tx).await?;
    let rows: Vec<OutboxMessage> = sqlx::query_as(
        "SELECT outbox_id, exchange, routing_key, message_type, message_id, priority, payload, job_id
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
    let outgoing: Vec<Outgoing> = rows.iter().map(OutboxMessage::to_outgoing).collect();
    let results = publisher.publish_all(&outgoing).await;
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
    let queued = mark_published(&mut tx, &confirmed, "outbox-relay").await?;
    tx.commit().await?;
    publish_events(publisher, &queued).await;
    Ok(confirmed.len())
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
        // One batch at a time, and never a failed batch retried request by
        // request (that would publish its messages again): each request is
        // answered with the batch's outcome.
        let inner = Batcher::spawn(PUBLISH_BATCH, 1, move |batch: Vec<PublishRequest>| {
            let (pool, publisher) = (pool.clone(), publisher.clone());
            async move {
                let groups: Vec<(&[OutboxMessage], &str)> = batch
                    .iter()
                    .map(|r| (r.rows.as_slice(), r.changed_by.as_str()))
                    .collect();
                Ok(match publish_and_mark(&pool, &publisher, &groups).await {
                    Ok(counts) => counts.into_iter().map(Ok).collect(),
                    Err(error) => {
                        tracing::warn!(%error, "marking published jobs failed; the relay will finish them");
                        batch.iter().map(|_| Err(error.to_string())).collect()
                    }
                })
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

/// Starts the batcher that accepts [`PlainJob`]s (the api and the queue
/// ingress share it).
pub fn plain_accepter(pool: PgPool) -> Batcher<PlainJob, Accepted> {
    Batcher::spawn(256, 2, move |jobs: Vec<PlainJob>| {
        let pool = pool.clone();
        async move {
            accept_plain_batch(&pool, &jobs)
                .await
                .map_err(|e| e.to_string())
        }
    })
}
