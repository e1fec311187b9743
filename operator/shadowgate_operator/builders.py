"""The objects the operator creates for a ShadowDeployment, as plain dicts: pure, no I/O.

Every child is named ``<name>-router``, carries the same labels and is owned by the ShadowDeployment
(so deleting it deletes them). The kube I/O that applies them lives elsewhere.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shadowgate_operator.api import (
    API_VERSION,
    KIND,
    ModelEndpoint,
    Phase,
    Protocol,
    ShadowDeployment,
    TrafficMode,
    is_quantity,
    quantity_value,
)
from shadowgate_router.config import (
    DRAIN_SECONDS,
    ENV_CONFIGMAP,
    ENV_DSN,
    ENV_NAMESPACE,
    ENV_OUTCOME_TOKEN,
    ENV_SPOOL_DIR,
    FLUSH_SECONDS,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    RouterConfig,
    Upstream,
    shutdown_seconds,
)

ROUTER_APP = "shadowgate-router"
MANAGER = "shadowgate"
SPOOL_DIR = "/var/lib/shadowgate/spool"
RUN_AS_USER = 65532  # the image's unprivileged user (distroless "nonroot")

Manifest = dict[str, Any]


def _default_router_image() -> str:
    try:
        version = metadata.version("shadowgate")
    except metadata.PackageNotFoundError:
        version = "latest"
    return f"shadowgate:{version}"


class OperatorSettings(BaseModel):
    """What the builders need that is not in the ShadowDeployment: how this operator was deployed."""

    model_config = ConfigDict(frozen=True)

    router_image: str = Field(default_factory=_default_router_image, min_length=1)
    """Image for router pods unless spec.router.image names another allowed one; the operator's own by default."""
    allowed_router_images: tuple[str, ...] = ()
    """Images spec.router.image may name besides router_image (exact references, digests advised). Empty
    by default: whoever may create a ShadowDeployment cannot choose the code that holds its Secrets."""
    image_pull_policy: str = "IfNotPresent"
    router_network_policy: bool = True
    """Give each router a NetworkPolicy (its ports in, anything but cloud metadata out). Off when the
    cluster's own policies should decide who may call routers: NetworkPolicies only ever add access."""
    cluster_role: str = Field(default="shadowgate-operator", min_length=1)
    """The Role (or, cluster-wide, ClusterRole) the operator runs with (manifests/operator/rbac.yaml): named when
    a permission is missing."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        """Settings from SHADOWGATE_ROUTER_IMAGE, SHADOWGATE_ALLOWED_ROUTER_IMAGES (comma-separated),
        SHADOWGATE_ROUTER_NETWORK_POLICY (false turns it off), SHADOWGATE_IMAGE_PULL_POLICY and
        SHADOWGATE_CLUSTER_ROLE, defaults otherwise."""
        env = os.environ if environ is None else environ
        allowed = tuple(image.strip() for image in env.get("SHADOWGATE_ALLOWED_ROUTER_IMAGES", "").split(","))
        values = {
            "router_image": env.get("SHADOWGATE_ROUTER_IMAGE"),
            "allowed_router_images": tuple(image for image in allowed if image),
            "image_pull_policy": env.get("SHADOWGATE_IMAGE_PULL_POLICY"),
            "cluster_role": env.get("SHADOWGATE_CLUSTER_ROLE"),
        }
        settings = cls.model_validate({key: value for key, value in values.items() if value})
        if env.get("SHADOWGATE_ROUTER_NETWORK_POLICY", "").strip().lower() in ("false", "0", "no", "off"):
            settings = settings.model_copy(update={"router_network_policy": False})
        return settings

    def image_problem(self, sd: ShadowDeployment) -> str | None:
        """Why the router Deployment of `sd` is not applied: spec.router.image is not an allowed image."""
        wanted = sd.spec.router.image
        if wanted is None or wanted == self.router_image or wanted in self.allowed_router_images:
            return None
        allowed = ", ".join([self.router_image, *self.allowed_router_images])
        return (
            f"spec.router.image {wanted!r} is not an image this operator runs routers from ({allowed}); "
            "the router Deployment is left as it was. Remove spec.router.image, or ask whoever runs the "
            "operator to add the image to SHADOWGATE_ALLOWED_ROUTER_IMAGES."
        )


def labels(sd: ShadowDeployment) -> dict[str, str]:
    """Labels on every child; the first two also select the router pods."""
    return {
        "app.kubernetes.io/name": ROUTER_APP,
        "app.kubernetes.io/instance": sd.name,
        "app.kubernetes.io/managed-by": MANAGER,
    }


def selector_labels(sd: ShadowDeployment) -> dict[str, str]:
    return {"app.kubernetes.io/name": ROUTER_APP, "app.kubernetes.io/instance": sd.name}


def owner_reference(sd: ShadowDeployment) -> dict[str, Any]:
    if not sd.metadata.uid:
        raise ValueError(f"ShadowDeployment {sd.name!r} has no uid; build children from the stored object")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": sd.name,
        "uid": sd.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(sd: ShadowDeployment) -> dict[str, Any]:
    return {
        "name": sd.router_name,
        "namespace": sd.namespace,
        "labels": labels(sd),
        "ownerReferences": [owner_reference(sd)],
    }


def service_account(sd: ShadowDeployment) -> Manifest:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(sd)}


def role(sd: ShadowDeployment) -> Manifest:
    """Read access to the router's own ConfigMap and nothing else.

    resourceNames limits list and watch too, as long as the router lists with
    fieldSelector=metadata.name=<name>-router.
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(sd),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [sd.router_name],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def role_binding(sd: ShadowDeployment) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(sd),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sd.router_name},
        "subjects": [{"kind": "ServiceAccount", "name": sd.router_name, "namespace": sd.namespace}],
    }


