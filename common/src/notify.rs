//! Webhook notifications (README, "Notifications (webhooks)").
//!
//! - `webhooks` rows say which URL hears which events, globally
//!   (`task_id` NULL) or for one task; their changes go to `data_change`.
//! - [`enqueue_jobs`] and [`enqueue_nodes_dead`] run inside the
//!   transaction that records the event (a job's final state, a node's
//!   death) and insert one `webhook_deliveries` row per matching webhook:
//!   the outbox of notifications. A crash after the commit loses nothing;
//!   a rolled-back state change enqueues nothing; `(webhook_id, event_key)`
//!   is unique, so an event is enqueued once. Both are one statement that
//!   stops at a one-time `EXISTS` check when no webhook is enabled.
//! - [`deliver_due`] (the schedulers' delivery loop) claims due rows with
//!   `FOR UPDATE SKIP LOCKED` and a lease, POSTs them signed, and records
//!   the answer: 2xx delivered, otherwise retried with exponential backoff
//!   (1 s doubling to 10 min) until `notifications.max_attempts`, then
//!   `failed`. A crash between the POST and the record sends the same
//!   delivery (same `X-Taskhost-Delivery`) again once the lease ran out:
//!   at-least-once, receivers deduplicate on the delivery id.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::changelog::{self, Action, Change};

/// The events a webhook may subscribe to.
pub const EVENTS: &[&str] = &[
    "job.succeeded",
    "job.failed",
    "job.timed_out",
    "job.dead",
    "node.dead",
    "task.failed_repeatedly",
];

/// The change-log table name of webhook rows.
pub const TABLE: &str = "webhooks";

/// Seconds a claimed delivery is left to its sender before another pass
/// may send it again (longer than [`ATTEMPT_TIMEOUT`]).
const LEASE_SECS: f64 = 60.0;
/// The longest one POST may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's delay, doubled per attempt up to [`MAX_BACKOFF_SECS`].
const FIRST_BACKOFF_SECS: f64 = 1.0;
/// The longest delay between two attempts.
const MAX_BACKOFF_SECS: f64 = 600.0;
/// Deliveries claimed per pass at most (sent concurrently).
const BATCH: i64 = 32;

