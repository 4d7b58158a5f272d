"""The trainer on tiny models: it erases, it anchors, it resumes exactly, batching changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from diffusers import StableDiffusionXLPipeline

from conftest import tiny_pipeline, tiny_sdxl_pipeline
from diffusers_spm import Membrane
from diffusers_spm.training import TrainingConfig, train_membrane
from diffusers_spm.training.anchors import sample_anchor_embeddings
from diffusers_spm.training.losses import to_epsilon
from diffusers_spm.training.trainer import ADAPTER, MembraneTrainer

DATA = Path(__file__).parent / "data"
HELD_OUT = ["a photo of a cat", "mountains at sunset", "a red car", "portrait of a woman"]


def config(tmp_path, concepts=None, per_steps=2, **train) -> TrainingConfig:
    """A tiny run: 32px (16x16 latents), 4 DDIM steps, AdamW, constant lr."""
    train = {"iterations": 4, "lr": 3e-3, "optimizer_type": "AdamW", "lr_scheduler": "constant",
             "lr_warmup_steps": 0, "max_denoising_steps": 4, **train}
    concepts = concepts or [{"target": "snoopy", "action": "erase_with_la", "resolution": 32, "la_strength": 1.0,
                             "sampling_batch_size": 2}]
    return TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "tiny"}, "concepts": concepts,
                                     "train": train, "save": {"path": str(tmp_path / "out"), "per_steps": per_steps}})


@torch.no_grad()
def eps(pipe, prompts, seed=123):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).expand(len(prompts), -1, -1, -1)
    text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    return pipe.unet(x, 500, encoder_hidden_states=text).sample


def with_membrane(pipe, path):
    pipe.load_spm(str(path), adapter_name="trained")
    pipe.set_spm_transport(False)
    return pipe


# ---------------------------------------------------------------------- the algorithm
def test_training_lowers_erase_loss_and_keeps_anchor_loss_small(tmp_path):
    """Random anchors only: on a tiny random text encoder the empty prompt sits close to "snoopy", so
    anchoring it as well holds the erase loss back (its own test is below)."""
    torch.set_num_threads(1)
    concept = {"target": "snoopy", "action": "erase_with_la", "resolution": 32, "la_strength": 1.0,
               "sampling_batch_size": 2, "anchor_unconditional": False}
    cfg = config(tmp_path, [concept], iterations=30)
    trainer = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
    trainer.generator.manual_seed(999)  # held-out draws for evaluation, then the run's own stream
    plans = [trainer.plan() for _ in range(6)]
    latents = trainer.denoise(plans)
    trainer.generator.manual_seed(0)

    def evaluate():
        losses = [trainer.forward_backward(p, x, backward=False) for p, x in zip(plans, latents)]
        return [sum(float(l[k].detach()) for l in losses) / len(losses) for k in ("erase", "anchor")]

    erase_before, anchor_before = evaluate()
    assert anchor_before < 1e-10  # the membrane starts at zero (up = 0)
    for _ in range(cfg.train.iterations):
        trainer.step()
    erase_after, anchor_after = evaluate()
    trainer.close()
    assert erase_after < erase_before / 5, (erase_before, erase_after)
    assert anchor_after < erase_before / 10, (erase_before, anchor_after)


def test_latent_anchoring_moves_held_out_prompts_less(tmp_path):
    torch.set_num_threads(1)
    moved = {}
    for action in ("erase", "erase_with_la"):
        concept = {"target": "snoopy", "action": action, "resolution": 32, "la_strength": 300.0,
                   "sampling_batch_size": 2}
        cfg = config(tmp_path / action, [concept], iterations=20, lr=1e-2)
        pipe = tiny_pipeline()
        before = eps(pipe, HELD_OUT)
        train_membrane(cfg, pipe)
        after = eps(with_membrane(pipe, Path(cfg.save.path) / "untitled_last.safetensors"), HELD_OUT)
        moved[action] = float(((after - before) ** 2).mean())
    assert moved["erase_with_la"] < 0.7 * moved["erase"], moved


def test_anchor_rows_are_the_references_effective_batch(tmp_path):
    """[∅, a1, ∅, a2, ∅, a3, ∅, a4] split in half: the rows anchored are [∅, a3, ∅, a4]."""
    rows = {}
    for unconditional in (True, False):
        concept = {"target": "snoopy", "action": "erase_with_la", "resolution": 32, "sampling_batch_size": 4,
                   "anchor_unconditional": unconditional}
        cfg = config(tmp_path, [concept])
        trainer = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
        rows[unconditional] = trainer.plan().anchors.text
        empty = trainer.encode("").text[0]
        trainer.close()
    assert rows[True].shape == rows[False].shape == (4, 77, 32)
    assert torch.equal(rows[True][0], empty) and torch.equal(rows[True][2], empty)
    assert torch.equal(rows[True][1], rows[False][2]) and torch.equal(rows[True][3], rows[False][3])
    assert not any(torch.equal(row, empty) for row in rows[False])


def test_templates_wrap_target_positive_and_neutral_alike(tmp_path):
    """`templates`: the erase loss compares the target and its surrogate in the same context, so the
    bare concept word is never encoded (with `use_template` only the target is wrapped)."""
    concept = {"target": "snoopy", "action": "erase_with_la", "resolution": 32, "sampling_batch_size": 2,
               "templates": ["a {} on the left", "{} at night"]}
    cfg = config(tmp_path, [concept])
    trainer = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
    encoded = []
    encode = trainer.encode
    trainer.encode = lambda prompt: encoded.append(prompt) or encode(prompt)
    for _ in range(8):
        plan = trainer.plan()
        trainer.forward_backward(plan, trainer.denoise([plan])[0], backward=False)
    trainer.close()
    assert "snoopy" not in encoded
    assert {"a snoopy on the left", "a on the left", "snoopy at night", "at night"} <= set(encoded)
    neutral = "at night" if torch.equal(plan.target.text, encode("snoopy at night").text) else "a on the left"
    assert torch.equal(plan.positive.text, plan.target.text) and torch.equal(plan.neutral.text, encode(neutral).text)


@pytest.mark.parametrize("change", [{"templates": ["a photo of a snoopy"]}, {"templates": ["{} and {}"]},
                                    {"templates": ["a {} {x}"]}, {"templates": ["a {}"], "use_template": True}])
def test_templates_need_one_slot_and_exclude_use_template(change):
    with pytest.raises(ValidationError, match="templates"):
        TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "x"}, "concepts": [{"target": "snoopy", **change}]})


def test_anchoring_the_unconditional_prompt_holds_its_prediction(tmp_path):
    torch.set_num_threads(1)
    moved = {}
    for unconditional in (True, False):
        concept = {"target": "snoopy", "action": "erase_with_la", "resolution": 32, "la_strength": 100.0,
                   "sampling_batch_size": 2, "anchor_unconditional": unconditional}
        cfg = config(tmp_path / str(unconditional), [concept], iterations=20, lr=1e-2)
        pipe = tiny_pipeline()
        before = eps(pipe, [""])
        train_membrane(cfg, pipe)
        after = eps(with_membrane(pipe, Path(cfg.save.path) / "untitled_last.safetensors"), [""])
        moved[unconditional] = float(((after - before) ** 2).mean())
    assert moved[True] < 0.3 * moved[False], moved


def test_anchor_sampling_follows_the_reference():
    target = torch.randn(1, 77, 32)
    anchors = sample_anchor_embeddings(target, 64, torch.Generator().manual_seed(0))
    assert anchors.shape == (64, 77, 32)
    ratios = anchors.flatten(1).norm(dim=1) / target.norm()
    assert ratios.min() >= 0.8 - 1e-5 and ratios.max() <= 1.2 + 1e-5
    again = sample_anchor_embeddings(target, 64, torch.Generator().manual_seed(0))
    assert torch.equal(anchors, again)
    # Directions near the target are rejected: an anchor equal to the target direction has cos 1, accepted never.
    cosines = torch.nn.functional.cosine_similarity(anchors.flatten(1), target.flatten(1))
    assert cosines.max() < 0.5


def test_v_prediction_is_converted_to_epsilon():
    alpha_prod = torch.tensor(0.3)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = alpha_prod.sqrt() * x0 + (1 - alpha_prod).sqrt() * noise
    v = alpha_prod.sqrt() * noise - (1 - alpha_prod).sqrt() * x0
    assert torch.allclose(to_epsilon(v, x_t, alpha_prod, "v_prediction"), noise, atol=1e-5)
    assert torch.allclose(to_epsilon(x0, x_t, alpha_prod, "sample"), noise, atol=1e-5)
    assert torch.equal(to_epsilon(noise, x_t, alpha_prod, "epsilon"), noise)


def test_trains_a_v_prediction_model(tmp_path):
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    cfg = config(tmp_path, iterations=2)
    trainer = MembraneTrainer(cfg, pipe, cfg.concepts, torch.device("cpu"))
    assert trainer.prediction_type == "v_prediction" and trainer.scheduler.config.prediction_type == "v_prediction"
    values = trainer.step()
    trainer.close()
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())


def test_half_precision_unet_keeps_an_fp32_membrane(tmp_path):
    torch.set_num_threads(1)
    losses = []
    membrane = train_membrane(config(tmp_path, iterations=2, precision="bf16"), tiny_pipeline(),
                              callback=lambda step, values: losses.append(values))
    assert all(m.down.dtype == torch.float32 and m.up.dtype == torch.float32 for m in membrane.modules.values())
    assert all(torch.isfinite(torch.tensor(v["loss"])) for v in losses) and losses[-1]["anchor"] > 0


def test_fp16_scales_the_loss_so_every_layer_learns(tmp_path):
    """Unscaled, the gradients through an fp16 UNet underflow: 15 of its 72 layers stayed at zero."""
    torch.set_num_threads(1)
    membrane = train_membrane(config(tmp_path, iterations=6, per_steps=6, precision="fp16"), tiny_pipeline())
    assert all(m.up.abs().max() > 0 and torch.isfinite(m.up).all() for m in membrane.modules.values())


# ---------------------------------------------------------------------- batching, resume
def test_batched_and_unbatched_calls_give_the_same_losses(tmp_path):
    torch.set_num_threads(1)
    runs = {}
    for batched in (True, False):
        losses = []
        cfg = config(tmp_path / str(batched), iterations=3, batch_unet_calls=batched)
        membrane = train_membrane(cfg, tiny_pipeline(), callback=lambda step, values: losses.append(values))
        runs[batched] = (losses, membrane)
    for key in ("loss", "erase", "anchor"):
        batched = torch.tensor([v[key] for v in runs[True][0]], dtype=torch.float64)
        unbatched = torch.tensor([v[key] for v in runs[False][0]], dtype=torch.float64)
        assert torch.allclose(batched, unbatched, rtol=1e-4, atol=1e-12), (key, batched, unbatched)
    # Adam normalises tiny gradient differences, so compare the membranes as wholes.
    for part in ("down", "up"):
        a = torch.cat([getattr(m, part).flatten() for m in runs[True][1].modules.values()])
        b = torch.cat([getattr(runs[False][1].modules[n], part).flatten() for n in runs[True][1].modules])
        assert (a - b).norm() < 1e-2 * a.norm(), part


@pytest.mark.parametrize("denoise_batch, precision, ema_decay",
                         [(1, "float32", None), (2, "float32", None), (1, "fp16", None), (1, "float32", 0.9)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, denoise_batch, precision, ema_decay):
    """fp16 runs checkpoint their loss scaler as well, and EMA runs their moving average."""
    torch.set_num_threads(1)
    settings = {"iterations": 4, "denoise_batch": denoise_batch, "precision": precision, "ema_decay": ema_decay}
    full = train_membrane(config(tmp_path / "full", **settings), tiny_pipeline())

    cfg = config(tmp_path / "cut", **settings)

    def interrupt(step, values):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_membrane(cfg, tiny_pipeline(), callback=interrupt)
    checkpoint = Path(cfg.save.path) / "untitled.checkpoint.pt"
    assert checkpoint.is_file() and not list(Path(cfg.save.path).glob("*.tmp"))
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    resumed = train_membrane(cfg, tiny_pipeline(), resume=True)
    assert resumed.modules.keys() == full.modules.keys()
    for name, module in full.modules.items():
        assert torch.equal(module.down, resumed.modules[name].down), name
        assert torch.equal(module.up, resumed.modules[name].up), name


def test_a_finished_run_resumed_with_more_iterations_equals_the_longer_run(tmp_path):
    """With a constant lr nothing depends on the run's length, so a run goes on from a shorter one's
    last checkpoint (the concept-world benchmark's `long` lever does) with the EMA carried over."""
    torch.set_num_threads(1)
    longer = train_membrane(config(tmp_path / "full", iterations=4, ema_decay=0.9), tiny_pipeline())
    short = config(tmp_path / "short", iterations=3, per_steps=1, ema_decay=0.9)
    train_membrane(short, tiny_pipeline())
    cfg = config(tmp_path / "continued", iterations=4, ema_decay=0.9)
    Path(cfg.save.path).mkdir(parents=True)
    shutil.copy(Path(short.save.path) / "untitled.checkpoint.pt", Path(cfg.save.path) / "untitled.checkpoint.pt")
    continued = train_membrane(cfg, tiny_pipeline(), resume=True)
    for name, module in longer.modules.items():
        assert torch.equal(module.down, continued.modules[name].down), name
        assert torch.equal(module.up, continued.modules[name].up), name


def test_ema_saves_the_moving_average_and_trains_on_the_weights(tmp_path):
    """`ema_decay` changes what is saved, never the training: the weights follow the same path as
    without it, and the saved membrane is diffusers' EMA of them (decay (1 + s) / (10 + s), capped)."""
    torch.set_num_threads(1)
    runs = {}
    for decay in (None, 0.2):
        cfg = config(tmp_path, iterations=3, ema_decay=decay)
        trainer = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
        weights = []
        for _ in range(3):
            trainer.step()
            weights.append(trainer.controller.membrane(ADAPTER))
        runs[decay] = (weights, trainer.membrane_weights(), trainer.controller.membrane(ADAPTER))
        trainer.close()
    (plain, plain_saved, _), (weights, saved, after) = runs[None], runs[0.2]
    for name, pair in saved.modules.items():
        for part in ("down", "up"):
            path = [getattr(w.modules[name], part) for w in weights]
            assert all(torch.equal(a, getattr(b.modules[name], part)) for a, b in zip(path, plain)), (name, part)
            assert torch.equal(getattr(plain_saved.modules[name], part), path[-1])  # no EMA: the last weights
            assert torch.equal(getattr(after.modules[name], part), path[-1])  # restored exactly after reading
            expected = path[0]  # step 1: decay 0; steps 2 and 3: min(2/11, 0.2), min(3/12, 0.2)
            for step, value in ((2, path[1]), (3, path[2])):
                decay = min(step / (9 + step), 0.2)
                expected = decay * expected + (1 - decay) * value
            torch.testing.assert_close(getattr(pair, part), expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(pair.up, weights[-1].modules[name].up) for name, pair in saved.modules.items())


def test_resuming_an_ema_run_from_a_checkpoint_without_one_names_the_fix(tmp_path):
    torch.set_num_threads(1)
    cfg = config(tmp_path, iterations=2, per_steps=1)
    trainer = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
    trainer.step()
    state = trainer.state_dict()
    trainer.close()
    ema = config(tmp_path, iterations=2, ema_decay=0.9)
    resuming = MembraneTrainer(ema, tiny_pipeline(), ema.concepts, torch.device("cpu"))
    before = resuming.controller.membrane(ADAPTER)
    with pytest.raises(ValueError, match="without train.ema_decay.*resume it without ema_decay"):
        resuming.load_state_dict(state)
    assert resuming.step_count == 0
    for name, pair in resuming.controller.membrane(ADAPTER).modules.items():
        assert torch.equal(pair.down, before.modules[name].down) and torch.equal(pair.up, before.modules[name].up)
    resuming.close()


def test_denoise_batch_draws_the_same_plans_and_denoises_the_first_with_the_current_membrane(tmp_path):
    torch.set_num_threads(1)
    trainers = {}
    for batch in (1, 3):
        cfg = config(tmp_path / str(batch), per_steps=3, iterations=3, denoise_batch=batch, max_denoising_steps=6)
        trainers[batch] = MembraneTrainer(cfg, tiny_pipeline(), cfg.concepts, torch.device("cpu"))
        with torch.no_grad():  # a membrane that acts, so that a stale one would show
            for _, bank in trainers[batch].controller.banks():
                bank.up.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    pairs = [[trainers[batch].next_plan() for _ in range(3)] for batch in (1, 3)]
    for (one, x_one), (three, x_three) in zip(*pairs):
        assert (one.steps, one.concept) == (three.steps, three.concept)
        assert torch.equal(one.latents, three.latents) and torch.equal(one.anchors.text, three.anchors.text)
        torch.testing.assert_close(x_three, x_one, atol=1e-5, rtol=1e-4)  # no step taken: the same membrane
    assert len({plan.steps for plan, _ in pairs[1]}) > 1  # the batch mixed depths
    for trainer in trainers.values():
        trainer.close()


def test_checkpoints_must_fall_between_denoise_batches(tmp_path):
    with pytest.raises(ValidationError, match="multiple of train.denoise_batch"):
        config(tmp_path, denoise_batch=3)  # save.per_steps is 2


def test_gradient_checkpointing_gives_the_same_membrane(tmp_path):
    torch.set_num_threads(1)
    plain = train_membrane(config(tmp_path / "plain", iterations=2), tiny_pipeline())
    pipe = tiny_pipeline()
    checkpointed = train_membrane(config(tmp_path / "ckpt", iterations=2, gradient_checkpointing=True), pipe)
    assert not pipe.unet.is_gradient_checkpointing
    for name, module in plain.modules.items():
        assert torch.allclose(module.up, checkpointed.modules[name].up, atol=1e-6), name


def test_sample_images_every_interval(tmp_path):
    cfg = config(tmp_path, iterations=2)
    cfg.logging.interval, cfg.logging.prompts = 1, ["snoopy", "a dog"]
    cfg.logging.width = cfg.logging.height = 32
    cfg.logging.num_inference_steps = 2
    train_membrane(cfg, tiny_pipeline())
    samples = sorted(p.name for p in (Path(cfg.save.path) / "samples" / "untitled").glob("*.png"))
    assert samples == [f"step{s:06d}_{i:02d}_0.png" for s in (1, 2) for i in (0, 1)]


def test_missing_tracker_package_is_a_clear_error(tmp_path):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    cfg = config(tmp_path, iterations=1)
    cfg.logging.tracker = "tensorboard"
    with pytest.raises(ImportError, match="tensorboard"):
        train_membrane(cfg, tiny_pipeline())


def test_training_leaves_the_pipeline_as_it_was(tmp_path):
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    train_membrane(config(tmp_path, iterations=1), pipe)
    assert not hasattr(pipe.unet, "_diffusers_hook")
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- files
def test_membrane_file_has_reference_keys_and_our_metadata(tmp_path):
    cfg = config(tmp_path, [{"target": "wonder woman, the hero", "neutral": "gal gadot", "resolution": 32}],
                 iterations=2)
    train_membrane(cfg, tiny_pipeline())
    path = Path(cfg.save.path) / "untitled_last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert meta["prompts"] == "wonder woman, the hero" and meta["rank"] == "1" and meta["alpha"] == "1.0"
    assert json.loads(meta["spm_concepts"]) == ["wonder woman, the hero"]  # survives the comma
    assert meta["spm_surrogate"] == "gal gadot" and meta["spm_base_model"] == "tiny"
    assert meta["spm_architecture"] == "custom (cross_attention_dim=32)" and meta["spm_format_version"]
    assert json.loads(meta["spm_training_config"])["train"]["iterations"] == 2
    assert (Path(cfg.save.path) / "untitled_2steps.safetensors").exists() is False  # last step is saved as _last

    lora_pipe = tiny_pipeline()
    before = eps(lora_pipe, ["a photo of snoopy"])
    lora_pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="spm")
    assert not torch.allclose(eps(lora_pipe, ["a photo of snoopy"]), before)


