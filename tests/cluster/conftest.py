"""Fixtures for tests against the local control plane: the CRD installed once, and the real operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowgate_dev.localenv.binaries import KUBERNETES
from shadowgate_dev.localenv.crds import install_crds
from tests.conftest import REPO_ROOT, Kubectl
from tests.support.operator import OperatorProcess, apply, router_secret

CRD_NAME = "shadowdeployments.shadowgate.io"


@pytest.fixture(scope="session")
def shadow_crd(kubeconfig: str) -> str:
    """The CRDs from crds/, applied, Established and explained (`kubectl explain` works at once)."""
    install_crds(KUBERNETES.path("kubectl"), kubeconfig, [REPO_ROOT / "crds"])
    return CRD_NAME


ApplyShadow = Callable[[str, dict[str, Any]], None]


@pytest.fixture
def apply_shadow(kubectl: Kubectl, dsn: str) -> ApplyShadow:
    """apply_shadow(namespace, manifest): the Secrets it names (database DSN, outcome token; labelled for the
    router), then it."""

    def run(namespace: str, manifest: dict[str, Any]) -> None:
        spec = manifest["spec"]
        for secret, key, value in (
            (spec["database"]["secretRef"]["name"], "dsn", dsn),
            (spec["outcomes"]["tokenSecretRef"]["name"], "token", "test-token"),
        ):
            apply(kubectl, namespace, router_secret(secret, key, value))
        apply(kubectl, namespace, manifest)

    return run


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(
    kubeconfig: str, shadow_crd: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StartOperator]:
    """start_operator("--namespace", ns) runs `shadowgate operator` for this test; stopped at its end.

    As the admin unless given another `kubeconfig` (e.g. a ServiceAccount's); `env` adds variables.
    Its log is printed when the test fails.
    """
    started: list[OperatorProcess] = []

    def start(*args: str, kubeconfig: str = kubeconfig, env: dict[str, str] | None = None) -> OperatorProcess:
        log = tmp_path / f"operator-{len(started)}.log"
        process = OperatorProcess(kubeconfig, log, *args, env=env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in started:
            print(f"--- {process.log_path} ---\n{process.log()[-6000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
