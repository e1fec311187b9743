#!/usr/bin/env bash
# End to end on a real cluster, for anyone with Docker: a kind cluster, the image built and loaded,
# then hack/e2e-scenario.sh (the same story `make e2e` runs on a local node without Docker):
# manifests/ (CRDs, TimescaleDB, the example with its own namespaced operator), fraud-v2 shadowed beside
# fraud-v1 under real traffic and outcomes until the operator promotes it by itself, then a worse
# fraud-v3 canaried and rolled back.
#
#   hack/kind-e2e.sh                 # create, run, delete the cluster
#   KEEP_CLUSTER=1 hack/kind-e2e.sh  # leave it running to look around (kind delete cluster --name ...)
#
# Needs docker (with a running engine), kind and kubectl on PATH. Without a Docker engine it says so
# and exits 0: the test machines have none, and `make test` covers everything short of real pods.
# Settings: KIND_CLUSTER (shadowgate-e2e), DOCKER (docker), and those of hack/e2e-scenario.sh
# (E2E_SCENARIOS, E2E_TIMEOUT seconds per decision).
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER="${KIND_CLUSTER:-shadowgate-e2e}"
DOCKER="${DOCKER:-docker}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
IMAGE="shadowgate:${VERSION}"  # what manifests/ deploy (their images: newTag)

say() { printf '==> %s\n' "$*"; }

if ! command -v "$DOCKER" >/dev/null 2>&1; then
    say "kind-e2e: skipped: no docker command ($DOCKER) on PATH; this end-to-end run needs Docker and kind."
    say "Everything short of real pods is covered without them by \`make test\`."
    exit 0
fi
if ! engine="$("$DOCKER" info --format '{{.ServerVersion}}' 2>&1)"; then
    say "kind-e2e: skipped: the Docker engine is not reachable ($(printf '%s' "$engine" | tail -n 1))."
    say "Start Docker and run hack/kind-e2e.sh again; \`make test\` covers everything short of real pods."
    exit 0
fi
for tool in kind kubectl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "kind-e2e: $tool is not on PATH (kind: https://kind.sigs.k8s.io, kubectl: a matching release)" >&2
        exit 1
    fi
done

WORK="$(mktemp -d)"
export KUBECONFIG="$WORK/kubeconfig"  # never touch the user's own kubeconfig

cleanup() {
    local status=$?
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        say "cluster kept: KUBECONFIG=$KUBECONFIG kubectl get shadow -A; kind delete cluster --name $CLUSTER"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT

say "Docker engine $engine; kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind export kubeconfig --name "$CLUSTER"
else
    kind create cluster --name "$CLUSTER" --wait 120s
fi

say "building $IMAGE and loading it into the cluster"
"$DOCKER" build --tag "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

hack/e2e-scenario.sh
