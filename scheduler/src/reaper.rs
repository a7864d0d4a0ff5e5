//! The reaper: marks nodes whose heartbeats stopped as dead, and hands back
//! jobs whose claim lease ran out (their worker died or hung) so another
//! worker runs them; and removes live output rows of runs that ended
//! (`job_output_live`). Rows are locked with SKIP LOCKED, so several schedulers
//! can reap at once without doing the same work twice.

use serde_json::Value;
use sqlx::PgPool;
use taskhost_common::changelog::{self, Action, Change};
use taskhost_common::store;
use uuid::Uuid;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Nodes marked dead.
    pub dead_nodes: usize,
    /// Jobs handed back to their queue, with the attempt that lost its claim.
    pub requeued_jobs: Vec<(Uuid, i32)>,
}

/// One pass: nodes silent for `dead_after_secs` are marked inactive and their
/// running claims expire now; jobs whose claim expired go back to `queued`
/// with a new outbox message.
pub async fn reap(pool: &PgPool, dead_after_secs: f64) -> Result<Reaped, sqlx::Error> {
    // Live output rows a worker could not remove (it died, or its last
    // copy raced the end of the run): only running attempts keep one.
    sqlx::query(
        "DELETE FROM job_output_live l WHERE NOT EXISTS (
             SELECT 1 FROM jobs j WHERE j.job_id = l.job_id AND j.status = 'running'
                                    AND j.attempt = l.attempt)
           AND l.updated_at < now() - interval '10 seconds'",
    )
    .execute(pool)
    .await?;
    let mut tx = pool.begin().await?;
    let dead: Vec<(Uuid, Value, Value)> = sqlx::query_as(
        "WITH old AS (
             SELECT node_id, to_jsonb(n.*) AS row FROM nodes n
             WHERE is_active AND last_heartbeat < now() - make_interval(secs => $1)
             FOR UPDATE SKIP LOCKED
         )
         UPDATE nodes SET is_active = false FROM old WHERE nodes.node_id = old.node_id
         RETURNING nodes.node_id, old.row, to_jsonb(nodes.*)",
    )
    .bind(dead_after_secs)
    .fetch_all(&mut *tx)
    .await?;
    for (node_id, old, new) in &dead {
        tracing::warn!(%node_id, "node missed its heartbeats; marked dead");
        changelog::record(
            &mut tx,
            Change {
                table: "nodes",
                record_id: node_id.to_string(),
                action: Action::Update,
                old: Some(old),
                new: Some(new),
                changed_by: "scheduler",
                node_id: None,
                reason: Some("missed heartbeats"),
            },
        )
        .await?;
    }
    let ids: Vec<Uuid> = dead.iter().map(|d| d.0).collect();
    taskhost_common::notify::enqueue_nodes_dead(&mut tx, &ids).await?;
    store::reap::expire_claims_of(&mut tx, &ids).await?;
    let requeued_jobs = store::reap::requeue_expired(&mut tx).await?;
    tx.commit().await?;
    Ok(Reaped {
        dead_nodes: dead.len(),
        requeued_jobs,
    })
}
