"""Fixtures for tests against the local control plane: the CRD installed once, and the real operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, Kubectl
from tests.support.operator import OperatorProcess

CRD_NAME = "shadowdeployments.shadowgate.io"


@pytest.fixture(scope="session")
def shadow_crd(kubectl: Kubectl) -> str:
    """The ShadowDeployment CRD from crds/, applied and Established."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return CRD_NAME


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(
    kubeconfig: str, shadow_crd: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StartOperator]:
    """start_operator("--namespace", ns) runs `shadowgate operator` for this test; stopped at its end.

    Its log is printed when the test fails.
    """
    started: list[OperatorProcess] = []

    def start(*args: str) -> OperatorProcess:
        process = OperatorProcess(kubeconfig, tmp_path / f"operator-{len(started)}.log", *args).start()
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
