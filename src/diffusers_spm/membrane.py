"""`Membrane`: one SPM membrane's weights and metadata, independent of any UNet.

A membrane is a set of low-rank (rank-1 in the paper) `down`/`up` pairs, one per adapted layer,
keyed by the reference implementation's kohya-style layer name (`lora_unet_<module path with dots
replaced by underscores>`). Those names are ambiguous to parse, so they are only ever resolved
against a real module tree (see `diffusers_spm.controller.membrane_targets`).

Two file layouts are read and written:

- `reference`: the paper authors' format (also SD-WebUI's and kohya's): `<name>.lora_down.weight`,
  `<name>.lora_up.weight`, `<name>.alpha`, metadata `{"prompts", "rank", "alpha"}`.
- `diffusers`: the PEFT layout that `load_lora_weights` writes: `unet.<path>.lora_A.weight`,
  `unet.<path>.lora_B.weight` (`transformer.` for diffusion transformers), alpha in the
  `lora_adapter_metadata` entry.

Diffusion transformers' original-checkpoint layout (ComfyUI, kohya) is mapped by their family
(`diffusers_spm.families.original_keys`), since it needs the model's layer widths.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
DENOISER_PREFIXES = ("unet.", "transformer.")
FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


class MembraneFormatError(ValueError):
    """A file or state dict that is not a usable membrane; the message says what and how to fix it."""


def kohya_name(module_path: str) -> str:
    """The reference key of the layer at `module_path` in the UNet (the direction that is unambiguous)."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


