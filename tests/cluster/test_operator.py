"""The operator, run for real against the local control plane: children, status, Events, verbs, restarts."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import yaml

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import REPO_ROOT, Kubectl
from tests.support.operator import (
    analyses,
    apply,
    events_for,
    eventually,
    example,
    get_json,
    metric,
    reasons,
    router_config,
    router_secret,
    rows,
    shadow,
    wait_phase,
    wait_reasons,
)

pytestmark = pytest.mark.cluster

GOLDEN = REPO_ROOT / "tests" / "golden"
GOLDEN_NAMESPACE = "models"  # the namespace and router image the golden files were built for
GOLDEN_ROUTER_IMAGE = "registry.example/shadowgate:0.1.0"
CHILD_KINDS = ("configmap", "deployment", "service", "serviceaccount", "role", "rolebinding", "networkpolicy")


def is_subset(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected`, ignoring what the API server added (defaults, metadata)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        problems = []
        for key, value in expected.items():
            problems += is_subset(value, actual.get(key), f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {len(expected)} items, got {actual!r}"]
        return [p for index, item in enumerate(expected) for p in is_subset(item, actual[index], f"{path}[{index}]")]
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


@pytest.fixture
def golden_namespace(kubectl: Kubectl) -> str:
    """The namespace the golden files name, emptied of any earlier ShadowDeployment."""
    if kubectl("get", "namespace", GOLDEN_NAMESPACE, check=False).returncode != 0:
        kubectl("create", "namespace", GOLDEN_NAMESPACE)
    leftovers = get_json(kubectl, "shadowdeployments", "-n", GOLDEN_NAMESPACE)["items"]
    for leftover in leftovers:  # from an earlier run on a reused dev environment, with no operator to finalize
        name = leftover["metadata"]["name"]
        kubectl(
            "patch",
            "shadowdeployment",
            name,
            "-n",
            GOLDEN_NAMESPACE,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
        )
        kubectl("delete", "shadowdeployment", name, "-n", GOLDEN_NAMESPACE, "--timeout=30s", check=False)
    return GOLDEN_NAMESPACE


def test_example_gets_its_router_status_conditions_and_events(
    kubectl: Kubectl, golden_namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    namespace = golden_namespace
    operator = start_operator("--namespace", namespace, "--router-image", GOLDEN_ROUTER_IMAGE)
    apply_shadow(namespace, example())
    created = wait_phase(kubectl, namespace, "fraud-detector", "Progressing")
    uid = created["metadata"]["uid"]

    # Every child matches its golden file (what the API server adds aside) and is owned by the resource.
    for golden_file in sorted(GOLDEN.glob("*.yaml")):
        expected = yaml.safe_load(golden_file.read_text())
        for reference in expected["metadata"].get("ownerReferences", []):
            reference["uid"] = uid
        live = eventually(
            lambda e=expected: get_json(kubectl, e["kind"], e["metadata"]["name"], "-n", namespace),
            10,
            f"{expected['kind']} {expected['metadata']['name']}",
        )
        assert is_subset(expected, live) == [], golden_file.name
        owner = live["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("ShadowDeployment", uid, True)

    status = eventually(
        lambda: (
            (s := shadow(kubectl, namespace, "fraud-detector")["status"]).get("lastDecision", {}).get("action")
            == "Wait"
            and s
        ),
        15,
        "the first analysis",
    )
    assert status["currentStep"] == 0
    assert status["currentWeight"] == 5
    assert status["observedGeneration"] == 1
    assert status["lastDecision"]["reason"].startswith("Waiting")  # no outcomes recorded yet
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Progressing"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "AnalysisStarted"
    assert conditions["Promoted"]["status"] == "False"
    assert conditions["RolledBack"]["status"] == "False"
    # No kubelet runs here, so the router Deployment never has available replicas.
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "RouterUnavailable")
    assert conditions["Ready"]["message"] == "0 of 2 router replicas available."
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] for c in conditions.values())

    assert reasons(kubectl, namespace, "fraud-detector") == ["AnalysisStarted"]
    event = events_for(kubectl, namespace, "fraud-detector")[0]
    assert event["type"] == "Normal"
    assert event["source"]["component"] == "shadowgate-operator"
    assert "mirroring 5% of requests to candidate fraud-v2" in event["message"]

    table = kubectl("get", "shadow", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODE", "WEIGHT", "PHASE", "READY", "SAMPLES", "SCORE", "AGE"]
    assert table[1].split()[:6] == ["fraud-detector", "shadow", "5", "Progressing", "False", "0"]
    assert table[1][table[0].index("SCORE") : table[0].index("AGE")].strip() == ""  # no score before minSamples
    wide = kubectl("get", "shadow", "-n", namespace, "-o", "wide").stdout.splitlines()
    header = wide[0].split()
    assert header[:7] == ["NAME", "MODE", "STEP", "WEIGHT", "PHASE", "READY", "SAMPLES"]
    assert wide[1].split()[:7] == ["fraud-detector", "shadow", "1/3", "5", "Progressing", "False", "0"]
    operator.assert_running()


def test_kubectl_explain_shows_defaults_and_every_allowed_value(kubectl: Kubectl, shadow_crd: str) -> None:
    """Right after the CRD helper returns (it waits for discovery and the OpenAPI document, not only for
    Established), with the defaults and enums written into the descriptions by crd.py."""
    explained = " ".join(kubectl("explain", "shadowdeployment.spec.analysis.minSamples").stdout.split())
    assert "FIELD: minSamples <integer>" in explained
    assert "DESCRIPTION: Scored request" in explained and explained.endswith(". Default: 100.")
    analysis = " ".join(kubectl("explain", "shadowdeployment.spec.analysis").stdout.split())
    assert "One of: mae, rmse, accuracy, directionalAccuracy, logLoss. Default: mae." in analysis
    assert "Default: 30s." in analysis and "Default: 0.99." in analysis


def test_deleting_it_garbage_collects_the_children(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example("doomed"))
    wait_phase(kubectl, namespace, "doomed", "Progressing")
    eventually(lambda: get_json(kubectl, "deployment", "doomed-router", "-n", namespace), 10, "the router Deployment")
    kubectl("delete", "shadowdeployment", "doomed", "-n", namespace, "--timeout=30s")

    def children_gone() -> bool:
        listing = get_json(kubectl, ",".join(CHILD_KINDS), "-n", namespace, "-l", "app.kubernetes.io/instance=doomed")
        return listing is not None and listing["items"] == []

    eventually(children_gone, 60, "the garbage collector to delete every child")


def test_restarting_the_operator_changes_nothing(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    first = start_operator("--namespace", namespace)
    # The longest interval: the restart below must fit between two analyses, however loaded the machine.
    apply_shadow(namespace, example("steady", analysis=example()["spec"]["analysis"] | {"interval": "60s"}))
    wait_phase(kubectl, namespace, "steady", "Progressing")
    eventually(
        lambda: shadow(kubectl, namespace, "steady")["status"].get("lastDecision", {}).get("action") == "Wait",
        15,
        "the first analysis",
    )

    def snapshot() -> dict[str, Any]:
        children = get_json(kubectl, ",".join(CHILD_KINDS), "-n", namespace, "-l", "app.kubernetes.io/instance=steady")
        return {
            "children": sorted(
                (c["kind"], c["metadata"]["uid"], c["metadata"]["resourceVersion"]) for c in children["items"]
            ),
            "status": shadow(kubectl, namespace, "steady")["status"],
            "events": [(e["reason"], e["metadata"]["name"]) for e in events_for(kubectl, namespace, "steady")],
        }

    before = snapshot()
    assert len(before["children"]) == len(CHILD_KINDS)
    first.stop(kill=True)  # a crash, not a graceful stop
    metrics = f"127.0.0.1:{free_port()}"
    second = start_operator("--namespace", namespace, "--metrics", metrics)
    # The new operator's first reconcile applies every child again and posts the Event of the transition
    # in status again (which the API server already holds: 409); then it has looked at everything.
    url = f"http://{metrics}"
    eventually(
        lambda: (
            metric(url, "shadowgate_operator_api_requests_total", verb="create", kind="Event", code="409") >= 1
            and metric(url, "shadowgate_operator_api_requests_total", verb="apply") >= len(CHILD_KINDS)
        ),
        60,
        "the new operator's first reconcile",
    )
    second.assert_running()
    after = snapshot()
    assert after["children"] == before["children"]
    assert after["events"] == before["events"]
    assert after["status"] == before["status"]


def test_resources_in_two_namespaces_are_reconciled_independently(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    other = f"{namespace}-b"
    kubectl("create", "namespace", other)
    try:
        start_operator("--all-namespaces")
        apply_shadow(namespace, example("alpha", traffic={"mode": "shadow", "steps": [5, 50]}))
        apply_shadow(namespace, example("beta", traffic={"mode": "canary", "steps": [20]}))
        apply_shadow(other, example("alpha", traffic={"mode": "shadow", "steps": [30]}))
        for ns, name, weight, mode in (
            (namespace, "alpha", 5, "shadow"),
            (namespace, "beta", 20, "canary"),
            (other, "alpha", 30, "shadow"),
        ):
            obj = wait_phase(kubectl, ns, name, "Progressing")
            assert obj["status"]["currentWeight"] == weight
            # Status is written first, the router's ConfigMap right after: wait for it.
            config = eventually(
                lambda ns=ns, name=name: (
                    get_json(kubectl, "configmap", f"{name}-router", "-n", ns) and router_config(kubectl, ns, name)
                ),
                10,
                f"{ns}/{name}-router",
            )
            assert (config["deployment"], config["namespace"], config["weight"], config["mode"]) == (
                name,
                ns,
                weight,
                mode,
            )

        # Pausing one leaves the other two alone.
        kubectl("patch", "shadowdeployment", "beta", "-n", namespace, "--type=merge", "-p", '{"spec":{"paused":true}}')
        wait_phase(kubectl, namespace, "beta", "Paused")
        assert shadow(kubectl, namespace, "alpha")["status"]["phase"] == "Progressing"
        assert shadow(kubectl, other, "alpha")["status"]["phase"] == "Progressing"
        wait_reasons(kubectl, namespace, "beta", ["AnalysisStarted", "Paused"])
        assert reasons(kubectl, namespace, "alpha") == ["AnalysisStarted"]
        assert reasons(kubectl, other, "alpha") == ["AnalysisStarted"]
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_manual_verbs_are_acted_on_once(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example("verbs"))
    wait_phase(kubectl, namespace, "verbs", "Progressing")

    def act(verb: str) -> None:
        kubectl("annotate", "--overwrite", "shadowdeployment", "verbs", "-n", namespace, f"shadowgate.io/action={verb}")

    act("promote")
    promoted = wait_phase(kubectl, namespace, "verbs", "Promoted")
    assert promoted["status"]["currentWeight"] == 100
    assert promoted["status"]["lastAction"]["verb"] == "promote"
    eventually(lambda: router_config(kubectl, namespace, "verbs")["weight"] == 100, 10, "the router at 100%")
    conditions = {c["type"]: c for c in promoted["status"]["conditions"]}
    assert conditions["Promoted"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False"

    # The same annotation value is not acted on twice; retry (with a nonce) restarts the analysis.
    act("retry:1")
    restarted = wait_phase(kubectl, namespace, "verbs", "Progressing")
    assert (restarted["status"]["currentStep"], restarted["status"]["currentWeight"]) == (0, 5)
    act("abort")
    rolled_back = wait_phase(kubectl, namespace, "verbs", "RolledBack")
    assert rolled_back["status"]["currentWeight"] == 0
    eventually(lambda: router_config(kubectl, namespace, "verbs")["weight"] == 0, 10, "the router at 0%")

    act("launch")
    eventually(lambda: "InvalidAction" in reasons(kubectl, namespace, "verbs"), 10, "a warning about the bad verb")
    warning = next(e for e in events_for(kubectl, namespace, "verbs") if e["reason"] == "InvalidAction")
    assert warning["type"] == "Warning"
    assert "unknown verb (use promote, abort, retry)" in warning["message"]
    assert reasons(kubectl, namespace, "verbs") == [
        "AnalysisStarted",
        "Promoted",
        "AnalysisRestarted",
        "RolledBack",
        "InvalidAction",
    ]


def test_paused_freezes_the_weight_and_a_new_candidate_restarts(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example("frozen"))
    wait_phase(kubectl, namespace, "frozen", "Progressing")
    kubectl(
        "patch",
        "shadowdeployment",
        "frozen",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"paused":true,"traffic":{"steps":[40,60]}}}',
    )
    paused = wait_phase(kubectl, namespace, "frozen", "Paused")
    assert paused["status"]["currentWeight"] == 5  # frozen where it was, not the new first step
    assert router_config(kubectl, namespace, "frozen")["weight"] == 5

    kubectl("patch", "shadowdeployment", "frozen", "-n", namespace, "--type=merge", "-p", '{"spec":{"paused":false}}')
    resumed = wait_phase(kubectl, namespace, "frozen", "Progressing")
    assert resumed["status"]["currentWeight"] == 40
    eventually(lambda: router_config(kubectl, namespace, "frozen")["weight"] == 40, 10, "the router at 40%")

    candidate = example("frozen")["spec"]["candidate"] | {"version": "2.1.0"}
    kubectl(
        "patch",
        "shadowdeployment",
        "frozen",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"candidate": candidate}}),
    )
    eventually(lambda: "AnalysisRestarted" in reasons(kubectl, namespace, "frozen"), 15, "the analysis to restart")
    restarted = shadow(kubectl, namespace, "frozen")
    assert restarted["status"]["currentStep"] == 0
    assert restarted["status"]["observedGeneration"] == restarted["metadata"]["generation"]
    assert router_config(kubectl, namespace, "frozen")["candidate"]["version"] == "2.1.0"
    assert reasons(kubectl, namespace, "frozen") == ["AnalysisStarted", "Paused", "Resumed", "AnalysisRestarted"]
    # The operator never writes spec: what we applied is what is there.
    assert restarted["spec"]["traffic"]["steps"] == [40, 60]


def test_a_standby_replica_takes_over_through_peering(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "shadowgate"}}
    apply(kubectl, namespace, peering)
    active = start_operator("--namespace", namespace, "--peering", "shadowgate", "--priority", "200")
    standby = start_operator("--namespace", namespace, "--peering", "shadowgate", "--priority", "100")
    # Both replicas have registered in the peering object before there is any work to share.
    eventually(
        lambda: len((get_json(kubectl, "kopfpeering", "shadowgate", "-n", namespace) or {}).get("status") or {}) == 2,
        90,  # two Python processes starting on a shared, loaded machine
        "both replicas in the KopfPeering",
    )
    apply_shadow(namespace, example("ha"))
    wait_phase(kubectl, namespace, "ha", "Progressing")
    eventually(lambda: "Handler 'seen' succeeded" in active.log(), 30, "the active replica's handler")
    assert "Handler 'seen' succeeded" not in standby.log()

    active.stop()  # a graceful stop withdraws it from the peering at once
    kubectl("annotate", "shadowdeployment", "ha", "-n", namespace, "shadowgate.io/action=promote")
    wait_phase(kubectl, namespace, "ha", "Promoted", timeout=60)
    assert "Handler 'seen' succeeded" in standby.log()
    wait_reasons(kubectl, namespace, "ha", ["AnalysisStarted", "Promoted"])


def test_what_blocks_the_router_is_a_condition_and_one_warning_not_a_crash(
    kubectl: Kubectl, dsn: str, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    """Issue 12: a child the API server refuses (D11), a database Secret that holds no DSN (D12) and a router
    image the operator does not allow (D13) each leave Ready False with their reason and one Warning Event;
    the operator keeps running and keeps the rollouts' other children in shape."""
    # A quota the router Deployment cannot fit in: the API server refuses it (403, not for lack of rights).
    kubectl("create", "quota", "no-deployments", "-n", namespace, "--hard=count/deployments.apps=0")
    # Its status as the quota controller would write it (this control plane does not run that controller;
    # admission lets everything through a quota whose usage is unknown).
    usage = {"count/deployments.apps": "0"}
    kubectl("patch", "quota", "no-deployments", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"hard": usage, "used": usage}}))  # fmt: skip
    operator = start_operator("--namespace", namespace)
    analysis = example()["spec"]["analysis"] | {"interval": "5s"}
    apply_shadow(namespace, example("quota", analysis=analysis))
    # Its Secret holds no DSN from the start (apply_shadow would first write the working one, which the operator
    # keeps until its resync: it reads a DSN Secret, never watches it). Its token Secret is quota's.
    apply(kubectl, namespace, router_secret("garbage-db", "dsn", "hunter2 is no DSN"))
    apply(kubectl, namespace, example("baddsn", analysis=analysis, database={"secretRef": {"name": "garbage-db"}}))
    router = example()["spec"]["router"] | {"image": "attacker.example/steal-secrets:1"}
    apply_shadow(namespace, example("image", router=router))

    def ready(name: str) -> dict[str, Any] | None:
        conditions = shadow(kubectl, namespace, name).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready" and c["status"] == "False"), None)

    for name, reason, words in (
        ("quota", "RouterRefused", f"The API server refused Deployment {namespace}/quota-router: "),
        ("baddsn", "InvalidDatabaseSecret", "does not hold a PostgreSQL DSN: it does not start with postgresql://"),
        ("image", "RouterImageNotAllowed", "'attacker.example/steal-secrets:1' is not an image this operator runs"),
    ):
        condition = eventually(
            lambda name=name, reason=reason: (c := ready(name)) is not None and c["reason"] == reason and c,
            60,
            f"{name}: Ready False {reason}",
        )
        assert words in condition["message"]
        assert "hunter2" not in condition["message"]  # a Secret's value is described, never quoted
        # The rollout itself goes on: its weight reaches the router's ConfigMap.
        assert shadow(kubectl, namespace, name)["status"]["phase"] == "Progressing"
        eventually(lambda name=name: router_config(kubectl, namespace, name)["weight"] == 5, 30, f"{name}'s ConfigMap")
    assert "quota" in ready("quota")["message"]  # the server's own words: which quota
    assert get_json(kubectl, "deployment", "image-router", "-n", namespace) is None  # the image never ran

    # Two more analyses of each: still blocked, one Warning each, and the operator never crashed.
    analysed = {name: analyses(dsn, namespace, name) for name in ("quota", "image")}
    for name, before in analysed.items():
        eventually(
            lambda name=name, before=before: analyses(dsn, namespace, name) >= before + 2,
            60,
            f"two more analyses of {name}",
        )
    for name, reason in (("quota", "RouterRefused"), ("baddsn", "InvalidDatabaseSecret"),
                         ("image", "RouterImageNotAllowed")):  # fmt: skip
        warnings = [e for e in events_for(kubectl, namespace, name) if e["reason"] == reason]
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning", (name, warnings)
    operator.assert_running()
    assert "Traceback" not in operator.log()

    # Fixing the cause heals Ready at the next reconcile.
    kubectl("delete", "quota", "no-deployments", "-n", namespace)
    apply(kubectl, namespace, router_secret("garbage-db", "dsn", shadow_dsn(kubectl, namespace)))
    eventually(lambda: get_json(kubectl, "deployment", "quota-router", "-n", namespace), 60, "the router Deployment")
    for name in ("quota", "baddsn"):
        eventually(lambda name=name: ready(name) is not None and ready(name)["reason"] == "RouterUnavailable", 60,
                   f"{name}: Ready to follow the router again")  # fmt: skip


