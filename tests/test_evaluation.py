"""The evaluation harness end to end on tiny offline models: every task, every condition kind, resume,
the CLI, the eval-unlearn plugin. Metric models are tiny (random CLIP from a config with the real
tokenizer, a small FID feature extractor); NudeNet runs for real."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_DIR, tiny_pipeline
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from diffusers_spm import MembraneController
from diffusers_spm.cli import main
from diffusers_spm.grids import CAPTION_LINES, LINE_HEIGHT, ROW_LABEL_WIDTH
from diffusers_spm.evaluation import (
    IMAGENET_TEMPLATES,
    EvalCondition,
    GenerationSettings,
    PromptJob,
    Sample,
    Task,
    build_conditions,
    build_task,
    evaluate,
    read_prompt_csv,
)
from diffusers_spm.evaluation.metrics import NUDENET_EXPOSED
from reference_spm import random_membrane

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
FAST = dict(size=32, num_inference_steps=2, batch_size=4)


class TinyFeatures(nn.Module):
    """uint8 images -> 8 features: stands in for Inception so FID/KID run offline."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.conv(x.float() / 255).mean((2, 3))


def save_membrane(unet: nn.Module, path: Path, std: float, concepts: list[str]) -> str:
    random_membrane(unet, concepts, seed=1, std=std).save(path)
    return str(path)


def build_assets(root: Path) -> dict[str, str]:
    """Membranes (a no-op and a strong one, both for "cat"), a tiny CLIP folder, a saved tiny pipeline, CSVs.
    Also used by benchmarks/evaluation_two_process.py."""
    pipe = tiny_pipeline(cls=StableDiffusionPipeline)  # saved as a stock checkpoint is
    pipe.save_pretrained(root / "base")
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77),
    ).save_pretrained(root / "clip")
    files = {
        "base": str(root / "base"),
        "clip": str(root / "clip"),
        "zero": save_membrane(pipe.unet, root / "zero.safetensors", 0.0, ["cat"]),
        "strong": save_membrane(pipe.unet, root / "strong.safetensors", 1.0, ["cat"]),
    }
    tables = {
        "artwork": (["case_number", "prompt", "evaluation_seed", "artist"],
                    [[0, "a cat by Van Gogh", 11, "Van Gogh"], [1, "starry night by Van Gogh", 12, "Van Gogh"]]),
        "i2p": (["prompt", "categories", "nudity_percentage", "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height"],
                [["a nude figure", "sexual", 90.0, 3, 7, 32, 32], ["a beach, people", "sexual", 20.0, 4, 6, 32, 32]]),
        "coco": (["image_id", "source", "prompt", "evaluation_seed", "width", "height"],
                 [[i, "coco-30k", p, 100 + i, 36, 34] for i, p in
                  enumerate(["a red bus on a street", "a dog on a sofa", "two people surfing", "a bowl of fruit"])]),
    }
    for name, (header, rows) in tables.items():
        with (root / f"{name}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        files[name] = str(root / f"{name}.csv")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(real / f"{i}.png")
    files["real"] = str(real)
    return files


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def in_range(value: float, low: float, high: float) -> bool:
    return isinstance(value, float) and low <= value <= high


def test_prompt_sets_and_templates(assets: dict[str, str]) -> None:
    assert len(IMAGENET_TEMPLATES) == 80 and all("{}" in t for t in IMAGENET_TEMPLATES)
    coco = read_prompt_csv(assets["coco"])
    assert [j.seed for j in coco] == [100, 101, 102, 103] and coco[0].width == 32 and coco[0].height == 32
    i2p = read_prompt_csv(assets["i2p"], limit=1)
    assert len(i2p) == 1 and i2p[0].guidance_scale == 7.0 and i2p[0].meta["categories"] == "sexual"
    assert len({j.file_name for j in coco}) == len(coco) and coco[1].file_name == "000001_s101.png"
    if (BENCHMARKS / "i2p_benchmark.csv").exists():  # the reference files, where the checkout has them
        jobs = read_prompt_csv(BENCHMARKS / "i2p_benchmark.csv")
        assert len(jobs) == 4703 and all(j.guidance_scale and j.width % 8 == 0 for j in jobs)
        assert len(read_prompt_csv(BENCHMARKS / "nudity_benchmark.csv")) == 854
        assert len(read_prompt_csv(BENCHMARKS / "coco_30k.csv", limit=5)) == 5


def test_i2p_from_the_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub path (online only) with `datasets.load_dataset` stubbed by an in-memory dataset."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": p, "categories": "sexual", "nudity_percentage": n, "sd_seed": i, "sd_guidance_scale": 7,
             "sd_image_width": 512, "sd_image_height": 512} for i, (p, n) in enumerate([("a", 50.0), ("b", 2.0), ("c", 10.0)])]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    assert [j.prompt for j in build_task("nudity").jobs] == ["a", "c"]
    assert [j.seed for j in build_task("i2p", limit=2).jobs] == [0, 1]


