"""What the runtime needs to know about one denoiser family, and the defaults most families share.

A family answers four questions, each in one place:

- **which layers carry membranes** (`targets`): found on the denoiser's module tree, never parsed
  from names;
- **how prompts are read for Facilitated Transport** (`encode`): the embeddings the denoiser sees
  (for the cosine metrics), a pooled end-of-text embedding (for `eoscos`), token-id sets of one
  tokenizer (for `tokenuni`, `tokensim`) and that tokenizer's input-embedding table (`tokensim`);
- **how denoiser batch rows map to prompts** (`row_layout`);
- **which arguments of the denoiser's forward** hold the batch, the text states and the pooled text;
- **how the rate reaches each row** (`rates_per_call`, `observed_encoders`): from the text encoders'
  hooks (`encodings.py`), which trace each row of the text states back to its texts on every route,
  or, where the text states cannot be traced, per pipeline call from the prompt strings, and on
  other routes through the pooled text where the denoiser takes one.

For training (`diffusers_spm.training`, which asks but is never imported here), a family also says
what its denoiser predicts (`prediction_type`), how a prompt becomes its conditioning
(`conditioning`), the latents' shape (`latent_shape`, `latent_multiple`), how its pipeline sets a
flow-matching schedule (`timestep_kwargs`), and how to call it once (`predict`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from enum import Enum
from typing import Any, ClassVar, Iterator, Literal, NamedTuple, Sequence

import torch
from torch import nn

from ..membrane import Membrane, kohya_name


FileLayout = Literal["reference", "diffusers", "kohya"]
FILE_LAYOUTS: tuple[str, ...] = ("reference", "diffusers", "kohya")


class RowLayout(str, Enum):
    """Where a pipeline puts the negative (unconditional) rows of classifier-free guidance."""

    CFG_BATCH = "cfg_batch"  # one denoiser call on [negative rows, prompt rows] (SD 1/2/XL, SD3, Sana)
    CFG_CALLS = "cfg_calls"  # the negative prompt in a second call of the same size (Flux true CFG)
    # Guidance-distilled models (Flux-dev, Flux-schnell) have no negative rows at all: every call is
    # [prompt rows], which both layouts above already handle.


class TextEncoding(NamedTuple):
    """A batch of texts as transport reads them."""

    embeds: torch.Tensor  # [P, L, D]: what the denoiser receives as text states (`clipcos`)
    tokens: list[set[int]]  # token ids per text, special tokens removed (`tokenuni`, `tokensim`)
    pooled: torch.Tensor  # [P, 1, D']: the end-of-text summary (`eoscos`)

    @classmethod
    def concatenate(cls, encodings: Sequence["TextEncoding"]) -> "TextEncoding":
        """The texts of several encodings, in order, as one."""
        return cls(torch.cat([e.embeds for e in encodings]), [t for e in encodings for t in e.tokens],
                   torch.cat([e.pooled for e in encodings]))

    def each(self) -> list["TextEncoding"]:
        """Each text as an encoding of its own."""
        return [TextEncoding(self.embeds[i:i + 1], self.tokens[i:i + 1], self.pooled[i:i + 1])
                for i in range(len(self.tokens))]


@dataclass(frozen=True)
class ForwardArgument:
    """A denoiser forward argument, by keyword and by position."""

    name: str
    position: int

    def read(self, args: tuple, kwargs: dict) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if len(args) > self.position else None


class DenoiserFamily:
    """One denoiser family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # short id, written to membrane metadata (`spm_family`)
    label: ClassVar[str]  # for messages and docs
    denoiser_classes: ClassVar[tuple[type[nn.Module], ...]]
    denoiser_attribute: ClassVar[str] = "transformer"  # the pipeline component that holds the denoiser
    row_layout: ClassVar[RowLayout] = RowLayout.CFG_BATCH
    # False: text-encoder hooks trace every row of the text states to its texts, so the denoiser rates each
    # row itself. True: the text states cannot be traced (SD3 joins CLIP and T5 along the sequence axis,
    # Flux's are T5's alone, Sana's encoding carries the instruction preamble's tokens), so the SPM pipeline
    # rates each call's prompt strings (`encode`) and lays the gates on the rows (`controller.PromptGates`);
    # other routes into the denoiser (`prompt_embeds`, a hand-written loop) are traced through the pooled
    # text (`pooled_argument`) and scored as `encode` reads texts, or, without one (Sana), get the cosine of
    # their text states (docs/transport.md, "How the rate is computed").
    rates_per_call: ClassVar[bool] = True
    batch_argument: ClassVar[ForwardArgument] = ForwardArgument("hidden_states", 0)
    text_argument: ClassVar[ForwardArgument] = ForwardArgument("encoder_hidden_states", 1)
    # The pooled text the denoiser takes (SD3, Flux: `pooled_projections`, the CLIP encoders' pooled
    # outputs), by which families rated per call trace their rows; None where it takes none.
    pooled_argument: ClassVar[ForwardArgument | None] = None
    # The pipeline components whose encodings the hooks record (`text_encoders`): those the traced rows
    # are made of (UNets: the states' CLIP encoders; SD3, Flux: the pooled text's), none where nothing is traced.
    observed_encoders: ClassVar[tuple[str, ...]] = ()
    # Attributes of the denoiser holding its lists of transformer blocks; layers inside carry membranes.
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    # Layers inside a block that do not: AdaLN modulation (`norm*.linear`), decided per block-relative path.
    excluded_layers: ClassVar[re.Pattern] = re.compile(r"(^|\.)norm[^.]*\.")
    # A regular expression that module paths of this family's membranes match, to name the family of
    # a membrane file that does not say it.
    path_signature: ClassVar[re.Pattern]

    # ------------------------------------------------------------------ layers
    def handles(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, self.denoiser_classes)

    def blocks(self, denoiser: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for attribute in self.block_lists:
            for index, block in enumerate(getattr(denoiser, attribute, None) or ()):
                yield f"{attribute}.{index}", block

    def is_target(self, path_in_block: str, layer: nn.Module) -> bool:
        """Linear layers except the modulation; grouped (depthwise) convolutions cannot hold a rank-1 pair."""
        if self.excluded_layers.search(path_in_block):
            return False
        if isinstance(layer, nn.Conv2d):
            return layer.groups == 1
        return isinstance(layer, nn.Linear)

    def targets(self, denoiser: nn.Module) -> dict[str, tuple[str, nn.Module]]:
        """Membrane layer name -> (module path, base layer) for every adapted layer of `denoiser`.

        Layers already wrapped by PEFT (an ordinary LoRA) are adapted through their base layer, under
        the path the unwrapped model has, so membranes and LoRAs stack in either order.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets: dict[str, tuple[str, nn.Module]] = {}
        for block_path, block in self.blocks(denoiser):
            wrapped: list[str] = []
            for child_path, child in block.named_modules():
                if any(child_path.startswith(w + ".") for w in wrapped):
                    continue
                if isinstance(child, BaseTunerLayer):
                    wrapped.append(child_path)
                    child = child.get_base_layer()
                if child_path and self.is_target(child_path, child):
                    path = f"{block_path}.{child_path}"
                    targets[kohya_name(path)] = (path, child)
        return targets

    def architecture(self, denoiser: nn.Module) -> str:
        """A readable name of the denoiser's variant, for metadata and messages."""
        return self.name

    def variant_hint(self, membrane: Membrane, denoiser: nn.Module) -> str:
        """For a membrane of this family that does not fit `denoiser`: which variants meet."""
        made_for = f"made for {membrane.architecture}; " if membrane.architecture else ""
        return f" The membrane was {made_for}this denoiser is {self.architecture(denoiser)}."

    # ------------------------------------------------------------------ files
    # The layout `save_spm` writes: the diffusers/PEFT one (`transformer.<path>.lora_A.weight`), which
    # diffusers' `load_lora_weights` and ComfyUI read; UNets keep the reference SPM layout.
    file_layout: ClassVar[FileLayout] = "diffusers"

    def save(self, membrane: Membrane, path: str | os.PathLike, denoiser: nn.Module,
             layout: FileLayout | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write `membrane` for `denoiser` in `layout` (the family's default), with the family in its metadata.

        `reference`: kohya-style keys of this runtime's layer names; `diffusers`: the PEFT layout;
        `kohya`: the original-checkpoint layout ComfyUI and kohya's trainers use."""
        membrane = dataclasses.replace(membrane, family=self.name)
        layout = layout or self.file_layout
        if layout == "kohya":
            return self.to_original_names(membrane, denoiser).save(path, dtype=dtype)
        if layout == "diffusers":
            paths = {name: module_path for name, (module_path, _) in self.targets(denoiser).items()}
            return membrane.save(path, dtype=dtype, diffusers_paths=paths, prefix=f"{self.denoiser_attribute}.")
        return membrane.save(path, dtype=dtype)

    def to_runtime_names(self, membrane: Membrane, denoiser: nn.Module) -> Membrane:
        """The membrane keyed by this runtime's layer names (files in other tools' layouts are mapped here)."""
        return membrane

    def to_original_names(self, membrane: Membrane, denoiser: nn.Module) -> Membrane:
        """The membrane keyed by the original checkpoint's layers; a UNet's are this runtime's already."""
        return membrane

    # ------------------------------------------------------------------ transport
    @torch.no_grad()
    def encode(self, pipe: Any, texts: list[str]) -> TextEncoding:
        embeds, pooled = self.text_states(pipe, texts)
        return TextEncoding(embeds, self.token_sets(pipe, texts)[0], pooled.unsqueeze(1))

    def text_states(self, pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, L, D] text states the denoiser receives, and [P, D'] pooled end-of-text embeddings."""
        raise NotImplementedError

    def text_encoders(self, pipe: Any) -> list[tuple[nn.Module, Any]]:
        """(text encoder, its tokenizer) for each of `observed_encoders` the pipeline has, to observe."""
        components = pipe.components
        pairs = [(components.get(name), components.get(name.replace("text_encoder", "tokenizer")))
                 for name in self.observed_encoders]
        return [(encoder, tokenizer) for encoder, tokenizer in pairs if encoder is not None and tokenizer is not None]

    def token_sets(self, pipe: Any, texts: list[str]) -> tuple[list[set[int]], list[int]]:
        """Token ids of `pipe.tokenizer` without special tokens, and each text's end-of-text position."""
        tokenizer = pipe.tokenizer
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        special, end = set(tokenizer.all_special_ids), tokenizer.eos_token_id
        return [set(row) - special for row in ids], [row.index(end) if end in row else len(row) - 1 for row in ids]

    def token_encoder(self, pipe: Any) -> nn.Module:
        """The text encoder of `pipe.tokenizer`, whose tokens `token_sets` gives."""
        return pipe.text_encoder

    def token_embeddings(self, pipe: Any) -> torch.Tensor:
        """The input-embedding table of the encoder whose tokens `token_sets` gives (`tokensim`)."""
        return self.token_encoder(pipe).get_input_embeddings().weight

    # ------------------------------------------------------------------ training
    # The defaults are the flow-matching transformers' (SD3, Flux); docs/training.md, "Prediction spaces, per family".
    def prediction_type(self, pipe: Any) -> str:
        """What the denoiser predicts: `flow` (the flow-matching velocity `e - x0`), or a diffusion
        model's `epsilon`, `v_prediction` or `sample`."""
        return "flow"

    def conditioning(self, pipe: Any, texts: list[str], device: torch.device | str,
                     clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[P, L, D] text states and [P, D'] pooled embeddings (None if the denoiser takes none), as the
        pipeline's own `encode_prompt` gives them, on `device` (where the text encoders are).
        `clip_skip` is diffusers' (layers skipped), for pipelines whose `encode_prompt` takes it."""
        raise NotImplementedError(
            f"Training membranes on {self.label} is not supported yet: its family module "
            f"(diffusers_spm/families/{self.name}.py) must define `conditioning` and `predict` "
            "(docs/architecture.md, 'Adding a denoiser family')."
        )

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None, time_ids: torch.Tensor | None = None, guidance: float = 1.0
                ) -> torch.Tensor:
        """One forward on latents [B, C, h, w] at the scheduler's `timestep` (0-d, in its units), in the
        latents' layout; `guidance` is read only by guidance-distilled denoisers (`guidance_embedded`)."""
        raise NotImplementedError(f"Training membranes on {self.label} is not supported yet (no `predict`).")

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image, before any packing."""
        scale = getattr(pipe, "vae_scale_factor", 8)
        return getattr(pipe, self.denoiser_attribute).config.in_channels, height // scale, width // scale

    def latent_multiple(self, denoiser: nn.Module) -> int:
        """The latents' sides must be multiples of this: the transformer's patch size."""
        return getattr(denoiser.config, "patch_size", None) or 1

    def size_conditioned(self, denoiser: nn.Module) -> bool:
        """Whether the denoiser takes SDXL's size and crop time ids."""
        return False

    def guidance_embedded(self, denoiser: nn.Module) -> bool:
        """Guidance-distilled (Flux-dev): the guidance scale is an input, in place of a CFG pair."""
        return False

    def timestep_kwargs(self, scheduler: Any, steps: int, denoiser: nn.Module, latent_shape: Sequence[int]
                        ) -> dict[str, Any]:
        """`set_timesteps` arguments as the family's pipeline passes them for `steps` steps on latents of
        `latent_shape` (C, h, w): with `use_dynamic_shifting`, the shift `mu` from the image's token count."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        multiple = self.latent_multiple(denoiser)
        tokens = (latent_shape[-2] // multiple) * (latent_shape[-1] // multiple)
        config = scheduler.config
        return {"mu": calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                                      config.max_shift)}
