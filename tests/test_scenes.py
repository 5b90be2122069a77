"""Questions of the embedded model's world (world.py): every family in training scenes, hard existence negatives,
count evidence, one-token answers, and a held-out set that is the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparsevlm.scenes.world import (
    COLOURS,
    COLUMNS,
    FAMILIES,
    PLURALS,
    ROWS,
    SHAPES,
    answer_words,
    heldout_sample,
    training_scene,
    vocabulary,
)
from sparsevlm.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def heldout():
    return [heldout_sample(i) for i in range(280)]


def test_every_family_is_produced_in_training_scenes():
    seen = set()
    for seed in range(60):
        _, samples = training_scene(seed, 12, 12)
        seen |= {s.family for s in samples}
    assert seen == set(FAMILIES)


def test_existence_negatives_are_mostly_hard(heldout):
    """A "no" usually names a colour and a shape that are both in the picture (the POPE idea)."""
    hard = total = 0
    for scene, s in heldout:
        if s.family == "exist" and s.answer == "no":
            q = f" {s.question.lower().replace('?', ' ?')} "
            colour = next(c for c in COLOURS if f" {c} " in q)
            shape = next(x for x in SHAPES if f" {x} " in q or f" {PLURALS[x]} " in q)
            total += 1
            hard += any(o.colour == colour for o in scene.objects) and any(o.shape == shape for o in scene.objects)
    assert total and hard / total >= 0.6


def test_count_evidence_covers_each_counted_object(heldout):
    for _, s in heldout:
        if s.family == "count" and s.answer != "zero":
            assert len(s.evidence) >= 5  # at least one object's worth of cells
        if s.family == "count" and s.answer == "zero":
            assert s.evidence == []


def test_every_answer_word_is_one_known_token():
    tok = build_tokenizer(vocabulary())
    for word in answer_words():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word


def test_evaluation_splits_position_and_relation_by_what_they_ask():
    from training.evaluate import question_kind

    kinds = set()
    for i in range(4, 200, 7):  # position questions (family index 4 of 7, round-robin)
        _, s = heldout_sample(i)
        assert s.family == "position"
        kind = question_kind(s.question, s.family)
        kinds.add(kind)
        assert s.answer in (ROWS if kind == "row" else COLUMNS)
    assert kinds == {"row", "column"}
    assert question_kind("what colour is the circle ?", "colour") is None


def test_heldout_questions_do_not_depend_on_the_string_hash_seed():
    """The held-out set must be the same in every process: Python randomises str hashes (set order) per process."""
    code = ("from sparsevlm.scenes.world import heldout_sample as h; "
            "print('|'.join(h(i)[1].question + '=' + h(i)[1].answer for i in range(60)))")
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(outs) == 1
