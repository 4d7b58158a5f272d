"""Membranes on an accelerator in half precision: the device and dtype follow the pipeline, gates stay
exact, fuse/unfuse restores bit for bit, model offload gives the device's images, and training runs there.

Skipped where no CUDA device is present (CI). `DIFFUSERS_SPM_TEST_DEVICE=cpu` runs them on the CPU, to
check the tests themselves; the dtypes stay the accelerator's (fp16 for UNets, bf16 for DiTs).
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_pipeline
from diffusers_spm import Membrane, MembraneController, add_spm_support
from diffusers_spm.families import denoiser_of, family_of
from diffusers_spm.training import TrainingConfig, train_membrane
from reference_spm import random_membrane
from tiny_dits import tiny_flux_pipeline, tiny_sd3_pipeline

DEVICE = os.environ.get("DIFFUSERS_SPM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["a photo of snoopy", "a red car on a road"]  # the membranes' concept named in row 0 only
UNET_DTYPE, DIT_DTYPE = torch.float16, torch.bfloat16
# Images of the same computation batched differently: a few half-precision rounding steps apart (fp16
# steps 2.4e-4 near 0.5 in [0, 1]; bf16 eight times coarser). A membrane's effect must stand well above.
SAME = {UNET_DTYPE: 1e-2, DIT_DTYPE: 2e-2}
EFFECT = 5e-2  # 0.15-0.24 measured on the CPU in these dtypes


def generate(pipe, prompts, seed=0, size=32, **kwargs):
    generators = [torch.Generator(DEVICE).manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type="np", height=size, width=size,
                num_inference_steps=3, **kwargs).images


def on_device(pipe, tmp_path):
    """`pipe` in the accelerator's dtype on the device, a random "snoopy" membrane loaded after the move."""
    denoiser = denoiser_of(pipe)
    membrane = random_membrane(denoiser, ["snoopy"], seed=1, std=0.3)
    path = tmp_path / "snoopy.safetensors"
    family_of(denoiser).save(membrane, path, denoiser)
    dtype = UNET_DTYPE if hasattr(pipe, "unet") else DIT_DTYPE
    pipe.to(DEVICE, dtype)
    pipe.load_spm(path)
    pipe.set_spm_transport(metric="tokenuni")  # gates exactly 1 and 0 on these prompts
    return pipe


def banks_of(pipe):
    return [bank for _, bank in MembraneController.of(denoiser_of(pipe)).banks()]


def test_membranes_follow_the_pipeline_to_the_device_and_dtype(tmp_path):
    pipe = tiny_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "snoopy.safetensors")
    pipe.load_spm(tmp_path / "snoopy.safetensors")  # loaded on the CPU in fp32, then moved with the pipeline
    pipe.to(DEVICE, UNET_DTYPE)
    banks = banks_of(pipe)
    assert len(banks) == 72
    assert all(b.down.device.type == DEVICE and b.down.dtype == UNET_DTYPE and b.up.dtype == UNET_DTYPE for b in banks)
    image = generate(pipe, PROMPTS[:1])
    assert image.shape == (1, 32, 32, 3) and bool(((image >= 0) & (image <= 1)).all())


@pytest.mark.parametrize("memory", ["auto", "stacked", "merged"])
def test_gated_off_row_is_the_plain_pipelines_and_the_named_row_changes(tmp_path, memory):
    pipe = on_device(tiny_pipeline(), tmp_path)
    pipe.set_spm_memory(memory)
    erased = generate(pipe, PROMPTS)
    pipe.disable_spm()
    plain = generate(pipe, PROMPTS)
    assert abs(erased[0] - plain[0]).max() > EFFECT  # the membrane acts where its concept is named
    assert abs(erased[1] - plain[1]).max() < SAME[UNET_DTYPE]  # and nowhere else (gate 0)


def test_one_call_with_two_prompts_equals_two_calls(tmp_path):
    pipe = on_device(tiny_pipeline(), tmp_path)
    batched = generate(pipe, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert abs(generate(pipe, [prompt], seed=i)[0] - batched[i]).max() < SAME[UNET_DTYPE]


def test_fuse_and_unfuse_in_half_precision_restore_the_weights_bit_for_bit(tmp_path):
    pipe = on_device(tiny_pipeline(), tmp_path)
    pipe.set_spm_transport(False)
    hooked = generate(pipe, PROMPTS[:1])
    saved = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_spm()
    assert sum(not torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items()) == 72
    assert abs(generate(pipe, PROMPTS[:1]) - hooked).max() < SAME[UNET_DTYPE]
    pipe.unfuse_spm()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items())


def test_model_cpu_offload_gives_the_images_of_the_pipeline_on_the_device(tmp_path):
    if DEVICE == "cpu":
        pytest.skip("offload moves models between the CPU and an accelerator")
    pipe = on_device(tiny_pipeline(), tmp_path)
    on_gpu = generate(pipe, PROMPTS)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload(device=DEVICE)
    offloaded = generate(pipe, PROMPTS)
    assert pipe.unet.device.type == "cpu"  # offloaded again after the call, membranes with it
    assert all(b.down.device.type == "cpu" for b in banks_of(pipe))
    assert abs(offloaded - on_gpu).max() < SAME[UNET_DTYPE]


@pytest.mark.parametrize("builder", [tiny_sd3_pipeline, tiny_flux_pipeline], ids=["sd3", "flux"])
def test_dit_in_bf16_gates_each_row_by_its_prompt(builder, tmp_path):
    pipe = on_device(add_spm_support(builder()), tmp_path)
    erased = generate(pipe, PROMPTS, size=16)
    pipe.disable_spm()
    plain = generate(pipe, PROMPTS, size=16)
    assert abs(erased[0] - plain[0]).max() > EFFECT
    assert abs(erased[1] - plain[1]).max() < SAME[DIT_DTYPE]


def test_training_on_the_device_saves_a_membrane_that_loads_on_the_cpu(tmp_path):
    config = TrainingConfig.from_dict({
        "pretrained_model": {"name_or_path": "tiny"},
        "concepts": [{"target": "snoopy", "action": "erase_with_la", "resolution": 32, "la_strength": 1.0,
                      "sampling_batch_size": 2}],
        "train": {"iterations": 6, "lr": 3e-3, "optimizer_type": "AdamW", "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "max_denoising_steps": 4, "device": DEVICE, "precision": "fp16"},
        "save": {"path": str(tmp_path / "out"), "per_steps": 6, "name": "snoopy"}})
    trained = train_membrane(config, tiny_pipeline())
    assert all(torch.isfinite(m.up).all() and m.up.abs().max() > 0 for m in trained.modules.values())
    loaded = Membrane.from_file(tmp_path / "out" / "snoopy_last.safetensors")
    assert loaded.modules.keys() == trained.modules.keys()
    assert all(m.down.device.type == "cpu" for m in loaded.modules.values())
    cpu_pipe = tiny_pipeline()
    cpu_pipe.load_spm(tmp_path / "out" / "snoopy_last.safetensors")
    assert cpu_pipe.get_active_spms() == ["snoopy_last"]
