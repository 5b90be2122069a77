"""Several benchmark results side by side at one budget: each method's accuracy (± its 95% half-width, and in
brackets its share of dense) per result, then each result's ordering with the paired difference to the next
setting. For the recipe steps of docs/model.md, each measured with `python -m sparsevlm eval` on the same questions.

    python scripts/orderings.py NAME=OUT/benchmark.json NAME2=OUT2/benchmark.json [--budget 64] [--accounting paper]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsevlm.evaluation.stats import ordering  # noqa: E402


def side_by_side(results: dict[str, dict], budget: int = 64, accounting: str = "paper") -> str:
    names = list(results)
    methods: list[str] = []
    for res in results.values():
        for r in res["rows"]:
            if r["method"] not in methods and (r["method"] == "dense" or (
                    r.get("budget") == budget and r.get("accounting") == accounting)):
                methods.append(r["method"])
    questions = {res["questions"] for res in results.values()}
    lines = [f"Accuracy % ± 95% half-width (share of dense, %) at {budget} tokens, {accounting} accounting; "
             f"{'/'.join(map(str, sorted(questions)))} questions.", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in methods:
        cells = []
        for res in results.values():
            dense = next((r for r in res["rows"] if r["method"] == "dense"), None)
            row = next((r for r in res["rows"] if r["method"] == m and (m == "dense" or (
                r.get("budget") == budget and r.get("accounting") == accounting))), None)
            if row is None or "accuracy" not in row:
                cells.append("-")
                continue
            share = f" ({100 * row['accuracy'] / dense['accuracy']:.0f})" if dense and m != "dense" else ""
            cells.append(f"{100 * row['accuracy']:.1f} ± {100 * row['accuracy_half_width']:.1f}{share}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, res in results.items():
        steps = []
        for item in ordering(res, budget, accounting):
            nxt = item.get("vs_next")
            gap = "" if nxt is None else (" > " if nxt["outside_noise"] else " ≈ ")
            steps.append(f"{item['method']} {100 * item['accuracy']:.1f}{gap}")
        lines.append(f"- {name}: {''.join(steps)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="NAME=path/to/benchmark.json")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--accounting", default="paper", choices=("paper", "flops"))
    args = p.parse_args(argv)
    results = {}
    for item in args.results:
        name, _, path = item.partition("=")
        if not path:
            print(f"give NAME=PATH, not {item!r}", file=sys.stderr)
            return 2
        try:
            results[name] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
    print(side_by_side(results, args.budget, args.accounting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
