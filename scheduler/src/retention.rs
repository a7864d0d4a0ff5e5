//! Retention: prunes finished jobs (their history goes with them), the
//! change log and published outbox rows older than the configured ages.
//! Failures are kept longer than successes. Deletes run in batches so no
//! pass holds long locks; several schedulers pruning at once only share the
//! work.

use sqlx::PgPool;
use taskhost_common::config::RetentionSettings;
use taskhost_common::model::JobStatus;
use taskhost_common::store;

/// Rows removed by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Succeeded jobs (with their history).
    pub succeeded_jobs: u64,
    /// Jobs that ended in any other terminal state (with their history).
    pub failed_jobs: u64,
    /// `data_change` rows.
    pub changes: u64,
    /// Published `outbox` rows.
    pub outbox: u64,
}

const BATCH: i64 = 5000;

async fn drain(pool: &PgPool, sql: &'static str, days: f64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(sql)
            .bind(days)
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

async fn prune_jobs(pool: &PgPool, states: &[JobStatus], days: u32) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = store::reap::prune(pool, states, days, BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// One pruning pass. Pruning is not written to `data_change` row by row (it
/// would double the rows it removes); each pass logs its counts.
pub async fn prune(pool: &PgPool, r: &RetentionSettings) -> Result<Pruned, sqlx::Error> {
    let p = Pruned {
        succeeded_jobs: prune_jobs(pool, &[JobStatus::Succeeded], r.success_days).await?,
        failed_jobs: prune_jobs(
            pool,
            &[
                JobStatus::Failed,
                JobStatus::TimedOut,
                JobStatus::Cancelled,
                JobStatus::Dead,
            ],
            r.failure_days,
        )
        .await?,
        changes: drain(
            pool,
            "DELETE FROM data_change WHERE change_seq IN (
                 SELECT change_seq FROM data_change
                 WHERE changed_at < now() - make_interval(days => $1::int) LIMIT $2)",
            f64::from(r.change_days),
        )
        .await?,
        outbox: drain(
            pool,
            "DELETE FROM outbox WHERE outbox_id IN (
                 SELECT outbox_id FROM outbox
                 WHERE published_at < now() - make_interval(days => $1::int) LIMIT $2)",
            1.0,
        )
        .await?,
    };
    Ok(p)
}
