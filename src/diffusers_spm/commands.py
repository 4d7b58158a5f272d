"""The runtime's own commands: `convert` and `generate`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Filled in below."""
