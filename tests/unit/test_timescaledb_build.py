"""The TimescaleDB build's decisions that need no compiler: checksums, the cache key, the tree's layout,
and what happens without a source."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.timescaledb import (
    SOURCE_ENV,
    TIMESCALEDB_VERSION,
    VERSION_ENV,
    _extract_safely,
    _Layout,
    _version_num,
    availability,
    ensure_timescaledb,
    server_version,
    tree_dir,
    verified_source,
)


@pytest.fixture
def fake_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin/ whose `postgres --version` answers like Debian's 15.18, and an empty cache."""
    monkeypatch.setenv("SHADOWGATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    monkeypatch.delenv(VERSION_ENV, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    postgres = bin_dir / "postgres"
    postgres.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)'\n")
    postgres.chmod(0o755)
    return bin_dir


def _source(directory: Path, content: bytes, listed: bytes | None = None) -> Path:
    directory.mkdir()
    tarball = directory / f"timescaledb-{TIMESCALEDB_VERSION}.tar.gz"
    tarball.write_bytes(content)
    digest = hashlib.sha256(content if listed is None else listed).hexdigest()
    (directory / "SHA256SUMS").write_text(f"{digest}  {tarball.name}\n")
    return tarball


def test_a_source_is_used_only_when_its_checksum_matches(tmp_path: Path) -> None:
    good = _source(tmp_path / "good", b"release")
    assert verified_source(good.parent, TIMESCALEDB_VERSION) == good
    _source(tmp_path / "tampered", b"release", listed=b"another release")
    with pytest.raises(ComponentError, match=r"SHA-256 .* is not .*: not building it"):
        verified_source(tmp_path / "tampered", TIMESCALEDB_VERSION)
    with pytest.raises(ComponentError, match=r"timescaledb-9\.9\.9\.tar\.gz does not exist"):
        verified_source(tmp_path / "good", "9.9.9")
    (tmp_path / "good" / "SHA256SUMS").write_text("0123  something-else.tar.gz\n")
    with pytest.raises(ComponentError, match="has no checksum for"):
        verified_source(tmp_path / "good", TIMESCALEDB_VERSION)


def test_the_cache_is_keyed_by_both_versions(fake_server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_version(fake_server) == "15.18"
    assert _version_num("15.18") == 150018 and _version_num("16") == 160000
    assert tree_dir("15.18").name == f"timescaledb-{TIMESCALEDB_VERSION}-pg15.18"
    monkeypatch.setenv(VERSION_ENV, "2.17.2")
    assert tree_dir("15.18").name == "timescaledb-2.17.2-pg15.18"


def test_without_a_source_it_says_why_in_one_line_and_builds_nothing(fake_server: Path) -> None:
    found = ensure_timescaledb(fake_server)
    assert found.tree is None
    assert "\n" not in found.reason
    assert SOURCE_ENV in found.reason and f"timescaledb {TIMESCALEDB_VERSION}" in found.reason
    assert availability(fake_server) == found
    assert not (Path(os.environ["SHADOWGATE_CACHE"]) / "timescaledb").exists()


def test_a_bad_source_is_an_error_not_a_fallback(fake_server: Path, tmp_path: Path) -> None:
    _source(tmp_path / "vendor", b"release", listed=b"something else")
    if os.geteuid() != 0:
        # Without root nothing is installed: the missing tools are reported first, in one line.
        found = ensure_timescaledb(fake_server, tmp_path / "vendor")
        assert found.tree is None and "pg_config" in found.reason
        return
    with pytest.raises(ComponentError, match="not building it"):
        ensure_timescaledb(fake_server, tmp_path / "vendor")


def test_installed_files_go_to_the_trees_lib_and_share(tmp_path: Path) -> None:
    layout = _Layout(
        bin_relative="lib/postgresql/15/bin",
        lib=(Path("/usr/lib/postgresql/15/lib"), tmp_path / "lib/postgresql/15/lib"),
        share=(Path("/usr/share/postgresql/15"), tmp_path / "share/postgresql/15"),
    )
    assert layout.place(Path("/usr/lib/postgresql/15/lib/timescaledb-2.22.1.so")) == (
        tmp_path / "lib/postgresql/15/lib/timescaledb-2.22.1.so"
    )
    assert layout.place(Path("/usr/share/postgresql/15/extension/timescaledb.control")) == (
        tmp_path / "share/postgresql/15/extension/timescaledb.control"
    )
    assert layout.place(Path("/etc/postgresql/15/main/postgresql.conf")) is None


def _tarball(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


@pytest.mark.parametrize("filters", [True, False], ids=["python-with-filters", "python-3.11.2-without"])
def test_source_tarball_extracts_and_refuses_members_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filters: bool
) -> None:
    """Debian bookworm's python3 (3.11.2) has no tarfile extraction filters: a fresh machine's build
    failed with a TypeError there. Both paths unpack a good tarball and refuse one that escapes."""
    if filters and not hasattr(tarfile, "data_filter"):
        pytest.skip(f"Python {sys.version.split()[0]} has no tarfile extraction filters (they came in 3.11.4)")
    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    refused: tuple[type[Exception], ...] = (ComponentError,)
    if hasattr(tarfile, "FilterError"):  # what the data filter raises; absent before 3.11.4
        refused += (tarfile.FilterError,)
    good = _tarball(tmp_path / "good.tar.gz", {"timescaledb-2.22.1/CMakeLists.txt": b"project(x)\n"})
    with tarfile.open(good) as archive:
        _extract_safely(archive, tmp_path / "src")
    assert (tmp_path / "src/timescaledb-2.22.1/CMakeLists.txt").read_bytes() == b"project(x)\n"

    for name, bad in {
        "dotdot": _tarball(tmp_path / "dotdot.tar.gz", {"../escaped": b"x"}),
        "symlink": _tarball(tmp_path / "link.tar.gz", {}, {"timescaledb/link": "/etc/passwd"}),
    }.items():
        with tarfile.open(bad) as archive, pytest.raises(refused):
            _extract_safely(archive, tmp_path / f"out-{name}")
        assert not (tmp_path / "escaped").exists()
