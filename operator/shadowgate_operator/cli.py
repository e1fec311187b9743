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
    "shadowgate_operator.demo",
    "shadowgate_operator.localenv.cli",
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
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
