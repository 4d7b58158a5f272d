"""The web app (`diffusers-spm app`, extra `diffusers-spm[app]`): `session` holds the logic, `ui` the gradio page."""

from .session import Comparison, MembraneSession, MembraneSetting, shipped_membranes, split_prompts

__all__ = ["Comparison", "MembraneSession", "MembraneSetting", "shipped_membranes", "split_prompts"]
