"""Sana (`SanaTransformer2DModel`): linear-attention DiT blocks with cross-attention to a Gemma-2 encoder.

Membrane layers, per block: self-attention and cross-attention q/k/v/out (`attn1.*`, `attn2.*`,
where `attn2.to_k`/`to_v` read the text) and the feed-forward's pointwise convolutions
(`ff.conv_inverted`, `ff.conv_point`); not the depthwise `ff.conv_depth` (a grouped convolution
cannot hold a rank-1 pair over its channels) and no AdaLN parameters (Sana's modulation is a
`scale_shift_table`, not a layer).

Transport: `encode_prompt` gives the Gemma-2 states the transformer receives (`clipcos`, without
the pipeline's `complex_human_instruction` preamble, for prompts and concepts alike); Gemma is
causal, so its output at the last real token summarises the text (`eoscos`). Tokens: the Gemma
tokenizer and its input embeddings (`tokensim`). CFG runs in one batch, `[negative, prompt]`.
The transformer takes no pooled text to trace rows by, so outside the per-call route (`prompt_embeds`,
a hand-written loop) each row is rated by the cosine of its text states.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import SanaTransformer2DModel

from .base import DenoiserFamily


class SanaFamily(DenoiserFamily):
    name = "sana"
    label = "Sana (SanaTransformer2DModel)"
    denoiser_classes = (SanaTransformer2DModel,)
    path_signature = re.compile(r"^transformer_blocks[._]\d+[._](attn1|ff[._]conv)")

    def text_states(self, pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False,
                                                device=pipe._execution_device, num_images_per_prompt=1)
        last = mask.long().cumsum(1).argmax(1)  # the last position the mask keeps
        return embeds, embeds[torch.arange(embeds.shape[0], device=embeds.device), last]


FAMILY = SanaFamily()