@dataclass
class LowRankPair:
    """The low-rank `down`/`up` tensors of one adapted layer (plain tensors, not a module), in the shapes
    the reference stores.

    `down` is `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d with the base layer's kernel); `up` is
    `[out, r]` or `[out, r, 1, 1]`. The update is `up @ down * alpha / r`.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]


@dataclass
class Membrane:
    """One membrane: its layers, the concepts it erases and how it was made."""

    modules: dict[str, LowRankPair]
    concepts: list[str]
    surrogate: str | None = None
    base_model: str | None = None
    architecture: str | None = None
    family: str | None = None  # the denoiser family (`diffusers_spm.families`): unet, sd3, flux, ...
    training_config: dict[str, Any] | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return next(iter(self.modules.values())).alpha

    @property
    def cross_attention_dim(self) -> int | None:
        """The text-embedding width the membrane was trained for, read off its `attn2.to_k` layers."""
        for name, module in self.modules.items():
            if name.endswith("attn2_to_k"):
                return module.in_features
        return None

    def num_parameters(self) -> int:
        return sum(m.down.numel() + m.up.numel() for m in self.modules.values())

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, str]:
        """Safetensors metadata: the reference's three keys, then ours (prefixed `spm_`)."""
        meta = dict(self.extra_metadata)
        meta.update(
            {
                "prompts": ",".join(self.concepts),
                "rank": str(self.rank),
                "alpha": str(self.alpha),
                "spm_concepts": json.dumps(self.concepts),
                "spm_format_version": FORMAT_VERSION,
            }
        )
        for key, value in (
            ("spm_surrogate", self.surrogate),
            ("spm_base_model", self.base_model),
            ("spm_architecture", self.architecture),
            ("spm_family", self.family),
        ):
            if value is not None:
                meta[key] = value
        if self.training_config is not None:
            meta["spm_training_config"] = json.dumps(self.training_config)
        return meta

    @staticmethod
    def _fields_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
        known = {"prompts", "rank", "alpha", "spm_concepts", "spm_format_version", "spm_surrogate",
                 "spm_base_model", "spm_architecture", "spm_family", "spm_training_config",
                 "lora_adapter_metadata", "format"}  # the last two belong to the file layout, rewritten on save
        if "spm_concepts" in metadata:
            concepts = json.loads(metadata["spm_concepts"])
        else:
            concepts = [c for c in metadata.get("prompts", "").split(",") if c.strip()]
        config = metadata.get("spm_training_config")
        return {
            "concepts": concepts,
            "surrogate": metadata.get("spm_surrogate"),
            "base_model": metadata.get("spm_base_model"),
            "architecture": metadata.get("spm_architecture"),
            "family": metadata.get("spm_family"),
            "training_config": json.loads(config) if config else None,
            "extra_metadata": {k: v for k, v in metadata.items() if k not in known},
        }

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference layout, which `load_spm`, `load_lora_weights` and SD-WebUI all read."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            out[name + _DOWN] = module.down.detach().contiguous()
            out[name + _UP] = module.up.detach().contiguous()
            out[name + _ALPHA] = torch.tensor(module.alpha, dtype=module.down.dtype)
        return out

    def diffusers_state_dict(
        self, name_to_path: Mapping[str, str], prefix: str = DIFFUSERS_PREFIX
    ) -> dict[str, torch.Tensor]:
        """The PEFT layout (`<prefix><path>.lora_A/B.weight`); alpha goes to the adapter metadata."""
        missing = sorted(set(self.modules) - set(name_to_path))
        if missing:
            raise MembraneFormatError(
                f"{len(missing)} membrane layers have no module in the given layout (first: {missing[:3]}). "
                "Pass the model (or `--base`) the membrane was made for."
            )
        out: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            path = prefix + name_to_path[name]
            out[path + _LORA_A] = module.down.detach().contiguous()
            out[path + _LORA_B] = module.up.detach().contiguous()
        return out

    def peft_metadata(self, name_to_path: Mapping[str, str], prefix: str = DIFFUSERS_PREFIX) -> dict[str, str]:
        """The `lora_adapter_metadata` entry diffusers writes beside the PEFT layout: a `LoraConfig` with
        the most common rank and alpha, and patterns for layers that differ."""
        from peft import LoraConfig

        ranks = {name_to_path[n]: m.rank for n, m in self.modules.items()}
        alphas = {name_to_path[n]: m.alpha for n, m in self.modules.items()}
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=sorted(ranks),
            rank_pattern={p: r for p, r in ranks.items() if r != rank},
            alpha_pattern={p: a for p, a in alphas.items() if a != alpha},
        ).to_dict()
        packed = {f"{prefix}{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        return {"lora_adapter_metadata": json.dumps(packed, sort_keys=True)}

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = "state dict"
    ) -> "Membrane":
        """Read either layout; refuse anything else with a message that names the keys at fault."""
        metadata = dict(metadata or {})
        keys = list(state_dict)
        if not keys:
            raise MembraneFormatError(f"{source} is empty: it holds no membrane weights.")
        text_encoder_keys = [k for k in keys if k.startswith(("lora_te", "text_encoder."))]
        if text_encoder_keys:
            raise MembraneFormatError(
                f"{source} adapts the text encoder ({text_encoder_keys[0]!r}, ...). SPM membranes adapt the UNet "
                "only; load this file as an ordinary LoRA with `pipe.load_lora_weights(...)`."
            )
        if any(k.endswith((_DOWN, _UP)) for k in keys):
            modules = cls._read_reference(state_dict, source)
        elif any(k.endswith((_LORA_A, _LORA_B)) for k in keys):
            modules = cls._read_diffusers(state_dict, metadata, source)
        else:
            raise MembraneFormatError(
                f"{source} is not a LoRA or SPM membrane: expected keys ending in '.lora_down.weight' / "
                f"'.lora_up.weight' (reference) or '.lora_A.weight' / '.lora_B.weight' (diffusers), found "
                f"{keys[:3]}. Pass a membrane file, or convert it with `diffusers-spm convert`."
            )
        for name, module in modules.items():
            for label, tensor in (("lora_down", module.down), ("lora_up", module.up)):
                if not torch.isfinite(tensor).all():
                    raise MembraneFormatError(
                        f"{source}: {name}.{label} contains NaN or Inf values. The file is corrupt or its "
                        "training diverged; retrain it or pick an earlier checkpoint."
                    )
            if not math.isfinite(module.alpha):
                raise MembraneFormatError(f"{source}: {name}.alpha is {module.alpha}; it must be a finite number.")
        return cls(modules=modules, **cls._fields_from_metadata(metadata))

    @staticmethod
    def _read_reference(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, LowRankPair]:
        names = sorted({k[: -len(_DOWN)] for k in state_dict if k.endswith(_DOWN)})
        unknown = [k for k in state_dict if not k.endswith((_DOWN, _UP, _ALPHA))]
        if unknown:
            raise MembraneFormatError(
                f"{source} mixes membrane keys with unknown ones ({unknown[:3]}). Only '<layer>.lora_down.weight', "
                "'<layer>.lora_up.weight' and '<layer>.alpha' are allowed."
            )
        modules = {}
        for name in names:
            if not name.startswith(KOHYA_PREFIX):
                raise MembraneFormatError(
                    f"{source}: layer {name!r} is not a UNet layer (reference keys start with {KOHYA_PREFIX!r})."
                )
            if name + _UP not in state_dict:
                raise MembraneFormatError(f"{source}: {name} has lora_down but no lora_up weight.")
            down, up = state_dict[name + _DOWN], state_dict[name + _UP]
            alpha_tensor = state_dict.get(name + _ALPHA)
            alpha = float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0])
            modules[name] = _checked_pair(name, down, up, alpha, source)
        orphans = sorted({k[: -len(_UP)] for k in state_dict if k.endswith(_UP)} - set(names))
        if orphans:
            raise MembraneFormatError(f"{source}: {orphans[0]} has lora_up but no lora_down weight.")
        return modules

    @staticmethod
    def _read_diffusers(
        state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
    ) -> dict[str, LowRankPair]:
        adapter_meta = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
        adapter_meta = adapter_meta.get("unet", adapter_meta)
        for prefix in DENOISER_PREFIXES:  # diffusers packs the config's keys under the component's name
            adapter_meta.update({k.removeprefix(prefix): v for k, v in adapter_meta.items() if k.startswith(prefix)})
        modules = {}
        for key in state_dict:
            if not key.endswith(_LORA_A):
                if not key.endswith(_LORA_B):
                    raise MembraneFormatError(f"{source}: unexpected key {key!r} in a diffusers LoRA file.")
                continue
            path = key[: -len(_LORA_A)]
            path = next((path.removeprefix(p) for p in DENOISER_PREFIXES if path.startswith(p)), path)
            down = state_dict[key]
            up_key = key[: -len(_LORA_A)] + _LORA_B
            if up_key not in state_dict:
                raise MembraneFormatError(f"{source}: {path} has lora_A but no lora_B weight.")
            rank = down.shape[0]
            alpha = float(adapter_meta.get("alpha_pattern", {}).get(path, adapter_meta.get("lora_alpha", rank)))
            name = kohya_name(path)
            modules[name] = _checked_pair(name, down, state_dict[up_key], alpha, source)
        return modules

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Membrane":
        """Load a `.safetensors` membrane. Pickle files are refused: they can run code when loaded."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"No membrane file at {str(path)!r}. Check the path, or pass a Hub repo id or a registry short name."
            )
        if path.suffix in PICKLE_SUFFIXES:
            raise MembraneFormatError(
                f"{path.name} is a pickle file; only .safetensors membranes are loaded, since pickles can run code. "
                f"Convert it once with `diffusers-spm convert {path} {path.with_suffix('.safetensors')} --to reference`."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise MembraneFormatError(f"{path} is not a readable safetensors file ({err}).") from err
        return cls.from_state_dict(state_dict, metadata, source=str(path))

    @classmethod
    def from_pickle(cls, path: str | os.PathLike) -> "Membrane":
        """Read a reference `.pt` checkpoint with `weights_only=True` (no code runs); used by `convert`."""
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise MembraneFormatError(f"{path} does not hold a state dict of tensors.")
        return cls.from_state_dict(state_dict, {}, source=str(path))

    def save(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        diffusers_paths: Mapping[str, str] | None = None,
        prefix: str = DIFFUSERS_PREFIX,
    ) -> Path:
        """Write the reference layout with our metadata; `load_lora_weights` and SD-WebUI read it too.

        With `diffusers_paths` (membrane layer name -> module path), write the PEFT layout under
        `prefix` instead, with the adapter config diffusers reads; our metadata is kept beside it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"Membranes are saved as .safetensors; got {path.name!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = self.metadata()
        if diffusers_paths is None:
            tensors = self.state_dict()
        else:
            tensors = self.diffusers_state_dict(diffusers_paths, prefix)
            metadata.update(self.peft_metadata(diffusers_paths, prefix))
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        tmp = path.with_suffix(".safetensors.tmp")
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path


def _checked_pair(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, source: str) -> LowRankPair:
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
        raise MembraneFormatError(
            f"{source}: {name} has incompatible shapes down {tuple(down.shape)} / up {tuple(up.shape)}; "
            "expected down [r, in] with up [out, r] (Linear) or down [r, in, kh, kw] with up [out, r, 1, 1] (Conv2d)."
        )
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise MembraneFormatError(f"{source}: {name}.lora_up must be a 1x1 convolution, got {tuple(up.shape)}.")
    return LowRankPair(down=down, up=up, alpha=alpha)
