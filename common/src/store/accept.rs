//! Accepting a job (→ `pending`): the job row, its `data_change` INSERT
//! and its outbox message in one transaction. [`accept`] takes one
//! submission (idempotency key, fan-out, task runs); [`accept_batch`] takes
//! many plain ones with one INSERT per table. The HTTP api and the queue
//! ingress share both (through `jobs::plain_accepter` for the batch).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::amqp::Outgoing;
use crate::changelog::{self, Action, Change};
use crate::messages::{JOB_RUN_V1, JobRun};
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
    /// The job it re-runs (`POST /jobs/{id}/rerun`).
    pub rerun_of: Option<Uuid>,
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
    /// The upstream run that fired it (a dependency run, `after`).
    pub upstream_job_id: Option<Uuid>,
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
    /// Body (JSON text).
    pub payload: String,
    /// The job it carries, if any.
    pub job_id: Option<Uuid>,
    /// The W3C trace context sent as the `traceparent` header (README,
    /// "Tracing"); None when tracing was off.
    pub traceparent: Option<String>,
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
            payload: self.payload.clone().into_bytes(),
            headers: match &self.traceparent {
                None => Vec::new(),
                Some(tp) => vec![(crate::telemetry::TRACEPARENT.to_owned(), tp.clone())],
            },
        }
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
/// With tracing on, the row carries the current span's `traceparent`.
pub async fn insert_outbox_delayed(
    conn: &mut PgConnection,
    routing_key: &str,
    run: &JobRun,
    delay_secs: f64,
) -> Result<OutboxMessage, sqlx::Error> {
    let payload = serde_json::to_value(run).unwrap_or(Value::Null);
    sqlx::query_as!(
        OutboxMessage,
        r#"INSERT INTO outbox (exchange, routing_key, message_type, message_id, priority, payload, job_id, available_at, traceparent)
         VALUES ('work', $1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8)
         RETURNING outbox_id, exchange, routing_key, message_type, message_id, priority, payload::text AS "payload!", job_id, traceparent"#,
        routing_key,
        JOB_RUN_V1,
        format!("{}:{}", run.job_id, run.attempt),
        run.priority,
        payload,
        run.job_id,
        delay_secs,
        crate::telemetry::current_traceparent(),
    )
    .fetch_one(conn)
    .await
}

async fn find_by_idempotency_key(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
) -> Result<Option<(Uuid, Option<String>)>, sqlx::Error> {
    sqlx::query!(
        "SELECT job_id, request_hash FROM jobs WHERE user_id = $1 AND idempotency_key = $2",
        user_id,
        key,
    )
    .map(|r| (r.job_id, r.request_hash))
    .fetch_optional(conn)
    .await
}

/// Active nodes a target matches (what a fan-out expands to).
pub async fn matching_active_nodes(
    conn: &mut PgConnection,
    target: &crate::model::Target,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT node_id FROM nodes
         WHERE is_active
           AND ($1::uuid IS NULL OR node_id = $1)
           AND ($2::text IS NULL OR node_group = $2)
           AND ($3::text IS NULL OR node_role = $3)
         ORDER BY node_name",
        target.node_id,
        target.node_group.as_deref(),
        target.node_role.as_deref(),
    )
    .fetch_all(conn)
    .await
}

/// Accepts a job: one transaction for the row(s), change log and outbox.
pub async fn accept(pool: &PgPool, new: NewJob<'_>) -> Result<Accepted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let accepted = accept_in(&mut tx, &new).await?;
    if let Accepted::Created { job_ids, .. } = &accepted {
        tx.commit().await?;
        let source = match new.rerun_of {
            Some(_) => "rerun",
            None => new.triggered_by.as_str(),
        };
        crate::metrics::submitted(source, job_ids.len());
    }
    Ok(accepted)
}

