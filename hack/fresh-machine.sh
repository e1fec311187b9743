#!/usr/bin/env bash
# `make test` on a fresh machine: a new Debian root (the machine's suite, made by mmdebstrap) that has only
# python3 and make (no Go, no PostgreSQL, no python3-venv, no caches), with this working tree copied in,
# run as root in a chroot. What the README's cold figures come from. Root, mmdebstrap and unshare needed.
#
#   hack/fresh-machine.sh                  # make test (TimescaleDB built too when ../shared/vendor exists)
#   FRESH_TARGET=demo hack/fresh-machine.sh
#   KEEP_ROOT=1 hack/fresh-machine.sh      # keep the root file system afterwards (it is deleted otherwise)
#
# The chroot shares the machine's network (loopback ports are picked free as always) and its CA bundle
# (a machine behind a TLS-inspecting proxy needs it); services never start in it (policy-rc.d), as in a
# container. It prints each phase's time and, at the end, the disk each cache took.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SHARED:-$repo/../shared}"
target="${FRESH_TARGET:-test}"
suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
root="${FRESH_ROOT:-$(mktemp -d /tmp/shadowgate-fresh.XXXXXX)}"
say() { echo "==> $(date +%H:%M:%S) $*"; }

[[ $(id -u) == 0 ]] || { echo "error: run as root (mmdebstrap --mode=root, chroot)" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "error: needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }

started=$(date +%s)
say "a fresh Debian $suite with python3 and make in $root"
rmdir "$root" 2>/dev/null || true
mmdebstrap --variant=minbase --mode=root --include=python3,make,ca-certificates \
    --dpkgopt=force-unsafe-io --aptopt='Acquire::Retries "3"' "$suite" "$root" \
    "deb http://deb.debian.org/debian $suite main" "deb http://deb.debian.org/debian $suite-updates main" \
    "deb http://deb.debian.org/debian-security $suite-security main" >"$root.mmdebstrap.log" 2>&1 \
    || { tail -20 "$root.mmdebstrap.log"; exit 1; }
cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$root" update-ca-certificates >/dev/null
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/work/shadowgate"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -c) | tar -x -C "$root/work/shadowgate"
env_vars=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb)
if [[ -d $shared/vendor ]]; then
    mkdir -p "$root/work/shared" && cp -r "$shared/vendor" "$root/work/shared/"
    env_vars+=(SHADOWGATE_TIMESCALEDB_SOURCE=/work/shared/vendor)  # as .ci/run sets it
fi
say "root file system ready in $(($(date +%s) - started))s; which go, postgres, pg_ctl in it:"
chroot "$root" sh -c 'command -v go postgres pg_ctl; ls -d /usr/lib/postgresql 2>&1; python3 -c "import ensurepip" 2>&1 | tail -1'

set +e
unshare --mount --fork -- bash -c '
    set -e
    mount --make-rprivate /
    mount -t proc proc "$1/proc"
    mount --rbind /sys "$1/sys"
    mount --rbind /dev "$1/dev"
    shift
    exec nice -n 10 chroot "$@"
' _ "$root" "$root" /usr/bin/env -i "${env_vars[@]}" bash -c "
    cd /work/shadowgate
    start=\$(date +%s)
    make $target
    code=\$?
    echo \"==> make $target exited \$code after \$((\$(date +%s) - start))s\"
    exit \$code
"
code=$?
set -e
say "done: exit $code, $(($(date +%s) - started))s in all; disk taken:"
du -sh "$root/root/.cache/go-build" "$root/root/go" "$root/root/.cache/shadowgate" "$root/root/.cache/pip" \
    "$root/work/shadowgate/.venv" 2>/dev/null || true
du -sh "$root/root/.cache/shadowgate"/* 2>/dev/null || true
if [[ -z ${KEEP_ROOT:-} ]]; then
    if findmnt -rn -o TARGET | grep -q "^$root"; then
        echo "error: something is still mounted under $root; not deleting it" >&2
    else
        rm -rf "$root" "$root.mmdebstrap.log"
    fi
fi
exit $code
