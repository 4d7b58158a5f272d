"""The concept world's tiny text-to-image models: configs, the registry of shipped models, the offline loader.

The UNet world is a real ``StableDiffusionPipeline`` (CLIP BPE tokenizer, ``CLIPTextModel``,
``AutoencoderKL``, ``UNet2DConditionModel``, DDIM), only small: 32x32 images, 8x8x4 latents.
Its layout matches SD 1.x in kind (cross-attention transformers in the UNet's down and up blocks),
so membranes attach to it the same way they attach to SD. The DiT world is a real
``StableDiffusion3Pipeline`` (two CLIP encoders, no T5, ``SD3Transformer2DModel``, flow matching)
on the same latents, judged by the same judge (scripts/train_dit_concept_world.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..bases import CONCEPT_WORLD, CONCEPT_WORLD_SD3, from_pretrained
from .metrics import WorldEvaluation

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_DIR = ASSETS / "concept_world"  # a standard diffusers folder: DiffusionPipeline.from_pretrained loads it
TOKENIZER_DIR = WEIGHTS_DIR / "tokenizer"
JUDGE_DIR = WEIGHTS_DIR / "judge"

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_DIM = 64

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_vae(scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (16, 32, 64)) -> AutoencoderKL:
    """32x32x3 <-> 8x8x4: three blocks, downsampling factor 4."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def make_text_encoder() -> CLIPTextModel:
    """A 3-layer, 64-wide CLIP text transformer over the full CLIP vocabulary (77 positions)."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_unet(block_out_channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DConditionModel:
    """An SD-1.x-shaped UNet on 8x8x4 latents with cross-attention in down and up blocks."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def make_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer shipped with the package."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def make_train_scheduler() -> DDPMScheduler:
    """The noise schedule used in training (SD's scaled-linear betas)."""
    return DDPMScheduler(**SCHEDULER_CONFIG)


def make_scheduler() -> DDIMScheduler:
    """The sampler the shipped pipeline uses."""
    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False)


def assemble_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler: DDIMScheduler | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from components (no safety checker: there is nothing to check)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer or make_tokenizer(),
        unet=unet,
        scheduler=scheduler or make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_pipeline_index(pipe: StableDiffusionPipeline, directory: str | Path) -> None:
    """Write ``model_index.json`` and ``tokenizer/`` beside the saved components, which is what makes
    `directory` a diffusers folder (`DiffusionPipeline.from_pretrained`, `--base FOLDER`)."""
    directory = Path(directory)
    pipe.tokenizer.save_pretrained(directory / "tokenizer")
    pipe.save_config(directory)


@dataclass(frozen=True)
class WorldModel:
    """One trained model of the world in package data: the one home of its folder, loader and names.

    `name` is what `--base` accepts and membrane metadata records (a path would name the machine that
    trained it); `family` is the denoiser family (`diffusers_spm.families`) of its pipeline.
    """

    family: str
    name: str
    directory: Path
    components: tuple[str, ...]  # the sub-folders that must hold a config for the weights to count as present
    script: str  # what writes the weights, named in errors
    guidance_scale: float  # the CFG its held-out accuracy was measured at (its model card)

    @property
    def membranes_dir(self) -> Path:
        """Where this world's shipped membranes lie (one per concept, `<concept>.safetensors`)."""
        return self.directory / "membranes"

    def evaluation(self, counts: WorldEvaluation = WorldEvaluation()) -> WorldEvaluation:
        """`counts` (prompts, seeds, steps) sampled at this world's guidance scale."""
        return replace(counts, guidance_scale=self.guidance_scale)

    def available(self, directory: str | Path | None = None) -> bool:
        """Whether the weights are present in `directory` (default: the package's)."""
        directory = Path(directory or self.directory)
        return all((directory / sub / "config.json").exists() for sub in self.components)


WORLDS: dict[str, WorldModel] = {
    world.family: world
    for world in (
        WorldModel("unet", CONCEPT_WORLD, WEIGHTS_DIR, ("unet", "vae", "text_encoder"),
                   "scripts/train_concept_world.py", guidance_scale=7.5),
        WorldModel("sd3", CONCEPT_WORLD_SD3, ASSETS / "concept_world_sd3",
                   ("transformer", "vae", "text_encoder", "text_encoder_2"), "scripts/train_dit_concept_world.py",
                   guidance_scale=5.0),
    )
}


def world_model(family: str = "unet") -> WorldModel:
    """The world model of a denoiser family (`unet` or `sd3`)."""
    if family not in WORLDS:
        raise ValueError(f"The concept world has no {family!r} model; families: {', '.join(WORLDS)}.")
    return WORLDS[family]


def world_named(name: str) -> WorldModel | None:
    """The world model a base-model name (`concept-world`, `concept-world-sd3`) stands for, if any."""
    return next((world for world in WORLDS.values() if world.name == name), None)


def weights_available(directory: str | Path | None = None, family: str = "unet") -> bool:
    """Whether the trained weights of `family`'s world are present (in `directory`, default the package's)."""
    return world_model(family).available(directory)


def load_concept_world_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    directory: str | Path | None = None,
    family: str = "unet",
) -> DiffusionPipeline:
    """Load a shipped concept-world pipeline, offline, from package data: the UNet world
    (``StableDiffusionPipeline``) or, with ``family="sd3"``, the DiT world (``StableDiffusion3Pipeline``,
    no T5).

    The weights are stored in fp16 to keep the package small; they load as ``dtype`` (default fp32,
    which is what CPU inference wants). The pipeline is named by the world's portable name, so
    membranes trained on it record that name, not this machine's path.
    """
    world = world_model(family)
    directory = Path(directory or world.directory)
    if not world.available(directory):
        raise FileNotFoundError(f"No {world.name} weights in {directory}; run {world.script}.")
    dtype = dtype or torch.float32
    with _loading_bars_off():
        pipe = from_pretrained(directory, dtype=dtype, local_files_only=True)
    pipe.register_to_config(_name_or_path=world.name)  # how metadata names it, on any machine
    pipe.set_progress_bar_config(disable=True)
    logger.debug("loaded the %s pipeline from %s as %s", world.name, directory, dtype)
    return pipe.to(device or "cpu")


@contextlib.contextmanager
def _loading_bars_off() -> Iterator[None]:
    """diffusers' and transformers' loading bars off for a block (a library call prints no bars)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    restore = [lib.enable_progress_bar for lib in libraries if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for enable in restore:
            enable()
