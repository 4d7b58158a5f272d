"""`TrainingConfig`: every setting of a membrane training run, validated by pydantic.

The layout is the reference implementation's (`config.yaml` with `pretrained_model`, `network`,
`train`, `save`, `logging`, and `prompts_file` pointing to a `prompt.yaml` list), so its files load
as they are; our additions are extra fields with defaults. Keys the reference reads but never
uses (e.g. `unet_lr`, `other.use_xformers`) are dropped with a log line, so that every field left
here has an effect.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from diffusers.optimization import SchedulerType
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]
LR_SCHEDULERS: tuple[str, ...] = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")

# Keys of the reference's files that it parses but whose values change nothing in its training.
REFERENCE_UNUSED: dict[str, tuple[str, ...]] = {
    "": ("inference", "other"),
    "pretrained_model": ("v2",),
    "train": ("unet_lr", "text_encoder_lr", "batch_size", "lr_scheduler_args"),
    "logging": ("verbose", "eval_num", "anchor_prompt"),
    "concept": ("seed", "case_number"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PretrainedModelConfig(_Section):
    """The base model: a diffusers folder or Hub id (SD 1.x, 2.x or XL)."""

    name_or_path: str = Field(min_length=1)
    v_pred: bool = False  # force v-prediction; otherwise the pipeline scheduler's prediction_type is used
    clip_skip: int | None = Field(default=None, ge=1)  # reference meaning: 1 = last layer, 2 = penultimate


class ConceptConfig(_Section):
    """One entry of the reference's `prompt.yaml`: what to erase, towards what, and how."""

    target: str = Field(min_length=1)
    positive: str | None = None  # the concept as the model knows it; defaults to `target`
    unconditional: str = ""
    neutral: str | None = None  # the surrogate; defaults to `unconditional`
    action: Literal["erase", "erase_with_la"] = "erase"
    guidance_scale: float = 1.0  # eta of the erase target (the reference's name for it)
    resolution: int = Field(default=512, gt=0)
    dynamic_resolution: bool = False
    batch_size: int = Field(default=1, ge=1)
    dynamic_crops: bool = False  # SDXL only: random original size and crop in the time ids
    use_template: bool = False
    # Prompts to train the concept in, one drawn per iteration, `{}` standing for the concept. Unlike
    # `use_template`, each wraps the target, the positive and the neutral alike, so an empty neutral keeps
    # the context: "a {} circle" erases "a striped circle" towards "a circle" (docs/training.md).
    templates: list[str] = Field(default_factory=list)
    la_strength: float = Field(default=1000.0, ge=0)
    sampling_batch_size: int = Field(default=4, ge=1)
    # Latent Anchoring also holds the unconditional prompt's prediction, as the reference's anchor batch
    # does in effect (`[∅, a3, ∅, a4]` for 4 anchors; docs/training.md). False: random anchors only.
    anchor_unconditional: bool = True

    @field_validator("target")
    @classmethod
    def _target_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("target must name the concept to erase; it is empty")
        return value

    @field_validator("templates")
    @classmethod
    def _one_slot_each(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
                raise ValueError(f"each template must hold the concept's slot '{{}}' exactly once, got {template!r}")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE factor), got {value}")
        return value

    @model_validator(mode="after")
    def _defaults_and_batches(self) -> "ConceptConfig":
        if self.positive is None:
            self.positive = self.target
        if self.neutral is None:
            self.neutral = self.unconditional
        if self.use_template and self.templates:
            raise ValueError("use_template (the CLIP templates) and templates (your own) exclude each other; set one")
        if self.sampling_batch_size % self.batch_size:
            raise ValueError(
                f"sampling_batch_size ({self.sampling_batch_size}) must be a multiple of batch_size ({self.batch_size})"
            )
        return self


class NetworkConfig(_Section):
    rank: int = Field(default=1, ge=1)
    alpha: float = Field(default=1.0, gt=0)


