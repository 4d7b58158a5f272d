"""The trainer on tiny random diffusion transformers (SD3, Flux): flow matching by hand, it erases,
it anchors, it resumes exactly, the config checks the base model, the membrane loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from pydantic import ValidationError
from safetensors import safe_open

from conftest import tiny_pipeline
from diffusers_spm import Membrane, add_spm_support
from diffusers_spm.training import TrainingConfig, train_membrane
from diffusers_spm.training.trainer import MembraneTrainer
from tiny_dits import QUANTIZERS, quantized_values, tiny_flux_pipeline, tiny_sd3_pipeline

DATA = Path(__file__).parent / "data"
BUILDERS = {"sd3": lambda seed=0: tiny_sd3_pipeline(seed, with_t5=False), "flux": tiny_flux_pipeline}
CONCEPT = {"target": "snoopy", "action": "erase_with_la", "resolution": 8, "la_strength": 1.0,
           "sampling_batch_size": 2}


def config(tmp_path, concepts=None, per_steps=2, **train) -> TrainingConfig:
    """A tiny run: 8 px (8x8 latents with the tiny VAEs), 3 steps, AdamW, constant lr."""
    train = {"iterations": 4, "lr": 1.5e-2, "optimizer_type": "AdamW", "lr_scheduler": "constant",
             "lr_warmup_steps": 0, "max_denoising_steps": 3, **train}
    return TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "tiny"}, "concepts": concepts or [CONCEPT],
                                     "train": train, "save": {"path": str(tmp_path / "out"), "per_steps": per_steps}})


def trainer_for(pipe, cfg) -> MembraneTrainer:
    return MembraneTrainer(cfg, pipe, cfg.concepts, torch.device("cpu"))


# ---------------------------------------------------------------------- flow matching, by hand
def hand_sigmas(family: str, steps: int, tokens: int) -> torch.Tensor:
    """The noise level after each step. SD3 (shift 3): the scheduler spaces its shifted ends linearly,
    then shifts again. Flux: `FluxPipeline`'s sigmas 1 .. 1/T, shifted by `mu` for the image's tokens."""
    if family == "sd3":
        shift = 3.0
        end = shift * 0.001 / (1 + (shift - 1) * 0.001)
        u = torch.linspace(1.0, end, steps, dtype=torch.float64)
        return shift * u / (1 + (shift - 1) * u)
    u = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_noisy_latent_loss_timestep_and_erase_target_match_a_hand_computation(tmp_path, family):
    """With an oracle denoiser whose velocity is `e - x0(prompt)`, Euler steps follow the straight path
    exactly: after k steps `x = (1 - s_k) x0 + s_k e`, and the loss is taken at `1000 s_k`."""
    pipe = BUILDERS[family]()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if family == "sd3" else \
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    concept = {**CONCEPT, "neutral": "a dog", "guidance_scale": 2.0, "resolution": 16}
    trainer = trainer_for(pipe, config(tmp_path, [concept], max_denoising_steps=5))
    plan = trainer.plan()
    noise = plan.latents.clone()
    calls = []

    def x0(cond):  # a clean image per prompt: its text states' mean, everywhere
        return cond.text.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def oracle(latents, timestep, cond, time_ids, guidance=1.0):
        calls.append((float(timestep), len(latents), guidance))
        return (noise - x0(cond)).expand_as(latents)

    trainer.predict = oracle
    (x_t,) = trainer.denoise([plan])
    k, scale = plan.steps, trainer.config.train.denoise_guidance_scale
    s = float(hand_sigmas(family, 5, tokens=(16 // 2) ** 2)[k])
    uncond, target = x0(trainer.encode("")), x0(plan.target)
    if family == "flux":  # guidance-distilled: one call with the guidance embedding, on the target alone
        assert [(rows, g) for _, rows, g in calls] == [(1, scale)] * k
        clean = target
    else:  # a CFG pair per step
        assert [(rows, g) for _, rows, g in calls] == [(2, 1.0)] * k
        clean = uncond + scale * (target - uncond)
    torch.testing.assert_close(x_t, (1 - s) * clean + s * noise, atol=1e-5, rtol=1e-5)

    calls.clear()
    losses = trainer.forward_backward(plan, x_t, backward=False)
    assert {round(t, 3) for t, _, _ in calls} == {round(1000 * s, 3)}
    assert {g for _, _, g in calls} == {1.0}  # the reference's guidance-1 predictions
    # v' - [v_n - eta (v_p - v_n)] with v = e - x0 and positive = target: (1 + eta) (x0_n - x0_t), no e.
    expected = float(((1 + 2.0) * (x0(trainer.encode("a dog")) - target)) ** 2)
    assert float(losses["erase"]) == pytest.approx(expected, rel=1e-3)  # float32: e cancels out of ~1e-3 differences
    assert float(losses["anchor"]) == 0.0  # the oracle ignores the membrane
    trainer.close()


# ---------------------------------------------------------------------- it erases, it anchors
def erase_and_anchor(trainer: MembraneTrainer, iterations: int) -> tuple[float, float, float]:
    """The erase loss on held-out draws before and after `iterations` steps, and the anchor loss after."""
    trainer.generator.manual_seed(999)  # held-out draws for evaluation, then the run's own stream
    plans = [trainer.plan() for _ in range(6)]
    latents = trainer.denoise(plans)
    trainer.generator.manual_seed(trainer.config.train.seed)

    def evaluate():
        losses = [trainer.forward_backward(p, x, backward=False) for p, x in zip(plans, latents)]
        return [sum(float(l[k].detach()) for l in losses) / len(losses) for k in ("erase", "anchor")]

    erase_before, anchor_before = evaluate()
    assert anchor_before < 1e-10  # the membrane starts at zero (up = 0)
    for _ in range(iterations):
        trainer.step()
    erase_after, anchor_after = evaluate()
    trainer.close()
    return erase_before, erase_after, anchor_after


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_training_lowers_erase_loss_and_keeps_anchor_loss_small(tmp_path, family):
    """Measured (seeds 0-2, 25 steps): the erase loss falls 12-32x on SD3 and 6.5-12x on Flux, and
    the anchor loss ends at 3-8 % of the erase loss's start. Random anchors only, as for the UNet test."""
    torch.set_num_threads(1)
    cfg = config(tmp_path, [{**CONCEPT, "anchor_unconditional": False}], iterations=25)
    before, after, anchor = erase_and_anchor(trainer_for(BUILDERS[family](), cfg), cfg.train.iterations)
    assert after < before / 5, (before, after)
    assert anchor < before / 10, (before, anchor)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_training_through_a_quantized_base_keeps_an_fp32_membrane(tmp_path, quantizer):
    """torchao int8 weight-only and bitsandbytes 8/4-bit (CPU kernels): the membrane trains beside the
    quantized layers, which stay as they were."""
    library, quantize = QUANTIZERS[quantizer]
    pytest.importorskip(library)
    torch.set_num_threads(1)
    pipe = BUILDERS["sd3"]()
    quantize(pipe.transformer)
    quantized = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    before_weights = quantized_values(quantized).clone()
    cfg = config(tmp_path, [{**CONCEPT, "anchor_unconditional": False}], iterations=25)
    trainer = trainer_for(pipe, cfg)
    assert all(bank.up.dtype == torch.float32 for _, bank in trainer.controller.banks())
    before, after, anchor = erase_and_anchor(trainer, cfg.train.iterations)
    assert after < before / 5 and anchor < before / 10, (before, after, anchor)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight is quantized
    assert torch.equal(quantized_values(quantized), before_weights)


