-- Recurring tasks fire jobs that may be retried with backoff.

-- A job copies its task's retry policy when it fires.
ALTER TABLE jobs ADD COLUMN retry_delay_seconds integer NOT NULL DEFAULT 0 CHECK (retry_delay_seconds >= 0);

-- An outbox message may wait: a retry is published after its backoff delay.
ALTER TABLE outbox ADD COLUMN available_at timestamptz NOT NULL DEFAULT now();
DROP INDEX outbox_unpublished_idx;
CREATE INDEX outbox_unpublished_idx ON outbox (available_at, outbox_id) WHERE published_at IS NULL;

-- The built-in diagnostics task: every 30 minutes on every active node. It
-- can be disabled like any other task (PUT /api/v1/tasks/{id} enabled=false).
-- next_run is NULL so the scheduler computes it on its first pass.
INSERT INTO tasks (task_id, task_name, app_name, command, execution_mode, schedule, timezone, enabled,
                   fanout, priority, timeout_seconds, description, created_by)
VALUES ('00000000-0000-7000-8000-000000000001', 'diagnostics', 'taskhost', 'diagnostics', 'inline',
        '*/30 * * * *', 'UTC', true, 'all', 3, 60,
        'Built-in: each worker reports its own memory, threads, file descriptors and children.', 'system');
INSERT INTO task_schedule (task_id) VALUES ('00000000-0000-7000-8000-000000000001');
