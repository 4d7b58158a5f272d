"""`diffusers-spm`: train | generate | evaluate | convert | push | list | demo | app.

Each command lives beside the code it drives and registers itself through a `register(subparsers)`
function; this module only assembles them, and turns expected failures into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

COMMAND_MODULES = (
    "diffusers_spm.commands",
    "diffusers_spm.training.cli",
    "diffusers_spm.evaluation.cli",
    "diffusers_spm.concept_world.demo",
    "diffusers_spm.app.cli",
)
# What bad input raises (a path, a model, a membrane, a config, the network, a missing extra); anything
# else is a bug and keeps its traceback.
EXPECTED_FAILURES = (ValueError, TypeError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-spm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    for command in subparsers.choices.values():  # also after the command: `diffusers-spm generate ... --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except EXPECTED_FAILURES as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"diffusers-spm {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