# ---------------------------------------------------------------------- precision, checkpointing, resume
def test_bf16_transformer_keeps_an_fp32_membrane_and_checkpointing_changes_nothing(tmp_path):
    torch.set_num_threads(1)
    losses = []
    membrane = train_membrane(config(tmp_path / "bf16", iterations=2, precision="bf16"), BUILDERS["sd3"](),
                              callback=lambda step, values: losses.append(values))
    assert all(m.down.dtype == torch.float32 and m.up.dtype == torch.float32 for m in membrane.modules.values())
    assert all(math.isfinite(v["loss"]) for v in losses) and losses[-1]["anchor"] > 0

    plain = train_membrane(config(tmp_path / "plain", iterations=2), BUILDERS["sd3"]())
    pipe = BUILDERS["sd3"]()
    checkpointed = train_membrane(config(tmp_path / "ckpt", iterations=2, gradient_checkpointing=True), pipe)
    assert not pipe.transformer.is_gradient_checkpointing
    assert sum(bool(module.up.any()) for module in plain.modules.values()) > len(plain.modules) // 2
    for name, module in plain.modules.items():
        torch.testing.assert_close(checkpointed.modules[name].up, module.up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, family):
    torch.set_num_threads(1)
    full = train_membrane(config(tmp_path / "full"), BUILDERS[family]())
    cfg = config(tmp_path / "cut")

    def interrupt(step, values):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_membrane(cfg, BUILDERS[family](), callback=interrupt)
    assert torch.load(Path(cfg.save.path) / "untitled.checkpoint.pt", weights_only=True)["step"] == 2
    resumed = train_membrane(cfg, BUILDERS[family](), resume=True)
    assert resumed.modules.keys() == full.modules.keys()
    for name, module in full.modules.items():
        assert torch.equal(module.down, resumed.modules[name].down), name
        assert torch.equal(module.up, resumed.modules[name].up), name


