"""The paper's evaluation protocol: tasks, metrics, resumable data-parallel generation and reports.

    from diffusers_spm.evaluation import EvalCondition, build_task, evaluate
    task = build_task("general", concepts=["snoopy"], clip_model="openai/clip-vit-base-patch32")
    evaluate(pipe, task, [EvalCondition("base"), EvalCondition("spm", ("snoopy.safetensors",))], "outputs/eval")
"""

from ..bases import load_base_pipeline
from .conditions import COMPARE_CHOICES, EvalCondition, build_conditions
from .generation import GenerationSettings, GenerationStats, generate_to_folder
from .metrics import AlterationMetric, ClipMetric, FidKidMetric, Metric, NudityMetric, Sample
from .prompts import IMAGENET_TEMPLATES, PromptJob, read_i2p_from_hub, read_prompt_csv, template_jobs
from .runner import EvaluationResult, evaluate
from .tasks import TASKS, Task, build_task

__all__ = [
    "COMPARE_CHOICES",
    "IMAGENET_TEMPLATES",
    "TASKS",
    "AlterationMetric",
    "ClipMetric",
    "EvalCondition",
    "EvaluationResult",
    "FidKidMetric",
    "GenerationSettings",
    "GenerationStats",
    "Metric",
    "NudityMetric",
    "PromptJob",
    "Sample",
    "Task",
    "build_conditions",
    "build_task",
    "evaluate",
    "generate_to_folder",
    "load_base_pipeline",
    "read_i2p_from_hub",
    "read_prompt_csv",
    "template_jobs",
]
