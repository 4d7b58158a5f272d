"""Gates follow the prompt whatever the route into the UNet; fusing beside a LoRA in any order;
concurrent calls from several threads."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from conftest import recorded_gates, tiny_pipeline, tiny_sdxl_pipeline
from diffusers_spm import MembraneController, add_spm_support
from diffusers_spm.pipeline import StableDiffusionImg2ImgSPMPipeline, StableDiffusionXLImg2ImgSPMPipeline
from reference_spm import random_membrane
from test_restore import snapshot

PROMPTS = ["a red car", "a photo of snoopy"]
PROMPTS_2 = ["a photo of snoopy", "a red car"]  # SDXL: the concept named only in `prompt_2` of row 0
STEPS, SIZE = 3, 32


def generators():
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


def text_kwargs(xl: bool) -> dict:
    return {"prompt": PROMPTS, "prompt_2": PROMPTS_2} if xl else {"prompt": PROMPTS}


def run_pipeline(pipe, xl, **kwargs):
    return pipe(**kwargs, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                generator=generators()).images


def via_pipeline(pipe, xl):
    return run_pipeline(pipe, xl, **text_kwargs(xl))


def via_add_spm_support(pipe, xl):
    plain = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    return via_pipeline(add_spm_support(plain), xl)


def via_auto_text2img(pipe, xl):
    auto = AutoPipelineForText2Image.from_pipe(pipe)
    auto.set_progress_bar_config(disable=True)
    return via_pipeline(auto, xl)


def init_image():
    return torch.rand(len(PROMPTS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def via_auto_img2img(pipe, xl):
    auto = AutoPipelineForImage2Image.from_pipe(pipe)
    auto.set_progress_bar_config(disable=True)
    return run_pipeline(auto, xl, **text_kwargs(xl), image=init_image(), strength=0.9)


def via_img2img(pipe, xl):
    """The reference for `via_auto_img2img`: the ready SPM image-to-image class."""
    ready = (StableDiffusionXLImg2ImgSPMPipeline if xl else StableDiffusionImg2ImgSPMPipeline).from_pipe(pipe)
    ready.set_progress_bar_config(disable=True)
    return run_pipeline(ready, xl, **text_kwargs(xl), image=init_image(), strength=0.9)


def encoded(pipe, xl):
    """`pipe.encode_prompt` as a user calls it: (prompt rows, negative rows, pooled, negative pooled)."""
    if xl:
        return pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS_2, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True)
    return (*pipe.encode_prompt(PROMPTS, "cpu", 1, True), None, None)


def via_prompt_embeds(pipe, xl):
    embeds, negative, pooled, negative_pooled = encoded(pipe, xl)
    extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled} if xl else {}
    return run_pipeline(pipe, xl, prompt_embeds=embeds, negative_prompt_embeds=negative, **extra)


@torch.no_grad()
def via_unet_loop(pipe, xl):
    """A hand-written denoising loop calling `pipe.unet` (CFG in diffusers' layout)."""
    embeds, negative, pooled, negative_pooled = encoded(pipe, xl)
    guidance = 5.0 if xl else 7.5
    text = torch.cat([negative, embeds])
    added = None
    if xl:
        time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": torch.cat([negative_pooled, pooled]),
                 "time_ids": time_ids.repeat(2 * len(PROMPTS), 1)}
    latents = pipe.prepare_latents(len(PROMPTS), 4, SIZE, SIZE, embeds.dtype, "cpu", generators())
    pipe.scheduler.set_timesteps(STEPS)
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=text, added_cond_kwargs=added).sample.chunk(2)
        latents = pipe.scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


ROUTES = {
    "ready class": (via_pipeline, via_pipeline),
    "add_spm_support": (via_add_spm_support, via_pipeline),
    "AutoPipelineForText2Image.from_pipe": (via_auto_text2img, via_pipeline),
    "AutoPipelineForImage2Image.from_pipe": (via_auto_img2img, via_img2img),
    "prompt_embeds from encode_prompt": (via_prompt_embeds, via_pipeline),
    "hand-written loop on pipe.unet": (via_unet_loop, via_pipeline),
}


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_gets_the_prompts_gates_and_images(route, xl, tmp_path):
    pipe = tiny_sdxl_pipeline() if xl else tiny_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "snoopy.safetensors")
    pipe.load_spm(tmp_path / "snoopy.safetensors")
    pipe.set_spm_transport(True, metric="tokenuni")  # 0 or 1 per row: the embedding cosine would give ~0.9
    run, reference = ROUTES[route]
    gates = recorded_gates(pipe)
    expected = reference(pipe, xl)
    gates.clear()
    images = run(pipe, xl)

    # [negative rows, prompt rows]: row 1 names snoopy; for SDXL row 0 too, in `prompt_2` only.
    wanted = torch.tensor([1.0 if xl else 0.0, 1.0] * 2)
    assert len(gates) >= 1
    for forward in gates:
        torch.testing.assert_close(forward[:, 0], wanted)
    assert np.abs(images - expected).max() < 1e-4
    pipe.disable_spm()
    assert np.abs(reference(pipe, xl) - expected).max() > 1e-3  # the membrane acts on these images


