//! Live output: while a shell job runs, its output so far is copied every
//! [`EVERY`] into `job_output_live` (an UNLOGGED table: no WAL, and a crash
//! loses only this view, never the stored output), where
//! `GET /api/v1/jobs/{id}/output?follow=true` picks it up. A run shorter
//! than [`EVERY`] never writes there, so the hot path of short jobs pays
//! nothing. The row is removed when the run ends; the stored copy in
//! `task_history` is written as before, and what was shown live is always
//! a prefix of it. Secret values are masked in the live copy as in the
//! stored one, and its last few bytes (three times the longest secret) are
//! held back until more follows, so a secret half-printed at the moment of
//! a copy is never shown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::exec::Capture;

/// How often the output so far is copied.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// Copies a running job's capture to `job_output_live` until dropped, then
/// removes its row.
pub(crate) struct LiveOutput {
    task: tokio::task::JoinHandle<()>,
    wrote: Arc<AtomicBool>,
    pool: PgPool,
    job_id: Uuid,
    attempt: i32,
}

impl LiveOutput {
    /// Starts copying `capture` for one attempt of a job.
    pub(crate) fn start(
        pool: &PgPool,
        job_id: Uuid,
        attempt: i32,
        capture: Arc<Capture>,
        masks: Vec<Vec<u8>>,
    ) -> Self {
        let wrote = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(copy_loop(
            pool.clone(),
            job_id,
            attempt,
            capture,
            masks,
            wrote.clone(),
        ));
        Self {
            task,
            wrote,
            pool: pool.clone(),
            job_id,
            attempt,
        }
    }

    /// Stops copying and removes the row, if one was written.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        // A run that never wrote (most: shorter than EVERY) costs nothing.
        if self.wrote.load(Ordering::SeqCst)
            && let Err(error) =
                sqlx::query("DELETE FROM job_output_live WHERE job_id = $1 AND attempt = $2")
                    .bind(self.job_id)
                    .bind(self.attempt)
                    .execute(&self.pool)
                    .await
        {
            tracing::debug!(%error, job_id = %self.job_id, "live output row left for retention");
        }
    }
}

/// Runs until aborted.
async fn copy_loop(
    pool: PgPool,
    job_id: Uuid,
    attempt: i32,
    capture: Arc<Capture>,
    masks: Vec<Vec<u8>>,
    wrote: Arc<AtomicBool>,
) {
    let hold = 3 * masks.iter().map(Vec::len).max().unwrap_or(0);
    let shown = |raw: Vec<u8>| -> Vec<u8> {
        if masks.is_empty() {
            return raw;
        }
        let mut masked = taskhost_common::secrets::mask_output(&raw, &masks);
        masked.truncate(masked.len().saturating_sub(hold));
        masked
    };
    let mut written = 0usize;
    loop {
        tokio::time::sleep(EVERY).await;
        // The capture only grows while the run lasts (its readers take it
        // whole at the end), so a length that did not grow has nothing new.
        if capture.captured() <= written {
            continue;
        }
        let (stdout, stderr) = capture.snapshot();
        let len = stdout.len() + stderr.len();
        if len <= written {
            continue;
        }
        let (stdout, stderr) = (shown(stdout), shown(stderr));
        match sqlx::query(
            "INSERT INTO job_output_live (job_id, attempt, stdout, stderr, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (job_id) DO UPDATE
               SET attempt = EXCLUDED.attempt, stdout = EXCLUDED.stdout,
                   stderr = EXCLUDED.stderr, updated_at = now()
             WHERE job_output_live.attempt <= EXCLUDED.attempt",
        )
        .bind(job_id)
        .bind(attempt)
        .bind(&stdout)
        .bind(&stderr)
        .execute(&pool)
        .await
        {
            Ok(_) => {
                written = len;
                wrote.store(true, Ordering::SeqCst);
            }
            Err(error) => tracing::debug!(%error, %job_id, "live output not copied this time"),
        }
    }
}
