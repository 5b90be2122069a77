"""The benchmark's Markdown report: one row per setting, the settings that could not run, and the ordering at the
smallest budget (64 tokens on LLaVA-1.5, 160 on LLaVA-NeXT) in each accounting."""

from __future__ import annotations

from ..config import FIXED_BUDGETS
from .stats import ordering


def markdown(result: dict) -> str:
    rows = [r for r in result["rows"] if "accuracy" in r]
    fams = list(rows[0]["per_family"]) if rows else []
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    head = ["setting", "equal tokens (in)", "equal tokens (out)", "accuracy %", "± 95%", "vs dense (paired) pts",
            "retained %",
            "evidence represented last %", "evidence kept directly last %", "evidence represented avg layers %",
            *fams]
    tokens = (f"up to {result['model']['visual_tokens']} visual tokens a picture" if result["model"].get("anyres")
              else f"{result['model']['visual_tokens']} visual tokens")
    lines = [
        f"Model: {result['model']['name']} ({result['model']['architecture']}, {result['model']['decoder_layers']} "
        f"layers, {tokens}); {result['questions']} held-out questions "
        f"(world {result['world']}, seed {result['seed']}); {result['seconds']:.0f} s on "
        f"{result['model']['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        vd = r.get("vs_dense")
        cells = [r["setting"], f"{r['equal_tokens']:.1f}", f"{r['equal_tokens_output']:.1f}", pct(r["accuracy"]),
                 pct(r.get("accuracy_half_width")),
                 "-" if vd is None else f"{100 * vd['difference']:+.1f} ± {100 * vd['half_width']:.1f}",
                 pct(r.get("retained")), pct(r["evidence_recall_last"]), pct(r["evidence_recall_direct"]),
                 pct(r["evidence_recall_layers"]),
                 *[pct(r["per_family"].get(f)) for f in fams]]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"\n{r['setting']}: not run - {r['unavailable']}")
    lines += ["", "± 95%: interval half-width of the accuracy (normal approximation, questions as the unit). vs dense: "
              "the accuracy difference from dense on the same questions, with its paired 95% half-width."]
    if "measured" in result and "budgets" in result:  # read otherwise than on LLaVA-1.5's grid: say how
        lines += ["", f"Budgets {' / '.join(map(str, result['budgets']))}. Measured: {result['measured']}."
                  + (f" Pictures {result['picture']}." if result.get("picture") else "")]
    smallest = min(result.get("budgets") or FIXED_BUDGETS)
    for accounting in ("paper", "flops"):
        order = ordering(result, smallest, accounting)
        if len(order) < 2:
            continue
        lines += ["", f"Ordering at {smallest} tokens, {accounting} accounting (best first; each step down is the "
                  "paired difference to the next setting, * where it is outside its 95% interval):", ""]
        steps = []
        for item in order:
            nxt = item.get("vs_next")
            gap = "" if nxt is None else (f" {'>' if nxt['outside_noise'] else '≈'} "
                                          f"({100 * nxt['difference']:+.1f} ± {100 * nxt['half_width']:.1f}"
                                          f"{'*' if nxt['outside_noise'] else ''})")
            steps.append(f"{item['method']} {pct(item['accuracy'])}{gap}")
        lines.append(" ".join(steps))
    return "\n".join(lines)
