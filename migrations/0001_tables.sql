-- shadowgate schema, plain PostgreSQL (>= 14). TimescaleDB features are added by 0002 when present.
-- Every table is keyed by (namespace, deployment): a ShadowDeployment's name is unique per namespace.

-- One row per request the router handled: both sides' answers as far as they exist.
-- shadow: production always answers; candidate_* is set for the mirrored share.
-- canary: served_by says who answered; the other side is NULL unless a fallback happened.
CREATE TABLE predictions (
    time                   timestamptz      NOT NULL,
    namespace              text             NOT NULL,
    deployment             text             NOT NULL,
    request_id             text             NOT NULL,
    served_by              text             NOT NULL CHECK (served_by IN ('production', 'candidate')),
    mode                   text             NOT NULL CHECK (mode IN ('shadow', 'canary')),
    weight                 smallint         NOT NULL CHECK (weight BETWEEN 0 AND 100),
    config_revision        text,
    production_version     text,
    production_prediction  double precision,
    production_confidence  double precision,
    production_latency_ms  real,
    production_status      smallint,        -- HTTP status from the model server; NULL when not called
    production_error       text,            -- timeout | connect | bad_response | ... ; NULL on success
    candidate_version      text,
    candidate_prediction   double precision,
    candidate_confidence   double precision,
    candidate_latency_ms   real,
    candidate_status       smallint,
    candidate_error        text,
    fallback               boolean          NOT NULL DEFAULT false,  -- canary: candidate failed, production answered
    features               jsonb
);
-- Replayed batches may repeat rows: the writer inserts with ON CONFLICT DO NOTHING on this key.
-- (A unique key on a hypertable must contain the time column.)
CREATE UNIQUE INDEX predictions_request_key ON predictions (namespace, deployment, request_id, time);
CREATE INDEX predictions_deployment_time ON predictions (namespace, deployment, time DESC);

-- The real result of a request, known later (the trade closed, the label landed).
CREATE TABLE outcomes (
    time        timestamptz      NOT NULL,
    namespace   text             NOT NULL,
    deployment  text             NOT NULL,
    request_id  text             NOT NULL,
    outcome     double precision NOT NULL
);
CREATE UNIQUE INDEX outcomes_request_key ON outcomes (namespace, deployment, request_id, time);
CREATE INDEX outcomes_deployment_time ON outcomes (namespace, deployment, time DESC);

-- What the operator did and why: steps, promotions, rollbacks, gates, manual verbs.
CREATE TABLE deployment_events (
    time        timestamptz NOT NULL,
    namespace   text        NOT NULL,
    deployment  text        NOT NULL,
    event       text        NOT NULL,      -- the Event reason: StepAdvanced, Promoted, RolledBack, GateFailed, ...
    phase       text,
    step        smallint,
    weight      smallint,
    message     text        NOT NULL,
    details     jsonb
);
CREATE INDEX deployment_events_deployment_time ON deployment_events (namespace, deployment, time DESC);

-- Every analysis result, one row per interval.
CREATE TABLE deployment_metrics (
    time                 timestamptz      NOT NULL,
    namespace            text             NOT NULL,
    deployment           text             NOT NULL,
    step                 smallint         NOT NULL,
    weight               smallint         NOT NULL,
    samples              integer          NOT NULL,
    metric               text             NOT NULL,
    production_value     double precision,
    candidate_value      double precision,
    improvement          double precision,
    overall_score        double precision,
    p_value              double precision,
    decision             text             NOT NULL,
    reason               text             NOT NULL,
    metrics              jsonb
);
CREATE INDEX deployment_metrics_deployment_time ON deployment_metrics (namespace, deployment, time DESC);

-- The spec each analysis ran under, one row per generation: replay re-reads settings from here.
CREATE TABLE shadow_deployments (
    namespace            text        NOT NULL,
    deployment           text        NOT NULL,
    generation           bigint      NOT NULL,
    candidate_revision   text        NOT NULL,
    spec                 jsonb       NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, deployment, generation)
);
