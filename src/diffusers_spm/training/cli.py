"""`diffusers-spm train CONFIG.yaml [--set k=v ...] [--resume]` and `diffusers-spm push PATH --repo org/name`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _train(args: argparse.Namespace) -> int:
    from .config import TrainingConfig
    from .trainer import train_membrane

    config = TrainingConfig.from_yaml(args.config, args.set)
    result = train_membrane(config, resume=args.resume)
    membranes = result if isinstance(result, list) else [result]
    logger.info("Trained %d membrane(s) in %s.", len(membranes), config.save.path)
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..hub import push_membrane

    summary = Path(args.report).read_text() if args.report else None
    url = push_membrane(args.path, args.repo, evaluation_summary=summary, private=args.private, token=args.token)
    logger.info("Pushed %s to %s", args.path, url)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a membrane from a config (ours or the reference's YAML)")
    train.add_argument("config", help="config.yaml (with `prompts_file` or inline `concepts`)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. train.iterations=500 or concepts.*.la_strength=500 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in save.path")
    train.set_defaults(handler=_train)

    push = subparsers.add_parser("push", help="upload a membrane with a generated model card to the Hub")
    push.add_argument("path", help="the membrane .safetensors file")
    push.add_argument("--repo", required=True, help="org/name of the Hub model repo (created if missing)")
    push.add_argument("--report", help="a markdown evaluation report to include in the model card")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.set_defaults(handler=_push)