def test_general_task_membranes_resume_and_report(pipe, assets: dict[str, str], tmp_path: Path) -> None:
    task = build_task("general", concepts=["cat"], limit=2, images_per_prompt=1, clip_model=assets["clip"], **FAST)
    assert [j.prompt for j in task.jobs] == [t.format("cat") for t in IMAGENET_TEMPLATES[:2]]
    conditions = [EvalCondition("base"), EvalCondition("spm", (assets["zero"],)), EvalCondition("spm", (assets["strong"],)),
                  EvalCondition("spm-no-transport", (assets["strong"],))]
    result = evaluate(pipe, task, conditions, tmp_path)
    assert set(result.results) == {"base", "spm[zero]", "spm[strong]", "spm-no-transport[strong]"}
    assert set(result.generated.values()) == {2}
    for scores in result.results.values():
        assert in_range(scores["clip_score"], 0, 100) and in_range(scores["clip_score_ref"], 0, 2.5)
        assert in_range(scores["clip_accuracy"], 0, 1)
        assert scores["clip_error_rate"] == pytest.approx(1 - scores["clip_accuracy"])
    # A no-op membrane changes nothing; a strong one changes the images and so the score.
    assert result.results["spm[zero]"] == result.results["base"]
    assert result.results["spm[strong]"]["clip_score"] != result.results["base"]["clip_score"]

    images = sorted((tmp_path / "images").rglob("*.png"))
    assert json.loads((tmp_path / "images/spm_strong/generation.json").read_text())["condition"]["kind"] == "spm"
    assert len(images) == 8 and not list((tmp_path / "images").rglob("*.tmp"))
    mtimes = {p: p.stat().st_mtime_ns for p in images}
    again = evaluate(pipe, task, conditions, tmp_path)
    assert set(again.generated.values()) == {0} and again.results == result.results
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    other = build_task("general", concepts=["cat"], limit=2, images_per_prompt=1, clip_model=assets["clip"],
                       **{**FAST, "num_inference_steps": 3})
    with pytest.raises(ValueError, match="num_inference_steps"):  # never mixes images made differently
        evaluate(pipe, other, conditions[:1], tmp_path)

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["task"] == "general" and report["headline"] == "clip_score"
    assert report["results"] == result.results
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["condition"] for r in rows] == list(result.results)
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in result.results)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (ROW_LABEL_WIDTH + 256 * 4, CAPTION_LINES * LINE_HEIGHT + 4 + 256 * 2)
    assert (tmp_path / "headline.png").stat().st_size > 1000


def test_artwork_clip_score_against_prompt_or_concept(pipe, assets: dict[str, str], tmp_path: Path) -> None:
    for concept in ([], ["Van Gogh"]):
        task = build_task("artwork", prompts=assets["artwork"], concepts=concept, images_per_prompt=2,
                          clip_model=assets["clip"], **FAST)
        assert [j.seed for j in task.jobs] == [11, 12, 12, 13] and len({j.file_name for j in task.jobs}) == 4
        result = evaluate(pipe, task, [EvalCondition("base")], tmp_path, report=False)
        assert in_range(result.results["base"]["clip_score"], 0, 100)
        assert result.generated["base"] == (0 if concept else 4)  # the second pass reuses the images
        assert "clip_accuracy" not in result.results["base"]


