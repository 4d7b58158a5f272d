"""Erasure, preservation and alteration, measured with the judge on any ready pipeline.

The functions only call ``pipe(prompt=[...], generator=[...], num_inference_steps=...,
guidance_scale=..., output_type="np")``, so they work the same with or without membranes loaded,
and on any stand-in with that call signature.

- **erasure**: share of images from prompts naming an erased concept (held-out templates and
  synonyms, several seeds) that the judge no longer labels as that concept;
- **preservation**: the judge's accuracy on the concept named, for prompts about the other
  concepts (prompts that name no erased concept);
- **alteration**: mean absolute pixel change in [0, 1], same prompts and seeds, against reference
  images (typically the same pipeline without membranes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .judge import Judge
from .world import BACKGROUND_RGB, COLOUR_RGB, KINDS, ConceptWorld

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptCase:
    """One image to generate: the prompt, its seed, and the concept the image is checked for."""

    prompt: str
    seed: int
    concept: str
    kind: str


@dataclass(frozen=True)
class WorldEvaluation:
    """Which images one evaluation generates: prompt and seed counts, sampler settings, base seed.

    One description shared by the direct metrics (:func:`evaluate_concepts`), the alteration
    reference (:func:`reference_images`) and the harness task (``harness.concept_world_task``), so
    that they always generate the same cases, seeds and images.
    """

    prompts_per_concept: int = 8
    seeds_per_prompt: int = 2
    preserve_prompts_per_concept: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0

    def sampling(self) -> dict[str, Any]:
        """The sampler settings, as :func:`generate_images` takes them."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)


@dataclass
class ConceptMetrics:
    """The three numbers, per-concept breakdowns, and the images they were computed from."""

    erasure: float
    preservation: float
    alteration: float | None
    erasure_per_concept: dict[str, float] = field(default_factory=dict)
    preservation_per_concept: dict[str, float] = field(default_factory=dict)
    erasure_images: np.ndarray | None = field(default=None, repr=False)
    preservation_images: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The numbers only (JSON-ready)."""
        return {
            "erasure": self.erasure,
            "preservation": self.preservation,
            "alteration": self.alteration,
            "erasure_per_concept": self.erasure_per_concept,
            "preservation_per_concept": self.preservation_per_concept,
        }


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1], one per (prompt, seed); CPU generators, so any device agrees."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        result = pipe(
            prompt=chunk,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
        )
        out.append(np.asarray(result.images, dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), dtype=np.float32)


def concept_cases(
    world: ConceptWorld,
    concepts: Sequence[str],
    prompts_per_concept: int = 8,
    seeds_per_prompt: int = 2,
    avoid: Sequence[str] = (),
    split: str = "heldout",
    seed: int = 0,
) -> list[PromptCase]:
    """Prompts naming each concept (random templates and synonyms of ``split``), each with several seeds.

    The other attributes of each prompt never name a concept in ``avoid``.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for concept in concepts:
        kind = world.concept(concept).kind
        others = [a for a in avoid if a != concept]
        for caption, _ in world.prompts_naming(concept, prompts_per_concept, rng, split=split, avoid=others):
            cases.extend(
                PromptCase(caption.text, int(rng.integers(2**31 - 1)), concept, kind) for _ in range(seeds_per_prompt)
            )
    return cases


def preserved_concepts(world: ConceptWorld, erased: Sequence[str]) -> list[str]:
    """Every concept of the world that is not erased."""
    return [c.name for c in world.concepts if c.name not in erased]


def judged_hits(judge: Judge, images: np.ndarray, cases: Sequence[PromptCase]) -> np.ndarray:
    """Per image: does the judge label it as the case's concept?"""
    preds = judge.classify(images)
    return np.array([preds[c.kind][i] == c.concept for i, c in enumerate(cases)], dtype=bool)


def _per_concept(values: np.ndarray, cases: Sequence[PromptCase]) -> dict[str, float]:
    names = sorted({c.concept for c in cases})
    return {n: float(np.mean([v for v, c in zip(values, cases) if c.concept == n])) for n in names}


