-- A task run copies its task's kill_on_timeout: when false, the run is not
-- killed at its timeout; it runs to its end and the overrun is recorded.
ALTER TABLE jobs ADD COLUMN kill_on_timeout boolean NOT NULL DEFAULT true;
