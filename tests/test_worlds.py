"""The picture worlds behind one interface (sparsevlm/scenes/worlds.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from sparsevlm.scenes import independent, world
from sparsevlm.scenes.world import FAMILIES
from sparsevlm.scenes.worlds import (
    DEFAULT_SEEDS,
    DEFAULT_WORLD,
    WORLDS,
    WorldError,
    heldout_item,
    studio_item,
    world_of_model,
    world_order,
)


@pytest.mark.parametrize("name", WORLDS)
def test_heldout_items_of_every_world_give_picture_question_and_evidence_objects(name):
    for i in range(14):
        item = heldout_item(i, world=name)
        s = item.sample
        assert item.image.size == (336, 336) and item.world == name
        assert s.family == FAMILIES[i % len(FAMILIES)]
        assert all(0 <= j < 576 for j in s.evidence)
        objs = item.objects()
        assert objs and all(o.mask.shape == (336, 336) and o.mask.any() for o in objs)
        if s.family in ("colour", "shape"):
            t = item.target()
            assert t is not None, (name, i, s.question)
            assert t.patches() == list(s.evidence)
            assert s.answer == (t.colour if s.family == "colour" else t.shape)
        if s.family == "read":
            assert item.target() is None  # the label card is not an object with colour and shape words


def test_heldout_items_are_the_worlds_own_sets():
    """Same samples as each world's own held-out function (nothing re-implemented here)."""
    for i in (0, 3, 9):
        assert heldout_item(i, world="v2").sample == world.heldout_sample(i)[1]
        img, s = independent.independent_sample(i)
        item = heldout_item(i, world="independent")
        assert item.sample == s and np.array_equal(np.asarray(item.image), np.asarray(img))
    assert heldout_item(2, DEFAULT_SEEDS["v2"] + 5, "v2").sample == world.heldout_sample(2, DEFAULT_SEEDS["v2"] + 5)[1]


@pytest.mark.parametrize("name", WORLDS)
def test_studio_items_are_deterministic_and_cover_every_family(name):
    for family in FAMILIES:
        a, b = studio_item(5, family, name), studio_item(5, family, name)
        assert a.sample == b.sample and a.sample.family == family
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.image.size == (336, 336)
        assert a.sample.evidence or family in ("exist", "count")
    assert not np.array_equal(np.asarray(studio_item(5, "colour", name).image),
                              np.asarray(studio_item(6, "colour", name).image))


def test_unknown_world_or_family_is_a_clear_error():
    with pytest.raises(WorldError, match="unknown world 'v3'.*v2, independent"):
        heldout_item(0, world="v3")
    with pytest.raises(WorldError, match="unknown world"):
        studio_item(0, "colour", "mars")
    with pytest.raises(WorldError, match="unknown question family 'weather'"):
        studio_item(0, "weather", "v2")


def test_world_of_model_reads_training_state(tmp_path):
    models = Path(__file__).resolve().parent.parent / "assets" / "models"
    assert world_of_model(models / "scenes-llava") == "v2"  # the installed model records its world
    assert world_of_model(tmp_path) is None  # no training_state.json (e.g. a hub model's folder)
    assert world_of_model(None) is None
    (tmp_path / "training_state.json").write_text(json.dumps({"step": 1}))
    assert world_of_model(tmp_path) is None  # a folder that records no world
    (tmp_path / "training_state.json").write_text(json.dumps({"step": 1, "world": "v1"}))
    assert world_of_model(tmp_path) is None  # a world this package no longer draws
    (tmp_path / "training_state.json").write_text(json.dumps({"step": 1, "world": "independent"}))
    assert world_of_model(tmp_path) == "independent"
    (tmp_path / "training_state.json").write_text("not json")
    assert world_of_model(tmp_path) is None


def test_world_order_puts_the_models_own_world_first_else_the_embedded_models():
    embedded = Path(__file__).resolve().parent.parent / "assets" / "models" / "scenes-llava"
    assert DEFAULT_WORLD == world_of_model(embedded)  # the embedded model's world
    assert world_order("independent") == ["independent", "v2"]
    assert world_order("v2") == ["v2", "independent"]
    assert world_order(None) == [DEFAULT_WORLD, *(w for w in WORLDS if w != DEFAULT_WORLD)] == ["v2", "independent"]
    assert heldout_item(3).world == studio_item(3, "colour").world == DEFAULT_WORLD  # the defaults draw it too
