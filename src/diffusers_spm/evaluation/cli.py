"""`diffusers-spm evaluate`: the paper's evaluation protocol in one command (see docs/evaluation.md).

Data-parallel under `accelerate launch -m diffusers_spm.cli evaluate ...` (on CPU-only machines:
`accelerate launch --multi_gpu --num_processes N -m diffusers_spm.cli evaluate ... --device cpu`).
"""

from __future__ import annotations

import argparse
import logging

from ..bases import BASE_HELP, load_base_pipeline, resolve_base
from ..transport import METRICS, TransportConfig
from ..utils import DTYPES
from .conditions import COMPARE_CHOICES, SLD_PRESETS, build_conditions
from .generation import process_state
from .runner import evaluate
from .tasks import TASKS, build_task

logger = logging.getLogger(__name__)


def _evaluate(args: argparse.Namespace) -> int:
    # Built first, so that `--device cpu` makes CPU workers one data-parallel group.
    state = process_state(args.device)
    device = args.device or str(state.device)
    resolve_base(args.base)  # a bad --base fails before the task loads its models
    task = build_task(
        args.task,
        prompts=args.prompts,
        concepts=args.concept,
        limit=args.limit,
        clip_model=args.clip_model,
        fid_feature=args.fid_feature,
        real_images=args.real_images,
        images_per_prompt=args.images_per_prompt,
        num_templates=args.num_templates,
        size=args.size,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        device=device,
    )
    conditions = build_conditions(
        [s.split(",") for s in args.spm],
        compare=args.compare,
        scale=args.scale,
        transport_metric=args.metric,
        power=args.power,
        sld_concept=args.sld_concept or (", ".join(args.concept) if args.concept else None),
        sld_preset=args.sld_preset,
        needs_base=task.needs_base,
    )
    pipe = load_base_pipeline(args.base, args.dtype, device)
    result = evaluate(pipe, task, conditions, args.output, grid_prompts=args.grid_prompts)
    for condition, scores in result.results.items():
        logger.info("%-32s %s = %.4f", condition, task.headline, scores.get(task.headline, float("nan")))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="the paper's evaluation protocol: base vs membranes (vs LoRA, SLD), with a report",
        description=__doc__,
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--base", required=True, help=BASE_HELP)
    parser.add_argument("--spm", action="append", default=[],
                        help="a membrane set: path, Hub id or short name; comma-join several for one set (repeatable)")
    parser.add_argument("--output", required=True, help="folder for images and the report")
    parser.add_argument("--prompts", help="prompt CSV (artwork, nudity, i2p, coco, alteration); "
                                          "nudity / i2p read the Hub dataset without it")
    parser.add_argument("--concept", action="append", default=[],
                        help="concept name (general: repeatable; artwork: CLIP text; SLD's safety concept)")
    parser.add_argument("--clip-model", default="openai/clip-vit-base-patch32",
                        help="CLIP for CLIP score: Hub id or local folder (the reference uses ViT-B/32)")
    parser.add_argument("--limit", type=int, help="at most N prompts (per concept for general): a quick look")
    parser.add_argument("--compare", nargs="+", default=["base", "spm", "spm-no-transport"], choices=COMPARE_CHOICES,
                        help="conditions to compare (default: base spm spm-no-transport)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--device", help="default: this process's accelerate device")
    parser.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (reference: 30)")
    parser.add_argument("--size", type=int, help="image size for every prompt (default: 512, or the CSV's size)")
    parser.add_argument("--images-per-prompt", type=int,
                        help="seeds per prompt (default: general 10, artwork 20, others 1, as the reference)")
    parser.add_argument("--num-templates", type=int, default=80, help="general: ImageNet templates per concept")
    parser.add_argument("--real-images", help="coco: folder of real images for FID/KID against real data")
    parser.add_argument("--fid-feature", type=int, default=2048, choices=(64, 192, 768, 2048),
                        help="Inception feature layer for FID/KID (needs torch-fidelity)")
    parser.add_argument("--scale", type=float, default=1.0, help="membrane / LoRA scale")
    parser.add_argument("--metric", default=TransportConfig.metric, choices=METRICS,
                        help="Facilitated Transport rate")
    parser.add_argument("--power", type=float, default=TransportConfig.power, help="transport gate = rate ** power")
    parser.add_argument("--sld-concept", help="SLD's safety concept (default: the --concept names, else SLD's own)")
    parser.add_argument("--sld-preset", default="strong", choices=tuple(SLD_PRESETS),
                        help="SLD configuration (the reference evaluates strong)")
    parser.add_argument("--grid-prompts", type=int, default=4, help="prompts in the report's image grid")
    parser.set_defaults(handler=_evaluate)
