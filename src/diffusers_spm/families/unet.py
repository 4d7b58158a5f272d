"""SD 1.x, 2.x and XL: `UNet2DConditionModel`.

Membrane layers: every Linear/Conv2d inside each `Transformer2DModel` (the reference's rule).
Transport: the text encoders' hooks trace each row of `encoder_hidden_states` (CLIP; SDXL's two
encoders side by side) to its texts, on every route (`encodings.py`); CFG runs in one batch,
`[negative rows, prompt rows]`.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..membrane import Membrane
from .base import DenoiserFamily, ForwardArgument


class UNetFamily(DenoiserFamily):
    name = "unet"
    label = "Stable Diffusion 1.x / 2.x / XL (UNet2DConditionModel)"
    denoiser_classes = (UNet2DConditionModel,)
    denoiser_attribute = "unet"
    batch_argument = ForwardArgument("sample", 0)
    text_argument = ForwardArgument("encoder_hidden_states", 2)
    excluded_layers = re.compile(r"(?!)")  # every Linear/Conv2d of a transformer block
    path_signature = re.compile(r"^(down_blocks|mid_block|up_blocks)[._]")
    file_layout = "reference"  # the reference SPM layout (kohya names), which SD-WebUI reads too
    rates_per_call = False  # CLIP rows (SDXL: two side by side) are traced to their texts by the hooks
    observed_encoders = ("text_encoder", "text_encoder_2")

    def blocks(self, denoiser: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for path, module in denoiser.named_modules():
            if isinstance(module, Transformer2DModel):
                yield path, module

    def architecture(self, denoiser: nn.Module) -> str:
        """sd1 / sd2 / sdxl by text width, else the width itself."""
        config = getattr(denoiser, "config", None)
        width = getattr(config, "cross_attention_dim", None)
        if getattr(config, "addition_embed_type", None) == "text_time":
            return "sdxl" if width == 2048 else f"sdxl-like (cross_attention_dim={width})"
        return {768: "sd1", 1024: "sd2"}.get(width, f"custom (cross_attention_dim={width})")

    def variant_hint(self, membrane: Membrane, denoiser: nn.Module) -> str:
        width = membrane.cross_attention_dim
        if width is None:
            return ""
        made_for = f" ({membrane.architecture})" if membrane.architecture else ""
        return f" The membrane was made for text width {width}{made_for}; this UNet is {self.architecture(denoiser)}."

    def text_states(self, pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (77 x d) states the UNet sees, and each at the first tokenizer's end-of-text token."""
        embeds = pipe.encode_prompt(
            prompt=texts, device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
        ends = torch.as_tensor(self.token_sets(pipe, texts)[1], device=embeds.device)
        return embeds, embeds[torch.arange(len(texts), device=embeds.device), ends]


    # ------------------------------------------------------------------ training
    def prediction_type(self, pipe: Any) -> str:
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    def size_conditioned(self, denoiser: nn.Module) -> bool:
        return getattr(denoiser.config, "addition_embed_type", None) == "text_time"

    def conditioning(self, pipe: Any, texts: list[str], device: torch.device | str,
                     clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP states (SDXL: both encoders side by side) and, for SDXL, the second encoder's pooled output."""
        if hasattr(pipe, "text_encoder_2"):
            text, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False, clip_skip=clip_skip)
            return text, pooled
        return pipe.encode_prompt(texts, device, 1, False, clip_skip=clip_skip)[0], None

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None, guidance: float = 1.0
                ) -> torch.Tensor:
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        return denoiser(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample


FAMILY = UNetFamily()
