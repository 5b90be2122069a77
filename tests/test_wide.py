"""Whole-picture turns (training/wide.py): answers from the scene's geometry, words the model knows."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm.scenes import world
from training import wide
from training.model import v2_tokenizer
from training.train_llava import WHOLE, scene_turns


def _scene(objects, label_box=None):
    objs = [world.Object2(shape, colour, 60, x0, y0, world.COLOURS[colour]) for shape, colour, x0, y0 in objects]
    sc = world.Scene2(seed=1, objects=objs, background="plain", dark=False, base=(200, 200, 200))
    if label_box is not None:
        sc.label, sc.label_box = "5", label_box
    return sc


def test_regions_on_a_hand_built_scene():
    # a red circle at the top left (centre 49.5, 49.5), a blue square at the bottom right (centre 279.5, 279.5)
    sc = _scene([("circle", "red", 20, 20), ("square", "blue", 250, 250)])
    assert wide._in(sc, 0, 0, 0) is True and wide._in(sc, 0, 2, 2) is False
    assert wide._in(sc, 1, 2, None) is True and wide._in(sc, 1, None, 0) is False
    edge = _scene([("circle", "red", 85, 20)])  # centre x 114.5: 2.5 px from the first third's border
    assert wide._in(edge, 0, 0, 0) is None and wide._in(edge, 0, 0, 1) is None and wide._in(edge, 0, 2, 2) is False
    seen = {}
    rng = np.random.default_rng(0)
    for _ in range(400):
        t = wide.whole_turn(sc, rng)
        if t is not None:
            seen[t[0]] = t[1]
    assert seen["how many objects are there ?"] == "two"
    assert seen["is there an object at the top left ?"] == "yes"
    assert seen["is there an object at the middle ?"] == "no"
    assert seen["how many objects are in the bottom row ?"] == "one"
    assert seen["how many objects are in the middle column ?"] == "zero"
    assert seen["describe the bottom right of the picture ."] == "a medium blue square at the bottom right ."
    assert seen["describe the top right of the picture ."] == "no objects ."


def test_the_label_card_is_described_but_never_counted_as_an_object():
    sc = _scene([("circle", "red", 20, 20)], label_box=(30, 250, 79, 299))
    rng = np.random.default_rng(1)
    turns = {}
    for _ in range(600):
        t = wide.whole_turn(sc, rng)
        if t is not None:
            turns[t[0]] = t[1]
    assert turns["describe the bottom left of the picture ."] == "a label with 5 at the bottom left ."
    assert "is there an object at the bottom left ?" not in turns
    assert "how many objects are in the bottom row ?" not in turns
    assert turns["how many objects are there ?"] == "one"


@pytest.mark.parametrize("seed", range(6))
def test_whole_turns_use_only_the_models_words_and_replace_question_turns(seed):
    tok = v2_tokenizer()
    scene, turns = scene_turns(seed, 12, 12, 0.0, None, whole_p=0.5)
    whole = [t for t in turns if t[2] == WHOLE]
    assert whole and len(turns) <= 12
    for q, a, _ in whole:
        ids = tok(f"{q} {a}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (q, a)
    # without --whole-p the conversation is exactly the one drawn before whole-picture turns existed
    assert scene_turns(seed, 12, 12, 0.2)[1] == scene_turns(seed, 12, 12, 0.2, None, whole_p=0.0)[1]
    assert all(t[2] != WHOLE for t in scene_turns(seed, 12, 12, 0.2)[1])
