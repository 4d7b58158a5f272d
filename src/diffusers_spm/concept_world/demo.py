"""`diffusers-spm demo`: erase one concept of the embedded concept world, offline, and measure it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .experiments import MEMBRANES_DIR, Condition, WorldTraining, compare, train_world_membrane, write_grid, write_report
from .metrics import WorldEvaluation, concept_cases, generate_images
from .model import load_concept_world_pipeline
from .world import ConceptWorld

logger = logging.getLogger(__name__)

DEFAULT_CONCEPT = "red"  # colours are what the shipped world draws most reliably (94 %)


def run_demo(output: Path, concept: str = DEFAULT_CONCEPT, train: bool = True,
             settings: WorldTraining = WorldTraining(),
             evaluation: WorldEvaluation = WorldEvaluation()) -> dict[str, Path]:
    """Train (or take the shipped) membrane for `concept`, then write the table and the grid.

    `evaluation` sets the measured images (prompt counts, steps), e.g. to make a quick run.
    """
    from . import load_judge

    world = ConceptWorld()
    world.concept(concept)  # a clear error for a concept the world does not have
    pipe = load_concept_world_pipeline()
    if train:
        membrane = train_world_membrane(pipe, concept, output, settings=settings)
    else:
        membrane = MEMBRANES_DIR / f"{concept}.safetensors"
        if not membrane.exists():
            known = sorted(p.stem for p in MEMBRANES_DIR.glob("*.safetensors"))
            raise FileNotFoundError(f"No shipped membrane for {concept!r}; shipped: {', '.join(known)}. Drop --no-train.")
    comparison = compare(pipe, load_judge(), world, [concept],
                         [Condition("no membrane"), Condition("SPM (LA + transport)", [membrane])], evaluation)
    json_path, md_path = write_report({f"Erasing {concept}": comparison}, output)

    cases = concept_cases(world, [concept], prompts_per_concept=4, seeds_per_prompt=2, seed=7)
    prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]
    before = generate_images(pipe, prompts, seeds)
    pipe.load_spm(membrane)
    after = generate_images(pipe, prompts, seeds)
    pipe.unload_spm()
    grid = write_grid([("no membrane", before), ("with membrane", after)], output / f"grid_{concept}.png")
    logger.info("\n%s", comparison.markdown())
    logger.info("membrane: %s\ntable: %s and %s\ngrid (top: no membrane, bottom: with it): %s",
                membrane, md_path, json_path, grid)
    return {"membrane": Path(membrane), "table": md_path, "json": json_path, "grid": grid}


def _demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.output), args.concept, train=not args.no_train)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="erase a concept of the embedded concept world, offline")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--concept", default=DEFAULT_CONCEPT, help="a shape, colour or texture of the world")
    parser.add_argument("--no-train", action="store_true", help="use the shipped pre-trained membrane")
    parser.set_defaults(handler=_demo)