/// Accepts a job inside the caller's transaction (a scheduler tick fires
/// many tasks in one). Nothing is written unless it returns `Created`.
pub async fn accept_in(tx: &mut PgConnection, new: &NewJob<'_>) -> Result<Accepted, sqlx::Error> {
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
            sqlx::query!(
                "INSERT INTO task_history (task_id, job_id, attempt, state, is_final, triggered_by, start_time, duration_ms, error)
                 VALUES ($1, $2, 0, 'dead', true, $3, NULL, 0, $4)",
                new.task.map(|t| t.task_id),
                job_id,
                new.triggered_by.as_str(),
                changelog::gzip(NO_NODE_REASON.as_bytes()),
            )
            .execute(&mut *tx)
            .await?;
            crate::notify::enqueue_jobs(tx, &[job_id]).await?;
        } else {
            let routing_key = match node {
                Some(id) => format!("node.{id}"),
                None => new.spec.target.routing_key(),
            };
            let run = first_run(job_id, new.spec, submitted_at);
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

/// The work message of a job's first attempt (attempt 0), as the outbox
/// carries it. Shared by [`accept`], [`accept_batch`] and
/// [`super::fire::fire_batch`].
pub(super) fn first_run(job_id: Uuid, spec: &JobSpec, submitted_at: DateTime<Utc>) -> JobRun {
    JobRun {
        job_id,
        attempt: 0,
        command: spec.command.clone(),
        execution_mode: spec.execution_mode,
        timeout_seconds: spec.timeout_seconds,
        env: spec.env.clone(),
        priority: spec.priority,
        submitted_at,
    }
}

/// The columns a job takes from its [`JobSpec`], as arrays for one
/// set-based INSERT (`UNNEST`), bound as parameters `$3` to `$12` (name,
/// command, description, mode, node id, group, role, priority, timeout,
/// env) and, after each query's own columns, the secret environments and
/// the limits. Shared by [`accept_batch`] and [`super::fire::fire_batch`].
pub(super) struct SpecColumns<'a> {
    /// Job names.
    pub(super) names: Vec<&'a str>,
    /// Commands.
    pub(super) commands: Vec<&'a str>,
    /// Descriptions.
    pub(super) descriptions: Vec<&'a str>,
    /// Execution modes.
    pub(super) modes: Vec<&'static str>,
    /// Target node ids.
    pub(super) node_ids: Vec<Option<Uuid>>,
    /// Target node groups.
    pub(super) groups: Vec<Option<&'a str>>,
    /// Target node roles.
    pub(super) roles: Vec<Option<&'a str>>,
    /// Priorities.
    pub(super) priorities: Vec<i16>,
    /// Timeouts, seconds.
    pub(super) timeouts: Vec<Option<i32>>,
    /// Extra environments, as JSON.
    pub(super) envs: Vec<Value>,
    /// The sealed secret environments (NULL: none).
    pub(super) secret_envs: Vec<Option<&'a str>>,
    /// The limits, as JSON (NULL: none).
    pub(super) limits: Vec<Option<Value>>,
}

impl<'a> SpecColumns<'a> {
    /// The columns of `specs`, in order.
    pub(super) fn of(specs: impl Iterator<Item = &'a JobSpec> + Clone) -> Self {
        Self {
            names: specs.clone().map(|s| s.job_name.as_str()).collect(),
            commands: specs.clone().map(|s| s.command.as_str()).collect(),
            descriptions: specs.clone().map(|s| s.description.as_str()).collect(),
            modes: specs.clone().map(|s| s.execution_mode.as_str()).collect(),
            node_ids: specs.clone().map(|s| s.target.node_id).collect(),
            groups: specs
                .clone()
                .map(|s| s.target.node_group.as_deref())
                .collect(),
            roles: specs
                .clone()
                .map(|s| s.target.node_role.as_deref())
                .collect(),
            priorities: specs.clone().map(|s| s.priority).collect(),
            timeouts: specs.clone().map(|s| s.timeout_seconds).collect(),
            envs: specs
                .clone()
                .map(|s| serde_json::to_value(&s.env).unwrap_or(Value::Null))
                .collect(),
            secret_envs: specs.clone().map(|s| s.secret_env.as_deref()).collect(),
            limits: specs.map(|s| limits_json(s.limits.as_ref())).collect(),
        }
    }
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
    /// The W3C `traceparent` its work message carries (README,
    /// "Tracing"); None when tracing is off.
    pub traceparent: Option<String>,
}

impl PlainJob {
    /// Whether a submission may take the batched path.
    pub fn fits(spec: &JobSpec, idempotency_key: Option<&str>) -> bool {
        idempotency_key.is_none() && spec.target.fanout == Fanout::One
    }
}