class TrainConfig(_Section):
    precision: Precision = "float32"
    # The partial denoising's scheduler; None: the family's own (DDIM for UNets, as the reference; the
    # flow-matching Euler scheduler for SD3/Flux). Checked against the base model (`check_base`).
    noise_scheduler: Literal["ddim", "flow_match_euler"] | None = None
    iterations: int = Field(default=3000, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    optimizer_type: Literal["AdamW", "AdamW8bit"] = "AdamW8bit"
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = Field(default=500, ge=0)
    lr_scheduler_num_cycles: int = Field(default=3, ge=1)
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = Field(default=0.0, ge=0)
    # Save an exponential moving average of the membrane's weights instead of its last ones (diffusers'
    # `EMAModel`, whose decay warms up as (1 + s) / (10 + s) to this cap). None: the last weights, as the reference.
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    max_denoising_steps: int = Field(default=30, ge=2)
    denoise_guidance_scale: float = 3.0  # CFG of the partial denoising (fixed at 3 in the reference)
    denoise_guidance_rescale: float | None = Field(default=None, ge=0, le=1)  # None: 0.7 for SDXL, else 0
    eta: float | None = None  # when set, overrides every concept's guidance_scale
    gradient_checkpointing: bool = False
    seed: int = 0
    batch_unet_calls: bool = True
    # Denoise the latents of this many iterations in one batch with the membrane of the first: faster,
    # but the membrane is stale by up to denoise_batch - 1 steps (1: the reference's semantics).
    denoise_batch: int = Field(default=1, ge=1)
    device: str | None = None  # None: the accelerate process's device
    # Keep the text encoders on the CPU: the run's prompts are fixed, so each is encoded there once and only
    # the denoiser goes to `device` (Flux's T5-XXL is 9.5 GB in bf16).
    offload_text_encoders: bool = False

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer_case(cls, value: Any) -> Any:
        names = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}
        return names.get(str(value).lower(), value)

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _optimizer_args(cls, value: Any) -> Any:
        """The reference writes them as a list of `key=value` strings."""
        if value is None:
            return {}
        if isinstance(value, (list, tuple)):
            pairs = [str(item).split("=", 1) for item in value]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("optimizer_args entries must look like 'key=value'")
            return {k.strip(): yaml.safe_load(v) for k, v in pairs}
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {value!r}; choose one of {', '.join(LR_SCHEDULERS)}")
        return value


class SaveConfig(_Section):
    name: str = Field(default="untitled", min_length=1)
    path: str = "./output"
    per_steps: int = Field(default=500, ge=1)  # membrane + resumable checkpoint every N steps
    precision: Precision = "float32"
    per_concept: bool = False  # one membrane per concept instead of one for all


class LoggingConfig(_Section):
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    run_name: str | None = None
    interval: int = Field(default=0, ge=0)  # sample images every N steps (0: never)
    prompts: list[str] = Field(default_factory=list)
    negative_prompt: str = ""
    width: int = Field(default=512, gt=0)
    height: int = Field(default=512, gt=0)
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = 7.5
    seed: int | None = 0
    generate_num: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _reference_wandb(cls, data: Any) -> Any:
        if isinstance(data, dict) and "use_wandb" in data:
            data = dict(data)
            if data.pop("use_wandb"):
                data.setdefault("tracker", "wandb")
        return data


