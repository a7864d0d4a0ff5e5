-- Task chains and parameters (README, "Chains and parameters").
--
-- A task may run after other tasks: `tasks.after` is a JSON array of
-- `{"taskId": uuid, "on": "succeeded"|"failed"|"finished", "parameters": {..}}`.
-- The end of an upstream run fires the downstream in the transaction that
-- records that end (common/src/store/chain.rs). Stored on the task row, so
-- its changes are in the change log with the task.
ALTER TABLE tasks ADD COLUMN after jsonb NOT NULL DEFAULT '[]'::jsonb;
-- The downstream tasks of an upstream: WHERE after @> '[{"taskId": ...}]'.
CREATE INDEX tasks_after_idx ON tasks USING gin (after jsonb_path_ops);

-- A run fired by the end of another task's run.
ALTER TABLE jobs DROP CONSTRAINT jobs_triggered_by_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_triggered_by_check
    CHECK (triggered_by IN ('api', 'queue', 'schedule', 'manual', 'dependency'));
ALTER TABLE task_history DROP CONSTRAINT task_history_triggered_by_check;
ALTER TABLE task_history ADD CONSTRAINT task_history_triggered_by_check
    CHECK (triggered_by IN ('api', 'queue', 'schedule', 'manual', 'dependency'));

-- The upstream run that fired a dependency run. No foreign key (like
-- rerun_of): retention deletes old jobs without scanning for references.
ALTER TABLE jobs ADD COLUMN upstream_job_id uuid;
-- One downstream run per (downstream task, upstream run): a repeated
-- recording of the same end never fires twice.
CREATE UNIQUE INDEX jobs_task_upstream_idx ON jobs (task_id, upstream_job_id)
    WHERE task_id IS NOT NULL AND upstream_job_id IS NOT NULL;

-- Fan-in: the upstreams of a downstream task whose run matched its `on`
-- since the downstream's last dependency run, as {upstreamTaskId: jobId}.
-- One row per downstream task, locked by the upsert of each upstream end,
-- so two upstreams ending at once fire exactly one run. Internal state of
-- the chain (shown in GET /tasks/{id}/schedule), not in the change log.
CREATE TABLE task_chain_state (
    task_id         uuid PRIMARY KEY REFERENCES tasks (task_id) ON DELETE CASCADE,
    satisfied       jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_fired_at   timestamptz,
    last_fired_job  uuid,
    fire_count      bigint NOT NULL DEFAULT 0
);
