"""Plotly figures of a run: the text raters' relevance, visual tokens per decoder layer, an attention-deciding
method's mass curve and its per-layer counts beside other methods, and latency, compute and KV cache against
dense."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from sparsevlm.trace import PruneTrace

from .captions import budget_line
from .layers import attention_at, count_kind, num_layers
from .words import bytes_unit, display_token, flops_unit, method_name


def layout_base() -> dict:
    """The frame every figure of the page shares (margins, template, font), the profile view's too."""
    return {"margin": {"l": 60, "r": 20, "t": 50, "b": 60}, "template": "plotly_white",
            "font": {"family": "Inter, system-ui, sans-serif", "size": 12}}


def raters_figure(trace: PruneTrace) -> go.Figure:
    """Bar chart of the text-relevance score R per token after the image, with the mean (the rater cut)."""
    fig = go.Figure()
    if not trace.raters:
        fig.add_annotation(text="this method does not use text raters", showarrow=False, font={"size": 14})
        fig.update_layout(height=220, xaxis={"visible": False}, yaxis={"visible": False}, **layout_base())
        return fig
    toks = [f"{i}:{display_token(r.token).strip() or '␣'}" for i, r in enumerate(trace.raters)]
    scores = [r.score for r in trace.raters]
    colours = ["rgb(239,68,60)" if r.rater else "rgb(148,163,184)" for r in trace.raters]
    fig.add_bar(x=toks, y=scores, marker_color=colours,
                hovertemplate="%{x}<br>R = %{y:.4f}<extra></extra>", name="R (computed)")
    mean = float(np.mean(scores))
    fig.add_hline(y=mean, line_dash="dash", line_color="#334155",
                  annotation_text=f"mean R = {mean:.4f}: tokens above it are raters",
                  annotation_position="top left")
    fig.update_layout(
        height=260, showlegend=False, title={"text": "Text relevance R per token (computed)", "x": 0.01},
        yaxis_title="R (softmax share, unitless)", xaxis={"tickangle": -45, "type": "category"}, **layout_base())
    return fig


def counts_figure(trace: PruneTrace, budget: float | None = None) -> go.Figure:
    """Visual tokens each decoder layer processes (a step chart), annotated at every pruning step."""
    n_layers = num_layers(trace)
    xs = [rec.layer for rec in trace.layers] or list(range(n_layers))
    ys = [rec.visual_in for rec in trace.layers] or [trace.visual_tokens] * n_layers
    fig = go.Figure()
    fig.add_scatter(x=[-0.5, *xs, xs[-1] + 1] if xs else [], y=[trace.visual_tokens, *ys, ys[-1]] if ys else [],
                    mode="lines", line={"shape": "hv", "width": 3, "color": "rgb(99,102,241)"},
                    fill="tozeroy", fillcolor="rgba(99,102,241,0.12)", name="visual tokens per layer",
                    hoverinfo="skip")
    fig.add_scatter(x=xs, y=ys, mode="markers", marker={"size": 7, "color": "rgb(99,102,241)"},
                    hovertemplate="layer %{x}: %{y} visual tokens<extra></extra>", showlegend=False)
    if trace.attention:  # every token stays; attention shrinks
        ax = [a.layer for a in trace.attention]
        fig.add_scatter(x=ax, y=[a.visual for a in trace.attention], mode="lines+markers",
                        line={"width": 2, "color": "rgb(239,68,60)"}, marker={"size": 6},
                        name="visual tokens that took part in attention (the rest skip it there)",
                        hovertemplate="layer %{x}: %{y} visual tokens attended<extra></extra>")
    fig.add_hline(y=trace.visual_tokens, line_dash="dot", line_color="#94a3b8",
                  annotation_text=f"dense: {trace.visual_tokens}", annotation_position="top right")
    eq, eq_out = trace.cost.equal_tokens, trace.cost.equal_tokens_reference
    if eq:
        fig.add_hline(y=eq, line_dash="dash", line_color="rgb(234,88,12)",
                      annotation_text=f"equal tokens, input-counted = {eq:.1f}; output-counted = {eq_out:.1f}"
                      + (f"; {budget_line(trace)}" if budget else ""),
                      annotation_position="bottom right", annotation_font_color="rgb(194,65,12)")
    for i, st in enumerate(trace.stages):
        x = st.after_layer + 0.5
        lines = [f"after layer {st.after_layer}" if st.after_layer >= 0 else "before the LLM",
                 f"{st.visual_in} → {st.visual_out}"]
        if st.rank is not None:
            lines.append(f"rank(P) = {st.rank} ({st.raters} raters)")
        lines.append(f"deleted {st.deleted}")
        if st.recycled or st.clusters:
            lines.append(f"recycled {st.recycled} → {st.clusters} clusters")
        fig.add_vline(x=x, line_color="rgba(239,68,60,0.5)", line_width=1)
        fig.add_annotation(x=x, y=st.visual_in, text="<br>".join(lines), showarrow=True, arrowhead=2, ax=48,
                           ay=-35 - 55 * (i % 2), align="left", xanchor="left", bgcolor="rgba(255,255,255,0.9)",
                           bordercolor="rgb(239,68,60)",
                           font={"size": 11})
        fig.add_scatter(x=[x], y=[st.visual_out], mode="markers",
                        marker={"symbol": "x", "size": 10, "color": "rgb(239,68,60)"},
                        hovertemplate=f"{st.formula}<extra></extra>", showlegend=False)
    fig.update_layout(
        height=380, title={"text": f"Visual tokens per decoder layer ({method_name(trace)}, computed from the trace)",
                           "x": 0.01},
        xaxis={"title": "decoder layer", "dtick": 1, "range": [-0.8, n_layers - 0.2]},
        yaxis={"title": "visual tokens processed", "range": [0, trace.visual_tokens * 1.55]},
        legend={"orientation": "h", "y": -0.25}, **layout_base())
    return fig


