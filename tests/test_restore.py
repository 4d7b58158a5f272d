"""No failure, interrupt, unload or unfuse may leave the user's weights changed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import tiny_pipeline
from diffusers_spm import MembraneController
from reference_spm import random_membrane


class Stop(Exception):
    pass


def snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_pristine(unet, weights, structure=True):
    state = unet.state_dict()
    assert state.keys() == weights.keys()
    for key, value in state.items():
        assert torch.equal(value, weights[key]), key
    if structure:
        assert MembraneController.of(unet) is None
        for module in unet.modules():
            assert not hasattr(module, "spm_membranes")
            assert "forward" not in module.__dict__
            assert not hasattr(module, "_diffusers_hook")


def raise_on_step(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Stop
        return kwargs
    return callback


@pytest.fixture
def loaded(pipe, tmp_path):
    weights = snapshot(pipe.unet)
    for i, concept in enumerate(["snoopy", "van gogh"]):
        random_membrane(pipe.unet, [concept], seed=i, std=0.2).save(tmp_path / f"m{i}.safetensors")
        pipe.load_spm(tmp_path / f"m{i}.safetensors")
    return pipe, weights


@pytest.mark.parametrize("error", [Stop, KeyboardInterrupt])
def test_interrupt_mid_call_leaves_weights_and_state(loaded, error):
    pipe, weights = loaded
    reference = pipe("a photo of snoopy", num_inference_steps=2, output_type="np", height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images

    def callback(p, i, t, kwargs):
        raise error

    with pytest.raises(error):
        pipe("a photo of snoopy", num_inference_steps=3, callback_on_step_end=callback, height=32, width=32)
    assert_pristine(pipe.unet, weights, structure=False)
    controller = MembraneController.of(pipe.unet)
    assert controller.call is None and controller.current is None
    again = pipe("a photo of snoopy", num_inference_steps=2, output_type="np", height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(torch.from_numpy(again), torch.from_numpy(reference))


def test_unload_one_then_all_is_exact(loaded):
    pipe, weights = loaded
    pipe.fuse_spm()
    pipe.unfuse_spm()
    pipe.unload_spm("m0")
    assert pipe.get_active_spms() == ["m1"]
    pipe.unload_spm()
    assert_pristine(pipe.unet, weights)


def test_disable_gives_base_outputs(loaded):
    pipe, weights = loaded
    pipe.disable_spm()
    membranes_off = pipe("a photo of snoopy", num_inference_steps=2, output_type="np", height=32, width=32,
                         generator=torch.Generator().manual_seed(0)).images
    pipe.unload_spm()
    base = pipe("a photo of snoopy", num_inference_steps=2, output_type="np", height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images
    assert (membranes_off == base).all()
    assert_pristine(pipe.unet, weights)


class MembraneLifecycle(RuleBasedStateMachine):
    """Random sequences of load, scale, transport, generate-or-raise, fuse, unfuse and unload."""

    def __init__(self):
        super().__init__()
        self.pipe = tiny_pipeline()
        self.weights = snapshot(self.pipe.unet)
        self.membranes = {
            f"m{i}": random_membrane(self.pipe.unet, [c], seed=i, std=0.2)
            for i, c in enumerate(["snoopy", "red car", "van gogh"])
        }
        self.folder = Path(tempfile.mkdtemp())
        self.loaded: list[str] = []
        self.fused: list[str] = []

    def file(self, name):
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            self.membranes[name].save(path)
        return path

    @rule(name=st.sampled_from(["m0", "m1", "m2"]))
    def load(self, name):
        if name in self.loaded:
            with pytest.raises(ValueError, match="already loaded"):
                self.pipe.load_spm(self.file(name))
        else:
            self.pipe.load_spm(self.file(name))
            self.loaded.append(name)

    @precondition(lambda self: self.loaded)
    @rule(scale=st.one_of(st.floats(0, 2), st.just(-1.0), st.just(float("nan"))))
    def scale(self, scale):
        if scale < 0 or scale != scale:
            with pytest.raises(ValueError):
                self.pipe.set_spm_scale(scale)
        else:
            self.pipe.set_spm_scale(scale)

    @precondition(lambda self: self.loaded)
    @rule(enabled=st.booleans(), power=st.sampled_from([1.0, 2.0]), metric=st.sampled_from(["clipcos", "tokenuni", "clipcos_tokenuni", "eoscos_tokenuni", "tokensim"]))
    def transport(self, enabled, power, metric):
        self.pipe.set_spm_transport(enabled, metric=metric, power=power)

    @rule(fail=st.booleans(), mixed=st.booleans())
    def generate(self, fail, mixed):
        prompts = ["a photo of snoopy", "a red car"] if mixed else "a photo of snoopy"
        kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
        if fail:
            with pytest.raises(Stop):
                self.pipe(prompts, callback_on_step_end=raise_on_step(1), **kwargs)
        else:
            images = self.pipe(prompts, **kwargs).images
            assert images.shape[1:] == (32, 32, 3)

    @precondition(lambda self: self.loaded and not self.fused)
    @rule()
    def fuse(self):
        self.pipe.fuse_spm()
        self.fused = list(self.loaded)

    @rule()
    def unfuse(self):
        self.pipe.unfuse_spm()
        self.fused = []

    @precondition(lambda self: self.loaded)
    @rule(data=st.data())
    def unload_one(self, data):
        name = data.draw(st.sampled_from(self.loaded))
        if name in self.fused:
            with pytest.raises(RuntimeError, match="unfuse"):
                self.pipe.unload_spm(name)
            return
        self.pipe.unload_spm(name)
        self.loaded.remove(name)

    @rule()
    def unload_all(self):
        self.pipe.unload_spm()
        self.loaded, self.fused = [], []

    @invariant()
    def weights_exact_unless_fused(self):
        if not self.fused:
            assert_pristine(self.pipe.unet, self.weights, structure=not self.loaded)

    def teardown(self):
        self.pipe.unload_spm()
        assert_pristine(self.pipe.unet, self.weights)


MembraneLifecycle.TestCase.settings = settings(
    max_examples=10, stateful_step_count=8, deadline=None, suppress_health_check=list(HealthCheck)
)
test_membrane_lifecycle = MembraneLifecycle.TestCase
