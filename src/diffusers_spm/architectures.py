"""The UNet layouts of SD 1.x, 2.x and XL, built on the meta device (no weights, no download).

They let a membrane file be mapped to module paths, checked, or converted without a checkpoint:
reference names are resolved against a real module tree, never parsed.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch
from diffusers import UNet2DConditionModel

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
        "Pass the base model it was made for (`--base`)."
    )


def name_to_path(membrane: Membrane, base: str | None = None) -> dict[str, str]:
    """Module paths for the membrane's layers, from `base` (a model folder or Hub id) or a known layout."""
    if base is not None:
        from .bases import unet_config as base_unet_config

        config = base_unet_config(base)
        return {name: path for name, (path, _) in membrane_targets(meta_unet(config)).items()}
    return {name: path for name, (path, _) in layout(detect_architecture(membrane)).items()}
