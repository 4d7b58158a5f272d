"""The command line as a new user meets it: `--base concept-world`, the shipped world as a diffusers
folder, and bad input answered with one line and exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from diffusers_spm.bases import BaseModelError, from_pretrained
from diffusers_spm.cli import main
from diffusers_spm.concept_world.experiments import MEMBRANES_DIR
from diffusers_spm.concept_world.metrics import generate_images
from diffusers_spm.concept_world.model import WEIGHTS_DIR, load_concept_world_pipeline
from diffusers_spm.hub import registry
from reference_spm import random_membrane

RED = str(MEMBRANES_DIR / "red.safetensors")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_world_is_a_diffusers_folder_with_unchanged_outputs() -> None:
    standard = DiffusionPipeline.from_pretrained(WEIGHTS_DIR, torch_dtype=torch.float32)
    standard.set_progress_bar_config(disable=True)
    assert type(standard).__name__ == "StableDiffusionPipeline" and standard.tokenizer.model_max_length == 77
    prompts, seeds = ["a red circle", "a striped blue star"], [0, 1]
    ours = generate_images(load_concept_world_pipeline(), prompts, seeds, num_inference_steps=3)
    assert np.array_equal(generate_images(standard, prompts, seeds, num_inference_steps=3), ours)
    assert np.array_equal(generate_images(from_pretrained("concept-world", torch_dtype=torch.float32), prompts, seeds, num_inference_steps=3), ours)


def test_generate_on_the_shipped_world_with_its_membrane(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "--base", "concept-world", "--spm", RED, "--prompt", "a crimson star",
                           "--steps", "2", "--device", "cpu", "--output", str(tmp_path))
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["0000_0_0.png"]
    code, _, err = run_cli(capsys, "generate", "--base", str(WEIGHTS_DIR), "--prompt", "a star", "--steps", "1",
                           "--device", "cpu", "--output", str(tmp_path / "folder"))
    assert code == 0, err


def not_a_membrane(tmp_path: Path) -> str:
    path = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(path))
    return str(path)


def wrong_family(tmp_path: Path) -> str:
    """A membrane for the tests' tiny UNet, whose layers the concept world does not have."""
    from conftest import tiny_pipeline

    return str(random_membrane(tiny_pipeline().unet, ["x"], seed=0).save(tmp_path / "tiny.safetensors"))


@pytest.mark.parametrize("case, argv, message", [
    ("missing folder", lambda t: ["generate", "--base", str(t / "nowhere"), "--prompt", "p"], "No folder"),
    ("not a pipeline", lambda t: ["generate", "--base", str(t), "--prompt", "p"], "not a diffusers pipeline (no model_index.json)"),
    ("a file", lambda t: ["generate", "--base", not_a_membrane(t), "--prompt", "p"], "is a file; a base model is"),
    ("offline, not cached", lambda t: ["generate", "--base", "org/not-cached", "--prompt", "p"],
     "Cannot load the base model 'org/not-cached'"),
    ("not a membrane", lambda t: ["generate", "--base", "concept-world", "--spm", not_a_membrane(t), "--prompt", "p"],
     "not a LoRA or SPM membrane"),
    ("wrong family", lambda t: ["generate", "--base", "concept-world", "--spm", wrong_family(t), "--prompt", "p"],
     "does not fit this UNet"),
    ("registry offline", lambda t: ["generate", "--base", "concept-world", "--spm", "nudity", "--prompt", "p"],
     "'nudity' is not cached and HF_HUB_OFFLINE=1"),
    ("convert: missing input", lambda t: ["convert", str(t / "none.safetensors"), str(t / "o.safetensors"), "--to",
                                          "reference"], "No membrane file"),
    ("convert: bad base", lambda t: ["convert", RED, str(t / "o.safetensors"), "--to", "diffusers", "--base", str(t)],
     "not a diffusers pipeline"),
    ("evaluate: bad base", lambda t: ["evaluate", "--task", "general", "--base", str(t), "--spm", RED, "--concept", "red",
                                      "--output", str(t / "out"), "--clip-model", str(t)], "not a diffusers pipeline"),
    ("train: missing config", lambda t: ["train", str(t / "none.yaml")], "none.yaml"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path: Path, case: str, argv, message: str) -> None:
    command = argv(tmp_path)
    code, out, err = run_cli(capsys, *command)
    last = err.strip().splitlines()[-1]
    assert code == 2, (case, err)
    assert last.startswith(f"diffusers-spm {command[0]}: error: ") and message in last, (case, last)
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="not a diffusers pipeline"):
        main(["generate", "--base", str(tmp_path), "--prompt", "p", "--debug"])
    with pytest.raises(BaseModelError):
        main(["--debug", "generate", "--base", str(tmp_path), "--prompt", "p"])


def test_list_prints_the_registry(capsys, tmp_path: Path) -> None:
    entry = registry()["nudity"]
    snapshot = tmp_path / f"models--gdrive--{entry.drive_id}" / "snapshots" / entry.drive_id
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(entry.drive_id)
    (snapshot / entry.filename).write_bytes(b"cached")
    code, out, _ = run_cli(capsys, "list", "--cache-dir", str(tmp_path))
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split() == ["name", "concepts", "base", "model", "source", "cached"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(registry()) and len(rows) == 15
    assert rows["nudity"].split()[-1] == "drive" and rows["snoopy"].split()[-1] == "no"
    assert f"hub:{entry.repo_id}/{entry.filename} drive:{entry.drive_id}" in rows["nudity"]
    assert "CompVis/stable-diffusion-v1-4" in rows["van_gogh"]
