//! The node registry side of a worker: register (same id per node name),
//! heartbeat with process stats, and mark itself inactive on a clean stop.

use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::config::WorkerSettings;
use taskhost_common::db;
use taskhost_common::startup::StartupError;
use uuid::Uuid;

fn change<'a>(
    node_id: Uuid,
    action: Action,
    old: Option<&'a Value>,
    new: &'a Value,
    by: &'a str,
    reason: &'a str,
) -> Change<'a> {
    Change {
        table: "nodes",
        record_id: node_id.to_string(),
        action,
        old: old.map(|v| v as &dyn changelog::RowJson),
        new: Some(new),
        changed_by: by,
        node_id: Some(node_id),
        reason: Some(reason),
    }
}

/// The id of the node named `name`, if it was ever registered.
pub(crate) async fn id_of(pool: &PgPool, name: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT node_id FROM nodes WHERE node_name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Refuses to run as a node another live process runs as: that process
/// holds the node's exclusive control queue on the broker. A process that
/// died (even by SIGKILL) lost its connection, and with it the queue, so a
/// restart under the same name is not refused.
pub(crate) async fn ensure_not_running(
    conn: &lapin::Connection,
    names: &taskhost_common::amqp::Names,
    node_id: Uuid,
    node_name: &str,
) -> Result<(), StartupError> {
    let held = async {
        let ch = conn.create_channel().await?;
        let queue = crate::consumer::declare_control_queue(&ch, names, node_id).await;
        // The queue goes away with this channel's connection; close the
        // channel so nothing else is left behind.
        let _ = ch.close(200, "identity check".into()).await;
        queue.map(|_| ())
    }
    .await;
    match held {
        Ok(()) => Ok(()),
        Err(e)
            if e.to_string().contains("RESOURCE_LOCKED")
                || format!("{e:?}").contains("RESOURCELOCKED") =>
        {
            Err(StartupError(format!(
                "node name {node_name:?} is in use: another running worker is node {node_id}; \
                 give this one its own name with --node-name (worker.node_name, TASKHOST__WORKER__NODE_NAME)"
            )))
        }
        Err(e) => Err(StartupError(format!(
            "checking that node name {node_name:?} is free failed: {e}"
        ))),
    }
}

/// Registers this node and returns its id, which is kept per node name.
pub(crate) async fn register(pool: &PgPool, w: &WorkerSettings) -> Result<Uuid, sqlx::Error> {
    let hostname = taskhost_common::hostname();
    let slots = (w.concurrency + w.background_slots) as i32;
    let mut tx = pool.begin().await?;
    let inserted: Option<(Uuid, Value)> = sqlx::query_as(
        "INSERT INTO nodes (node_id, node_name, hostname, node_group, node_role, max_concurrent_tasks, registered_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (node_name) DO NOTHING
         RETURNING node_id, to_jsonb(nodes.*)",
    )
    .bind(Uuid::now_v7())
    .bind(&w.node_name)
    .bind(&hostname)
    .bind(&w.group)
    .bind(&w.role)
    .bind(slots)
    .bind(format!("worker@{hostname}"))
    .fetch_optional(&mut *tx)
    .await?;
    let node_id = if let Some((node_id, new)) = inserted {
        changelog::record(
            &mut tx,
            change(
                node_id,
                Action::Insert,
                None,
                &new,
                &w.node_name,
                "registered",
            ),
        )
        .await?;
        node_id
    } else {
        let (node_id, old, new): (Uuid, Value, Value) = sqlx::query_as(
            "WITH old AS (SELECT node_id, to_jsonb(n.*) AS row FROM nodes n WHERE node_name = $1 FOR UPDATE)
             UPDATE nodes SET hostname = $2, node_group = $3, node_role = $4, max_concurrent_tasks = $5,
                    is_active = true, last_heartbeat = now()
             FROM old WHERE nodes.node_id = old.node_id
             RETURNING nodes.node_id, old.row, to_jsonb(nodes.*)",
        )
        .bind(&w.node_name)
        .bind(&hostname)
        .bind(&w.group)
        .bind(&w.role)
        .bind(slots)
        .fetch_one(&mut *tx)
        .await?;
        changelog::record(
            &mut tx,
            change(
                node_id,
                Action::Update,
                Some(&old),
                &new,
                &w.node_name,
                "re-registered",
            ),
        )
        .await?;
        node_id
    };
    tx.commit().await?;
    Ok(node_id)
}

/// Refreshes the heartbeat and stats. A heartbeat alone is not logged as a
/// change (it would drown the log); a node coming back to life is.
pub(crate) async fn heartbeat(
    pool: &PgPool,
    node_id: Uuid,
    node_name: &str,
    stats: &Value,
) -> Result<(), sqlx::Error> {
    // Losing this commit in a Postgres crash is harmless (see
    // db::begin_no_fsync_wait), so it does not wait for the disk.
    let mut tx = db::begin_no_fsync_wait(pool).await?;
    let revived: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (SELECT node_id, is_active, to_jsonb(n.*) AS row FROM nodes n WHERE node_id = $1 FOR UPDATE)
         UPDATE nodes SET last_heartbeat = now(), stats = $2, is_active = true
         FROM old WHERE nodes.node_id = old.node_id
         RETURNING CASE WHEN old.is_active THEN NULL ELSE old.row END, to_jsonb(nodes.*)",
    )
    .bind(node_id)
    .bind(stats)
    .fetch_optional(&mut *tx)
    .await?
    .and_then(|(old, new): (Option<Value>, Value)| old.map(|o| (o, new)));
    if let Some((old, new)) = revived {
        changelog::record(
            &mut tx,
            change(
                node_id,
                Action::Update,
                Some(&old),
                &new,
                node_name,
                "heartbeat resumed",
            ),
        )
        .await?;
    }
    tx.commit().await
}

/// Marks the node inactive on a clean shutdown.
pub(crate) async fn deactivate(
    pool: &PgPool,
    node_id: Uuid,
    node_name: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed: Option<(Value, Value)> = sqlx::query_as(
        "WITH old AS (SELECT node_id, to_jsonb(n.*) AS row FROM nodes n WHERE node_id = $1 FOR UPDATE)
         UPDATE nodes SET is_active = false FROM old WHERE nodes.node_id = old.node_id
         RETURNING old.row, to_jsonb(nodes.*)",
    )
    .bind(node_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((old, new)) = changed {
        changelog::record(
            &mut tx,
            change(
                node_id,
                Action::Update,
                Some(&old),
                &new,
                node_name,
                "stopped",
            ),
        )
        .await?;
    }
    tx.commit().await
}