def test_nudity_tasks_run_nudenet(pipe, assets: dict[str, str], tmp_path: Path) -> None:
    task = build_task("nudity", prompts=assets["i2p"], **FAST)
    i2p = build_task("i2p", prompts=assets["i2p"], **FAST)
    assert i2p.jobs == task.jobs and i2p.headline == task.headline == "nudenet_total"
    assert [j.guidance_scale for j in task.jobs] == [7.0, 6.0]  # the CSV's guidance, per prompt
    result = evaluate(pipe, task, build_conditions([], ["base"]), tmp_path)
    for scores in result.results.values():
        assert set(scores) == {f"nudenet_{c}" for c in NUDENET_EXPOSED} | {"nudenet_total", "nudity_flagged_rate"}
        assert all(in_range(scores[f"nudenet_{c}"], 0, 2) for c in NUDENET_EXPOSED)
        assert scores["nudenet_total"] == sum(scores[f"nudenet_{c}"] for c in NUDENET_EXPOSED)
        assert in_range(scores["nudity_flagged_rate"], 0, 1)


def test_coco_fid_kid_against_base_and_real(pipe, assets: dict[str, str], tmp_path: Path) -> None:
    task = build_task("coco", prompts=assets["coco"], limit=2, clip_model=assets["clip"], fid_feature=TinyFeatures(),
                      real_images=assets["real"], **FAST)
    assert task.headline == "fid_real" and task.jobs[0].width is None  # --size overrides the CSV's sizes
    conditions = [EvalCondition("spm", (assets["zero"],)), EvalCondition("spm-no-transport", (assets["strong"],))]
    result = evaluate(pipe, task, conditions, tmp_path)
    assert list(result.results) == ["base", "spm[zero]", "spm-no-transport[strong]"]  # base added: FID needs it
    for scores in result.results.values():
        assert {"fid_base", "kid_base", "fid_real", "kid_real", "clip_score"} <= set(scores)
        assert scores["fid_base"] >= 0 and scores["fid_real"] >= 0 and in_range(scores["clip_score"], 0, 100)
    assert result.results["base"]["fid_base"] == pytest.approx(0, abs=1e-4)
    assert result.results["spm[zero]"]["fid_base"] == pytest.approx(0, abs=1e-4)
    assert result.results["spm-no-transport[strong]"]["fid_base"] > 1e-2


def test_alteration_transport_lora_and_sld(pipe, assets: dict[str, str], tmp_path: Path) -> None:
    """Unrelated prompts: transport (token overlap) closes the membrane, which fixed gates do not; the same
    file as a plain LoRA acts as the fixed-gate membrane; SLD (its "max" preset: no warm-up) changes them too."""
    task = build_task("alteration", prompts=assets["coco"], limit=1, **FAST)
    conditions = build_conditions([[assets["strong"]]], ["base", "spm", "spm-no-transport", "lora", "sld"],
                                  transport_metric="tokenuni", sld_concept="cat", sld_preset="max")
    result = {k: v["alteration"] for k, v in evaluate(pipe, task, conditions, tmp_path).results.items()}
    assert result["base"] == 0.0 and all(in_range(v, 0, 1) for v in result.values())
    assert result["spm[strong]"] < 1e-3 < result["spm-no-transport[strong]"]
    assert result["lora[strong]"] == pytest.approx(result["spm-no-transport[strong]"], rel=0.01)
    assert result["sld"] > 0
    # Every condition was removed again: the base pipeline still makes the base images.
    assert evaluate(pipe, task, [EvalCondition("base")], tmp_path / "again").results["base"]["alteration"] == 0.0
    assert (np.asarray(Image.open(tmp_path / "again/images/base" / task.jobs[0].file_name)) ==
            np.asarray(Image.open(tmp_path / "images/base" / task.jobs[0].file_name))).all()


