"""Latent Anchoring: random text embeddings on which the membrane must not change the denoiser.

Each anchor is Gaussian noise the shape of the target embedding, normalised, and accepted with
probability `1 - cos(noise, target)` (so directions close to the target are rejected more often);
it is then rescaled to `U(0.8, 1.2) * ||target||` (docs/training.md, "The algorithm"). Entries that
are exactly zero in the target stay zero: they are structural, zero for every prompt (SD3 pads the
CLIP states to the T5 width, and its T5 rows are zeros without T5), so noise there would anchor
inputs the denoiser never receives; CLIP states (SD 1.x/2.x/XL) have none, so the reference's anchors
are unchanged. All draws come from the trainer's generator, so a run (and a resumed run) is reproducible.
"""

from __future__ import annotations

import torch


def sample_anchor_embeddings(target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` anchors shaped like `target` ([1, ...]), stacked on dim 0, on `target`'s device and dtype."""
    flat_target = target.detach().float().cpu().flatten()
    target_norm = flat_target.norm()
    support = (flat_target != 0).float()
    anchors = []
    while len(anchors) < count:
        while True:
            noise = torch.randn(flat_target.shape, generator=generator) * support
            noise = noise / noise.norm()
            similarity = torch.dot(noise, flat_target) / target_norm
            if torch.rand((), generator=generator) < 1 - similarity:
                break
        scale = torch.rand((), generator=generator) * 0.4 + 0.8
        anchors.append(scale * noise * target_norm)
    return torch.stack(anchors).view(count, *target.shape[1:]).to(target.device, target.dtype)
