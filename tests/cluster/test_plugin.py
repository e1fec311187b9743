"""`kubectl shadow`, run by the real kubectl (plugin discovery on PATH) against a running operator.

Each verb must change what the operator does (phase, the router's weight, Events) and `status` must show it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shadowgate_dev.localenv.binaries import KUBERNETES
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import eventually, example, reasons, router_config, shadow

pytestmark = [pytest.mark.cluster, pytest.mark.database]

PLUGIN_DIR = Path(sys.executable).parent  # where the kubectl-shadow console script is installed


def kubectl_shadow(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`kubectl shadow ARGS`: kubectl finds kubectl-shadow on PATH and hands it KUBECONFIG."""
    result = subprocess.run(
        [str(KUBERNETES.path("kubectl")), "shadow", *args],
        env={**os.environ, "KUBECONFIG": kubeconfig, "PATH": f"{PLUGIN_DIR}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl shadow {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def row(output: str, name: str) -> list[str]:
    """The status table's row for `name`, split on runs of spaces (cells hold single spaces)."""
    lines = output.splitlines()
    headers = lines[0].split()
    found = next(line for line in lines[1:] if line.split()[:1] == [name])
    cells = [cell.strip() for cell in found.split("   ") if cell.strip()]
    assert headers[:4] == ["NAME", "MODE", "PHASE", "STEP"], headers
    return cells


def test_every_verb_steers_the_operator_and_status_shows_it(
    kubectl: Kubectl,
    kubeconfig: str,
    namespace: str,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    tmp_path: Path,
) -> None:
    assert (PLUGIN_DIR / "kubectl-shadow").exists(), "kubectl-shadow is not installed: run `make setup`"
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example("plug"))

    def shadow_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kubectl_shadow(kubeconfig, *args, "-n", namespace, check=check)

    def status_row() -> list[str]:
        return row(shadow_cmd("status").stdout, "plug")

    eventually(lambda: status_row()[2] == "Progressing", 20, "Progressing in `kubectl shadow status`")
    assert status_row()[:6] == ["plug", "shadow", "Progressing", "1/3", "5%", "0"]
    detail = eventually(lambda: "Decision:" in (out := shadow_cmd("status", "plug").stdout) and out, 20, "a decision")
    assert f"Name:        {namespace}/plug" in detail
    assert "Traffic:     shadow, steps 5%, 10%, 20%; now step 1/3 at 5%" in detail
    assert "Decision:    Wait" in detail and "Waiting" in detail
    assert "Ready         False    RouterUnavailable" in detail

    paused = shadow_cmd("pause", "plug").stdout
    assert "spec.paused=true" in paused and "if Git owns this object" in paused
    assert "Paused: Paused by spec.paused: weight frozen at 5%." in paused
    assert status_row()[2:5] == ["Paused", "1/3", "5%"]
    assert shadow(kubectl, namespace, "plug")["spec"]["paused"] is True

    resumed = shadow_cmd("resume", "plug").stdout  # what it prints is read back from status
    assert "spec.paused=false" in resumed and "Progressing: mirroring 5% of requests" in resumed

    promoted = shadow_cmd("promote", "plug").stdout
    assert "shadowgate.io/action=promote:1" in promoted
    assert "Promoted: Promoted by hand (shadowgate.io/action=promote:1)" in promoted
    assert status_row()[2:5] == ["Promoted", "1/3", "100%"]
    eventually(lambda: router_config(kubectl, namespace, "plug")["weight"] == 100, 10, "the router at 100%")

    # The same verb again gets a new nonce, so the operator does consider it (and says why it does nothing).
    again = shadow_cmd("promote", "plug", check=False)
    assert again.returncode == 1
    assert "ignored by the operator: promote ignored (shadowgate.io/action=promote:2): the rollout is Promoted" in (
        again.stdout
    )

    retried = shadow_cmd("retry", "plug").stdout
    assert "shadowgate.io/action=retry:3" in retried and "Progressing: mirroring 5%" in retried
    assert status_row()[2:5] == ["Progressing", "1/3", "5%"]
    eventually(lambda: router_config(kubectl, namespace, "plug")["weight"] == 5, 10, "the router back at 5%")

    aborted = shadow_cmd("abort", "plug").stdout
    assert "RolledBack: Aborted by hand (shadowgate.io/action=abort:4)" in aborted
    assert status_row()[2:5] == ["RolledBack", "1/3", "0%"]
    eventually(lambda: router_config(kubectl, namespace, "plug")["weight"] == 0, 10, "the router at 0%")
    assert "Last action: shadowgate.io/action=abort:4" in shadow_cmd("status", "plug").stdout

    assert reasons(kubectl, namespace, "plug") == [
        "AnalysisStarted", "Paused", "Resumed", "Promoted", "ActionIgnored", "AnalysisRestarted", "RolledBack",
    ]  # fmt: skip
    # history reads deployment_events through the DSN in the resource's own database Secret; the operator
    # writes a transition's rows right after its Events.
    history = eventually(
        lambda: (
            (lines := shadow_cmd("history", "plug").stdout.splitlines())[-1:] and "RolledBack" in lines[-1] and lines
        ),
        15,
        "the RolledBack row in the history",
    )
    assert history[0].split() == ["TIME", "EVENT", "PHASE", "STEP", "WEIGHT", "MESSAGE"]
    assert [line.split()[2] for line in history[1:]] == [
        "AnalysisStarted", "Paused", "Resumed", "Promoted", "ActionIgnored", "AnalysisRestarted", "RolledBack",
    ]  # fmt: skip
    assert "Aborted by hand (shadowgate.io/action=abort:4)" in history[-1]
    assert shadow_cmd("history", "plug", "--limit", "2").stdout.count("\n") == 3  # header and the last two

    # kubectl's conventions: the context's namespace when -n is not given, --context, errors without a traceback.
    config = yaml.safe_load(Path(kubeconfig).read_text())
    config["contexts"][0]["context"]["namespace"] = namespace
    scoped = tmp_path / "scoped.kubeconfig"
    scoped.write_text(yaml.safe_dump(config))
    assert row(kubectl_shadow(str(scoped), "status").stdout, "plug")[2] == "RolledBack"
    context = config["contexts"][0]["name"]
    assert row(kubectl_shadow(kubeconfig, "status", "--context", context, "-n", namespace).stdout, "plug")
    missing = shadow_cmd("status", "nope", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: shadowdeployment {namespace}/nope: not found"
    unknown = kubectl_shadow(kubeconfig, "status", "--context", "nowhere", check=False)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: no usable kubeconfig")
