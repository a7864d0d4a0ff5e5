-- The whole taskhost schema (described for users in docs/contract.md, "Schema").
-- Only files in migrations/ change the schema; services refuse to start on a
-- database that is behind and ask for `taskhost migrate`.

-- Worker nodes. node_id is stable per node_name so a restarted worker is the
-- same node.
CREATE TABLE nodes (
    node_id              uuid PRIMARY KEY,
    node_name            text NOT NULL UNIQUE,
    hostname             text NOT NULL,
    ip_address           text,
    port                 integer,
    node_group           text NOT NULL DEFAULT 'default',
    node_role            text NOT NULL DEFAULT 'worker',
    tags                 jsonb NOT NULL DEFAULT '[]'::jsonb,
    is_active            boolean NOT NULL DEFAULT true,
    last_heartbeat       timestamptz NOT NULL DEFAULT now(),
    max_concurrent_tasks integer NOT NULL DEFAULT 1 CHECK (max_concurrent_tasks > 0),
    supported_task_types text[] NOT NULL DEFAULT ARRAY['pool', 'background', 'inline'],
    stats                jsonb NOT NULL DEFAULT '{}'::jsonb,
    registered_at        timestamptz NOT NULL DEFAULT now(),
    registered_by        text NOT NULL DEFAULT 'worker'
);
-- Routing looks up active nodes by group and role; the reaper by heartbeat.
CREATE INDEX nodes_active_routing_idx ON nodes (node_group, node_role) WHERE is_active;
CREATE INDEX nodes_active_heartbeat_idx ON nodes (last_heartbeat) WHERE is_active;

-- Recurring tasks.
CREATE TABLE tasks (
    task_id             uuid PRIMARY KEY,
    task_name           text NOT NULL,
    app_name            text NOT NULL DEFAULT 'default',
    command             text NOT NULL,
    execution_mode      text NOT NULL DEFAULT 'pool'
                        CHECK (execution_mode IN ('pool', 'background', 'inline')),
    schedule            text NOT NULL,
    timezone            text NOT NULL DEFAULT 'UTC',
    enabled             boolean NOT NULL DEFAULT true,
    assigned_node_id    uuid,
    assigned_node_group text,
    assigned_node_role  text,
    fanout              text NOT NULL DEFAULT 'one' CHECK (fanout IN ('one', 'all')),
    priority            smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
    timeout_seconds     integer CHECK (timeout_seconds > 0),
    max_retries         integer NOT NULL DEFAULT 0 CHECK (max_retries >= 0),
    retry_delay_seconds integer NOT NULL DEFAULT 60 CHECK (retry_delay_seconds >= 0),
    kill_on_timeout     boolean NOT NULL DEFAULT true,
    misfire_policy      text NOT NULL DEFAULT 'catch_up' CHECK (misfire_policy IN ('catch_up', 'skip')),
    overlap_policy      text NOT NULL DEFAULT 'skip' CHECK (overlap_policy IN ('skip', 'allow')),
    no_node_policy      text NOT NULL DEFAULT 'fail' CHECK (no_node_policy IN ('fail', 'hold')),
    description         text NOT NULL DEFAULT '',
    tags                jsonb NOT NULL DEFAULT '[]'::jsonb,
    parameters          jsonb NOT NULL DEFAULT '{}'::jsonb,
    environment         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    modified_by         text,
    modified_at         timestamptz,
    UNIQUE (task_name, app_name)
);

-- Scheduling state of each task, one row per task.
CREATE TABLE task_schedule (
    task_id         uuid PRIMARY KEY REFERENCES tasks (task_id) ON DELETE CASCADE,
    next_run        timestamptz,
    last_run        timestamptz,
    last_state      text,
    is_running      boolean NOT NULL DEFAULT false,
    running_on_node uuid,
    started_at      timestamptz,
    claim_expiry    timestamptz,
    total_runs      bigint NOT NULL DEFAULT 0,
    success_count   bigint NOT NULL DEFAULT 0,
    failure_count   bigint NOT NULL DEFAULT 0
);
-- Due tasks: WHERE next_run <= now() ORDER BY next_run.
CREATE INDEX task_schedule_due_idx ON task_schedule (next_run) WHERE next_run IS NOT NULL;

