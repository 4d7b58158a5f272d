"""Injection of membranes into a denoiser, and the controller that gates them on every denoiser call.

`membrane_targets` finds the layers a denoiser's family adapts (`diffusers_spm.families`: on UNets,
every Linear/Conv2d inside each `Transformer2DModel`, the reference's rule). `MembraneController`
is a diffusers `ModelHook` on the denoiser (UNet or transformer): it owns the loaded membranes'
scales and the transport settings, and at each denoiser forward it computes the rows' gates from
the text states (whose texts the text encoders' hooks recorded, `encodings.py`), so every route
into the denoiser is gated alike. Families whose text states cannot be traced to their texts
(`DenoiserFamily.rates_per_call`) are rated per pipeline call from the prompt strings
(`PromptGates`); on other routes their rows are traced through the pooled text the denoiser takes
(SD3, Flux: `pooled_projections`), or, without one (Sana), rated by the cosine of their text
states. Every layer's `MembraneLayerHook` reads the gates of the running forward. Per-forward and per-call
state lives in context variables, so concurrent calls from several threads never see each
other's gates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence, get_args

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .encodings import TextEncoderHook, TextRow, describe, observe, unobserve
from .families import TextEncoding, family_of, mismatch_hint
from .hooks import add_hook, get_hook, remove_hook
from .layers import MembraneBank, attach_bank, bank_of, detach_bank, layer_shape
from .membrane import Membrane, MembraneFormatError
from .transport import TransportConfig, TransportScorer

logger = logging.getLogger(__name__)

CONTROLLER_HOOK = "spm_controller"
# `set_spm_memory`: "auto" (default) merges a layer transiently where that is cheaper, one layer's copy
# at a time; "stacked" never copies a weight; "merged" keeps every merged weight for the call.
MemoryMode = Literal["auto", "stacked", "merged"]
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)


def check_scale(name: str, value: Any) -> float:
    """`value` as a float if it is a real number >= 0 (Python, NumPy or any `numbers.Real`), else a clear error."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(
        f"Scale for {name!r} must be a finite number >= 0 (any real type), got {value!r} ({type(value).__name__}). "
        "Use 0 to switch a membrane off, 1 for its trained strength."
    )


def lora_wrappers(unet: nn.Module) -> dict[int, nn.Module]:
    """id(base layer) -> the PEFT layer wrapping it (an ordinary LoRA), for fusing beside it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {id(m.get_base_layer()): m for m in unet.modules() if isinstance(m, BaseTunerLayer)}


def membrane_targets(denoiser: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Reference layer name -> (module path, base layer) for every adapted layer of a denoiser (its family's rule)."""
    return family_of(denoiser).targets(denoiser)


def architecture_of(denoiser: nn.Module) -> str:
    """A readable name of the denoiser's variant (sd1 / sd2 / sdxl, flux-..., ...) for metadata and messages."""
    return family_of(denoiser).architecture(denoiser)


@dataclass
class AdapterState:
    """What the controller knows of one loaded membrane, besides its weights in the banks."""

    membrane: Membrane  # metadata only: `modules` is emptied once the weights sit in the banks
    scale: float = 1.0
    concept_embeds: torch.Tensor | None = None  # [C, L, D], as `encode_prompt` gives them to the denoiser
    concept_rows: list[TextRow] | None = None  # the concepts' texts per text encoder (hooked families)
    concept_text: TextEncoding | None = None  # tokens and end-of-text summaries (families rated per call)


@dataclass
class PromptGates:
    """The gates of one pipeline call, per prompt, for families rated per call; expanded to denoiser
    rows on first use.

    Diffusers pipelines lay the batch out as [negative rows, prompt rows] under CFG, each prompt
    repeated `images_per_prompt` times; a batch of another size is rated row by row from its text
    states and pooled text (`MembraneController.rates`)."""

    prompt_gates: torch.Tensor  # [P, N]
    negative_gates: torch.Tensor | None  # [P, N] with `cfg_rows="own"`, else the prompts' gates
    images_per_prompt: int
    _rows: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def rows(self, batch: int) -> torch.Tensor | None:
        """[batch, N] gates, or None when `batch` is not this call's layout."""
        if batch not in self._rows:
            cond = self.prompt_gates.repeat_interleave(self.images_per_prompt, dim=0)
            uncond = cond if self.negative_gates is None else self.negative_gates.repeat_interleave(
                self.images_per_prompt, dim=0)
            layouts = {cond.shape[0]: cond, 2 * cond.shape[0]: torch.cat([uncond, cond])}
            self._rows[batch] = layouts.get(batch)
            if self._rows[batch] is None:
                logger.warning(
                    "Denoiser batch of %d rows does not match %d prompts x %d images (x2 with CFG); rating each "
                    "row from its own text instead.", batch, self.prompt_gates.shape[0], self.images_per_prompt
                )
        return self._rows[batch]


