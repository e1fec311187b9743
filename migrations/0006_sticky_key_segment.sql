-- What the analysis needs to know about how a request was grouped (issue 11):
--
-- sticky_key: the value the router hashed to pick the request's side when spec.traffic.stickyHeader is set
--   (the header's value, or the request id when the request has none); NULL otherwise. Requests with the
--   same key always land on the same side, so they are not independent: the analysis clusters its variance
--   by this key (operator/shadowgate_operator/queries.py).
-- segment: the value of spec.analysis.segmentBy for the request (an instrument, a market); NULL when not
--   configured or absent. The analysis compares the models per segment too.
--
-- Plain nullable columns without a default: instant on PostgreSQL and allowed on TimescaleDB hypertables
-- with compressed chunks. Rows recorded before this migration keep NULL (each request its own key).
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS sticky_key text;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS segment text;
