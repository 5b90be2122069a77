"""scripts/orderings.py: benchmark results side by side at one budget, on hand-built results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("orderings", ROOT / "scripts" / "orderings.py")
orderings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(orderings)


def result(hits: dict[str, list[int]]) -> dict:
    rows = []
    for setting, h in hits.items():
        method = setting.split("-64-")[0]
        acc = sum(h) / len(h)
        rows.append({"setting": setting, "method": method, "budget": None if method == "dense" else 64,
                     "accounting": None if method == "dense" else "paper", "accuracy": acc, "hits": h,
                     "accuracy_half_width": 1.96 * (acc * (1 - acc) / len(h)) ** 0.5})
    return {"rows": rows, "questions": len(next(iter(hits.values())))}


def test_side_by_side_and_orderings(tmp_path, capsys):
    n = 200
    a = result({"dense": [1] * n, "fastv-64-paper": [1] * 150 + [0] * 50, "random-64-paper": [1] * 100 + [0] * 100})
    b = result({"dense": [1] * 180 + [0] * 20, "fastv-64-paper": [1] * 90 + [0] * 110,
                "random-64-paper": [1] * 92 + [0] * 108})
    text = orderings.side_by_side({"one": a, "two": b})
    assert "| method | one | two |" in text
    assert "| fastv | 75.0 ± 6.0 (75) | 45.0 ± 6.9 (50) |" in text
    assert "- one: fastv 75.0 > random 50.0" in text  # 25 points on the same questions: outside the noise
    assert "- two: random 46.0 ≈ fastv 45.0" in text
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert orderings.main([f"one={pa}", f"two={pb}"]) == 0
    assert "| dense | 100.0 ± 0.0 | 90.0 ± 4.2 |" in capsys.readouterr().out
    assert orderings.main([str(pa)]) == 2 and "NAME=PATH" in capsys.readouterr().err
    assert orderings.main([f"x={tmp_path / 'missing.json'}"]) == 2
