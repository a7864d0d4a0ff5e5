//! Change-feed consumers: the safe head of the feed, consumer cursors in
//! `sync_state`, and the built-in relay that publishes the feed onto
//! `<p>.events` as `change.<table>.<action>`, in batches: one `changes.v1`
//! message carries a run of consecutive changes of one table and action.
//!
//! ## The safe head
//!
//! `change_seq` is handed out when a row is inserted, not when its
//! transaction commits, so a reader can see sequence 11 while 10 is still
//! uncommitted; a cursor moved to 11 would then skip 10 for good. Readers
//! therefore only go up to the *safe head*: a sequence number below which
//! every row is committed (or rolled back). [`Watermark::safe_head`] reads
//! the sequence's last value `v`, then a snapshot `S`, and waits until every
//! transaction `S` lists as in progress has ended. A transaction holding a
//! number up to `v` had its transaction id before it drew the number (the
//! change row is always written after the row it describes, see
//! [`crate::changelog::record`]), so it was either committed before `S` or in
//! `S`'s list.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::amqp::{Outgoing, Publisher};
use crate::changelog::{self, RawChangeEntry};

/// The consumer name of the built-in relay onto `<p>.events`.
pub const EVENTS_CONSUMER: &str = "events";
/// The `table_name` of a cursor that covers every table.
pub const ALL_TABLES: &str = "*";
/// The tables whose changes are recorded.
pub const TABLES: &[&str] = &["tasks", "task_schedule", "nodes", "jobs", "webhooks"];
/// AMQP `type` of a batch of change events (`{"changes": [...]}`).
pub const CHANGES_V1: &str = "changes.v1";
/// Changes one message carries at most.
const CHANGES_PER_MESSAGE: usize = 500;

/// How long [`Watermark::safe_head`] waits for in-flight transactions
/// before it answers with the last head it proved safe.
const SAFE_HEAD_WAIT: Duration = Duration::from_millis(500);

/// Computes the feed's safe head and remembers the last one proved, so a
/// long transaction elsewhere delays the feed rather than stopping it.
#[derive(Debug, Default)]
pub struct Watermark {
    last_safe: AtomicI64,
}

impl Watermark {
    /// A watermark that has proved nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest `change_seq` at or below which every row is committed
    /// or rolled back; rows above it may still appear.
    pub async fn safe_head(&self, conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
        self.safe_head_with(conn, false).await
    }

    /// [`Self::safe_head`] that does not wait for transactions
    /// `pg_stat_activity` shows running in *another* database of the
    /// cluster (transaction ids are cluster-wide, but only this database's
    /// transactions can write its `data_change`). A transaction it cannot
    /// place is waited for, as before. Every reader of the feed uses it
    /// (the api's `/changes`, `/events/stream` and `/sync/status`, the
    /// change relay, `taskhost sync`): a long transaction in some other
    /// database of a shared cluster would otherwise hold a fresh watermark
    /// at 0 and the feed looked empty.
    pub async fn safe_head_local(&self, conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
        self.safe_head_with(conn, true).await
    }

    async fn safe_head_with(
        &self,
        conn: &mut PgConnection,
        local: bool,
    ) -> Result<i64, sqlx::Error> {
        let (last, called): (i64, bool) =
            sqlx::query_as("SELECT last_value, is_called FROM data_change_change_seq_seq")
                .fetch_one(&mut *conn)
                .await?;
        let candidate = if called { last } else { 0 };
        let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut *conn)
            .await?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let in_flight: bool = sqlx::query_scalar(
                "SELECT EXISTS (
                     SELECT 1 FROM pg_snapshot_xip($1::pg_snapshot) AS x
                     WHERE pg_xact_status(x) = 'in progress'
                       AND NOT ($2 AND EXISTS (
                           SELECT 1 FROM pg_stat_activity a
                           WHERE a.backend_xid::text = (x::text::numeric % 4294967296)::text
                             AND a.datid IS NOT NULL
                             AND a.datid <> (SELECT oid FROM pg_database
                                             WHERE datname = current_database()))))",
            )
            .bind(&snapshot)
            .bind(local)
            .fetch_one(&mut *conn)
            .await?;
            if !in_flight {
                let safe = self.last_safe.fetch_max(candidate, Ordering::Relaxed);
                return Ok(safe.max(candidate));
            }
            if started.elapsed() >= SAFE_HEAD_WAIT {
                return Ok(self.last_safe.load(Ordering::Relaxed));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// One consumer cursor with its lag, for `GET /sync/status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// The consumer: `events` (the built-in relay), a node or an external system.
    pub consumer: String,
    /// The table the cursor follows, or `*` for all of them.
    pub table_name: String,
    /// The last change the consumer has taken.
    pub last_change_seq: i64,
    /// When the cursor last moved.
    pub synced_at: DateTime<Utc>,
    /// Changes after the cursor, up to the safe head.
    pub lag: i64,
    /// Age in seconds of the oldest change not yet taken (0 when caught up).
    pub lag_seconds: f64,
}

