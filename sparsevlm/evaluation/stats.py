"""The benchmark's statistics: 95% intervals of an accuracy, paired differences between two settings on the same
questions, and the ordering of the settings at one budget."""

from __future__ import annotations

from collections.abc import Sequence

Z95 = 1.96  # a 95% interval is 1.96 standard errors either side


def half_width(hits: Sequence[int]) -> float | None:
    """95% interval half-width of an accuracy over `hits` (0/1 per question; normal approximation, questions as
    the sampling unit)."""
    n = len(hits)
    if n < 2:
        return None
    p = sum(hits) / n
    return Z95 * (p * (1 - p) / n) ** 0.5


def paired_difference(a: Sequence[int], b: Sequence[int]) -> tuple[float, float] | None:
    """Accuracy of `a` minus `b` on the same questions, with its 95% half-width from the per-question differences
    (paired: both answered every question, so the question-to-question variation cancels)."""
    n = len(a)
    if n < 2 or len(b) != n:
        return None
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, Z95 * (var / n) ** 0.5


def ordering(result: dict, budget: int, accounting: str) -> list[dict]:
    """The fixed-budget settings at `budget` tokens in one accounting, best first, each with its accuracy, 95%
    half-width and, against the next one down, the paired difference and whether it is outside the noise."""
    rows = [r for r in result["rows"] if "accuracy" in r and r.get("budget") == budget
            and r.get("accounting") == accounting and r["setting"] == f"{r['method']}-{budget}-{accounting}"]
    rows.sort(key=lambda r: -r["accuracy"])
    out = []
    for k, r in enumerate(rows):
        item = {"setting": r["setting"], "method": r["method"], "accuracy": r["accuracy"],
                "half_width": r.get("accuracy_half_width"), "retained": r.get("retained")}
        if k + 1 < len(rows) and r.get("hits") and rows[k + 1].get("hits"):
            diff = paired_difference(r["hits"], rows[k + 1]["hits"])
            if diff is not None:
                item["vs_next"] = {"setting": rows[k + 1]["setting"], "difference": diff[0], "half_width": diff[1],
                                   "outside_noise": abs(diff[0]) > diff[1]}
        out.append(item)
    return out
