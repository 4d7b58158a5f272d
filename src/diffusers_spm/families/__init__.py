"""The denoiser families membranes know, one module each; the registry that picks one.

Adding a family is one module here that defines a `DenoiserFamily` subclass and a `FAMILY`
instance, listed in `_MODULES`, plus its tests (docs/architecture.md, "Adding a denoiser family").
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..membrane import KOHYA_PREFIX, Membrane
from .base import DenoiserFamily, ForwardArgument, RowLayout, TextEncoding

# Detection order matters where path signatures overlap: the most specific first.
_MODULES = ("unet", "flux", "sana", "sd3")

FAMILIES: dict[str, DenoiserFamily] = {}


class UnsupportedDenoiserError(TypeError):
    """A pipeline or model whose denoiser no registered family describes."""


def register(family: DenoiserFamily) -> DenoiserFamily:
    """Make `family` known to `family_of` (third-party families may register themselves too)."""
    FAMILIES[family.name] = family
    return family


for _module in _MODULES:
    register(importlib.import_module(f"{__name__}.{_module}").FAMILY)


def supported() -> str:
    return "; ".join(f"{f.label} [{f.name}]" for f in FAMILIES.values())


_HOW_TO_ADD = ("To add one, write a small module in diffusers_spm/families/ (its layers, text encoders and row "
               "layout) and register it: docs/architecture.md, 'Adding a denoiser family'.")


def family_of(denoiser: nn.Module) -> DenoiserFamily:
    """The family of a denoiser module (UNet or transformer)."""
    for family in FAMILIES.values():
        if family.handles(denoiser):
            return family
    raise UnsupportedDenoiserError(
        f"SPM has no membrane layout for {type(denoiser).__name__}. Supported: {supported()}. {_HOW_TO_ADD}"
    )


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's denoiser, under whichever component name its family uses."""
    for family in FAMILIES.values():
        denoiser = getattr(pipe, family.denoiser_attribute, None)
        if denoiser is not None and family.handles(denoiser):
            return denoiser
    found = [f"{name}={type(getattr(pipe, name)).__name__}" for name in ("unet", "transformer")
             if getattr(pipe, name, None) is not None]
    raise UnsupportedDenoiserError(
        f"{type(pipe).__name__} cannot take membranes: its denoiser ({', '.join(found) or 'none found'}) is not one "
        f"SPM supports. Supported: {supported()}. {_HOW_TO_ADD}"
    )


def membrane_family(membrane: Membrane) -> DenoiserFamily | None:
    """The family a membrane was made for: its metadata, else the first family its layer paths match."""
    if membrane.family in FAMILIES:
        return FAMILIES[membrane.family]
    paths = [name.removeprefix(KOHYA_PREFIX) for name in membrane.modules]
    for family in FAMILIES.values():
        if any(family.path_signature.search(path) for path in paths):
            return family
    return None


def mismatch_hint(membrane: Membrane, denoiser: nn.Module) -> str:
    """One sentence on why a membrane may not fit `denoiser`: another family, or another variant of it."""
    family, made_for = family_of(denoiser), membrane_family(membrane)
    if made_for is not None and made_for is not family:
        return (f" The membrane was made for {made_for.label}; this denoiser is {family.label} "
                f"({family.architecture(denoiser)}).")
    return family.variant_hint(membrane, denoiser)


__all__ = [
    "FAMILIES",
    "DenoiserFamily",
    "ForwardArgument",
    "RowLayout",
    "TextEncoding",
    "UnsupportedDenoiserError",
    "denoiser_of",
    "family_of",
    "membrane_family",
    "mismatch_hint",
    "register",
    "supported",
]
