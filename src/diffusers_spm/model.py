"""Injection of membranes into a denoiser, and the controller that gates them on every denoiser call.

`membrane_targets` finds the layers a denoiser's family adapts (`diffusers_spm.families`: on UNets,
every Linear/Conv2d inside each `Transformer2DModel`, the reference's rule). `MembraneController` is
a diffusers `ModelHook` on the denoiser: it owns the loaded membranes' scales, the transport
settings and the per-call gates, and every layer's `MembraneLayerHook` reads them from it.
Pipelines describe a call with `pipeline_call`; plain denoiser calls are gated from their text
states alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .families import family_of, mismatch_hint
from .layers import MembraneBank, attach_bank, detach_bank, layer_hook
from .membrane import Membrane, MembraneFormatError
from .transport import TransportConfig, TransportRate

logger = logging.getLogger(__name__)

CONTROLLER_HOOK = "spm_controller"
_call_ids = itertools.count(1)


def membrane_targets(unet: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Reference layer name -> (module path, base layer) for every adapted layer of a denoiser (its family's rule)."""
    return family_of(unet).targets(unet)


def architecture_of(unet: nn.Module) -> str:
    """A readable name of the denoiser's variant (sd1 / sd2 / sdxl, flux-..., ...) for metadata and messages."""
    return family_of(unet).architecture(unet)


@dataclass
class AdapterState:
    """What the controller knows of one loaded membrane, besides its weights in the banks."""

    membrane: Membrane  # metadata only: `modules` is emptied once the weights sit in the banks
    scale: float = 1.0
    concept_embeds: torch.Tensor | None = None
    concept_tokens: list[set[int]] | None = None
    concept_pooled: torch.Tensor | None = None  # end-of-text summaries, for the `eoscos` metrics


@dataclass
class CallGates:
    """The gates of one pipeline call, per prompt; expanded to UNet rows on first use.

    Diffusers pipelines lay the UNet batch out as [negative rows, prompt rows] under CFG, each
    prompt repeated `images_per_prompt` times; any other batch size falls back to per-row gates
    from the embeddings.
    """

    prompt_gates: torch.Tensor | None
    negative_gates: torch.Tensor | None
    images_per_prompt: int
    call_id: int = field(default_factory=lambda: next(_call_ids))
    _rows: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def rows(self, batch: int) -> torch.Tensor | None:
        if self.prompt_gates is None:
            return None
        if batch not in self._rows:
            cond = self.prompt_gates.repeat_interleave(self.images_per_prompt, dim=0)
            if batch == cond.shape[0]:
                self._rows[batch] = cond
            elif batch == 2 * cond.shape[0]:
                uncond = cond if self.negative_gates is None else self.negative_gates.repeat_interleave(
                    self.images_per_prompt, dim=0
                )
                self._rows[batch] = torch.cat([uncond, cond])
            else:
                logger.warning(
                    "UNet batch of %d rows does not match %d prompts x %d images (x2 with CFG); gating each row "
                    "from its own embedding instead.", batch, self.prompt_gates.shape[0], self.images_per_prompt
                )
                self._rows[batch] = None
        return self._rows[batch]


@dataclass
class ForwardGates:
    """The gates of one UNet forward, as every layer hook reads them."""

    gates: torch.Tensor  # [N] shared by all rows, or [B, N]
    merge_key: tuple[int, int] | None  # set when rows share gates inside a pipeline call


_OFF = ForwardGates(gates=torch.zeros(0), merge_key=None)  # inside a UNet forward, every gate is zero


