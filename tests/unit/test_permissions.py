"""Telling a refusal by RBAC from other 403s, and the operator's metrics of what it does."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from shadowgate_operator.api import ShadowDeploymentStatus
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.kube import KubeError
from shadowgate_operator.record import Rollouts

USER = 'User "system:serviceaccount:shadowgate-system:shadowgate-operator"'


@pytest.mark.parametrize(
    ("status", "message", "denied"),
    [
        # The authorizer: the ServiceAccount lacks the verb on the resource.
        (403, f'deployments.apps "a-router" is forbidden: {USER} cannot patch resource "deployments" in API '
              'group "apps" in the namespace "models"', True),
        # Escalation prevention: a Role granting what its creator does not hold itself.
        (403, 'roles.rbac.authorization.k8s.io "a-router" is forbidden: user "system:serviceaccount:x:y" '
              '(groups=["system:serviceaccounts"]) is attempting to grant RBAC permissions not currently held:\n'
              '{APIGroups:[""], Resources:["configmaps"], Verbs:["list"]}', True),
        # 403s that are not about the operator's rights.
        (403, 'configmaps "a-router" is forbidden: unable to create new content in namespace models because it '
              "is being terminated", False),
        (403, 'configmaps "a-router" is forbidden: exceeded quota: small, requested: count/configmaps=1', False),
        (404, 'deployments.apps "a-router" not found', False),
    ],
)  # fmt: skip
def test_permission_denied_is_rbac_only(status: int, message: str, denied: bool) -> None:
    error = KubeError("apply", "Deployment models/a-router", status, message)
    assert error.permission_denied is denied
    assert error.forbidden is (status == 403)


def test_rollout_series_follow_the_status_and_go_with_the_resource() -> None:
    metrics, rollouts = OperatorMetrics(), Rollouts()
    metrics.follow(rollouts)
    status = ShadowDeploymentStatus.model_validate(
        {"phase": "Progressing", "currentWeight": 10, "samples": 42, "metrics": {"overallScore": 0.5}}
    )
    rollouts.get("models", "fraud").status = status
    metrics.permission_denied.labels("apply", "Deployment").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'shadowgate_rollout_phase{name="fraud",namespace="models",phase="Progressing"} 1.0' in text
    assert 'shadowgate_rollout_phase{name="fraud",namespace="models",phase="Promoted"} 0.0' in text
    assert 'shadowgate_rollout_weight_percent{name="fraud",namespace="models"} 10.0' in text
    assert 'shadowgate_rollout_samples{name="fraud",namespace="models"} 42.0' in text
    assert 'shadowgate_rollout_overall_score{name="fraud",namespace="models"} 0.5' in text
    assert 'shadowgate_rollout_ready{name="fraud",namespace="models"} 0.0' in text
    assert 'shadowgate_operator_permission_denied_total{kind="Deployment",verb="apply"} 1.0' in text

    rollouts.get("models", "fraud").status = status.model_copy(update={"metrics": None})
    assert "shadowgate_rollout_overall_score{" not in generate_latest(metrics.registry).decode()
    rollouts.drop("models", "fraud")
    assert 'name="fraud"' not in generate_latest(metrics.registry).decode()
