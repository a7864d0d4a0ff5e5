//! Marking jobs published (`pending` → `queued`) once the broker confirmed
//! their work messages, with their outbox rows and change-log rows, in the
//! caller's transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::changelog::{self, Action, Change};
use crate::events::job_event;
use crate::messages::JobEvent;
use crate::model::JobStatus;
use crate::store::accept::OutboxMessage;

/// Marks outbox rows published and moves their jobs from `pending` to
/// `queued`, with change-log rows, on `conn`. Returns the `job.queued`
/// events to publish once the transaction is committed.
pub async fn mark_queued(
    conn: &mut PgConnection,
    rows: &[&OutboxMessage],
    changed_by: &str,
) -> Result<Vec<JobEvent>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.outbox_id).collect();
    let job_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.job_id).collect();
    // One statement marks the outbox rows published and their jobs queued.
    let changed: Vec<(Uuid, i32, String, String)> = sqlx::query!(
        r#"WITH published AS (
             UPDATE outbox SET published_at = now(), attempts = attempts + 1
             WHERE outbox_id = ANY($2)
         ), old AS (
             SELECT job_id, to_jsonb(j.*)::text AS row FROM jobs j
             WHERE job_id = ANY($1) AND status = 'pending'
             -- A locked row is being claimed by a worker, which moves it
             -- on from pending itself; waiting for it would only queue
             -- this batch behind every claim.
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs SET status = 'queued' FROM old
         WHERE jobs.job_id = old.job_id
         RETURNING jobs.job_id, jobs.attempt, old.row AS "old!", to_jsonb(jobs.*)::text AS "new!""#,
        &job_ids,
        &ids,
    )
    .map(|r| (r.job_id, r.attempt, r.old, r.new))
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
