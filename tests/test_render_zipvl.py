"""The views of a method that decides attention per layer (ZipVL), on a hand-built trace: the overlay of who took
part in attention at each layer, the caption (a patch can come back), the attention-mass curve with τ and p, the
chart of counts beside adaptive and fixed schedules, the probe rows and their agreement with full attention, the
budget column, and traces written before options moved under config["options"]."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_render import make_trace

from app import render
from sparsevlm.trace import AttentionLayer, Cost, LayerRecord, PruneTrace, Timings

ROWS = COLS = 4
LV = ROWS * COLS
PREFIX, TEXT = 2, 4
N = PREFIX + LV + TEXT  # 22 positions: [prefix 0-1 | visual 2-17 | text 18-21]
# visual patches that attended at each of the 4 layers: patch 5 is left out at layer 1 and comes back at layer 2
ATTENDED = [list(range(16)), [0, 1, 2, 3, 4, 6, 7], [0, 1, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
PROBES = [3, 9, 9, 12, 18, 19, 20, 21]  # 4 random (one drawn twice) before the 4 most recent


def attention_layer(layer: int, both: bool) -> AttentionLayer:
    visual = ATTENDED[layer]
    attended = [0, 1, *(PREFIX + p for p in visual), N - 1]
    p = len(attended) - (1 if layer == 1 else 0)  # layer 1: the last position had to be added
    ranks = list(range(1, N + 1))
    mass = [min(1.0, r / p * 0.9) if r <= p else 0.9 + 0.1 * (r - p) / (N - p) for r in ranks]
    extras = {"tau": 0.9, "probes": PROBES, "forced_last": layer == 1, "curve_ranks": ranks, "curve_mass": mass}
    if both:
        extras["full"] = {"p": p + 1, "attended": p + 1, "overlap": p - 1, "recall": (p - 1) / (p + 1),
                          "jaccard": (p - 1) / (p + 3)}
    return AttentionLayer(layer=layer, n=N, p=p, attended=attended, prefix=2, visual=len(visual), text=1,
                          formula="p = min{p : Σ a↓ ≥ τ·Σa}", extras=extras)


def zipvl_trace(both: bool = False) -> PruneTrace:
    att = [attention_layer(i, both) for i in range(4)]
    mean_visual = float(np.mean([a.visual for a in att]))
    return PruneTrace(
        method="zipvl",
        config={"method": "zipvl", "budget": 8, "accounting": "paper", "positions": "keep", "seed": 0,
                "options": {"tau": 0.9, "probes": "both" if both else "recent+random", "recent": 4, "random": 4,
                            "selection": "shared", "divisor": "causal", "fit": "none"}},
        model={"name": "hand-built", "num_layers": 4}, question="what colour is it ?", prompt="", answer="red",
        image_size=(400, 400), input_region=(0.0, 0.0, 400.0, 400.0), grid=(ROWS, COLS), prefix_tokens=PREFIX,
        visual_tokens=LV, text_tokens=TEXT, generated_tokens=1,
        layers=[LayerRecord(layer=i, visual_in=LV, visual_out=LV, stage=None) for i in range(4)],
        timings_ms=Timings(vision=5, prefill=20, decode_per_token=2, decode_tokens=1, total=25),
        cost=Cost(equal_tokens=LV, equal_tokens_reference=LV, prefill_flops_dense=2e9, prefill_flops=1.8e9,
                  kv_bytes_dense=88 * 1024, kv_bytes=60 * 1024, visual_kv_bytes_dense=64 * 1024,
                  visual_kv_bytes=40 * 1024, attended_share=0.6, attended_visual=mean_visual,
                  budget_note=f"no budget: τ = 0.9 sets each layer's count; {mean_visual:.1f} of {LV} visual tokens "
                              "attended per layer on average"),
        attention=att)


def reference(method: str, counts: list[int], options: dict) -> PruneTrace:
    tr = zipvl_trace()
    tr.method, tr.attention = method, []
    tr.config = {"method": method, "budget": 8, "options": options}
    tr.layers = [LayerRecord(layer=i, visual_in=c, visual_out=c, stage=None) for i, c in enumerate(counts)]
    tr.cost = Cost(equal_tokens=float(np.mean(counts)))
    return tr


def centre(img: Image.Image, patch: int) -> tuple[int, int, int]:
    r, c = divmod(patch, COLS)
    side = img.width / COLS
    return img.getpixel((int((c + 0.5) * side), int((r + 0.5) * side)))


def test_overlay_shows_who_took_part_in_attention_at_each_layer():
    tr = zipvl_trace()
    white = Image.new("RGB", (400, 400), (255, 255, 255))
    for layer in range(4):
        states = render.patch_states(tr, layer)
        assert [p for p in range(LV) if states[p] == render.KEPT] == ATTENDED[layer]
        assert all(states[p] == render.SKIPPED for p in range(LV) if p not in ATTENDED[layer])
        img = render.render_layer(white, tr, layer)
        for p in range(LV):
            r, g, b = centre(img, p)
            if p in ATTENDED[layer]:
                assert (r, g, b) == (255, 255, 255)
            else:  # dimmed and tinted blue: still there, left out of attention here
                assert b > r + 20 and max(r, g, b) < 200
    # patch 5 is left out at layer 1 and back at layer 2
    assert render.patch_states(tr, 1)[5] == render.SKIPPED and render.patch_states(tr, 2)[5] == render.KEPT
    assert render.layer_counts(tr, 1)["tokens"] == len(ATTENDED[1])


def test_caption_says_a_patch_can_come_back():
    tr = zipvl_trace()
    cap = render.layer_caption(tr, 2)
    back = len(set(ATTENDED[2]) - set(ATTENDED[1]))  # 5, 8, 9, 10
    assert f"**{len(ATTENDED[2])}** of {LV} visual tokens took part in attention" in cap
    assert "can come back at the next" in cap and f"{back} of the patches left out at layer 1 attend again" in cap
    assert "p = " in cap and "τ = 0.9" in cap and "residual stream" in cap
    assert "can come back" in render.layer_caption(tr, 0)
    assert render.default_layer(tr) == 1  # the fewest visual tokens attended


def test_mass_curve_marks_tau_and_reads_p_off():
    tr = zipvl_trace()
    a = tr.attention[2]
    fig = render.mass_curve_figure(tr, 2)
    curve = fig.data[0]
    assert list(curve.x) == a.extras["curve_ranks"] and list(curve.y) == a.extras["curve_mass"]
    shapes = fig.layout.shapes
    assert any(s.y0 == s.y1 == pytest.approx(0.9) for s in shapes)  # the τ line
    assert any(s.x0 == s.x1 == a.p for s in shapes)  # p, read off
    marker = fig.data[1]
    assert list(marker.x) == [a.p] and marker.y[0] >= 0.9 - 1e-9
    text = " ".join(x.text for x in fig.layout.annotations)
    assert f"p = {a.p} of {N} tokens" in text and "τ = 0.9" in text
    assert "Layer 2" in fig.layout.title.text and "8 probe rows" in fig.layout.title.text
    assert "no attention decision" in render.mass_curve_figure(make_trace(), 2).layout.annotations[0].text


def test_count_chart_puts_adaptive_beside_fixed_schedules():
    tr = zipvl_trace()
    refs = [reference("sparsevlm", [16, 16, 16, 6], {"count_mode": "code"}),
            reference("fastv", [16, 16, 8, 8], {}), reference("pyramiddrop", [16, 12, 8, 4], {})]
    fig = render.count_comparison_figure(tr, refs)
    names = [d.name for d in fig.data]
    assert names[0] == "ZipVL: visual tokens attended (adaptive: τ = 0.9)"
    assert list(fig.data[0].y) == [len(v) for v in ATTENDED] and list(fig.data[1].y) == [a.p for a in tr.attention]
    assert "SparseVLM: visual tokens kept (adaptive: rank(P))" in names
    assert "FastV: visual tokens kept (fixed schedule)" in names
    assert "PyramidDrop: visual tokens kept (fixed schedule)" in names
    fastv = next(d for d in fig.data if d.name.startswith("FastV"))
    assert list(fastv.y)[:4] == [16, 16, 8, 8] and fastv.line.shape == "hv" and fastv.line.dash == "dash"
    assert "budget 8" in fig.layout.title.text
    # a SparseVLM run on its fixed budget is a fixed schedule too
    assert render.count_kind(reference("sparsevlm", [16] * 4, {"count_mode": "fixed"})) == "fixed schedule"
    assert render.count_kind(reference("sparsevlm", [16] * 4, {})) == "fixed schedule"
    assert render.count_kind(tr) == "adaptive: τ = 0.9"


def test_probe_rows_and_their_agreement_with_full_attention():
    tr = zipvl_trace()
    html = render.probes_html(tr, 1)
    # recent = the 4 last positions (18-21: text); random = 3, 9, 9, 12 (3 distinct, all visual)
    assert "8 query rows of the 22" in html and "4 most recent (positions 18–21: 4 text)" in html
    assert "4 drawn at random before them (3 distinct: 3 visual)" in html
    assert html.count('fill="#111827"') == 7  # a tick at each of the 7 distinct probe positions
    assert "last position was not among the p" in html
    assert "not recorded for this run" in html and "zipvl_probes=\"both\"" in html
    both = zipvl_trace(both=True)
    html = render.probes_html(both, 2)
    full = both.attention[2].extras["full"]
    assert f"all rows p = {full['p']}" in html and f"holds {full['recall']:.0%} of the full-attention set" in html
    assert f"Jaccard {full['jaccard']:.2f}" in html and "Over the 4 layers" in html
    everything = zipvl_trace()
    everything.attention[0].extras["probes"] = "all"
    assert "every one of the 22 rows" in render.probes_html(everything, 0)


def test_budget_column_never_claims_a_budget_zipvl_does_not_have():
    tr = zipvl_trace()
    line = render.budget_line(tr)
    assert line == tr.cost.budget_note and "no budget" in line and "met" not in line
    row = render.compare_rows([("zipvl", tr, "")])[0]
    assert row[4] == line and row[3] == f"16.0 / 16.0 ({tr.cost.attended_visual:.1f} attended)"
    fitted = zipvl_trace()
    fitted.config["options"]["fit"] = "budget"
    fitted.cost.budget_note, fitted.cost.budget, fitted.cost.budget_counting = "", 8, "attended"
    fitted.cost.budget_figure, fitted.cost.budget_met = 8.2, True
    assert render.budget_line(fitted) == ("budget 8 met by paper accounting, τ fitted to the budget (visual tokens "
                                          "attended per layer 8.2)")


def test_latency_and_rules_speak_of_attention():
    tr = zipvl_trace()
    rows = {r[0]: r for r in render.latency_rows(tr, None)}
    att = rows["visual tokens attended per layer (mean; the rest skip attention there and leave its cache)"]
    assert att[1] == pytest.approx(tr.cost.attended_visual, abs=0.051) and att[5] == "computed"
    assert rows["share of all tokens attended per layer (mean)"][1] == 60.0
    assert "selection overhead (probe rows, count, selection)" in rows
    assert "prefill compute (incl. selection overhead)" in rows
    assert "  of which selection overhead (the probe rows)" in rows
    assert not any("pruning overhead" in name for name in rows)  # ZipVL prunes nothing
    md = render.formulas_markdown(tr)
    assert md.count("\n| ") == 4  # one row per layer
    assert "| 1 | 9 of 22 | 10: 2 / 7 / 1 | yes |" in md and "prunes nothing" in md and "Budget: no budget" in md
    counts = render.counts_figure(tr)
    attended = next(d for d in counts.data if d.name and "attention" in d.name)
    assert list(attended.y) == [len(v) for v in ATTENDED]


def test_heatmap_and_patch_fate_count_the_layers_a_patch_attended():
    tr = zipvl_trace()
    share = render.attendance_share(tr)
    assert share[0] == 1.0 and share[5] == 0.75 and share[15] == 0.25
    img = render.render_heatmap(Image.new("RGB", (400, 400), (128, 128, 128)), tr, 0)
    assert centre(img, 0) != centre(img, 15)
    fate = render.patch_fate_html(tr, 5)
    assert "took part in attention at 3 of 4 layers" in fate and "left out at layer 1" in fate


def test_traces_written_before_options_moved_still_render():
    """A SparseVLM trace whose config holds its options flat (written before) and one holding them under
    "options" read the same count mode and recycling."""
    flat = make_trace()
    flat.config = {"method": "sparsevlm", "budget": 64, "count_mode": "paper", "lam": 0.5, "recycle": True}
    nested = make_trace()
    nested.config = {"method": "sparsevlm", "budget": 64, "options": {"count_mode": "paper", "lam": 0.5,
                                                                      "recycle": True}}
    assert render.formulas_markdown(flat) == render.formulas_markdown(nested)
    assert "eq. 8" in render.formulas_markdown(flat) and "Recycling" in render.formulas_markdown(flat)
    assert render.config_option(flat, "lam") == render.config_option(nested, "lam") == 0.5
    assert render.count_kind(flat) == render.count_kind(nested) == "adaptive: rank(P)"
    both = zipvl_trace(both=True)
    assert PruneTrace.from_json(both.to_json()).attention[2].extras == both.attention[2].extras


def test_gif_frames_count_attended_tokens():
    frames = render.animation_frames(Image.new("RGB", (400, 400), (255, 255, 255)), zipvl_trace(), max_side=128)
    assert len(frames) == 4