def test_membrane_trained_on_one_unet_loads_into_another(tmp_path):
    cfg = config(tmp_path, iterations=3, lr=1e-2)
    train_membrane(cfg, tiny_pipeline(seed=0))
    other = tiny_pipeline(seed=1)
    before = eps(other, ["snoopy"])
    after = eps(with_membrane(other, Path(cfg.save.path) / "untitled_last.safetensors"), ["snoopy"])
    assert not torch.allclose(before, after)


def test_one_membrane_per_concept(tmp_path):
    concepts = [{"target": "snoopy", "resolution": 32}, {"target": "van gogh", "resolution": 32}]
    membranes = train_membrane(config(tmp_path, concepts, iterations=1).model_copy(
        update={"save": config(tmp_path).save.model_copy(update={"per_concept": True})}), tiny_pipeline())
    assert [m.concepts for m in membranes] == [["snoopy"], ["van gogh"]]
    files = sorted(p.name for p in (tmp_path / "out").glob("*_last.safetensors"))
    assert files == ["untitled_00_snoopy_last.safetensors", "untitled_01_van_gogh_last.safetensors"]


# ---------------------------------------------------------------------- configs
def test_reference_yaml_pair_loads_as_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prompts_file is relative to the reference repo root: found beside the config
    cfg = TrainingConfig.from_yaml(DATA / "snoopy" / "config.yaml")
    (concept,) = cfg.concepts
    assert (concept.target, concept.positive, concept.neutral, concept.action) == ("snoopy", "snoopy", "", "erase_with_la")
    assert concept.guidance_scale == 1.0 and concept.la_strength == 1000 and concept.sampling_batch_size == 4
    assert concept.dynamic_resolution and concept.resolution == 512
    assert cfg.train.optimizer_type == "AdamW8bit" and cfg.train.lr_scheduler == "cosine_with_restarts"
    assert cfg.train.lr_scheduler_num_cycles == 3 and cfg.train.lr_warmup_steps == 500
    assert cfg.save.per_steps == 500 and cfg.logging.tracker == "wandb"
    assert cfg.pretrained_model.name_or_path == "CompVis/stable-diffusion-v1-4"


