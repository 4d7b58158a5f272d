"""What the web app does, without the web: load membranes, set them, measure rates, compare images.

The gradio layout (`ui.py`) only wires these methods to widgets, so every behaviour here is tested
directly, and the browser test only has to show that the wiring works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..bases import CONCEPT_WORLD, CONCEPT_WORLD_SD3, load_base_pipeline
from ..transport import METRICS

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "clipcos_tokenuni"
DEFAULT_POWER = 2.0
StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass(frozen=True)
class MembraneSetting:
    """One loaded membrane as the app shows it: on or off, and its scale."""

    name: str
    enabled: bool = True
    scale: float = 1.0


@dataclass(frozen=True)
class Comparison:
    """One prompt's image without and with the membranes (same seed), and its rate per membrane."""

    prompt: str
    without: Image.Image
    with_membranes: Image.Image
    rates: dict[str, float]


def shipped_membranes(base: str) -> dict[str, Path]:
    """The membranes that come with `base`: an embedded world's, by name; none for other models."""
    from ..concept_world.model import world_named

    world = world_named(base)
    if world is None:
        return {}
    return {path.stem: path for path in sorted(world.membranes_dir.glob("*.safetensors"))}


def split_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("Type at least one prompt (one per line).")
    return prompts


class MembraneSession:
    """A pipeline with SPM support and the membranes a user loaded into it."""

    def __init__(self, base: str = CONCEPT_WORLD, device: str = "cpu", dtype: str = "fp32",
                 num_inference_steps: int | None = None, display_size: int = 256) -> None:
        self.base = base
        self.pipe = load_base_pipeline(base, dtype, device)
        self.shipped = shipped_membranes(base)
        # the world's 32x32 images need few steps and an enlargement to be seen
        self.num_inference_steps = num_inference_steps or (10 if base in (CONCEPT_WORLD, CONCEPT_WORLD_SD3) else 30)
        self.display_size = display_size
        self.settings: dict[str, MembraneSetting] = {}
        self.metric, self.power = DEFAULT_METRIC, DEFAULT_POWER

    # ------------------------------------------------------------ membranes
    def load(self, source: str | Path) -> str:
        """Load a shipped name, registry short name, Hub repo id or file; returns its adapter name."""
        text = str(source).strip()
        if not text:
            raise ValueError("Name a membrane: a shipped or registry short name, a Hub repo id, or upload a file.")
        path = self.shipped.get(text, text)
        name = Path(path).stem if Path(path).is_file() else text.replace("/", "_")
        self.pipe.load_spm(path, adapter_name=name)
        self.settings[name] = MembraneSetting(name)
        self._apply()
        return name

    def unload(self, name: str) -> None:
        self.pipe.unload_spm(name)
        del self.settings[name]
        if self.settings:
            self._apply()

    def configure(self, settings: Sequence[MembraneSetting], metric: str = DEFAULT_METRIC,
                  power: float = DEFAULT_POWER) -> None:
        """Switch membranes on or off, set their scales, and choose the transport rate and power."""
        if metric not in METRICS:
            raise ValueError(f"Unknown transport metric {metric!r}; choose from {', '.join(METRICS)}.")
        if power <= 0:
            raise ValueError(f"The transport power must be positive, got {power:g}.")
        unknown = [s.name for s in settings if s.name not in self.settings]
        if unknown:
            raise ValueError(f"No loaded membrane named {', '.join(unknown)}; loaded: {', '.join(self.settings) or 'none'}.")
        self.settings.update({s.name: s for s in settings})
        self.metric, self.power = metric, float(power)
        self._apply()

    @property
    def active(self) -> list[str]:
        return [s.name for s in self.settings.values() if s.enabled and s.scale > 0]

    def _apply(self) -> None:
        self.pipe.set_spm_scale({s.name: (s.scale if s.enabled else 0.0) for s in self.settings.values()})
        self.pipe.set_spm_transport(True, metric=self.metric, power=self.power)

    # ------------------------------------------------------------ measuring
    def rates(self, prompts: Sequence[str]) -> dict[str, list[float]]:
        """Each active membrane's transport rate for each prompt."""
        if not self.active:
            return {}
        rates = self.pipe.get_spm_transport_rates(list(prompts))
        return {name: rates[name] for name in self.active}

    def compare(self, prompts: Sequence[str], seed: int = 0, guidance_scale: float = 7.5,
                on_step: StepCallback | None = None) -> list[Comparison]:
        """Every prompt generated without and with the active membranes, from the same seed."""
        if not self.active:
            raise ValueError("Load a membrane and switch it on first.")
        prompts = list(prompts)
        rates = self.rates(prompts)
        total = 2 * self.num_inference_steps
        self.pipe.disable_spm()
        try:
            without = self._generate(prompts, seed, guidance_scale, on_step, 0, total)
        finally:
            self.pipe.enable_spm()
        with_membranes = self._generate(prompts, seed, guidance_scale, on_step, self.num_inference_steps, total)
        return [Comparison(p, a, b, {n: rates[n][i] for n in rates})
                for i, (p, a, b) in enumerate(zip(prompts, without, with_membranes))]

    def describe(self) -> str:
        """The active membranes and transport settings, as a caption says them."""
        scales = ", ".join(f"{s.name} x{s.scale:g}" for s in self.settings.values() if s.name in self.active)
        return f"with {scales} (transport {self.metric}, power {self.power:g})"

    def _generate(self, prompts: list[str], seed: int, guidance_scale: float, on_step: StepCallback | None,
                  done: int, total: int) -> list[Image.Image]:
        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(done + step + 1, total)
            return kwargs

        generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
        images = self.pipe(prompts, generator=generators, num_inference_steps=self.num_inference_steps,
                           guidance_scale=guidance_scale, callback_on_step_end=callback).images
        size = (self.display_size, self.display_size)
        return [image.resize(size, Image.NEAREST) if image.size[0] < self.display_size else image for image in images]