/// Every cursor with its lag behind `head`.
pub async fn status(
    conn: &mut PgConnection,
    head: i64,
) -> Result<Vec<ConsumerStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.consumer, s.table_name, s.last_change_seq, s.synced_at,
                COALESCE(l.lag, 0) AS lag,
                COALESCE(EXTRACT(EPOCH FROM now() - l.oldest)::float8, 0) AS lag_seconds
         FROM sync_state s
         LEFT JOIN LATERAL (
             SELECT count(*) AS lag, min(d.changed_at) AS oldest
             FROM data_change d
             WHERE d.change_seq > s.last_change_seq AND d.change_seq <= $1
               AND (s.table_name = '*' OR d.table_name = s.table_name)
         ) l ON true
         ORDER BY s.consumer, s.table_name",
    )
    .bind(head)
    .fetch_all(conn)
    .await
}

/// Sets a consumer's cursor (creating it), e.g. when it reports progress
/// or an operator rewinds it to replay the feed.
pub async fn set_cursor(
    conn: &mut PgConnection,
    consumer: &str,
    table: &str,
    seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_state (consumer, table_name, last_change_seq, synced_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (consumer, table_name)
         DO UPDATE SET last_change_seq = EXCLUDED.last_change_seq, synced_at = now()",
    )
    .bind(consumer)
    .bind(table)
    .bind(seq)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Serialize)]
struct ChangeBatch<'a> {
    changes: &'a [RawChangeEntry],
}

/// The messages that carry `changes` (in `change_seq` order): one per run
/// of consecutive changes to the same table with the same action, routed
/// `change.<table>.<action>`, in order. Each message's id is the range of
/// sequence numbers it carries, so a republished range has the same id;
/// each change also carries its own `changeId` and `changeSeq`.
pub fn change_events(changes: &[RawChangeEntry]) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut rest = changes;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take(CHANGES_PER_MESSAGE)
            .take_while(|c| c.table_name == first.table_name && c.action == first.action)
            .count();
        let (chunk, tail) = rest.split_at(run);
        rest = tail;
        let (lo, hi) = (first.change_seq, chunk[run - 1].change_seq);
        out.push(Outgoing {
            exchange: "events".into(),
            routing_key: format!(
                "change.{}.{}",
                first.table_name,
                first.action.to_ascii_lowercase()
            ),
            message_type: CHANGES_V1.into(),
            message_id: format!("changes:{lo}-{hi}"),
            priority: 0,
            payload: serde_json::to_vec(&ChangeBatch { changes: chunk }).unwrap_or_default(),
            headers: vec![
                ("x-change-seq-first".into(), lo.to_string()),
                ("x-change-seq-last".into(), hi.to_string()),
            ],
        });
    }
    out
}

/// What one relay pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Changes published.
    pub published: usize,
    /// Another relay held the cursor, so this one did nothing.
    pub busy: bool,
}

/// Why a relay pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The broker did not confirm; the cursor stays where it was.
    #[error("publishing change events failed: {0}")]
    Publish(String),
}

/// Publishes up to `batch` changes after the `events` cursor (never past the
/// safe head) with confirms, then moves the cursor, all under the cursor
/// row's lock, so several relays never publish the same range twice at once.
/// A crash between publish and commit publishes the range again: consumers
/// deduplicate by each change's `changeId` (or `changeSeq`).
pub async fn relay_once(
    pool: &PgPool,
    watermark: &Watermark,
    publisher: &Publisher,
    batch: i64,
) -> Result<RelayPass, RelayError> {
    let mut conn = pool.acquire().await?;
    let head = watermark.safe_head_local(&mut conn).await?;
    drop(conn);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO sync_state (consumer, table_name, last_change_seq)
         VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
    )
    .bind(EVENTS_CONSUMER)
    .bind(ALL_TABLES)
    .execute(&mut *tx)
    .await?;
    let cursor: Option<i64> = sqlx::query_scalar(
        "SELECT last_change_seq FROM sync_state
         WHERE consumer = $1 AND table_name = $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(EVENTS_CONSUMER)
    .bind(ALL_TABLES)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(cursor) = cursor else {
        return Ok(RelayPass {
            published: 0,
            busy: true,
        });
    };
    if cursor >= head {
        return Ok(RelayPass::default());
    }
    let changes = changelog::read_between_raw(&mut tx, None, cursor, head, batch).await?;
    let Some(last) = changes.last().map(|c| c.change_seq) else {
        return Ok(RelayPass::default());
    };
    let events = change_events(&changes);
    if let Some(Err(e)) = publisher
        .publish_all(&events)
        .await
        .into_iter()
        .find(Result::is_err)
    {
        return Err(RelayError::Publish(e.to_string()));
    }
    set_cursor(&mut tx, EVENTS_CONSUMER, ALL_TABLES, last).await?;
    tx.commit().await?;
    Ok(RelayPass {
        published: changes.len(),
        busy: false,
    })
}
