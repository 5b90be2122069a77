"""The high-resolution worlds: the project's own (`sparsevlm/scenes/hires.py`) and the independent renderer's
(`independent_hires.py`). Sizes, object sizes against the tiles and the base view, answers from the geometry,
the vocabulary, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm.scenes import hires, independent, independent_hires
from sparsevlm.scenes.world import COLOURS, FAMILIES, NUMBERS, PLURALS, SHAPES, Sample
from training.model import v2_tokenizer

PINPOINT_SIZES = {(672, 672), (1008, 336), (336, 1008), (672, 336), (336, 672)}


@pytest.fixture(scope="module")
def tok():
    return v2_tokenizer()


def known_words(tok, sample: Sample) -> bool:
    unk = tok.convert_tokens_to_ids("<unk>")
    return unk not in tok(f"{sample.question} {sample.answer}", add_special_tokens=False)["input_ids"]


def test_own_pictures_are_pinpoint_sized_and_objects_small_but_tile_sized():
    sizes = set()
    for i in range(40):
        scene, samples = hires.heldout_picture(i)
        sizes.add(scene.size)
        image = hires.render(scene)
        assert image.size == scene.size
        assert hires.MIN_OBJECTS <= len(scene.objects) <= hires.max_objects(*scene.size)
        base_scale = 336 / max(scene.size)  # the base view squeezes the longer side to 336
        for o in scene.objects:
            assert 0 <= o.box[0] and o.box[2] < scene.width and 0 <= o.box[1] and o.box[3] < scene.height
            assert o.side >= 42  # >= 3 patches of 14 px in a full-resolution tile
            assert o.side * base_scale <= 28  # <= 2 patches in the base view
        boxes = [o.box for o in scene.objects] + ([scene.label_box] if scene.label else [])
        for a in range(len(boxes)):
            for b in range(a):
                assert not hires._overlaps(boxes[a], [boxes[b]], 0)
        assert samples and len({s.family for s in samples}) == len(samples)
    assert sizes == PINPOINT_SIZES


def test_own_answers_follow_the_geometry(tok):
    seen = set()
    for i in range(60):
        scene, samples = hires.heldout_picture(i)
        objs = scene.objects
        for s in samples:
            assert known_words(tok, s), s.question
            seen.add(s.family)
            q = s.question.lower().replace("?", " ?")
            if s.family == "count":
                words = q.split()
                what = words[2]
                if what in PLURALS.values():
                    n = sum(PLURALS[o.shape] == what for o in objs)
                elif what in COLOURS:
                    n = sum(o.colour == what for o in objs)
                else:
                    n = len(objs)
                assert s.answer == NUMBERS[n]
            if s.family == "position":
                o = next(o for o in objs if f" {o.name} " in q)
                row, col = scene.third(*o.centre)
                assert s.answer in (("top", "middle", "bottom")[row], ("left", "middle", "right")[col])
                assert s.answer == (("top", "middle", "bottom")[row] if " row " in q
                                    else ("left", "middle", "right")[col])
            if s.family == "colour":
                shape = next(sh for sh in SHAPES if f" {sh} " in q)
                assert [o.colour for o in objs if o.shape == shape] == [s.answer]
            if s.family == "exist":
                c = next(c for c in COLOURS if f" {c} " in q)
                sh = next(sh for sh in SHAPES if f" {sh} " in q or f" {PLURALS[sh]} " in q)
                assert s.answer == ("yes" if any(o.colour == c and o.shape == sh for o in objs) else "no")
            if s.family == "read":
                assert s.answer == scene.label.lower()
            if s.evidence:  # cells of the full-resolution grid
                assert max(s.evidence) < (scene.width // 14) * (scene.height // 14)
    assert seen == set(FAMILIES)


def test_own_world_is_deterministic_and_training_seeds_differ_from_heldout():
    a, sa = hires.training_scene(hires.HIRES_TRAIN_SEED, 12)
    b, sb = hires.training_scene(hires.HIRES_TRAIN_SEED, 12)
    assert [s.to_dict() for s in sa] == [s.to_dict() for s in sb]
    assert np.array_equal(np.asarray(hires.render(a)), np.asarray(hires.render(b)))
    assert len(sa) >= 8  # many turns a picture
    assert hires.HIRES_TRAIN_SEED + 10_000_000 <= hires.HIRES_HELDOUT_SEED


def test_describe_names_every_object_in_words_the_model_knows(tok):
    scene, _ = hires.heldout_picture(2)
    text = hires.describe(scene)
    for o in scene.objects:
        assert f"{o.colour} {o.shape}" in text
    assert tok.convert_tokens_to_ids("<unk>") not in tok(text, add_special_tokens=False)["input_ids"]


def test_independent_pictures_and_answers(tok):
    sizes = set()
    for i in range(40):
        scene, samples = independent_hires.heldout_picture(i)
        image = independent.render_independent(scene)
        w, h = image.size
        sizes.add((w, h))
        for t in scene.things:
            assert 2 * t.r >= 42 and t.cx - t.r >= 0 and t.cx + t.r <= w and t.cy + t.r <= h
        for s in samples:
            assert known_words(tok, s), s.question
            if s.family == "position":
                t = next(t for t in scene.things if t.name in s.question)
                if "column" in s.question:
                    assert s.answer == ("left", "middle", "right")[min(2, int(3 * t.cx // w))]
                else:
                    assert s.answer == ("top", "middle", "bottom")[min(2, int(3 * t.cy // h))]
            if s.family == "count" and s.question.startswith("How many objects"):
                assert s.answer == NUMBERS[len(scene.things)]
    assert sizes == PINPOINT_SIZES


def test_independent_masks_follow_the_drawing():
    scene, _ = independent_hires.heldout_picture(4)
    image = np.asarray(independent.render_independent(scene)).astype(int)
    t = scene.things[0]
    m = independent_hires.mask(scene, 0)
    inside = image[m].mean(axis=0)
    assert np.abs(inside - np.array(t.rgb)).max() < 12  # the mask's pixels are the thing's colour
