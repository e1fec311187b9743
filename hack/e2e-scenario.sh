#!/usr/bin/env bash
# The end-to-end story on a real cluster, shared by hack/kind-e2e.sh (kind, Docker) and `make e2e`
# (hack/node-e2e.sh: a local node, no Docker). The cluster is up, KUBECONFIG points at it and the
# image `shadowgate:<version>` is loaded; this script does what a user does and checks what a user sees:
#
#   1. the CRDs, then TimescaleDB (manifests/overlays/timescaledb, or E2E_TIMESCALEDB: a kustomization
#      over it that swaps the database image where timescale/timescaledb cannot be pulled);
#   2. promote: manifests/overlays/example (its own namespaced operator, fraud-v1 in production, fraud-v2
#      shadowed, clients sending traffic and outcomes): the operator runs as its ServiceAccount, a real
#      token with exactly its Role's rights in shadowgate-example and none elsewhere; Ready=True, both
#      router pods serving and answering from production, until the operator promotes fraud-v2 by
#      itself; the Events say so and the router's answers flip to it; no call was refused (no
#      PermissionDenied Event, its permission-denied counter at zero);
#   3. rollback: hack/e2e/rollback (the example changed as Git would change it: fraud-v2 in production,
#      a worse fraud-v3 canaried): the operator restarts the analysis and rolls fraud-v3 back; answers
#      come from production again.
#
# Settings: E2E_SCENARIOS ("promote rollback"), E2E_TIMEOUT seconds per decision (900),
# E2E_TIMESCALEDB (manifests/overlays/timescaledb), KUBECTL (kubectl).
set -euo pipefail

cd "$(dirname "$0")/.."
SCENARIOS="${E2E_SCENARIOS:-promote rollback}"
TIMEOUT="${E2E_TIMEOUT:-900}"
TIMESCALEDB="${E2E_TIMESCALEDB:-manifests/overlays/timescaledb}"
KUBECTL="${KUBECTL:-kubectl}"
EXAMPLE_NS=shadowgate-example
SYSTEM_NS=shadowgate-system
SD=fraud-detector
OPERATOR_NS="$EXAMPLE_NS"  # the example brings its own operator, watching its own namespace
OPERATOR_SA="system:serviceaccount:$OPERATOR_NS:shadowgate-operator"
STARTED=$SECONDS

say() { printf '==> %s (%s)\n' "$*" "$(elapsed)"; }
elapsed() { printf '%dm%02ds' $(((SECONDS - STARTED) / 60)) $(((SECONDS - STARTED) % 60)); }
fail() {
    echo "e2e: FAILED: $*" >&2
    exit 1
}
k() { "$KUBECTL" "$@"; }

# Wait for `check` (a shell command) to succeed, up to $1 seconds, re-trying every $2 seconds.
wait_for() {
    local timeout=$1 every=$2 what=$3
    shift 3
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
        sleep "$every"
    done
}

diagnose() {
    say "what the cluster says"
    k get nodes,pods -A -o wide 2>/dev/null || true
    k get shadowdeployments,deployments,statefulsets,pvc -A 2>/dev/null || true
    k describe shadowdeployment "$SD" -n "$EXAMPLE_NS" 2>/dev/null | tail -n 40 || true
    k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 40 || true
    k logs -n "$OPERATOR_NS" -l app.kubernetes.io/name=shadowgate-operator --tail=60 --prefix 2>/dev/null || true
}
trap 'status=$?; [ "$status" -eq 0 ] || diagnose; exit "$status"' EXIT

