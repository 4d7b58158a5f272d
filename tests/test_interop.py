"""Membranes beside ordinary LoRAs, format conversion, other pipelines (ControlNet, img2img, SDXL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from conftest import tiny_components, tiny_pipeline, tiny_sdxl_pipeline
from diffusers_spm import Membrane, StableDiffusionImg2ImgSPMPipeline, add_spm_support
from diffusers_spm.commands import convert
from reference_spm import random_membrane
from test_runtime import unet_inputs


def unet_out(pipe, prompts=("a photo of snoopy", "a red car")):
    with torch.no_grad():
        return pipe.unet(*unet_inputs(pipe, list(prompts))).sample


@pytest.fixture
def files(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.2).save(tmp_path / "snoopy.safetensors")
    random_membrane(pipe.unet, ["style"], seed=2, std=0.2).save(tmp_path / "style.safetensors")
    return tmp_path / "snoopy.safetensors", tmp_path / "style.safetensors"


def assert_spm_equals_lora(pipe, path) -> None:
    """The file through `load_lora_weights`, then through `load_spm` without transport: same UNet output."""
    pipe.load_lora_weights(path, adapter_name="as_lora")
    expected = unet_out(pipe)
    pipe.unload_lora_weights()
    pipe.load_spm(path)
    pipe.set_spm_transport(False)
    torch.testing.assert_close(unet_out(pipe), expected, atol=2e-5, rtol=1e-4)


def test_reference_file_reads_as_plain_lora_in_diffusers(pipe, files):
    snoopy, _ = files
    assert_spm_equals_lora(pipe, snoopy)


@pytest.mark.parametrize("spm_first", [False, True])
def test_membranes_stack_with_load_lora_weights(pipe, files, spm_first):
    snoopy, style = files
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.load_lora_weights(snoopy, adapter_name="snoopy_lora")
    pipe.set_adapters(["style", "snoopy_lora"], [0.5, 1.0])
    expected = unet_out(pipe)
    pipe.unload_lora_weights()
    if spm_first:
        pipe.load_spm(snoopy)
        pipe.load_lora_weights(style, adapter_name="style")
    else:
        pipe.load_lora_weights(style, adapter_name="style")
        pipe.load_spm(snoopy)
    pipe.set_adapters(["style"], [0.5])
    pipe.set_spm_transport(False)
    torch.testing.assert_close(unet_out(pipe), expected, atol=2e-5, rtol=1e-4)
    images = pipe("a photo of snoopy", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    pipe.unload_spm()
    pipe.unload_lora_weights()


def test_convert_to_diffusers_layout_and_back(pipe, files, tmp_path):
    snoopy, _ = files
    pipe.unet.save_config(tmp_path / "base" / "unet")
    out = convert(snoopy, tmp_path / "peft" / "snoopy_peft.safetensors", "diffusers", base=str(tmp_path / "base"))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert_spm_equals_lora(pipe, out)
    back = Membrane.from_file(convert(out, tmp_path / "back.safetensors", "reference"))
    original = Membrane.from_file(snoopy)
    assert back.modules.keys() == original.modules.keys()
    assert all(torch.equal(back.modules[k].down, m.down) and torch.equal(back.modules[k].up, m.up)
               for k, m in original.modules.items())


def test_add_spm_support_in_place_keeps_class_name(tmp_path):
    pipe = StableDiffusionPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    same = add_spm_support(pipe)
    assert same is pipe and type(pipe).__name__ == "StableDiffusionPipeline"
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    assert pipe.get_active_spms() == ["s"]
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        add_spm_support(object())


def test_controlnet_pipeline(tmp_path):
    components = tiny_components()
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **components)
    pipe.set_progress_bar_config(disable=True)
    add_spm_support(pipe)
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "s.safetensors")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run = lambda: pipe("a photo of snoopy", image=image, num_inference_steps=2, height=32, width=32, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    base = run()
    pipe.load_spm(tmp_path / "s.safetensors")
    assert np.abs(run() - base).max() > 1e-3


def test_img2img_pipeline(tmp_path):
    pipe = StableDiffusionImg2ImgSPMPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "s.safetensors")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run = lambda p: pipe(p, image=image, num_inference_steps=4, strength=0.75, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
    base = run("a photo of snoopy")
    pipe.load_spm(tmp_path / "s.safetensors")
    assert np.abs(run("a photo of snoopy") - base).max() > 1e-3


def test_sdxl_pipeline_with_transport(tmp_path):
    pipe = tiny_sdxl_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "s.safetensors")
    run = lambda p: pipe(p, num_inference_steps=2, height=32, width=32, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
    base = run(["a photo of snoopy", "a red car"])
    pipe.load_spm(tmp_path / "s.safetensors")
    rates = pipe.get_spm_transport_rates(["a photo of snoopy", "a red car"])["s"]
    assert rates[0] == pytest.approx(1.0) and rates[1] < 1.0
    with_spm = run(["a photo of snoopy", "a red car"])
    assert np.abs(with_spm - base).max() > 1e-3
    sd1 = tiny_pipeline()
    random_membrane(sd1.unet, ["snoopy"], seed=1).save(tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="text width 32.*this UNet is sdxl-like"):
        pipe.load_spm(tmp_path / "sd1.safetensors")


def test_saved_ready_pipeline_reloads_with_plain_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_spm import StableDiffusionSPMPipeline

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    assert '"_class_name": "StableDiffusionPipeline"' in (tmp_path / "saved" / "model_index.json").read_text()
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionPipeline
    assert type(StableDiffusionSPMPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionSPMPipeline
