"""Measured timings are consistent on every registered method: the vision tower + projector is timed once, the
parts of a call add up to no more than its total, and work shared by several runs is measured once."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from app import render
from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS
from sparsevlm.pipeline import Decoding, RunResult, run, run_shared
from sparsevlm.testing import tiny_llava
from sparsevlm.trace import PruneTrace, Timings

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


def _timed(method: str, vision: float, llm: float, shared: list[str]) -> PruneTrace:
    tr = PruneTrace(method=method, config={}, model={}, question="q", prompt="p", visual_tokens=576)
    tr.timings_ms = Timings(vision=vision, prefill=vision + llm, llm_prefill=llm, decode_per_token=5.0,
                            decode_tokens=2, total=vision + llm + 12.0, shared=shared)
    return tr


def test_latency_panel_shows_shared_vision_once_and_never_as_a_change():
    pruned, dense = _timed("sparsevlm", 20.0, 30.0, ["vision"]), _timed("dense", 20.0, 90.0, ["vision"])
    rows = {r[0]: r for r in render.latency_rows(pruned, dense)}
    vision = next(r for name, r in rows.items() if name.startswith("vision tower + projector"))
    assert "shared" in vision[0] and vision[1] == vision[2] == 20.0
    assert "%" not in vision[3] and "measured once" in vision[3]
    assert rows["  of which the decoder (incl. pruning overhead)"][1:4] == [30.0, 90.0, "-67%"]
    # Two separate measurements of the same work (traces made apart) still show no change, only both figures.
    rows = {r[0]: r for r in render.latency_rows(_timed("fastv", 56.9, 30.0, []), _timed("dense", 20.2, 90.0, []))}
    assert rows["vision tower + projector"][1:4] == [56.9, 20.2, "same work in both runs"]


@torch.no_grad()
def test_shared_runs_measure_vision_once_and_decide_as_runs_alone(lm):
    """run_shared encodes the image once for every config; each decision equals the method run alone."""
    configs = [PruneConfig(method=m, budget=16) for m in METHODS]
    together = run_shared(lm, _image(), QUESTION, configs, Decoding(max_new_tokens=4))
    assert len(together) == len(configs)
    ran = [r for r in together if isinstance(r, RunResult)]
    assert {r.trace.timings_ms.vision for r in ran} == {ran[0].trace.timings_ms.vision}  # one measurement
    for cfg, res in zip(configs, together):
        try:
            alone = run(lm, _image(), QUESTION, cfg, max_new_tokens=4).trace
        except ConfigError as exc:
            assert isinstance(res, ConfigError) and str(res) == str(exc)
            continue
        tr = res.trace
        assert "vision" in tr.timings_ms.shared
        assert ("raters" in tr.timings_ms.shared) == (cfg.method in ("sparsevlm", "sparsevlm-v2"))
        t = tr.timings_ms
        assert t.total >= t.prefill + t.decode_per_token * t.decode_tokens - 1e-6
        assert tr.answer == alone.answer
        decisions = [[asdict(s) | {"overhead_ms": 0} for s in t.stages] for t in (tr, alone)]
        assert decisions[0] == decisions[1], cfg.method
        assert tr.raters == alone.raters and tr.layers == alone.layers and tr.cost == alone.cost
