"""The web app's logic on the concept world (no browser; tests/test_app_browser.py drives the page)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusers_spm import MembraneFormatError
from diffusers_spm.app import MembraneSession, MembraneSetting, shipped_membranes, split_prompts
from diffusers_spm.concept_world import ALL_CONCEPTS


@pytest.fixture(scope="module")
def session() -> MembraneSession:
    return MembraneSession(num_inference_steps=3, display_size=64)


def test_shipped_membranes_are_the_worlds():
    assert sorted(shipped_membranes("concept-world")) == sorted(c.name for c in ALL_CONCEPTS)  # one per concept
    assert shipped_membranes("runwayml/stable-diffusion-v1-5") == {}


def test_prompts_one_per_line():
    assert split_prompts(" a red circle \n\n a blue star\n") == ["a red circle", "a blue star"]
    with pytest.raises(ValueError, match="at least one prompt"):
        split_prompts("\n  \n")


def test_rates_and_images_with_and_without(session):
    assert session.load("red") == "red" and session.active == ["red"]
    session.configure([MembraneSetting("red")], metric="tokensim")  # the rate that tells colours apart
    steps = []
    results = session.compare(["a red circle", "a blue square"], seed=1, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(i, 6) for i in range(1, 7)]  # the pipeline's callback, both passes
    red, blue = results
    assert red.rates["red"] == pytest.approx(1.0) and blue.rates["red"] < red.rates["red"]
    assert red.without.size == (64, 64) == red.with_membranes.size
    changed = [np.abs(np.asarray(r.without, float) - np.asarray(r.with_membranes, float)).mean() for r in results]
    assert changed[0] > 10 and changed[1] < 1  # the membrane acts on the red prompt, barely on the other
    again = session.compare(["a red circle", "a blue square"], seed=1)[0]
    assert np.array_equal(np.asarray(again.without), np.asarray(red.without))  # same seed, same image


def test_switching_off_and_scales(session):
    session.configure([MembraneSetting("red", enabled=True, scale=0.5)], metric="tokensim", power=1.0)
    assert session.pipe.get_spm_transport_rates("a red circle")["red"][0] == pytest.approx(1.0)
    assert "red x0.5 (transport tokensim, power 1)" in session.describe()
    session.configure([MembraneSetting("red", enabled=False)])
    assert session.active == [] and session.rates(["a red circle"]) == {}
    with pytest.raises(ValueError, match="switch it on"):
        session.compare(["a red circle"])
    session.configure([MembraneSetting("red")])


def test_bad_input_is_an_error_and_the_session_goes_on(session, tmp_path):
    before = dict(session.settings)
    with pytest.raises(FileNotFoundError, match="Known short names"):
        session.load("no_such_membrane")
    not_a_membrane = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(not_a_membrane))
    with pytest.raises(MembraneFormatError, match="not a LoRA or SPM membrane"):
        session.load(str(not_a_membrane))
    with pytest.raises(ValueError, match="already loaded"):
        session.load("red")
    with pytest.raises(ValueError, match="Unknown transport metric"):
        session.configure([], metric="nope")
    with pytest.raises(ValueError, match="No loaded membrane named blue"):
        session.configure([MembraneSetting("blue")])
    assert session.settings == before and session.pipe.get_active_spms() == ["red"]
