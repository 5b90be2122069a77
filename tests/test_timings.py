"""Measured timings are consistent on every registered method: the vision tower + projector is timed once, the
parts of a call add up to no more than its total, and work shared by several runs is measured once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS
from sparsevlm.pipeline import run
from sparsevlm.testing import tiny_llava

QUESTION = "what colour is the shape ?"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request):
    model, processor = tiny_llava(request.param, layers=8, image_size=112)
    return from_objects(model, processor)


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (110, 150, 3), dtype=np.uint8))


def _runs(lm, **kw):
    """(method, trace) for every registered method this model can run (SigLIP has no [CLS] for some)."""
    out = []
    for method in METHODS:
        try:
            out.append((method, run(lm, _image(), QUESTION, PruneConfig(method=method, budget=16), **kw).trace))
        except ConfigError:
            continue
    return out


@torch.no_grad()
def test_every_trace_has_total_at_least_prefill_plus_decode(lm):
    runs = _runs(lm, max_new_tokens=4)
    assert len(runs) >= len(METHODS) - 2
    for method, tr in runs:
        t = tr.timings_ms
        parts = t.prefill + t.decode_per_token * t.decode_tokens
        assert t.total >= parts - 1e-6, (method, t)
        assert 0.0 < t.vision <= t.prefill, (method, t)
        assert t.llm_prefill >= 0.0, (method, t)
        assert t.prefill == pytest.approx(t.vision + t.llm_prefill), (method, t)