class MembraneController(ModelHook):
    """Owns the membranes of one UNet: their order, scales, transport, and the gates per call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet  # the denoiser: a UNet or a diffusion transformer
        self.family = family_of(unet)
        # Memory policy: a call whose rows share gates may run each layer on merged weights (one extra
        # copy of every adapted weight for the call); off by default, so peak memory stays at the banks.
        self.merge_per_call = False
        self.adapters: dict[str, AdapterState] = {}
        self.transport = TransportConfig()
        self.enabled = True
        self.fused: list[str] = []
        self.call: CallGates | None = None
        self.current: ForwardGates | None = None
        self.version = 0
        self._targets: dict[str, tuple[str, nn.Module]] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lookup
    @classmethod
    def of(cls, unet: nn.Module, create: bool = False) -> "MembraneController | None":
        registry = getattr(unet, "_diffusers_hook", None)
        controller = registry.get_hook(CONTROLLER_HOOK) if registry is not None else None
        if controller is None and create:
            controller = cls(unet)
            HookRegistry.check_if_exists_or_initialize(unet).register_hook(controller, CONTROLLER_HOOK)
        return controller

    @property
    def targets(self) -> dict[str, tuple[str, nn.Module]]:
        if self._targets is None:
            self._targets = self.family.targets(self.unet)
        return self._targets

    def banks(self) -> Iterator[tuple[nn.Module, MembraneBank]]:
        for _, base in self.targets.values():
            bank = getattr(base, "spm_membranes", None)
            if bank is not None:
                yield base, bank

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def require(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(
                f"No membrane named {', '.join(map(repr, unknown))} is loaded; loaded: {self.names or 'none'}. "
                "Load it with `pipe.load_spm(...)` or use one of the loaded names."
            )

    # ------------------------------------------------------------------ membership
    def check_compatible(self, membrane: Membrane, source: str) -> None:
        """Raise, listing what differs, unless every layer of `membrane` exists here with its shape."""
        missing, misshapen = [], []
        for name, module in membrane.modules.items():
            if name not in self.targets:
                missing.append(name)
                continue
            base = self.targets[name][1]
            if isinstance(base, nn.Conv2d):
                want_down = (base.in_channels, *base.kernel_size)
                want_up = (base.out_channels, 1, 1)
            else:
                want_down, want_up = (base.in_features,), (base.out_features,)
            got_down = tuple(module.down.shape[1:])
            got_up = (module.up.shape[0], *module.up.shape[2:])
            if got_down != want_down or got_up != want_up:
                misshapen.append(f"{name}: membrane in/out {got_down}/{got_up[0]} vs layer {want_down}/{want_up[0]}")
        if not missing and not misshapen:
            return
        hint = mismatch_hint(membrane, self.unet)
        lines = [f"{source} does not fit this {self.family.denoiser_attribute}.{hint}"]
        if missing:
            lines.append(f"{len(missing)} membrane layers have no such module here: {', '.join(missing[:5])}"
                         + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        if misshapen:
            lines.append(f"{len(misshapen)} layers have other shapes: {'; '.join(misshapen[:5])}"
                         + (f" (and {len(misshapen) - 5} more)" if len(misshapen) > 5 else ""))
        lines.append(f"Load a membrane trained for this architecture (same {self.family.denoiser_attribute} layout), "
                     "or convert it.")
        raise MembraneFormatError("\n".join(lines))

    def add(self, name: str, membrane: Membrane, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
        """Stack `membrane` into the banks of its layers; all or nothing."""
        if name in self.adapters:
            raise ValueError(
                f"A membrane named {name!r} is already loaded. Pass another `adapter_name`, or "
                f"`pipe.unload_spm({name!r})` first."
            )
        self.check_compatible(membrane, f"Membrane {name!r}")
        touched: list[MembraneBank] = []
        try:
            for layer_name, module in membrane.modules.items():
                bank = attach_bank(self.targets[layer_name][1], self)
                bank.add(name, module, dtype)
                touched.append(bank)
            self.adapters[name] = AdapterState(membrane=dataclasses.replace(membrane, modules={}), scale=scale)
            self._reindex()
        except BaseException:
            for bank in touched:
                if name in bank.names:
                    bank.remove(name)
            self.adapters.pop(name, None)
            self._drop_empty_banks()
            self._reindex()
            raise

    def remove(self, name: str) -> None:
        self.require([name])
        if name in self.fused:
            raise RuntimeError(f"Membrane {name!r} is fused into the weights; call `unfuse_spm()` before unloading it.")
        for _, bank in list(self.banks()):
            if name in bank.names:
                bank.remove(name)
        del self.adapters[name]
        self._drop_empty_banks()
        self._reindex()

    def membrane(self, name: str) -> Membrane:
        """The loaded membrane `name`, weights read back from the banks."""
        self.require([name])
        state = self.adapters[name]
        modules = {}
        for layer_name, (_, base) in self.targets.items():
            bank = getattr(base, "spm_membranes", None)
            if bank is not None and name in bank.names:
                modules[layer_name] = bank.module(name)
        return dataclasses.replace(state.membrane, modules=modules)

    def _drop_empty_banks(self) -> None:
        for base, bank in list(self.banks()):
            if not bank.names and bank.fused_original is None:
                detach_bank(base)

    def _reindex(self) -> None:
        order = self.names
        for _, bank in self.banks():
            bank.index_rows(order)
        self.changed()

    def changed(self) -> None:
        """Invalidate merged weights cached for the running call (scales or membranes changed)."""
        self.version += 1

    # ------------------------------------------------------------------ settings
    def set_scales(self, scales: Mapping[str, float]) -> None:
        self.require(list(scales))
        for name, value in scales.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"Scale for membrane {name!r} must be a finite number >= 0, got {value!r}. "
                    "Use 0 to switch a membrane off, 1 for its trained strength."
                )
        for name, value in scales.items():
            self.adapters[name].scale = float(value)
        self.changed()

    def scales(self) -> torch.Tensor:
        """User scales in adapter order; fused membranes act through the weights, so they gate 0 here."""
        return torch.tensor(
            [0.0 if n in self.fused else s.scale for n, s in self.adapters.items()], dtype=torch.float32
        )

    # ------------------------------------------------------------------ fuse
    def fuse(self, names: list[str], scale: float) -> None:
        self.require(names)
        if self.fused:
            raise RuntimeError(f"Membranes {self.fused} are already fused; call `unfuse_spm()` first.")
        gates = torch.tensor(
            [self.adapters[n].scale * scale if n in names else 0.0 for n in self.names], dtype=torch.float32
        )
        fused_banks: list[tuple[nn.Module, MembraneBank]] = []
        try:
            for base, bank in self.banks():
                bank.fuse(base, gates)
                fused_banks.append((base, bank))
        except BaseException:
            for base, bank in fused_banks:
                bank.unfuse(base)
            raise
        self.fused = list(names)
        self.changed()

    def unfuse(self) -> None:
        for base, bank in self.banks():
            bank.unfuse(base)
        self.fused = []
        self._drop_empty_banks()
        self.changed()

    # ------------------------------------------------------------------ per-call gating
    @contextlib.contextmanager
    def pipeline_call(self, call: CallGates) -> Iterator[None]:
        """Scope of one pipeline call: its gates, and merged weights that live only inside it."""
        previous, self.call = self.call, call
        try:
            yield
        finally:
            self.call = previous
            self.current = None
            for base, _ in self.banks():
                hook = layer_hook(base)
                if hook is not None:
                    hook.release()

    def active(self) -> bool:
        return self.enabled and bool(self.adapters) and len(self.fused) < len(self.adapters)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Resolve this forward's gates once, for all layers; drop them when it ends, however it ends."""
        self.current = self._forward_gates(*args, **kwargs) if self.active() else _OFF
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.current = None

    def _forward_gates(self, *args: Any, **kwargs: Any) -> ForwardGates:
        sample = self.family.batch_argument.read(args, kwargs)
        text = self.family.text_argument.read(args, kwargs)
        batch = sample.shape[0]
        gates = self.call.rows(batch) if self.call is not None else None
        if gates is None:
            gates = self.embedding_gates(text) if self.transport.enabled else None
        if gates is None:
            gates = self.scales()
        if gates.dim() == 2 and bool((gates == gates[:1]).all()):
            gates = gates[0]
        if not bool(gates.any()):
            return _OFF
        merges = self.merge_per_call and self.call is not None and gates.dim() == 1
        merge_key = (self.call.call_id, self.version) if merges else None
        return ForwardGates(gates=gates.to(sample.device), merge_key=merge_key)

    def embedding_gates(self, text: torch.Tensor | None) -> torch.Tensor | None:
        """Per-row gates from the rows' text embeddings only (plain UNet calls, or `prompt_embeds`)."""
        states = list(self.adapters.values())
        if text is None or any(s.concept_embeds is None for s in states):
            self._warn_once(
                "no-embeds",
                "Facilitated Transport needs the membranes' concept embeddings, which a pipeline computes; "
                "this UNet call uses fixed gates (the scales). Call it through the pipeline, or "
                "`pipe.set_spm_transport(False)` to silence this.",
            )
            return None
        concept_embeds = torch.cat([s.concept_embeds for s in states]).to(text.device)
        if concept_embeds.shape[1:] != text.shape[1:]:
            self._warn_once("shape", "Text embeddings of this call do not match the concepts' shape; using fixed gates.")
            return None
        rate = TransportRate(self.transport.metric)
        scores = rate.concept_scores(text, None, concept_embeds, [])
        rates = rate.membrane_rates(scores, [len(s.membrane.concepts) for s in states])
        return self.transport.gates(rates, self.scales())

    def gates_for(self, bank: MembraneBank, x: torch.Tensor) -> ForwardGates | None:
        """The gates a layer applies now; a layer called outside a UNet forward applies the scales."""
        current = self.current
        if current is None:
            if not self.active():
                return None
            scales = self.scales()
            return ForwardGates(scales.to(x.device), None) if bool(scales.any()) else None
        if current is _OFF:
            return None
        if current.gates.dim() == 2 and x.shape[0] != current.gates.shape[0]:
            raise RuntimeError(
                f"A membrane layer got a batch of {x.shape[0]} rows while the UNet call has {current.gates.shape[0]}; "
                "per-sample gates need the batch dimension first. Use one prompt per call, or "
                "`pipe.set_spm_transport(False)`."
            )
        return current

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------ teardown
    def detach(self) -> None:
        """Remove every bank and this hook; the UNet is as it was before the first `add`."""
        self.unfuse()
        for base, _ in list(self.banks()):
            detach_bank(base)
        registry = self.unet._diffusers_hook
        registry.remove_hook(CONTROLLER_HOOK, recurse=False)
        restored = self.unet.__dict__.get("forward")
        if not registry.hooks and getattr(restored, "__func__", None) is type(self.unet).forward:
            del self.unet._diffusers_hook
            del self.unet.forward
