"""The trainer's own objective on fresh draws, beside the judge's erasure, for a world's trained membranes.

Where a concept erases on one training seed and not on another, is the weak seed one whose training
got less far by the trainer's own measure (a data-free signal, which a trainer could act on), or is
the objective blind to the difference? For each membrane that `concept_world_table.py` trained and
evaluated, this rebuilds the trainer from the membrane's own training config, puts the trained
weights in, and averages the erase and anchor losses over `--draws` iterations' draws (partial
denoising, timestep, anchors) of a seed no run trained with, without a step; the same draws with the
membrane at zero give the starting erase loss. It prints one row per membrane with the judge's
erasure (transport `tokensim`) from the tables.

    python benchmarks/membrane_objective.py --family sd3 [--draws 40] [--jobs REGEX]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from concept_world_table import SEEDS, Plan, make_plan, membrane, tokensim_rows  # noqa: E402
from diffusers_spm.concept_world import WORLDS, load_concept_world_pipeline, world_model  # noqa: E402
from diffusers_spm.families import denoiser_of, family_of  # noqa: E402
from diffusers_spm.layers import bank_of  # noqa: E402
from diffusers_spm.membrane import Membrane  # noqa: E402
from diffusers_spm.training import TrainingConfig  # noqa: E402
from diffusers_spm.training.trainer import MembraneTrainer  # noqa: E402

VALIDATION_SEED = 10_000  # no training run draws with it


def judged_erasure(plan: Plan, tables: Path, variant: str, concept: str, seed: int) -> float | None:
    """The judge's erasure of the membrane with transport tokensim, if its table is written."""
    rows = tokensim_rows(plan, variant, concept)
    if rows is None or not (path := tables / f"{rows[0]}.json").exists():
        return None
    label = rows[1]
    row = json.loads(path.read_text())["rows"].get(f"{label} | seed {seed}")
    return None if row is None else row["erasure"]


@torch.no_grad()
def objective(pipe, path: Path, draws: int) -> dict[str, float]:
    """Mean erase and anchor losses of the membrane at `path` over `draws` validation draws, and the
    erase loss of the same draws with the membrane at zero (where training starts)."""
    denoiser = denoiser_of(pipe)
    trained = family_of(denoiser).to_runtime_names(Membrane.from_file(path), denoiser)
    config = TrainingConfig.model_validate(trained.training_config)
    config = config.model_copy(update={"train": config.train.model_copy(update={"seed": VALIDATION_SEED})})
    trainer = MembraneTrainer(config, pipe, list(config.concepts), torch.device("cpu"))
    try:
        banks = {name: bank_of(base) for name, (_, base) in trainer.controller.targets.items()}
        terms: dict[str, list[float]] = {"erase": [], "anchor": [], "erase at zero": []}
        for _ in range(draws):
            for name, bank in banks.items():
                bank.down.copy_(trained.modules[name].down)
                bank.up.copy_(trained.modules[name].up)
            trainer.controller.weights_changed()
            plan, latents = trainer.next_plan()  # denoised with the trained membrane on, as at training's end
            losses = trainer.forward_backward(plan, latents, backward=False)
            terms["erase"].append(float(losses["erase"]))
            terms["anchor"].append(float(losses.get("anchor", torch.tensor(0.0))))
            for bank in banks.values():
                bank.up.zero_()
            trainer.controller.weights_changed()
            terms["erase at zero"].append(float(trainer.forward_backward(plan, latents, backward=False)["erase"]))
        return {k: statistics.fmean(v) for k, v in terms.items()}
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(WORLDS), default="sd3")
    parser.add_argument("--output", help="default: outputs/<the world's folder name>, as concept_world_table.py")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--jobs", default="", help="only the membranes ('variant/concept_sSEED') matching this regex")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    plan = make_plan(args.family)
    output = Path(args.output or Path("outputs") / world_model(args.family).directory.name)
    pipe = load_concept_world_pipeline(family=args.family)
    print(f"| membrane | erase loss / at zero | anchor loss | judge's erasure (tokensim) |\n|---|---|---|---|")
    for variant, concept, seed in plan.train_jobs:
        path = membrane(output, variant, concept, seed)
        if seed not in SEEDS or not path.exists() or not re.search(args.jobs, f"{variant}/{concept}_s{seed}"):
            continue
        measured = objective(pipe, path, args.draws)
        judged = judged_erasure(plan, output / "tables", variant, concept, seed)
        print(f"| {variant}/{concept}_s{seed} | {measured['erase']:.4f} / {measured['erase at zero']:.4f} "
              f"({measured['erase'] / measured['erase at zero']:.3f}) | {measured['anchor']:.5f} | "
              f"{'' if judged is None else f'{judged:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
