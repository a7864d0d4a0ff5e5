-- When a failed attempt is retried after a backoff, the job is queued with
-- the time its retry is due. A copy of an older work message that arrives
-- before then (a redelivery) is acked without running, so it cannot cut
-- the backoff short; the delayed outbox message runs the retry on time.
ALTER TABLE jobs ADD COLUMN retry_at timestamptz;
