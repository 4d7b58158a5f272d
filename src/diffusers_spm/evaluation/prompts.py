"""The prompt sets of the paper's protocol, as `PromptJob`s: one job = one image, with its own seed.

A job carries everything that decides its image (prompt, seed, guidance, size), so the image's
file name can be derived from it and a finished image is never generated twice.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

# The 80 prompt templates of CLIP's ImageNet zero-shot protocol, in the order the reference indexes them.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# Column names across the reference CSVs (I2P uses `sd_*`, COCO `width`/`height`, the rest `evaluation_seed`).
_SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
_GUIDANCE_COLUMNS = ("sd_guidance_scale", "guidance_scale")
_WIDTH_COLUMNS = ("sd_image_width", "width")
_HEIGHT_COLUMNS = ("sd_image_height", "height")
_META_COLUMNS = ("artist", "categories", "nudity_percentage", "image_id", "class", "label_str", "case_number", "concept")

I2P_HUB_DATASET = "AIML-TUDA/i2p"


@dataclass(frozen=True)
class PromptJob:
    """One image to generate; `None` fields fall back to the task's generation settings."""

    index: int
    prompt: str
    seed: int
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def file_name(self) -> str:
        """Prompt index and seed: stable across runs, so a finished image is recognised and skipped."""
        return f"{self.index:06d}_s{self.seed}.png"


def _first(row: Mapping[str, str], columns: Sequence[str]) -> str | None:
    for column in columns:
        value = row.get(column)
        if value not in (None, ""):
            return value
    return None


def _size(value: str | None) -> int | None:
    """Sizes rounded down to a multiple of 8, as the UNet needs (the reference does the same for COCO)."""
    return None if value is None else int(float(value)) // 8 * 8


def jobs_from_rows(rows: Iterable[Mapping[str, Any]], limit: int | None = None, source: str = "rows") -> list[PromptJob]:
    """Jobs from CSV-like rows: a `prompt` column, a seed column, optional guidance and size columns."""
    jobs: list[PromptJob] = []
    for index, raw in enumerate(rows):
        if limit is not None and len(jobs) >= limit:
            break
        row = {k: ("" if v is None else str(v)) for k, v in raw.items() if k is not None}
        if "prompt" not in row:
            raise ValueError(f"{source} has no `prompt` column (columns: {', '.join(row)}).")
        seed = _first(row, _SEED_COLUMNS)
        if seed is None:
            raise ValueError(f"{source}, row {index}: no seed column ({' / '.join(_SEED_COLUMNS)}).")
        guidance = _first(row, _GUIDANCE_COLUMNS)
        jobs.append(
            PromptJob(
                index=index,
                prompt=row["prompt"].strip(),
                seed=int(float(seed)),
                guidance_scale=None if guidance is None else float(guidance),
                width=_size(_first(row, _WIDTH_COLUMNS)),
                height=_size(_first(row, _HEIGHT_COLUMNS)),
                meta={k: row[k].strip() for k in _META_COLUMNS if row.get(k)},
            )
        )
    return jobs


def read_prompt_csv(path: str | Path, limit: int | None = None) -> list[PromptJob]:
    """A reference prompt CSV (`*_prompts.csv`, `coco_30k.csv`, `i2p_benchmark.csv`, ...) as jobs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as handle:
        jobs = jobs_from_rows(csv.DictReader(handle), limit, source=str(path))
    logger.info("Read %d prompts from %s.", len(jobs), path)
    return jobs


def read_i2p_from_hub(limit: int | None = None, min_nudity: float | None = None) -> list[PromptJob]:
    """I2P from the Hub dataset (needs `datasets` and a network); `min_nudity=10` gives the nudity subset."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ValueError(
            f"Reading {I2P_HUB_DATASET} from the Hub needs `datasets` (pip install 'diffusers-spm[eval]'); "
            "or pass the CSV with --prompts."
        ) from err
    rows = load_dataset(I2P_HUB_DATASET, split="train")
    if min_nudity is not None:
        rows = rows.filter(lambda row: float(row["nudity_percentage"]) >= min_nudity)
    return jobs_from_rows(rows, limit, source=I2P_HUB_DATASET)


def template_jobs(
    concepts: Sequence[str], num_templates: int = 80, images_per_template: int = 10, seed: int = 2024,
    limit: int | None = None,
) -> list[PromptJob]:
    """The `general` protocol: each concept in the first `num_templates` ImageNet templates, several seeds each.

    Image k of a template uses seed `seed + k`, so every image has its own seed and batching does
    not change what is generated. `limit` caps the images per concept.
    """
    if not 1 <= num_templates <= len(IMAGENET_TEMPLATES):
        raise ValueError(f"num_templates must be in [1, {len(IMAGENET_TEMPLATES)}], got {num_templates}.")
    if not concepts:
        raise ValueError("The general task needs at least one concept (`--concept NAME`).")
    jobs: list[PromptJob] = []
    for concept in concepts:
        pairs = [(t, k) for k in range(images_per_template) for t in range(num_templates)][:limit]
        for template_index, k in pairs:
            jobs.append(
                PromptJob(
                    index=len(jobs),
                    prompt=IMAGENET_TEMPLATES[template_index].format(concept),
                    seed=seed + k,
                    meta={"concept": concept, "template": template_index},
                )
            )
    return jobs
