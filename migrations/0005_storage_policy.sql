-- How long predictions and outcomes are kept and when TimescaleDB compresses them: one row, changed by
-- `shadowgate migrate --retention 90d --compress-after 7d` (none: never). The jobs that carry it out are
-- made by operator/shadowgate_operator/timescale.py on the full TimescaleDB edition; plain PostgreSQL and
-- the Apache edition keep the row for later and run no policy.
--
-- Defaults: keep everything (retention NULL: nothing the user did not ask to lose is ever dropped), and
-- compress chunks older than 7 days. A database that already runs the policies the first version of
-- 0002 created (90 days, 7 days) keeps their horizons: `shadowgate migrate` prints them from now on.
CREATE TABLE IF NOT EXISTS storage_policy (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    retention       interval    CHECK (retention > interval '0'),
    compress_after  interval    CHECK (compress_after > interval '0'),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE
    kept_retention interval;
    kept_compression interval := interval '7 days';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $sql$SELECT (config->>'drop_after')::interval FROM timescaledb_information.jobs
                     WHERE proc_name = 'policy_retention' AND hypertable_name = 'predictions'
                       AND hypertable_schema = current_schema()$sql$ INTO kept_retention;
        EXECUTE $sql$SELECT coalesce((SELECT (config->>'compress_after')::interval FROM timescaledb_information.jobs
                     WHERE proc_name = 'policy_compression' AND hypertable_name = 'predictions'
                       AND hypertable_schema = current_schema()), interval '7 days')$sql$ INTO kept_compression;
    END IF;
    INSERT INTO storage_policy (retention, compress_after) VALUES (kept_retention, kept_compression)
    ON CONFLICT (singleton) DO NOTHING;
END
$$;
