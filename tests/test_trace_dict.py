"""A trace's plain-data form (`PruneTrace.to_dict`) is exactly `dataclasses.asdict`'s, for every method's trace on
both model classes, and round-trips through `from_dict` and JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from sparsevlm import PruneConfig
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS
from sparsevlm.pipeline import run_shared
from sparsevlm.testing import tiny_llava, tiny_llava_next
from sparsevlm.trace import PruneTrace


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def traces(request):
    if request.param == "llava":
        model, processor = tiny_llava(image_size=56, layers=8)
        image, budget = Image.new("RGB", (56, 56), (200, 40, 40)), 8
    else:
        model, processor = tiny_llava_next(image_size=56, layers=8)
        image, budget = Image.new("RGB", (112, 56), (40, 200, 40)), 16
    lm = from_objects(model, processor, name=f"tiny {request.param}")
    configs = [PruneConfig(method=m, budget=budget) for m in METHODS]
    results = run_shared(lm, image, "what colour is it ?", configs)
    return [r.trace for r in results if not isinstance(r, Exception)]


def test_to_dict_is_asdict(traces):
    assert len(traces) >= len(METHODS) - 1
    for tr in traces:
        d = tr.to_dict()
        assert d == dataclasses.asdict(tr), tr.method
        assert type(d["image_size"]) is type(dataclasses.asdict(tr)["image_size"])
        # a copy: changing it leaves the trace alone
        if d["stages"]:
            d["stages"][0]["kept"].append(-5)
            assert -5 not in tr.stages[0].kept


def test_round_trip(traces):
    for tr in traces:
        again = PruneTrace.from_json(tr.to_json())
        assert json.loads(again.to_json()) == json.loads(tr.to_json()), tr.method
