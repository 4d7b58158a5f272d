"""Denoisers built on the meta device (no weights): the shipped SD 1.x, 2.x and XL UNet layouts, or
any supported family's from a model folder's config.

They let a membrane file be mapped to module paths, checked, or converted without a checkpoint:
reference names are resolved against a real module tree, never parsed.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .membrane import Membrane, MembraneFormatError
from .controller import membrane_targets

ARCHITECTURES = ("sd1", "sd2", "sdxl")


def unet_config(architecture: str) -> dict:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}.")
    path = resources.files("diffusers_spm") / "assets" / "unet_layouts" / f"{architecture}.json"
    return json.loads(path.read_text())


def meta_unet(config: dict) -> UNet2DConditionModel:
    """A UNet with the given config on the meta device: the module tree and shapes, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@functools.lru_cache(maxsize=None)
def layout(architecture: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Reference name -> (module path, weight shape) of every adapted layer of `architecture`."""
    targets = membrane_targets(meta_unet(unet_config(architecture)))
    return {name: (path, tuple(module.weight.shape)) for name, (path, module) in targets.items()}


def detect_architecture(membrane: Membrane) -> str:
    """The known architecture whose layers (names and shapes) hold every layer of `membrane`."""
    for architecture in ARCHITECTURES:
        known = layout(architecture)
        if all(
            name in known and known[name][1][:2] == (module.out_features, module.in_features)
            for name, module in membrane.modules.items()
        ):
            return architecture
    raise MembraneFormatError(
        f"The membrane's {len(membrane.modules)} layers match none of {', '.join(ARCHITECTURES)}. "
        "Pass the base model it was made for (`--base`; diffusion transformers always need it)."
    )


def meta_denoiser(base: str) -> nn.Module:
    """The denoiser of the model at `base` (a folder, Hub id or `concept-world`) on the meta device,
    whatever its family; only its `unet/` or `transformer/` config is read."""
    from .bases import BaseModelError, resolve_base
    from .families import FAMILIES, supported

    source = resolve_base(base, needs=tuple(f"{f.denoiser_attribute}/config.json" for f in FAMILIES.values()))
    for family in FAMILIES.values():
        cls = family.denoiser_classes[0]
        try:
            config = cls.load_config(source, subfolder=family.denoiser_attribute)
        except (OSError, ValueError):
            continue
        if config.get("_class_name") in {c.__name__ for c in family.denoiser_classes}:
            with torch.device("meta"):
                return cls.from_config(config)
    raise BaseModelError(f"{base} has no unet/ or transformer/ config of a supported denoiser ({supported()}).")


def denoiser_for(membrane: Membrane, base: str | None = None) -> nn.Module:
    """The denoiser a membrane's layers are named against: `base`'s, or a known UNet layout that fits."""
    if base is not None:
        return meta_denoiser(base)
    return meta_unet(unet_config(detect_architecture(membrane)))