def test_a_secret_not_labelled_for_the_router_is_neither_handed_to_it_nor_connected_to(
    kubectl: Kubectl, dsn: str, namespace: str, start_operator: StartOperator
) -> None:
    """Issue 12, D13: a ShadowDeployment may name only Secrets labelled shadowgate.io/router-secret=true. Others
    (here a working DSN and a token someone may create ShadowDeployments without being able to read) leave
    Ready False SecretNotAllowed with a Warning per Secret: no router Deployment holds them and the operator
    does not connect to the DSN. Labelling them heals it."""
    asyncio.run(migrate_dsn(dsn))  # so that "no row" below means "never connected", whichever test runs first
    operator = start_operator("--namespace", namespace)
    for secret in (router_secret("plain-db", "dsn", dsn, labelled=False),
                   router_secret("plain-token", "token", "someone-elses-token", labelled=False)):  # fmt: skip
        apply(kubectl, namespace, secret)
    analysis = example()["spec"]["analysis"] | {"interval": "5s"}
    apply(kubectl, namespace, example(
        "nolabel", analysis=analysis, database={"secretRef": {"name": "plain-db"}},
        outcomes={"tokenSecretRef": {"name": "plain-token"}},
    ))  # fmt: skip

    def ready() -> dict[str, Any]:
        conditions = shadow(kubectl, namespace, "nolabel").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), {})

    refused = eventually(lambda: ready().get("reason") == "SecretNotAllowed" and ready(), 60, "Ready SecretNotAllowed")
    assert refused["status"] == "False"
    for field, secret in (("spec.database.secretRef", "plain-db"), ("spec.outcomes.tokenSecretRef", "plain-token")):
        assert (
            f"Secret {namespace}/{secret} ({field}) is not labelled shadowgate.io/router-secret=true"
            in (refused["message"])
        )
        assert f"kubectl label secret {secret} -n {namespace} shadowgate.io/router-secret=true" in refused["message"]
    assert dsn not in refused["message"] and "someone-elses-token" not in refused["message"]
    # The other children follow the rollout; the router Deployment, which would hold the Secrets, is not made.
    eventually(lambda: router_config(kubectl, namespace, "nolabel")["weight"] == 5, 30, "the router's ConfigMap")
    assert get_json(kubectl, "deployment", "nolabel-router", "-n", namespace) is None
    warnings = [e for e in events_for(kubectl, namespace, "nolabel") if e["reason"] == "SecretNotAllowed"]
    assert sorted(w["message"].split(" is not labelled")[0] for w in warnings) == [
        f"Secret {namespace}/plain-db (spec.database.secretRef)",
        f"Secret {namespace}/plain-token (spec.outcomes.tokenSecretRef)",
    ]
    assert all(w["type"] == "Warning" for w in warnings)
    never = "SELECT generation FROM shadow_deployments WHERE namespace = $1 AND deployment = $2"
    assert rows(dsn, never, namespace, "nolabel") == []  # the operator never connected to the DSN
    operator.assert_running()

    for secret in ("plain-db", "plain-token"):
        kubectl("label", "secret", secret, "-n", namespace, "shadowgate.io/router-secret=true")
    deployment = eventually(
        lambda: get_json(kubectl, "deployment", "nolabel-router", "-n", namespace), 60, "the router Deployment"
    )
    env = {variable["name"]: variable for variable in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHADOWGATE_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "plain-db", "key": "dsn"}
    eventually(lambda: ready().get("reason") == "RouterUnavailable", 60, "Ready to follow the router")
    eventually(lambda: rows(dsn, never, namespace, "nolabel"), 60, "the spec recorded in the database")


