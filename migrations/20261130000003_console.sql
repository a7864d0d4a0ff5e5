-- The operator console (GET /api/v1/jobs, GET /api/v1/overview).
--
-- Jobs are listed newest first by (submitted_at, job_id), keyset-paged.
-- (Job ids of queue submissions are the publisher's message ids, so they
-- are not time-ordered UUIDv7s and cannot stand in for the time.)
CREATE INDEX jobs_submitted_idx ON jobs (submitted_at DESC, job_id DESC);
-- One user's jobs the same way (replaces the index without the job id).
DROP INDEX IF EXISTS jobs_user_submitted_idx;
CREATE INDEX jobs_user_submitted_idx ON jobs (user_id, submitted_at DESC, job_id DESC);
-- Jobs not finished yet: counts by state, the oldest waiting job, and the
-- list filtered to these states. Only unfinished rows are in it, so it
-- stays small however many jobs the table holds.
CREATE INDEX jobs_unfinished_idx ON jobs (status, submitted_at DESC, job_id DESC)
    WHERE status IN ('pending', 'queued', 'running');
-- Jobs that ended badly: the "failed" filters and recent failures, without
-- walking every succeeded job.
CREATE INDEX jobs_unhappy_idx ON jobs (status, submitted_at DESC, job_id DESC)
    WHERE status IN ('failed', 'timed_out', 'cancelled', 'dead');

-- Scheduler health: fire-time backlogs missed past the grace.
ALTER TABLE task_schedule ADD COLUMN misfire_count bigint NOT NULL DEFAULT 0;
ALTER TABLE task_schedule ADD COLUMN last_misfire_at timestamptz;

-- A re-run (POST /api/v1/jobs/{id}/rerun) names the job it repeats. No
-- foreign key: deleting old jobs (retention) must not scan for references.
ALTER TABLE jobs ADD COLUMN rerun_of uuid;

-- Live output of running shell jobs (GET /api/v1/jobs/{id}/output?follow=true):
-- the worker copies a run's output so far here every second and removes the
-- row when the run ends; the stored output stays in task_history. UNLOGGED:
-- no WAL for a view that a crash may lose. Not in the change log (like
-- heartbeats): it is not a record, only a window onto a running process.
CREATE UNLOGGED TABLE job_output_live (
    job_id     uuid PRIMARY KEY,
    attempt    integer NOT NULL,
    stdout     bytea NOT NULL DEFAULT '',
    stderr     bytea NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
