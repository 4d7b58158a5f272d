"""The concept-world figures: conditions, transport metrics, several concepts at once, la_strength.

Trains the membranes with the real trainer on the shipped concept-world model, then measures
erasure / preservation / alteration with its judge (docs/concept-world.md). Everything runs
offline on the CPU; the default run takes about 15 minutes on 2 cores.

    python benchmarks/concept_world_table.py --output outputs/concept_world [--concepts red blue green]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_spm.concept_world import ConceptWorld, load_concept_world_pipeline, load_judge
from diffusers_spm.concept_world.experiments import (
    Condition,
    WorldTraining,
    compare,
    train_world_membrane,
    write_report,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/concept_world")
    parser.add_argument("--concepts", nargs="+", default=["red", "blue", "green"],
                        help="the first is the single target; all are erased together in the multi-concept table")
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
    evaluation = dict(prompts_per_concept=8, seeds_per_prompt=2, preserve_prompts_per_concept=4)

    erase_only = train_world_membrane(pipe, target, output, action="erase", settings=settings)
    anchored = train_world_membrane(pipe, target, output, settings=settings)
    tables = {
        f"Erasing {target}": compare(pipe, judge, world, [target], [
            Condition("no membrane"),
            Condition("plain LoRA, no transport (load_lora_weights, erase only)", [erase_only], as_lora=True),
            Condition("SPM without LA, transport", [erase_only]),
            Condition("SPM with LA, no transport", [anchored], transport=False),
            Condition("SPM with LA + transport", [anchored]),
        ], **evaluation),
        f"Transport metrics (SPM with LA, erasing {target})": compare(pipe, judge, world, [target], [
            Condition(f"{metric}, power {power:g}", [anchored], metric=metric, power=power)
            for metric in ("clipcos", "tokenuni", "clipcos_tokenuni") for power in (1.0, 2.0)
        ], **evaluation),
    }
    sweep = []
    for strength in args.la_strengths:
        file = train_world_membrane(pipe, target, output / f"la_{strength:g}", settings=replace(settings, la_strength=strength))
        sweep.append(Condition(f"la_strength {strength:g}", [file]))
    tables[f"la_strength sweep ({settings.iterations} iterations, lr {settings.lr:g}, erasing {target})"] = compare(
        pipe, judge, world, [target], sweep, **evaluation)

    files = [anchored] + [train_world_membrane(pipe, c, output, settings=settings) for c in args.concepts[1:]]
    for count in range(1, len(files) + 1):
        erased = args.concepts[:count]
        tables[f"{count} concept(s) at once: {', '.join(erased)}"] = compare(pipe, judge, world, erased, [
            Condition("no membrane"), Condition("SPM with LA + transport", files[:count]),
        ], **evaluation)
    json_path, md_path = write_report(tables, output)
    logging.info("wrote %s and %s\n%s", md_path, json_path, md_path.read_text())


if __name__ == "__main__":
    main()
