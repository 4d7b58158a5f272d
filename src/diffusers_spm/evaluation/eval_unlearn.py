"""The `spm` technique for eval-unlearn (https://pypi.org/project/eval-unlearn/), registered through its
`eval_unlearn.techniques` entry point, so its runners, attack metrics and leaderboard can score SPM.

eval-unlearn builds a technique as `SPMTechnique(**technique_config)` and calls
`generate(prompts, seed=None, **kwargs) -> list[PIL.Image]`, prompt i seeded with `seed + i` as its
built-in techniques do. A config, e.g. in an `eval-unlearn run` YAML:

    technique:
      name: spm
      config: {model_id: CompVis/stable-diffusion-v1-4, membranes: [nudity], transport: true}
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..transport import TransportConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SPMConfig:
    """`membranes`: paths, Hub ids or registry short names; empty means the short name `erase_concept`."""

    model_id: str = "CompVis/stable-diffusion-v1-4"
    membranes: Sequence[str] = ()
    erase_concept: str | None = None
    transport: bool = True
    transport_metric: str = TransportConfig.metric
    power: float = TransportConfig.power
    scale: float = 1.0
    device: str | None = None
    use_fp16: bool = True
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 1

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SPMConfig:
        """Unknown keys are ignored with a warning: eval-unlearn passes one config to every component."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            logger.warning("spm technique: ignoring config keys %s.", ", ".join(unknown))
        return cls(**{k: v for k, v in config.items() if k in fields})

    @property
    def membrane_set(self) -> tuple[str, ...]:
        if self.membranes:
            return tuple([self.membranes] if isinstance(self.membranes, str) else self.membranes)
        if self.erase_concept:
            return (self.erase_concept,)
        raise ValueError("The spm technique needs `membranes` (paths, Hub ids, short names) or `erase_concept`.")


class SPMTechnique:
    """A base model with membranes loaded, behind eval-unlearn's technique interface."""

    def __init__(self, **config: Any) -> None:
        from ..bases import load_base_pipeline

        self.config = SPMConfig.from_dict(config)
        self.device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "fp16" if self.config.use_fp16 and self.device.startswith("cuda") else "fp32"
        self.pipe = load_base_pipeline(self.config.model_id, dtype, self.device)
        membranes = self.config.membrane_set
        transport = TransportConfig(enabled=self.config.transport, metric=self.config.transport_metric,
                                    power=self.config.power)
        self._membranes = contextlib.ExitStack()  # they stay loaded until `close`
        self._membranes.enter_context(self.pipe.spm_applied(
            membranes, [f"spm{i}" for i in range(len(membranes))], scale=self.config.scale, transport=transport))
        logger.info("spm technique: %s with membranes %s.", self.config.model_id, ", ".join(self.config.membrane_set))

    def close(self) -> None:
        """Unload the membranes; the pipeline is the base model again."""
        self._membranes.close()

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int | None = None, **kwargs: Any) -> list[Any]:
        """One image per prompt; call arguments in `kwargs` override the config's."""
        arguments = {
            "num_inference_steps": self.config.num_inference_steps,
            "guidance_scale": self.config.guidance_scale,
            "height": self.config.height,
            "width": self.config.width,
            **kwargs,
        }
        images: list[Any] = []
        size = self.config.batch_size
        for start in range(0, len(prompts), size):
            batch = list(prompts[start : start + size])
            generator = None
            if seed is not None:
                generator = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
            images += self.pipe(prompt=batch, generator=generator, **arguments).images
        return images
