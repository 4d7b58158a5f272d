"""Base models as users name them: a diffusers folder, a Hub id, or `concept-world` / `concept-world-sd3`
(the embedded worlds: the UNet one and the diffusion-transformer one).

Every command that takes `--base` goes through here, so the alias and the errors (a missing folder,
a folder that is not a pipeline, a model that is neither cached nor reachable) are the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from huggingface_hub.errors import HFValidationError

from .utils import torch_dtype

CONCEPT_WORLD = "concept-world"
CONCEPT_WORLD_SD3 = "concept-world-sd3"
_WORLDS = f"`{CONCEPT_WORLD}` or `{CONCEPT_WORLD_SD3}`"
BASE_HELP = f"diffusers model folder, Hub id, or {_WORLDS} (the embedded worlds: UNet, DiT)"


class BaseModelError(ValueError):
    """A `--base` that names no loadable diffusers pipeline."""


def resolve_base(base: str | os.PathLike, needs: str | tuple[str, ...] = "model_index.json") -> str:
    """The folder or Hub id that `base` names; a local folder must hold `needs` (a pipeline's index, or
    one of the denoiser configs where only the denoiser's layout is read)."""
    from .concept_world.model import world_named

    text = str(base)
    world = world_named(text)
    if world is not None:
        return str(world.directory)
    path = Path(text).expanduser()
    if path.is_file():
        raise BaseModelError(f"{text} is a file; a base model is a diffusers folder (with model_index.json), "
                             f"a Hub id, or {_WORLDS}.")
    if path.is_dir():
        needs = (needs,) if isinstance(needs, str) else needs
        if not any((path / need).is_file() for need in needs):
            raise BaseModelError(f"{text} is a folder but not a diffusers pipeline (no {' or '.join(needs)}); pass a "
                                 f"folder written by `save_pretrained`, a Hub id, or {_WORLDS}.")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise BaseModelError(f"No folder {text}; a base model is a diffusers folder, a Hub id, or {_WORLDS}.")
    return text


def from_pretrained(base: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained` for whatever `base` names, its failures as one sentence.

    Components the pipeline was saved without (`[null, null]` in its index, e.g. SD3 with
    `text_encoder_3=None`) are passed as None, which diffusers requires to load such a folder."""
    from .concept_world.model import world_named

    source = resolve_base(base)
    try:
        index = DiffusionPipeline.load_config(source)
        absent = {name: None for name, value in index.items() if value == [None, None]}
        pipe = DiffusionPipeline.from_pretrained(source, **{**absent, **kwargs})
    except (OSError, HFValidationError) as exc:
        raise BaseModelError(f"Cannot load the base model {str(base)!r}: {_first_line(exc)}") from exc
    world = world_named(str(base))
    if world is not None:
        pipe.register_to_config(_name_or_path=world.name)  # metadata names an embedded world, not this machine's path
    return pipe


def load_base_pipeline(base: str | os.PathLike, dtype: str = "fp32", device: str | None = None) -> DiffusionPipeline:
    """A text-to-image pipeline with SPM support, on `device` (default: this process's accelerate device)."""
    from accelerate import PartialState

    from .pipeline import add_spm_support

    pipe = from_pretrained(base, torch_dtype=torch_dtype(dtype), safety_checker=None, requires_safety_checker=False)
    pipe = add_spm_support(pipe.to(device or PartialState().device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
