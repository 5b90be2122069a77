"""The high-resolution model's card and gate (training/next_card.py), on hand-built evaluation files."""

from __future__ import annotations

import json
from pathlib import Path

from sparsevlm.scenes.world import FAMILIES
from training.next_card import card, check_bars, eval_files, main

CONFIG = {"model_type": "llava_next", "vision_feature_layer": -2,
          "image_grid_pinpoints": [[336, 672], [672, 672]],
          "text_config": {"num_hidden_layers": 32, "hidden_size": 128},
          "vision_config": {"image_size": 336, "patch_size": 14, "num_hidden_layers": 4, "hidden_size": 128}}


def _result(n: int, correct: int, base: int, diff_ci: tuple[float, float], raters: float) -> dict:
    per = {f: {"correct": 1, "total": 1, "accuracy": 1.0, "ci95": [0.2, 1.0]} for f in FAMILIES}
    return {"n": n, "pictures": n // 6, "seconds": {"model": 10.0, "baseline": 3.0},
            "models": {"model": {**per, "overall": {"correct": correct, "total": n, "accuracy": correct / n,
                                                    "ci95": [0.0, 1.0]},
                                 "by_size": {"672x672": {"correct": correct, "total": n, "accuracy": correct / n}},
                                 "content_raters": {"share": raters, "ci95": [raters - 0.01, raters + 0.01]}},
                       "baseline": {**per, "overall": {"correct": base, "total": n, "accuracy": base / n,
                                                       "ci95": [0.0, 1.0]},
                                    "by_size": {"672x672": {"correct": base, "total": n, "accuracy": base / n}}}},
            "difference": {"model - baseline": {"difference": (correct - base) / n, "ci95": list(diff_ci),
                                                "questions": n}}}


def _folder(tmp_path: Path, own: dict, independent: dict) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "training_state.json").write_text(json.dumps({"world": "hires", "step": 850, "train_minutes": 200.0}))
    (d / "eval_own_3000.json").write_text(json.dumps(own))
    (d / "eval_independent_3000.json").write_text(json.dumps(independent))
    return d


def test_a_model_that_meets_every_bar_passes_the_gate(tmp_path):
    d = _folder(tmp_path, _result(3000, 2820, 2100, (0.2, 0.3), 0.62), _result(3000, 2700, 2200, (0.1, 0.2), 0.6))
    assert check_bars(d) == []
    text = card(d)
    assert "**met**" in text and "94.0% (2820/3000)" in text and "+24.0 points [+20.0, +30.0]" in text
    assert text.index("its own high-resolution world") < text.index("the independent renderer")
    assert main(["--model", str(d), "--check-bars"]) == 0


def test_each_missed_bar_is_named(tmp_path):
    d = _folder(tmp_path, _result(3000, 2700, 2100, (0.1, 0.3), 0.50), _result(1000, 870, 860, (-0.02, 0.04), 0.6))
    missing = check_bars(d)
    assert "own world: 90.0% < 93%" in missing
    assert "own world: raters 50.0% content words < 55%" in missing
    assert "independent world: 1000 questions measured, fewer than 3000" in missing
    assert "independent world: 87.0% < 88%" in missing
    assert any(m.startswith("independent world: the gain over scenes-llava") for m in missing)
    assert len(missing) == 5
    assert "**not met**" in card(d) and "installed below these bars" in card(d)
    assert main(["--model", str(d), "--check-bars"]) == 1


def test_the_largest_evaluation_of_each_world_is_read(tmp_path):
    d = _folder(tmp_path, _result(3000, 2820, 2100, (0.2, 0.3), 0.62), _result(3000, 2700, 2200, (0.1, 0.2), 0.6))
    (d / "eval_own_500.json").write_text(json.dumps(_result(500, 100, 100, (-0.1, 0.1), 0.1)))
    assert eval_files(d)["own"].name == "eval_own_3000.json" and check_bars(d) == []
    (d / "big.bin").write_bytes(b"\0" * (41 * 2**20))
    assert check_bars(d) == ["size 41.0 MiB > 40 MiB"]
