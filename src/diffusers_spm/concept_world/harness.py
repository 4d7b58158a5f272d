"""The concept world as a task of the evaluation harness (`diffusers_spm.evaluation`).

The prompts, seeds and judge are those of `metrics.evaluate_concepts`, so `evaluate(...)` on this
task reproduces the world's erasure and preservation figures through the harness's own
generation (resumable, data-parallel) and reports.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..evaluation.generation import GenerationSettings
from ..evaluation.metrics import Sample
from ..evaluation.prompts import PromptJob
from ..evaluation.tasks import Task
from .judge import Judge
from .metrics import WorldEvaluation, evaluation_cases, judged_hits
from .world import ConceptWorld

ERASE, KEEP = "erase", "keep"


class JudgeMetric:
    """Erasure (jobs naming an erased concept that the judge no longer sees) and preservation
    (the other jobs whose concept the judge still sees), read from the harness's saved images."""

    name = "judge"

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def __call__(self, sample: Sample) -> dict[str, float]:
        images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in sample.images])
        hits = judged_hits(self.judge, images, [job.meta["case"] for job in sample.jobs])
        erase = np.array([job.meta["role"] == ERASE for job in sample.jobs])
        return {"erasure": float((~hits[erase]).mean()), "preservation": float(hits[~erase].mean())}


def concept_world_task(
    judge: Judge,
    world: ConceptWorld,
    erased: Sequence[str],
    evaluation: WorldEvaluation = WorldEvaluation(),
    batch_size: int = 64,
) -> Task:
    """The same cases as `evaluate_concepts(..., erased, evaluation=evaluation)`."""
    erase, keep = evaluation_cases(world, erased, evaluation)
    cases = [(c, ERASE) for c in erase] + [(c, KEEP) for c in keep]
    jobs = [PromptJob(i, case.prompt, case.seed, meta={"case": case, "role": role}) for i, (case, role) in enumerate(cases)]
    size = world.image_size
    settings = GenerationSettings(num_inference_steps=evaluation.num_inference_steps,
                                  guidance_scale=evaluation.guidance_scale, width=size, height=size,
                                  batch_size=batch_size)
    return Task(name="concept-world", jobs=jobs, metrics=[JudgeMetric(judge)], headline="erasure",
                goal="erasure: higher is better; preservation: higher is better", settings=settings,
                notes={"erased": ", ".join(erased)})