def test_a_notification_secret_not_labelled_is_refused_in_ready_while_the_router_follows_the_spec(
    kubectl: Kubectl, namespace: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    """Issue 12, least privilege: spec.notifications[].urlSecretRef is held to the same label as the router's
    Secrets. Unlabelled, Ready is False SecretNotAllowed with a Warning saying how to label it (and not what the
    Secret holds); the router, which never holds that Secret, is made as usual. Labelling it heals Ready."""
    start_operator("--namespace", namespace)
    hook = "https://hooks.example.com/services/T000/B000/not-for-this-operator"
    apply(kubectl, namespace, router_secret("team-hooks", "url", hook, labelled=False))
    analysis = example()["spec"]["analysis"] | {"interval": "5s"}
    notifications = [{"name": "team", "urlSecretRef": {"name": "team-hooks"}}]
    apply_shadow(namespace, example("hooked", analysis=analysis, notifications=notifications))

    def ready() -> dict[str, Any]:
        conditions = shadow(kubectl, namespace, "hooked").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), {})

    refused = eventually(lambda: ready().get("reason") == "SecretNotAllowed" and ready(), 60, "Ready SecretNotAllowed")
    assert refused["status"] == "False"
    assert refused["message"].startswith(
        f"Secret {namespace}/team-hooks (spec.notifications[].urlSecretRef) is not labelled "
        "shadowgate.io/router-secret=true: the operator reads only the Secrets labelled for it, and posts nothing "
        "to this receiver until then."
    )
    assert refused["message"].endswith(
        f"kubectl label secret team-hooks -n {namespace} shadowgate.io/router-secret=true"
    )
    assert hook not in refused["message"]
    warnings = eventually(
        lambda: [e for e in events_for(kubectl, namespace, "hooked") if e["reason"] == "SecretNotAllowed"],
        30,
        "the Warning Event",
    )
    assert [(w["type"], w["message"]) for w in warnings] == [("Warning", refused["message"])]
    # Not the router's Secret: its Deployment follows the spec (with the database and token Secrets only).
    deployment = eventually(
        lambda: get_json(kubectl, "deployment", "hooked-router", "-n", namespace), 60, "the router Deployment"
    )
    assert "team-hooks" not in json.dumps(deployment)

    kubectl("label", "secret", "team-hooks", "-n", namespace, "shadowgate.io/router-secret=true")
    eventually(lambda: ready().get("reason") not in (None, "SecretNotAllowed"), 60, "Ready to stop refusing it")


def shadow_dsn(kubectl: Kubectl, namespace: str) -> str:
    """The DSN apply_shadow put in fraud-detector-db (the test database)."""
    secret = get_json(kubectl, "secret", "fraud-detector-db", "-n", namespace)
    return base64.b64decode(secret["data"]["dsn"]).decode()
