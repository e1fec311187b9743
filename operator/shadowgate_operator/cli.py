"""The `shadowgate` command: one entry point whose subcommands each live in their own module.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). Modules are
imported lazily by name so that, for example, `shadowgate router` never imports the operator's
dependencies and `shadowgate --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "shadowgate_operator.run",
    "shadowgate_operator.migrate",
    "shadowgate_operator.replay",
    "shadowgate_dev.demo",
    "shadowgate_dev.localenv.cli",
    "shadowgate_dev.localenv.nodecli",
    "shadowgate_operator.crd",
    "shadowgate_router.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowgate",
        description=(
            "Roll out a candidate ML model beside production: shadow or canary it, score it on real "
            "outcomes, and promote or roll it back automatically."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    missing = []
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # The image installs shadowgate without the [dev] extra: the local control plane and the demo
            # need packages (cryptography, ...) that operator and router never use. Say so instead of failing.
            if exc.name is None or exc.name.partition(".")[0] in ("shadowgate_operator", "shadowgate_router"):
                raise
            missing.append(f"  {module_name}: needs {exc.name} (pip install 'shadowgate[dev]')")
            continue
        module.register(subparsers)
    if missing:
        parser.epilog = "Not available in this installation:\n" + "\n".join(missing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
