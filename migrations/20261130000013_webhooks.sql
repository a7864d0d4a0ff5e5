-- Webhook notifications (README, "Notifications (webhooks)").
--
-- `webhooks`: what to call on which events. task_id NULL = every task and
-- every plain job (global); otherwise only runs of that task. Deleting the
-- task deletes its webhooks. Changes are recorded in `data_change`
-- (table_name 'webhooks').
CREATE TABLE webhooks (
    webhook_id        uuid PRIMARY KEY,
    url               text NOT NULL,
    events            text[] NOT NULL,
    task_id           uuid REFERENCES tasks (task_id) ON DELETE CASCADE,
    -- For `task.failed_repeatedly`: fire when a task's final runs ended
    -- failed / timed_out / dead this many times in a row.
    failures_in_a_row integer NOT NULL DEFAULT 3 CHECK (failures_in_a_row > 0),
    enabled           boolean NOT NULL DEFAULT true,
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_task_idx ON webhooks (task_id);

-- The delivery outbox and log: one row per (webhook, event), inserted in the
-- transaction that records the event (a job's final state, a node's death),
-- sent by the schedulers' delivery loop. event_key names the event (e.g.
-- `job:<id>`), so an event is enqueued once per webhook.
CREATE TABLE webhook_deliveries (
    delivery_id      uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (webhook_id) ON DELETE CASCADE,
    event            text NOT NULL,
    event_key        text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (webhook_id, event_key)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log_idx ON webhook_deliveries (webhook_id, created_at DESC);
