"""The concept world: renderer, captions, judge, metrics, and the shipped model.

Most tests use a reduced world (3 shapes x 3 colours x 2 textures) so that they stay fast on CPU.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusers_spm.concept_world import (
    COLOURS,
    KINDS,
    SHAPES,
    TEXTURES,
    WEIGHTS_DIR,
    ConceptWorld,
    WorldEvaluation,
    alteration,
    concept_cases,
    evaluate_concepts,
    generate_images,
    judge_accuracy,
    load_concept_world_pipeline,
    load_judge,
    make_batch,
    reference_images,
    train_judge,
    weights_available,
)
from diffusers_spm import Membrane
from diffusers_spm.concept_world.experiments import (
    WorldTraining,
    context_templates,
    train_world_membrane,
    training_config,
    world_training,
)
from diffusers_spm.concept_world.world import BACKGROUND_RGB, COLOUR_RGB

SMALL = ConceptWorld(shapes=("circle", "triangle", "cross"), colours=("red", "green", "blue"), textures=("solid", "striped"))


@pytest.fixture(scope="module")
def small_judge():
    pool = make_batch(SMALL, 1500, np.random.default_rng(5))
    return train_judge(SMALL, steps=150, batch_size=32, lr=5e-3, seed=0, width=8, pool=pool)


# ---------------------------------------------------------------- world
def test_full_world_has_the_promised_concepts():
    world = ConceptWorld()
    assert len(world.shapes) >= 5 and len(world.colours) >= 6 and world.textures == ("solid", "striped", "dotted")
    for concept in (*SHAPES, *COLOURS, *TEXTURES):
        assert concept.synonyms[0] == concept.name and len(concept.synonyms) >= 3
    assert "round disc" in world.concept("circle").synonyms


def test_render_is_deterministic_and_in_range():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    scenes_a = [SMALL.sample_scene(rng_a) for _ in range(8)]
    scenes_b = [SMALL.sample_scene(rng_b) for _ in range(8)]
    assert scenes_a == scenes_b
    images = SMALL.render_batch(scenes_a)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images, SMALL.render_batch(scenes_b))
    assert images.min() >= 0 and images.max() <= 1
    assert len({img.tobytes() for img in images}) == 8


def test_render_draws_the_named_colour_and_background():
    scene = SMALL.sample_scene(np.random.default_rng(0), shape="cross", colour="blue", texture="solid", background="black")
    image = SMALL.render(scene)
    cx = int(round((scene.cx + 1) / 2 * 32 - 0.5))
    cy = int(round((1 - scene.cy) / 2 * 32 - 0.5))
    np.testing.assert_allclose(image[cy, cx], np.array(COLOUR_RGB["blue"]) / 255, atol=1e-6)
    corner_y, corner_x = (31 if scene.cy > 0 else 0), (0 if scene.cx > 0 else 31)  # the corner away from the shape
    np.testing.assert_allclose(image[corner_y, corner_x], np.array(BACKGROUND_RGB["black"]) / 255, atol=1e-6)
    striped = SMALL.render(SMALL.sample_scene(np.random.default_rng(0), shape="cross", colour="blue", texture="striped"))
    # the striped fill alternates between the colour and a light tint of it
    assert np.unique(striped.reshape(-1, 3).round(3), axis=0).shape[0] > np.unique(image.reshape(-1, 3).round(3), axis=0).shape[0]


def test_captions_name_what_is_drawn():
    rng = np.random.default_rng(1)
    world = ConceptWorld()
    for _ in range(300):
        scene = world.sample_scene(rng)
        caption = world.sample_caption(scene, rng, split="any", drop_prob=0.3)
        for kind, name in caption.named().items():
            assert getattr(scene, kind) == name
        assert world.parse(caption.text) == caption.named(), caption.text


def test_held_out_split_is_disjoint_and_covers_every_synonym():
    world = ConceptWorld()
    rng = np.random.default_rng(2)
    train = {world.sample_caption(world.sample_scene(rng), rng, split="train").text for _ in range(3000)}
    held = {world.sample_caption(world.sample_scene(rng), rng, split="heldout").text for _ in range(3000)}
    assert not train & held
    held_choices = world.caption_choices(held_out=True)
    assert 0.1 < len(held_choices) / len(world.caption_choices()) < 0.3
    train_choices = world.caption_choices(held_out=False)
    for attr in ("outer", "np_form", "shape_syn", "colour_syn", "texture_syn"):
        assert {getattr(c, attr) for c in train_choices} == {getattr(c, attr) for c in held_choices}


def test_paraphrases_share_no_token_with_the_concept():
    world = ConceptWorld()
    assert world.parse("a photo of a scarlet round disc") == {"shape": "circle", "colour": "red"}
    assert world.parse("a plus sign, polka-dot") == {"shape": "cross", "texture": "dotted"}
    assert world.parse("a five-pointed star in lilac") == {"shape": "star", "colour": "purple"}


# ---------------------------------------------------------------- judge
def test_judge_beats_chance_by_a_wide_margin(small_judge):
    images, labels = make_batch(SMALL, 300, np.random.default_rng(99))
    targets = [{k: SMALL.names(k)[labels[k][i]] for k in labels} for i in range(300)]
    acc = judge_accuracy(small_judge, images, targets)
    assert acc["colour"] > 0.9 and acc["texture"] > 0.9 and acc["shape"] > 0.45  # chance: 1/3, 1/2, 1/3
    assert acc["joint"] > 0.4  # chance is 1/18


def test_judge_save_load_roundtrip(small_judge, tmp_path):
    small_judge.save(tmp_path)
    loaded = type(small_judge).load(tmp_path)
    images, _ = make_batch(SMALL, 16, np.random.default_rng(3))
    assert loaded.classify(images) == small_judge.classify(images)
    assert loaded.config == small_judge.config


# ---------------------------------------------------------------- metrics
class RenderPipe:
    """A stand-in pipeline that renders what the prompt names; ``swap`` redraws some concepts wrongly.

    It records what it drew, so :class:`OracleJudge` can label its images exactly: the metric tests
    then test the metrics, not the judge.
    """

    def __init__(self, world: ConceptWorld, swap: dict[str, str] | None = None, drawn: dict | None = None):
        self.world, self.swap = world, swap or {}
        self.drawn = {} if drawn is None else drawn

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, output_type):
        assert output_type == "np" and len(prompt) == len(generator)
        images = []
        for text, gen in zip(prompt, generator):
            rng = np.random.default_rng(int(gen.initial_seed()))
            named = {k: self.swap.get(v, v) for k, v in self.world.parse(text).items()}
            scene = self.world.sample_scene(rng, **named)
            image = self.world.render(scene)
            self.drawn[image.tobytes()] = scene
            images.append(image)
        return SimpleNamespace(images=np.stack(images))


class OracleJudge:
    """Labels images by what the stand-in pipeline drew."""

    def __init__(self, drawn: dict):
        self.drawn = drawn

    def classify(self, images):
        scenes = [self.drawn[np.asarray(img, dtype=np.float32).tobytes()] for img in images]
        return {k: [getattr(s, k) for s in scenes] for k in KINDS}


def _evaluate(swap, drawn, reference=None):
    pipe = RenderPipe(SMALL, swap, drawn)
    evaluation = WorldEvaluation(prompts_per_concept=6, preserve_prompts_per_concept=3)
    return evaluate_concepts(pipe, OracleJudge(drawn), SMALL, ["circle"], reference=reference, evaluation=evaluation)


def test_metrics_on_a_faithful_pipeline():
    drawn = {}
    reference = reference_images(RenderPipe(SMALL, drawn=drawn), SMALL, ["circle"], WorldEvaluation(preserve_prompts_per_concept=3))
    m = _evaluate({}, drawn, reference)
    assert m.erasure == 0.0 and m.preservation == 1.0 and m.alteration == 0.0
    assert set(m.preservation_per_concept) == set(SMALL.shapes + SMALL.colours + SMALL.textures) - {"circle"}
    assert m.erasure_images.shape == (12, 32, 32, 3)
    assert m.preservation_images.shape == reference.shape == (3 * 7, 32, 32, 3)


def test_metrics_move_the_right_way_when_a_concept_is_drawn_wrongly():
    drawn = {}
    reference = reference_images(RenderPipe(SMALL, drawn=drawn), SMALL, ["circle"], WorldEvaluation(preserve_prompts_per_concept=3))
    # "erasing" circle: prompts about circles now draw triangles; nothing else changes
    erased = _evaluate({"circle": "triangle"}, drawn, reference)
    assert erased.erasure == 1.0 and erased.preservation == 1.0 and erased.alteration == 0.0
    # collateral damage: red is now drawn green as well
    damaged = _evaluate({"circle": "triangle", "red": "green"}, drawn, reference)
    assert damaged.preservation_per_concept["red"] == 0.0
    assert damaged.preservation == pytest.approx(1 - 3 / 21)
    assert damaged.alteration > 0.01
    assert damaged.erasure_per_concept == {"circle": 1.0}


def test_judge_on_real_renders_reads_metrics_correctly(small_judge):
    """With the trained (imperfect) judge, a faithful pipeline still scores far better than a swapped one."""
    evaluation = WorldEvaluation(prompts_per_concept=8, preserve_prompts_per_concept=2)
    faithful = evaluate_concepts(RenderPipe(SMALL), small_judge, SMALL, ["red"], evaluation=evaluation)
    swapped = evaluate_concepts(RenderPipe(SMALL, {"red": "blue"}), small_judge, SMALL, ["red"], evaluation=evaluation)
    assert faithful.erasure <= 0.1 and swapped.erasure >= 0.9
    assert abs(faithful.preservation - swapped.preservation) < 1e-9


def test_cases_avoid_other_erased_concepts_and_alteration_checks_shapes():
    cases = concept_cases(SMALL, ["circle", "red"], prompts_per_concept=10, seeds_per_prompt=2, avoid=["circle", "red"])
    assert len(cases) == 40
    for case in cases:
        named = SMALL.parse(case.prompt)
        assert named[case.kind] == case.concept
        assert {"circle", "red"} & set(named.values()) == {case.concept}
    with pytest.raises(ValueError):
        alteration(np.zeros((2, 4, 4, 3)), np.zeros((3, 4, 4, 3)))


# ---------------------------------------------------------------- shipped model
needs_weights = pytest.mark.skipif(
    not weights_available(), reason="concept-world weights not trained yet: run scripts/train_concept_world.py"
)


@needs_weights
def test_shipped_pipeline_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_concept_world_pipeline()
    out = pipe(prompt="a red striped circle", num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.05
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor != 1.0


@needs_weights
def test_shipped_judge_reads_renders_and_assets_stay_small():
    world = ConceptWorld()
    images, labels = make_batch(world, 300, np.random.default_rng(2024))
    targets = [{k: world.names(k)[labels[k][i]] for k in KINDS} for i in range(300)]
    assert judge_accuracy(load_judge(), images, targets)["joint"] >= 0.98
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total < 25 * 2**20


@needs_weights
def test_shipped_model_draws_the_concept_named():
    world = ConceptWorld()
    pipe = load_concept_world_pipeline()
    judge = load_judge()
    rng = np.random.default_rng(5)
    prompts = [world.sample_caption(world.sample_scene(rng), rng, split="heldout") for _ in range(48)]
    images = generate_images(pipe, [p.text for p in prompts], seeds=list(range(48)), num_inference_steps=20)
    acc = judge_accuracy(judge, images, [p.named() for p in prompts])
    # Here the shipped model measures shape 95.8 %, colour 100 %, texture 93.8 %, joint 93.8 % (45 of 48);
    # chance is 1/6, 1/6, 1/3 and joint 1/108. The floors allow two more misses than measured.
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.95 and acc["texture"] >= 0.9
    assert acc["joint"] >= 0.89


def test_in_context_training_gives_each_concept_the_captions_of_its_kind(tmp_path):
    """`WorldTraining.in_context` (the DiT world's default) reaches the trainer per concept: a colour
    among shapes and textures, a shape among colours and textures; it excludes the other template forms."""
    settings = WorldTraining(in_context=True)
    for concept, kind, first in (("red", "colour", "solid {} circle"), ("circle", "shape", "solid red {}"),
                                 ("dotted", "texture", "{} red circle")):
        templates = context_templates(kind)
        assert settings.templates_for(concept) == templates and templates[0] == first
        config = training_config(concept, "erase_with_la", settings, tmp_path)
        assert config.concepts[0].templates == list(templates) and not config.concepts[0].use_template
    assert WorldTraining(templates=("a {}",)).templates_for("red") == ("a {}",)
    assert world_training("sd3").in_context
    unet = training_config("red", "erase_with_la", world_training("unet"), tmp_path)  # half bare word, with the EMA
    assert unet.concepts[0].templates.count("{}") * 2 == len(unet.concepts[0].templates) and unet.train.ema_decay == 0.99
    with pytest.raises(ValueError, match="in_context picks each concept's templates"):
        WorldTraining(in_context=True, use_template=True)
    with pytest.raises(KeyError, match="'mauve' is not a concept"):
        settings.templates_for("mauve")


def test_robustness_levers_reach_the_trainer(tmp_path):
    """The anchor count, the lr schedule and the moving average of `WorldTraining` (the robustness levers
    of docs/concept-world.md) become the trainer's settings; by default 4 anchors, constant lr, no average."""
    default = training_config("red", "erase_with_la", WorldTraining(), tmp_path)
    assert (default.concepts[0].sampling_batch_size, default.train.lr_scheduler, default.train.ema_decay) == (
        4, "constant", None)
    levers = training_config("red", "erase_with_la", WorldTraining(anchors=8, lr_scheduler="cosine", ema_decay=0.99),
                             tmp_path)
    assert (levers.concepts[0].sampling_batch_size, levers.train.lr_scheduler, levers.train.ema_decay) == (
        8, "cosine", 0.99)


def test_bare_word_share_mixes_the_bare_word_into_the_contexts():
    """The `mixed` lever: the template "{}" (the bare word) drawn in the asked share of iterations."""
    contexts = context_templates("colour")
    for share, bare in ((0.5, len(contexts)), (0.25, len(contexts) // 3), (0.0, 0)):
        templates = WorldTraining(in_context=True, bare_word_share=share).templates_for("red")
        assert templates[:len(contexts)] == contexts and templates[len(contexts):] == ("{}",) * bare
    for bad in ({"bare_word_share": 0.5}, {"in_context": True, "bare_word_share": 1.0},
                {"in_context": True, "bare_word_share": -0.1}):
        with pytest.raises(ValueError, match="bare_word_share mixes the bare word into in_context training"):
            WorldTraining(**bad)


@needs_weights
def test_world_membrane_trains_in_context_and_resumes_an_interrupted_run(tmp_path, caplog):
    """The benchmark's runs go on from their last checkpoint, and the result is the uninterrupted run's;
    `WorldTraining.templates` reaches the trainer."""
    torch.set_num_threads(1)
    pipe = load_concept_world_pipeline()
    templates = context_templates("texture")
    assert len(templates) == 36 and templates[0] == "{} red circle"
    settings = WorldTraining(iterations=2, save_every=1, max_denoising_steps=4, templates=templates)
    whole = Membrane.from_file(train_world_membrane(pipe, "striped", tmp_path, settings=settings))
    assert whole.training_config["concepts"][0]["templates"] == list(templates) and whole.concepts == ["striped"]
    with caplog.at_level(logging.INFO):  # its step-1 checkpoint is still there: as if it had stopped at step 1
        resumed = Membrane.from_file(train_world_membrane(pipe, "striped", tmp_path, settings=settings, resume=True))
    assert "Resumed striped from step 1" in caplog.text
    assert whole.modules.keys() == resumed.modules.keys()
    assert all(torch.equal(whole.modules[k].up, resumed.modules[k].up) and
               torch.equal(whole.modules[k].down, resumed.modules[k].down) for k in whole.modules)
