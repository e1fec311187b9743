"""Pieces of the local environment that need no running component."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from shadowgate_dev.localenv.binaries import ETCD, KUBERNETES
from shadowgate_dev.localenv.errors import ComponentError, log_tail
from shadowgate_dev.localenv.pki import make_control_plane_pki
from shadowgate_operator.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_operator_source_root_does_not_shadow_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    printed = Path(result.stdout.strip())
    assert printed.name == "operator.py"
    assert REPO_ROOT not in printed.parents


def test_shadowgate_help_lists_the_dev_command() -> None:
    result = subprocess.run([sys.executable, "-m", "shadowgate_operator.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "dev" in result.stdout
    args = build_parser().parse_args(["dev", "up", "--foreground"])
    assert args.foreground is True


def test_binary_versions_come_from_the_wrapper_modules() -> None:
    assert ETCD.version.startswith("v3.6.")
    assert KUBERNETES.version.startswith("v1.")
    assert KUBERNETES.install_dir.name == f"kubernetes-{KUBERNETES.version}"
    # Every k8s.io staging module is pinned to the v0 release matching the kubernetes version.
    go_mod = (KUBERNETES.module_dir / "go.mod").read_text()
    staging_version = "v0." + KUBERNETES.version.removeprefix("v1.")
    pins = [line.split() for line in go_mod.splitlines() if "=> k8s.io/" in line]
    assert len(pins) >= 31
    assert all(pin[-1] == staging_version for pin in pins)


def test_pki_chains_the_admin_and_serving_certificates(tmp_path: Path) -> None:
    pki = make_control_plane_pki(tmp_path)
    client_ca = x509.load_pem_x509_certificate(pki.client_ca.read_bytes())
    serving_ca = x509.load_pem_x509_certificate(pki.serving_ca.read_bytes())
    admin = x509.load_pem_x509_certificate(pki.admin.cert_path.read_bytes())
    serving = x509.load_pem_x509_certificate(pki.serving.cert_path.read_bytes())
    admin.verify_directly_issued_by(client_ca)
    serving.verify_directly_issued_by(serving_ca)
    assert admin.subject.rfc4514_string() == "O=system:masters,CN=admin"
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert oct(pki.admin.key_path.stat().st_mode & 0o777) == "0o600"


def test_component_error_carries_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "etcd.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    error = ComponentError("etcd", "not healthy after 90s", log, tail_lines=3)
    assert str(error) == f"etcd: not healthy after 90s\n--- last lines of {log} ---\nline 97\nline 98\nline 99"
    assert log_tail(tmp_path / "missing.log") == ""
