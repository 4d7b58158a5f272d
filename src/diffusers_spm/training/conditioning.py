"""Text conditioning for the trainer's denoiser calls, the same for every family.

A row carries the text states the denoiser receives `[L, d]` and, where it takes one, a pooled
embedding (SDXL's second encoder, SD3's two CLIPs, Flux's CLIP-L); SDXL rows also carry the six
size/crop time ids. Every denoiser call of the trainer is a stack of such rows, so batching calls
is concatenation. The family says how prompts become rows (`DenoiserFamily.conditioning`) and how
rows enter the denoiser (`DenoiserFamily.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..families import DenoiserFamily

# A handful of the CLIP ImageNet prompt templates, for `use_template`.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a close-up photo of a {}.", "a bright photo of a {}.", "a cropped photo of the {}.", "a painting of a {}.",
    "a rendering of a {}.", "a sculpture of a {}.", "a drawing of a {}.", "art of the {}.",
    "a good photo of a {}.", "a toy {}.", "a cartoon {}.", "a black and white photo of the {}.",
)


@dataclass
class Conditioning:
    """Rows of denoiser conditioning: `text` [B, L, d], `pooled` [B, p] where the denoiser takes it, and for
    SDXL `time_ids` [B, 6]."""

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

    def _parts(self) -> tuple[torch.Tensor | None, ...]:
        return self.text, self.pooled, self.time_ids

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        parts = list(zip(*(item._parts() for item in items)))
        return Conditioning(*(None if p[0] is None else torch.cat(p) for p in parts))


class PromptEncoder:
    """Encodes prompts once with the pipeline's own `encode_prompt` (through the family, so clip skip
    and the several encoders behave as at inference) and caches them on `device`. The text encoders
    run where they are: on the CPU when offloaded (`train.offload_text_encoders`)."""

    def __init__(self, pipe: Any, family: DenoiserFamily, device: torch.device, clip_skip: int | None,
                 encoder_device: torch.device) -> None:
        self.pipe, self.family, self.device, self.encoder_device = pipe, family, device, encoder_device
        # Reference: clip_skip 1 = last layer. diffusers: clip_skip 1 = one layer skipped.
        self.clip_skip = clip_skip - 1 if clip_skip and clip_skip > 1 else None
        self._cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> Conditioning:
        if prompt not in self._cache:
            text, pooled = self.family.conditioning(self.pipe, [prompt], self.encoder_device, clip_skip=self.clip_skip)
            self._cache[prompt] = Conditioning(text.to(self.device), None if pooled is None else pooled.to(self.device))
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
