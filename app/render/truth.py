"""The ground truth of a generated scene: its evidence patches mapped onto the model's grid, and the true answer
with the evidence recall of a run (`sparsevlm.evaluation.recall`, the benchmark's own figure)."""

from __future__ import annotations

from collections.abc import Sequence

from sparsevlm.evaluation.recall import evidence_recall, evidence_recall_per_stage
from sparsevlm.trace import PruneTrace

from .words import esc, method_label, normalise


def regrid_patches(patches: Sequence[int], from_grid: tuple[int, int], to_grid: tuple[int, int]) -> list[int]:
    """Patch indices of one grid mapped to another over the same square picture: every cell of `to_grid` that
    overlaps one of `patches` (the generator marks evidence on its 24x24 grid; a model may see 12x12)."""
    (fr, fc), (tr_, tc) = from_grid, to_grid
    if (fr, fc) == (tr_, tc):
        return sorted(set(int(p) for p in patches))
    out = set()
    for p in patches:
        r, c = divmod(int(p), fc)
        # the source cell spans [r/fr, (r+1)/fr) of the height: every target row it touches
        for rr in range(r * tr_ // fr, -(-(r + 1) * tr_ // fr)):
            for cc in range(c * tc // fc, -(-(c + 1) * tc // fc)):
                out.add(rr * tc + cc)
    return sorted(out)


def recall_text(recall: dict | None) -> str:
    if recall is None:
        return "no evidence patches"
    return (f"{recall['kept']:.0%} kept / {recall['represented']:.0%} represented "
            f"(of {recall['evidence_patches']} patches)")


def truth_html(truth: dict | None, pruned: PruneTrace | None = None) -> str:
    """The generated scene's true answer and, after a run, the evidence recall of the pruned run."""
    if not truth:
        return ""
    world = f"world {esc(truth['world'])}, " if truth.get("world") else ""
    line = (f"Generated scene ({world}seed {truth['seed']}, {esc(truth['family'])} question): true answer "
            f"<b>{esc(str(truth['answer']))}</b>; {len(truth['evidence'])} evidence patches"
            + (f" of its {truth['grid'][0]}×{truth['grid'][1]} grid" if truth.get("grid") else "")
            + ", outlined in white")
    if pruned is not None:
        rec = evidence_recall(pruned, truth["evidence"])
        line += (f"<br>Evidence recall at the last layer (computed from the trace): {recall_text(rec)}"
                 + (f", {rec['merged_only']:.0%} only through recycled / merged tokens" if rec else ""))
        steps = evidence_recall_per_stage(pruned, truth["evidence"])
        if steps:
            line += "<br>After each pruning step (kept / represented): " + ", ".join(
                f"layer {s['after_layer']}: {s['kept']:.0%} / {s['represented']:.0%}" for s in steps)
        if truth.get("answer") is not None:
            right = normalise(pruned.answer) == normalise(str(truth["answer"]))
            line += f" · the {method_label(pruned.method)} answer is {'right' if right else 'wrong'}"
    return f"<div class='sv-truth'>{line}</div>"
