"""Tables of a run, as HTML or Markdown: each pruning step's count rule, one patch through the steps, the probe
rows of an attention-deciding method, latency and cost against dense, and the compare table of every method."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparsevlm.evaluation.recall import evidence_recall
from sparsevlm.trace import AttentionLayer, PruneTrace

from .captions import answers_agree, budget_line
from .geometry import token_place
from .layers import attended_patches, attention_at, patch_fate
from .truth import recall_text
from .words import bytes_unit, config_option, esc, flops_unit, method_label, method_name


def table_html(headers: Sequence[str], rows: Sequence[Sequence], short: dict[str, str] | None = None,
               legend: dict[str, str] | None = None, elem_class: str = "sv-table") -> str:
    """A plain HTML table that grows with its rows (no scrolling box, no virtual rows): `short` maps a header to
    what the page prints (the full header becomes its tooltip); `legend` explains headers in lines beneath."""
    short, legend = short or {}, legend or {}
    shown = [short.get(h, h) for h in headers]
    head = "".join(f'<th title="{esc(legend.get(s, h))}">{esc(s)}</th>' for h, s in zip(headers, shown))
    body = []
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="sv-num">{v}</td>' if num else f"<td>{esc(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li><b>{esc(s)}</b>: {esc(legend[s])}</li>" for s in shown if s in legend)
    return (f'<table class="{elem_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<ul class="sv-table-legend">{notes}</ul>' if notes else ""))


PATCH_HEADERS = ["step", "score (computed)", "rank by score", "fate"]


def patch_fate_html(trace: PruneTrace, patch: int | None) -> str:
    """The patch's fate at every stage as a small table (computed from the trace)."""
    if patch is None:
        return "<div class='sv-help'>Click the picture inside the model's input to follow one patch.</div>"
    place = token_place(trace, patch)
    if place is None:
        where = "a newline token, at no place on the picture"
    elif place[0] == "image":
        where = f"row {place[1]}, column {place[2]} of the {place[3]}×{place[4]} grid"
    else:
        where = f"row {place[1]}, column {place[2]} of the {place[0]} view's {place[3]}×{place[4]} grid"
    head = (f"<b>Patch {patch}</b> ({where}) through {method_name(trace)}'s pruning steps (computed from the "
            "trace)")
    if not trace.stages and trace.attention:
        left_out = [a.layer for a in trace.attention if patch not in (attended_patches(trace, a.layer) or [])]
        n = len(trace.attention)
        text = (f"{head.replace('pruning steps', 'layers')}: it stays a token in every layer and took part in "
                f"attention at {n - len(left_out)} of {n} layers")
        if left_out:
            shown = ", ".join(map(str, left_out[:24])) + (" …" if len(left_out) > 24 else "")
            text += f"; left out at layer{'s' if len(left_out) > 1 else ''} {shown}"
        return f"<div class='sv-patch'>{text}.</div>"
    if not trace.stages:
        return f"<div class='sv-patch'>{head}: no pruning step; the patch stays a token in every layer.</div>"
    body = []
    for r in patch_fate(trace, patch):
        where = f"after layer {r['after_layer']}" if r["after_layer"] >= 0 else "before the LLM"
        score = "—" if r["score"] is None else f"{r['score']:.4g}"
        rank = "—" if r["rank"] is None else f"{r['rank']} of {r['entering']}"
        fate = {"kept": "kept", "deleted": "deleted", "gone": "already gone"}.get(r["fate"], "")
        if r["fate"] == "merged":
            others = ", ".join(str(q) for q in r["with_patches"][:12]) + (" …" if len(r["with_patches"]) > 12 else "")
            fate = (f"merged into cluster {r['cluster']} (center patch {r['center']}) with "
                    f"{len(r['with_patches'])} other patches: {others or 'none'}")
        body.append([where, score, rank, fate])
    return f"<div class='sv-patch'>{head}{table_html(PATCH_HEADERS, body)}</div>"