/// Enqueues the notifications of jobs that just reached a final state
/// (`job.<status>` and `task.failed_repeatedly`), in the caller's
/// transaction. Ids of jobs that are not final (or `cancelled`) are
/// ignored, so callers may pass every job they wrote.
pub async fn enqueue_jobs(conn: &mut PgConnection, job_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if job_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH j AS (
             SELECT j.job_id, j.job_name, j.user_id, j.status, j.exit_code, j.status_reason,
                    j.task_id, j.attempt, j.completed_at
             FROM jobs j
             WHERE EXISTS (SELECT 1 FROM webhooks WHERE enabled)
               AND j.job_id = ANY($1)
               AND j.status IN ('succeeded', 'failed', 'timed_out', 'dead')
         ), ev AS (
             SELECT w.webhook_id, 'job.' || j.status AS event, 'job:' || j.job_id AS event_key,
                    j.*, NULL::bigint AS streak
             FROM j JOIN webhooks w ON w.enabled AND ('job.' || j.status) = ANY (w.events)
                                    AND (w.task_id IS NULL OR w.task_id = j.task_id)
             UNION ALL
             SELECT w.webhook_id, 'task.failed_repeatedly', 'task:' || j.task_id || ':' || j.job_id,
                    j.*, s.n
             FROM j JOIN webhooks w ON w.enabled AND 'task.failed_repeatedly' = ANY (w.events)
                                    AND (w.task_id IS NULL OR w.task_id = j.task_id)
             CROSS JOIN LATERAL (
                 SELECT count(*) AS n FROM task_history h
                 WHERE h.task_id = j.task_id AND h.is_final
                   AND h.state IN ('failed', 'timed_out', 'dead')
                   AND h.end_time > COALESCE(
                       (SELECT max(ok.end_time) FROM task_history ok
                        WHERE ok.task_id = j.task_id AND ok.is_final AND ok.state = 'succeeded'),
                       '-infinity')
             ) s
             WHERE j.task_id IS NOT NULL AND j.status <> 'succeeded' AND s.n = w.failures_in_a_row
         )
         INSERT INTO webhook_deliveries (delivery_id, webhook_id, event, event_key, payload)
         SELECT x.id, x.webhook_id, x.event, x.event_key,
                jsonb_build_object(
                    'id', x.id, 'event', x.event, 'occurredAt', now(),
                    'job', jsonb_build_object(
                        'id', x.job_id, 'name', x.job_name, 'user', x.user_id, 'state', x.status,
                        'exitCode', x.exit_code, 'reason', x.status_reason, 'taskId', x.task_id,
                        'attempt', x.attempt, 'completedAt', x.completed_at))
                || CASE WHEN x.streak IS NULL THEN '{}'::jsonb
                        ELSE jsonb_build_object('task', jsonb_build_object(
                                 'id', x.task_id, 'failuresInARow', x.streak)) END
         FROM (SELECT gen_random_uuid() AS id, ev.* FROM ev) x
         ON CONFLICT (webhook_id, event_key) DO NOTHING",
    )
    .bind(job_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Enqueues `node.dead` for nodes just marked dead, in the caller's
/// transaction (one event per death: a node that comes back and dies again
/// notifies again).
pub async fn enqueue_nodes_dead(
    conn: &mut PgConnection,
    node_ids: &[Uuid],
) -> Result<(), sqlx::Error> {
    if node_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (delivery_id, webhook_id, event, event_key, payload)
         SELECT x.id, x.webhook_id, 'node.dead',
                'node:' || x.node_id || ':' || (extract(epoch FROM x.last_heartbeat) * 1000000)::bigint,
                jsonb_build_object(
                    'id', x.id, 'event', 'node.dead', 'occurredAt', now(),
                    'node', jsonb_build_object(
                        'id', x.node_id, 'name', x.node_name, 'group', x.node_group,
                        'role', x.node_role, 'lastHeartbeat', x.last_heartbeat))
         FROM (SELECT gen_random_uuid() AS id, w.webhook_id, n.node_id, n.node_name, n.node_group,
                      n.node_role, n.last_heartbeat
               FROM nodes n JOIN webhooks w ON w.enabled AND 'node.dead' = ANY (w.events)
                                            AND w.task_id IS NULL
               WHERE n.node_id = ANY($1)) x
         ON CONFLICT (webhook_id, event_key) DO NOTHING",
    )
    .bind(node_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A webhook as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Its id.
    #[serde(rename = "id")]
    pub webhook_id: Uuid,
    /// Where deliveries are POSTed.
    pub url: String,
    /// The events it hears.
    pub events: Vec<String>,
    /// Only this task's runs; `null`: every job and node.
    pub task_id: Option<Uuid>,
    /// N of `task.failed_repeatedly`.
    #[serde(rename = "failuresInARow")]
    pub failures_in_a_row: i32,
    /// Whether events are enqueued for it.
    pub enabled: bool,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A new webhook, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    /// http(s) URL.
    pub url: String,
    /// Events from [`EVENTS`].
    pub events: Vec<String>,
    /// Only this task's runs.
    pub task_id: Option<Uuid>,
    /// N of `task.failed_repeatedly`.
    pub failures_in_a_row: i32,
}

/// Why a webhook could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// `taskId` names no task.
    #[error("taskId: no task has this id")]
    NoSuchTask,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn webhook_change<'a>(
    id: &'a str,
    action: Action,
    old: Option<&'a Value>,
    new: Option<&'a Value>,
    by: &'a str,
    reason: &'a str,
) -> Change<'a> {
    Change {
        table: TABLE,
        record_id: id.to_string(),
        action,
        old: old.map(|v| v as &dyn changelog::RowJson),
        new: new.map(|v| v as &dyn changelog::RowJson),
        changed_by: by,
        node_id: None,
        reason: Some(reason),
    }
}