# --- what a client of the router sees ------------------------------------------------------------
# 40 requests through the router Service, from inside the cluster (the traffic pod), each from another
# account; prints "<served-by>/<model version>" counts, e.g. "production/1.4.2=40".
PROBE='
import collections, json, os, urllib.request
seen = collections.Counter()
for n in range(40):
    body = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP64", "data": [0.5, -0.2, 1.0]}]}
    request = urllib.request.Request(
        "http://fraud-detector-router/v2/models/fraud/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Account-Id": f"probe-{os.getpid()}-{n}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
        seen[response.headers["X-Shadowgate-Served-By"] + "/" + answer["model_version"]] += 1
print(" ".join(f"{key}={value}" for key, value in sorted(seen.items())))
'
answers() { k exec -n "$EXAMPLE_NS" deploy/traffic -- python -c "$PROBE"; }
answers_are() {
    local got
    got="$(answers 2>&1)" || got="error: $got"
    echo "    router answers: $got"
    [ "$got" = "$1" ]
}

# --- the operator's identity and rights ----------------------------------------------------------
WHOAMI='
import json, ssl, urllib.request
directory = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{directory}/token").read()
context = ssl.create_default_context(cafile=f"{directory}/ca.crt")
request = urllib.request.Request(
    "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
with urllib.request.urlopen(request, context=context, timeout=10) as response:
    print(json.loads(response.read())["status"]["userInfo"]["username"])
'
METRICS='
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=10).read().decode())
'
check_operator_identity() {
    local pods pod user
    pods="$(k get pods -n "$OPERATOR_NS" -l app.kubernetes.io/name=shadowgate-operator -o name)"
    [ -n "$pods" ] || fail "no operator pods"
    for pod in $pods; do
        account="$(k get "$pod" -n "$OPERATOR_NS" -o jsonpath='{.spec.serviceAccountName}')"
        [ "$account" = shadowgate-operator ] || fail "$pod runs as ServiceAccount '$account'"
        user="$(k exec -n "$OPERATOR_NS" "$pod" -- python -c "$WHOAMI")"
        [ "$user" = "$OPERATOR_SA" ] || fail "$pod authenticates as '$user', not $OPERATOR_SA"
    done
    echo "    operator pods authenticate with their mounted ServiceAccount token as $OPERATOR_SA"
    # What it may and may not do, as the API server's authorizer answers for that identity.
    local expected namespace verb resource subresource answer
    while read -r expected namespace verb resource subresource; do
        answer="$(k auth can-i "$verb" "$resource" ${subresource:+--subresource="$subresource"} \
            -n "$namespace" --as="$OPERATOR_SA" 2>/dev/null || true)"
        [ "$answer" = "$expected" ] || fail "operator may $verb $resource${subresource:+/$subresource} in $namespace: '$answer', expected '$expected'"
    done <<EOF
yes $OPERATOR_NS patch deployments.apps
yes $OPERATOR_NS update shadowdeployments.shadowgate.io status
yes $OPERATOR_NS get secrets
no $OPERATOR_NS delete deployments.apps
no $OPERATOR_NS list secrets
no $OPERATOR_NS update shadowdeployments.shadowgate.io
no $OPERATOR_NS create pods
no $OPERATOR_NS delete shadowdeployments.shadowgate.io
no $SYSTEM_NS get secrets
no kube-system get secrets
no default patch deployments.apps
no $SYSTEM_NS list namespaces
EOF
    echo "    its rights are its Role's, in $OPERATOR_NS only: patch Deployments, get Secrets by name; no delete, no list Secrets, no spec updates; nothing elsewhere"
}

check_no_permission_denied() {
    local pod metrics refused
    if k get events -A --field-selector reason=PermissionDenied -o name | grep -q .; then
        fail "the operator was refused API calls: $(k get events -A --field-selector reason=PermissionDenied)"
    fi
    for pod in $(k get pods -n "$OPERATOR_NS" -l app.kubernetes.io/name=shadowgate-operator -o name); do
        metrics="$(k exec -n "$OPERATOR_NS" "$pod" -- python -c "$METRICS")"
        refused="$(printf '%s\n' "$metrics" | awk '/^shadowgate_operator_permission_denied_total/ && $NF > 0')"
        [ -z "$refused" ] || fail "$pod counted refused API calls: $refused"
    done
    echo "    no PermissionDenied Event, shadowgate_operator_permission_denied_total absent or 0 on every replica"
}

# --- the rollout ---------------------------------------------------------------------------------
phase() { k get shadowdeployment "$SD" -n "$EXAMPLE_NS" -o jsonpath='{.status.phase}'; }

wait_for_decision() {
    local expected=$1 deadline=$((SECONDS + TIMEOUT)) current=""
    say "waiting up to ${TIMEOUT}s for the operator to decide by itself (expecting $expected)"
    while [ "$SECONDS" -lt "$deadline" ]; do
        current="$(phase)"
        printf '    %s  %s\n' "$(elapsed)" "$(k get shadowdeployment "$SD" -n "$EXAMPLE_NS" --no-headers)"
        case "$current" in Promoted | RolledBack | Failed) break ;; esac
        sleep 10
    done
    [ "$current" = "$expected" ] || fail "phase '$current', expected $expected"
}

# Whether the ShadowDeployment has an Event of each TYPE/REASON given (says which is missing if not).
events_have() {
    local listed
    listed="$(k get events -n "$EXAMPLE_NS" --field-selector "involvedObject.kind=ShadowDeployment,involvedObject.name=$SD" \
        -o jsonpath='{range .items[*]}{.type}/{.reason}{"\n"}{end}')"
    for wanted in "$@"; do
        if ! grep -qx "$wanted" <<<"$listed"; then
            echo "    no $wanted Event yet; the Events are: $(tr '\n' ' ' <<<"$listed")"
            return 1
        fi
    done
}

router_weight() {
    k get configmap "$SD-router" -n "$EXAMPLE_NS" -o jsonpath='{.data.config\.json}' \
        | sed -n 's/.*"weight": *\([0-9]*\).*/\1/p'
}

show_events() {
    k get events -n "$EXAMPLE_NS" --field-selector involvedObject.kind=ShadowDeployment \
        --sort-by=.metadata.creationTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message \
        | cut -c1-200
}

install() {
    say "installing the CRDs, then TimescaleDB ($TIMESCALEDB)"
    k apply --server-side -k manifests/crds
    k wait --for=condition=Established --timeout=60s \
        crd/shadowdeployments.shadowgate.io crd/clusterkopfpeerings.kopf.dev crd/kopfpeerings.kopf.dev
    k apply --server-side -k "$TIMESCALEDB"
    k rollout status statefulset/timescaledb -n "$SYSTEM_NS" --timeout=300s
}