def _curve_at(ranks: Sequence[int], mass: Sequence[float], p: int) -> float:
    """The curve's share at rank p (linear between the recorded ranks)."""
    if not ranks:
        return 0.0
    return float(np.interp(p, np.asarray(ranks, dtype=np.float64), np.asarray(mass, dtype=np.float64)))


def mass_curve_figure(trace: PruneTrace, layer: int) -> go.Figure:
    """At one decoder layer: the probe rows' accumulated attention per token, sorted largest first and summed
    (share of the total), with τ marked and the count p read off where the curve reaches it."""
    fig = go.Figure()
    a = attention_at(trace, layer)
    if a is None or not a.extras.get("curve_ranks"):
        fig.add_annotation(text=f"no attention decision recorded at layer {layer}", showarrow=False,
                           font={"size": 14})
        fig.update_layout(height=220, xaxis={"visible": False}, yaxis={"visible": False}, **layout_base())
        return fig
    ranks, mass = a.extras["curve_ranks"], a.extras["curve_mass"]
    tau = float(a.extras.get("tau", 1.0))
    fig.add_scatter(x=ranks, y=mass, mode="lines", line={"width": 3, "color": "rgb(99,102,241)"},
                    fill="tozeroy", fillcolor="rgba(99,102,241,0.10)", name="share of the attention mass",
                    hovertemplate="the %{x} most-attended tokens hold %{y:.1%} of the mass<extra></extra>")
    fig.add_hline(y=tau, line_dash="dash", line_color="rgb(234,88,12)",
                  annotation_text=f"τ = {tau:g}", annotation_position="bottom right",
                  annotation_font_color="rgb(194,65,12)")
    at_p = _curve_at(ranks, mass, a.p)
    fig.add_vline(x=a.p, line_dash="dot", line_color="rgb(239,68,60)")
    fig.add_scatter(x=[a.p], y=[at_p], mode="markers", marker={"size": 11, "color": "rgb(239,68,60)"},
                    name=f"p = {a.p}", hovertemplate=f"p = {a.p}: the first rank reaching τ<extra></extra>")
    fig.add_annotation(x=a.p, y=min(at_p, tau), text=f"p = {a.p} of {a.n} tokens<br>reach τ = {tau:g}",
                       showarrow=True, arrowhead=2, ax=-80, ay=40, align="right", bgcolor="rgba(255,255,255,0.9)",
                       bordercolor="rgb(239,68,60)", font={"size": 11})
    probes = a.extras.get("probes")
    rows = "every row" if probes == "all" else f"{len(probes or [])} probe rows"
    fig.update_layout(
        height=300, showlegend=False,
        title={"text": f"Layer {layer}: attention mass of {rows}, tokens sorted by it (computed)", "x": 0.01,
               "font": {"size": 13}},
        xaxis={"title": "tokens, most-attended first (rank)", "range": [0, a.n * 1.02]},
        yaxis={"title": "share of the mass", "range": [0, 1.05], "tickformat": ".0%"},
        **{**layout_base(), "margin": {"l": 60, "r": 20, "t": 45, "b": 50}})
    return fig


COUNT_COLOURS = {"sparsevlm": "rgb(16,185,129)", "fastv": "rgb(234,88,12)", "pyramiddrop": "rgb(168,85,247)"}