def test_sdxl_concept_in_prompt_2_raises_the_gate(tmp_path):
    pipe = tiny_sdxl_pipeline()
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    gates = recorded_gates(pipe)
    pipe("a red car", prompt_2="a photo of snoopy", num_inference_steps=1, height=SIZE, width=SIZE)
    pipe("a red car", num_inference_steps=1, height=SIZE, width=SIZE)
    assert gates[0][0].item() == pytest.approx(1.0)
    assert gates[1][0].item() < 0.99


def test_embeddings_from_elsewhere_fall_back_to_the_cosine_with_a_warning(pipe, tmp_path, caplog):
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    controller = MembraneController.of(pipe.unet)
    text = pipe.encode_prompt(["a red car"], "cpu", 1, False)[0]
    foreign = text + 1e-3  # no hooked encoder produced these
    full = controller.rates(text)[0]
    pipe.set_spm_transport(True, metric="clipcos")
    cosine = controller.rates(text)[0]
    pipe.set_spm_transport(True)
    with caplog.at_level("WARNING"):
        fallback = controller.rates(foreign)[0]
        controller.rates(foreign)
    assert sum("not produced by the pipeline's text encoders" in r.message for r in caplog.records) == 1
    assert fallback.item() == pytest.approx(cosine.item(), abs=1e-4) and full.item() == pytest.approx(cosine.item())


def test_unload_removes_the_text_encoder_hooks(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    assert hasattr(pipe.text_encoder, "_diffusers_hook")
    pipe.unload_spm()
    assert not hasattr(pipe.text_encoder, "_diffusers_hook") and "forward" not in pipe.text_encoder.__dict__


# ---------------------------------------------------------------- fusing beside a LoRA
# Every order of fuse_spm (S), fuse_lora (L), unfuse_spm (s), unfuse_lora (l), each fuse before its unfuse.
ORDERS = ["".join(p) for p in itertools.permutations("SLsl") if p.index("S") < p.index("s") and p.index("L") < p.index("l")]


@pytest.mark.parametrize("order", ORDERS)
def test_fuse_and_unfuse_beside_a_lora_in_any_order(order, tmp_path):
    random_membrane(tiny_pipeline().unet, ["snoopy"], seed=1, std=0.2).save(tmp_path / "spm.safetensors")
    random_membrane(tiny_pipeline().unet, ["style"], seed=2, std=0.2).save(tmp_path / "lora.safetensors")

    lora_only = tiny_pipeline()  # the weights the LoRA calls alone leave: fused, then unfused
    lora_only.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    lora_only.fuse_lora()
    lora_fused = plain_weights(lora_only.unet)
    lora_only.unfuse_lora()
    lora_unfused = plain_weights(lora_only.unet)

    pipe = tiny_pipeline()
    original = snapshot(pipe.unet)
    pipe.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    pipe.load_spm(tmp_path / "spm.safetensors")
    pipe.set_spm_transport(False)
    calls = {"S": pipe.fuse_spm, "L": pipe.fuse_lora, "s": pipe.unfuse_spm, "l": pipe.unfuse_lora}
    done = ""
    for call in order:
        calls[call]()
        done += call
        if done in ("SLs", "LSs"):  # the LoRA alone is fused: exactly as it fuses by itself
            assert_weights(pipe.unet, lora_fused)
    # SPM outermost (S L l s) puts back the tensor it kept; otherwise the weights are exactly what
    # the LoRA's own fuse and unfuse leave.
    assert_weights(pipe.unet, original if order == "SLls" else lora_unfused)


def plain_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights under their plain names (PEFT's LoRA tensors left out)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def assert_weights(unet, expected):
    plain = plain_weights(unet)
    assert plain.keys() == expected.keys()
    differing = [k for k, v in plain.items() if not torch.equal(v, expected[k])]
    assert not differing, differing[:3]


# ---------------------------------------------------------------- threads
def test_two_threads_get_the_images_of_sequential_calls(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    prompts = ["a photo of snoopy", "a red car"]
    run = lambda prompt: pipe(prompt, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
    sequential = [run(p) for p in prompts]
    assert np.abs(sequential[0] - sequential[1]).max() > 1e-3
    barrier, threaded, errors = threading.Barrier(2), {}, []

    def worker(i):
        try:
            barrier.wait()
            threaded[i] = run(prompts[i])
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):  # mixed gates differ by ~0.1; the tolerance only absorbs float summation order
        np.testing.assert_allclose(threaded[i], sequential[i], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- paper cuts
def test_scale_takes_any_real_number_and_rates_take_no_prompts(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=1).save(tmp_path / "s.safetensors")
    pipe.load_spm(tmp_path / "s.safetensors")
    pipe.set_spm_scale(np.float32(0.5))
    pipe.set_spm_scale({"s": np.int64(2)})
    assert MembraneController.of(pipe.unet).adapters["s"].scale == 2.0
    for bad in (True, np.float64("nan"), -1, "0.5"):
        with pytest.raises(ValueError, match="finite number >= 0"):
            pipe.set_spm_scale(bad)
    assert pipe.get_spm_transport_rates([]) == {"s": []}
