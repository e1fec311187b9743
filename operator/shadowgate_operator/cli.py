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
from collections.abc import Callable, Sequence

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

OWN_PACKAGES = ("shadowgate_operator", "shadowgate_router", "shadowgate_common", "shadowgate_dev")

# The developer tooling (operator/shadowgate_dev/, not copied into the image): the command each module
# registers and the make target that runs it from a source checkout.
DEV_COMMANDS: dict[str, tuple[str, str]] = {
    "shadowgate_dev.demo": ("demo", "make demo"),
    "shadowgate_dev.localenv.cli": ("dev", "make dev-up"),
    "shadowgate_dev.localenv.nodecli": ("node", "make e2e"),
}


def _not_in_this_image(command: str, target: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"shadowgate {command}: developer tooling, not in this image: run it from a source checkout, `{target}`",
            file=sys.stderr,
        )
        return 2

    return run


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
            if module_name in DEV_COMMANDS and exc.name == "shadowgate_dev":
                # The image: the command is listed and, given any arguments, says where it runs.
                command, target = DEV_COMMANDS[module_name]
                stub = subparsers.add_parser(command, help="developer tooling, not in this image", add_help=False)
                stub.set_defaults(func=_not_in_this_image(command, target), any_arguments=True)
                continue
            # A source install without the [dev] extra: the local control plane and the demo
            # need packages (cryptography, ...) that operator and router never use. Say so instead of failing.
            if exc.name is None or exc.name.partition(".")[0] in OWN_PACKAGES:
                raise
            missing.append(f"  {module_name}: needs {exc.name} (pip install 'shadowgate[dev]')")
            continue
        module.register(subparsers)
    if missing:
        parser.epilog = "Not available in this installation:\n" + "\n".join(missing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
