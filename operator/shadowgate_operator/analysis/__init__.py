"""The analysis: what one ShadowDeployment's current window looks like, read from `predictions` and
`outcomes` (the `WindowMetrics` contract of metrics.py). `sql` holds the definitions and the statements
that read them; `window` the running sums, their save/resume (table analysis_windows) and catch-up pacing.

Two ways to read the same definitions:

- `window_metrics(connection, ..., since, until)` reads the whole window in one statement: every
  prediction stamped in it, hash-joined to the latest outcome per request id. Its cost grows with the
  rows in the window (one to two seconds for 200,000 rows on a small shared machine): right for replay
  and tests, too slow to repeat every few seconds on a busy deployment.
- `WindowAnalysis` (one per ShadowDeployment, held in its record: what the operator uses) keeps
  running sums and each run reads only the rows *recorded* since its previous run (`recorded_at`,
  migration 0003), up to a horizon that no open write transaction can still fall behind. New requests
  are added in full; a request whose latest outcome changed has its loss with the old outcome taken
  away and the new one added. Latency percentiles come from histograms, which add up. So a run costs
  what arrived since the last one (index probes and hash joins over those rows), whatever the size of
  the window or of the tables; the first run of a window reads it whole. It gives the same numbers as
  `window_metrics(since, until)` for any `until` past every row's time (bench/analysis checks this
  under load, tests/cluster/test_queries.py batch by batch), given the assumptions stated at
  WRITER_ALLOWANCE and CLOCK_SKEW.

Two things keep every read the operator makes small (bench/analysis: some 15-30 ms with 10 million rows
in the tables and 200,000 in the window): the sums are saved after each run (table analysis_windows), so
a restarted operator or a replica taking over goes on from them instead of reading the window whole; and
between analyses the operator catches a progressing window's sums up every few seconds
(`catch_up_seconds`: more often on busy deployments), so the read an analysis waits for covers seconds
of arrivals, not a whole interval's. The only whole reads left are of a new step's window, which has
just begun, and of a window whose saved sums are gone.
"""
