"""Evidence recall: how much of a question's evidence a run still keeps.

Because the scenes are generated, every question knows its evidence patches (the grid cells covered by the objects
its answer depends on), so besides accuracy the benchmark measures whether a method keeps the right patches:
evidence recall = the fraction of evidence patches still represented (kept, or a member of a recycled cluster),
after the last pruning stage and averaged over decoder layers. These functions read a run's recorded stages only
(a trace, or the hooks' record of one call), so the app's renderers use them without the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..trace import PruneTrace, Stage

if TYPE_CHECKING:  # the hooks module needs torch; its record is only named here
    from ..hooks import CallRecord


def _depth(run: PruneTrace | CallRecord) -> int:
    layers = getattr(run, "layers", None)
    if layers:
        return len(layers)
    model = getattr(run, "model", None) or {}
    return int(model.get("decoder_layers", model.get("num_layers", 1)))


def _seen_by(stages: Sequence[Stage], layer: int) -> Stage | None:
    """The last stage whose result decoder layer `layer` sees (None: nothing pruned before it)."""
    last = None
    for st in stages:
        if st.after_layer < layer:
            last = st
    return last


def evidence_recall(run: PruneTrace | CallRecord, evidence: Sequence[int] | None,
                    depth: int | None = None) -> dict | None:
    """How much of the evidence (patch indices the answer depends on) the decoder still sees, from a run's stages
    (a PruneTrace or a hooks CallRecord; `depth` = decoder layers, read from a trace when left out).

    Shares of the evidence patches at the last decoder layer: kept directly, only inside a recycled / merged
    token, represented either way (Stage.represented); and represented averaged over every decoder layer (a
    method may keep the evidence until late). None without evidence (uploads, or a sample whose answer rests on
    no patch, e.g. "how many ... ?" -> zero)."""
    ev = set(int(p) for p in evidence or ())
    if not ev:
        return None
    depth = _depth(run) if depth is None else depth
    n = len(ev)

    def seen(st: Stage | None) -> tuple[int, int]:
        """(evidence patches kept directly, represented) after stage `st`."""
        if st is None:  # nothing pruned before this layer: every patch is still there
            return n, n
        return len(ev & set(st.kept)), len(ev & st.represented())

    kept, represented = seen(_seen_by(run.stages, depth - 1))
    layers = [seen(_seen_by(run.stages, layer))[1] / n for layer in range(depth)]
    out = {"evidence_patches": n, "kept": kept / n, "merged_only": (represented - kept) / n,
           "represented": represented / n, "represented_mean_over_layers": sum(layers) / len(layers)}
    attention = getattr(run, "attention", None) or []
    if attention:  # a method that decides attention keeps every token; what counts is who attended
        prefix = run.prefix if hasattr(run, "prefix") else run.prefix_tokens
        shares = [len(ev & {p - prefix for p in a.attended}) / n for a in attention]
        out["attended_mean_over_layers"] = sum(shares) / len(shares)
    return out


def evidence_recall_per_stage(run: PruneTrace | CallRecord, evidence: Sequence[int] | None) -> list[dict]:
    """The same shares after every pruning step (what the layers after `after_layer` see): a method may drop the
    evidence late, after the text has already read it."""
    ev = set(int(p) for p in evidence or ())
    if not ev:
        return []
    n = len(ev)
    return [{"after_layer": st.after_layer, "kept": len(ev & set(st.kept)) / n,
             "represented": len(ev & st.represented()) / n} for st in run.stages]
