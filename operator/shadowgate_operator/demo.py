"""`shadowgate demo`: the main job on one machine, with a local control plane and PostgreSQL.

Today it brings up the control plane and the database, installs the CRDs from crds/, starts the
operator, applies the ShadowDeployment example from examples/ and shows what the operator did: the
router's objects, status, conditions and Events (the outcome analysis that promotes or rolls back on
its own is not there yet). Everything it started is stopped when it ends or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from shadowgate_operator.localenv import ComponentError, ControlPlane, Postgres
from shadowgate_operator.localenv.binaries import REPO_ROOT, ensure_binaries

DEMO_NAMESPACE = "shadowgate-demo"


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _kubernetes_manifests(directory: Path) -> list[Path]:
    """YAML files in `directory` whose documents are Kubernetes objects (apiVersion and kind)."""
    found = []
    for path in sorted(directory.glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        if documents and all(isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc for doc in documents):
            found.append(path)
    return found


def _wait_for_status(
    kubectl: Path, env: dict[str, str], operator: subprocess.Popen[bytes], phase: str = "Progressing"
) -> None:
    """Until every example ShadowDeployment reaches `phase`; fails if the operator exits."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if operator.poll() is not None:
            raise ComponentError("operator", f"exited with code {operator.returncode}")
        listing = subprocess.run(
            [str(kubectl), "get", "shadowdeployments", "-n", DEMO_NAMESPACE, "-o", "jsonpath={.items[*].status.phase}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if listing and all(found == phase for found in listing):
            return
        time.sleep(0.5)
    raise ComponentError("operator", f"the examples did not reach phase {phase} within 60s")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        binaries = ensure_binaries()
        with ControlPlane(binaries=binaries) as plane, Postgres() as database:
            _say(f"control plane up at {plane.server_url} ({plane.startup_seconds:.1f}s)")
            timescale = "with timescaledb" if database.timescale else "plain PostgreSQL, no timescaledb"
            _say(f"PostgreSQL up at {database.dsn} ({timescale})")
            env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}

            def kubectl(*argv: str) -> None:
                print(f"$ kubectl {' '.join(argv)}", flush=True)
                subprocess.run([str(binaries.kubectl), *argv], env=env, check=True)

            crds = _kubernetes_manifests(REPO_ROOT / "crds")
            for crd in crds:
                kubectl("apply", "--server-side", "-f", str(crd.relative_to(REPO_ROOT)))
            if crds:
                kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            kubectl("create", "namespace", DEMO_NAMESPACE)
            operator_log = plane.logs / "operator.log"
            with operator_log.open("wb") as log:
                operator = subprocess.Popen(
                    [sys.executable, "-m", "shadowgate_operator.cli", "operator", "--namespace", DEMO_NAMESPACE],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                _say(f"operator started (log: {operator_log})")
                for example in _kubernetes_manifests(REPO_ROOT / "examples"):
                    kubectl("apply", "-n", DEMO_NAMESPACE, "-f", str(example.relative_to(REPO_ROOT)))
                _wait_for_status(binaries.kubectl, env, operator)
                kubectl("get", "shadowdeployments", "-n", DEMO_NAMESPACE)
                kubectl("get", "deployment,service,configmap,serviceaccount,role,rolebinding", "-n", DEMO_NAMESPACE)
                kubectl("describe", "shadowdeployment", "-n", DEMO_NAMESPACE)
                _say("promoting by hand, as `kubectl shadow promote` will")
                kubectl("annotate", "shadowdeployment", "--all", "-n", DEMO_NAMESPACE, "shadowgate.io/action=promote")
                _wait_for_status(binaries.kubectl, env, operator, phase="Promoted")
                kubectl("get", "shadowdeployments", "-n", DEMO_NAMESPACE)
                kubectl(
                    "get", "events", "-n", DEMO_NAMESPACE, "--field-selector", "involvedObject.kind=ShadowDeployment"
                )
                if args.hold:
                    _say(f"holding; KUBECONFIG={plane.kubeconfig}; Ctrl-C stops everything")
                    while True:
                        time.sleep(3600)
            finally:
                operator.terminate()
                operator.wait(20)
    except ComponentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd))} failed with code {exc.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    _say(f"done in {time.monotonic() - started:.0f}s; everything it started is stopped")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo on a local control plane and PostgreSQL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hold", action="store_true", help="keep everything running until Ctrl-C")
    parser.set_defaults(func=run)
