"""Which text produced each row of a denoiser's text inputs, whatever route it took.

A `TextEncoderHook` (a diffusers `ModelHook` on each text encoder) records, for every encoding,
the token ids of each text and a digest of each output row. Pipelines hand the denoiser those rows
unchanged (repeated for `num_images_per_prompt`, stacked under CFG, and several encoders' outputs
concatenated along the feature axis), so `describe` can tell, row by row and bit for bit, which
texts a row came from: through `pipe(...)`, `prompt_embeds`, `AutoPipeline` or a hand-written
loop alike. Two kinds of rows are recorded, both computed by a causal text encoder from every
token of the text: each sequence output at its last position (the UNet's `encoder_hidden_states`:
CLIP states, SDXL's two side by side) and each pooled output (`pooler_output`, `text_embeds`:
the `pooled_projections` of SD3, CLIP-L and CLIP-G side by side, and of Flux, CLIP-L alone).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .hooks import add_hook, get_hook, remove_hook

TEXT_ENCODER_HOOK = "spm_text_encoder"
_encodings = itertools.count(1)


@dataclass(frozen=True)
class EncodedText:
    """One text as one text encoder saw it."""

    encoder: "TextEncoderHook"
    width: int
    tokens: frozenset[int]  # token ids without the tokenizer's special tokens
    end: int  # end-of-text position
    first_encoded: int  # sequence numbers of the first and last encoder calls that produced it
    last_encoded: int


@dataclass(frozen=True)
class TextRow:
    """The texts one row of text states (or of pooled outputs) came from, one per encoder in feature order.

    No parts: an all-zero row (SDXL's unconditional row without a negative prompt)."""

    parts: tuple[EncodedText, ...]

    @property
    def first_encoded(self) -> int:
        return min(p.first_encoded for p in self.parts)

    @property
    def last_encoded(self) -> int:
        return max(p.last_encoded for p in self.parts)

    def tokens(self) -> dict["TextEncoderHook", frozenset[int]]:
        return {p.encoder: p.tokens for p in self.parts}


def _digest(row: torch.Tensor) -> bytes:
    """Digest of a 1-D CPU tensor's bytes (any dtype)."""
    return hashlib.blake2b(row.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def _candidate_rows(output: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """[B, D] rows of every tensor a pipeline may take from an encoder's output for `ids` [B, L]: each
    [B, L, D] sequence (last or a hidden layer) at its last position, and each [B, D] pooled output."""
    values = [output] if isinstance(output, torch.Tensor) else list(
        output.values() if hasattr(output, "values") else output)
    tensors = [t for value in values for t in (value if isinstance(value, (tuple, list)) else (value,))
               if isinstance(t, torch.Tensor)]
    return ([t[:, -1, :] for t in tensors if t.dim() == 3 and t.shape[:2] == ids.shape]
            + [t for t in tensors if t.dim() == 2 and t.shape[0] == ids.shape[0]])


class TextEncoderHook(ModelHook):
    """Records what one text encoder produced, so the denoiser's controller can rate every row it gets.

    Keeps the last `capacity` distinct output rows (digests and token sets only, no tensors).
    `generation` counts the encodings recorded, so rows traced earlier can be known to still hold."""

    def __init__(self, special_ids: Iterable[int], end_id: int, capacity: int = 4096) -> None:
        super().__init__()
        self.special_ids = frozenset(special_ids)
        self.end_id = end_id
        self.capacity = capacity
        self.module: nn.Module | None = None
        self.users: set[int] = set()  # ids of the controllers observing this encoder
        self._rows: OrderedDict[bytes, EncodedText] = OrderedDict()
        self._widths: set[int] = set()
        self._lock = threading.Lock()
        self.generation = 0

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.module = module
        return module

    def token_table(self) -> torch.Tensor:
        """The encoder's input word embeddings (the `tokensim` metric)."""
        return self.module.get_input_embeddings().weight

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.record(ids, _candidate_rows(output, ids))
        return output

    @torch.no_grad()
    def record(self, ids: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
        """Key every row of `outputs` (each [B, D], one per text of `ids` [B, L]) to its text."""
        if not outputs:
            return
        encoding = next(_encodings)
        texts = []
        for row in ids.tolist():
            end = row.index(self.end_id) if self.end_id in row else len(row) - 1
            texts.append((frozenset(row) - self.special_ids, end))
        widths = [o.shape[-1] for o in outputs]
        rows = torch.cat([o.detach() for o in outputs], dim=1).cpu()  # one copy: [B, sum of widths]
        with self._lock:
            self.generation += 1
            self._widths.update(widths)
            for per_output in rows.split(widths, dim=1):
                for row, (tokens, end) in zip(per_output, texts):
                    key = _digest(row)
                    previous = self._rows.pop(key, None)
                    first = previous.first_encoded if previous is not None else encoding
                    self._rows[key] = EncodedText(self, row.shape[0], tokens, end, first, encoding)
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)

    def widths(self) -> set[int]:
        """Feature widths of the outputs recorded so far."""
        return set(self._widths)

    def lookup(self, key: bytes) -> EncodedText | None:
        with self._lock:
            return self._rows.get(key)


def observe(encoder: nn.Module, special_ids: Iterable[int], end_id: int, user: int) -> TextEncoderHook:
    """Put a recording hook on `encoder` (idempotent) and count `user` among its observers."""
    hook = get_hook(encoder, TEXT_ENCODER_HOOK)
    if hook is None:
        hook = add_hook(encoder, TextEncoderHook(special_ids, end_id), TEXT_ENCODER_HOOK)
    hook.users.add(user)
    return hook


def unobserve(hook: TextEncoderHook, user: int) -> None:
    """Drop `user`; the last one out removes the hook, leaving the encoder as it was."""
    hook.users.discard(user)
    if not hook.users and hook.module is not None:
        remove_hook(hook.module, TEXT_ENCODER_HOOK)


def describe(text: torch.Tensor, encoders: Sequence[TextEncoderHook]) -> list[TextRow | None]:
    """For each row of `text`, the texts it came from; None where no observed encoder produced it
    (embeddings made some other way). `text`: [B, L, D] sequences, read at their last position, or
    [B, D] pooled outputs."""
    last = (text[:, -1, :] if text.dim() == 3 else text).detach().cpu()
    zero = (text.detach() == 0).flatten(1).all(1).tolist()
    widths = sorted({w for e in encoders for w in e.widths()}, reverse=True)
    rows: list[TextRow | None] = []
    for i, row in enumerate(last):
        if zero[i]:
            rows.append(TextRow(()))
            continue
        parts: list[EncodedText] = []
        offset = 0
        while offset < row.shape[0]:
            part = _find_part(row, offset, widths, encoders)
            if part is None:
                break
            parts.append(part)
            offset += part.width
        rows.append(TextRow(tuple(parts)) if parts and offset == row.shape[0] else None)
    return rows


def _find_part(row: torch.Tensor, offset: int, widths: Sequence[int], encoders: Sequence[TextEncoderHook]
               ) -> EncodedText | None:
    """The encoded text whose output fills `row` from `offset` on, for some encoder width."""
    for width in widths:
        if offset + width > row.shape[0]:
            continue
        key = _digest(row[offset:offset + width])
        for encoder in encoders:
            found = encoder.lookup(key)
            if found is not None:
                return found
    return None