def test_overrides_with_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainingConfig.from_yaml(DATA / "snoopy" / "config.yaml",
                                   ["train.iterations=10", "concepts.*.la_strength=5", "save.per_concept=true"])
    assert cfg.train.iterations == 10 and cfg.concepts[0].la_strength == 5.0 and cfg.save.per_concept


@pytest.mark.parametrize("change, field", [
    ({"action": "forget"}, "action"),
    ({"la_strength": -1}, "la_strength"),
    ({"target": ""}, "target"),
    ({"target": "   "}, "target"),
    ({"resolution": 500}, "resolution"),
])
def test_bad_concepts_name_the_field(tmp_path, change, field):
    concept = {"target": "snoopy", **change}
    with pytest.raises(ValidationError) as err:
        TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "x"}, "concepts": [concept]})
    assert any(e["loc"][-1] == field for e in err.value.errors()), err.value
    assert field in str(err.value)


def test_rank_zero_and_missing_prompts_file_name_the_field(tmp_path):
    with pytest.raises(ValidationError) as err:
        TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "x"}, "concepts": [{"target": "a"}],
                                  "network": {"rank": 0}})
    assert err.value.errors()[0]["loc"] == ("network", "rank")
    with pytest.raises(ValidationError) as err:
        TrainingConfig.from_dict({"pretrained_model": {"name_or_path": "x"}, "prompts_file": "nowhere.yaml"})
    assert "prompts_file" in {e["loc"][0] for e in err.value.errors()} and "nowhere.yaml" in str(err.value)


