"""Small helpers shared by the command lines, the trainer and the evaluation."""

from __future__ import annotations

from typing import Any, Mapping

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def torch_dtype(name: str) -> torch.dtype:
    """`fp16` or `float16` -> `torch.float16`, and so on for the keys of `DTYPES`."""
    key = _LONG_NAMES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[key]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: `{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
