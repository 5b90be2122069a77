"""`python -m sparsevlm eval`: the pruning benchmark on generated scenes, accuracy and evidence recall of every
method at equal budgets, written as JSON, Markdown, an interactive figure and a PNG.

The work is done in `sparsevlm.evaluation` (one concern a module: recall, runner, stats, table, figure, png);
this module is the command, and keeps the names other code imported from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ACCOUNTINGS, budgets_for
from .evaluation.figure import METHOD_COLOURS, curves, figure
from .evaluation.png import png
from .evaluation.recall import evidence_recall, evidence_recall_per_stage, evidence_tokens
from .evaluation.runner import BUDGETS, Setting, check_labels, evaluate, settings, summarize
from .evaluation.stats import Z95, half_width, ordering, paired_difference
from .evaluation.table import markdown
from .loading import DEFAULT_MODEL, load_model

__all__ = ["BUDGETS", "METHOD_COLOURS", "Setting", "Z95", "curves", "evaluate", "evidence_recall",
           "evidence_recall_per_stage", "evidence_tokens", "figure", "half_width", "main", "markdown", "ordering",
           "paired_difference", "png", "settings", "summarize"]


def main(args) -> int:
    lm = load_model(args.model or DEFAULT_MODEL)
    labels = args.methods.split(",") if args.methods else None
    accountings = ACCOUNTINGS if getattr(args, "accounting", "both") == "both" else (args.accounting,)
    check_labels(labels, accountings, budgets_for(lm.anyres))  # the loaded model's budgets only
    result = evaluate(lm, args.n, getattr(args, "seed", None), labels, log=None if args.json else print,
                      accountings=accountings, world=getattr(args, "world", None))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(result, indent=1))
        (out / "benchmark.md").write_text(markdown(result) + "\n")
        figure(result).write_html(out / "benchmark.html", include_plotlyjs="cdn")
        png(result, out / "benchmark.png")
    print(json.dumps(result) if args.json else markdown(result))
    return 0
