#!/usr/bin/env bash
# `make e2e`: the hack/kind-e2e.sh story on a local node, without Docker or a registry.
#
#   1. images: the project's Dockerfile built by buildah on a Debian base (mmdebstrap), and a PostgreSQL
#      image with TimescaleDB; cached by content hash in ~/.cache/shadowgate/images (warm: no build);
#   2. `shadowgate node up`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd,
#      kubelet, kube-proxy (nftables), CoreDNS and kube-router's NetworkPolicy firewall on a bridge
#      network; the images loaded into containerd, a hostPath PersistentVolume for the database's claim
#      (there is no storage provisioner);
#   3. hack/e2e-scenario.sh, the same script kind-e2e.sh runs: promote, then rollback;
#   4. `shadowgate node down`: every process, container, mount, nft table, the bridge and the cgroups
#      gone, sysctls restored; it fails when the machine is not as it was before step 2.
#
# Needs root (one clear line and exit 1 otherwise). Settings: those of hack/e2e-scenario.sh, and
# KEEP_NODE=1 to leave the node up afterwards (`shadowgate node down` stops it).
set -euo pipefail

cd "$(dirname "$0")/.."
SHADOWGATE="${SHADOWGATE:-.venv/bin/shadowgate}"
STARTED=$SECONDS
say() { printf '==> %s (%ds)\n' "$*" $((SECONDS - STARTED)); }

"$SHADOWGATE" node preflight >/dev/null

say "images (built once, then taken from the cache by content hash)"
"$SHADOWGATE" node images
images_done=$SECONDS

WORK="$(mktemp -d)"
node_up=0
cleanup() {
    local status=$?
    if [ "$node_up" = 1 ] && [ "${KEEP_NODE:-0}" != 1 ]; then
        say "stopping the node"
        local keep=()
        [ "$status" -eq 0 ] || keep=(--keep-logs "$WORK/logs")
        "$SHADOWGATE" node down ${keep[@]+"${keep[@]}"} || status=1
        [ "$status" -eq 0 ] || say "node logs kept in $WORK/logs"
    elif [ "${KEEP_NODE:-0}" = 1 ]; then
        say "node kept: eval \"\$($SHADOWGATE node env)\"; $SHADOWGATE node down"
    fi
    [ "$status" -ne 0 ] || rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

say "starting the node"
node_up=1
"$SHADOWGATE" node up >"$WORK/env"
# shellcheck disable=SC1091
source "$WORK/env"
"$SHADOWGATE" node images --load
"$SHADOWGATE" node volume shadowgate-system/data-timescaledb-0 --size 20Gi
node_done=$SECONDS

E2E_TIMESCALEDB=hack/e2e/node-timescaledb hack/e2e-scenario.sh
say "e2e on the local node passed: images $((images_done - STARTED))s, node $((node_done - images_done))s, scenarios $((SECONDS - node_done))s"