def formulas_markdown(trace: PruneTrace) -> str:
    """Each pruning step's count rule with its numbers, and what rank(P) means."""
    if not trace.stages and trace.attention:
        return attention_formulas_markdown(trace)
    if not trace.stages:
        return f"**{method_name(trace)}** keeps all {trace.visual_tokens} visual tokens in every layer."
    rows = ["| step | tokens in → out | rank(P) | deleted | recycled → clusters | rule that produced the count |",
            "|---|---|---|---|---|---|"]
    for st in trace.stages:
        where = f"after layer {st.after_layer}" if st.after_layer >= 0 else "before the LLM"
        rank = f"{st.rank} (of {st.raters} raters)" if st.rank is not None else "—"
        rec = f"{st.recycled} → {st.clusters}" if (st.recycled or st.clusters) else "—"
        formula = st.formula.replace("|", "\\|")
        rows.append(f"| {where} | {st.visual_in} → {st.visual_out} | {rank} | {st.deleted} | {rec} | `{formula}` |")
    mode = config_option(trace, "count_mode", "fixed")
    notes = []
    if trace.method == "sparsevlm":
        notes.append(
            "P is the attention the text raters pay the visual tokens at that layer (rows = raters). rank(P) "
            "counts how many independent directions those rows span - a measure of how much of the image the "
            "question still needs. It can never exceed the number of raters, so it is small.")
        if mode == "paper":
            notes.append("Adaptive (paper eq. 8): delete N = ⌊λ·(tokens − rank(P))⌋; N = 0 skips the layer.")
        elif mode == "code":
            notes.append("Adaptive (reference code): keep min(⌊rank(P)·scale + bias⌋, tokens − 1).")
        else:
            notes.append("Fixed budget: counts chosen so the mean tokens per layer hits the budget; rank(P) is "
                         "computed and shown, but does not set the count in this mode.")
    if config_option(trace, "recycle") and trace.method == "sparsevlm":
        notes.append("Recycling: the top 30% of the deleted tokens (by score) are clustered (density peaks) and "
                     "each cluster is merged into one token, so their information is not entirely lost.")
    return "\n".join(rows) + ("\n\n" + "\n\n".join(notes) if notes else "")


def attention_formulas_markdown(trace: PruneTrace) -> str:
    """Per decoder layer: the count p the τ rule chose and who attended (prefix / visual / text), with the rule."""
    first = trace.attention[0]
    tau = first.extras.get("tau")
    rows = ["| layer | p (τ rule) | attended: prefix / visual / text | last position added | probe vs all rows |",
            "|---|---|---|---|---|"]
    for a in trace.attention:
        full = a.extras.get("full")
        agree = (f"p {full['p']} with all rows; recall {full['recall']:.0%}, Jaccard {full['jaccard']:.2f}"
                 if full else "—")
        rows.append(f"| {a.layer} | {a.p} of {a.n} | {len(a.attended)}: {a.prefix} / {a.visual} / {a.text} | "
                    f"{'yes' if a.extras.get('forced_last') else 'no'} | {agree} |")
    formula = (first.formula or "").replace("|", "\\|")
    notes = [f"Rule at every layer: `{formula}`" if formula else "",
             f"**{method_name(trace)}** prunes nothing: all {trace.visual_tokens} visual tokens stay in every layer's "
             "residual stream and go through its MLP. At each layer, the tokens holding a share τ"
             + (f" = {tau:g}" if tau is not None else "") + " of the probe rows' attention mass (p of them, the "
             "rest ranked out by attention per query that can see them) take part in attention there, and only "
             "their keys and values stay in that layer's cache. The count adapts to the layer and the input: no "
             "budget sets it."]
    if trace.cost.budget_note:
        notes.append(f"Budget: {trace.cost.budget_note}.")
    return "\n".join(rows) + "\n\n" + "\n\n".join(n for n in notes if n)


def _where(trace: PruneTrace, positions: Sequence[int]) -> dict[str, int]:
    """How many of `positions` (prefill sequence) lie before the image, in it, after it."""
    lo, hi = trace.prefix_tokens, trace.prefix_tokens + trace.visual_tokens
    out = {"prefix": 0, "visual": 0, "text": 0}
    for p in positions:
        out["prefix" if p < lo else "visual" if p < hi else "text"] += 1
    return out


def _counted(where: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in where.items() if v) or "none"


