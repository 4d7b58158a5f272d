"""Tiny offline pipelines built from configs, the way diffusers' own tests build them."""

from __future__ import annotations

import os
from importlib import resources

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_spm import StableDiffusionSPMPipeline, StableDiffusionXLSPMPipeline

# Tiny models: one intra-op thread is faster than two fighting over a loaded 2-core machine.
torch.set_num_threads(1)

TOKENIZER_DIR = str(resources.files("diffusers_spm") / "assets" / "concept_world" / "tokenizer")


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )


def tiny_components(seed: int = 0) -> dict:
    unet = tiny_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408, max_position_embeddings=77,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
            "safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}


def tiny_pipeline(seed: int = 0, cls=StableDiffusionSPMPipeline):
    pipe = cls(**tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, cls=StableDiffusionXLSPMPipeline):
    """SDXL-shaped: two text encoders (32 + 32 = 64 wide), pooled embeddings and time ids."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    text_config = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                                 intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                                 vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    components = tiny_components(seed)
    pipe = cls(
        vae=components["vae"], text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer"], unet=unet, scheduler=components["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recorded_gates(pipe) -> list[torch.Tensor]:
    """The [rows, membranes] gates the membrane layers apply in each later denoiser forward, read by a plain
    torch pre-hook on one adapted layer through the controller's public `current` (nothing patched)."""
    from diffusers_spm import MembraneController
    from diffusers_spm.families import denoiser_of

    controller = MembraneController.of(denoiser_of(pipe))
    _, layer = next(iter(controller.targets.values()))
    seen: list[torch.Tensor] = []

    def record(module, args):
        forward = controller.current
        gates = torch.zeros(len(controller.names)) if forward.off else forward.gates.cpu()
        seen.append(gates.expand(args[0].shape[0], -1) if gates.dim() == 1 else gates)

    layer.register_forward_pre_hook(record)
    return seen


@pytest.fixture
def pipe():
    return tiny_pipeline()