const WEBHOOK_COLUMNS: &str =
    "webhook_id, url, events, task_id, failures_in_a_row, enabled, created_by, created_at";

/// Creates a webhook and its change-log row in one transaction.
pub async fn create(pool: &PgPool, new: &NewWebhook, by: &str) -> Result<Webhook, CreateError> {
    let mut tx = pool.begin().await?;
    if let Some(task_id) = new.task_id {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tasks WHERE task_id = $1)")
                .bind(task_id)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(CreateError::NoSuchTask);
        }
    }
    let id = Uuid::now_v7();
    let row: Value = sqlx::query_scalar(
        "INSERT INTO webhooks (webhook_id, url, events, task_id, failures_in_a_row, created_by)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING to_jsonb(webhooks.*)",
    )
    .bind(id)
    .bind(&new.url)
    .bind(&new.events)
    .bind(new.task_id)
    .bind(new.failures_in_a_row)
    .bind(by)
    .fetch_one(&mut *tx)
    .await?;
    let key = id.to_string();
    changelog::record(
        &mut tx,
        webhook_change(
            &key,
            Action::Insert,
            None,
            Some(&row),
            by,
            "webhook created",
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(get(pool, id).await?.ok_or(sqlx::Error::RowNotFound)?)
}

/// One webhook.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Webhook>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE webhook_id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Every webhook, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Webhook>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, webhook_id"
    )))
    .fetch_all(pool)
    .await
}

