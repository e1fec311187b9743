#!/usr/bin/env bash
# End to end on a real cluster, for anyone with Docker: a kind cluster, the image built and loaded,
# manifests/ (CRDs, operator, TimescaleDB), then the example scenario: fraud-v2 shadowed beside
# fraud-v1 under real traffic and outcomes until the operator promotes it by itself.
#
#   hack/kind-e2e.sh                 # create, run, delete the cluster
#   KEEP_CLUSTER=1 hack/kind-e2e.sh  # leave it running to look around (kind delete cluster --name ...)
#
# Needs docker (with a running engine), kind and kubectl on PATH. Without a Docker engine it says so
# and exits 0: the test machines have none, and `make test` covers everything short of real pods.
# Settings: KIND_CLUSTER (shadowgate-e2e), E2E_TIMEOUT seconds for the promotion (900), DOCKER (docker).
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER="${KIND_CLUSTER:-shadowgate-e2e}"
TIMEOUT="${E2E_TIMEOUT:-900}"
DOCKER="${DOCKER:-docker}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
IMAGE="shadowgate:${VERSION}"  # what manifests/ deploy (their images: newTag)
EXAMPLE_NS=shadowgate-example
SYSTEM_NS=shadowgate-system

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
PIDS=()

cleanup() {
    local status=$?
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
    if [ "$status" -ne 0 ]; then
        say "failed; what the cluster says:"
        kubectl get shadowdeployments,deployments,pods -n "$EXAMPLE_NS" -o wide 2>/dev/null || true
        kubectl describe shadowdeployment fraud-detector -n "$EXAMPLE_NS" 2>/dev/null | tail -n 40 || true
        kubectl logs -n "$SYSTEM_NS" -l app.kubernetes.io/name=shadowgate-operator --tail=60 --prefix 2>/dev/null || true
    fi
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

say "installing the CRDs, then the operator and TimescaleDB (manifests/overlays/timescaledb)"
kubectl apply --server-side -k manifests/crds
kubectl wait --for=condition=Established --timeout=60s \
    crd/shadowdeployments.shadowgate.io crd/clusterkopfpeerings.kopf.dev crd/kopfpeerings.kopf.dev
kubectl apply --server-side -k manifests/overlays/timescaledb
kubectl rollout status statefulset/timescaledb -n "$SYSTEM_NS" --timeout=300s
kubectl rollout status deployment/shadowgate-operator -n "$SYSTEM_NS" --timeout=180s

say "the example: fraud-v1 in production, fraud-v2 shadowed, clients sending traffic and outcomes"
kubectl apply --server-side -k manifests/overlays/example
for model in fraud-v1 fraud-v2; do
    kubectl rollout status "deployment/$model" -n "$EXAMPLE_NS" --timeout=180s
done
for _ in $(seq 60); do
    kubectl get deployment fraud-detector-router -n "$EXAMPLE_NS" >/dev/null 2>&1 && break
    sleep 2
done
kubectl rollout status deployment/fraud-detector-router -n "$EXAMPLE_NS" --timeout=180s
kubectl wait --for=condition=Ready shadowdeployment/fraud-detector -n "$EXAMPLE_NS" --timeout=120s

say "waiting up to ${TIMEOUT}s for the operator to decide (kubectl get shadow every 15 s)"
deadline=$((SECONDS + TIMEOUT))
phase=""
while [ "$SECONDS" -lt "$deadline" ]; do
    phase="$(kubectl get shadowdeployment fraud-detector -n "$EXAMPLE_NS" -o jsonpath='{.status.phase}')"
    kubectl get shadowdeployment fraud-detector -n "$EXAMPLE_NS" --no-headers
    case "$phase" in Promoted | RolledBack | Failed) break ;; esac
    sleep 15
done

kubectl get events -n "$EXAMPLE_NS" --field-selector involvedObject.kind=ShadowDeployment \
    --sort-by=.metadata.creationTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message
weight="$(kubectl get configmap fraud-detector-router -n "$EXAMPLE_NS" -o jsonpath='{.data.config\.json}' \
    | sed -n 's/.*"weight": *\([0-9]*\).*/\1/p')"

plugin=""
if command -v kubectl-shadow >/dev/null 2>&1; then plugin=kubectl-shadow; fi
if [ -z "$plugin" ] && [ -x .venv/bin/kubectl-shadow ]; then plugin=.venv/bin/kubectl-shadow; fi
if [ -n "$plugin" ]; then
    "$plugin" status fraud-detector -n "$EXAMPLE_NS"
    kubectl port-forward -n "$SYSTEM_NS" pod/timescaledb-0 15432:5432 >/dev/null 2>&1 &
    PIDS+=("$!")
    sleep 3
    dsn="$(kubectl get secret timescaledb -n "$SYSTEM_NS" -o jsonpath='{.data.dsn}' | base64 -d \
        | sed 's#@[^/]*/#@127.0.0.1:15432/#')"
    "$plugin" history fraud-detector -n "$EXAMPLE_NS" --dsn "$dsn" || true
fi

if [ "$phase" != Promoted ] || [ "$weight" != 100 ]; then
    echo "kind-e2e: FAILED: phase '$phase', router weight '$weight'% (expected Promoted at 100%)" >&2
    exit 1
fi
say "kind-e2e: passed: fraud-v2 promoted by the operator, the router sends it 100% of requests"
