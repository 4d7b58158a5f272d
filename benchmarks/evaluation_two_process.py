"""Two processes under `accelerate launch` on CPU give the same images and scores as one.

    .venv/bin/python benchmarks/evaluation_two_process.py [--keep DIR]

Builds the tiny offline assets of tests/test_evaluation.py, runs `diffusers-spm evaluate` once
plainly and once under `accelerate launch --multi_gpu --num_processes 2 ... --device cpu` (accelerate's
`--cpu` flag starts one process), checks that the work was split, then compares every image
byte for byte and every score. Too slow for the unit tests on a shared 2-core CPU (two extra
interpreters and a gloo process group), so it lives here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_evaluation import build_assets  # noqa: E402


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="spm-eval-2proc-"))
    assets = build_assets(work / "assets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    evaluate = ["evaluate", "--task", "general", "--base", assets["base"], "--spm", assets["strong"],
                "--concept", "cat", "--clip-model", assets["clip"], "--limit", "5", "--images-per-prompt", "1",
                "--size", "32", "--steps", "2", "--device", "cpu", "--compare", "base", "spm", "spm-no-transport"]
    python = sys.executable
    accelerate = str(Path(python).with_name("accelerate"))
    one = run([python, "-m", "diffusers_spm.cli", *evaluate, "--output", str(work / "one")], env)
    two = run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "diffusers_spm.cli", *evaluate, "--output", str(work / "two")], env)
    images = sorted(p.relative_to(work / "one") for p in (work / "one").rglob("*.png") if "images" in p.parts)
    others = sorted(p.relative_to(work / "two") for p in (work / "two").rglob("*.png") if "images" in p.parts)
    same_images = images == others and all(
        (work / "one" / p).read_bytes() == (work / "two" / p).read_bytes() for p in images
    )
    scores = [json.loads((work / d / "results.json").read_text())["results"] for d in ("one", "two")]
    same_scores = scores[0] == scores[1]
    print(f"{len(images)} images; 1 process {one:.1f} s, 2 processes {two:.1f} s; "
          f"images identical: {same_images}; scores identical: {same_scores}; work dir {work}")
    return 0 if same_images and same_scores else 1


if __name__ == "__main__":
    sys.exit(main())
