"""`shadowgate operator`: run the kopf operator for ShadowDeployments."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys

OPERATOR_HELP = """\
Watch ShadowDeployments and run their rollouts: create the router, set its traffic split, analyse,
promote or roll back, and report in status, conditions and Events.

Namespaces: --namespace (repeatable) or WATCH_NAMESPACE (comma-separated); --all-namespaces, or
neither, watches the whole cluster. Credentials: in-cluster service account, else KUBECONFIG.
High availability: run replicas with the same --peering name; one works, the others stand by
(needs the peering CRDs in crds/kopf.dev_peerings.yaml and a ClusterKopfPeering, or a KopfPeering in
each watched namespace, of that name). manifests/ deploys it this way.
"""


def run(args: argparse.Namespace) -> int:
    import kopf

    from shadowgate_operator import handlers
    from shadowgate_operator.builders import OperatorSettings
    from shadowgate_operator.exporter import OperatorMetrics

    del handlers  # imported for its registrations
    namespaces = list(args.namespace) or [
        ns.strip() for ns in os.environ.get("WATCH_NAMESPACE", "").split(",") if ns.strip()
    ]
    clusterwide = args.all_namespaces or not namespaces
    has_patterns = any(character in ns for ns in namespaces for character in "*?[!")
    settings = OperatorSettings.from_env()
    if args.router_image:
        settings = settings.model_copy(update={"router_image": args.router_image})
    priority = args.priority
    if args.peering is not None and priority is None:
        # kopf pauses every replica when the highest priority is shared: draw one that is not.
        priority = secrets.randbelow(1_000_000) + 1
    metrics = OperatorMetrics()
    if args.metrics:
        metrics.serve(args.metrics)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    watching = "all namespaces" if clusterwide else ", ".join(namespaces)
    peering = "standalone" if args.peering is None else f"peering {args.peering!r} with priority {priority}"
    print(f"shadowgate operator: watching {watching}; {peering}", file=sys.stderr, flush=True)
    kopf.run(
        clusterwide=clusterwide,
        namespaces=[] if clusterwide else namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(
            operator_settings=settings,
            operator_metrics=metrics,
            run_migrations=not args.no_migrate,
            # Named namespaces only (no patterns): nothing to discover, so no cluster-wide list or watch of
            # namespaces and CRDs, and the namespaced install needs no ClusterRole at all.
            scanning=clusterwide or has_patterns,
            peering_lifetime=args.peering_lifetime,
            # The notifications it delivers: those of the namespaces it watches when they are named (patterns
            # and all namespaces: every message in its databases).
            delivery_namespaces=None if clusterwide or has_patterns else tuple(namespaces),
        ),
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the operator",
        description=OPERATOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--peering", metavar="NAME", help="KopfPeering name shared by replicas (default: standalone)")
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=20,
        metavar="SECONDS",
        help="a replica not heard from for this long is taken for dead and a standby takes over (default: 20)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority; the highest active replica works (default: random, so replicas never tie)",
    )
    parser.add_argument("--router-image", help="router image (default: SHADOWGATE_ROUTER_IMAGE or the release image)")
    parser.add_argument(
        "--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on /metrics here, e.g. 0.0.0.0:9090"
    )
    parser.add_argument(
        "--no-migrate", action="store_true", help="do not apply pending database migrations on first connection"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every handler and API call")
    parser.set_defaults(func=run)