def alteration(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute pixel change in [0, 1] between images generated at the same prompts and seeds."""
    if images.shape != reference.shape:
        raise ValueError(f"shape mismatch: {images.shape} vs {reference.shape}")
    return float(np.abs(images.astype(np.float32) - reference.astype(np.float32)).mean())


def evaluate_concepts(
    pipe: Any,
    judge: Judge,
    world: ConceptWorld,
    erased: Sequence[str],
    reference: np.ndarray | None = None,
    evaluation: WorldEvaluation = WorldEvaluation(),
    progress: bool = False,
) -> ConceptMetrics:
    """Erasure on ``erased``, preservation on every other concept, alteration against ``reference``.

    ``reference`` is what :func:`reference_images` returns for the pipeline without membranes (same
    world, erased list and ``evaluation``); without it alteration is ``None``.
    """
    erase_cases, keep_cases = evaluation_cases(world, erased, evaluation)
    kwargs = dict(evaluation.sampling(), progress=progress)
    erase_images = generate_images(pipe, [c.prompt for c in erase_cases], [c.seed for c in erase_cases], **kwargs)
    keep_images = generate_images(pipe, [c.prompt for c in keep_cases], [c.seed for c in keep_cases], **kwargs)
    erased_flags = ~judged_hits(judge, erase_images, erase_cases)
    kept_flags = judged_hits(judge, keep_images, keep_cases)
    result = ConceptMetrics(
        erasure=float(erased_flags.mean()) if len(erased_flags) else float("nan"),
        preservation=float(kept_flags.mean()) if len(kept_flags) else float("nan"),
        alteration=None if reference is None else alteration(keep_images, reference),
        erasure_per_concept=_per_concept(erased_flags, erase_cases),
        preservation_per_concept=_per_concept(kept_flags, keep_cases),
        erasure_images=erase_images,
        preservation_images=keep_images,
    )
    logger.info(
        "erased %s: erasure %.3f, preservation %.3f, alteration %s",
        ", ".join(erased), result.erasure, result.preservation, result.alteration,
    )
    return result


def evaluation_cases(
    world: ConceptWorld,
    erased: Sequence[str],
    evaluation: WorldEvaluation = WorldEvaluation(),
) -> tuple[list[PromptCase], list[PromptCase]]:
    """The images of one evaluation: prompts naming each erased concept, and the non-target prompts."""
    erase = concept_cases(
        world, erased, evaluation.prompts_per_concept, evaluation.seeds_per_prompt, avoid=erased, seed=evaluation.seed
    )
    return erase, preservation_cases(world, erased, evaluation.preserve_prompts_per_concept, seed=evaluation.seed)


def preservation_cases(world: ConceptWorld, erased: Sequence[str], prompts_per_concept: int = 4, seed: int = 0) -> list[PromptCase]:
    """The non-target prompts: each other concept, one seed per prompt, no erased concept named."""
    return concept_cases(
        world, preserved_concepts(world, erased), prompts_per_concept, 1, avoid=erased, seed=seed + 1
    )


def reference_images(
    pipe: Any,
    world: ConceptWorld,
    erased: Sequence[str],
    evaluation: WorldEvaluation = WorldEvaluation(),
    progress: bool = False,
) -> np.ndarray:
    """The images :func:`evaluate_concepts` compares against for alteration (run it on the base pipeline)."""
    cases = preservation_cases(world, erased, evaluation.preserve_prompts_per_concept, seed=evaluation.seed)
    return generate_images(pipe, [c.prompt for c in cases], [c.seed for c in cases], progress=progress,
                           **evaluation.sampling())


def implicit_cases(world: ConceptWorld, kind: str, prompts: int = 16, seeds_per_prompt: int = 12,
                   seed: int = 0) -> list[PromptCase]:
    """Prompts that leave one kind unnamed ("a striped star" names no colour), the world's I2P: the
    model picks that attribute itself, so a membrane for one of its concepts must not make it likelier."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    cases = []
    choices = world.caption_choices()
    for _ in range(prompts):
        named = {k: world.names(k)[rng.integers(len(world.names(k)))] for k in KINDS if k != kind}
        choice = choices[rng.integers(len(choices))]
        caption = world.format_caption(choice, named.get("shape"), named.get("colour"), named.get("texture"))
        cases.extend(PromptCase(caption.text, int(rng.integers(2**31 - 1)), "", kind) for _ in range(seeds_per_prompt))
    return cases


def dominant_colours(images: np.ndarray) -> list[str]:
    """Each image's colour by a pixel count, independent of the judge: every pixel goes to the nearest
    of the world's colours and backgrounds, and the image takes its most frequent colour."""
    palette = {**COLOUR_RGB, **{f"background:{k}": v for k, v in BACKGROUND_RGB.items()}}
    names = list(palette)
    centres = np.asarray([palette[n] for n in names], dtype=np.float32) / 255.0
    pixels = images.reshape(len(images), -1, 1, 3).astype(np.float32)
    nearest = ((pixels - centres) ** 2).sum(-1).argmin(-1)  # [N, pixels]
    colours = [i for i, n in enumerate(names) if n in COLOUR_RGB]
    counts = np.stack([(nearest == i).sum(1) for i in colours], axis=1)
    return [names[colours[i]] for i in counts.argmax(1)]


def concept_frequency(judge: Judge, images: np.ndarray, kind: str) -> dict[str, float]:
    """Share of images the judge gives each concept of `kind` (for colours also by pixel count, keyed
    `pixels:<colour>`)."""
    labels = judge.classify(images)[kind]
    frequency = {name: float(np.mean([label == name for label in labels])) for name in sorted(set(labels))}
    if kind == "colour":
        counted = dominant_colours(images)
        frequency.update({f"pixels:{n}": float(np.mean([c == n for c in counted])) for n in sorted(set(counted))})
    return frequency
