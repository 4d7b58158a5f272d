"""Adding and removing this package's diffusers hooks (on layers, the UNet and text encoders).

Removing the last hook of a module leaves it exactly as it was before the first: no hook registry
and no instance `forward` (diffusers' registry leaves the class's own forward behind as one).
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn


def get_hook(module: nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(name) if registry is not None else None


def add_hook(module: nn.Module, hook: ModelHook, name: str) -> ModelHook:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


def remove_hook(module: nn.Module, name: str) -> None:
    """Remove hook `name` from `module` (not from its children); with no hook left, tidy the registry away."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    restored = module.__dict__.get("forward")
    if not registry.hooks and getattr(restored, "__func__", None) is type(module).forward:
        del module._diffusers_hook
        del module.forward
