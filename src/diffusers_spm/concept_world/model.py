"""The concept world's tiny text-to-image model: configs and the offline loader.

The model is a real ``StableDiffusionPipeline`` (CLIP BPE tokenizer, ``CLIPTextModel``,
``AutoencoderKL``, ``UNet2DConditionModel``, DDIM), only small: 32x32 images, 8x8x4 latents.
Its layout matches SD 1.x in kind (cross-attention transformers in the UNet's down and up blocks),
so membranes attach to it the same way they attach to SD.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..bases import CONCEPT_WORLD

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


def weights_available(directory: str | Path = WEIGHTS_DIR) -> bool:
    """Whether the trained weights are present (they are written by scripts/train_concept_world.py)."""
    directory = Path(directory)
    return all((directory / sub / "config.json").exists() for sub in ("unet", "vae", "text_encoder"))


def load_concept_world_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    directory: str | Path = WEIGHTS_DIR,
) -> StableDiffusionPipeline:
    """Load the shipped concept-world pipeline, offline, from package data.

    The weights are stored in fp16 to keep the package small; they load as ``dtype``
    (default fp32, which is what CPU inference wants).
    """
    directory = Path(directory)
    if not weights_available(directory):
        raise FileNotFoundError(f"no concept-world weights in {directory}; run scripts/train_concept_world.py")
    dtype = dtype or torch.float32
    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(directory / "vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder", dtype=dtype, local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(directory / "scheduler", local_files_only=True)
    pipe = assemble_pipeline(unet, vae, text_encoder, scheduler)
    pipe.register_to_config(_name_or_path=CONCEPT_WORLD)  # how metadata names it, on any machine
    pipe.set_progress_bar_config(disable=True)
    logger.debug("loaded the concept-world pipeline from %s as %s", directory, dtype)
    return pipe.to(device or "cpu")
