"""`diffusers-spm demo`: erase one concept of the embedded concept world, offline, and measure it.

`--family sd3` runs it on the DiT world (flow matching) instead of the UNet one."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from .experiments import (
    Condition,
    WorldTraining,
    before_after_grid,
    compare,
    train_world_membrane,
    world_training,
    write_report,
)
from .metrics import WorldEvaluation
from .model import WORLDS, load_concept_world_pipeline, world_model
from .world import ConceptWorld

logger = logging.getLogger(__name__)

DEFAULT_CONCEPT = "red"
DEMO_METRIC = "tokensim"  # the rate that separates synonyms from other concepts on the world (docs/transport.md)
DEMO_EVALUATION = WorldEvaluation(prompts_per_concept=16, seeds_per_prompt=2, preserve_prompts_per_concept=8)


def run_demo(output: Path, concept: str = DEFAULT_CONCEPT, train: bool = True,
             settings: WorldTraining | None = None, evaluation: WorldEvaluation | None = None,
             family: str = "unet") -> dict[str, Path]:
    """Train (or take the shipped) membrane for `concept` on `family`'s world, then write the table and the grid.

    `settings` default to the family's (`FAMILY_TRAINING`). `evaluation` sets the measured images
    (prompt counts, steps), e.g. to make a quick run; the default is the table benchmark's (32 target
    images, since 16 move erasure by 6 points each) at the world's own guidance scale.
    """
    from . import load_judge

    model = world_model(family)
    world = ConceptWorld()
    world.concept(concept)  # a clear error for a concept the world does not have
    membrane = model.membranes_dir / f"{concept}.safetensors"
    if not train and not membrane.exists():
        known = sorted(p.stem for p in model.membranes_dir.glob("*.safetensors"))
        raise FileNotFoundError(f"No shipped {model.name} membrane for {concept!r}; shipped: "
                                f"{', '.join(known) or 'none'}. Drop --no-train.")
    evaluation = evaluation or model.evaluation(DEMO_EVALUATION)
    pipe = load_concept_world_pipeline(family=family)
    if train:
        membrane = train_world_membrane(pipe, concept, output, settings=settings or world_training(family))
    comparison = compare(pipe, load_judge(), world, [concept], [
        Condition("no membrane"),
        Condition("SPM, LA + transport (clipcos_tokenuni, the reference's rate)", [membrane]),
        Condition(f"SPM, LA + transport ({DEMO_METRIC})", [membrane], metric=DEMO_METRIC),
    ], evaluation)
    json_path, md_path = write_report({f"Erasing {concept}": comparison}, output)

    grid = before_after_grid(pipe, world, [concept], [membrane], output / f"grid_{concept}.png", metric=DEMO_METRIC,
                             sampler=evaluation)
    logger.info("\n%s", comparison.markdown())
    logger.info("membrane: %s\ntable: %s and %s\ngrid (top: no membrane, bottom: with it, %s transport): %s",
                membrane, md_path, json_path, DEMO_METRIC, grid)
    return {"membrane": Path(membrane), "table": md_path, "json": json_path, "grid": grid}


def _demo(args: argparse.Namespace) -> int:
    settings = replace(world_training(args.family), seed=args.seed)
    run_demo(Path(args.output), args.concept, train=not args.no_train, settings=settings, family=args.family)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="erase a concept of the embedded concept world, offline")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--concept", default=DEFAULT_CONCEPT, help="a shape, colour or texture of the world")
    parser.add_argument("--no-train", action="store_true", help="use the shipped pre-trained membrane")
    parser.add_argument("--seed", type=int, default=WorldTraining.seed,
                        help="the training seed: run several to see how much erasing varies between trainings")
    parser.add_argument("--family", choices=tuple(WORLDS), default="unet",
                        help="which world: `unet` (SD 1.x-shaped) or `sd3` (a diffusion transformer, flow matching)")
    parser.set_defaults(handler=_demo)
