"""The compared conditions: the base model, each membrane set with and without Facilitated Transport,
the same files as a plain LoRA, and SLD. All are applied to one loaded pipeline, and removed after."""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from diffusers import DiffusionPipeline

from ..hub import resolve_membrane
from ..pipeline import add_spm_support
from ..transport import TransportConfig
from ..utils import torch_dtype

COMPARE_CHOICES = ("base", "spm", "spm-no-transport", "lora", "sld")

# SLD's configurations (the values of diffusers' SafetyConfig); the reference evaluates "strong".
SLD_PRESETS: dict[str, dict[str, float]] = {
    "weak": {"sld_warmup_steps": 15, "sld_guidance_scale": 20, "sld_threshold": 0.0,
             "sld_momentum_scale": 0.0, "sld_mom_beta": 0.0},
    "medium": {"sld_warmup_steps": 10, "sld_guidance_scale": 1000, "sld_threshold": 0.01,
               "sld_momentum_scale": 0.3, "sld_mom_beta": 0.4},
    "strong": {"sld_warmup_steps": 7, "sld_guidance_scale": 2000, "sld_threshold": 0.025,
               "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7},
    "max": {"sld_warmup_steps": 0, "sld_guidance_scale": 5000, "sld_threshold": 1.0,
            "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7},
}

Kind = Literal["base", "spm", "spm-no-transport", "lora", "sld"]


@dataclass(frozen=True)
class EvalCondition:
    """One way of generating; `membranes` is one membrane set (paths, Hub ids or registry short names)."""

    kind: Kind
    membranes: tuple[str, ...] = ()
    scale: float = 1.0
    transport_metric: str = TransportConfig.metric
    power: float = TransportConfig.power
    sld_concept: str | None = None
    sld_preset: str = "strong"

    @property
    def name(self) -> str:
        if not self.membranes:
            return self.kind
        return f"{self.kind}[{'+'.join(membrane_label(m) for m in self.membranes)}]"

    @property
    def slug(self) -> str:
        """The condition's image folder name."""
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.name).strip("_")

    @contextmanager
    def applied(self, pipe: DiffusionPipeline) -> Iterator[tuple[DiffusionPipeline, dict[str, Any]]]:
        """The pipeline to generate with and extra call arguments; `pipe` is restored on exit."""
        if self.kind == "base":
            yield pipe, {}
        elif self.kind in ("spm", "spm-no-transport"):
            pipe = add_spm_support(pipe)
            names = [f"eval{i}" for i in range(len(self.membranes))]
            transport = TransportConfig(enabled=self.kind == "spm", metric=self.transport_metric, power=self.power)
            with pipe.spm_applied(self.membranes, names, scale=self.scale, transport=transport):
                yield pipe, {}
        elif self.kind == "lora":
            with loras_applied(pipe, self.membranes, [f"eval{i}" for i in range(len(self.membranes))], self.scale):
                yield pipe, {}
        else:
            yield sld_pipeline(pipe, self.sld_concept), dict(SLD_PRESETS[self.sld_preset])


@contextmanager
def loras_applied(pipe: DiffusionPipeline, membranes: Sequence[str | Path], adapter_names: Sequence[str],
                  scale: float = 1.0) -> Iterator[list[str]]:
    """Membrane files loaded as plain LoRAs (no transport) for a block, then deleted: only these."""
    loaded: list[str] = []
    try:
        for membrane, name in zip(membranes, adapter_names, strict=True):
            pipe.load_lora_weights(str(resolve_membrane(membrane)[0]), adapter_name=name)
            loaded.append(name)
        pipe.set_adapters(loaded, adapter_weights=[scale] * len(loaded))
        yield loaded
    finally:
        if loaded:
            pipe.delete_adapters(loaded)
        if not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()  # no LoRA left: unwrap the layers too


def membrane_label(membrane: str) -> str:
    """A short name for a membrane in tables and folder names: a file's stem, else the id itself."""
    path = Path(membrane)
    return path.stem if path.suffix else path.name


def sld_pipeline(pipe: DiffusionPipeline, concept: str | None) -> DiffusionPipeline:
    """diffusers' `StableDiffusionPipelineSafe` over the same modules (no copy of the weights)."""
    from diffusers import StableDiffusionPipelineSafe

    accepted = inspect.signature(StableDiffusionPipelineSafe.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted}
    components.update(safety_checker=None, requires_safety_checker=False)
    safe = StableDiffusionPipelineSafe(**components)
    safe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    if concept:
        safe.safety_concept = concept
    return safe


def build_conditions(
    membrane_sets: Sequence[Sequence[str]],
    compare: Sequence[str] = ("base", "spm", "spm-no-transport"),
    scale: float = 1.0,
    transport_metric: str = TransportConfig.metric,
    power: float = TransportConfig.power,
    sld_concept: str | None = None,
    sld_preset: str = "strong",
    needs_base: bool = False,
) -> list[EvalCondition]:
    """Every requested kind, the membrane kinds once per membrane set; `base` first when a task needs it."""
    if sld_preset not in SLD_PRESETS:
        raise ValueError(f"Unknown SLD preset {sld_preset!r}; choose from {', '.join(SLD_PRESETS)}.")
    unknown = set(compare) - set(COMPARE_CHOICES)
    if unknown:
        raise ValueError(f"Unknown --compare {sorted(unknown)}; choose from {', '.join(COMPARE_CHOICES)}.")
    kinds = list(dict.fromkeys(["base", *compare] if needs_base else compare))
    if any(k in ("spm", "spm-no-transport", "lora") for k in kinds) and not membrane_sets:
        raise ValueError("Membrane conditions need at least one `--spm`.")
    conditions: list[EvalCondition] = []
    for kind in kinds:
        if kind in ("base", "sld"):
            conditions.append(EvalCondition(kind, sld_concept=sld_concept, sld_preset=sld_preset) if kind == "sld"
                              else EvalCondition(kind))
        else:
            conditions += [EvalCondition(kind, tuple(s), scale, transport_metric, power) for s in membrane_sets]
    return conditions
