"""VisionZip hands the LLM the vision tower's [CLS] token as its first visual token, although LLaVA never trained on
it; with a tower whose [CLS] summarizes nothing the embedded model answered nothing at all. The shipped model must
answer every one-click example under VisionZip, at every budget and in both accountings."""

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


def _tower_trained_contrastively(model: Path) -> bool:
    """Whether the export's tower had CLIP's contrastive loss (training_state.json "tower", written by
    train_llava's exporter; or its last phase's --clip-weight)."""
    state = json.loads((model / "training_state.json").read_text()) if (model / "training_state.json").is_file() else {}
    return bool(state.get("tower", {}).get("contrastive")) or float(state.get("args", {}).get("clip_weight", 0.0)) > 0


# A known defect of a tower whose [CLS] no objective trained: at 64 tokens the first example gets an empty answer.
# Strict: once a contrastively trained tower is installed this must pass, and the marker goes.
KNOWN_EMPTY = pytest.mark.xfail(
    condition=not _tower_trained_contrastively(MODEL) if (MODEL / "config.json").is_file() else False,
    reason="this model's [CLS] token was never trained (no contrastive phase); VisionZip hands it to the LLM and "
           "the first example's answer comes back empty at 64 tokens", strict=True)


@pytest.fixture(scope="module")
def lm():
    return load_model(str(MODEL), device="cpu", dtype="float32")


@pytest.mark.parametrize("accounting", ACCOUNTINGS)
@pytest.mark.parametrize("budget", [pytest.param(64, marks=KNOWN_EMPTY), 128, 192])
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
