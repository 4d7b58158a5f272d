"""The concept world: a small offline text-to-image world where concept erasure can be measured.

It has concepts with synonyms and caption templates, a deterministic renderer, a judge (CNN) that
reads shape / colour / texture off an image, two tiny trained pipelines shipped as package data (a
``StableDiffusionPipeline`` and, ``family="sd3"``, a ``StableDiffusion3Pipeline`` with a flow-matching
transformer), and the erasure / preservation / alteration metrics.
"""

from .judge import Judge, JudgeConfig, judge_accuracy, make_batch, train_judge
from .metrics import (
    ConceptMetrics,
    PromptCase,
    WorldEvaluation,
    alteration,
    concept_cases,
    evaluate_concepts,
    generate_images,
    judged_hits,
    preservation_cases,
    preserved_concepts,
    reference_images,
)
from .model import (
    JUDGE_DIR,
    WEIGHTS_DIR,
    WORLDS,
    WorldModel,
    load_concept_world_pipeline,
    weights_available,
    world_model,
)
from .world import (
    ALL_CONCEPTS,
    COLOURS,
    KINDS,
    NP_FORMS,
    OUTER_TEMPLATES,
    SHAPES,
    TEXTURES,
    Caption,
    CaptionChoice,
    Concept,
    ConceptWorld,
    Scene,
)


def load_judge(device: str | None = None) -> Judge:
    """The shipped judge."""
    return Judge.load(JUDGE_DIR, device=device)


__all__ = [
    "ALL_CONCEPTS",
    "COLOURS",
    "KINDS",
    "NP_FORMS",
    "OUTER_TEMPLATES",
    "SHAPES",
    "TEXTURES",
    "Caption",
    "CaptionChoice",
    "Concept",
    "ConceptMetrics",
    "ConceptWorld",
    "Judge",
    "JudgeConfig",
    "JUDGE_DIR",
    "PromptCase",
    "Scene",
    "WEIGHTS_DIR",
    "WORLDS",
    "WorldEvaluation",
    "WorldModel",
    "alteration",
    "concept_cases",
    "evaluate_concepts",
    "generate_images",
    "judge_accuracy",
    "judged_hits",
    "load_concept_world_pipeline",
    "load_judge",
    "make_batch",
    "preservation_cases",
    "preserved_concepts",
    "reference_images",
    "train_judge",
    "weights_available",
    "world_model",
]
