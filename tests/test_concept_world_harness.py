"""The evaluation harness reproduces the concept world's erasure and preservation figures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffusers_spm import add_spm_support
from diffusers_spm.grids import CAPTION_LINES, LINE_HEIGHT, ROW_LABEL_WIDTH
from diffusers_spm.concept_world import (
    ConceptWorld,
    WorldEvaluation,
    evaluate_concepts,
    load_concept_world_pipeline,
    load_judge,
)
from diffusers_spm.concept_world.harness import concept_world_task
from diffusers_spm.concept_world.model import weights_available
from diffusers_spm.evaluation.conditions import EvalCondition
from diffusers_spm.evaluation.runner import evaluate
from reference_spm import random_membrane

pytestmark = pytest.mark.skipif(not weights_available(), reason="the concept-world weights are not shipped")
COUNTS = WorldEvaluation(prompts_per_concept=3, seeds_per_prompt=2, preserve_prompts_per_concept=1, num_inference_steps=8)


def test_harness_reproduces_the_world_figures(tmp_path):
    pipe = add_spm_support(load_concept_world_pipeline())
    judge, world = load_judge(), ConceptWorld()
    membrane = random_membrane(pipe.unet, ["red"], seed=0, std=0.3)
    membrane.save(tmp_path / "red.safetensors")

    direct = {"base": evaluate_concepts(pipe, judge, world, ["red"], evaluation=COUNTS)}
    pipe.load_spm(tmp_path / "red.safetensors")
    direct["spm"] = evaluate_concepts(pipe, judge, world, ["red"], evaluation=COUNTS)
    pipe.unload_spm()

    task = concept_world_task(judge, world, ["red"], COUNTS)
    spm = EvalCondition("spm", (str(tmp_path / "red.safetensors"),))
    result = evaluate(pipe, task, [EvalCondition("base"), spm], tmp_path / "eval")
    assert len(task.jobs) == 6 + 14
    for name, condition in (("base", "base"), ("spm", spm.name)):
        scores = result.results[condition]
        # PNG storage rounds pixels to 1/255; allow one image of the 6 or 14 to flip.
        assert scores["erasure"] == pytest.approx(direct[name].erasure, abs=1 / 6 + 1e-9)
        assert scores["preservation"] == pytest.approx(direct[name].preservation, abs=1 / 14 + 1e-9)
    assert direct["spm"].preservation != direct["base"].preservation or direct["spm"].erasure != direct["base"].erasure


def test_demo_with_the_shipped_membrane_writes_table_and_grid(tmp_path):
    from diffusers_spm.concept_world.demo import run_demo

    quick = WorldEvaluation(prompts_per_concept=2, seeds_per_prompt=1, preserve_prompts_per_concept=1, num_inference_steps=8)
    files = run_demo(tmp_path, "red", train=False, evaluation=quick)
    results = json.loads(files["json"].read_text())["Erasing red"]["rows"]
    reference_rate = "SPM, LA + transport (clipcos_tokenuni, the reference's rate)"
    assert set(results) == {"no membrane", reference_rate, "SPM, LA + transport (tokensim)"}
    assert results["SPM, LA + transport (tokensim)"]["erasure"] > results["no membrane"]["erasure"]
    assert files["grid"].exists() and Image.open(files["grid"]).size == (
        ROW_LABEL_WIDTH + 8 * 96, CAPTION_LINES * LINE_HEIGHT + 4 + 2 * 96)
    with pytest.raises(KeyError, match="not a concept of this world"):
        run_demo(tmp_path, "magenta", train=False)
