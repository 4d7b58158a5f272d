"""The original-checkpoint key layout of diffusion transformers, as ComfyUI and kohya-style trainers
write LoRAs: `lora_unet_<original module path>`, with attention q/k/v fused into one `qkv` layer.

A fused layer's LoRA maps to the separate diffusers layers exactly: written block-diagonally (each
part keeps its own rank, as kohya's `split_qkv` does) it splits back into the same pairs; a dense
one (trained fused) shares its `down` among the parts and splits `up` by output rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..membrane import Membrane, MembraneFormatError, LowRankPair, kohya_name

if TYPE_CHECKING:
    from .base import DenoiserFamily


@dataclass(frozen=True)
class FusedKey:
    """One layer of the original checkpoint and the diffusers layers whose outputs it concatenates."""

    original: str
    parts: list[str]

    @property
    def name(self) -> str:
        return kohya_name(self.original)


def split(module: LowRankPair, widths: list[int], source: str) -> list[LowRankPair]:
    """A fused pair -> one pair per part, with the same product `up @ down * alpha / rank` per part."""
    if module.out_features != sum(widths):
        raise MembraneFormatError(f"{source}: its up weight has {module.out_features} rows; the fused layer has "
                                  f"{sum(widths)} ({' + '.join(map(str, widths))}).")
    ups = module.up.split(widths, dim=0)
    parts, rank = len(widths), module.rank
    part_rank = rank // parts
    block_diagonal = parts > 1 and rank % parts == 0 and all(
        not bool(up[:, :j * part_rank].any()) and not bool(up[:, (j + 1) * part_rank:].any()) for j, up in enumerate(ups)
    )
    if block_diagonal:
        rows = lambda j: slice(j * part_rank, (j + 1) * part_rank)  # noqa: E731
        return [LowRankPair(module.down[rows(j)].clone(), up[:, rows(j)].clone(), module.alpha * part_rank / rank)
                for j, up in enumerate(ups)]
    return [LowRankPair(module.down.clone(), up.clone(), module.alpha) for up in ups]


def fuse(modules: list[LowRankPair | None], widths: list[int]) -> LowRankPair:
    """Parts -> one block-diagonal pair; absent parts get zero rows. Scales that differ are baked into `up`."""
    present = [m for m in modules if m is not None]
    reference = present[0]
    downs, ups = [m.down for m in present], []
    rank = sum(m.rank for m in present)
    offset = 0
    for module, width in zip(modules, widths):
        up = reference.up.new_zeros(width, rank)
        if module is not None:
            factor = module.scale / reference.scale
            up[:, offset:offset + module.rank] = module.up if factor == 1.0 else module.up * factor
            offset += module.rank
        ups.append(up)
    return LowRankPair(torch.cat(downs), torch.cat(ups), reference.scale * rank)


class OriginalKeyFamily:
    """Mixin for families whose LoRAs circulate in the original-checkpoint layout."""

    def fused_keys(self: "DenoiserFamily", denoiser: nn.Module) -> list[FusedKey]:
        raise NotImplementedError

    def _widths(self: "DenoiserFamily", denoiser: nn.Module) -> dict[str, int]:
        return {path: layer.out_features for path, layer in self.targets(denoiser).values()}

    def to_runtime_names(self: "DenoiserFamily", membrane: Membrane, denoiser: nn.Module) -> Membrane:
        """Split the fused layers of a ComfyUI/kohya file into this runtime's layers; other files pass."""
        fused = {key.name: key for key in self.fused_keys(denoiser)}
        if not any(name in fused for name in membrane.modules):
            return membrane
        widths = self._widths(denoiser)
        modules: dict[str, LowRankPair] = {}
        for name, module in membrane.modules.items():
            key = fused.get(name)
            if key is None or any(part not in widths for part in key.parts):
                modules[name] = module  # not fused here: the compatibility check reports it if it fits nothing
                continue
            pieces = split(module, [widths[p] for p in key.parts], f"{key.original}")
            modules.update({kohya_name(part): piece for part, piece in zip(key.parts, pieces)})
        return dataclasses.replace(membrane, modules=modules)

    def to_original_names(self: "DenoiserFamily", membrane: Membrane, denoiser: nn.Module) -> Membrane:
        """The membrane keyed by original-checkpoint layers (q/k/v fused), for ComfyUI and kohya tools."""
        widths = self._widths(denoiser)
        modules: dict[str, LowRankPair] = {}
        placed: set[str] = set()
        for key in self.fused_keys(denoiser):
            parts = [membrane.modules.get(kohya_name(part)) for part in key.parts]
            if any(p is not None for p in parts):
                modules[key.name] = fuse(parts, [widths[p] for p in key.parts])
                placed.update(kohya_name(part) for part in key.parts)
        unplaced = sorted(set(membrane.modules) - placed)
        if unplaced:
            raise MembraneFormatError(
                f"{len(unplaced)} membrane layers have no place in the original {self.label} layout "
                f"(first: {unplaced[:3]}). Write the diffusers layout instead (`--to diffusers`)."
            )
        return dataclasses.replace(membrane, modules=modules)
