-- When each row reached the database, so the analysis can read only what arrived since its last run
-- (operator/shadowgate_operator/queries.py). `time` cannot serve: the router stamps predictions when it
-- served them and replays its spool after a database outage, and outcomes may carry the client's own time.
--
-- clock_timestamp(), not now(): the value is taken after the inserting statement holds its lock on the
-- table, which is what lets the analysis know when every row stamped before a moment is committed.
-- Writers must leave the column to its default.
--
-- Plain statements on purpose: a nullable column without a default, then a default for new rows, is
-- instant on PostgreSQL (no table rewrite) and allowed on TimescaleDB hypertables with compressed
-- chunks, where ADD COLUMN ... DEFAULT <non-constant> is refused. Rows recorded before this migration
-- keep NULL and count as recorded at their `time`.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS recorded_at timestamptz;
ALTER TABLE predictions ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS recorded_at timestamptz;
ALTER TABLE outcomes ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();

CREATE INDEX IF NOT EXISTS predictions_deployment_recorded ON predictions (namespace, deployment, recorded_at);
CREATE INDEX IF NOT EXISTS outcomes_deployment_recorded ON outcomes (namespace, deployment, recorded_at);