def routing(sd: ShadowDeployment) -> tuple[TrafficMode, int]:
    """Mode and candidate weight the router applies: the weight status records (rollout.weight_for is the
    one rule from phase and step to weight, and every planned status carries its result); after promotion
    every request is answered by the candidate, whatever the analysis mode was."""
    mode = TrafficMode.CANARY if sd.status.phase_or_pending is Phase.PROMOTED else sd.spec.traffic.mode
    return mode, sd.status.current_weight or 0


def _upstream(sd: ShadowDeployment, endpoint: ModelEndpoint) -> Upstream:
    return Upstream(
        name=endpoint.name,
        version=endpoint.version,
        url=endpoint.base_url(sd.namespace),
        model_name=endpoint.served_model_name,
        grpc_address=endpoint.grpc_address(sd.namespace),
    )


def router_config(sd: ShadowDeployment) -> RouterConfig:
    """The ConfigMap's content for the object's current spec and status."""
    spec = sd.spec
    mode, weight = routing(sd)
    return RouterConfig(
        deployment=sd.name,
        namespace=sd.namespace,
        mode=mode,
        weight=weight,
        phase=sd.status.phase_or_pending.value,
        protocol=spec.protocol,
        prediction_path=spec.prediction_path,
        confidence_path=spec.confidence_path,
        production=_upstream(sd, spec.production),
        candidate=_upstream(sd, spec.candidate),
        sticky_header=spec.traffic.sticky_header,
        segment_header=spec.analysis.segment_by.header if spec.analysis.segment_by else None,
        segment_path=spec.analysis.segment_by.path if spec.analysis.segment_by else None,
        fallback_to_production=spec.traffic.fallback_to_production,
        timeout_seconds=spec.traffic.timeout_seconds,
        mirror_timeout_seconds=spec.traffic.mirror_timeout_seconds,
        mirror_drop_headers=tuple(spec.traffic.mirror_drop_headers),
    )


def config_map(sd: ShadowDeployment) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(sd),
        "data": router_config(sd).to_configmap_data(),
    }


ROUTER_SECRET_LABEL = "shadowgate.io/router-secret"
"""The label, with the value "true", on every Secret a ShadowDeployment names (spec.database.secretRef,
spec.outcomes.tokenSecretRef, spec.notifications[].urlSecretRef, spec.gates[].urlSecretRef). Naming a Secret
takes the right to create a ShadowDeployment; labelling it takes the right to write Secrets. Without the label
the operator neither hands the Secret to a router, nor connects to the DSN in it, nor posts to the URL in it,
so whoever may create ShadowDeployments cannot put any other Secret of the namespace to use."""


