"""An independent re-implementation of the reference implementation's inference semantics.

The reference patches each target layer's forward to `org_forward(x) + up(down(x)) * multiplier *
alpha / rank`, with `down`/`up` as Linear (or Conv2d with the base kernel / 1x1) modules. With
Facilitated Transport it multiplies every tensor of each membrane by the membrane's rate and
sums the membranes tensor by tensor (docs/transport.md). The tests and the benchmark compare against it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from diffusers_spm import Membrane, membrane_targets


class ReferenceLayer(nn.Module):
    """One reference adapter on one base layer (forward patched, as the reference does)."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha: float, multiplier: float) -> None:
        super().__init__()
        rank = down.shape[0]
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.org_forward = base.forward
        self.base = [base]
        self.previous = base.__dict__.get("forward")
        base.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale

    def remove(self) -> None:
        if self.previous is None:
            del self.base[0].forward
        else:
            self.base[0].forward = self.previous


def apply_reference(unet: nn.Module, membranes: list[Membrane], multiplier: float = 1.0,
                    rates: list[float] | None = None, combine: bool = True) -> list[ReferenceLayer]:
    """Patch `unet` like the reference. With `combine` (its transport path), tensors are scaled by
    the rates and summed membrane by membrane into ONE adapter per layer; without, each membrane
    gets its own adapter (the "N separate adapters" of the benchmark)."""
    targets = membrane_targets(unet)
    rates = rates if rates is not None else [1.0] * len(membranes)
    layers = []
    for name, (_, base) in targets.items():
        present = [(m.modules[name], r) for m, r in zip(membranes, rates) if name in m.modules]
        if not present:
            continue
        if combine:
            down = sum(mod.down * r for mod, r in present)
            up = sum(mod.up * r for mod, r in present)
            layers.append(ReferenceLayer(base, down, up, present[0][0].alpha, multiplier))
        else:
            for mod, r in present:
                layers.append(ReferenceLayer(base, mod.down, mod.up, mod.alpha, multiplier * r))
    return layers


def remove_reference(layers: list[ReferenceLayer]) -> None:
    for layer in reversed(layers):
        layer.remove()


def random_membrane(unet: nn.Module, concepts: list[str], seed: int, std: float = 0.05, rank: int = 1,
                    alpha: float = 1.0, only: Mapping[str, object] | None = None) -> Membrane:
    """A membrane of random weights for every adapted layer of `unet` (reference shapes)."""
    from diffusers_spm import LowRankPair

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (_, base) in membrane_targets(unet).items():
        if only is not None and name not in only:
            continue
        if isinstance(base, nn.Conv2d):
            down = torch.randn(rank, base.in_channels, *base.kernel_size, generator=g) * std
            up = torch.randn(base.out_channels, rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, base.in_features, generator=g) * std
            up = torch.randn(base.out_features, rank, generator=g) * std
        modules[name] = LowRankPair(down=down, up=up, alpha=alpha)
    return Membrane(modules=modules, concepts=concepts)
