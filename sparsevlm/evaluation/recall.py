"""Evidence recall: how much of a question's evidence a run still keeps.

Because the scenes are generated, every question knows its evidence patches (the grid cells covered by the objects
its answer depends on), so besides accuracy the benchmark measures whether a method keeps the right patches:
evidence recall = the fraction of evidence patches still represented (kept, or a member of a recycled cluster),
after the last pruning stage and averaged over decoder layers. These functions read a run's recorded stages only
(a trace, or the hooks' record of one call), so the app's renderers use them without the model.

A world gives its evidence as cells of the picture's 14-px grid at full resolution; `evidence_tokens` reads them
as visual tokens through the request's layout (LLaVA-NeXT's base view, tiles and newlines), so recall is measured
in the tokens the methods keep or drop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..scenes.world import COVER_FRACTION, PATCH
from ..trace import PruneTrace, Stage

if TYPE_CHECKING:  # the hooks module needs torch; its record is only named here
    from ..hooks import CallRecord
    from ..layout import VisualLayout


def evidence_tokens(evidence: Sequence[int], layout: VisualLayout, picture_size: tuple[int, int] | None = None,
                    cell: int = PATCH, fraction: float = COVER_FRACTION) -> list[int]:
    """The visual tokens of `layout` that carry the evidence: the tokens whose box (`layout.token_boxes()`) the
    evidence cells cover by at least `fraction` (5%, the worlds' own rule for a cell and an object) of its area.

    `evidence`: cells of the 14-px grid over the whole picture at full resolution (row * (width // 14) + col);
    `picture_size`: that picture's (width, height), default the layout's upload size. When the model was given
    the picture resized (a LLaVA-1.5 model given a high-resolution picture squeezed to 336x336), the layout's
    boxes are scaled from its upload to the picture. A LLaVA-NeXT tile token at full resolution has one cell for
    its box, so it is evidence iff its cell is; a base-view token of a 672x672 picture spans 2x2 cells and is
    evidence when they cover 5% of it; a box reaching into the processor's padding counts the padding in its area.
    Newline tokens are never evidence. LLaVA-1.5's one 24x24 view of a 336 px picture gives back the evidence
    unchanged. Sorted token indices; pure arithmetic (no model)."""
    if not layout.image_size or not all(layout.image_size):
        if picture_size is None:
            raise ValueError("the layout records no upload size: give the picture's size")
        upload = tuple(picture_size)
    else:
        upload = tuple(layout.image_size)
    width, height = tuple(picture_size) if picture_size is not None else upload
    cols = width // cell
    n_cells = cols * (height // cell)
    cells = sorted({int(e) for e in evidence})
    if cells and not (0 <= cells[0] and cells[-1] < n_cells):
        raise ValueError(f"evidence cells must lie in the {height // cell}x{cols} grid of a {width}x{height} picture")
    sx, sy = width / upload[0], height / upload[1]  # the layout's pixels -> the picture's
    out: list[int] = []
    for view in layout.views:
        rows_v, cols_v = view.grid
        x0, y0, x1, y1 = view.box
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        cw, ch = (x1 - x0) / cols_v, (y1 - y0) / rows_v  # one view cell (token box) in the picture's pixels
        covered = [0.0] * (rows_v * cols_v)
        for e in cells:  # each evidence cell adds its overlap to the view cells it meets
            r, c = divmod(e, cols)
            ex0, ey0, ex1, ey1 = c * cell, r * cell, (c + 1) * cell, (r + 1) * cell
            c_lo, c_hi = max(0, math.floor((ex0 - x0) / cw)), min(cols_v - 1, math.ceil((ex1 - x0) / cw) - 1)
            r_lo, r_hi = max(0, math.floor((ey0 - y0) / ch)), min(rows_v - 1, math.ceil((ey1 - y0) / ch) - 1)
            for vr in range(r_lo, r_hi + 1):
                oy = min(ey1, y0 + (vr + 1) * ch) - max(ey0, y0 + vr * ch)
                if oy <= 0:
                    continue
                for vc in range(c_lo, c_hi + 1):
                    ox = min(ex1, x0 + (vc + 1) * cw) - max(ex0, x0 + vc * cw)
                    if ox > 0:
                        covered[vr * cols_v + vc] += ox * oy
        need = fraction * cw * ch * (1 - 1e-9)  # the tolerance only absorbs rounding of the box arithmetic
        out += [view.tokens[k] for k, a in enumerate(covered) if a > 0 and a >= need]
    return sorted(out)


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
