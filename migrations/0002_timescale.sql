-- TimescaleDB, when the extension is installed; nothing at all on plain PostgreSQL.
-- Hypertables work on every edition; compression, retention policies and continuous aggregates need
-- the full ("timescale") license, so the Apache-only edition gets hypertables only.
DO $$
DECLARE
    full_license boolean := coalesce(current_setting('timescaledb.license', true), '') = 'timescale';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RAISE NOTICE 'timescaledb is not installed: plain PostgreSQL tables';
        RETURN;
    END IF;

    EXECUTE $sql$SELECT create_hypertable('predictions', 'time', chunk_time_interval => interval '1 day',
                                          if_not_exists => true, migrate_data => true)$sql$;
    EXECUTE $sql$SELECT create_hypertable('outcomes', 'time', chunk_time_interval => interval '1 day',
                                          if_not_exists => true, migrate_data => true)$sql$;
    EXECUTE $sql$SELECT create_hypertable('deployment_metrics', 'time', chunk_time_interval => interval '7 days',
                                          if_not_exists => true, migrate_data => true)$sql$;
    EXECUTE $sql$SELECT create_hypertable('deployment_events', 'time', chunk_time_interval => interval '30 days',
                                          if_not_exists => true, migrate_data => true)$sql$;

    IF NOT full_license THEN
        RAISE NOTICE 'timescaledb Apache edition: hypertables only (no compression, retention or aggregates)';
        RETURN;
    END IF;

    EXECUTE $sql$ALTER TABLE predictions SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'namespace, deployment', timescaledb.compress_orderby = 'time DESC')$sql$;
    EXECUTE $sql$ALTER TABLE outcomes SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'namespace, deployment', timescaledb.compress_orderby = 'time DESC')$sql$;
    EXECUTE $sql$SELECT add_compression_policy('predictions', interval '7 days', if_not_exists => true)$sql$;
    EXECUTE $sql$SELECT add_compression_policy('outcomes', interval '7 days', if_not_exists => true)$sql$;
    EXECUTE $sql$SELECT add_retention_policy('predictions', interval '90 days', if_not_exists => true)$sql$;
    EXECUTE $sql$SELECT add_retention_policy('outcomes', interval '90 days', if_not_exists => true)$sql$;

    -- Per-minute traffic per side, for dashboards. Created WITH NO DATA (we are in a transaction);
    -- the policy fills it in the background.
    EXECUTE $sql$
        CREATE MATERIALIZED VIEW IF NOT EXISTS predictions_per_minute
        WITH (timescaledb.continuous) AS
        SELECT time_bucket(interval '1 minute', time) AS bucket,
               namespace, deployment, served_by,
               count(*)                                                   AS requests,
               count(*) FILTER (WHERE candidate_status IS NOT NULL)       AS candidate_requests,
               count(*) FILTER (WHERE production_status >= 500 OR production_error IS NOT NULL) AS production_errors,
               count(*) FILTER (WHERE candidate_status >= 500 OR candidate_error IS NOT NULL)   AS candidate_errors,
               avg(production_latency_ms)                                 AS production_latency_ms_avg,
               avg(candidate_latency_ms)                                  AS candidate_latency_ms_avg
        FROM predictions
        GROUP BY bucket, namespace, deployment, served_by
        WITH NO DATA
    $sql$;
    EXECUTE $sql$SELECT add_continuous_aggregate_policy('predictions_per_minute',
        start_offset => interval '1 hour', end_offset => interval '1 minute',
        schedule_interval => interval '1 minute', if_not_exists => true)$sql$;
END
$$;