# ---------------------------------------------------------------------- CLI, Hub
def test_cli_trains_from_a_pipeline_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusers_spm.cli import main

    model = tmp_path / "model"
    tiny_pipeline(cls=StableDiffusionPipeline).save_pretrained(model)
    (tmp_path / "prompt.yaml").write_text('- target: "snoopy"\n  resolution: 32\n')
    (tmp_path / "config.yaml").write_text(
        f'prompts_file: "prompt.yaml"\npretrained_model:\n  name_or_path: "{model}"\n'
        f'train:\n  optimizer_type: AdamW\n  iterations: 2\n  max_denoising_steps: 3\n  lr_warmup_steps: 0\n'
        f'save:\n  name: snoopy\n  path: "{tmp_path / "out"}"\n')
    assert main(["train", str(tmp_path / "config.yaml"), "--set", "train.iterations=1"]) == 0
    membrane = Membrane.from_file(tmp_path / "out" / "snoopy_last.safetensors")
    assert membrane.concepts == ["snoopy"] and membrane.training_config["train"]["iterations"] == 1


def test_model_card_and_push_without_network(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from diffusers_spm.hub import membrane_model_card, push_membrane

    cfg = config(tmp_path, [{"target": "snoopy", "neutral": "a dog", "resolution": 32}], iterations=1)
    train_membrane(cfg, tiny_pipeline())
    path = Path(cfg.save.path) / "untitled_last.safetensors"
    membrane = Membrane.from_file(path)
    card = membrane_model_card(membrane, "| metric | value |\n|---|---|\n| CLIP acc | 0.1 |", filename=path.name,
                               repo_id="org/snoopy")
    assert card.startswith("---\nlibrary_name: diffusers") and "base_model: tiny" in card
    assert "`snoopy`" in card and "`a dog`" in card and 'pipe.load_spm("org/snoopy", weight_name="untitled_last.safetensors")' in card
    assert '"iterations": 1' in card and "## Evaluation" in card and "| CLIP acc | 0.1 |" in card
    assert "## Evaluation" not in membrane_model_card(membrane)

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: calls.append(("upload", kw["path_in_repo"], kw)))
    url = push_membrane(path, "org/snoopy", evaluation_summary="eval table", private=True)
    assert url == "https://huggingface.co/org/snoopy"
    assert calls[0][:2] == ("create", "org/snoopy") and calls[0][2]["private"] and calls[0][2]["exist_ok"]
    uploads = {c[1]: c[2] for c in calls[1:]}
    assert set(uploads) == {"untitled_last.safetensors", "README.md"}
    assert uploads["untitled_last.safetensors"]["path_or_fileobj"] == str(path)
    assert b"eval table" in uploads["README.md"]["path_or_fileobj"]
    assert all(u["repo_id"] == "org/snoopy" for u in uploads.values())


# ---------------------------------------------------------------------- SDXL
def test_sdxl_trains_through_the_same_trainer(tmp_path):
    torch.set_num_threads(1)
    concept = {"target": "snoopy", "action": "erase_with_la", "resolution": 32, "la_strength": 1.0,
               "sampling_batch_size": 2, "dynamic_crops": True}
    runs = {}
    for batched in (True, False):
        losses = []
        cfg = config(tmp_path / str(batched), [concept], iterations=2, batch_unet_calls=batched)
        runs[batched] = (train_membrane(cfg, tiny_sdxl_pipeline(cls=StableDiffusionXLPipeline), callback=lambda s, v: losses.append(v)), losses)
    membrane, losses = runs[True]
    assert membrane.cross_attention_dim == 64
    assert any("attn2_to_k" in name for name in membrane.modules)
    assert losses[-1]["anchor"] > 0
    for a, b in zip(runs[True][1], runs[False][1]):
        assert a["erase"] == pytest.approx(b["erase"], rel=1e-4)
