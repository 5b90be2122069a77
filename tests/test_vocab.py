"""The unknown-word hint: words a word-level tokenizer maps to <unk>, with the nearest known word; the CLI flags
them before a run and its JSON carries them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsevlm.scenes import world
from sparsevlm.testing import TEST_WORDS, tiny_llava
from sparsevlm.tokenizer import build_tokenizer
from sparsevlm.vocab import edit_distance, nearest_word, split_words, unknown_words, unknown_words_notice

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plain_tok():
    """The tiny test model's words (no paraphrases): `color` is unknown to it."""
    return build_tokenizer(TEST_WORDS)


def test_edit_distance():
    assert edit_distance("color", "colour") == 1
    assert edit_distance("shpae", "shape") == 1  # a transposition is one edit
    assert edit_distance("", "abc") == 3
    assert edit_distance("circle", "circle") == 0
    assert edit_distance("kitten", "sitting") == 3


def test_words_split_as_the_tokenizer_splits_them(plain_tok):
    assert split_words("What colour is the Circle?", plain_tok) == ["what", "colour", "is", "the", "circle", "?"]


def test_unknown_words_named_with_the_nearest_known_word(plain_tok):
    got = unknown_words("What color is the circel? What color!", plain_tok)
    assert got == [("color", "colour"), ("circel", "circle"), ("!", None)]
    assert unknown_words("what colour is the circle ?", plain_tok) == []


def test_v2_vocabulary_knows_the_common_paraphrases():
    tok = build_tokenizer(world.vocabulary())
    for q in ("What color is the circle?", "what is the colour of the big square?", "Is there an orange cross?",
              "How many things are in the picture?", "Is the red circle to the right of the blue one?"):
        assert unknown_words(q, tok) == [], q
    [(word, suggestion)] = unknown_words("what colour is the ball?", tok)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    assert word == "ball" and suggestion in words
    assert edit_distance("ball", suggestion) == min(edit_distance("ball", w) for w in words)
    assert nearest_word("?", words) is None


def test_notice_names_every_word_and_suggestion():
    line = unknown_words_notice([("color", "colour"), ("ball", "small")])
    assert "'color'" in line and "'colour'" in line and "'ball'" in line and "'small'" in line
    assert unknown_words_notice([]) == ""


def test_subword_tokenizers_have_no_unknown_words():
    _, processor = tiny_llava("llama", layers=2, image_size=56)
    tok = processor.tokenizer
    tok.unk_token = None  # a byte-level tokenizer has no unknown token
    assert unknown_words("anything at all, zebra?", tok) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sparsevlm", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.full((336, 336, 3), 220, dtype=np.uint8)).save(p)
    return p


def test_cli_flags_unknown_words_before_the_run(image_file):
    # A misspelling the embedded model does not know (it knows `color`, a paraphrase, but not `circel`).
    r = _cli("run", "--image", str(image_file), "--question", "What colour is the circel?", "--method", "dense",
             "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "'circel'" in r.stderr and "did you mean 'circle'" in r.stderr
    r = _cli("run", "--image", str(image_file), "--question", "What colour is the circel?", "--method", "dense",
             "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["unknown_words"] == [{"word": "circel", "suggestion": "circle"}]
    r = _cli("run", "--image", str(image_file), "--question", "what colour is the circle ?", "--method", "dense",
             "--max-new-tokens", "2", "--json")
    assert json.loads(r.stdout)["unknown_words"] == [] and "notice" not in r.stderr
