"""The shipped concept-world membranes erase what they name, spare the rest, and do not make their
concept likelier where a prompt leaves it unnamed (the world's I2P)."""

from __future__ import annotations

import pytest

from diffusers_spm.concept_world import ConceptWorld, WorldEvaluation, load_concept_world_pipeline, load_judge
from diffusers_spm.concept_world.experiments import MEMBRANES_DIR, Condition, compare, implicit_frequency
from diffusers_spm.concept_world.model import weights_available

pytestmark = pytest.mark.skipif(not weights_available(), reason="the concept-world weights are not shipped")

# Lowest erasure of the three training seeds on this small evaluation, less one image (docs/concept-world.md):
# 1.000 on every seed but star's seed 1 (0.875) and striped (0.500 on every seed: why it stays short,
# docs/concept-world.md).
MIN_ERASURE = {"red": 0.875, "blue": 0.875, "circle": 0.875, "star": 0.75, "dotted": 0.875, "striped": 0.375}
# 8 target and 14 preservation images per concept: one image moves erasure by 12.5 points.
SMALL = WorldEvaluation(prompts_per_concept=4, seeds_per_prompt=2, preserve_prompts_per_concept=1, seed=3)
PRESERVATION_IMAGES = 14


@pytest.fixture(scope="module")
def world():
    return ConceptWorld(), load_judge(), load_concept_world_pipeline()


@pytest.mark.parametrize("concept", sorted(MIN_ERASURE))
def test_shipped_membrane_erases_its_concept_and_spares_the_rest(world, concept):
    world_, judge, pipe = world
    rows = compare(pipe, judge, world_, [concept], [
        Condition("none"), Condition("membrane", [MEMBRANES_DIR / f"{concept}.safetensors"], metric="tokensim"),
    ], SMALL).rows
    assert rows["none"].erasure <= 0.25  # the model draws the concept when asked
    assert rows["membrane"].erasure >= MIN_ERASURE[concept], rows["membrane"].erasure_per_concept
    preserved = {label: round(row.preservation * PRESERVATION_IMAGES) for label, row in rows.items()}
    assert preserved["membrane"] >= preserved["none"] - 1, preserved  # at most one image lost
    assert rows["membrane"].alteration < 0.05


# How far above no membrane a count may lie on the 192 implicit images: an applied membrane changes
# every image a little, so a few borderline ones flip either way (measured: at most 3 of 192 for the
# shipped red and blue, under every setting below). The failure this guards against is far larger:
# the bare-word blue membrane, always on, draws blue in 37 of 192 against 6 (docs/concept-world.md).
FLIPPED_IMAGES = 4


@pytest.mark.parametrize("concept", ["red", "blue"])
def test_membrane_does_not_make_its_colour_likelier_where_no_colour_is_named(world, concept):
    """Under every transport setting, always on (what `fuse_spm()` bakes in) included. It holds for the
    default's training (half bare word, half in context), not for the bare word's; tokensim keeps the
    images of no membrane, the others change them."""
    world_, judge, pipe = world
    membrane = [MEMBRANES_DIR / f"{concept}.safetensors"]
    conditions = [Condition("none"), Condition("tokensim", membrane, metric="tokensim"),
                  Condition("clipcos_tokenuni", membrane, metric="clipcos_tokenuni"),
                  Condition("always on", membrane, transport=False)]
    prompts, seeds = 16, 12
    frequency = implicit_frequency(pipe, judge, world_, concept, conditions, prompts=prompts, seeds_per_prompt=seeds)
    counts = {label: {key: round(share * prompts * seeds) for key, share in row.items()} for label, row in frequency.items()}
    assert counts["none"][concept] > 0  # the prompts do draw the colour sometimes, so a rise could show
    for label in ("tokensim", "clipcos_tokenuni", "always on"):
        for key, count in counts[label].items():
            assert count <= counts["none"][key] + FLIPPED_IMAGES, (label, counts)
