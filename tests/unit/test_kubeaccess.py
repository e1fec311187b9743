"""The one credential loader (operator, plugin, demo, router): kubeconfig first, tokens re-read per request."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shadowgate_common.kubeaccess import KubeAccessError, load


def kubeconfig(tmp_path: Path, user: dict[str, object], namespace: str | None = None) -> Path:
    context: dict[str, object] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": context}],
        "current-context": "ctx",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_token_file_is_read_again_for_every_request(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    access = load(str(kubeconfig(tmp_path, {"tokenFile": "token"}, namespace="models")))
    assert (access.server, access.verify, access.namespace) == ("https://127.0.0.1:6443", False, "models")
    assert access.headers() == {"Authorization": "Bearer first"}
    (tmp_path / "token").write_text("rotated\n")
    assert access.headers() == {"Authorization": "Bearer rotated"}


def test_kubeconfig_from_the_environment_and_the_default_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, {"token": "abc"})))
    access = load()
    assert access.headers() == {"Authorization": "Bearer abc"}
    assert access.namespace == "default"


def test_an_unknown_context_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(KubeAccessError, match="no context named 'elsewhere'"):
        load(str(kubeconfig(tmp_path, {"token": "abc"})), context="elsewhere")