promote() {
    say "promote: the example's own operator, fraud-v1 in production, fraud-v2 shadowed, clients sending traffic and outcomes"
    k apply --server-side -k manifests/overlays/example
    k rollout status deployment/shadowgate-operator -n "$OPERATOR_NS" --timeout=300s
    check_operator_identity
    for model in fraud-v1 fraud-v2 traffic; do
        k rollout status "deployment/$model" -n "$EXAMPLE_NS" --timeout=300s
    done
    wait_for 120 2 "the operator to create the router Deployment" \
        k get deployment "$SD-router" -n "$EXAMPLE_NS" -o name
    k rollout status "deployment/$SD-router" -n "$EXAMPLE_NS" --timeout=300s
    k wait --for=condition=Ready "shadowdeployment/$SD" -n "$EXAMPLE_NS" --timeout=180s
    ready="$(k get deployment "$SD-router" -n "$EXAMPLE_NS" -o jsonpath='{.status.readyReplicas}')"
    [ "$ready" = 2 ] || fail "router Deployment has $ready ready replicas, expected 2"
    echo "    ShadowDeployment Ready=True; router Deployment 2/2 ready"
    # Shadow mode: production answers every request while the candidate sees a copy of some. The router
    # Service is seconds old: a DNS server may still answer from its cache that the name does not exist
    # (the traffic pod asked before the Service was made; CoreDNS keeps such an answer up to its TTL).
    wait_for 60 2 "the router to answer from production before the decision" answers_are "production/1.4.2=40"
    wait_for_decision Promoted
    show_events
    events_have Normal/AnalysisStarted Normal/StepAdvanced Normal/Promoted || fail "Events missing"
    [ "$(router_weight)" = 100 ] || fail "router weight '$(router_weight)'%, expected 100 after the promotion"
    wait_for 60 2 "the router's answers to come from the candidate" answers_are "candidate/2.0.0=40"
    check_no_permission_denied
    say "promote: passed: fraud-v2 promoted by the operator; the router answers every request from it"
}

rollback() {
    say "rollback: fraud-v2 now in production, a worse fraud-v3 canaried (hack/e2e/rollback)"
    # The new model first, then the change of candidate: a candidate Service without a ready pod fails
    # the router's calls, and the error gate would roll it back before its quality is judged.
    k apply --server-side -k hack/e2e/rollback -l app.kubernetes.io/name=fraud-v3
    k rollout status deployment/fraud-v3 -n "$EXAMPLE_NS" --timeout=300s
    k apply --server-side -k hack/e2e/rollback
    wait_for 60 2 "the analysis to restart" events_have Normal/AnalysisRestarted
    wait_for_decision RolledBack
    show_events
    events_have Normal/AnalysisRestarted Warning/RolledBack || fail "Events missing"
    # Rolled back on its outcomes (a worse log loss), not on errors: the error gate did not fire.
    if events_have Warning/GateFailed >/dev/null; then
        fail "fraud-v3 was rolled back by a gate (errors or latency), not for its worse predictions"
    fi
    [ "$(router_weight)" = 0 ] || fail "router weight '$(router_weight)'%, expected 0 after the rollback"
    wait_for 60 2 "the router's answers to come from production" answers_are "production/2.0.0=40"
    check_no_permission_denied
    say "rollback: passed: fraud-v3 rolled back by the operator; production (fraud-v2) answers everything"
}

history() {
    # Informative: the plugin's view, reading the database through a port-forward.
    local plugin="" port dsn forward
    command -v kubectl-shadow >/dev/null 2>&1 && plugin=kubectl-shadow
    [ -z "$plugin" ] && [ -x .venv/bin/kubectl-shadow ] && plugin=.venv/bin/kubectl-shadow
    [ -n "$plugin" ] || return 0
    "$plugin" status "$SD" -n "$EXAMPLE_NS" || true
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        2>/dev/null || echo 15432)"
    k port-forward -n "$SYSTEM_NS" pod/timescaledb-0 "$port:5432" >/dev/null 2>&1 &
    forward=$!
    for _ in $(seq 60); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.5
    done
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        dsn="$(k get secret timescaledb -n "$SYSTEM_NS" -o jsonpath='{.data.dsn}' | base64 -d \
            | sed "s#@[^/]*/#@127.0.0.1:$port/#")"
        "$plugin" history "$SD" -n "$EXAMPLE_NS" --dsn "$dsn" || true
    fi
    kill "$forward" 2>/dev/null || true
    wait "$forward" 2>/dev/null || true
}

install
for scenario in $SCENARIOS; do
    case "$scenario" in
        promote) promote ;;
        rollback) rollback ;;
        *) fail "unknown scenario '$scenario' (promote, rollback)" ;;
    esac
done
history
say "e2e: passed ($SCENARIOS)"
