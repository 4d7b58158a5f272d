"""The injected layer's two forms: stacked `W x + U (G * D x)` and one op on `W + dW`, and when each runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_pipeline
from diffusers_spm import MembraneController
from diffusers_spm.layers import MembraneBank
from diffusers_spm.membrane import LowRankPair
from reference_spm import random_membrane


def bank_on(base: nn.Module, memberships: int = 3, seed: int = 0) -> MembraneBank:
    g = torch.Generator().manual_seed(seed)
    bank = MembraneBank(base)
    for i in range(memberships):
        down = torch.randn(1, *bank.in_shape, generator=g)
        up = torch.randn(base.weight.shape[0], 1, *((1, 1) if bank.is_conv else ()), generator=g)
        bank.add(f"m{i}", LowRankPair(down=down, up=up, alpha=1.0))
    bank.index_rows(bank.names)
    return bank


@pytest.mark.parametrize(
    "base, shapes",
    [
        # in * out / (in + out) = 64 * 32 / 96 = 21.3 positions
        (nn.Linear(64, 32), {(21, 64): False, (22, 64): True, (2, 11, 64): True, (1, 21, 64): False}),
        # 1x1 conv 8 -> 16: 8 * 16 / 24 = 5.3 positions
        (nn.Conv2d(8, 16, 1), {(1, 8, 1, 5): False, (1, 8, 2, 3): True}),
    ],
)
def test_merge_is_cheaper_once_positions_exceed_in_out_over_in_plus_out(base, shapes):
    bank = bank_on(base)
    assert {shape: bank.merge_is_cheaper(torch.zeros(shape)) for shape in shapes} == shapes


@pytest.mark.parametrize("base, x_shape", [(nn.Linear(64, 32), (2, 40, 64)), (nn.Conv2d(8, 16, 1), (2, 8, 6, 6))])
def test_merged_weight_gives_the_stacked_output_and_leaves_the_base_weight(base, x_shape):
    torch.manual_seed(0)
    bank = bank_on(base)
    gates = torch.tensor([1.0, 0.25, 0.0])
    x = torch.randn(x_shape)
    weight, before = base.weight.detach(), base.weight.detach().clone()
    merged = bank.merged_weight(weight, gates)
    stacked = bank.add_delta(base, x, base(x), gates)
    one_op = base._conv_forward(x, merged, base.bias) if bank.is_conv else nn.functional.linear(x, merged, base.bias)
    assert merged.shape == weight.shape and merged.dtype == weight.dtype
    assert torch.allclose(one_op, stacked, atol=1e-5) and not torch.allclose(one_op, base(x), atol=1e-3)
    assert torch.equal(base.weight, before) and base.weight.data_ptr() == weight.data_ptr()


def test_trained_or_quantized_banks_never_merge():
    bank = bank_on(nn.Linear(16, 16))
    assert bank.can_merge
    bank.down.requires_grad_(True)
    assert not bank.can_merge  # a merge would carry no gradient to the membrane
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = nn.Linear(16, 16)
    quantize_(quantized, Int8WeightOnlyConfig())
    assert not bank_on(quantized).can_merge  # the sum would have to be quantized again


def test_auto_memory_merges_per_layer_where_cheaper_keeps_no_copy_and_stacked_never_merges(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "m.safetensors")
    pipe.load_spm(tmp_path / "m.safetensors")
    controller = MembraneController.of(pipe.unet)
    merged_layers, kept = [], []
    original = MembraneBank.merged_weight

    def spy(bank, weight, gates, scaled_up=None):
        merged_layers.append(id(bank))
        return original(bank, weight, gates, scaled_up)

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of snoopy", generator=g, num_inference_steps=2, height=32, width=32, output_type="np",
                    callback_on_step_end=lambda p, i, t, kw: kept.append(len(getattr(controller.call, "merged", ()))) or kw
                    ).images

    monkeypatch.setattr(MembraneBank, "merged_weight", spy)
    merging = run()
    banks = {id(bank) for _, bank in controller.banks()}
    assert set(merged_layers) == banks  # the tiny UNet's layers are narrower than its inputs are long
    assert kept == [0, 0]  # transient: no merged weight outlives its op
    merged_layers.clear()
    pipe.set_spm_memory("stacked")
    stacked = run()
    assert merged_layers == []  # never merges
    assert abs(merging - stacked).max() < 1e-5
    pipe.disable_spm()
    assert abs(run() - stacked).max() > 1e-3  # the membrane acts in both forms


def test_unknown_memory_mode_is_a_clear_error(tmp_path):
    pipe = tiny_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "m.safetensors")
    pipe.load_spm(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="SPM memory mode must be one of 'auto', 'stacked', 'merged', got 'fast'"):
        pipe.set_spm_memory("fast")
    assert MembraneController.of(pipe.unet).memory == "auto"


@pytest.mark.parametrize("memory", ["auto", "stacked"])
def test_each_layer_scales_its_membranes_once_per_call(tmp_path, monkeypatch, memory):
    """Rows that share their gates share them for the whole call: each layer folds the gates into `U`
    once per call (a kernel or more per layer and step saved on a GPU), and the images are unchanged."""
    pipe = tiny_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "m.safetensors")
    pipe.load_spm(tmp_path / "m.safetensors")
    pipe.set_spm_memory(memory)
    controller = MembraneController.of(pipe.unet)
    scaled, original = [], MembraneBank.scaled_up

    def spy(bank, gates, dtype):
        scaled.append(id(bank))
        return original(bank, gates, dtype)

    def run(steps):
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of snoopy", generator=g, num_inference_steps=steps, height=32, width=32,
                    output_type="np").images

    monkeypatch.setattr(MembraneBank, "scaled_up", spy)
    kept = run(3)
    banks = sorted(id(bank) for _, bank in controller.banks())
    assert sorted(scaled) == banks  # 3 steps, one scaling per layer
    scaled.clear()
    pipe.set_spm_scale(0.5)  # new gates: scaled again in the next call, and the images follow
    halved = run(3)
    assert sorted(scaled) == banks and abs(halved - kept).max() > 1e-3
    assert controller.call is None  # the kept tensors went with their call
    pipe.set_spm_scale(1.0)
    assert abs(run(3) - kept).max() == 0  # nothing of the halved call is reused

