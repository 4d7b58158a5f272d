"""`SPMPipelineMixin`: `load_spm`, `set_spm_scale`, `unload_spm`, ... on diffusers pipelines.

The mixin loads membranes into the denoiser's `MembraneController`, puts recording hooks on the
text encoders (so the controller can trace each row of the denoiser's text states to its tokens)
and opens a call scope per pipeline call (merged weights live in it); the gates themselves are
computed on the denoiser side, so every route into the denoiser gets the same ones. Families whose
text states cannot be traced (`DenoiserFamily.rates_per_call`: the diffusion transformers) are
rated from the call's prompt strings instead, laid out on the rows by the controller; on routes
without prompt strings (`prompt_embeds`, AutoPipeline, a hand-written loop) SD3's and Flux's rows
are traced through their pooled text, which the CLIP encoders' hooks record. It works on
any pipeline whose denoiser a registered family describes (`diffusers_spm.families`: SD 1.x/2.x/XL
UNets, SD3/3.5, Flux.1, Sana), with the text encoders, tokenizer and `encode_prompt` it reads.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from torch import nn

from .families import DenoiserFamily, RowLayout, TextEncoding, UnsupportedDenoiserError, denoiser_of, family_of
from .hub import resolve_membrane
from .membrane import Membrane
from .controller import MembraneController, MemoryMode, PromptGates
from .transport import Metric, TransportConfig

logger = logging.getLogger(__name__)


class SPMPipelineMixin:
    """Concept Semi-Permeable Membranes for a diffusers pipeline, mirroring the LoRA loader API."""

    # ------------------------------------------------------------------ loading
    def load_spm(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        scale: float = 1.0,
        **hub_kwargs: Any,
    ) -> str:
        """Load a membrane from a file, a folder, a Hub repo id or a registry short name (`"nudity"`);
        returns the name it is loaded under.

        `adapter_name` defaults to the file's stem or the short name; a name already loaded is an
        error, as in `load_lora_weights`. On any failure the pipeline is left as it was.
        """
        if isinstance(pretrained_model_name_or_path, (list, tuple)):
            raise TypeError("load_spm loads one membrane per call, as load_lora_weights does: call it once per "
                            "membrane, each with its adapter_name, or use spm_applied(sources, adapter_names) "
                            "for a block.")
        path, default_name = resolve_membrane(pretrained_model_name_or_path, weight_name, **hub_kwargs)
        name = adapter_name or default_name
        denoiser = self._spm_denoiser
        existing = MembraneController.of(denoiser)
        if existing is not None:
            existing.check_new_name(name)  # before reading the file
        membrane = self._spm_family.to_runtime_names(Membrane.from_file(path), denoiser)
        controller = MembraneController.of(denoiser, create=True)
        try:
            controller.add(name, membrane, dtype=denoiser.dtype, scale=scale)
            self._spm_prepare_concepts(controller, name)
        except BaseException:
            if name in controller.adapters:
                controller.remove(name)
            raise
        finally:
            if not controller.adapters:
                controller.detach()
        logger.info("Loaded membrane %r (%s) on %d layers.", name, ", ".join(membrane.concepts), len(membrane.modules))
        return name

    @contextlib.contextmanager
    def spm_applied(
        self,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        adapter_names: Sequence[str] | None = None,
        scale: float = 1.0,
        transport: TransportConfig | None = None,
        **hub_kwargs: Any,
    ) -> Iterator[list[str]]:
        """Membranes loaded for a block of work, then unloaded: only these, whatever else is loaded.

        `sources` are what `load_spm` takes, `adapter_names` their names (default: `load_spm`'s),
        each loaded at `scale`. `transport`, if given, holds for the block (for every loaded membrane:
        transport is one setting per pipeline); the previous setting comes back after it. Yields the
        names the membranes were loaded under.
        """
        sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        names = list(adapter_names) if adapter_names is not None else [None] * len(sources)
        if len(names) != len(sources):
            raise ValueError(f"Got {len(sources)} membranes but {len(names)} adapter names.")
        controller = MembraneController.of(self._spm_denoiser)
        previous = controller.transport if controller is not None and controller.adapters else None
        loaded: list[str] = []
        try:
            for source, name in zip(sources, names):
                loaded.append(self.load_spm(source, adapter_name=name, scale=scale, **hub_kwargs))
            if transport is not None and loaded:
                self.set_spm_transport(transport)
            yield loaded
        finally:
            if loaded:
                self.unload_spm(loaded)
            if previous is not None:
                self.set_spm_transport(previous)

    def unload_spm(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Remove one, several or (by default) all membranes; the denoiser is returned bit for bit."""
        controller = MembraneController.of(self._spm_denoiser)
        if controller is None:
            if adapter_names is not None:
                raise ValueError(f"No membranes are loaded, so {adapter_names!r} cannot be unloaded.")
            return
        if adapter_names is None:
            controller.detach()
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        controller.require(names)
        for name in names:
            controller.remove(name)
        if not controller.adapters:
            controller.detach()

    def save_spm(self, adapter_name: str, save_path: str | os.PathLike) -> Path:
        """Write a loaded membrane with our metadata: the reference layout for UNets, the diffusers/PEFT
        layout for diffusion transformers (`diffusers-spm convert --to kohya` for ComfyUI's)."""
        return self._spm_family.save(self._spm_controller().membrane(adapter_name), save_path, self._spm_denoiser)

    # ------------------------------------------------------------------ settings
    def set_spm_scale(self, scale: float | dict[str, float]) -> None:
        """One scale for every membrane, or `{"snoopy": 0.7, "van_gogh": 0.4}`."""
        controller = self._spm_controller()
        scales = scale if isinstance(scale, dict) else {name: scale for name in controller.names}
        controller.set_scales(scales)
        if controller.fused:
            logger.warning("Membranes %s are fused; new scales apply after `unfuse_spm()`.", controller.fused)

    def set_spm_transport(
        self,
        enabled: bool | TransportConfig = True,
        metric: Metric | None = None,
        power: float | None = None,
        cfg_rows: Literal["paired", "own"] | None = None,
        floor: float | None = None,
    ) -> None:
        """Facilitated Transport on (gates follow each prompt) or off (gates are the scales).

        Pass a `TransportConfig`, or `enabled` and the settings that differ from `TransportConfig`'s
        defaults (the reference's). `floor` is the lowest rate a membrane acts with on any prompt."""
        settings = {k: v for k, v in {"metric": metric, "power": power, "cfg_rows": cfg_rows, "floor": floor}.items()
                    if v is not None}
        if isinstance(enabled, TransportConfig):
            if settings:
                raise TypeError(f"Pass a TransportConfig or settings, not both (got {', '.join(settings)} too).")
            config = enabled
        else:
            config = TransportConfig(enabled=enabled, **settings)
        self._spm_controller().set_transport(config)

    def set_spm_memory(self, mode: MemoryMode = "auto") -> None:
        """How a forward whose rows share their gates (one prompt, or prompts alike) runs the adapted layers.

        `auto` (default): per layer and forward, the cheaper of the stacked form, `W x + U (G * D x)`, and
        one op on a transient `W + sum g_i dW_i` built for that op and freed after it: the merge wins
        once a forward has more input positions than about half the layer's width (real image sizes,
        long text states), and never holds more than one layer's copy. `stacked`: never copies a
        weight. `merged`: `W + sum g_i dW_i` built once per call for every layer and kept for the call
        (one extra copy of every adapted weight: about 1 GB fp32 on SD 1.x, over 20 GB on Flux; choose
        it only where that fits). Rows with different gates (a mixed batch) and quantized bases always
        run stacked. In every mode a call keeps each layer's gate-scaled `U` (membrane-sized) for its steps."""
        self._spm_controller().set_memory(mode)

    def get_spm_transport_rates(self, prompts: str | Sequence[str]) -> dict[str, list[float]]:
        """Raw transport rates in [0, 1], per membrane and prompt (before scale and power), as the
        denoiser's rows of these prompts are rated in a call."""
        controller = self._spm_controller()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return {name: [] for name in controller.names}
        rates = self._spm_prompt_rates(controller, prompts)
        if rates is None:
            raise ValueError("The membranes' concepts are not encoded; load them with `pipe.load_spm(...)`.")
        return {name: rates[:, i].tolist() for i, name in enumerate(controller.names)}

    def get_active_spms(self) -> list[str]:
        controller = MembraneController.of(self._spm_denoiser)
        return [] if controller is None else controller.active_names()

    def disable_spm(self) -> None:
        self._spm_controller().set_enabled(False)

    def enable_spm(self) -> None:
        self._spm_controller().set_enabled(True)

    def fuse_spm(self, scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Bake membranes into the denoiser's weights at fixed gates (`scale` x their scales, no transport).

        The original weight tensors are kept, so `unfuse_spm` restores them bit for bit; that costs
        one copy of the adapted layers' weights while fused.
        """
        controller = self._spm_controller()
        controller.fuse(list(adapter_names) if adapter_names is not None else controller.names, scale)

    def unfuse_spm(self) -> None:
        controller = MembraneController.of(self._spm_denoiser)
        if controller is not None:
            controller.unfuse()

    def to_json_string(self) -> str:
        """Write the diffusers class this pipeline extends (every SPM class carries its `__name__`) into
        `model_index.json`, so the saved folder reloads with plain `DiffusionPipeline.from_pretrained`
        (and with ours)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = type(self).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        controller = MembraneController.of(self._spm_denoiser)
        if controller is None or not controller.active():
            return super().__call__(*args, **kwargs)
        with controller.call_scope(self._spm_prompt_gates(controller, args, kwargs)):
            return super().__call__(*args, **kwargs)

    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's own `encode_prompt`, with its family's text encoders observed (see `encodings.py`)."""
        controller = MembraneController.of(self._spm_denoiser)
        if controller is not None:
            family = controller.family
            controller.observe_text_encoders(
                [(encoder, tokenizer.all_special_ids, tokenizer.eos_token_id)
                 for encoder, tokenizer in family.text_encoders(self)],
                token_encoder=family.token_encoder(self),
            )
        return super().encode_prompt(*args, **kwargs)

    # ------------------------------------------------------------------ transport
    def _spm_prompt_gates(self, controller: MembraneController, args: tuple, kwargs: dict) -> PromptGates | None:
        """Per-prompt gates of this call, for families rated per call (None for hooked families, and for
        calls without prompt strings); the controller lays them out on the rows at each denoiser step."""
        if not controller.family.rates_per_call or not controller.transport.enabled:
            return None
        arguments = inspect.signature(super().__call__).bind_partial(*args, **kwargs).arguments
        prompt = arguments.get("prompt")
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rates = self._spm_prompt_rates(controller, prompts)
        if rates is None:
            return None
        transport, scales = controller.transport, controller.scales()
        negative_gates = None
        if transport.cfg_rows == "own" and controller.family.row_layout is not RowLayout.CFG_BATCH:
            controller._warn_once("own-rows", f"cfg_rows='own' needs the negative rows in the prompts' batch; "
                                  f"{controller.family.label} runs them as separate calls, which get the gates "
                                  "of their prompts ('paired').")
        elif transport.cfg_rows == "own" and arguments.get("negative_prompt_embeds") is None:
            negative = arguments.get("negative_prompt") or ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            negative_gates = transport.gates(self._spm_prompt_rates(controller, negatives), scales)
        images_per_prompt = arguments.get("num_images_per_prompt") or 1
        return PromptGates(transport.gates(rates, scales), negative_gates, images_per_prompt)

    def _spm_prompt_rates(self, controller: MembraneController, prompts: list[str]) -> torch.Tensor | None:
        """[P, N] raw rates of prompt strings, as the denoiser's rows of these prompts are rated: by the
        family's own encoding (families rated per call), or by the controller from the encoded rows."""
        encoding = self._spm_encode(prompts)
        if controller.family.rates_per_call:
            token_table = self._spm_family.token_embeddings(self) if controller.transport.metric == "tokensim" else None
            return controller.text_rates(encoding, token_table)
        rated = controller.rates(encoding.embeds)
        return rated[0] if rated is not None else None

    def _spm_prepare_concepts(self, controller: MembraneController, name: str) -> None:
        """Encode membrane `name`'s concepts with this pipeline's own encoding, as prompts are."""
        concepts = controller.adapters[name].membrane.concepts
        if concepts:
            controller.set_concepts(name, self._spm_encode(concepts))

    def _spm_encode(self, texts: list[str]) -> TextEncoding:
        """Text states as the denoiser gets them (the pipeline's `encode_prompt`, no CFG, one image per
        text), token sets and end-of-text summaries (the family says which encoders give each)."""
        return self._spm_family.encode(self, texts)

    @property
    def _spm_denoiser(self) -> nn.Module:
        """The UNet or transformer that carries the membranes."""
        return denoiser_of(self)

    @property
    def _spm_family(self) -> DenoiserFamily:
        return family_of(self._spm_denoiser)

    def _spm_controller(self) -> MembraneController:
        controller = MembraneController.of(self._spm_denoiser)
        if controller is None or not controller.adapters:
            raise ValueError("No membranes are loaded; load one first with `pipe.load_spm(...)`.")
        return controller


class StableDiffusionSPMPipeline(SPMPipelineMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x text-to-image with membranes."""


class StableDiffusionImg2ImgSPMPipeline(SPMPipelineMixin, StableDiffusionImg2ImgPipeline):
    """Stable Diffusion 1.x/2.x image-to-image with membranes."""


class StableDiffusionInpaintSPMPipeline(SPMPipelineMixin, StableDiffusionInpaintPipeline):
    """Stable Diffusion 1.x/2.x inpainting with membranes."""


class StableDiffusionXLSPMPipeline(SPMPipelineMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image with membranes."""


class StableDiffusionXLImg2ImgSPMPipeline(SPMPipelineMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image with membranes."""


class StableDiffusion3SPMPipeline(SPMPipelineMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 text-to-image with membranes."""


class StableDiffusion3Img2ImgSPMPipeline(SPMPipelineMixin, StableDiffusion3Img2ImgPipeline):
    """SD3 / SD3.5 image-to-image with membranes."""


class StableDiffusion3InpaintSPMPipeline(SPMPipelineMixin, StableDiffusion3InpaintPipeline):
    """SD3 / SD3.5 inpainting with membranes."""


class FluxSPMPipeline(SPMPipelineMixin, FluxPipeline):
    """Flux.1 text-to-image with membranes."""


class FluxImg2ImgSPMPipeline(SPMPipelineMixin, FluxImg2ImgPipeline):
    """Flux.1 image-to-image with membranes."""


class FluxInpaintSPMPipeline(SPMPipelineMixin, FluxInpaintPipeline):
    """Flux.1 inpainting with membranes."""


READY_CLASSES = (
    StableDiffusionSPMPipeline,
    StableDiffusionImg2ImgSPMPipeline,
    StableDiffusionInpaintSPMPipeline,
    StableDiffusionXLSPMPipeline,
    StableDiffusionXLImg2ImgSPMPipeline,
    StableDiffusion3SPMPipeline,
    StableDiffusion3Img2ImgSPMPipeline,
    StableDiffusion3InpaintSPMPipeline,
    FluxSPMPipeline,
    FluxImg2ImgSPMPipeline,
    FluxInpaintSPMPipeline,
)
# AutoPipeline and `from_pipe` find a pipeline's siblings (text-to-image, image-to-image, ...) by its
# class `__name__`: answer with the diffusers class each extends, as `add_spm_support` classes do.
# `__qualname__` (the class's repr) keeps the SPM name.
for _ready in READY_CLASSES:
    _ready.__name__ = _ready.__mro__[2].__name__

_SPM_CLASSES: dict[type, type] = {}


def add_spm_support(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Give an existing pipeline (ControlNet included) the SPM methods, in place, without reloading.

    The pipeline's class becomes a subclass with the same name, so `save_pretrained` still writes
    the original class into `model_index.json`.
    """
    if isinstance(pipe, SPMPipelineMixin):
        return pipe
    family = family_of(denoiser_of(pipe))
    missing = [attr for attr in ("text_encoder", "tokenizer", "encode_prompt") if getattr(pipe, attr, None) is None]
    if missing:
        raise UnsupportedDenoiserError(
            f"{type(pipe).__name__} cannot take membranes: its {family.label} is supported, but transport reads "
            f"the text encoder, tokenizer and `encode_prompt`, and it lacks {', '.join(missing)}."
        )
    cls = type(pipe)
    if cls not in _SPM_CLASSES:
        _SPM_CLASSES[cls] = type(cls.__name__, (SPMPipelineMixin, cls), {"__module__": cls.__module__})
    pipe.__class__ = _SPM_CLASSES[cls]
    return pipe