class TrainingConfig(_Section):
    """A whole run. `concepts` come inline or from `prompts_file` (the reference's prompt.yaml)."""

    prompts_file: str | None = None
    pretrained_model: PretrainedModelConfig
    concepts: list[ConceptConfig] = Field(min_length=1)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _read_prompts_file(cls, data: Any, info: ValidationInfo) -> Any:
        return _inline_prompts(data, (info.context or {}).get("base_dir"))

    @field_validator("prompts_file")
    @classmethod
    def _prompts_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _resolve(value, (info.context or {}).get("base_dir")) is None:
            raise ValueError(f"prompts file {value!r} not found (looked in the working directory and beside the config)")
        return value

    @model_validator(mode="after")
    def _checkpoints_between_denoise_batches(self) -> "TrainingConfig":
        """A checkpoint holds no latents denoised ahead, so it must fall between denoise batches."""
        if self.save.per_steps % self.train.denoise_batch:
            raise ValueError(
                f"save.per_steps ({self.save.per_steps}) must be a multiple of train.denoise_batch "
                f"({self.train.denoise_batch}), so that checkpoints fall between denoise batches and resume exactly"
            )
        return self

    def check_base(self, pipe: Any) -> None:
        """Raise a `ValidationError` naming every setting that makes no sense for `pipe`'s denoiser family,
        with its fix (docs/training.md, "What the config checks against the base model")."""
        from ..families import denoiser_of, family_of

        denoiser = denoiser_of(pipe)
        family = family_of(denoiser)
        flow = family.prediction_type(pipe) == "flow"
        errors: list[tuple[tuple[str | int, ...], Any, str]] = []
        if flow and self.pretrained_model.v_pred:
            errors.append((("pretrained_model", "v_pred"), True,
                           f"{family.label} predicts a flow-matching velocity; v_pred forces v-prediction on a "
                           "diffusion UNet (SD 2.x). Remove pretrained_model.v_pred"))
        own = "flow_match_euler" if flow else "ddim"
        if self.train.noise_scheduler not in (None, own):
            errors.append((("train", "noise_scheduler"), self.train.noise_scheduler,
                           f"{family.label} denoises with {own!r} ({'flow matching' if flow else 'diffusion'}). "
                           f"Remove train.noise_scheduler (the family's own is used) or set it to {own}"))
        skip = self.pretrained_model.clip_skip
        if skip and skip > 1 and "clip_skip" not in inspect.signature(pipe.encode_prompt).parameters:
            errors.append((("pretrained_model", "clip_skip"), skip,
                           f"{type(pipe).__name__}.encode_prompt takes no clip_skip. Remove pretrained_model.clip_skip"))
        if self.train.denoise_guidance_rescale and family.guidance_embedded(denoiser):
            errors.append((("train", "denoise_guidance_rescale"), self.train.denoise_guidance_rescale,
                           f"{family.label} here is guidance-distilled: the partial denoising makes one prediction "
                           "with the guidance embedding, no CFG pair to rescale. Remove train.denoise_guidance_rescale"))
        scale, patch = getattr(pipe, "vae_scale_factor", 8), family.latent_multiple(denoiser)
        multiple, variant = scale * patch, family.architecture(denoiser)
        why = f"{multiple} px for {variant} (the VAE's {scale}x downscaling times {patch}x{patch} patches)"
        for index, concept in enumerate(self.concepts):
            if concept.dynamic_crops and not family.size_conditioned(denoiser):
                errors.append((("concepts", index, "dynamic_crops"), True,
                               f"dynamic_crops draws SDXL's size and crop time ids; {variant} takes none. "
                               "Set dynamic_crops to false"))
            if concept.resolution % multiple:
                errors.append((("concepts", index, "resolution"), concept.resolution,
                               f"resolution must be a multiple of {why}"))
            elif concept.dynamic_resolution and bucket_step(concept.resolution) % multiple:
                errors.append((("concepts", index, "dynamic_resolution"), True,
                               f"dynamic_resolution draws sizes in steps of {bucket_step(concept.resolution)} px, "
                               f"which must be a multiple of {why}. Use a resolution of at least 128 (steps of 64) "
                               "or set dynamic_resolution to false"))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("base_model", "{problem}", {"problem": message}), loc=loc,
                                 input=value)
                for loc, value, message in errors
            ])

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "TrainingConfig":
        """Load a config (ours or the reference's), then apply `key.sub=value` overrides."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of config sections, not {type(raw).__name__}")
        return cls.from_dict(raw, overrides, base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], overrides: Sequence[str] = (), base_dir: str | os.PathLike | None = None
    ) -> "TrainingConfig":
        data = _drop_unused(copy.deepcopy(dict(raw)), "")
        for section in ("pretrained_model", "train", "logging"):
            if isinstance(data.get(section), dict):
                data[section] = _drop_unused(data[section], section)
        data = _inline_prompts(data, str(base_dir) if base_dir else None)
        for item in overrides:
            apply_override(data, item)
        return cls.model_validate(data, context={"base_dir": str(base_dir) if base_dir else None})


def _inline_prompts(data: Any, base_dir: str | None) -> Any:
    """Fill `concepts` from `prompts_file` when the file exists (its absence is reported on the field)."""
    if not isinstance(data, dict) or data.get("concepts") or not data.get("prompts_file"):
        return data
    path = _resolve(data["prompts_file"], base_dir)
    if path is None:
        return data
    concepts = yaml.safe_load(path.read_text()) or []
    if isinstance(concepts, list):
        concepts = [_drop_unused(c, "concept") if isinstance(c, dict) else c for c in concepts]
    return {**data, "concepts": concepts}


def _resolve(value: str, base_dir: str | None) -> Path | None:
    """The reference writes prompts_file relative to the working directory; also try beside the config."""
    candidates = [Path(value)]
    if base_dir and not Path(value).is_absolute():
        candidates.append(Path(base_dir) / value)
        candidates.append(Path(base_dir) / Path(value).name)
    return next((c for c in candidates if c.is_file()), None)


def _drop_unused(section: dict[str, Any], name: str) -> dict[str, Any]:
    unused = [k for k in REFERENCE_UNUSED.get(name, ()) if k in section]
    if unused:
        logger.info("Ignoring reference-only keys with no effect on training: %s", ", ".join(
            f"{name}.{k}" if name else k for k in unused))
    return {k: v for k, v in section.items() if k not in unused}


def apply_override(data: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4`, `concepts.0.target=cat`, `concepts.*.la_strength=10`: values parse as YAML."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw_value = item.split("=", 1)
    value = yaml.safe_load(raw_value)
    parts = key.strip().split(".")
    targets: list[Any] = [data]
    for part in parts[:-1]:
        nxt: list[Any] = []
        for node in targets:
            if isinstance(node, list):
                nxt.extend(node if part == "*" else [node[int(part)]])
            else:
                nxt.append(node.setdefault(part, {}))
        targets = nxt
    last = parts[-1]
    for node in targets:
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value


def bucket_step(resolution: int) -> int:
    """The step of the reference's dynamic resolution: 64 px (8 px when the resolution is too small for 64)."""
    return 64 if resolution >= 128 else 8