Rated = tuple[torch.Tensor, list[TextRow | None]]  # [B, N] raw rates of text rows, and the rows' texts


@dataclass
class CallScope:
    """One pipeline call: its per-prompt gates (families rated per call), the rates of its text states,
    each layer's gate-scaled `U` and its merged weights (with `set_spm_memory("merged")`) live only as
    long as it runs."""

    controller: "MembraneController"
    prompt_gates: PromptGates | None = None
    # Per layer hook, keyed by the forward's `call_key`: the same for every step of a call whose rows
    # share their gates, so each layer scales `U` (and, merged, builds `W + dW`) once per call, not per step.
    scaled_up: dict[int, tuple[tuple, torch.Tensor]] = field(default_factory=dict)
    merged: dict[int, tuple[tuple, torch.Tensor]] = field(default_factory=dict)
    # ids of (text states, pooled text) -> (the tensors, weakly; their stamp; their rates): a pipeline passes
    # the same tensors to every denoiser step, so they are traced and rated once per call, not once per step.
    rated: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple, Rated | None]] = field(default_factory=dict)

    def rates(self, text: torch.Tensor, pooled: torch.Tensor | None = None) -> Rated | None:
        """`MembraneController.rates(text, pooled)`, computed once per pair of tensors in this call.

        Reused only for the same tensor objects, unchanged since (PyTorch's version counter, which
        autograd also relies on, and their storage), rated under the same controller settings
        (`MembraneController.version`) and the same recorded encodings. Inference tensors keep no
        version counter, so they are rated at every forward."""
        controller = self.controller
        tensors = (text,) if pooled is None else (text, pooled)
        if any(t.is_inference() for t in tensors):
            return controller.rates(text, pooled)
        stamp = (*((t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors),
                 controller.version, tuple((id(e), e.generation) for e in controller.encoders))
        key = tuple(id(t) for t in tensors)
        cached = self.rated.get(key)
        if cached is not None and cached[1] == stamp and all(ref() is t for ref, t in zip(cached[0], tensors)):
            return cached[2]
        rated = controller.rates(text, pooled)
        self.rated[key] = (tuple(weakref.ref(t) for t in tensors), stamp, rated)
        return rated


@dataclass
class ForwardGates:
    """The gates of one denoiser forward, as every layer hook reads them."""

    controller: "MembraneController"
    gates: torch.Tensor  # [N] shared by all rows, or [B, N]; empty when every gate is zero
    # Set when rows share gates inside a call scope: the key of the call's per-layer tensors (`CallScope`).
    call_key: tuple | None
    # Whether a layer may run on a transient `W + dW` where that is cheaper (`set_spm_memory("auto")`).
    transient_merge: bool = False
    keep_merged: bool = False  # `set_spm_memory("merged")`: keep each layer's `W + dW` for the call

    @property
    def off(self) -> bool:
        return self.gates.numel() == 0


# Context variables, so that each thread (or asyncio task) sees only its own call and forward.
_CALL: ContextVar[CallScope | None] = ContextVar("spm_call", default=None)
_FORWARD: ContextVar[ForwardGates | None] = ContextVar("spm_forward", default=None)


class MembraneController(ModelHook):
    """Owns the membranes of one denoiser: their order, scales, transport, and the gates per call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet  # the denoiser: a UNet or a diffusion transformer
        self.family = family_of(unet)
        self.adapters: dict[str, AdapterState] = {}
        self.fused: list[str] = []
        self.encoders: list[TextEncoderHook] = []
        self.token_encoder: TextEncoderHook | None = None  # whose tokens families rated per call read
        self.version = 0  # bumped by every change that invalidates merged weights cached in a call
        self._transport = TransportConfig()
        self._enabled = True
        self._memory: MemoryMode = "auto"  # `set_spm_memory`
        self._targets: dict[str, tuple[str, nn.Module]] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lookup
    @classmethod
    def of(cls, unet: nn.Module, create: bool = False) -> "MembraneController | None":
        controller = get_hook(unet, CONTROLLER_HOOK)
        if controller is None and create:
            controller = add_hook(unet, cls(unet), CONTROLLER_HOOK)
        return controller

    @property
    def targets(self) -> dict[str, tuple[str, nn.Module]]:
        if self._targets is None:
            self._targets = self.family.targets(self.unet)
        return self._targets

    def banks(self) -> Iterator[tuple[nn.Module, MembraneBank]]:
        for _, base in self.targets.values():
            bank = bank_of(base)
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

    def check_new_name(self, name: str) -> None:
        """Raise unless `name` is free for a new membrane."""
        if name in self.adapters:
            raise ValueError(
                f"A membrane named {name!r} is already loaded. Pass another `adapter_name`, or "
                f"`pipe.unload_spm({name!r})` first."
            )

    # ------------------------------------------------------------------ membership
    def check_compatible(self, membrane: Membrane, source: str) -> None:
        """Raise, listing what differs, unless every layer of `membrane` exists here with its shape."""
        missing, misshapen = [], []
        for name, module in membrane.modules.items():
            if name not in self.targets:
                missing.append(name)
                continue
            want = layer_shape(self.targets[name][1])
            if module.down.shape != want.down(module.rank) or module.up.shape != want.up(module.rank):
                misshapen.append(f"{name}: membrane in/out {tuple(module.down.shape[1:])}/{module.up.shape[0]} vs "
                                 f"layer {want.in_shape}/{want.out_features}")
        if not missing and not misshapen:
            return
        hint = mismatch_hint(membrane, self.unet)
        kind = "UNet" if self.family.denoiser_attribute == "unet" else "transformer"
        lines = [f"{source} does not fit this {kind}.{hint}"]
        if missing:
            lines.append(f"{len(missing)} membrane layers have no such module here: {', '.join(missing[:5])}"
                         + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        if misshapen:
            lines.append(f"{len(misshapen)} layers have other shapes: {'; '.join(misshapen[:5])}"
                         + (f" (and {len(misshapen) - 5} more)" if len(misshapen) > 5 else ""))
        lines.append(f"Load a membrane trained for this architecture (same {kind} layout), or convert it.")
        raise MembraneFormatError("\n".join(lines))

    def add(self, name: str, membrane: Membrane, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
        """Stack `membrane` into the banks of its layers; all or nothing."""
        self.check_new_name(name)
        scale = check_scale(name, scale)
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
            bank = bank_of(base)
            if bank is not None and name in bank.names:
                modules[layer_name] = bank.pair(name)
        return dataclasses.replace(state.membrane, modules=modules)

    def _drop_empty_banks(self) -> None:
        for base, bank in list(self.banks()):
            if not bank.names and bank.fused_original is None:
                detach_bank(base)

    def _reindex(self) -> None:
        order = self.names
        for _, bank in self.banks():
            bank.index_rows(order)
        self._invalidate()

    def _invalidate(self) -> None:
        """Merged weights and rates cached in a running call are stale from now on."""
        self.version += 1

    def weights_changed(self) -> None:
        """Call after changing the banks' tensors in place (an optimizer step, a loaded checkpoint), so a
        running call does not keep merged weights made from the old ones."""
        self._invalidate()

    # ------------------------------------------------------------------ settings
    @property
    def enabled(self) -> bool:
        """Whether the membranes act at all (`disable_spm` / `enable_spm`)."""
        return self._enabled

    def set_enabled(self, on: bool) -> None:
        self._enabled = bool(on)
        self._invalidate()

    @contextlib.contextmanager
    def switched(self, on: bool) -> Iterator[None]:
        """The membranes on (or off) for a block, then as they were."""
        previous = self._enabled
        self.set_enabled(on)
        try:
            yield
        finally:
            self.set_enabled(previous)

    @property
    def transport(self) -> TransportConfig:
        return self._transport

    def set_transport(self, transport: TransportConfig) -> None:
        if not isinstance(transport, TransportConfig):
            raise TypeError(f"Expected a TransportConfig, got {type(transport).__name__}.")
        self._transport = transport
        self._invalidate()

    @property
    def memory(self) -> MemoryMode:
        """How forwards whose rows share their gates run the adapted layers (`set_spm_memory`)."""
        return self._memory

    def set_memory(self, mode: MemoryMode) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"SPM memory mode must be one of {', '.join(map(repr, MEMORY_MODES))}, got {mode!r}.")
        self._memory = mode
        self._invalidate()

    def active_names(self) -> list[str]:
        """The membranes acting through the gates now: enabled, scale above 0, not fused."""
        if not self._enabled:
            return []
        return [n for n, s in self.adapters.items() if s.scale > 0 and n not in self.fused]

    def set_scales(self, scales: Mapping[str, Any]) -> None:
        self.require(list(scales))
        checked = {name: check_scale(name, value) for name, value in scales.items()}
        for name, value in checked.items():
            self.adapters[name].scale = value
        self._invalidate()

    def scales(self) -> torch.Tensor:
        """User scales in adapter order; fused membranes act through the weights, so they gate 0 here."""
        return torch.tensor(
            [0.0 if n in self.fused else s.scale for n, s in self.adapters.items()], dtype=torch.float32
        )

    # ------------------------------------------------------------------ fuse
    def fuse(self, names: list[str], scale: float) -> None:
        """Bake `names` into the base weights at fixed gates (`scale` x their scales)."""
        scale = check_scale("fuse_spm", scale)
        self.require(names)
        if self.fused:
            raise RuntimeError(f"Membranes {self.fused} are already fused; call `unfuse_spm()` first.")
        gates = torch.tensor(
            [self.adapters[n].scale * scale if n in names else 0.0 for n in self.names], dtype=torch.float32
        )
        wrappers = lora_wrappers(self.unet)
        fused_banks: list[tuple[nn.Module, MembraneBank]] = []
        try:
            for base, bank in self.banks():
                bank.fuse(base, gates, wrappers.get(id(base)))
                fused_banks.append((base, bank))
        except BaseException:
            for base, bank in fused_banks:
                bank.unfuse(base, wrappers.get(id(base)))
            raise
        self.fused = list(names)
        self._invalidate()

    def unfuse(self) -> None:
        wrappers = lora_wrappers(self.unet)
        for base, bank in self.banks():
            bank.unfuse(base, wrappers.get(id(base)))
        self.fused = []
        self._drop_empty_banks()
        self._invalidate()

    # ------------------------------------------------------------------ text encoders
    def observe_text_encoders(self, encoders: Sequence[tuple[nn.Module, Sequence[int], int]],
                              token_encoder: nn.Module | None = None) -> None:
        """Record every encoding of these text encoders ((encoder, special token ids, end-of-text id)
        each), so that denoiser rows can be traced back to their texts. Idempotent.

        `token_encoder`: the one of them whose tokens families rated per call read (`DenoiserFamily.token_encoder`)."""
        for encoder, special_ids, end_id in encoders:
            hook = observe(encoder, special_ids, end_id, id(self))
            if hook not in self.encoders:
                self.encoders.append(hook)
            if encoder is token_encoder:
                self.token_encoder = hook

    def set_concepts(self, name: str, concepts: TextEncoding) -> None:
        """Store membrane `name`'s concepts, encoded as the pipeline encodes prompts (`DenoiserFamily.encode`).

        Hooked families also keep which observed encoding each concept came from (its tokens per encoder)."""
        state = self.adapters[name]
        if self.family.rates_per_call:
            state.concept_embeds, state.concept_text = concepts.embeds.detach(), concepts
        else:
            rows = describe(concepts.embeds, self.encoders)
            if any(row is None for row in rows):
                raise RuntimeError(
                    f"The concepts of membrane {name!r} were not encoded by an observed text encoder; encode them "
                    "with the pipeline's own `encode_prompt` after `observe_text_encoders`."
                )
            state.concept_embeds, state.concept_rows = concepts.embeds.detach(), rows
        self._invalidate()

    # ------------------------------------------------------------------ transport
    def _rated_states(self) -> list[AdapterState] | None:
        """The membranes in adapter order, if every one has encoded concepts (else None, warned once)."""
        unnamed = [name for name, s in self.adapters.items() if not s.membrane.concepts]
        if unnamed:
            raise ValueError(
                f"Membrane {unnamed[0]!r} names no concepts in its metadata, so Facilitated Transport cannot rate "
                "prompts against it. Use `pipe.set_spm_transport(False)`, or re-save it with its concepts."
            )
        states = list(self.adapters.values())
        if any(s.concept_embeds is None for s in states):
            self._warn_once(
                "no-concepts",
                "Facilitated Transport needs the membranes' concept embeddings, which an SPM pipeline computes "
                "when it loads them; this denoiser call uses fixed gates (the scales). Load membranes with "
                "`pipe.load_spm(...)`, or `pipe.set_spm_transport(False)` to silence this.",
            )
            return None
        return states

    def rates(self, text: torch.Tensor, pooled: torch.Tensor | None = None) -> Rated | None:
        """[B, N] raw transport rates of each row of the denoiser's text states (and pooled text, which
        families rated per call are traced by), and the rows' texts; None without concept embeddings.

        Every denoiser forward uses it outside a call's per-prompt gates, and `get_spm_transport_rates`
        on hooked families. Rows traced through their pooled text are scored as the per-call route
        scores prompt strings (`TransportScorer.pooled_scores`). Rows no observed text encoder produced
        (embeddings made elsewhere; on Sana, every row outside a pipeline call) are rated by the
        flattened cosine alone (warned once)."""
        states = self._rated_states()
        if states is None:
            return None
        concept_embeds = torch.cat([s.concept_embeds for s in states]).to(text.device)
        if concept_embeds.shape[1:] != text.shape[1:]:
            self._warn_once("shape", "Text embeddings of this call do not match the concepts' shape; using fixed gates.")
            return None
        rows = self._texts(text, pooled)
        if any(row is None for row in rows):
            self._warn_once(
                "unknown-text",
                "Some text embeddings reaching the denoiser were not produced by the pipeline's text encoders "
                "(observed ones), so their tokens are unknown; those rows are rated by the embedding cosine alone. Encode "
                "prompts with `pipe.encode_prompt(...)` (on Sana, pass prompt strings) for the full transport metric.",
            )
        scorer = TransportScorer(self.transport.metric)
        if self.family.rates_per_call:
            concepts = TextEncoding.concatenate([s.concept_text for s in states])
            scores = scorer.pooled_scores(text, pooled, rows, concepts, self.token_encoder)
        else:
            concept_rows = [r for s in states for r in s.concept_rows] if self.encoders else []
            scores = scorer.concept_scores(text, rows, concept_embeds, concept_rows)
        return scorer.membrane_rates(scores, [len(s.membrane.concepts) for s in states]), rows

    def _texts(self, text: torch.Tensor, pooled: torch.Tensor | None) -> list[TextRow | None]:
        """The texts each row came from (None where unknown): hooked families trace the text states,
        families rated per call the pooled text, through the observed encoders."""
        if not self.family.rates_per_call:
            traced = text
        else:  # scored on the token encoder's tokens, so traced only once it is known
            traced = pooled if self.token_encoder is not None else None
        if traced is None or not self.encoders:
            return [None] * text.shape[0]
        return describe(traced, self.encoders)

    def text_rates(self, texts: TextEncoding, token_table: torch.Tensor | None) -> torch.Tensor | None:
        """[P, N] raw rates of texts a family encoded itself: the per-call route of families rated per
        call (`DenoiserFamily.rates_per_call`). `token_table`: the tokenizer's input embeddings (`tokensim`)."""
        states = self._rated_states()
        if states is None:
            return None
        concepts = TextEncoding.concatenate([s.concept_text for s in states])
        scorer = TransportScorer(self.transport.metric)
        scores = scorer.encoding_scores(texts, concepts, token_table)
        return scorer.membrane_rates(scores, [len(s.membrane.concepts) for s in states])

    def row_gates(self, sample: torch.Tensor, text: torch.Tensor | None,
                  pooled: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] or [N] gates of one denoiser forward.

        Inside a pipeline call of a family rated per call, the call's per-prompt gates, laid out on
        the rows. Otherwise each row is rated from its text states and pooled text (`rates`; inside a
        call scope once per pair of tensors, `CallScope.rates`), and the scales and transport settings
        of this forward turn the rates into gates. With `cfg_rows="paired"`, a CFG batch (diffusers' layout: [negative
        rows, prompt rows], the latents repeated) gives each negative row the gate of its prompt row. It
        is recognised by identical latents in both halves and negative texts encoded after their prompts
        (or all-zero)."""
        call = self.call
        per_call = call.prompt_gates.rows(sample.shape[0]) if call is not None and call.prompt_gates else None
        if per_call is not None:
            return per_call
        if not self.transport.enabled or text is None:
            return self.scales()
        rated = call.rates(text, pooled) if call is not None else self.rates(text, pooled)
        if rated is None:
            return self.scales()
        rates, rows = rated
        half = sample.shape[0] // 2
        if (
            self.transport.cfg_rows == "paired"
            and half
            and sample.shape[0] == 2 * half
            and all(_is_negative_of(rows[i], rows[i + half]) for i in range(half))
            and torch.equal(sample[:half], sample[half:])
        ):
            rates = torch.cat([rates[half:], rates[half:]])
        return self.transport.gates(rates, self.scales())

    # ------------------------------------------------------------------ per-call gating
    @contextlib.contextmanager
    def call_scope(self, prompt_gates: PromptGates | None = None) -> Iterator[None]:
        """Scope of one pipeline call: its per-prompt gates (families rated per call) and merged
        weights are kept in it and dropped when it ends."""
        token = _CALL.set(CallScope(self, prompt_gates))
        try:
            yield
        finally:
            _CALL.reset(token)

    @property
    def call(self) -> CallScope | None:
        """This context's running call scope on this denoiser, if any."""
        scope = _CALL.get()
        return scope if scope is not None and scope.controller is self else None

    @property
    def current(self) -> ForwardGates | None:
        """This context's running denoiser forward's gates, if any."""
        forward = _FORWARD.get()
        return forward if forward is not None and forward.controller is self else None

    def active(self) -> bool:
        return self._enabled and bool(self.adapters) and len(self.fused) < len(self.adapters)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Resolve this forward's gates once, for all layers; drop them when it ends, however it ends."""
        gates = self._forward_gates(*args, **kwargs) if self.active() else self._off
        token = _FORWARD.set(gates)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _FORWARD.reset(token)

    @property
    def _off(self) -> ForwardGates:
        return ForwardGates(self, torch.zeros(0), None)

    def _forward_gates(self, *args: Any, **kwargs: Any) -> ForwardGates:
        sample = self.family.batch_argument.read(args, kwargs)
        text = self.family.text_argument.read(args, kwargs)
        pooled = self.family.pooled_argument.read(args, kwargs) if self.family.pooled_argument else None
        gates = self.row_gates(sample, text, pooled)
        if gates.dim() == 2 and bool((gates == gates[:1]).all()):
            gates = gates[0]
        if not bool(gates.any()):
            return self._off
        call_key = (self.version, tuple(gates.tolist())) if self.call is not None and gates.dim() == 1 else None
        return ForwardGates(self, gates.to(sample.device), call_key, transient_merge=self._memory != "stacked",
                            keep_merged=self._memory == "merged")

    def gates_for(self, x: torch.Tensor) -> ForwardGates | None:
        """The gates a layer applies now; a layer called outside a denoiser forward applies the scales."""
        current = self.current
        if current is None:
            if not self.active():
                return None
            scales = self.scales()
            return ForwardGates(self, scales.to(x.device), None) if bool(scales.any()) else None
        if current.off:
            return None
        if current.gates.dim() == 2 and x.shape[0] != current.gates.shape[0]:
            raise RuntimeError(
                f"A membrane layer got a batch of {x.shape[0]} rows while the denoiser call has {current.gates.shape[0]}; "
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
        """Remove every bank and hook (text encoders' included); the models are as before the first `add`."""
        self.unfuse()
        for base, _ in list(self.banks()):
            detach_bank(base)
        for hook in self.encoders:
            unobserve(hook, id(self))
        self.encoders, self.token_encoder = [], None
        remove_hook(self.unet, CONTROLLER_HOOK)


def _is_negative_of(negative: TextRow | None, prompt: TextRow | None) -> bool:
    """Whether `negative` can be the CFG row of `prompt`: all-zero, or encoded after it (as
    `encode_prompt` encodes negatives after prompts); rows of unknown text follow the layout alone."""
    if negative is None or prompt is None or not negative.parts or not prompt.parts:
        return True
    return negative.last_encoded > prompt.first_encoded
