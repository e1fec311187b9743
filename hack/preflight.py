"""Before `make` creates the project's venv: Python >= 3.11, a working `venv`, and room on the disk.

Runs on the machine's own Python with the standard library only (nothing is installed yet), and says
in one line what is missing and how to get it. Debian's python3 has no `ensurepip` without the
python3.X-venv package: as root with apt-get it is installed here, otherwise the line names it.
Exit 0 when `python -m venv` can run; 1 otherwise.
"""

import os
import shutil
import subprocess
import sys

MINIMUM = (3, 11)
VENV_BYTES = 1_000_000_000
"""The venv with the dev and demo extras (measured: 0.77 GB), with a margin for pip's downloads."""


def fail(message):
    print("error: " + message, file=sys.stderr)
    sys.exit(1)


def has_venv():
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


def main():
    here = sys.version_info[:2]
    if here < MINIMUM:
        fail(
            f"Python {MINIMUM[0]}.{MINIMUM[1]} or newer is required and {sys.executable} is {here[0]}.{here[1]}: "
            "run make with PYTHON=python3.12 (or another)"
        )
    package = f"python{here[0]}.{here[1]}-venv"
    if not has_venv():
        apt_get = shutil.which("apt-get")
        if os.geteuid() != 0 or apt_get is None:
            how = f"`sudo apt-get install {package}`" if apt_get else "your system's package of Python's venv module"
            fail(f"`{sys.executable} -m venv` cannot make the project's venv (no ensurepip): install {how}")
        print(f"installing {package} from Debian's packages (`python3 -m venv` needs it)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in ([apt_get, "update", "-q"], [apt_get, "install", "-y", "-q", "--no-install-recommends", package]):
            result = subprocess.run(argv, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                print((result.stdout + result.stderr).strip()[-2000:], file=sys.stderr)
                fail(f"`{' '.join(argv)}` failed; install {package} by hand")
        if not has_venv():
            fail(f"{package} is installed but {sys.executable} still has no ensurepip")
    free = shutil.disk_usage(".").free
    if free < VENV_BYTES:
        fail(
            f"the project's venv needs about {VENV_BYTES / 1e9:.1f} GB free here and the disk has "
            f"{free / 1e9:.1f} GB: free some space"
        )


if __name__ == "__main__":
    main()
