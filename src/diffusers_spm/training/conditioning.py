"""Text conditioning for the trainer's UNet calls, the same for SD 1.x/2.x and SDXL.

SD rows carry the text-encoder output `[77, d]`; SDXL rows also carry the pooled embedding of the
second encoder and the six size/crop time ids. Every UNet call of the trainer is a stack of such
rows, so batching calls is concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# A handful of the CLIP ImageNet prompt templates, for `use_template`.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a close-up photo of a {}.", "a bright photo of a {}.", "a cropped photo of the {}.", "a painting of a {}.",
    "a rendering of a {}.", "a sculpture of a {}.", "a drawing of a {}.", "art of the {}.",
    "a good photo of a {}.", "a toy {}.", "a cartoon {}.", "a black and white photo of the {}.",
)


@dataclass
class Conditioning:
    """Rows of UNet conditioning: `text` [B, L, d] and, for SDXL, `pooled` [B, p] and `time_ids` [B, 6]."""

    text: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.text.shape[0]

    def __getitem__(self, rows: int | slice | torch.Tensor) -> "Conditioning":
        """Row `i` (kept as a batch of one), a slice of rows, or the rows of an index tensor."""
        index = slice(rows, rows + 1) if isinstance(rows, int) else rows
        return Conditioning(*(None if t is None else t[index] for t in self._parts()))

    def repeat(self, times: int) -> "Conditioning":
        """Each row `times` times in a row (`repeat_interleave`), as the reference lays out batches."""
        return Conditioning(*(None if t is None else t.repeat_interleave(times, dim=0) for t in self._parts()))

    def with_time_ids(self, time_ids: torch.Tensor | None) -> "Conditioning":
        if time_ids is None:
            return self
        return Conditioning(self.text, self.pooled, time_ids.to(self.text.device).expand(len(self), -1))

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.text}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def _parts(self) -> tuple[torch.Tensor | None, ...]:
        return self.text, self.pooled, self.time_ids

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        parts = list(zip(*(item._parts() for item in items)))
        return Conditioning(*(None if p[0] is None else torch.cat(p) for p in parts))


class PromptEncoder:
    """Encodes prompts once with the pipeline's own `encode_prompt` (so clip skip and SDXL's two
    encoders behave as at inference) and caches them."""

    def __init__(self, pipe: Any, device: torch.device, clip_skip: int | None) -> None:
        self.pipe = pipe
        self.device = device
        self.is_xl = hasattr(pipe, "text_encoder_2")
        # Reference: clip_skip 1 = last layer. diffusers: clip_skip 1 = one layer skipped.
        self.clip_skip = clip_skip - 1 if clip_skip and clip_skip > 1 else None
        self._cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> Conditioning:
        if prompt not in self._cache:
            if self.is_xl:
                text, _, pooled, _ = self.pipe.encode_prompt(
                    prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                    clip_skip=self.clip_skip,
                )
                self._cache[prompt] = Conditioning(text, pooled)
            else:
                text, _ = self.pipe.encode_prompt(prompt, self.device, 1, False, clip_skip=self.clip_skip)
                self._cache[prompt] = Conditioning(text)
        return self._cache[prompt]


def sdxl_time_ids(height: int, width: int, dynamic_crops: bool, generator: torch.Generator) -> torch.Tensor:
    """`[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`; with `dynamic_crops` the original
    size is the target scaled by U(1, 3) and the crop is uniform in it, as in the reference."""
    original, crop = (height, width), (0, 0)
    if dynamic_crops:
        scale = float(torch.rand((), generator=generator)) * 2 + 1
        original = (int(height * scale), int(width * scale))
        crop = (int(torch.randint(0, original[0] - height + 1, (), generator=generator)),
                int(torch.randint(0, original[1] - width + 1, (), generator=generator)))
    return torch.tensor([[*original, *crop, height, width]], dtype=torch.float32)