def test_custom_task_with_a_judge_metric(pipe, tmp_path: Path) -> None:
    """The plug-in point for a toy world's judge: a `Task` of our own jobs and a `Metric` of our own."""

    class BrightnessJudge:
        name = "judge"

        def __call__(self, sample: Sample) -> dict[str, float]:
            assert [j.meta["concept"] for j in sample.jobs] == ["red", "blue"]
            return {"judge_brightness": float(np.mean([np.asarray(Image.open(p)).mean() / 255 for p in sample.images]))}

    jobs = [PromptJob(index=i, prompt=f"a {c} square", seed=i, meta={"concept": c}) for i, c in enumerate(["red", "blue"])]
    task = Task("world", jobs, [BrightnessJudge()], headline="judge_brightness", goal="a toy judge",
                settings=GenerationSettings(num_inference_steps=2, width=32, height=32, batch_size=2))
    result = evaluate(pipe, task, [EvalCondition("base")], tmp_path)
    assert in_range(result.results["base"]["judge_brightness"], 0, 1)
    assert "| base |" in (tmp_path / "summary.md").read_text()


def test_conditions_remove_only_their_own_adapters(assets: dict[str, str]) -> None:
    pipe = tiny_pipeline()
    pipe.load_spm(assets["zero"], adapter_name="mine")
    pipe.set_spm_transport(True, metric="tokenuni", power=1.0)
    pipe.load_lora_weights(assets["zero"], adapter_name="my_lora")
    for condition in build_conditions([[assets["strong"]]], ["spm", "lora"]):
        with condition.applied(pipe) as (applied, _):
            assert applied is pipe
    assert pipe.get_active_spms() == ["mine"] and pipe.get_list_adapters()["unet"] == ["my_lora"]
    transport = MembraneController.of(pipe.unet).transport
    assert (transport.enabled, transport.metric, transport.power) == (True, "tokenuni", 1.0)
    # With no LoRA of the caller's left, the LoRA condition also unwraps the layers it wrapped.
    pipe.delete_adapters(["my_lora"])
    with build_conditions([[assets["strong"]]], ["lora"])[0].applied(pipe):
        pass
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())


def test_cli_end_to_end(assets: dict[str, str], tmp_path: Path) -> None:
    argv = ["evaluate", "--task", "general", "--base", assets["base"], "--spm", assets["strong"],
            "--output", str(tmp_path), "--concept", "cat", "--clip-model", assets["clip"], "--limit", "2",
            "--images-per-prompt", "1", "--size", "32", "--steps", "2", "--device", "cpu", "--batch-size", "2",
            "--compare", "base", "spm"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["results"]) == ["base", "spm[strong]"]
    assert report["settings"]["batch_size"] == 2 and report["num_images_per_condition"] == 2
    assert main([*argv, "--task", "coco"]) == 2  # coco needs --prompts: a clear error, not a traceback


def test_eval_unlearn_lists_and_runs_the_spm_technique(assets: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("eval_unlearn")
    from importlib.metadata import entry_points

    from eval_unlearn.registry import get_technique, register_metric
    from eval_unlearn.registry.entrypoints import load_entrypoints
    from eval_unlearn.runners.single_benchmark_runner import SingleBenchmarkRunner
    from eval_unlearn.types import Dataset, MetricResult

    from diffusers_spm.evaluation.eval_unlearn import SPMTechnique

    assert "spm" in {ep.name for ep in entry_points(group="eval_unlearn.techniques")}
    load_entrypoints()
    assert get_technique("spm") is SPMTechnique

    seen: list = []

    @register_metric("spm_test_images")
    class CountImages:
        def __init__(self, **config):
            pass

        def load_dataset(self):
            return [Dataset(["a cat", "a dog"], {"source": "test"}), Dataset(["a cat in a hat"], {"source": "test"})]

        def update(self, images, prompts, metadata):
            seen.extend(images)

        def compute(self):
            return MetricResult("images", float(len(seen)))

    config = {"model_id": assets["base"], "membranes": [assets["strong"]], "device": "cpu",
              "num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 2}
    report = SingleBenchmarkRunner("spm", "spm_test_images", technique_config=config, output_dir=str(tmp_path),
                                   seed=7).run()
    assert report["metric_result"]["value"] == 3.0
    assert [image.size for image in seen] == [(32, 32)] * 3
    # Deterministic: prompt i gets seed + i whatever the batching (up to rounding in the last bit).
    again = SPMTechnique(**{**config, "batch_size": 1}).generate(["a cat"], seed=7)
    assert np.abs(np.asarray(again[0], dtype=int) - np.asarray(seen[0], dtype=int)).max() <= 2
