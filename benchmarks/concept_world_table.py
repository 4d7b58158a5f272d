"""The concept-world figures: conditions, transport metrics, several concepts at once, la_strength.

Trains the membranes with the real trainer on the shipped concept-world model, then measures
erasure / preservation / alteration with its judge (docs/concept-world.md), and writes a
before/after grid per concept (`grid_<concept>.png`, tokensim transport). Everything runs
offline on the CPU; the default run takes about 25 minutes on one core.

    python benchmarks/concept_world_table.py --output outputs/concept_world [--concepts red blue green]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_spm.concept_world import ConceptWorld, WorldEvaluation, load_concept_world_pipeline, load_judge
from diffusers_spm.concept_world.experiments import (
    Condition,
    WorldTraining,
    before_after_grid,
    compare,
    train_world_membrane,
    write_report,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/concept_world")
    parser.add_argument("--concepts", nargs="+", default=["red", "blue", "green", "circle", "striped", "star"],
                        help="the first is the single target; the first 1, 3 and all are erased together")
    parser.add_argument("--la-strengths", type=float, nargs="+", default=[0.0, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--iterations", type=int, default=WorldTraining.iterations)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    output = Path(args.output)
    world, judge, pipe = ConceptWorld(), load_judge(), load_concept_world_pipeline()
    settings = replace(WorldTraining(), iterations=args.iterations)
    target = args.concepts[0]
    evaluation = WorldEvaluation(prompts_per_concept=16, seeds_per_prompt=2, preserve_prompts_per_concept=8)

    erase_only = train_world_membrane(pipe, target, output, action="erase", settings=settings)
    anchored = train_world_membrane(pipe, target, output, settings=settings)
    tables = {
        f"Erasing {target}": compare(pipe, judge, world, [target], [
            Condition("no membrane"),
            Condition("plain LoRA, no transport (load_lora_weights, erase only)", [erase_only], as_lora=True),
            Condition("SPM without LA, transport", [erase_only]),
            Condition("SPM with LA, no transport", [anchored], transport=False),
            Condition("SPM with LA + transport (clipcos_tokenuni, the reference's)", [anchored]),
            Condition("SPM with LA + transport (tokensim)", [anchored], metric="tokensim"),
        ], evaluation),
        f"Transport metrics (SPM with LA, erasing {target})": compare(pipe, judge, world, [target], [
            Condition(f"{metric}, power {power:g}", [anchored], metric=metric, power=power)
            for metric in ("clipcos", "tokenuni", "clipcos_tokenuni", "eoscos_tokenuni", "tokensim") for power in (1.0, 2.0)
        ], evaluation),
    }
    sweep = []
    for strength in args.la_strengths:
        file = train_world_membrane(pipe, target, output / f"la_{strength:g}", settings=replace(settings, la_strength=strength))
        sweep.append(Condition(f"la_strength {strength:g}", [file]))
    tables[f"la_strength sweep ({settings.iterations} iterations, lr {settings.lr:g}, erasing {target})"] = compare(
        pipe, judge, world, [target], sweep, evaluation)

    files = [anchored] + [train_world_membrane(pipe, c, output, settings=settings) for c in args.concepts[1:]]
    for count in sorted({1, min(3, len(files)), len(files)}):
        erased = args.concepts[:count]
        tables[f"{count} concept(s) at once: {', '.join(erased)}"] = compare(pipe, judge, world, erased, [
            Condition("no membrane"),
            Condition("SPM with LA + transport (clipcos_tokenuni)", files[:count]),
            Condition("SPM with LA + transport (tokensim)", files[:count], metric="tokensim"),
        ], evaluation)
    for concept, file in zip(args.concepts, files):
        before_after_grid(pipe, world, [concept], [file], output / f"grid_{concept}.png")
    json_path, md_path = write_report(tables, output)
    logging.info("wrote %s and %s\n%s", md_path, json_path, md_path.read_text())


if __name__ == "__main__":
    main()
