"""`diffusers-spm`: train | generate | evaluate | convert | push | demo.

Each command lives beside the code it drives and registers itself through a `register(subparsers)`
function; this module only assembles them.
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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-spm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as err:
        logging.getLogger("diffusers_spm").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