def probe_strip_svg(trace: PruneTrace, a: AttentionLayer) -> str:
    """The prefill sequence as a strip [prefix | visual | text] with a tick at every probe row."""
    n = max(1, a.n)
    lo, hi = trace.prefix_tokens, trace.prefix_tokens + trace.visual_tokens
    parts = [f'<rect x="0" y="6" width="{lo}" height="18" fill="#cbd5e1"/>',
             f'<rect x="{lo}" y="6" width="{hi - lo}" height="18" fill="#c7d2fe"/>',
             f'<rect x="{hi}" y="6" width="{max(0, n - hi)}" height="18" fill="#fde68a"/>']
    probes = a.extras.get("probes")
    if isinstance(probes, list):
        for p in sorted(set(probes)):
            parts.append(f'<rect x="{p}" y="2" width="{max(1.0, n / 400):.2f}" height="26" fill="#111827"/>')
    return (f'<svg class="sv-probe-strip" viewBox="0 0 {n} 30" preserveAspectRatio="none" width="100%" height="30" '
            f'role="img" aria-label="probe rows over the sequence">{"".join(parts)}</svg>'
            '<div class="sv-legend"><span class="sv-swatch"><i style="background:#cbd5e1"></i>before the image</span>'
            '<span class="sv-swatch"><i style="background:#c7d2fe"></i>visual tokens</span>'
            '<span class="sv-swatch"><i style="background:#fde68a"></i>question and prompt</span>'
            '<span class="sv-swatch"><i style="background:#111827"></i>a probe row</span></div>')


def probes_html(trace: PruneTrace, layer: int) -> str:
    """The probe rows at one layer (which positions, how many visual / text) and how far the probe estimate of
    the attended set agrees with full attention (probes=both), or how to get that figure."""
    a = attention_at(trace, layer)
    if a is None:
        return f"<div class='sv-probes'>No attention decision recorded at layer {layer}.</div>"
    probes = a.extras.get("probes")
    if probes == "all":
        head = (f"<b>Probe rows at layer {layer}</b>: every one of the {a.n} rows (full attention), so the attended "
                "set is exact here.")
    else:
        probes = list(probes or [])
        recent_n = int(config_option(trace, "recent", 64) or 0)
        recent = [p for p in probes if p >= a.n - recent_n]
        drawn = [p for p in probes if p < a.n - recent_n]
        head = (f"<b>Probe rows at layer {layer}</b>: {len(probes)} query rows of the {a.n} score every key. The "
                f"{len(recent)} most recent (positions {min(recent, default=0)}–{max(recent, default=0)}: "
                f"{_counted(_where(trace, recent))})")
        if drawn:
            head += (f" and {len(drawn)} drawn at random before them ({len(set(drawn))} distinct: "
                     f"{_counted(_where(trace, sorted(set(drawn))))})")
        head += ". Only these rows' attention is computed in full; the rest of the layer keeps the fast kernel."
    full = a.extras.get("full")
    if full:
        rec = [x.extras["full"]["recall"] for x in trace.attention if "full" in x.extras]
        jac = [x.extras["full"]["jaccard"] for x in trace.attention if "full" in x.extras]
        agree = (f"<b>Probes against full attention</b> (every row, computed beside the run): at layer {layer} the "
                 f"probes chose p = {a.p}, all rows p = {full['p']}; {full['overlap']} tokens in both, so the probe "
                 f"set holds {full['recall']:.0%} of the full-attention set (Jaccard {full['jaccard']:.2f}). Over the "
                 f"{len(rec)} layers: recall {np.mean(rec):.0%} on average (lowest {min(rec):.0%}), Jaccard "
                 f"{np.mean(jac):.2f}.")
    elif probes == "all":
        agree = "The probe estimate is not in play: every row was computed."
    else:
        agree = ("How far the probes agree with full attention is not recorded for this run: choose <i>Probe rows → "
                 f"probes, compared with all rows</i> under {method_name(trace)} options (API: "
                 "<code>zipvl_probes=\"both\"</code>) and run again.")
    forced = " The last position was not among the p and was added (it is always attended)." if a.extras.get(
        "forced_last") else ""
    return (f"<div class='sv-probes'><p>{head}{forced}</p>{probe_strip_svg(trace, a)}<p>{agree}</p>"
            "<p class='sv-help'>Heatmap view: how often each patch took part in attention over all layers.</p></div>")


