"""The text states of a pipeline call are traced and rated once per call (`CallScope.rates`), never
reused stale, never shared between calls or threads."""

from __future__ import annotations

import contextvars
import threading

import numpy as np
import pytest
import torch

from conftest import recorded_gates
from diffusers_spm import MembraneController
from diffusers_spm.controller import CallScope
from reference_spm import random_membrane

PROMPTS = ["a photo of snoopy", "a red car"]
STEPS, SIZE = 4, 32


@pytest.fixture
def loaded(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "s.safetensors")
    random_membrane(pipe.unet, ["red"], seed=2, std=0.3).save(tmp_path / "r.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "r.safetensors")
    return pipe


@pytest.fixture
def rating_calls(monkeypatch) -> list[torch.Tensor]:
    """The text states `MembraneController.rates` traces and rates, one entry per rating."""
    calls: list[torch.Tensor] = []
    rates = MembraneController.rates

    def spy(self, text, pooled=None):
        calls.append(text)
        return rates(self, text, pooled)

    monkeypatch.setattr(MembraneController, "rates", spy)
    return calls


def without_cache(monkeypatch) -> None:
    """Every forward rates its text states again, as outside a call."""
    monkeypatch.setattr(CallScope, "rates", lambda self, text, pooled=None: self.controller.rates(text, pooled))


def run(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))], **kwargs).images


def swap_prompts_at_step_1(pipe, step, timestep, callback_kwargs):
    """Change the call's text states in place mid-call: each prompt (and negative) row takes the other's."""
    if step == 1:
        embeds = callback_kwargs["prompt_embeds"]
        embeds.copy_(embeds[[1, 0, 3, 2]])
    return {}


def test_a_call_rates_once_and_makes_the_images_of_rating_every_step(loaded, rating_calls, monkeypatch):
    gates = recorded_gates(loaded)
    cached = run(loaded)
    assert len(rating_calls) == 1 and rating_calls[0].shape[0] == 2 * len(PROMPTS)  # CFG rows, one tensor
    cached_gates = list(gates)
    assert not torch.equal(cached_gates[0][2], cached_gates[0][3])  # the prompts' gates differ

    gates.clear()
    without_cache(monkeypatch)
    every_step = run(loaded)
    assert len(rating_calls) == 1 + STEPS
    assert np.array_equal(cached, every_step)
    assert all(torch.equal(a, b) for a, b in zip(cached_gates, gates, strict=True))

    run(loaded)
    assert len(rating_calls) == 1 + 2 * STEPS


def test_a_text_changed_in_place_mid_call_is_rated_again(loaded, rating_calls, monkeypatch):
    gates = recorded_gates(loaded)
    kwargs = {"callback_on_step_end": swap_prompts_at_step_1, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    cached = run(loaded, **kwargs)
    assert len(rating_calls) == 2  # before and after the change
    assert torch.equal(gates[0][[1, 0, 3, 2]], gates[-1])
    cached_gates = list(gates)

    gates.clear()
    without_cache(monkeypatch)
    every_step = run(loaded, **kwargs)
    assert np.array_equal(cached, every_step)
    assert all(torch.equal(a, b) for a, b in zip(cached_gates, gates, strict=True))


def cfg_text(pipe) -> torch.Tensor:
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    return torch.cat([negative, embeds])


def test_settings_changed_mid_call_apply_to_the_next_forward(loaded, rating_calls):
    controller = MembraneController.of(loaded.unet)
    text = cfg_text(loaded)
    sample = torch.zeros(4, 4, 8, 8)
    fresh = lambda: contextvars.Context().run(controller.row_gates, sample, text)  # outside any call: rated afresh
    with controller.call_scope():
        first = controller.row_gates(sample, text)
        assert torch.equal(first, fresh()) and len(rating_calls) == 2
        assert torch.equal(controller.row_gates(sample, text), first) and len(rating_calls) == 2  # cached

        loaded.set_spm_scale({"s": 0.5})
        halved = controller.row_gates(sample, text)
        assert torch.equal(halved[:, 0], 0.5 * first[:, 0]) and torch.equal(halved[:, 1], first[:, 1])

        loaded.set_spm_transport(metric="eoscos", power=1.0)
        rerated = controller.row_gates(sample, text)
        assert len(rating_calls) == 4 and torch.equal(rerated, fresh()) and not torch.equal(rerated, halved)

        loaded.encode_prompt(["a blue boat"], "cpu", 1, False)  # a new encoding may trace rows anew
        count = len(rating_calls)
        controller.row_gates(sample, text)
        assert len(rating_calls) == count + 1


def test_inference_tensors_are_rated_at_every_forward(loaded, rating_calls):
    controller = MembraneController.of(loaded.unet)
    with torch.inference_mode():
        text = cfg_text(loaded)
    sample = torch.zeros(4, 4, 8, 8)
    with controller.call_scope():
        gates = [controller.row_gates(sample, text) for _ in range(3)]
    assert len(rating_calls) == 3 and all(torch.equal(g, gates[0]) for g in gates)


def test_calls_and_threads_keep_their_own_rates(loaded, rating_calls):
    controller = MembraneController.of(loaded.unet)
    text = cfg_text(loaded)  # one tensor shared by every call below
    sample = torch.zeros(4, 4, 8, 8)
    for _ in range(2):
        with controller.call_scope():
            for _ in range(3):
                controller.row_gates(sample, text)
    assert len(rating_calls) == 2  # once per call, not once ever

    barrier, seen, errors = threading.Barrier(2), {}, []

    def call(i: int) -> None:
        try:
            with controller.call_scope():
                barrier.wait()  # both calls are open before either rates
                seen[i] = [controller.row_gates(sample, text) for _ in range(3)]
                seen[i].append(len(controller.call.rated))
                barrier.wait()  # neither call ends before the other has rated
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(rating_calls) == 4  # one more per thread's call
    assert seen[0][-1] == seen[1][-1] == 1
    assert all(torch.equal(g, seen[0][0]) for i in range(2) for g in seen[i][:-1])


def test_transport_off_rates_nothing(loaded, rating_calls):
    loaded.set_spm_transport(False)
    run(loaded)
    assert rating_calls == []