HELD_ROUTER = (
    "the operator gives routers only the Secrets labelled for them, and the router Deployment is left as it was"
)
URL_SECRET_FIELD = "spec.notifications[].urlSecretRef"
HELD_NOTIFICATIONS = (
    "the operator reads only the Secrets labelled for it, and posts nothing to this receiver until then"
)
GATE_URL_SECRET_FIELD = "spec.gates[].urlSecretRef"
HELD_GATES = "the operator reads only the Secrets labelled for it, and calls no gate with it until then (it holds)"


def secret_problem(secret: Manifest, field: str, consequence: str = HELD_ROUTER) -> str | None:
    """Why the Secret `secret`, named by the spec's `field`, is not one the operator uses: it lacks
    ROUTER_SECRET_LABEL=true. Says what is held back (`consequence`) and how to label it; never looks at its
    values."""
    metadata = secret.get("metadata") or {}
    if (metadata.get("labels") or {}).get(ROUTER_SECRET_LABEL) == "true":
        return None
    namespace, name = metadata.get("namespace"), metadata.get("name")
    return (
        f"Secret {namespace}/{name} ({field}) is not labelled {ROUTER_SECRET_LABEL}=true: {consequence}. If this "
        f"one is meant for it: kubectl label secret {name} -n {namespace} {ROUTER_SECRET_LABEL}=true"
    )


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def deployment(sd: ShadowDeployment, settings: OperatorSettings) -> Manifest:
    """The router pods. They read their config from the ConfigMap's watch, not from a mount, so a
    weight change needs no restart and the Deployment only changes when the spec does."""
    spec = sd.spec
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2}
    container = {
        "name": "router",
        "image": spec.router.image or settings.router_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["shadowgate", "router"],
        "args": [
            f"--listen=0.0.0.0:{HTTP_PORT}",
            f"--metrics-listen=0.0.0.0:{METRICS_PORT}",
            f"--drain-seconds={DRAIN_SECONDS:g}",
            f"--flush-seconds={FLUSH_SECONDS:g}",
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            # Prometheus' /metrics only; the Service (what clients call) does not expose it.
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [
            {"name": ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": ENV_CONFIGMAP, "value": sd.router_name},
            {"name": ENV_SPOOL_DIR, "value": SPOOL_DIR},
            _secret_env(ENV_DSN, spec.database.secret_ref.name, spec.database.secret_ref.key),
            _secret_env(ENV_OUTCOME_TOKEN, spec.outcomes.token_secret_ref.name, spec.outcomes.token_secret_ref.key),
        ],
        "readinessProbe": probe,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {kind: amounts for kind, amounts in spec.router.resources.to_dict().items() if amounts},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "spool", "mountPath": SPOOL_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(sd),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(sd)},
            # Never fewer ready routers than asked for while rolling: they sit in the request path.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(sd),
                    # The convention most Prometheus set-ups scrape pods by.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": sd.router_name,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # The router's whole shutdown (requests in flight, then the final flush of both tables
                    # at once) plus a margin: the SIGKILL at its end never cuts a flush short.
                    "terminationGracePeriodSeconds": shutdown_seconds(DRAIN_SECONDS, FLUSH_SECONDS),
                    "containers": [container],
                    "volumes": [
                        # Rows wait here while the database is away; the root filesystem is read-only.
                        {"name": "spool", "emptyDir": {"sizeLimit": "1Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


ROUTER_GRPC_SERVICE_PORT = GRPC_PORT


def service(sd: ShadowDeployment) -> Manifest:
    """What clients call instead of the production model: http://<name>-router.<namespace>.svc, and for
    protocol v2 also gRPC at <name>-router.<namespace>.svc:8081 (inference.GRPCInferenceService)."""
    ports: list[dict[str, Any]] = [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    if sd.spec.protocol is Protocol.V2:
        ports.append(
            {
                "name": "grpc",
                "port": ROUTER_GRPC_SERVICE_PORT,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "kubernetes.io/h2c",  # gRPC is HTTP/2 without TLS here
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(sd),
        "spec": {"type": "ClusterIP", "selector": selector_labels(sd), "ports": ports},
    }


# Cloud metadata services, kept from the router pods whatever DNS name a model URL uses (admission refuses
# their addresses as URLs; a name resolving to one is only caught here). Not all of 169.254.0.0/16:
# NodeLocal DNSCache listens on 169.254.20.10.
METADATA_CIDRS_V4 = ("169.254.169.254/32", "100.100.100.200/32")
METADATA_CIDRS_V6 = ("fd00:ec2::254/128",)


METRICS_SCRAPER_LABEL = "shadowgate.io/metrics-scraper"
"""The label, with the value "true", on a namespace whose pods (Prometheus) may read the /metrics ports of
routers and of the operator: traffic volumes, error rates and configuration revisions are not every client's."""


def network_policy(sd: ShadowDeployment, settings: OperatorSettings) -> Manifest:
    """The router pods accept connections on their traffic ports from anywhere and on their metrics port from
    namespaces labelled METRICS_SCRAPER_LABEL=true, and reach any pod and any address (model servers, the
    database, the API server, DNS) but the cloud metadata services."""
    container = deployment(sd, settings)["spec"]["template"]["spec"]["containers"][0]
    ports = [{"port": port["name"], "protocol": port["protocol"]} for port in container["ports"]]
    traffic = [port for port in ports if port["port"] != "metrics"]
    metrics = [port for port in ports if port["port"] == "metrics"]
    scrapers = {"namespaceSelector": {"matchLabels": {METRICS_SCRAPER_LABEL: "true"}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(sd),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(sd)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": traffic}, *([{"from": [scrapers], "ports": metrics}] if metrics else [])],
            "egress": [
                {
                    "to": [
                        {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(METADATA_CIDRS_V4)}},
                        {"ipBlock": {"cidr": "::/0", "except": list(METADATA_CIDRS_V6)}},
                        # Pods anywhere: some network plugins (Cilium) never match pod addresses by ipBlock.
                        {"namespaceSelector": {}},
                    ]
                }
            ],
        },
    }


def router_inputs(sd: ShadowDeployment) -> tuple[Any, ...]:
    """Everything `router_objects` reads of `sd` (the operator's settings stay the same): equal inputs, equal
    children, so the Reconciler builds them again only when these change."""
    return (sd.metadata.uid, sd.namespace, sd.name, sd.spec, sd.status.phase_or_pending, sd.status.current_weight)


def router_objects(sd: ShadowDeployment, settings: OperatorSettings) -> list[Manifest]:
    """All children, in an order that applies cleanly: identity and config before the pods using them."""
    children = [
        service_account(sd),
        role(sd),
        role_binding(sd),
        config_map(sd),
        deployment(sd, settings),
        service(sd),
    ]
    if settings.router_network_policy:
        children.append(network_policy(sd, settings))
    return children


def in_place(manifest: Manifest, live: Manifest | None) -> bool:
    """Whether `live` (the child as the API server holds it) has every field `manifest` sets, as set: what a
    resync checks before it applies (service.Reconciler). Fields the API server adds (defaults, status,
    managedFields) and fields others own are not looked at: applying `manifest` would not change them either.
    Lists must match element by element; a quantity (resources, an emptyDir's sizeLimit) by its amount, as
    the API server writes it in its own form (0.5 -> 500m)."""
    return live is not None and _holds(manifest, live, ())


def _holds(wanted: Any, found: Any, path: tuple[str, ...]) -> bool:
    if isinstance(wanted, dict):
        if not isinstance(found, dict):
            return found is None and not wanted  # an empty map the API server leaves out
        return all(_holds(value, found.get(key), (*path, key)) for key, value in wanted.items())
    if isinstance(wanted, list):
        if not isinstance(found, list):
            return found is None and not wanted
        return len(wanted) == len(found) and all(_holds(w, f, path) for w, f in zip(wanted, found, strict=True))
    if wanted == found and type(wanted) is type(found):
        return True
    quantity = len(path) >= 2 and (path[-2] in ("requests", "limits") or path[-1] == "sizeLimit")
    return quantity and is_quantity(wanted) and is_quantity(found) and quantity_value(wanted) == quantity_value(found)
