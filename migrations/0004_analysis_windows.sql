-- The operator's running sums of each ShadowDeployment's current window (operator/shadowgate_operator/
-- queries.py, WindowAnalysis), saved after every analysis. An operator that restarts, or a replica that
-- takes over, goes on from the saved horizon and reads only the rows recorded since, instead of the
-- whole window (a second or more on a busy step). A row whose window (since, metric, mode) or definition
-- differs from the current one is ignored and overwritten: the analysis then starts over.
-- A small plain table on every edition: one row per ShadowDeployment, updated in place.
CREATE TABLE IF NOT EXISTS analysis_windows (
    namespace   text        NOT NULL,
    deployment  text        NOT NULL,
    since       timestamptz NOT NULL,   -- the window: predictions stamped from here
    metric      text        NOT NULL,
    mode        text        NOT NULL,
    definition  text        NOT NULL,   -- what the sums mean (query version, leeway, histogram accuracy)
    horizon     timestamptz NOT NULL,   -- every row recorded up to here is in the sums
    state       jsonb       NOT NULL,   -- the sums and the latency histograms
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, deployment)
);