LATENCY_HEADERS = ["quantity", "with pruning", "dense", "change", "unit", "how obtained"]


def latency_rows(pruned: PruneTrace, dense: PruneTrace | None) -> list[list]:
    """[quantity, pruned, dense, change, unit, how it was obtained] rows."""
    tp, td = pruned.timings_ms, dense.timings_ms if dense else None
    rows: list[list] = []

    def add(name: str, a: float, b: float | None, unit: str, kind: str, digits: int = 1) -> None:
        change = ""
        if b not in (None, 0):
            change = f"{(a - b) / b * 100:+.0f}%"
        rows.append([name, round(a, digits), "" if b is None else round(b, digits), change, unit, kind])

    if td is None or "vision" not in tp.shared:
        add("vision tower + projector", tp.vision, td.vision if td else None, "ms", "measured")
    else:  # one measurement for both runs: the same figure, not a change
        add("vision tower + projector (runs once per request, shared by both runs)", tp.vision, td.vision, "ms",
            "measured")
    if td is not None:  # the same work in both runs: never a difference, whatever the two timings say
        rows[-1][3] = "same work, measured once" if "vision" in tp.shared else "same work in both runs"
    add("text raters", tp.raters, td.raters if td else None, "ms", "measured", 2)
    overhead = ("selection overhead (probe rows, count, selection)" if pruned.attention else
                "pruning overhead (scores, rank, clustering)")
    add(overhead, tp.prune_overhead, td.prune_overhead if td else None, "ms", "measured", 2)
    add("prefill = time to first token", tp.prefill, td.prefill if td else None, "ms", "measured")
    word = "selection" if pruned.attention else "pruning"  # a method that decides attention selects, prunes nothing
    add(f"  of which the decoder (incl. {word} overhead)", tp.llm_prefill, td.llm_prefill if td else None, "ms",
        "measured")
    add("decode, per new token", tp.decode_per_token, td.decode_per_token if td else None, "ms", "measured", 2)
    add("new tokens generated", tp.decode_tokens, td.decode_tokens if td else None, "tokens", "measured", 0)
    add("total", tp.total, td.total if td else None, "ms", "measured")
    cp, cd = pruned.cost, dense.cost if dense else None
    add("equal tokens, input-counted (mean visual tokens per layer; what FLOPs follow)", cp.equal_tokens,
        cd.equal_tokens if cd else float(pruned.visual_tokens), "tokens", "computed")
    add("equal tokens, output-counted (a pruning layer at its output; the papers' figure)",
        cp.equal_tokens_reference, cd.equal_tokens_reference if cd else float(pruned.visual_tokens), "tokens",
        "computed")
    if cp.attended_visual is not None:  # every token stays in the residual stream; attention shrinks
        add("visual tokens attended per layer (mean; the rest skip attention there and leave its cache)",
            cp.attended_visual, float(pruned.visual_tokens), "tokens", "computed")
        if cp.attended_share is not None:
            add("share of all tokens attended per layer (mean)", cp.attended_share * 100, 100.0, "%", "computed")
    dense_flops = cd.prefill_flops if cd else cp.prefill_flops_dense
    v, unit = flops_unit(max(cp.prefill_flops, dense_flops))
    scale = max(cp.prefill_flops, dense_flops) / v if v else 1.0
    add(f"prefill compute (incl. {word} overhead)", cp.prefill_flops / scale, dense_flops / scale, unit,
        "computed", 3)
    ov, ounit = flops_unit(cp.prune_overhead_flops)
    add(f"  of which {word} overhead" + (" (the probe rows)" if pruned.attention else ""), ov, None, ounit,
        "computed", 3)
    dense_kv = cd.kv_bytes if cd else cp.kv_bytes_dense
    v, unit = bytes_unit(max(cp.kv_bytes, dense_kv))
    scale = max(cp.kv_bytes, dense_kv) / v if v else 1.0
    add("KV cache after prefill", cp.kv_bytes / scale, dense_kv / scale, unit, "computed", 3)
    dense_vkv = cd.visual_kv_bytes if cd else cp.visual_kv_bytes_dense
    add("  of which visual tokens", cp.visual_kv_bytes / scale, dense_vkv / scale, unit, "computed", 3)
    mp, md = pruned.memory, dense.memory if dense else None
    if mp.kv_bytes_prefill is not None:
        add("KV cache after prefill, read from the cache object", mp.kv_bytes_prefill / scale,
            md.kv_bytes_prefill / scale if md and md.kv_bytes_prefill is not None else None, unit, "measured", 3)
    if mp.peak_gpu_bytes is not None:
        pv, punit = bytes_unit(max(mp.peak_gpu_bytes, md.peak_gpu_bytes or 0) if md else mp.peak_gpu_bytes)
        pscale = (max(mp.peak_gpu_bytes, md.peak_gpu_bytes or 0) if md else mp.peak_gpu_bytes) / pv if pv else 1.0
        add("peak GPU memory (CUDA allocator)", mp.peak_gpu_bytes / pscale,
            md.peak_gpu_bytes / pscale if md and md.peak_gpu_bytes is not None else None, punit, "measured", 3)
    return rows