def count_comparison_figure(trace: PruneTrace, references: Sequence[PruneTrace] = ()) -> go.Figure:
    """Each layer's count of an attention-deciding run (visual tokens attended, and p over the whole sequence)
    beside other runs of the same question: visual tokens each layer processes, adaptive or on a fixed schedule."""
    fig = go.Figure()
    depth = num_layers(trace)
    xs = [a.layer for a in trace.attention]
    fig.add_scatter(x=xs, y=[a.visual for a in trace.attention], mode="lines+markers",
                    line={"width": 3, "color": "rgb(99,102,241)"}, marker={"size": 6},
                    name=f"{method_name(trace)}: visual tokens attended ({count_kind(trace)})",
                    hovertemplate="layer %{x}: %{y} visual tokens attended<extra></extra>")
    fig.add_scatter(x=xs, y=[a.p for a in trace.attention], mode="lines", line={"width": 1.5, "dash": "dot",
                                                                                 "color": "rgb(99,102,241)"},
                    name=f"{method_name(trace)}: p, tokens of the whole sequence ({count_kind(trace)})",
                    hovertemplate="layer %{x}: p = %{y}<extra></extra>")
    for ref in references:
        rx = [r.layer for r in ref.layers] or list(range(depth))
        ry = [r.visual_in for r in ref.layers] or [ref.visual_tokens] * depth
        colour = COUNT_COLOURS.get(ref.method, "rgb(100,116,139)")
        fig.add_scatter(x=[*rx, rx[-1] + 1] if rx else [], y=[*ry, ry[-1]] if ry else [], mode="lines",
                        line={"shape": "hv", "width": 2, "color": colour,
                              "dash": "solid" if count_kind(ref).startswith("adaptive") else "dash"},
                        name=f"{method_name(ref)}: visual tokens kept ({count_kind(ref)})",
                        hovertemplate=f"{method_name(ref)}, layer %{{x}}: %{{y}} visual tokens<extra></extra>")
    fig.add_hline(y=trace.visual_tokens, line_dash="dot", line_color="#94a3b8",
                  annotation_text=f"dense: {trace.visual_tokens} visual tokens", annotation_position="top right")
    budget = trace.cost.budget or (trace.config or {}).get("budget")
    fig.update_layout(
        height=420,
        title={"text": f"Per-layer counts for this question (computed): {method_name(trace)} beside "
                       + (", ".join(method_name(r) for r in references) or "no other method")
                       + (f" at budget {budget}" if budget and references else ""), "x": 0.01, "font": {"size": 13}},
        xaxis={"title": "decoder layer", "dtick": 2 if depth > 16 else 1, "range": [-0.5, depth - 0.5]},
        yaxis={"title": "tokens", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.22, "x": 0, "font": {"size": 11}},
        **{**layout_base(), "margin": {"l": 60, "r": 20, "t": 50, "b": 40}})
    return fig


LABEL_HEADROOM = 0.22  # room above a bar chart's tallest bar for the value label printed over it


def latency_figure(pruned: PruneTrace, dense: PruneTrace | None) -> go.Figure:
    """Side-by-side bars: measured prefill / decode / total, and computed prefill FLOPs and KV cache."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, column_widths=[0.5, 0.25, 0.25], horizontal_spacing=0.09,
                        subplot_titles=("measured wall-clock (ms)", "computed prefill compute",
                                        "computed KV cache"))
    tp = pruned.timings_ms
    names = ["prefill", "decode / token", "total"]
    runs = [(f"{method_name(pruned)}", pruned, "rgb(99,102,241)")]
    if dense is not None:
        runs.append(("dense", dense, "rgb(148,163,184)"))
    for label, tr, colour in runs:
        t = tr.timings_ms
        fig.add_bar(x=names, y=[t.prefill, t.decode_per_token, t.total], name=label, marker_color=colour,
                    legendgroup=label, row=1, col=1, texttemplate="%{y:.0f}", textposition="outside",
                    cliponaxis=False, hovertemplate="%{x}: %{y:.1f} ms (measured)<extra>" + label + "</extra>")
    tops = {1: max(max(t.timings_ms.prefill, t.timings_ms.decode_per_token, t.timings_ms.total) for _, t, _ in runs)}
    del tp
    for col, field, dense_field, fmt in ((2, "prefill_flops", "prefill_flops_dense", flops_unit),
                                         (3, "kv_bytes", "kv_bytes_dense", bytes_unit)):
        bars = [(lbl, getattr(tr.cost, field), c) for lbl, tr, c in runs]
        if dense is None:
            bars.append(("dense", getattr(pruned.cost, dense_field), "rgb(148,163,184)"))
        top = max(b for _, b, _ in bars) or 1
        v, unit = fmt(top)
        scale = top / (v or 1)
        for lbl, b, c in bars:
            fig.add_bar(x=[lbl], y=[b / scale], marker_color=c, showlegend=False, row=1, col=col,
                        texttemplate="%{y:.3g}", textposition="outside", cliponaxis=False,
                        hovertemplate="%{y:.4g} " + unit + " (computed)<extra></extra>")
        tops[col] = top / scale
        fig.update_yaxes(title_text=unit, row=1, col=col)
    fig.update_yaxes(title_text="ms", row=1, col=1)
    # a taller top margin: the page's label badge sits over the chart's top-left corner, above the subplot titles
    fig.update_layout(height=360, barmode="group", legend={"orientation": "h", "y": -0.18},
                      **{**layout_base(), "margin": {"l": 60, "r": 20, "t": 80, "b": 60}})
    # the value labels sit above the bars: each axis reaches LABEL_HEADROOM above its tallest bar
    for col, top in tops.items():
        fig.update_yaxes(range=[0, (top or 1.0) * (1 + LABEL_HEADROOM)], autorange=False, row=1, col=col)
    return fig
