"""The attention-profile view (FasterVLM's Figures 3-4 and its two statistics) on hand-built profiles: row
boundaries at every grid row, cumulative curves that end at 1, the statistics beside the published ones, the text
naming the methods that read the chosen layer, and a trace without a profile."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from app import profile_view as V
from sparsevlm import profile as P
from sparsevlm.trace import AttentionLayer, PruneTrace

ROWS, COLS = 4, 6  # not square: the boundaries must follow the columns, not the rows
N = ROWS * COLS


def lower_heavy(n: int = N) -> list[float]:
    return [1.0 + k for k in range(n)]  # grows with the token index: attention shift


def make_trace(method: str = "sparsevlm", cls: bool = True, pruned_at_6: bool = True) -> PruneTrace:
    """A profile as the engine records it: [CLS] on a few tokens, layer 1 (FastV) and 2 (SparseVLM, PyramidDrop)
    over every token, layer 6 over the 8 tokens a pruning step kept."""
    cls_att = [0.1] * N
    cls_att[7], cls_att[8], cls_att[13] = 5.0, 4.0, 3.0
    everyone = list(range(N))
    kept = [0, 3, 7, 8, 13, 14, 20, 23] if pruned_at_6 else everyone
    decoder = [
        {"layer": 1, "methods": ["fastv"], "merged_tokens": 0,
         "last": P.entry(lower_heavy(), everyone, N, ROWS, COLS),
         "prompt": P.entry([1.0] * N, everyone, N, ROWS, COLS)},
        {"layer": 2, "methods": ["sparsevlm", "sparsevlm-v2", "pyramiddrop"], "merged_tokens": 0,
         "last": P.entry([9.0 if k == 2 else 0.2 for k in range(N)], everyone, N, ROWS, COLS),
         "prompt": P.entry(lower_heavy(), everyone, N, ROWS, COLS)},
        {"layer": 6, "methods": ["sparsevlm"], "merged_tokens": 1,
         "last": P.entry([1.0 + k for k in range(len(kept))], kept, N, ROWS, COLS),
         "prompt": P.entry([1.0] * len(kept), kept, N, ROWS, COLS)},
    ]
    profile = {"cls": P.entry(cls_att, everyone, N, ROWS, COLS) if cls else None, "decoder": decoder}
    return PruneTrace(method=method, config={}, model={"name": "hand-built"}, question="what is it ?",
                      prompt="USER: <image> what is it ? ASSISTANT:", grid=(ROWS, COLS), visual_tokens=N,
                      attention_profile=profile)


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'").strip()


def test_layer_picker_lists_the_profile_layers_and_defaults_to_fastvs():
    tr = make_trace()
    assert V.profile_layers(tr) == [1, 2, 6]
    assert V.layer_choices(tr) == [("layer 1: FastV", 1), ("layer 2: SparseVLM, SparseVLM v2, PyramidDrop", 2),
                                   ("layer 6: SparseVLM", 6)]
    assert V.pick_layer(tr) == 1 and V.pick_layer(tr, "2") == 2 and V.pick_layer(tr, 5) == 1


def test_index_figure_has_a_boundary_at_every_grid_row():
    tr = make_trace()
    fig = V.index_figure(tr, 1)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["[CLS]", "prompt", "last token"]
    prof = tr.attention_profile
    assert list(bars[0].y) == prof["cls"]["attention"] and list(bars[2].y) == prof["decoder"][0]["last"]["attention"]
    assert list(bars[2].x) == list(range(N))
    xs = [s.x0 for s in fig.layout.shapes]
    assert len(xs) == 3 * (ROWS - 1)  # one line per row boundary in each of the three panels
    assert sorted(set(xs)) == [k * COLS - 0.5 for k in range(1, ROWS)]  # between token k*cols-1 and k*cols
    assert all((x + 0.5) % COLS == 0 for x in xs)
    assert "computed" in fig.layout.title.text
    assert f"{COLS} per grid row" in fig.layout.xaxis3.title.text
    # each row's mean per token present, as a step: the last token's attention grows with the index
    means = [t for t in fig.data if t.name == "mean per grid row"][2]
    row_means = list(means.y[::2])
    assert row_means == sorted(row_means) and row_means[0] < row_means[-1]
    # a layer a pruning step reached with fewer tokens: the pruned patches stay empty
    late = [t for t in V.index_figure(tr, 6).data if t.type == "bar"][2]
    assert sum(y is not None for y in late.y) == 8 and late.y[1] is None


def test_cdf_runs_from_zero_to_one_and_marks_the_top_20_percent():
    e = P.entry([5.0, 3.0, 1.0, 1.0], [0, 1, 2, 3], 4, 2, 2)
    xs, ys = V.cdf_points(e)
    assert xs == [0.0, 0.25, 0.5, 0.75, 1.0] and ys == pytest.approx([0.0, 0.5, 0.8, 0.9, 1.0])
    # a share on a token at no patch (VisionZip's [CLS] token) is one more token of the curve
    xs, ys = V.cdf_points({**e, "attention": [0.3, 0.3, None, 0.2], "unplaced": 0.2})
    assert len(xs) == 5 and ys[-1] == 1.0 and ys[1] == pytest.approx(0.3)
    tr = make_trace()
    for layer in V.profile_layers(tr):
        fig = V.cdf_figure(tr, layer)
        curves = [t for t in fig.data if t.mode == "lines" and "computed" in (t.name or "")]
        assert [c.name.split(",")[0] for c in curves] == ["[CLS]", "last token", "prompt"]
        for c in curves:
            assert c.x[0] == 0 and c.y[0] == 0 and c.x[-1] == 1 and c.y[-1] == 1
            assert all(b >= a for a, b in zip(c.y, c.y[1:]))  # sorted largest first: never falls
        marks = [t for t in fig.data if t.mode == "markers+text"]
        d = V.entry_at(tr, layer)
        want = [tr.attention_profile["cls"]["top20_share"], d["last"]["top20_share"], d["prompt"]["top20_share"]]
        assert [m.y[0] for m in marks] == pytest.approx(want)
        # ceil(20% of the tokens) of them: 5 of 24, or 2 of the 8 that reached layer 6
        assert [m.x[0] for m in marks] == pytest.approx([5 / 24] * 3 if layer != 6 else [5 / 24, 2 / 8, 2 / 8])
        assert [s.x0 for s in fig.layout.shapes] == [0.2]  # the 20% mark
        assert "computed" in fig.layout.title.text


def test_table_shows_both_statistics_beside_the_published_ones():
    tr = make_trace()
    rows = V.stats_rows(tr, 1)
    assert [r[0] for r in rows] == ["[CLS], vision tower (feature layer)", "last token, decoder layer 1",
                                    "prompt, decoder layer 1"]
    last = tr.attention_profile["decoder"][0]["last"]
    assert rows[1][1:] == [N, round(last["lower_half_share"], 3), "shifted: most of it on the lower half",
                           round(last["top20_share"], 3), "over 0.60"]
    assert rows[0][5] == "about 0.80" and rows[2][2] == 0.5
    html = V.stats_table_html(rows)
    text = text_of(html)
    for header in ("lower-half share, this picture (computed)", "top-20% share, this picture (computed)",
                   "FasterVLM, LLaVA-1.5-7B (published)", "0.5 = no shift"):
        assert header in text, header
    assert text.count("(published)") == 2 and f"{last['lower_half_share']:.3f}" in text
    assert f"{last['top20_share']:.3f}" in text and "about 0.80" in text and "over 0.60" in text
    assert html.count("<tr>") == 4
    # a layer this run reached with fewer tokens: the dense run's rows (every token) follow
    dense = make_trace("dense", pruned_at_6=False)
    rows = V.stats_rows(tr, 6, dense)
    assert [r[1] for r in rows] == [N, 8, 8, N, N] and rows[3][0].endswith("dense run")
    assert len(V.stats_rows(tr, 1, dense)) == 3  # every token reached layer 1: nothing to add


def test_explanation_names_the_methods_that_read_the_chosen_layer():
    tr = make_trace()
    at1 = text_of(V.profile_html(tr, 1))
    assert "1 method reads this attention" in at1 and "FastV ranks by the last token's attention" in at1
    assert "PyramidDrop" not in at1.split("This picture.")[0]
    assert "Attention shift." in at1 and "Attention dispersion." in at1
    assert "FasterVLM and VisionZip rank the tokens by the vision tower's [CLS] attention" in at1
    last = tr.attention_profile["decoder"][0]["last"]
    assert f"{last['lower_half_share']:.0%} of its attention on the lower half" in at1 and "leans toward" in at1
    at2 = text_of(V.profile_html(tr, 2))
    assert "3 methods read this attention" in at2
    for name in ("SparseVLM ranks", "SparseVLM v2 ranks", "PyramidDrop ranks"):
        assert name in at2, name
    assert "leans to the upper half" in at2 and "FastV ranks" not in at2
    assert "more dispersed than [CLS], as FasterVLM finds" in at2  # 0.72 of the last token's, 0.87 of [CLS]'s
    flat = make_trace()
    flat.attention_profile["cls"] = P.entry([1.0] * N, list(range(N)), N, ROWS, COLS)
    assert "more concentrated than [CLS], unlike what FasterVLM finds" in text_of(V.explanation_html(flat, 2))
    even = text_of(V.explanation_html(flat, 6).replace("&#x27;", "'"))  # 8 tokens: top 2 hold 0.42 against 0.21
    assert "more concentrated than [CLS]" in even
    alike = make_trace()
    alike.attention_profile["cls"] = P.entry([1.0] * N, list(range(N)), N, ROWS, COLS)
    alike.attention_profile["decoder"][0]["last"] = P.entry([1.0] * N, list(range(N)), N, ROWS, COLS)
    text = text_of(V.explanation_html(alike, 1))
    assert "about as concentrated as [CLS]" in text and "both lie near 0.2" in text
    assert "50% of its attention on the lower half: an even split" in text
    at6 = text_of(V.profile_html(tr, 6, make_trace("dense", pruned_at_6=False)))
    assert f"8 of the {N} visual tokens reach this layer in this SparseVLM run" in at6
    assert "merged tokens count at their centre patch" in at6 and "dense run's rows" in at6


def test_a_trace_without_a_profile_says_why_in_one_sentence():
    old = make_trace()
    old.attention_profile = {}
    zipvl = make_trace("zipvl")
    zipvl.attention_profile = {**zipvl.attention_profile, "decoder": []}
    zipvl.attention = [AttentionLayer(layer=0, n=32, p=12, attended=list(range(12)), prefix=2, visual=8, text=2)]
    for tr, words in ((old, "recorded before runs kept an attention profile"),
                      (zipvl, "ZipVL decides attention at every decoder layer")):
        reason = V.missing_reason(tr)
        assert words in reason and reason.endswith(".") and ". " not in reason.rstrip(".")  # one sentence
        assert V.profile_layers(tr) == [] and V.layer_choices(tr) == [] and V.pick_layer(tr) is None
        assert text_of(V.profile_html(tr)) == reason
        for fig in (V.index_figure(tr), V.cdf_figure(tr)):
            assert not fig.data and "no attention profile" in fig.layout.annotations[0].text
    assert V.missing_reason(make_trace()) is None


def test_a_tower_without_cls_shows_the_decoder_alone():
    tr = make_trace(cls=False)
    fig = V.index_figure(tr, 2)
    assert [t.name for t in fig.data if t.type == "bar"] == ["prompt", "last token"]
    assert len(fig.layout.shapes) == 2 * (ROWS - 1)
    assert "[CLS]" not in " ".join(t.name or "" for t in V.cdf_figure(tr, 2).data)
    assert [r[0] for r in V.stats_rows(tr, 2)] == ["last token, decoder layer 2", "prompt, decoder layer 2"]
    assert "against" not in text_of(V.explanation_html(tr, 2)).split("Attention shift.")[0]


def test_renders_a_trace_read_back_from_json():
    tr = make_trace()
    back = PruneTrace.from_dict(json.loads(tr.to_json()))
    assert V.profile_html(back, 2) == V.profile_html(tr, 2)
    assert V.index_figure(back, 2).to_json() == V.index_figure(tr, 2).to_json()


def test_the_view_needs_no_torch():
    code = "import sys, app.profile_view; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