-- One row per execution request (HTTP, queue, or a task firing).
CREATE TABLE jobs (
    job_id            uuid PRIMARY KEY,
    user_id           text NOT NULL,
    session_id        text,
    job_name          text NOT NULL,
    command           text NOT NULL,
    description       text NOT NULL DEFAULT '',
    execution_mode    text NOT NULL DEFAULT 'pool'
                      CHECK (execution_mode IN ('pool', 'background', 'inline')),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'queued', 'running', 'succeeded', 'failed',
                                        'timed_out', 'cancelled', 'dead')),
    status_reason     text,
    target_node_id    uuid,
    target_node_group text,
    target_node_role  text,
    fanout            text NOT NULL DEFAULT 'one' CHECK (fanout IN ('one', 'all')),
    priority          smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
    timeout_seconds   integer CHECK (timeout_seconds > 0),
    env               jsonb NOT NULL DEFAULT '{}'::jsonb,
    task_id           uuid REFERENCES tasks (task_id) ON DELETE SET NULL,
    fire_at           timestamptz,
    triggered_by      text NOT NULL DEFAULT 'api'
                      CHECK (triggered_by IN ('api', 'queue', 'schedule', 'manual')),
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_retries       integer NOT NULL DEFAULT 0 CHECK (max_retries >= 0),
    claimed_by        uuid,
    claim_expiry      timestamptz,
    cancel_requested  boolean NOT NULL DEFAULT false,
    submitted_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz,
    exit_code         integer,
    success           boolean,
    idempotency_key   text,
    request_hash      text
);
-- A user's results, newest first.
CREATE INDEX jobs_user_completed_idx ON jobs (user_id, completed_at DESC) WHERE completed_at IS NOT NULL;
CREATE INDEX jobs_user_submitted_idx ON jobs (user_id, submitted_at DESC);
-- A node's running jobs, and claims whose lease ran out.
CREATE INDEX jobs_running_node_idx ON jobs (claimed_by) WHERE status = 'running';
CREATE INDEX jobs_running_expiry_idx ON jobs (claim_expiry) WHERE status = 'running';
CREATE INDEX jobs_task_idx ON jobs (task_id, submitted_at DESC) WHERE task_id IS NOT NULL;
-- An Idempotency-Key names one job per user.
CREATE UNIQUE INDEX jobs_idempotency_idx ON jobs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- One job per task per fire time (per node when a firing fans out to all nodes).
CREATE UNIQUE INDEX jobs_task_fire_idx ON jobs (task_id, fire_at, coalesce(target_node_id, '00000000-0000-0000-0000-000000000000'::uuid))
    WHERE task_id IS NOT NULL AND fire_at IS NOT NULL;

-- One row per finished attempt of a job.
CREATE TABLE task_history (
    history_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id          uuid REFERENCES tasks (task_id) ON DELETE SET NULL,
    job_id           uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    node_id          uuid,
    attempt          integer NOT NULL,
    start_time       timestamptz,
    end_time         timestamptz NOT NULL DEFAULT now(),
    duration_ms      bigint,
    state            text NOT NULL
                     CHECK (state IN ('pending', 'queued', 'running', 'succeeded', 'failed',
                                      'timed_out', 'cancelled', 'dead')),
    -- false for an attempt that is retried; the job's last row is final.
    is_final         boolean NOT NULL DEFAULT true,
    exit_code        integer,
    output           bytea,
    error            bytea,
    output_truncated boolean NOT NULL DEFAULT false,
    triggered_by     text NOT NULL DEFAULT 'api'
                     CHECK (triggered_by IN ('api', 'queue', 'schedule', 'manual')),
    parameters       jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- At most one terminal history row per job, and one row per attempt.
CREATE UNIQUE INDEX task_history_final_idx ON task_history (job_id) WHERE is_final;
CREATE UNIQUE INDEX task_history_attempt_idx ON task_history (job_id, attempt);
CREATE INDEX task_history_task_idx ON task_history (task_id, end_time DESC) WHERE task_id IS NOT NULL;
CREATE INDEX task_history_end_idx ON task_history (end_time);

-- The change log: gzip-compressed JSON of the old and new row, written in the
-- same transaction as the change it describes.
CREATE TABLE data_change (
    change_seq    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    change_id     uuid NOT NULL UNIQUE,
    table_name    text NOT NULL,
    record_id     text NOT NULL,
    action        text NOT NULL CHECK (action IN ('INSERT', 'UPDATE', 'DELETE')),
    old_data      bytea,
    new_data      bytea,
    changed_by    text NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now(),
    node_id       uuid,
    change_reason text
);
CREATE INDEX data_change_table_seq_idx ON data_change (table_name, change_seq);
CREATE INDEX data_change_changed_at_idx ON data_change (changed_at);

-- Change-feed cursors of each consumer (a node or an external system).
CREATE TABLE sync_state (
    consumer        text NOT NULL,
    table_name      text NOT NULL,
    last_change_seq bigint NOT NULL DEFAULT 0,
    synced_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, table_name)
);

-- API keys. Only the SHA-256 of the whole key is stored.
CREATE TABLE api_keys (
    key_id        uuid PRIMARY KEY,
    user_id       text NOT NULL,
    name          text NOT NULL DEFAULT '',
    prefix        text NOT NULL,
    secret_sha256 text NOT NULL UNIQUE,
    roles         text[] NOT NULL DEFAULT ARRAY[]::text[],
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

-- Messages committed with the row that caused them. The api publishes them at
-- once (fast path); the scheduler's relay publishes what is left (recovery).
-- exchange is the logical name under the AMQP prefix ('work', 'events', ...).
CREATE TABLE outbox (
    outbox_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    message_type text NOT NULL,
    message_id   text NOT NULL,
    priority     smallint NOT NULL DEFAULT 0,
    payload      jsonb NOT NULL,
    job_id       uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX outbox_unpublished_idx ON outbox (outbox_id) WHERE published_at IS NULL;
