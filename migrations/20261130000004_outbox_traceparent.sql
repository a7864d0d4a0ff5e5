-- Tracing across the hop (README, "Tracing"): the W3C traceparent of the
-- span that accepted the job, sent as the `traceparent` header of the work
-- message whoever publishes it (the api, the ingress, or later the outbox
-- relay). NULL when tracing is off. Nullable without a default: adding it
-- rewrites nothing.
ALTER TABLE outbox ADD COLUMN traceparent text;
