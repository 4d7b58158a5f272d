"""Flux.1 (dev, schnell, Kontext, Fill, ...): `FluxTransformer2DModel`.

Membrane layers: in each double-stream block, attention q/k/v/out on the image stream
(`attn.to_q/k/v`, `attn.to_out.0`) and the text stream (`attn.add_q/k/v_proj`, `attn.to_add_out`),
and both feed-forwards; in each single-stream block, `attn.to_q/k/v`, `proj_mlp` and `proj_out`
(the attention output and the MLP output share that one projection). Not the AdaLN modulation
(`norm1.linear`, `norm1_context.linear`, `norm.linear`) nor the time/guidance/text embedders.

Transport: the T5 sequence is what the transformer receives as `encoder_hidden_states`
(`clipcos`); the pooled CLIP-L output, which is its end-of-text state, serves `eoscos`. Tokens:
the CLIP tokenizer. Rows: Flux-dev is guidance-distilled (no negative rows); with `true_cfg_scale`
the negative prompt runs as a second call of the same size.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .base import DenoiserFamily, RowLayout
from .original_keys import FusedKey, OriginalKeyFamily

_QKV = ("to_q", "to_k", "to_v")


class FluxFamily(OriginalKeyFamily, DenoiserFamily):
    name = "flux"
    label = "Flux.1 (FluxTransformer2DModel)"
    denoiser_classes = (FluxTransformer2DModel,)
    row_layout = RowLayout.CFG_CALLS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    path_signature = re.compile(r"^single_transformer_blocks[._]")

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
        embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=pipe._execution_device,
                                               num_images_per_prompt=1)
        return embeds, pooled


FAMILY = FluxFamily()
