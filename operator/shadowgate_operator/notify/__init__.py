"""Telling people: each transition of a ShadowDeployment, to the receivers its spec.notifications names.

- `messages` (pure): what is said. An `Announcement` (one Event of a transition, with the rollout's
  numbers) becomes a CloudEvents 1.0 structured-JSON body or a Slack incoming-webhook payload, with an id
  that is the same on every attempt, so receivers can drop duplicates.
- `queue`: the durable delivery queue, a PostgreSQL table (migrations/*_notifications.sql) in the
  ShadowDeployment's own database, so what was queued survives an operator restart.
- `deliver`: the worker that claims due messages, posts them, and retries failures with backoff. It runs
  beside the Reconciler, never in its way: a decision only inserts rows; a receiver that is slow or down
  costs the worker a slot, never the rollout a second.
"""