/// Deletes a webhook (and its delivery log); `false` when there was none.
pub async fn delete(pool: &PgPool, id: Uuid, by: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let old: Option<Value> = sqlx::query_scalar(
        "DELETE FROM webhooks WHERE webhook_id = $1 RETURNING to_jsonb(webhooks.*)",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(old) = old else {
        return Ok(false);
    };
    let key = id.to_string();
    changelog::record(
        &mut tx,
        webhook_change(
            &key,
            Action::Delete,
            Some(&old),
            None,
            by,
            "webhook deleted",
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// One row of a webhook's delivery log.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The delivery id (`X-Taskhost-Delivery`).
    #[serde(rename = "id")]
    pub delivery_id: Uuid,
    /// The event.
    pub event: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts made so far.
    pub attempts: i32,
    /// When the next attempt is due (while `pending`).
    pub next_attempt_at: DateTime<Utc>,
    /// HTTP status of the last attempt, if it got an answer.
    pub last_status_code: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the event was enqueued.
    pub created_at: DateTime<Utc>,
    /// When a 2xx answer was recorded.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The body sent.
    #[schema(value_type = Object)]
    pub payload: Value,
}

/// A webhook's deliveries, newest first.
pub async fn deliveries(
    pool: &PgPool,
    webhook_id: Uuid,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(
        "SELECT delivery_id, event, status, attempts, next_attempt_at, last_status_code, last_error,
                created_at, delivered_at, payload
         FROM webhook_deliveries WHERE webhook_id = $1
         ORDER BY created_at DESC, delivery_id DESC LIMIT $2",
    )
    .bind(webhook_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `"<timestamp>.<body>"`): the
/// `X-Taskhost-Signature` header.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The delay before attempt `attempts + 1`, after `attempts` failed ones.
pub fn backoff_secs(attempts: i32) -> f64 {
    let doublings = attempts.clamp(1, 30) - 1;
    (FIRST_BACKOFF_SECS * 2f64.powi(doublings)).min(MAX_BACKOFF_SECS)
}

/// The HTTP client of the delivery loop: 10 s per attempt, no redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("taskhost-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// What one pass of [`deliver_due`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Deliveries answered 2xx.
    pub delivered: usize,
    /// Attempts that failed and will be retried.
    pub retried: usize,
    /// Deliveries that used their last attempt.
    pub failed: usize,
}

impl Pass {
    /// Deliveries attempted.
    pub fn attempted(&self) -> usize {
        self.delivered + self.retried + self.failed
    }
}

/// One delivery pass: claims due deliveries (a lease, committed, so a
/// slow receiver holds no transaction), POSTs them concurrently, records
/// each answer. Does nothing when `secret` is empty.
pub async fn deliver_due(
    pool: &PgPool,
    client: &reqwest::Client,
    secret: &str,
    max_attempts: u32,
) -> Result<Pass, sqlx::Error> {
    let mut pass = Pass::default();
    if secret.is_empty() {
        return Ok(pass);
    }
    let due: Vec<(Uuid, Uuid, String, String, i32, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT delivery_id FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE webhook_deliveries d
         SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
         FROM due, webhooks w
         WHERE d.delivery_id = due.delivery_id AND w.webhook_id = d.webhook_id
         RETURNING d.delivery_id, d.webhook_id, d.event, d.payload::text, d.attempts, w.url",
    )
    .bind(BATCH)
    .bind(LEASE_SECS)
    .fetch_all(pool)
    .await?;
    if due.is_empty() {
        return Ok(pass);
    }
    let sends = due
        .iter()
        .map(|(id, _, event, body, _, url)| send(client, secret, *id, event, body, url));
    let answers = futures_util::future::join_all(sends).await;
    for ((id, webhook_id, event, _, attempts, _), answer) in due.iter().zip(answers) {
        match answer {
            Ok(code) => {
                sqlx::query(
                    "UPDATE webhook_deliveries
                     SET status = 'delivered', delivered_at = now(), last_status_code = $3,
                         last_error = NULL
                     WHERE delivery_id = $1 AND attempts = $2 AND status = 'pending'",
                )
                .bind(id)
                .bind(attempts)
                .bind(i32::from(code))
                .execute(pool)
                .await?;
                pass.delivered += 1;
            }
            Err((code, error)) => {
                let last = *attempts >= i32::try_from(max_attempts).unwrap_or(i32::MAX);
                sqlx::query(
                    "UPDATE webhook_deliveries
                     SET status = CASE WHEN $5 THEN 'failed' ELSE 'pending' END,
                         next_attempt_at = now() + make_interval(secs => $6),
                         last_status_code = $3, last_error = $4
                     WHERE delivery_id = $1 AND attempts = $2 AND status = 'pending'",
                )
                .bind(id)
                .bind(attempts)
                .bind(code.map(i32::from))
                .bind(&error)
                .bind(last)
                .bind(backoff_secs(*attempts))
                .execute(pool)
                .await?;
                tracing::warn!(
                    %webhook_id, delivery_id = %id, event = %event, attempt = attempts,
                    gave_up = last, error = %error, "webhook delivery failed"
                );
                if last {
                    pass.failed += 1;
                } else {
                    pass.retried += 1;
                }
            }
        }
    }
    Ok(pass)
}

/// One POST. `Ok(status)` for a 2xx answer; otherwise the status (if any)
/// and a short reason (never the URL, which may carry a token).
async fn send(
    client: &reqwest::Client,
    secret: &str,
    id: Uuid,
    event: &str,
    body: &str,
    url: &str,
) -> Result<u16, (Option<u16>, String)> {
    let timestamp = Utc::now().timestamp();
    let signature = sign(secret, timestamp, body.as_bytes());
    let answer = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Taskhost-Event", event)
        .header("X-Taskhost-Delivery", id.to_string())
        .header("X-Taskhost-Timestamp", timestamp.to_string())
        .header("X-Taskhost-Signature", signature)
        .body(body.to_owned())
        .send()
        .await;
    match answer {
        Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(response) => {
            let status = response.status();
            Err((Some(status.as_u16()), format!("HTTP {status}")))
        }
        Err(e) => {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            Err((None, format!("{kind}: {}", e.without_url())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // python3: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sign("key", 1, b"{}"),
            "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes() {
        assert_eq!(backoff_secs(1), 1.0);
        assert_eq!(backoff_secs(2), 2.0);
        assert_eq!(backoff_secs(5), 16.0);
        assert_eq!(backoff_secs(11), 600.0);
        assert_eq!(backoff_secs(100), 600.0);
    }
}
