"""Deterministic, resumable, data-parallel image generation for a list of `PromptJob`s.

Each image's noise comes from its own CPU generator seeded by the job, so an image does not depend
on the batch it lands in or the process that makes it (up to floating-point rounding, which can move
a few pixel values by one). Images are written atomically under the job's file name, and a file
already on disk is never generated again: an interrupted run resumes where it stopped. A folder
remembers what made its images (`generation.json`), so a run with other settings cannot silently
reuse them. Under `accelerate launch`, the missing jobs are split between processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from ..utils import flatten
from .prompts import PromptJob

logger = logging.getLogger(__name__)


def process_state(device: str | torch.device | None = None) -> PartialState:
    """Accelerate's view of the processes. CPU runs must say so when it is first built: otherwise
    workers started by `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs each
    believe they are alone, and every one generates every image."""
    cpu = (device is not None and torch.device(device).type == "cpu") or parse_flag_from_env("ACCELERATE_USE_CPU")
    return PartialState(cpu=cpu)


@dataclass(frozen=True)
class GenerationSettings:
    """Defaults for what a job leaves open; the reference's are 512 px, 30 DDIM steps, CFG 7.5."""

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    batch_size: int = 1

    def call_arguments(self, job: PromptJob) -> tuple[float, int, int]:
        """What must be equal for jobs to share one pipeline call."""
        return (
            self.guidance_scale if job.guidance_scale is None else job.guidance_scale,
            self.width if job.width is None else job.width,
            self.height if job.height is None else job.height,
        )


@dataclass(frozen=True)
class GenerationStats:
    generated: int
    skipped: int


def image_paths(jobs: Sequence[PromptJob], folder: Path) -> list[Path]:
    return [folder / job.file_name for job in jobs]


def _batches(jobs: Sequence[PromptJob], settings: GenerationSettings) -> list[list[PromptJob]]:
    """Consecutive jobs with the same guidance and size, at most `batch_size` per call."""
    batches: list[list[PromptJob]] = []
    for _, group in groupby(jobs, key=settings.call_arguments):
        group = list(group)
        batches += [group[i : i + settings.batch_size] for i in range(0, len(group), settings.batch_size)]
    return batches


def _check_signature(folder: Path, signature: Mapping[str, Any]) -> None:
    """Refuse to mix images made under different settings in one folder."""
    record = folder / "generation.json"
    current = json.loads(json.dumps(signature, default=str))
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != current:
            before, after = flatten(previous), flatten(current)
            changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
            raise ValueError(
                f"{folder} holds images made with other settings ({', '.join(changed)} differ). "
                "Use another --output, or delete the folder to regenerate."
            )
    else:
        record.write_text(json.dumps(current, indent=2))


def _save(image: Any, path: Path) -> None:
    """Write to a temporary name first, so a killed run never leaves a truncated image that would be skipped."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def generate_to_folder(
    pipe: DiffusionPipeline,
    jobs: Sequence[PromptJob],
    folder: str | Path,
    settings: GenerationSettings,
    call_kwargs: Mapping[str, Any] | None = None,
    desc: str = "generate",
    signature: Mapping[str, Any] | None = None,
) -> GenerationStats:
    """Generate every job's image into `folder` that is not there yet; returns how many were made here.

    `signature` describes what else decides the images (model, condition); with the settings and
    `call_kwargs` it must match what made the images already in `folder`.
    """
    if settings.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {settings.batch_size}.")
    folder = Path(folder)
    state = PartialState()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        settings_record = {k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"}
        _check_signature(folder, {**dict(signature or {}), "settings": settings_record, "call": dict(call_kwargs or {})})
    state.wait_for_everyone()
    missing = [job for job in jobs if not (folder / job.file_name).exists()]
    skipped = len(jobs) - len(missing)
    if skipped and state.is_main_process:
        logger.info("%s: %d of %d images already on disk, skipping them.", desc, skipped, len(jobs))
    generated = 0
    with state.split_between_processes(missing) as mine:
        batches = _batches(mine, settings)
        with tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process or not mine) as bar:
            for batch in batches:
                guidance, width, height = settings.call_arguments(batch[0])
                images = pipe(
                    prompt=[job.prompt for job in batch],
                    negative_prompt=[settings.negative_prompt] * len(batch),
                    generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    **dict(call_kwargs or {}),
                ).images
                for job, image in zip(batch, images, strict=True):
                    _save(image, folder / job.file_name)
                generated += len(batch)
                bar.update(len(batch))
    state.wait_for_everyone()
    return GenerationStats(generated=generated, skipped=skipped)
