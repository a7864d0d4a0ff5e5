-- Per-job limits (README, "Guarantees and choices": jobs run bounded): a
-- job's or task's `limits` as JSON, {"cpuSeconds", "memoryMb", "maxFiles",
-- "maxProcesses"}, each present only when set. NULL: the worker's limits
-- alone. A worker applies min(job, worker) for each limit it has, so a job
-- can only tighten them. A job fired from a task gets the task's limits.
ALTER TABLE jobs ADD COLUMN limits jsonb;
ALTER TABLE tasks ADD COLUMN limits jsonb;
