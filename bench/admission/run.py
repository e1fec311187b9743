"""bench/admission: how many invalid ShadowDeployments the API server refuses, now and before.

Starts a local API server (etcd + kube-apiserver, as the tests do), installs the CRD as it was at a
baseline commit (default: the commit before issue 12's admission rules) and dry-run creates every case
of tests/admission_cases.py; then the same with the CRD of this checkout. Prints, for both, how many
were refused out of how many were tried, and the cases the baseline let through.

    .venv/bin/python bench/admission/run.py [--baseline-ref 3e5ae46]
"""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "router")]

from tests.admission_cases import CASES  # noqa: E402

from shadowgate_dev.localenv import ControlPlane  # noqa: E402

CRD_PATH = "crds/shadowgate.io_shadowdeployments.yaml"
CRD_NAME = "shadowdeployments.shadowgate.io"
BASELINE = "3e5ae46"  # main before the admission rules of issue 12 (D11)


def client_for(plane: ControlPlane) -> httpx.Client:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return httpx.Client(base_url=configuration.host, verify=context, timeout=60)


def install(client: httpx.Client, crd: dict[str, Any]) -> None:
    """Create or replace the CRD, then wait until it is Established and serves its current schema."""
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
    existing = client.get(path)
    if existing.status_code == 200:
        crd = {
            **crd,
            "metadata": {**crd["metadata"], "resourceVersion": existing.json()["metadata"]["resourceVersion"]},
        }
        client.put(path, json=crd).raise_for_status()
    else:
        client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd).raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get(path).json().get("status", {})
        if any(c["type"] == "Established" and c["status"] == "True" for c in status.get("conditions") or []):
            return
        time.sleep(0.2)
    raise SystemExit("the CRD did not become Established within 60 s")


def refused(client: httpx.Client, namespace: str) -> tuple[int, list[str]]:
    """(refused, ids of the cases accepted) for every case, by dry-run create with strict field validation."""
    accepted = []
    for case in CASES:
        response = client.post(
            f"/apis/shadowgate.io/v1alpha1/namespaces/{namespace}/shadowdeployments",
            params={"dryRun": "All", "fieldValidation": "Strict"},
            json=case.manifest(),
        )
        if response.status_code == 201:
            accepted.append(case.id)
        elif response.status_code not in (400, 422):
            raise SystemExit(f"{case.id}: unexpected answer {response.status_code}: {response.text[:300]}")
    return len(CASES) - len(accepted), accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default=BASELINE, help=f"git commit of the baseline CRD (default {BASELINE})")
    args = parser.parse_args()
    baseline = yaml.safe_load(
        subprocess.run(["git", "show", f"{args.baseline_ref}:{CRD_PATH}"], cwd=ROOT, check=True, capture_output=True,
                       text=True).stdout
    )  # fmt: skip
    current = yaml.safe_load((ROOT / CRD_PATH).read_text())
    with ControlPlane(with_controller_manager=False) as plane, client_for(plane) as client:
        client.post("/api/v1/namespaces", json={"metadata": {"name": "bench"}}).raise_for_status()
        results = {}
        for label, crd in ((f"baseline ({args.baseline_ref})", baseline), ("this checkout", current)):
            install(client, crd)
            results[label] = refused(client, "bench")
    print(f"invalid ShadowDeployments refused by the API server, of {len(CASES)} tried (tests/admission_cases.py):")
    for label, (count, _accepted) in results.items():
        print(f"  {label:<22} refused {count} of {len(CASES)}")
    for label, (_count, accepted) in results.items():
        if accepted:
            print(f"  accepted by {label}: {', '.join(accepted)}")
    return 1 if list(results.values())[-1][1] else 0  # this checkout must refuse them all


if __name__ == "__main__":
    sys.exit(main())
