"""SD3 / SD3.5: `SD3Transformer2DModel` (MMDiT joint blocks; SD3.5 adds a second image attention).

Membrane layers, per joint block: attention q/k/v/out on the image stream (`attn.to_q/k/v/out.0`,
and `attn2.*` on SD3.5's dual-attention blocks) and on the text stream (`attn.add_q/k/v_proj`,
`attn.to_add_out`), and both feed-forwards (`ff`, `ff_context`); not the AdaLN modulation
(`norm1.linear`, `norm1_context.linear`) nor the embedders outside the blocks.

Transport: `encode_prompt` gives the joint text states (CLIP-L and CLIP-G side by side, then T5,
which is zeros when `text_encoder_3=None`) and the pooled CLIP-L + CLIP-G projection, which is each
CLIP's end-of-text output, so `eoscos` reads it directly. Tokens: the CLIP tokenizer. CFG runs in
one batch, `[negative rows, prompt rows]`. Outside the per-call route, rows are traced to their texts
through that pooled projection (`pooled_projections`), which the CLIP encoders' hooks record.

Training: flow matching (velocity), the pipeline's `encode_prompt`, one forward per call; CFG pairs in
the partial denoising, as the pipeline samples.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from .base import DenoiserFamily, ForwardArgument
from .original_keys import FusedKey, OriginalKeyFamily

_IMAGE, _TEXT = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")


class SD3Family(OriginalKeyFamily, DenoiserFamily):
    name = "sd3"
    label = "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel)"
    denoiser_classes = (SD3Transformer2DModel,)
    path_signature = re.compile(r"^transformer_blocks[._]\d+[._](attn2|ff_context|attn[._]add_q_proj)")
    pooled_argument = ForwardArgument("pooled_projections", 2)
    observed_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L and CLIP-G, whose pooled outputs it joins

    def architecture(self, denoiser: nn.Module) -> str:
        dual = bool(getattr(denoiser.config, "dual_attention_layers", ()))
        return f"sd3{'.5' if dual else ''}-{denoiser.config.num_layers}-blocks"

    def fused_keys(self, denoiser: nn.Module) -> list[FusedKey]:
        """MMDiT names (`joint_blocks.{i}.x_block.attn.qkv`, ...), which ComfyUI and kohya's sd-scripts use."""
        keys: list[FusedKey] = []
        for index, block in enumerate(denoiser.transformer_blocks):
            x, context, ours = f"joint_blocks.{index}.x_block", f"joint_blocks.{index}.context_block", f"transformer_blocks.{index}"
            keys += [
                FusedKey(f"{x}.attn.qkv", [f"{ours}.attn.{n}" for n in _IMAGE]),
                FusedKey(f"{x}.attn.proj", [f"{ours}.attn.to_out.0"]),
                FusedKey(f"{x}.mlp.fc1", [f"{ours}.ff.net.0.proj"]),
                FusedKey(f"{x}.mlp.fc2", [f"{ours}.ff.net.2"]),
                FusedKey(f"{context}.attn.qkv", [f"{ours}.attn.{n}" for n in _TEXT]),
            ]
            if block.attn2 is not None:
                keys += [FusedKey(f"{x}.attn2.qkv", [f"{ours}.attn2.{n}" for n in _IMAGE]),
                         FusedKey(f"{x}.attn2.proj", [f"{ours}.attn2.to_out.0"])]
            if not block.context_pre_only:
                keys += [FusedKey(f"{context}.attn.proj", [f"{ours}.attn.to_add_out"]),
                         FusedKey(f"{context}.mlp.fc1", [f"{ours}.ff_context.net.0.proj"]),
                         FusedKey(f"{context}.mlp.fc2", [f"{ours}.ff_context.net.2"])]
        return keys

    def text_states(self, pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioning(pipe, texts, pipe._execution_device)

    # ------------------------------------------------------------------ training
    def conditioning(self, pipe: Any, texts: list[str], device: torch.device | str,
                     clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, clip_skip=clip_skip,
        )
        return embeds, pooled

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None, guidance: float = 1.0
                ) -> torch.Tensor:
        return denoiser(hidden_states=latents, timestep=timestep.expand(latents.shape[0]), encoder_hidden_states=text,
                        pooled_projections=pooled, return_dict=False)[0]


FAMILY = SD3Family()
