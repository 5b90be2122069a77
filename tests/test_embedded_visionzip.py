"""VisionZip hands the LLM the vision tower's [CLS] token as its first visual token, although LLaVA never trained on
it; with a tower whose [CLS] no objective trained (before the tower's CLIP pretraining) the embedded model answered
nothing at all on the first example at 64 tokens. The shipped model must answer every one-click example under
VisionZip, at every budget and in both accountings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from sparsevlm.config import ACCOUNTINGS, PruneConfig
from sparsevlm.loading import load_model
from sparsevlm.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
# SPARSEVLM_EMBEDDED_TEST_MODEL=DIR checks another export (a candidate before it is installed)
MODEL = Path(os.environ.get("SPARSEVLM_EMBEDDED_TEST_MODEL", ROOT / "assets" / "models" / "scenes-llava"))
EXAMPLES = ROOT / "assets" / "examples"

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="embedded model not installed")


@pytest.fixture(scope="module")
def lm():
    return load_model(str(MODEL), device="cpu", dtype="float32")


@pytest.mark.parametrize("accounting", ACCOUNTINGS)
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_visionzip_answers_every_example(lm, budget, accounting):
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    assert len(examples) >= 7
    empty = []
    for ex in examples:
        image = Image.open(EXAMPLES / ex["image"]).convert("RGB")
        res = run(lm, image, ex["question"], PruneConfig(method="visionzip", budget=budget, accounting=accounting),
                  max_new_tokens=4)
        if not res.answer.strip():
            empty.append(ex["image"])
    assert not empty, f"VisionZip answered nothing on {empty}"
