"""SD3 and Flux rows reaching the transformer without prompt strings (`prompt_embeds`, a plain pipeline
class, a hand-written forward) are traced through their pooled text and get the per-call route's
gates, whatever the metric; pooled text no observed encoder produced falls back to the cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image

from conftest import recorded_gates
from diffusers_spm import MembraneController, add_spm_support
from diffusers_spm.transport import METRICS
from test_dit import save_membrane
from tiny_dits import tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
PROMPTS = ["a photo of snoopy", "a red car"]  # one names the membrane's concept, one does not
SIZE, STEPS = 16, 2
UNKNOWN_TEXT = "not produced by the pipeline's text encoders"


@pytest.fixture(params=sorted(BUILDERS))
def dit(request, tmp_path):
    pipe = add_spm_support(BUILDERS[request.param]())
    save_membrane(pipe, ["snoopy"], tmp_path / "snoopy.safetensors")
    pipe.load_spm(tmp_path / "snoopy.safetensors")
    return pipe


def run(pipe, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(**kwargs, generator=generators, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                output_type="np").images


@torch.no_grad()  # as the pipeline encodes (attention may take another kernel with autograd on)
def encoded(pipe) -> dict[str, torch.Tensor]:
    """`pipe.encode_prompt` as a user calls it, as the pipeline's embedding arguments (SD3: with its
    CFG negatives; Flux-dev is guidance-distilled: none)."""
    if pipe.transformer.config.get("guidance_embeds") is not None:
        embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, device="cpu")
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


def transformer_rows(pipe, embeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (text states, pooled text) rows the pipeline hands its transformer: [negative, prompt] under CFG."""
    if "negative_prompt_embeds" not in embeds:
        return embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
    return (torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]]),
            torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]))


@torch.no_grad()
def forward(pipe, text: torch.Tensor, pooled: torch.Tensor) -> None:
    """One hand-written transformer call, pooled text passed by position; the latents repeat across CFG halves."""
    g = torch.Generator().manual_seed(0)
    batch = text.shape[0]
    if "guidance_embeds" in pipe.transformer.config:
        latents = torch.randn(len(PROMPTS), 16, 4, generator=g).repeat(batch // len(PROMPTS), 1, 1)
        pipe.transformer(latents, text, pooled, torch.full((batch,), 0.5), img_ids=torch.zeros(16, 3),
                         txt_ids=torch.zeros(text.shape[1], 3), guidance=torch.full((batch,), 3.5))
    else:
        latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g).repeat(batch // len(PROMPTS), 1, 1, 1)
        pipe.transformer(latents, text, pooled, torch.full((batch,), 500.0))


@pytest.mark.parametrize("metric", METRICS)
def test_prompt_embeds_and_a_hand_written_forward_get_the_prompts_gates(dit, metric, caplog):
    dit.set_spm_transport(metric=metric)
    gates = recorded_gates(dit)
    with caplog.at_level("WARNING"):
        from_text = run(dit, prompt=PROMPTS)
        text_gates = list(gates)
        gates.clear()
        embeds = encoded(dit)
        from_embeds = run(dit, **embeds)
        embeds_gates = list(gates)
        gates.clear()
        forward(dit, *transformer_rows(dit, embeds))
    assert not [r.message for r in caplog.records if r.levelname == "WARNING"]

    assert np.array_equal(from_embeds, from_text)
    assert len(embeds_gates) == len(text_gates) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(embeds_gates, text_gates))
    assert len(gates) == 1 and torch.equal(gates[0], text_gates[0])  # the hand-written forward
    rows = text_gates[0][:, 0]
    snoopy, car = rows[-2:]  # the prompt rows, after SD3's negative rows, which take their prompts' gates
    assert snoopy != car and (rows.shape[0] == 2 or torch.equal(rows[:2], rows[2:]))
    rates = dit.get_spm_transport_rates(PROMPTS)["snoopy"]
    assert torch.equal(rows[-2:], torch.tensor(rates) ** 2)  # the raw rates at the default power 2


def test_a_plain_pipeline_class_gets_the_prompts_gates(dit):
    """`AutoPipelineForText2Image.from_pipe`: a plain diffusers class, no SPM `__call__` or `encode_prompt`."""
    dit.set_spm_transport(metric="tokenuni")  # 0 or 1: the cosine fallback would give neither
    gates = recorded_gates(dit)
    expected = run(dit, prompt=PROMPTS)
    plain = AutoPipelineForText2Image.from_pipe(dit)
    plain.set_progress_bar_config(disable=True)
    assert type(plain).__name__ == type(dit).__name__ and not hasattr(plain, "load_spm")
    gates.clear()
    images = run(plain, prompt=PROMPTS)
    assert np.array_equal(images, expected)
    assert all(torch.equal(g[:, 0], torch.tensor([1.0, 0.0]).repeat(g.shape[0] // 2)) for g in gates)
    dit.disable_spm()
    assert np.abs(run(dit, prompt=PROMPTS) - expected).max() > 1e-3  # the membrane acts on these images


def test_pooled_text_no_observed_encoder_produced_falls_back_to_the_cosine(dit, caplog):
    controller = MembraneController.of(dit.transformer)
    text, pooled = transformer_rows(dit, encoded(dit))
    dit.set_spm_transport(metric="clipcos")
    cosine = controller.rates(text, pooled)[0]
    dit.set_spm_transport(metric="tokenuni")
    traced = controller.rates(text, pooled)[0]
    foreign = torch.randn_like(pooled)
    with caplog.at_level("WARNING"):
        fallback = controller.rates(text, foreign)[0]
        controller.rates(text, foreign)
    assert sum(UNKNOWN_TEXT in r.message for r in caplog.records) == 1
    torch.testing.assert_close(fallback, cosine)  # the same cosine, batched rather than text by text
    assert traced[-2:, 0].tolist() == [1.0, 0.0] and not torch.equal(traced, cosine)


def test_a_call_rates_again_for_other_or_changed_pooled_text(dit):
    """The per-call cache (`CallScope.rates`) keys on the pooled text too, not only on the text states."""
    controller = MembraneController.of(dit.transformer)
    dit.set_spm_transport(metric="tokenuni")
    text, pooled = transformer_rows(dit, encoded(dit))
    sample = torch.zeros(text.shape[0], 4, 8, 8)  # the same latents in every row
    swap = torch.arange(text.shape[0]) ^ 1  # each prompt row (and negative row) takes the other's pooled text
    with controller.call_scope():
        first = controller.row_gates(sample, text, pooled)
        assert torch.equal(controller.row_gates(sample, text, pooled), first)
        assert torch.equal(controller.row_gates(sample, text, pooled[swap]), first[swap])
        pooled.copy_(pooled[swap])  # the same tensor, changed in place
        assert torch.equal(controller.row_gates(sample, text, pooled), first[swap])
    assert first[-2:, 0].tolist() == [1.0, 0.0]
