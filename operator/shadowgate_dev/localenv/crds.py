"""Install CustomResourceDefinitions and wait until kubectl can use them, `kubectl explain` included.

Established is not enough: the API server publishes a new CRD's discovery entry and its OpenAPI v3
document a moment later (seconds on a loaded machine), and until then `kubectl explain` fails with
"couldn't find resource". So after Established this waits until `kubectl explain <plural>.<group>`
works for each CRD, which needs both.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from shadowgate_dev.localenv.errors import ComponentError


def crd_names(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(metadata.name, `plural.group`) of each CustomResourceDefinition in the files or directories."""
    files = [file for path in paths for file in (sorted(path.glob("*.yaml")) if path.is_dir() else [path])]
    found = []
    for file in files:
        for document in yaml.safe_load_all(file.read_text()):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                spec = document["spec"]
                found.append((document["metadata"]["name"], f"{spec['names']['plural']}.{spec['group']}"))
    return found


def install_crds(kubectl: Path, kubeconfig: Path | str, paths: Sequence[Path], timeout: float = 90.0) -> list[str]:
    """Apply the CRDs in `paths` (server-side), wait until each is Established, served in discovery and
    explained from its OpenAPI document. Returns their names; ComponentError after `timeout` seconds."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    deadline = time.monotonic() + timeout

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        left = max(1.0, deadline - time.monotonic())
        result = subprocess.run(
            [str(kubectl), *args], env=env, capture_output=True, text=True, timeout=left + 30, check=False
        )
        if check and result.returncode != 0:
            raise ComponentError("crds", f"`kubectl {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    names = crd_names(paths)
    for path in paths:
        run("apply", "--server-side", "--force-conflicts", "-f", str(path))
    if not names:
        return []
    run("wait", "--for=condition=Established", f"--timeout={int(timeout)}s", *(f"crd/{name}" for name, _ in names))
    for name, resource in names:
        while True:
            explained = run("explain", resource, check=False)
            if explained.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ComponentError(
                    "crds", f"{name} is Established but `kubectl explain {resource}` still fails after "
                    f"{timeout:.0f}s: {explained.stderr.strip()}"
                )  # fmt: skip
            time.sleep(0.2)
    return [name for name, _ in names]