def test_prompts_are_encoded_once_at_the_start(tmp_path):
    """The prompts of a run are fixed (templates included), so the text encoders are not needed after
    the start; with `offload_text_encoders` they stay on the CPU."""
    torch.set_num_threads(1)
    pipe = BUILDERS["sd3"]()
    cfg = config(tmp_path, [{**CONCEPT, "use_template": True, "neutral": "a dog"}], iterations=3,
                 offload_text_encoders=True)
    trainer = trainer_for(pipe, cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder ran after the start")

    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.forward = refuse
    for _ in range(3):
        trainer.step()
    trainer.close()
    assert pipe.text_encoder.device.type == "cpu"


# ---------------------------------------------------------------------- the config against the base
def errors(err: ValidationError) -> dict[tuple, str]:
    return {e["loc"]: e["msg"] for e in err.errors()}


def test_settings_that_make_no_sense_for_a_flow_model_name_the_field_and_the_fix(tmp_path):
    cfg = TrainingConfig.from_dict({
        "pretrained_model": {"name_or_path": "tiny", "v_pred": True},
        "concepts": [{**CONCEPT, "dynamic_crops": True}], "train": {"noise_scheduler": "ddim"}})
    with pytest.raises(ValidationError) as err:
        train_membrane(cfg, BUILDERS["sd3"]())
    found = errors(err.value)
    assert set(found) == {("pretrained_model", "v_pred"), ("train", "noise_scheduler"), ("concepts", 0, "dynamic_crops")}
    assert "flow-matching velocity" in found["pretrained_model", "v_pred"] and "Remove pretrained_model.v_pred" in \
        found["pretrained_model", "v_pred"]
    assert "flow_match_euler" in found["train", "noise_scheduler"]
    assert "Set dynamic_crops to false" in found["concepts", 0, "dynamic_crops"]


def test_flux_refuses_clip_skip_guidance_rescale_and_unpackable_sizes():
    pipe = BUILDERS["flux"]()
    pipe.vae_scale_factor = 8  # Flux.1's VAE: with 2x2 packing, sizes are multiples of 16 px
    cfg = TrainingConfig.from_dict({
        "pretrained_model": {"name_or_path": "tiny", "clip_skip": 2},
        "concepts": [{**CONCEPT, "resolution": 40}, {**CONCEPT, "resolution": 96, "dynamic_resolution": True}],
        "train": {"denoise_guidance_rescale": 0.5}})
    with pytest.raises(ValidationError) as err:
        cfg.check_base(pipe)
    found = errors(err.value)
    assert set(found) == {("pretrained_model", "clip_skip"), ("train", "denoise_guidance_rescale"),
                          ("concepts", 0, "resolution"), ("concepts", 1, "dynamic_resolution")}
    assert "multiple of 16 px" in found["concepts", 0, "resolution"]
    assert "steps of 8 px" in found["concepts", 1, "dynamic_resolution"]
    assert "guidance-distilled" in found["train", "denoise_guidance_rescale"]
    cfg.pretrained_model.clip_skip = 1  # the reference's "last layer": no skip, fine everywhere
    with pytest.raises(ValidationError) as err:
        cfg.check_base(pipe)
    assert ("pretrained_model", "clip_skip") not in errors(err.value)


def test_reference_yaml_checks_against_a_unet_and_names_its_scheduler_on_sd3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainingConfig.from_yaml(DATA / "snoopy" / "config.yaml")
    cfg.check_base(tiny_pipeline())  # the reference's layout and values fit a UNet
    with pytest.raises(ValidationError) as err:
        cfg.check_base(BUILDERS["sd3"]())
    assert set(errors(err.value)) == {("train", "noise_scheduler")}
    cfg.train.noise_scheduler = None
    cfg.check_base(BUILDERS["sd3"]())
    with pytest.raises(ValidationError, match="denoises with 'ddim'"):
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"noise_scheduler": "flow_match_euler"})}
                       ).check_base(tiny_pipeline())


# ---------------------------------------------------------------------- files
def test_membrane_trained_on_sd3_loads_with_load_spm(tmp_path):
    torch.set_num_threads(1)
    cfg = config(tmp_path, iterations=3, lr=5e-2)
    train_membrane(cfg, BUILDERS["sd3"]())
    path = Path(cfg.save.path) / "untitled_last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys  # the diffusers/PEFT layout
    assert meta["spm_family"] == "sd3" and meta["spm_architecture"] == "sd3.5-2-blocks"
    assert Membrane.from_file(path).concepts == ["snoopy"]

    pipe = add_spm_support(BUILDERS["sd3"](seed=1))
    kwargs = dict(prompt="a photo of snoopy", num_inference_steps=2, height=8, width=8, output_type="np")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_spm(path)
    pipe.set_spm_transport(False)
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-3
    pipe.unload_spm()
    assert (pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images == before).all()


def test_cli_trains_from_an_sd3_folder_saved_without_t5(tmp_path):
    """diffusers refuses to load a folder whose index marks a component null unless it is passed as
    None; the base loader does that, so `diffusers-spm train` takes such a folder as it is."""
    from diffusers_spm.cli import main

    model = tmp_path / "model"
    BUILDERS["sd3"]().save_pretrained(model)
    (tmp_path / "config.yaml").write_text(
        f'pretrained_model:\n  name_or_path: "{model}"\nconcepts:\n  - target: "snoopy"\n    resolution: 8\n'
        f'train:\n  optimizer_type: AdamW\n  iterations: 1\n  max_denoising_steps: 3\n  lr_warmup_steps: 0\n'
        f'save:\n  name: snoopy\n  path: "{tmp_path / "out"}"\n')
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    membrane = Membrane.from_file(tmp_path / "out" / "snoopy_last.safetensors")
    assert membrane.family == "sd3" and membrane.base_model == "model"