def latency_table_html(rows: Sequence[Sequence]) -> str:
    """The latency rows (latency_rows) as the page shows them."""
    return table_html(LATENCY_HEADERS, rows)


COMPARE_HEADERS = ["method", "answer", "agrees with dense", "equal tokens in / out (computed)", "budget",
                   "prefill ms (measured)",
                   "total ms (measured)", "prefill compute (computed)", "KV cache (computed)",
                   "evidence recall at the last layer: kept / represented (computed, generated scenes)"]


def compare_rows(results: Sequence[tuple[str, PruneTrace | None, str]],
                 evidence: Sequence[int] | None = None) -> list[list]:
    """results: (method, trace or None, error message) per method, dense included. `evidence`: a generated
    scene's evidence patches in the traces' grid (the last column stays empty without them, e.g. for uploads)."""
    dense = next((t for m, t, _ in results if m == "dense" and t is not None), None)
    rows = []
    for method, tr, err in results:
        label = method_label(method)
        if tr is None:
            rows.append([label, f"not available: {err}", "", "", "", "", "", "", "", ""])
            continue
        f, fu = flops_unit(tr.cost.prefill_flops)
        b, bu = bytes_unit(tr.cost.kv_bytes)
        agree = "" if dense is None or method == "dense" else ("yes" if answers_agree(tr, dense) else "no")
        equal = f"{tr.cost.equal_tokens:.1f} / {tr.cost.equal_tokens_reference:.1f}"
        if tr.cost.attended_visual is not None:
            equal += f" ({tr.cost.attended_visual:.1f} attended)"
        rows.append([label, tr.answer.strip(), agree, equal, budget_line(tr),
                     round(tr.timings_ms.prefill, 1), round(tr.timings_ms.total, 1), f"{f:.3g} {fu}",
                     f"{b:.3g} {bu}", recall_text(evidence_recall(tr, evidence)) if evidence is not None else ""])
    return rows


# The page's table headers stay short so every row shows without scrolling inside the table; the long wording is
# the header's tooltip and a line of the legend under the table.
COMPARE_SHORT = {
    "evidence recall at the last layer: kept / represented (computed, generated scenes)":
        "evidence recall (computed)",
}


COMPARE_LEGEND = {
    "equal tokens in / out (computed)": "mean visual tokens per decoder layer, a pruning layer counted at its input "
                                        "(what FLOPs follow) / at its output (the papers' figure); for a method "
                                        "that keeps every token and shrinks attention (ZipVL), the mean visual "
                                        "tokens that took part in attention follow in brackets",
    "budget": "which accounting met the budget, and in which counting; a method without a budget (ZipVL) says "
              "what its own rule amounted to",
    "evidence recall (computed)": "evidence recall at the last layer: share of a generated scene's evidence patches "
                                  "kept directly / represented (kept or inside a recycled token); empty for uploads",
}


def compare_table_html(rows: Sequence[Sequence]) -> str:
    """The compare rows (compare_rows) as the page shows them: short headers, the long wording in the legend."""
    return table_html(COMPARE_HEADERS, rows, COMPARE_SHORT, COMPARE_LEGEND)
