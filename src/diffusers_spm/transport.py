"""Facilitated Transport: how strongly each membrane acts on a given prompt.

For a prompt and each concept `c` of a membrane, the reference computes
- `clipcos`: the cosine of the flattened (77 x d) text-encoder outputs of prompt and concept,
  padding included (so it is high, 0.8 to 0.99, even for unrelated prompts);
- `tokenuni`: |tokens(prompt) & tokens(c)| / |tokens(c)|, special tokens excluded;
and takes `max(clipcos, tokenuni)` (metric `clipcos_tokenuni`). A membrane's rate is the max over
its concepts. The gate applied to the membrane is `user_scale * rate ** power`: `power=2`
reproduces the reference's effective strength for one membrane (it scales both `lora_down` and
`lora_up` by the rate), `power=1` is the paper's linear reading.

`eoscos` (ours) is the cosine of the text encoder's output at each text's end-of-text token, the
position CLIP pools: it ignores the padding that makes the flattened cosine high for every
prompt. For embeddings no observed text encoder produced, the tokens and end-of-text position are
unknown, so every metric falls back to the flattened cosine (`encodings.describe`).

`tokensim` (ours) is a soft `tokenuni`: for each token of the concept, the best cosine between
its input embedding and those of the prompt's tokens, averaged over the concept's tokens. A token
that is present scores 1, as in `tokenuni`, so `tokensim >= tokenuni`; a synonym scores as close
as the text encoder's word embeddings place it ("crimson" for "red"). It needs the text
encoder's token-embedding table.

With several text encoders (SDXL), token terms compare each encoder's text with the concept as
that encoder saw it and take the best, so a concept named only in `prompt_2` counts.

Families rated per call (SD3, Flux, Sana) define each term on their own encoders (`DenoiserFamily.encode`,
`encoding_scores`); SD3's and Flux's rows that reach the denoiser outside a pipeline call's gates are
traced through their pooled text and scored the same way (`pooled_scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch

from .families.base import TextEncoding

if TYPE_CHECKING:
    from .encodings import TextEncoderHook, TextRow

Metric = Literal["clipcos", "tokenuni", "clipcos_tokenuni", "eoscos", "eoscos_tokenuni", "tokensim"]
METRICS: tuple[str, ...] = ("clipcos", "tokenuni", "clipcos_tokenuni", "eoscos", "eoscos_tokenuni", "tokensim")
CFG_ROWS: tuple[str, ...] = ("paired", "own")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"Unknown transport metric {metric!r}; choose one of {', '.join(METRICS)}.")


@dataclass(frozen=True)
class TransportConfig:
    """How gates follow prompts. `cfg_rows="paired"` gives a CFG unconditional/negative row the gate
    of the prompt it is paired with (as the reference does); `"own"` rates that row's own text."""

    enabled: bool = True
    metric: Metric = "clipcos_tokenuni"
    power: float = 2.0
    cfg_rows: Literal["paired", "own"] = "paired"
    # The lowest rate a membrane acts with, whatever the prompt: above 0 it also acts, weakly, on
    # prompts that do not name its concept (docs/transport.md, "Rate floor"). 0 is the reference.
    floor: float = 0.0

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if not (isinstance(self.power, (int, float)) and math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"Transport power must be a finite number > 0, got {self.power!r} (2.0 is the reference).")
        if self.cfg_rows not in CFG_ROWS:
            raise ValueError(f"cfg_rows must be one of {', '.join(CFG_ROWS)}, got {self.cfg_rows!r}.")
        if not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor <= 1.0):
            raise ValueError(f"The rate floor must be a number in [0, 1], got {self.floor!r} (0 is the reference).")

    def gates(self, rates: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`user_scale * max(rate, floor) ** power`, broadcast over the leading (prompt or row) dimension."""
        return scales.to(rates) * rates.clamp(min=self.floor).pow(self.power)


def clipcos(prompt_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine of the flattened embeddings, [P, L, D] x [C, L, D] -> [P, C], in fp32."""
    prompts = torch.nn.functional.normalize(prompt_embeds.flatten(1).float(), dim=-1)
    concepts = torch.nn.functional.normalize(concept_embeds.flatten(1).float().to(prompts.device), dim=-1)
    return prompts @ concepts.T


def at_end_of_text(embeds: torch.Tensor, rows: Sequence[TextRow]) -> torch.Tensor:
    """[P, L, D] -> [P, 1, D]: each text's output at its end-of-text token, per text encoder's part
    of the features (an all-zero row, which has no text, at position 0)."""
    pooled = []
    for i, row in enumerate(rows):
        offset, pieces = 0, []
        for part in row.parts:
            pieces.append(embeds[i, part.end, offset:offset + part.width])
            offset += part.width
        pooled.append(torch.cat(pieces) if pieces else embeds[i, 0])
    return torch.stack(pooled).unsqueeze(1)


def tokenuni(prompt_tokens: Sequence[set[int]], concept_tokens: Sequence[set[int]]) -> torch.Tensor:
    """Share of each concept's tokens present in each prompt, [P, C]. An empty concept scores 0."""
    return torch.tensor(
        [[len(p & c) / len(c) if c else 0.0 for c in concept_tokens] for p in prompt_tokens], dtype=torch.float32
    )


def tokensim(
    prompt_tokens: Sequence[set[int]], concept_tokens: Sequence[set[int]], token_embeddings: torch.Tensor
) -> torch.Tensor:
    """Soft token overlap, [P, C]: per concept token, the best cosine (clamped at 0) of its input
    embedding with the prompt's tokens, averaged over the concept's tokens. Empty texts score 0."""
    vocabulary = sorted(set().union(*prompt_tokens, *concept_tokens))
    if not vocabulary:
        return torch.zeros(len(prompt_tokens), len(concept_tokens))
    index = {token: i for i, token in enumerate(vocabulary)}
    rows = token_embeddings[torch.as_tensor(vocabulary, device=token_embeddings.device)].detach().float().cpu()
    rows = torch.nn.functional.normalize(rows, dim=-1)
    similarity = (rows @ rows.T).clamp(min=0.0)
    scores = torch.zeros(len(prompt_tokens), len(concept_tokens))
    for p, prompt in enumerate(prompt_tokens):
        if not prompt:
            continue
        best = similarity[:, [index[t] for t in prompt]].amax(1)  # each vocabulary token's best match in the prompt
        for c, concept in enumerate(concept_tokens):
            if concept:
                scores[p, c] = best[[index[t] for t in concept]].mean()
    return scores


class TransportScorer:
    """Scores prompts against concepts with one of `METRICS`, then reduces the
    concept scores to one rate in [0, 1] per membrane."""

    def __init__(self, metric: Metric = TransportConfig.metric) -> None:
        check_metric(metric)
        self.metric = metric

    def concept_scores(
        self,
        prompt_embeds: torch.Tensor,
        prompt_rows: Sequence[TextRow | None],
        concept_embeds: torch.Tensor,
        concept_rows: Sequence[TextRow],
    ) -> torch.Tensor:
        """[P, C] of text states traced to their texts (`encodings.describe`). A prompt row whose text is
        unknown (None: no observed text encoder produced it) is scored by the flattened cosine alone,
        whatever the metric."""
        return self._known_or_cosine(prompt_embeds, prompt_rows, concept_embeds, lambda known: self._text_scores(
            prompt_embeds[known], [prompt_rows[i] for i in known], concept_embeds, concept_rows))

    def pooled_scores(self, prompt_embeds: torch.Tensor, prompt_pooled: torch.Tensor | None,
                      prompt_rows: Sequence[TextRow | None], concepts: TextEncoding,
                      token_encoder: TextEncoderHook | None) -> torch.Tensor:
        """[P, C] of text states [P, L, D] whose pooled texts [P, D'] were traced to their texts (families
        rated per call, outside a call's gates): scored as `encoding_scores` scores the texts the family
        encodes itself, with the tokens `token_encoder` saw, so both routes rate a prompt alike. Rows
        of unknown text get the flattened cosine alone, as in `concept_scores`; the pooled texts and
        the token encoder are read only where some row is known."""
        def known_scores(known: list[int]) -> torch.Tensor:
            tokens = [prompt_rows[i].tokens().get(token_encoder, frozenset()) for i in known]
            texts = TextEncoding(prompt_embeds[known], tokens, prompt_pooled[known].unsqueeze(1))
            return self.encoding_scores(texts, concepts, token_encoder.token_table())

        return self._known_or_cosine(prompt_embeds, prompt_rows, concepts.embeds, known_scores)

    @staticmethod
    def _known_or_cosine(prompt_embeds: torch.Tensor, prompt_rows: Sequence[TextRow | None],
                         concept_embeds: torch.Tensor, known_scores: Callable[[list[int]], torch.Tensor]
                         ) -> torch.Tensor:
        """[P, C]: `known_scores` of the rows whose texts are known, the flattened cosine of the others
        (computed for those rows only: on a DiT's [L x 4096] states it is the costly term)."""
        known = [i for i, row in enumerate(prompt_rows) if row is not None]
        unknown = [i for i, row in enumerate(prompt_rows) if row is None]
        scores = torch.zeros(len(prompt_rows), concept_embeds.shape[0])
        if unknown:
            scores[unknown] = clipcos(prompt_embeds[unknown], concept_embeds).cpu()
        if known:
            scores[known] = known_scores(known)
        return scores

    def encoding_scores(self, prompts: TextEncoding, concepts: TextEncoding,
                        token_table: torch.Tensor | None) -> torch.Tensor:
        """[P, C] for texts a family encoded and summarised itself (families rated per call): `eoscos`
        reads the family's end-of-text summaries, the token terms its tokenizer's token sets.

        Each text is scored on its own, so its rate does not depend on the texts batched beside it, to
        the last bit: the per-call route rates a call's prompts, the traced route (`pooled_scores`) the
        denoiser's rows, negative rows included."""
        summary = self.metric.startswith("eoscos")
        return torch.cat([self._combined(
            text.pooled if summary else text.embeds,
            concepts.pooled if summary else concepts.embeds,
            lambda: self._overlap(text.tokens, concepts.tokens, lambda: token_table),
        ) for text in prompts.each()])

    def _text_scores(self, prompt_embeds: torch.Tensor, prompt_rows: Sequence[TextRow], concept_embeds: torch.Tensor,
                     concept_rows: Sequence[TextRow]) -> torch.Tensor:
        if self.metric.startswith("eoscos"):
            prompt_embeds = at_end_of_text(prompt_embeds, prompt_rows)
            concept_embeds = at_end_of_text(concept_embeds, concept_rows)
        return self._combined(prompt_embeds, concept_embeds, lambda: self._token_scores(prompt_rows, concept_rows))

    def _combined(self, prompt_embeds: torch.Tensor, concept_embeds: torch.Tensor,
                  token_scores: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The metric's terms, [P, C] each (the cosine of the given embeddings, the token overlap), and their max."""
        scores = []
        if "cos" in self.metric:
            scores.append(clipcos(prompt_embeds, concept_embeds).cpu())
        if "tokenuni" in self.metric or self.metric == "tokensim":
            scores.append(token_scores())
        return torch.stack(scores).amax(0)

    def _token_scores(self, prompt_rows: Sequence[TextRow], concept_rows: Sequence[TextRow]) -> torch.Tensor:
        """Token overlap per text encoder (SDXL: `prompt` and `prompt_2`), the best encoder's."""
        prompt_tokens = [row.tokens() for row in prompt_rows]
        concept_tokens = [row.tokens() for row in concept_rows]
        scores = torch.zeros(len(prompt_rows), len(concept_rows))
        for encoder in {e for tokens in concept_tokens for e in tokens}:
            prompts = [t.get(encoder, frozenset()) for t in prompt_tokens]
            concepts = [t.get(encoder, frozenset()) for t in concept_tokens]
            scores = torch.maximum(scores, self._overlap(prompts, concepts, encoder.token_table))
        return scores

    def _overlap(self, prompt_tokens: Sequence[set[int]], concept_tokens: Sequence[set[int]],
                 token_table: Callable[[], torch.Tensor]) -> torch.Tensor:
        """[P, C] token overlap of one tokenizer's token sets: `tokensim` (with the encoder's input
        embeddings, read only then) or `tokenuni`."""
        if self.metric == "tokensim":
            return tokensim(prompt_tokens, concept_tokens, token_table())
        return tokenuni(prompt_tokens, concept_tokens)

    def membrane_rates(self, concept_scores: torch.Tensor, concepts_per_membrane: Sequence[int]) -> torch.Tensor:
        """[P, C] -> [P, N]: each membrane takes the max over its own concepts, clamped to [0, 1]."""
        columns = torch.split(concept_scores, list(concepts_per_membrane), dim=1)
        return torch.stack([c.amax(1) for c in columns], dim=1).clamp(0.0, 1.0)

