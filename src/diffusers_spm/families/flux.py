"""Flux.1 (dev, schnell, Kontext, Fill, ...): `FluxTransformer2DModel`.

Membrane layers: in each double-stream block, attention q/k/v/out on the image stream
(`attn.to_q/k/v`, `attn.to_out.0`) and the text stream (`attn.add_q/k/v_proj`, `attn.to_add_out`),
and both feed-forwards; in each single-stream block, `attn.to_q/k/v`, `proj_mlp` and `proj_out`
(the attention output and the MLP output share that one projection). Not the AdaLN modulation
(`norm1.linear`, `norm1_context.linear`, `norm.linear`) nor the time/guidance/text embedders.

Transport: the T5 sequence is what the transformer receives as `encoder_hidden_states`
(`clipcos`); the pooled CLIP-L output, which is its end-of-text state, serves `eoscos`. Tokens:
the CLIP tokenizer. Outside the per-call route, rows are traced to their texts through that pooled
output (`pooled_projections`), which the CLIP-L hook records. Rows: Flux-dev is guidance-distilled
(no negative rows); with `true_cfg_scale` the negative prompt runs as a second call of the same size.

Training: flow matching (velocity); latents are packed 2x2 inside `predict`, so the trainer sees
[B, C, h, w] as for every family. Flux-dev's partial denoising is one call with the guidance
embedding, no CFG pair (`guidance_embedded`); the schedule is `FluxPipeline`'s (sigmas 1 to 1/T,
resolution-dependent shift).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn

from .base import DenoiserFamily, ForwardArgument, RowLayout
from .original_keys import FusedKey, OriginalKeyFamily

_QKV = ("to_q", "to_k", "to_v")


class FluxFamily(OriginalKeyFamily, DenoiserFamily):
    name = "flux"
    label = "Flux.1 (FluxTransformer2DModel)"
    denoiser_classes = (FluxTransformer2DModel,)
    row_layout = RowLayout.CFG_CALLS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    path_signature = re.compile(r"^single_transformer_blocks[._]")
    pooled_argument = ForwardArgument("pooled_projections", 2)
    observed_encoders = ("text_encoder",)  # CLIP-L, whose pooled output it takes

    def architecture(self, denoiser: nn.Module) -> str:
        config = denoiser.config
        return f"flux-{config.num_layers}-double-{config.num_single_layers}-single"

    def fused_keys(self, denoiser: nn.Module) -> list[FusedKey]:
        """BFL names (`double_blocks.{i}.img_attn.qkv`, `single_blocks.{i}.linear1`, ...), as ComfyUI and kohya use."""
        keys: list[FusedKey] = []
        for index in range(len(denoiser.transformer_blocks)):
            bfl, ours = f"double_blocks.{index}", f"transformer_blocks.{index}"
            keys += [
                FusedKey(f"{bfl}.img_attn.qkv", [f"{ours}.attn.{n}" for n in _QKV]),
                FusedKey(f"{bfl}.img_attn.proj", [f"{ours}.attn.to_out.0"]),
                FusedKey(f"{bfl}.img_mlp.0", [f"{ours}.ff.net.0.proj"]),
                FusedKey(f"{bfl}.img_mlp.2", [f"{ours}.ff.net.2"]),
                FusedKey(f"{bfl}.txt_attn.qkv", [f"{ours}.attn.add_{n[3]}_proj" for n in _QKV]),
                FusedKey(f"{bfl}.txt_attn.proj", [f"{ours}.attn.to_add_out"]),
                FusedKey(f"{bfl}.txt_mlp.0", [f"{ours}.ff_context.net.0.proj"]),
                FusedKey(f"{bfl}.txt_mlp.2", [f"{ours}.ff_context.net.2"]),
            ]
        for index in range(len(denoiser.single_transformer_blocks)):
            bfl, ours = f"single_blocks.{index}", f"single_transformer_blocks.{index}"
            keys += [
                FusedKey(f"{bfl}.linear1", [f"{ours}.attn.{n}" for n in _QKV] + [f"{ours}.proj_mlp"]),
                FusedKey(f"{bfl}.linear2", [f"{ours}.proj_out"]),
            ]
        return keys

    def text_states(self, pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioning(pipe, texts, pipe._execution_device)

    # ------------------------------------------------------------------ training
    def conditioning(self, pipe: Any, texts: list[str], device: torch.device | str,
                     clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states and the pooled CLIP-L output; Flux's `encode_prompt` takes no `clip_skip` (the config says so)."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device, num_images_per_prompt=1)
        return embeds, pooled

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """The pipeline's: `in_channels / 4` channels (packing 2x2 makes them `in_channels`), even sides."""
        scale = pipe.vae_scale_factor * 2
        return pipe.transformer.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return 2  # latents are packed in 2x2 patches

    def guidance_embedded(self, denoiser: nn.Module) -> bool:
        return bool(denoiser.config.guidance_embeds)

    def timestep_kwargs(self, scheduler: Any, steps: int, denoiser: nn.Module, latent_shape: Sequence[int]
                        ) -> dict[str, Any]:
        """As `FluxPipeline`: sigmas from 1 to 1/steps, then the resolution-dependent shift."""
        return {**super().timestep_kwargs(scheduler, steps, denoiser, latent_shape),
                "sigmas": np.linspace(1.0, 1 / steps, steps)}

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None, guidance: float = 1.0
                ) -> torch.Tensor:
        """Packs the latents 2x2 with their position ids, runs at `timestep / 1000` (and the guidance
        embedding, for guidance-distilled models), and unpacks the velocity."""
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)
        embedded = None
        if self.guidance_embedded(denoiser):
            embedded = torch.full((batch,), guidance, device=latents.device, dtype=torch.float32)
        output = denoiser(hidden_states=packed, timestep=timestep.expand(batch).to(latents.dtype) / 1000,
                          guidance=embedded, pooled_projections=pooled, encoder_hidden_states=text, txt_ids=text_ids,
                          img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(output, height, width, vae_scale_factor=1)


FAMILY = FluxFamily()
