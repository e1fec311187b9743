"""Asking people's checks before the rollout moves: the webhooks of spec.gates.

- `verdict` (pure): which gates a move must ask, whether their answers let it through, the hold they
  leave in status (status.gate), the GatesOpen condition and the Warnings it gives. The rollout plan
  (rollout.plan_rollout) asks it; the answers are inputs, like the analysis window.
- `call`: the HTTP side. The Reconciler asks the gates a plan names (each call bounded by the gate's
  timeout, all of a move's gates at once, in the object's own loop: other ShadowDeployments' loops never
  wait), remembers each answer for an analysis interval (a gate is not called more often), and plans again
  with the answers.
"""
