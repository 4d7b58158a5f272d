"""The shipped concept-world membranes erase what they name, spare the rest, and do not make their
concept likelier where a prompt leaves it unnamed (the world's I2P)."""

from __future__ import annotations

import pytest

from diffusers_spm.concept_world import ConceptWorld, WorldEvaluation, load_concept_world_pipeline, load_judge
from diffusers_spm.concept_world.experiments import MEMBRANES_DIR, Condition, compare, implicit_frequency
from diffusers_spm.concept_world.model import weights_available

pytestmark = pytest.mark.skipif(not weights_available(), reason="the concept-world weights are not shipped")

# Lowest erasure of the three training seeds on this small evaluation, less one image (docs/concept-world.md);
# striped is shipped but does not erase (0-25 %): only that it spares the rest is asserted.
MIN_ERASURE = {"red": 0.875, "blue": 0.875, "circle": 0.875, "star": 0.625, "dotted": 0.75, "striped": None}
# 8 target and 14 preservation images per concept: one image moves erasure by 12.5 points.
SMALL = WorldEvaluation(prompts_per_concept=4, seeds_per_prompt=2, preserve_prompts_per_concept=1, seed=3)


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
    if MIN_ERASURE[concept] is not None:
        assert rows["membrane"].erasure >= MIN_ERASURE[concept], rows["membrane"].erasure_per_concept
    assert rows["membrane"].preservation >= rows["none"].preservation - 1 / 14  # at most one image lost
    assert rows["membrane"].alteration < 0.05


def test_red_membrane_with_tokensim_does_not_make_red_likelier_where_no_colour_is_named(world):
    """Holds for every training seed because the gate stays near 0 there; always on or with the
    reference's rate, how often red appears depends on the seed (docs/concept-world.md)."""
    world_, judge, pipe = world
    loaded = Condition("tokensim", [MEMBRANES_DIR / "red.safetensors"], metric="tokensim")
    frequency = implicit_frequency(pipe, judge, world_, "red", [Condition("none"), loaded], prompts=8,
                                   seeds_per_prompt=6)
    assert frequency["none"]["red"] > 0  # the prompts do draw red sometimes, so a rise could show
    for key in ("red", "pixels:red"):
        assert frequency["tokensim"][key] <= frequency["none"][key], frequency
