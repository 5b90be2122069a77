"""FasterVLM's view of where attention over the visual tokens goes, for this picture (FasterVLM, sections 3.2-3.3,
Figures 3-4): pure functions from a PruneTrace's `attention_profile` to figures, a table and text.

- attention received against token index at one decoder layer, with the grid's row boundaries (its Figure 3);
- the sorted cumulative curves of [CLS] and of the last token (its Figure 4);
- the two statistics, lower-half share (attention shift) and top-20% share (attention dispersion), beside
  FasterVLM's published LLaVA-1.5-7B figures;
- what shift and dispersion do to the methods that rank visual tokens by the decoder's attention.

Nothing here touches the model, torch or Gradio: everything is read from the recorded trace (sparsevlm/profile.py
says how the engine computes each figure), so each function is testable on a hand-built profile.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sparsevlm.profile import PUBLISHED
from sparsevlm.trace import PruneTrace

from .render.figures import layout_base
from .render.geometry import token_place, views_of

# The methods that read a profile layer, and which of the recorded rows is nearest to what each one ranks by.
# (Names the engine registers later fall back to the name itself.)
READERS: dict[str, tuple[str, str]] = {
    "fastv": ("FastV", "ranks by the last token's attention (the last-token row) and prunes right after this "
                       "layer"),
    "pyramiddrop": ("PyramidDrop", "ranks by the last instruction token's attention (the last-token row)"),
    "sparsevlm": ("SparseVLM", "ranks by the attention of its text raters, question words chosen per question (the "
                               "prompt row is the nearer one)"),
    "sparsevlm-v2": ("SparseVLM v2", "ranks by its raters' attention divided by a positional prior (the prompt "
                                     "row is the nearer one)"),
}
CLS_READERS = ("FasterVLM", "VisionZip")

LABEL_SIDE = {"cls": "middle left", "last": "top right", "prompt": "bottom right"}  # apart when values are close
COLOURS = {"cls": "rgb(16,185,129)", "last": "rgb(239,68,60)", "prompt": "rgb(99,102,241)"}
BOUNDARY = "rgba(220,38,38,0.55)"  # the grid's row boundaries, red dashed as in FasterVLM's figures
SHIFT_BAND = 0.05  # a lower-half share within 0.5 +- this is read as no shift
SAME_BAND = 0.02  # top-20% shares within this of each other are read as alike
TOP = 0.2  # the share of tokens the dispersion statistic counts


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def method_names(names: Sequence[str]) -> list[str]:
    return [READERS.get(n, (n, ""))[0] for n in names]


def _join(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


# --- what the trace holds ---------------------------------------------------------------------------------------
def decoder_entries(trace: PruneTrace) -> list[dict]:
    return list((trace.attention_profile or {}).get("decoder") or [])


def profile_layers(trace: PruneTrace) -> list[int]:
    """The decoder layers the profile covers (where a fixed-layer method reads the attention), in order."""
    return [int(d["layer"]) for d in decoder_entries(trace)]


def layer_choices(trace: PruneTrace) -> list[tuple[str, int]]:
    """(label, layer) for the layer picker: "layer 1: FastV", "layer 2: SparseVLM, PyramidDrop", ..."""
    return [(f"layer {d['layer']}: {', '.join(method_names(d.get('methods') or [])) or 'no method'}",
             int(d["layer"])) for d in decoder_entries(trace)]


def pick_layer(trace: PruneTrace, layer: object = None) -> int | None:
    """`layer` when the profile has it, else the first profile layer (FastV's); None without a decoder profile."""
    layers = profile_layers(trace)
    if not layers:
        return None
    try:
        wanted = int(layer)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return layers[0]
    return wanted if wanted in layers else layers[0]


def entry_at(trace: PruneTrace, layer: int | None) -> dict | None:
    for d in decoder_entries(trace):
        if int(d["layer"]) == layer:
            return d
    return None


def cls_entry(trace: PruneTrace) -> dict | None:
    return (trace.attention_profile or {}).get("cls")


def missing_reason(trace: PruneTrace) -> str | None:
    """One sentence saying why the trace has no decoder profile to show, or None when it has one."""
    if not trace.attention_profile:
        return ("This trace was recorded before runs kept an attention profile: run the picture again to see "
                "FasterVLM's figures for it.")
    if decoder_entries(trace):
        return None
    if trace.attention:
        return (f"{_method(trace)} decides attention at every decoder layer instead of reading one fixed layer, so "
                "its run records no fixed-layer profile: the attention-mass curve under the picture shows where its "
                "attention goes.")
    return ("This run recorded no decoder layer where a method reads the attention (the model is too shallow for "
            "every method's schedule), so there is no profile to show.")


OTHER_LABELS = {"dense": "dense", "zipvl": "ZipVL", "fastervlm": "FasterVLM", "visionzip": "VisionZip",
                "divprune": "DivPrune", "dart": "DART", "random": "Random"}


def _method(trace: PruneTrace) -> str:
    return READERS[trace.method][0] if trace.method in READERS else OTHER_LABELS.get(trace.method, trace.method)


def _grid(trace: PruneTrace, n: int) -> tuple[int, int]:
    rows, cols = (int(x) for x in (trace.grid or (0, 0)))
    if rows * cols != n or cols <= 0:  # a trace whose grid does not cover the profile: one square-ish grid
        cols = max(1, round(math.sqrt(n)))
        rows = math.ceil(n / cols)
    return rows, cols


# --- Figure 3: attention against token index ---------------------------------------------------------------------
def row_boundaries(rows: int, cols: int) -> list[float]:
    """x of each boundary between two grid rows on a token-index axis (between token k*cols - 1 and k*cols)."""
    return [k * cols - 0.5 for k in range(1, rows)]


def row_segments(trace: PruneTrace, n: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the rows along the token index: the grid's rows, or for a several-view trace
    (LLaVA-NeXT) the base view's rows, then each row of the tiles' map with the newline token that ends it."""
    layout = views_of(trace)
    if layout is None:
        rows, cols = _grid(trace, n)
        return [(r * cols, min(n, (r + 1) * cols)) for r in range(rows)]
    base = layout.views[0]
    out = [(r * base.grid[1], (r + 1) * base.grid[1]) for r in range(base.grid[0])]
    start = len(base.tokens)
    for t in layout.newlines:
        out.append((start, t + 1))
        start = t + 1
    return [(a, min(b, n)) for a, b in out if a < n]


def _row_means(att: Sequence[float | None], segments: list[tuple[int, int]]) -> tuple[list[float],
                                                                                      list[float | None]]:
    """A step line: each row's mean attention per token present, from its first to its last token."""
    xs: list[float] = []
    ys: list[float | None] = []
    for a0, a1 in segments:
        part = [a for a in att[a0:a1] if a is not None]
        mean = sum(part) / len(part) if part else None
        xs += [a0 - 0.5, a1 - 0.5]
        ys += [mean, mean]
    return xs, ys


SHORT = {"cls": "[CLS]", "prompt": "prompt", "last": "last token"}


def _panels(trace: PruneTrace, d: dict) -> list[tuple[str, str, dict]]:
    """(key, title, entry) of each attention source, [CLS] first when the tower has one."""
    out = []
    cls = cls_entry(trace)
    if cls is not None:
        out.append(("cls", "[CLS] (vision tower, feature layer)", cls))
    out.append(("prompt", f"prompt (mean over the tokens after the picture), decoder layer {d['layer']}",
                d["prompt"]))
    out.append(("last", f"last token, decoder layer {d['layer']}", d["last"]))
    return out


def _empty(text: str, height: int = 220) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, font={"size": 14})
    fig.update_layout(height=height, xaxis={"visible": False}, yaxis={"visible": False}, **layout_base())
    return fig


def index_figure(trace: PruneTrace, layer: int | None = None) -> go.Figure:
    """Attention received by each visual token in token (raster) order: [CLS]'s, the prompt's and the last token's
    at one profile layer, one panel each, with each grid row's mean and a red line at every row boundary."""
    layer = pick_layer(trace, layer)
    d = entry_at(trace, layer)
    if d is None:
        return _empty("no attention profile in this trace")
    panels = _panels(trace, d)
    n = len(d["last"]["attention"])
    rows, cols = _grid(trace, n)
    segments = row_segments(trace, n)
    several = views_of(trace) is not None
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=[f"{title}: {_shift_words(e)}" for _, title, e in panels])
    for i, (key, title, e) in enumerate(panels, start=1):
        att = list(e["attention"])
        where = [[k // cols, k % cols] for k in range(len(att))] if not several else \
            [list((token_place(trace, k) or ("", -1, -1))[1:3]) for k in range(len(att))]
        fig.add_bar(x=list(range(len(att))), y=att, marker_color=COLOURS[key], marker_line_width=0, width=1.0,
                    customdata=where, name=SHORT[key], row=i, col=1,
                    hovertemplate="token %{x} (grid row %{customdata[0]}, column %{customdata[1]})<br>"
                                  "%{y:.3%} of the attention (computed)<extra>" + _esc(title) + "</extra>")
        xs, ys = _row_means(att, segments if len(att) == n else row_segments(trace, len(att)))
        fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": "#0f172a", "width": 1.5}, connectgaps=False,
                        name="mean per grid row", showlegend=i == 1, row=i, col=1, hoverinfo="skip")
        for x in ([b - 0.5 for _, b in segments[:-1]] if several else row_boundaries(rows, cols)):
            fig.add_vline(x=x, line_dash="dash", line_color=BOUNDARY, line_width=1, row=i, col=1)
        fig.update_yaxes(title_text="share", tickformat=".1%", rangemode="tozero", row=i, col=1)
    fig.update_xaxes(title_text=f"visual token index (raster order: {cols} per grid row, the red lines between "
                                "rows)", range=[-0.5, n - 0.5], row=len(panels), col=1)
    fig.update_annotations(font_size=12, x=0.0, xanchor="left")
    fig.update_layout(
        height=170 + 170 * len(panels), bargap=0, showlegend=True,
        title={"text": "Attention each visual token receives, in token order (computed from this run's attention)",
               "x": 0.01, "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.12 if len(panels) == 3 else -0.18},
        **{**layout_base(), "margin": {"l": 70, "r": 20, "t": 70, "b": 70}})
    return fig


# --- Figure 4: sorted cumulative curves ----------------------------------------------------------------------------
def token_values(e: dict) -> list[float]:
    """The attention of every token the entry counts: the patches holding one, and the share on tokens that sit at
    no patch (VisionZip's [CLS] token) as one more."""
    vals = [float(a) for a in e["attention"] if a is not None]
    if float(e.get("unplaced") or 0.0) > 0:
        vals.append(float(e["unplaced"]))
    return vals


def cdf_points(e: dict) -> tuple[list[float], list[float]]:
    """Tokens sorted by the attention they receive, largest first: x = share of the tokens, y = share of the
    attention they hold together; from (0, 0) to (1, 1)."""
    vals = sorted(token_values(e), reverse=True)
    total = sum(vals)
    n = len(vals)
    if n == 0 or total <= 0:
        return [0.0, 1.0], [0.0, 1.0]
    xs, ys, acc = [0.0], [0.0], 0.0
    for k, v in enumerate(vals, start=1):
        acc += v
        xs.append(k / n)
        ys.append(acc / total)
    ys[-1] = 1.0
    return xs, ys


def top_point(e: dict) -> tuple[float, float]:
    """Where the curve crosses the top 20%: ceil(0.2 x tokens) tokens and the share they hold (top20_share)."""
    n = len(token_values(e))
    return (math.ceil(TOP * n) / n if n else TOP), float(e["top20_share"])


def cdf_figure(trace: PruneTrace, layer: int | None = None) -> go.Figure:
    """FasterVLM's concentration curve: for [CLS] and for the last token (and the prompt) at one profile layer,
    the tokens sorted by attention and the share of the attention the first x of them hold, with the top-20% mark
    and the uniform diagonal."""
    layer = pick_layer(trace, layer)
    d = entry_at(trace, layer)
    if d is None:
        return _empty("no attention profile in this trace")
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"color": "#94a3b8", "dash": "dot", "width": 1.5},
                    name="every token alike (no concentration)", hoverinfo="skip")
    order = {"cls": 0, "last": 1, "prompt": 2}
    for key, _, e in sorted(_panels(trace, d), key=lambda c: order[c[0]]):
        xs, ys = cdf_points(e)
        label = {"cls": "[CLS], vision tower", "last": f"last token, layer {d['layer']}",
                 "prompt": f"prompt, layer {d['layer']}"}[key]
        fig.add_scatter(x=xs, y=ys, mode="lines", name=f"{label} (computed)",
                        line={"color": COLOURS[key], "width": 3 if key != "prompt" else 2,
                              "dash": "solid" if key != "prompt" else "dash"},
                        hovertemplate="the top %{x:.0%} of the tokens hold %{y:.1%} of the attention<extra>"
                                      + _esc(label) + "</extra>")
        x20, y20 = top_point(e)
        fig.add_scatter(x=[x20], y=[y20], mode="markers+text", marker={"size": 9, "color": COLOURS[key]},
                        text=[f"{y20:.2f}"], textposition=LABEL_SIDE[key], textfont={"color": COLOURS[key]},
                        showlegend=False, hovertemplate=f"top 20%: {y20:.1%} of the {_esc(label)} attention"
                                                        "<extra></extra>")
    fig.add_vline(x=TOP, line_dash="dash", line_color="#334155", line_width=1,
                  annotation_text="top 20% of the tokens", annotation_position="bottom right")
    fig.update_layout(
        height=380,
        title={"text": "Tokens sorted by the attention they receive: cumulative share (computed from this run's "
                       "attention)", "x": 0.01, "font": {"size": 13}},
        xaxis={"title": "share of the visual tokens, most-attended first", "range": [0, 1.0], "tickformat": ".0%"},
        yaxis={"title": "share of the attention they hold", "range": [0, 1.04], "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.22}, **layout_base())
    return fig


# --- the two statistics beside FasterVLM's ------------------------------------------------------------------------
STATS_HEADERS = ["attention from", "visual tokens counted", "lower-half share, this picture (computed)",
                 f"FasterVLM, {PUBLISHED['model']} (published)", "top-20% share, this picture (computed)",
                 f"FasterVLM, {PUBLISHED['model']} (published)"]
STATS_LEGEND = {
    "lower-half share": "share of the attention on the lower half of the picture's grid (the middle row of an "
                        "odd grid counts half): 0.5 = no shift; above 0.5 = attention shift toward later tokens",
    "top-20% share": "share of the attention held by the 20% most-attended visual tokens: 0.2 = spread evenly, "
                     "1 = all on a few; higher = more concentrated (less dispersion)",
}
PUBLISHED_SHIFT = {"cls": "no shift", "last": "shifted: most of it on the lower half",
                   "prompt": "shifted: most of it on the lower half"}
PUBLISHED_TOP = {"cls": f"about {PUBLISHED['cls_top20_share']:.2f}",
                 "last": f"over {PUBLISHED['last_top20_share']:.2f}",
                 "prompt": "dispersed like the last token's (no figure given)"}


def stats_rows(trace: PruneTrace, layer: int | None = None, dense: PruneTrace | None = None) -> list[list]:
    """One row per attention source at the chosen layer: [who, tokens, lower-half share, FasterVLM's, top-20%
    share, FasterVLM's]. With `dense` (the same request unpruned) and a layer this run reached with fewer tokens,
    the dense run's rows follow, so the statistics over every token stand beside FasterVLM's too."""
    layer = pick_layer(trace, layer)
    d = entry_at(trace, layer)
    if d is None:
        return []
    names = {"cls": "[CLS], vision tower (feature layer)", "last": f"last token, decoder layer {d['layer']}",
             "prompt": f"prompt, decoder layer {d['layer']}"}

    def row(key: str, e: dict, suffix: str = "") -> list:
        return [names[key] + suffix, int(e["tokens"]), round(float(e["lower_half_share"]), 3), PUBLISHED_SHIFT[key],
                round(float(e["top20_share"]), 3), PUBLISHED_TOP[key]]

    out = []
    cls = cls_entry(trace)
    if cls is not None:
        out.append(row("cls", cls))
    out += [row("last", d["last"]), row("prompt", d["prompt"])]
    dd = entry_at(dense, layer) if dense is not None and dense is not trace else None
    if dd is not None and int(dd["last"]["tokens"]) > int(d["last"]["tokens"]):
        out += [row("last", dd["last"], ", dense run"), row("prompt", dd["prompt"], ", dense run")]
    return out


def stats_table_html(rows: Sequence[Sequence]) -> str:
    head = "".join(f'<th title="{_esc(next((v for k, v in STATS_LEGEND.items() if h.startswith(k)), h))}">'
                   f"{_esc(h)}</th>" for h in STATS_HEADERS)
    body = []
    for r in rows:
        cells = [f'<td class="sv-num">{v:.3f}</td>' if isinstance(v, float) else
                 f'<td class="sv-num">{v}</td>' if isinstance(v, int) else f"<td>{_esc(v)}</td>" for v in r]
        body.append("<tr>" + "".join(cells) + "</tr>")
    legend = "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in STATS_LEGEND.items())
    return (f'<table class="sv-table sv-profile-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            f'</tbody></table><ul class="sv-table-legend">{legend}<li><b>published</b>: {_esc(PUBLISHED["source"])}; '
            f"averaged over their samples, where this row is one picture</li></ul>")


# --- the explanation ---------------------------------------------------------------------------------------------
def _shift_words(e: dict) -> str:
    s = float(e["lower_half_share"])
    if s >= 0.5 + SHIFT_BAND:
        return f"lower half {s:.2f}, leans down"
    if s <= 0.5 - SHIFT_BAND:
        return f"lower half {s:.2f}, leans up"
    return f"lower half {s:.2f}, even"


def _shift_sentence(who: str, e: dict) -> str:
    s = float(e["lower_half_share"])
    if s >= 0.5 + SHIFT_BAND:
        return (f"{who} puts {s:.0%} of its attention on the lower half of the picture: it leans toward later "
                "tokens.")
    if s <= 0.5 - SHIFT_BAND:
        return f"{who} puts {s:.0%} of its attention on the lower half: it leans to the upper half."
    return f"{who} puts {s:.0%} of its attention on the lower half: an even split."


def _content_sentence(cls: dict | None) -> str:
    if cls is None:
        return ""
    return (f"For where this picture's content lies: [CLS], which has no positional bias, puts "
            f"{float(cls['lower_half_share']):.0%} of its attention on the lower half. A shift shows as the decoder "
            "leaning further down than that, whatever the picture holds.")


def _dispersion_sentence(who: str, e: dict, cls: dict | None) -> str:
    t = float(e["top20_share"])
    text = f"The top 20% of the tokens hold {t:.0%} of {who}'s attention"
    pub = PUBLISHED["last_top20_share"]
    if cls is not None:
        c = float(cls["top20_share"])
        text += f", against {c:.0%} of [CLS]'s"
        if t < c - SAME_BAND:
            text += ": more dispersed than [CLS], as FasterVLM finds"
        elif t > c + SAME_BAND:
            text += ": more concentrated than [CLS], unlike what FasterVLM finds on LLaVA-1.5"
        else:
            text += ": about as concentrated as [CLS], where FasterVLM finds the last token's more dispersed"
        if max(t, c) < 0.2 + SAME_BAND * 2:
            text += "; both lie near 0.2, the share of attention spread evenly over the tokens"
    text += f" (LLaVA-1.5-7B: over {pub:.0%} for the last token, about {PUBLISHED['cls_top20_share']:.0%} for [CLS])."
    return text


def explanation_html(trace: PruneTrace, layer: int | None = None, dense: PruneTrace | None = None) -> str:
    """What attention shift and dispersion do to the methods that rank tokens by the decoder's attention, with
    this picture's figures at the chosen layer and the methods that read it."""
    layer = pick_layer(trace, layer)
    d = entry_at(trace, layer)
    if d is None:
        return f"<div class='sv-profile-text'><p>{_esc(missing_reason(trace) or '')}</p></div>"
    readers = list(d.get("methods") or [])
    items = "".join(f"<li><b>{_esc(READERS.get(n, (n, ''))[0])}</b>"
                    + (f" {_esc(READERS[n][1])}" if n in READERS else "") + "</li>" for n in readers)
    reads = (f"<p>At decoder layer {d['layer']}, {len(readers)} method{'s' if len(readers) != 1 else ''} "
             f"{'read' if len(readers) != 1 else 'reads'} this attention to decide which visual tokens to keep:"
             f"</p><ul>{items}</ul>" if readers else f"<p>Decoder layer {d['layer']}.</p>")
    total = len(d["last"]["attention"])
    dense_rows = any(r[0].endswith("dense run") for r in stats_rows(trace, layer, dense))
    present = int(d["last"]["tokens"])
    pruned = (f"<p>{present} of the {total} visual tokens reach this layer in this {_esc(_method(trace))} run "
              "(the method pruned the rest before it): the curves and figures count those"
              f"{', and merged tokens count at their centre patch' if d.get('merged_tokens') else ''}."
              + (" The dense run's rows in the table count every token." if dense_rows else "") + "</p>"
              if present < total else "")
    cls = cls_entry(trace)
    ours = (f"<p><b>This picture.</b> {_esc(_shift_sentence('The last token', d['last']))} "
            f"{_esc(_shift_sentence('The prompt', d['prompt']))} {_esc(_content_sentence(cls))} "
            f"{_esc(_dispersion_sentence('the last token', d['last'], cls))}</p>")
    shift = ("<p><b>Attention shift.</b> In a decoder, each text token attends only to what came before it, and "
             "rotary positions make nearer tokens easier to attend to. The visual tokens come in raster order, top "
             "row first, so the last rows of the picture sit closest to the question. FasterVLM measures that "
             "LLaVA-1.5's text-to-image attention grows with the token index: a method that keeps the most-attended "
             "tokens then keeps mostly the lower half of the picture, and can drop an object at the top however "
             "much it matters to the question. Look for a rising trend across the red row boundaries above.</p>")
    disperse = ("<p><b>Attention dispersion.</b> A ranking is only as good as its gaps. When a few tokens hold most "
                "of the attention, the cut between kept and pruned falls in a clear place. When the attention is "
                "spread over many tokens with similar scores, the cut falls among near-ties that noise decides, and "
                "at high reduction (few tokens kept) the tokens that matter can miss it. The steeper a curve rises "
                "before the 20% mark, the more concentrated that attention is.</p>")
    cls_p = (f"<p><b>[CLS] instead.</b> {_join(CLS_READERS)} rank the tokens by the vision tower's [CLS] attention, "
             "before the decoder. The tower attends in both directions, so [CLS] has no positional shift, and on "
             "LLaVA-1.5 it is far more concentrated: that is FasterVLM's argument for why these methods hold up "
             "at high reduction where FastV, SparseVLM and PyramidDrop fall behind. Where a model's decoder shows "
             "neither shift nor dispersion, as the figures above may show, the decoder-reading methods lose less "
             "than FasterVLM finds, and the ordering of the methods on that model can differ from the paper's.</p>")
    return f"<div class='sv-profile-text' style='margin-top: .6rem'>{reads}{pruned}{ours}{shift}{disperse}{cls_p}</div>"


def profile_html(trace: PruneTrace, layer: int | None = None, dense: PruneTrace | None = None) -> str:
    """The statistics table and the explanation at the chosen layer, or one sentence saying why there is none."""
    reason = missing_reason(trace)
    if reason is not None:
        return f"<div class='sv-profile-text sv-profile-missing'><p>{_esc(reason)}</p></div>"
    return stats_table_html(stats_rows(trace, layer, dense)) + explanation_html(trace, layer, dense)