/// Accepts plain submissions together: one transaction with one statement
/// inserting the job rows and their outbox rows, and one inserting their
/// change rows, so Postgres does per-batch rather than per-job work.
/// Answers one [`Accepted`] per job, in order (`Duplicate` when the id
/// exists, or repeats an earlier one of the batch).
pub async fn accept_batch(pool: &PgPool, jobs: &[PlainJob]) -> Result<Vec<Accepted>, sqlx::Error> {
    // Each id once (a repeated id in one batch is a duplicate of its first).
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&PlainJob> = jobs.iter().filter(|j| seen.insert(j.job_id)).collect();
    let ids: Vec<Uuid> = unique.iter().map(|j| j.job_id).collect();
    let users: Vec<&str> = unique.iter().map(|j| j.user_id.as_str()).collect();
    let spec = SpecColumns::of(unique.iter().map(|j| &j.spec));
    let triggers: Vec<&str> = unique.iter().map(|j| j.triggered_by.as_str()).collect();
    let keys: Vec<String> = unique.iter().map(|j| j.spec.target.routing_key()).collect();
    let message_ids: Vec<String> = ids.iter().map(|id| format!("{id}:0")).collect();
    // The work message without its `submitted_at`, which the statement
    // sets from the row it inserts (the transaction's clock).
    let payloads: Vec<Value> = unique
        .iter()
        .map(|j| {
            let run = first_run(j.job_id, &j.spec, DateTime::<Utc>::UNIX_EPOCH);
            serde_json::to_value(run).unwrap_or(Value::Null)
        })
        .collect();
    // With tracing off the array is empty: UNNEST pads it with NULLs.
    let traceparents: Vec<Option<&str>> = if unique.iter().any(|j| j.traceparent.is_some()) {
        unique.iter().map(|j| j.traceparent.as_deref()).collect()
    } else {
        Vec::new()
    };
    let mut tx = pool.begin().await?;
    // The outbox rows are inserted from the job rows' RETURNING, so a job
    // whose id existed (ON CONFLICT DO NOTHING) gets none; they draw their
    // ids in the batch's order.
    let inserted = sqlx::query!(
        r#"WITH x AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::uuid[], $8::text[], $9::text[], $10::int2[],
                                  $11::int4[], $12::jsonb[], $13::text[], $14::text[], $15::jsonb[],
                                  $16::text[], $17::text[], $18::jsonb[], $19::text[])
                 WITH ORDINALITY
                 AS x(id, u, n, c, d, m, ni, ng, nr, p, t, e, tb, se, li, rk, mid, pl, tp, ord)
         ), ins AS (
             INSERT INTO jobs (job_id, user_id, job_name, command, description, execution_mode, status,
                               target_node_id, target_node_group, target_node_role, fanout, priority,
                               timeout_seconds, env, triggered_by, secret_env, limits)
             SELECT id, u, n, c, d, m, 'pending', ni, ng, nr, 'one', p, t, e, tb, se, li FROM x
             ON CONFLICT DO NOTHING
             RETURNING job_id, to_jsonb(jobs.*)::text AS row, submitted_at
         ), ob AS (
             INSERT INTO outbox (exchange, routing_key, message_type, message_id, priority, payload,
                                 job_id, traceparent)
             SELECT 'work', x.rk, $20, x.mid, x.p,
                    jsonb_set(x.pl, '{submitted_at}',
                              to_jsonb(to_char(ins.submitted_at AT TIME ZONE 'UTC',
                                               'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))),
                    ins.job_id, x.tp
             FROM ins JOIN x ON x.id = ins.job_id
             ORDER BY x.ord
             RETURNING outbox_id, exchange, routing_key, message_type, message_id, priority,
                       payload::text AS payload, job_id, traceparent
         )
         SELECT ins.row AS "row!", ob.outbox_id AS "outbox_id!", ob.exchange AS "exchange!",
                ob.routing_key AS "routing_key!", ob.message_type AS "message_type!",
                ob.message_id AS "message_id!", ob.priority AS "priority!",
                ob.payload AS "payload!", ob.job_id AS "job_id!", ob.traceparent
         FROM ins JOIN ob ON ob.job_id = ins.job_id"#,
        &ids,
        &users as &[&str],
        &spec.names as &[&str],
        &spec.commands as &[&str],
        &spec.descriptions as &[&str],
        &spec.modes as &[&str],
        &spec.node_ids as &[Option<Uuid>],
        &spec.groups as &[Option<&str>],
        &spec.roles as &[Option<&str>],
        &spec.priorities,
        &spec.timeouts as &[Option<i32>],
        &spec.envs,
        &triggers as &[&str],
        &spec.secret_envs as &[Option<&str>],
        &spec.limits as &[Option<Value>],
        &keys,
        &message_ids,
        &payloads,
        &traceparents as &[Option<&str>],
        JOB_RUN_V1,
    )
    .map(|r| {
        let message = OutboxMessage {
            outbox_id: r.outbox_id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            message_type: r.message_type,
            message_id: r.message_id,
            priority: r.priority,
            payload: r.payload,
            job_id: Some(r.job_id),
            traceparent: r.traceparent,
        };
        (r.job_id, (r.row, message))
    })
    .fetch_all(&mut *tx)
    .await?;
    let mut inserted: std::collections::HashMap<Uuid, (String, OutboxMessage)> =
        inserted.into_iter().collect();
    // Change rows in the batch's order.
    let fresh: Vec<&PlainJob> = unique
        .iter()
        .copied()
        .filter(|j| inserted.contains_key(&j.job_id))
        .collect();
    let changes: Vec<Change<'_>> = fresh
        .iter()
        .map(|j| Change {
            table: "jobs",
            record_id: j.job_id.to_string(),
            action: Action::Insert,
            old: None,
            new: Some(&inserted[&j.job_id].0),
            changed_by: &j.changed_by,
            node_id: None,
            reason: Some("submitted"),
        })
        .collect();
    changelog::record_many(&mut tx, &changes).await?;
    tx.commit().await?;
    for j in &fresh {
        crate::metrics::submitted(j.triggered_by.as_str(), 1);
    }
    Ok(jobs
        .iter()
        .map(|j| match inserted.remove(&j.job_id) {
            Some((_, message)) => Accepted::Created {
                job_ids: vec![j.job_id],
                outbox: vec![message],
                status: JobStatus::Pending,
            },
            None => Accepted::Duplicate { job_id: j.job_id },
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
    tx: &mut PgConnection,
    new: &NewJob<'_>,
    job_id: Uuid,
    node: Option<Uuid>,
    status: JobStatus,
    first: bool,
) -> Result<Option<(String, DateTime<Utc>)>, sqlx::Error> {
    let spec = new.spec;
    let dead = status == JobStatus::Dead;
    sqlx::query!(
        r#"INSERT INTO jobs (job_id, user_id, job_name, command, description, execution_mode, status,
                           status_reason, target_node_id, target_node_group, target_node_role, fanout,
                           priority, timeout_seconds, env, triggered_by, idempotency_key, request_hash,
                           completed_at, success, task_id, fire_at, max_retries, retry_delay_seconds,
                           kill_on_timeout, secret_env, limits, rerun_of, upstream_job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                 CASE WHEN $19 THEN now() END, CASE WHEN $19 THEN false END, $20, $21, $22, $23, $24,
                 $25, $26, $27, $28)
         ON CONFLICT DO NOTHING
         RETURNING to_jsonb(jobs.*)::text AS "row!", submitted_at"#,
        job_id,
        new.user_id,
        &spec.job_name,
        &spec.command,
        &spec.description,
        spec.execution_mode.as_str(),
        status.as_str(),
        dead.then_some(NO_NODE_REASON),
        node.or(spec.target.node_id),
        spec.target.node_group.as_deref(),
        spec.target.node_role.as_deref(),
        spec.target.fanout.as_str(),
        spec.priority,
        spec.timeout_seconds,
        serde_json::to_value(&spec.env).unwrap_or(Value::Null),
        new.triggered_by.as_str(),
        // A fan-out answers with its first job, so only that one carries
        // the key (the key names one job per user).
        new.idempotency_key.filter(|_| first),
        new.request_hash.filter(|_| first),
        dead,
        new.task.map(|t| t.task_id),
        new.task.and_then(|t| t.fire_at),
        new.task.map_or(0, |t| t.max_retries),
        new.task.map_or(0, |t| t.retry_delay_seconds),
        new.task.is_none_or(|t| t.kill_on_timeout),
        spec.secret_env.as_deref(),
        limits_json(spec.limits.as_ref()),
        new.rerun_of,
        new.task.and_then(|t| t.upstream_job_id),
    )
    .map(|r| (r.row, r.submitted_at))
    .fetch_optional(&mut *tx)
    .await
}

/// A job's limits as stored in `jobs.limits` (NULL: none).
fn limits_json(limits: Option<&crate::model::JobLimits>) -> Option<Value> {
    limits.and_then(|l| serde_json::to_value(l).ok())
}
