"""Renderers read a PruneTrace and return pictures / figures: checked on a hand-built, realistic trace."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from app import render
from sparsevlm.evaluation import recall
from sparsevlm.trace import (
    Cost,
    LayerRecord,
    MergedToken,
    PruneTrace,
    Rater,
    Stage,
    Timings,
)

ROWS = COLS = 24
LV = ROWS * COLS


def make_trace(image_size=(640, 480), input_region=(80.0, 0.0, 560.0, 480.0), n_layers=32) -> PruneTrace:
    """SparseVLM-like trace on a 24x24 grid: three stages after layers 2, 6, 15, recycling at each."""
    rng = np.random.default_rng(0)
    all_p = list(range(LV))
    stages = []
    current = all_p
    merged_prev: list[MergedToken] = []
    plan = [(2, 300, 4), (6, 200, 3), (15, 110, 2)]
    for after, keep_total, n_clusters in plan:
        entering = current + [m.center for m in merged_prev]
        scores = rng.random(len(entering)).tolist()
        # keep the top-left block of the current set, deterministic for the tests
        kept = sorted(current)[: keep_total - n_clusters]
        deleted = [p for p in current if p not in kept]
        cl = []
        for k in range(n_clusters):
            members = deleted[k * 6 : (k + 1) * 6]
            cl.append(MergedToken(center=members[0], members=members))
        stages.append(Stage(
            after_layer=after, visual_in=len(entering), visual_out=len(kept) + len(cl),
            deleted=len(entering) - len(kept), recycled=6 * n_clusters, clusters=n_clusters, rank=5, raters=6,
            kept=kept, merged=cl, input_patches=entering, scores=scores,
            formula=f"fixed budget 64: keep {keep_total} (incl. {n_clusters} recycled)"))
        current, merged_prev = kept, cl
    layers = []
    n = LV
    for layer in range(n_layers):
        st = next((i for i, s in enumerate(stages) if s.after_layer == layer), None)
        out = stages[st].visual_out if st is not None else n
        layers.append(LayerRecord(layer=layer, visual_in=n, visual_out=out, stage=st))
        n = out
    toks = ["what", "colour", "is", "the", "circle", "?", "ASSISTANT", ":"]
    sc = [0.05, 0.3, 0.02, 0.03, 0.4, 0.05, 0.1, 0.05]
    mean = float(np.mean(sc))
    raters = [Rater(index=i, token=t, score=s, rater=s > mean) for i, (t, s) in enumerate(zip(toks, sc))]
    return PruneTrace(
        method="sparsevlm", config={"method": "sparsevlm", "budget": 64, "count_mode": "fixed", "recycle": True},
        model={"name": "hand-built", "num_layers": n_layers}, question="what colour is the circle?",
        prompt="USER: <image>\nwhat colour is the circle? ASSISTANT:", answer="red",
        image_size=image_size, input_region=input_region, grid=(ROWS, COLS), prefix_tokens=1, visual_tokens=LV,
        text_tokens=len(toks), generated_tokens=1, raters=raters, stages=stages, layers=layers,
        timings_ms=Timings(vision=20, raters=0.3, prune_overhead=1.5, prefill=80, decode_per_token=9,
                           decode_tokens=2, total=100),
        cost=Cost(equal_tokens=64.2, prefill_flops_dense=8e12, prefill_flops=1.5e12, prune_overhead_flops=1e9,
                  kv_bytes_dense=320 * 2**20, kv_bytes=40 * 2**20, visual_kv_bytes_dense=288 * 2**20,
                  visual_kv_bytes=30 * 2**20),
    )


def white(size=(640, 480)) -> Image.Image:
    return Image.new("RGB", size, (255, 255, 255))


def centre_px(trace, img, patch):
    x0, y0, x1, y1 = render.patch_box(trace, patch, img.size)
    return img.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))


def test_patch_box_maps_through_center_crop():
    tr = make_trace()
    # 640x480 CLIP: shortest edge -> 336, centre crop: the square 80..560 of the original, 20 px per patch
    assert render.patch_box(tr, 0) == pytest.approx((80, 0, 100, 20))
    assert render.patch_box(tr, LV - 1) == pytest.approx((540, 460, 560, 480))
    assert render.patch_box(tr, 25) == pytest.approx((100, 20, 120, 40))  # row 1, col 1


def test_patch_box_maps_through_padding():
    tr = make_trace(image_size=(640, 480), input_region=(0.0, -80.0, 640.0, 560.0))
    x0, y0, x1, _ = render.patch_box(tr, 0)
    assert (x0, y0) == pytest.approx((0, -80)) and x1 - x0 == pytest.approx(640 / 24)


def test_overlay_keeps_aspect_and_size():
    tr = make_trace()
    img = render.render_layer(white(), tr, 20)
    assert img.size == (512, 384) and img.mode == "RGB"
    tall = make_trace(image_size=(300, 600), input_region=(0.0, 150.0, 300.0, 450.0))
    assert render.render_layer(white((300, 600)), tall, 0).size == (256, 512)


def test_overlay_colours_at_known_patches():
    tr = make_trace()
    layer = 20  # after all three stages
    img = render.render_layer(white(), tr, layer)
    st = tr.stage_for_layer(layer)
    kept = st.kept[0]
    assert centre_px(tr, img, kept) == (255, 255, 255)
    pruned = next(p for p in range(LV) if p not in st.represented())
    dim = round(255 * render.PRUNED_DIM + 18)
    assert all(abs(c - dim) <= 1 for c in centre_px(tr, img, pruned))
    # a non-centre member of the first cluster: tinted with the first cluster colour
    m = st.merged[0]
    member = next(p for p in m.members if p != m.center)
    got = np.array(centre_px(tr, img, member), dtype=float)
    want = 255 * (1 - render.CLUSTER_TINT) + np.array(render.CLUSTER_COLOURS[0]) * render.CLUSTER_TINT
    assert np.abs(got - want).max() <= 2
    # and the second cluster in a different colour
    m2 = st.merged[1]
    member2 = next(p for p in m2.members if p != m2.center)
    assert centre_px(tr, img, member2) != centre_px(tr, img, member)


def test_cropped_margin_is_dark():
    tr = make_trace()
    img = render.render_layer(white(), tr, 0)
    # x = 10 of 640 lies left of the centre crop (80..560): never seen by the model
    r, g, b = img.getpixel((8, 100))
    assert max(r, g, b) <= 80


def test_layer_zero_shows_everything_kept():
    tr = make_trace()
    img = np.asarray(render.render_layer(white(), tr, 0))
    inside = img[:, 70:440]  # display px of the crop (64..448) with a margin
    assert (inside.mean(axis=2) > 200).mean() > 0.85  # only faint grid lines differ


def test_states_and_counts_per_layer():
    tr = make_trace()
    assert (render.patch_states(tr, 2) == render.KEPT).all()  # layer 2 still sees all, prunes after itself
    s3 = render.patch_states(tr, 3)
    assert (s3 == render.KEPT).sum() == 296 and (s3 >= 0).sum() == 24
    c = render.layer_counts(tr, 20)
    assert c == {"tokens": 110, "kept": 108, "clusters": 2, "covered": 12}
    assert "110" in render.layer_caption(tr, 20)
    assert "first cut comes after layer 2" in render.layer_caption(tr, 0)


def test_heatmap_colours_scores():
    tr = make_trace()
    img = render.render_heatmap(white(), tr, 3)
    st = render.heatmap_stage(tr, 3)
    vals = render.patch_scores(tr, st)
    hi, lo = int(np.nanargmax(vals)), int(np.nanargmin(vals))
    assert sum(centre_px(tr, img, hi)) > sum(centre_px(tr, img, lo)) + 150
    assert render.render_view(white(), tr, 3, "heatmap").size == img.size


def test_rater_highlights_follow_the_rule():
    tr = make_trace()
    hl = render.rater_highlights(tr)
    assert [t for t, _ in hl][:2] == ["what", "colour"]
    for (_, v), r in zip(hl, tr.raters):
        assert -1 <= v <= 1
        assert (v > 0) == r.rater
    assert max(v for _, v in hl) == pytest.approx(1.0)
    fig = render.raters_figure(tr)
    assert isinstance(fig, go.Figure) and len(fig.data[0].y) == len(tr.raters)


def test_counts_figure_marks_every_stage():
    tr = make_trace()
    fig = render.counts_figure(tr, budget=64)
    text = " ".join(a.text for a in fig.layout.annotations)
    for st in tr.stages:
        assert f"{st.visual_in} → {st.visual_out}" in text
    assert "rank(P) = 5" in text and "recycled 24 → 4 clusters" in text
    assert "equal tokens" in text and "dense: 576" in text
    assert "computed" in fig.layout.title.text
    md = render.formulas_markdown(tr)
    assert md.count("fixed budget 64") == 3 and "rank(P)" in md


def test_latency_rows_label_everything():
    tr = make_trace()
    dense = make_trace()
    dense.method, dense.stages = "dense", []
    dense.timings_ms = Timings(vision=20, prefill=200, decode_per_token=12, decode_tokens=2, total=230)
    dense.cost = Cost(equal_tokens=576, prefill_flops=8e12, prefill_flops_dense=8e12, kv_bytes=320 * 2**20,
                      kv_bytes_dense=320 * 2**20, visual_kv_bytes=288 * 2**20, visual_kv_bytes_dense=288 * 2**20)
    rows = render.latency_rows(tr, dense)
    assert all(r[5] in ("measured", "computed") and r[4] for r in rows)
    byname = {r[0]: r for r in rows}
    assert byname["prefill = time to first token"][1:4] == [80.0, 200.0, "-60%"]
    assert byname["prefill compute (incl. pruning overhead)"][4] == "TFLOPs"
    assert byname["KV cache after prefill"][1:3] == [40.0, 320.0] and byname["KV cache after prefill"][4] == "MiB"
    fig = render.latency_figure(tr, dense)
    titles = [a.text for a in fig.layout.annotations]
    assert any("measured" in t and "ms" in t for t in titles) and sum("computed" in t for t in titles) == 2


def test_latency_chart_leaves_headroom_above_its_value_labels():
    """Each bar's value label sits above the bar (textposition outside): every y axis reaches at least
    LABEL_HEADROOM above its tallest bar, so no label touches the top of the plot."""
    tr = make_trace()
    dense = make_trace()
    dense.method, dense.stages = "dense", []
    dense.timings_ms = Timings(vision=20, prefill=200, decode_per_token=12, decode_tokens=2, total=230)
    for d in (dense, None):
        fig = render.latency_figure(tr, d)
        tops: dict[str, float] = {}
        for bar in fig.data:
            assert bar.textposition == "outside" and bar.cliponaxis is False
            axis = "yaxis" + (bar.yaxis or "y")[1:]
            tops[axis] = max(tops.get(axis, 0.0), *bar.y)
        assert set(tops) == {"yaxis", "yaxis2", "yaxis3"}
        for axis, top in tops.items():
            lo, hi = fig.layout[axis].range
            assert fig.layout[axis].autorange is False and lo == 0
            assert hi >= top * (1 + render.LABEL_HEADROOM) and render.LABEL_HEADROOM >= 0.15, (axis, hi, top)
        assert fig.layout.margin.t >= 70  # room for the page's label badge above the subplot titles


def test_pictures_drawn_on_a_shared_canvas_equal_pictures_drawn_alone():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    tr = make_trace()
    other = make_trace(input_region=(0.0, -80.0, 640.0, 560.0))  # another crop: its own canvas
    views = [(tr, layer) for layer in (0, 2, 3, 7, 16, 31)] + [(other, 3), (tr, 20)]
    alone = [np.asarray(render.render_layer(img, t, layer, 300, [0, 1, 24])) for t, layer in views]
    shared = [np.asarray(p) for p in render.render_layers(img, views, 300, [0, 1, 24])]
    assert all(np.array_equal(a, b) for a, b in zip(alone, shared, strict=True))
    assert not np.array_equal(alone[2], alone[6])  # same layer, other crop: a different picture
    # a canvas built for another geometry or size is not used for this one
    wrong = render.canvas(img, other, 300)
    assert np.array_equal(np.asarray(render.render_layer(img, tr, 3, 300, [0, 1, 24], shared=wrong)), alone[2])
    small = render.canvas(img, tr, 200)
    assert np.array_equal(np.asarray(render.render_layer(img, tr, 3, 300, [0, 1, 24], shared=small)), alone[2])


def test_compare_pictures_one_per_method_that_ran_at_the_gallery_size():
    img = white()
    tr = make_trace()
    dense = make_trace()
    dense.method, dense.stages = "dense", []
    results = [("dense", dense, ""), ("sparsevlm", tr, ""), ("visionzip", None, "needs [CLS]")]
    pictures = render.compare_pictures(img, results, evidence=[0, 1])
    assert [c for _, c in pictures] == [render.method_label("dense"), render.method_label("sparsevlm")]
    assert all(max(p.size) == render.COMPARE_SIDE for p, _ in pictures)
    want = render.render_layer(img, tr, render.final_layer(tr), render.COMPARE_SIDE, [0, 1])
    assert np.array_equal(np.asarray(pictures[1][0]), np.asarray(want))


def test_answer_markdown_agreement():
    tr = make_trace()
    dense = make_trace()
    dense.answer = "Red."
    assert "same answer" in render.answer_markdown(tr, dense)
    dense.answer = "blue"
    assert "differs" in render.answer_markdown(tr, dense)


def test_animation_is_a_gif_with_one_frame_per_layer():
    tr = make_trace(n_layers=8)
    tr.stages = tr.stages[:2]
    data = render.pruning_animation(white(), tr, max_side=128)
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF" and gif.n_frames == 8


def test_trace_json_roundtrip_renders_the_same():
    tr = make_trace()
    back = PruneTrace.from_json(tr.to_json())
    a = np.asarray(render.render_layer(white(), tr, 10))
    b = np.asarray(render.render_layer(white(), back, 10))
    assert (a == b).all()


def test_compare_rows():
    tr = make_trace()
    dense = make_trace()
    dense.method = "dense"
    rows = render.compare_rows([("dense", dense, ""), ("sparsevlm", tr, ""), ("fastervlm", None, "needs [CLS]")])
    assert rows[1][2] == "yes" and "needs [CLS]" in rows[2][1]
    assert len(rows[0]) == len(render.COMPARE_HEADERS)


def test_budget_line_names_the_accounting_and_counting_that_met_the_budget():
    tr = make_trace()
    c = tr.cost
    c.equal_tokens, c.equal_tokens_reference = 82.4, 64.8
    c.accounting, c.budget, c.budget_counting, c.budget_figure, c.budget_met = "paper", 64, "output", 64.8, True
    assert render.budget_line(tr) == "budget 64 met by paper accounting (output-counted 64.8)"
    c.accounting, c.budget_counting, c.budget_figure, c.budget_met = "flops", "input", 90.0, False
    assert render.budget_line(tr) == "budget 64 NOT met by flops accounting (input-counted 90.0)"
    row = render.compare_rows([("sparsevlm", tr, "")])[0]
    assert row[3] == "82.4 / 64.8" and row[4] == render.budget_line(tr)
    c.budget, c.budget_figure = None, None
    assert "no budget" in render.budget_line(tr)


# --- OpenCV renderers and the MP4 ------------------------------------------------------------------------------
def _box_px(tr, patch, size):
    x0, y0, x1, y1 = render.patch_box(tr, patch, size)
    return int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))


def single_cluster_trace() -> PruneTrace:
    """One cut after layer 0 of a 24x24 grid: patch 200 alone forms a recycled cluster, 0..99 are kept."""
    tr = make_trace(image_size=(480, 480), input_region=(0.0, 0.0, 480.0, 480.0), n_layers=4)
    st = tr.stages[0]
    st.after_layer, st.kept, st.merged = 0, list(range(100)), [MergedToken(center=200, members=[200])]
    tr.stages = [st]
    return tr


def test_cluster_outline_lies_on_the_cluster_boundary():
    tr = single_cluster_trace()
    img = np.asarray(render.render_layer(white((480, 480)), tr, 1, max_side=480)).astype(int)
    colour = np.array(render.CLUSTER_COLOURS[0])
    x0, y0, x1, y1 = _box_px(tr, 200, (480, 480))  # 20x20 px
    on = np.argwhere(np.abs(img - colour).max(axis=2) <= 1)
    assert len(on) > 40
    # every outline pixel lies within 2 px of the patch's edges, none deep inside it or far away
    ys, xs = on[:, 0], on[:, 1]
    near_x = (np.abs(xs - x0) <= 2) | (np.abs(xs - (x1 - 1)) <= 2)
    near_y = (np.abs(ys - y0) <= 2) | (np.abs(ys - (y1 - 1)) <= 2)
    inside = (xs >= x0 - 2) & (xs <= x1 + 1) & (ys >= y0 - 2) & (ys <= y1 + 1)
    centre_dot = (np.abs(xs - (x0 + x1) / 2) <= 6) & (np.abs(ys - (y0 + y1) / 2) <= 6)
    assert (inside & (near_x | near_y | centre_dot)).all()
    # and the outline closes: each of the four sides is drawn at its middle
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    for y, x in ((y0, mid_x), (y1 - 1, mid_x), (mid_y, x0), (mid_y, x1 - 1)):
        assert np.abs(img[y, x] - colour).max() <= 1, (y, x)


def test_evidence_outline_surrounds_the_evidence_patches():
    tr = single_cluster_trace()
    evidence = [300, 301, 324, 325]  # a 2x2 block of patches: rows 12-13, cols 12-13, kept? no: pruned
    plain = np.asarray(render.render_layer(white((480, 480)), tr, 1, max_side=480)).astype(int)
    img = np.asarray(render.render_layer(white((480, 480)), tr, 1, max_side=480, evidence=evidence)).astype(int)
    x0, y0, _, _ = _box_px(tr, 300, (480, 480))
    _, _, x1, y1 = _box_px(tr, 325, (480, 480))
    changed = np.argwhere(np.abs(img - plain).max(axis=2) > 0)
    ys, xs = changed[:, 0], changed[:, 1]
    # only a band around the 40x40 block's border changes (white line, dark rim)
    assert ((xs >= x0 - 3) & (xs <= x1 + 2) & (ys >= y0 - 3) & (ys <= y1 + 2)).all()
    assert not ((xs > x0 + 4) & (xs < x1 - 5) & (ys > y0 + 4) & (ys < y1 - 5)).any()
    assert tuple(img[y0, (x0 + x1) // 2]) == render.EVIDENCE_RGB
    # the same outline on the heatmap view
    heat = np.asarray(render.render_heatmap(white((480, 480)), tr, 1, max_side=480, evidence=evidence))
    assert tuple(heat[y0, (x0 + x1) // 2]) == render.EVIDENCE_RGB


def test_colormap_is_opencv_inferno():
    ramp = render.colormap(np.linspace(0, 1, 5))
    assert ramp.shape == (5, 3) and ramp.dtype == np.uint8
    assert ramp[0].sum() < 30 and ramp[-1][0] > 240 and ramp[-1][1] > 240  # near black -> pale yellow
    luminance = ramp.astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(luminance) > 0).all()
    grid = render.colormap(np.zeros((4, 6)))
    assert grid.shape == (4, 6, 3)


def test_mp4_is_h264_with_one_frame_per_layer(tmp_path):
    import imageio_ffmpeg

    tr = make_trace(n_layers=8)
    tr.stages = tr.stages[:2]
    path = render.pruning_video(white(), tr, str(tmp_path / "p.mp4"), max_side=128)
    data = open(path, "rb").read()
    # browsers stream it: the index (moov) comes before the media data (mdat)
    assert data[4:8] == b"ftyp" and 0 < data.find(b"moov") < data.find(b"mdat")
    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    assert meta["codec"].startswith("h264") and "yuv420p" in meta["pix_fmt"]
    w, h = meta["size"]
    assert w % 2 == 0 and h % 2 == 0
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in gen]
    assert len(frames) == 8
    # the frames are the layers' pictures: layer 0 keeps everything (bright), layer 7 prunes most (dark)
    gif = Image.open(io.BytesIO(render.pruning_animation(white(), tr, max_side=128)))
    gif.seek(0)
    first = np.asarray(gif.convert("RGB"), dtype=float)
    fh, fw = first.shape[:2]
    assert np.abs(frames[0][:fh, :fw].astype(float) - first).mean() < 8
    assert frames[0][40:, :].mean() > frames[7][40:, :].mean() + 40


# --- ground truth of generated scenes -------------------------------------------------------------------------
def test_evidence_recall_counts_kept_and_merged_patches_at_the_last_layer():
    tr = make_trace()  # last stage (after layer 15): kept 0..107, clusters {108..113} and {114..119}
    rec = render.evidence_recall(tr, [0, 1, 110, 115, 300])
    # layers 0-6 see all 5 evidence patches (nothing pruned, then stage 2 keeps or merges them), layers 7-31 see 4
    assert rec == pytest.approx({"evidence_patches": 5, "kept": 2 / 5, "merged_only": 2 / 5, "represented": 4 / 5,
                                "represented_mean_over_layers": (7 * 5 + 25 * 4) / 5 / 32})
    # one engine function, the benchmark's own: it reads the stages (of a trace, or of a hooks record) and the depth
    assert render.evidence_recall is recall.evidence_recall
    record = SimpleNamespace(stages=tr.stages)  # a hooks record: stages, and the depth handed over
    assert recall.evidence_recall(record, [0, 1, 110, 115, 300], depth=32) == rec
    assert render.recall_text(rec) == "40% kept / 80% represented (of 5 patches)"
    # after layer 2: kept 0..295, clusters of 296..319 (300 merged); after 6: kept 0..196, clusters of 197..214
    assert render.evidence_recall_per_stage(tr, [0, 1, 110, 115, 300]) == [
        {"after_layer": 2, "kept": 4 / 5, "represented": 1.0},
        {"after_layer": 6, "kept": 4 / 5, "represented": 4 / 5},
        {"after_layer": 15, "kept": 2 / 5, "represented": 4 / 5}]
    assert render.evidence_recall(tr, []) is None and render.evidence_recall(tr, None) is None
    dense = make_trace()
    dense.stages, dense.method = [], "dense"
    assert render.evidence_recall(dense, [300, 301])["kept"] == 1.0
    rows = render.compare_rows([("dense", dense, ""), ("sparsevlm", tr, ""), ("fastervlm", None, "needs [CLS]")],
                               evidence=[0, 1, 110, 115, 300])
    assert [r[-1] for r in rows] == ["100% kept / 100% represented (of 5 patches)",
                                     "40% kept / 80% represented (of 5 patches)", ""]
    assert all(r[-1] == "" for r in render.compare_rows([("sparsevlm", tr, "")]))  # uploads: no evidence
    html_ = render.truth_html({"seed": 3, "family": "colour", "answer": "red", "evidence": [0, 1, 110, 115, 300]}, tr)
    assert "true answer <b>red</b>" in html_ and "40% kept / 80% represented" in html_ and "is right" in html_


def test_regrid_patches_maps_evidence_onto_the_models_grid():
    assert render.regrid_patches([0, 25, 47], (24, 24), (24, 24)) == [0, 25, 47]
    assert render.regrid_patches([0, 1, 24, 25, 47], (24, 24), (12, 12)) == [0, 11]
    assert render.regrid_patches([0], (12, 12), (24, 24)) == [0, 1, 24, 25]
    assert render.regrid_patches([24 + 1], (24, 24), (16, 16)) == [0, 1, 16, 17]  # straddles two target cells


def test_unknown_words_html():
    assert render.unknown_words_html([]) == ""
    h = render.unknown_words_html([("color", "colour"), ("<b>", None)])
    assert "did you mean <b>colour</b>" in h and "&lt;b&gt;" in h and "&lt;unk&gt;" in h


def test_empty_answer_note_only_when_a_cls_token_reached_the_llm():
    """VisionZip hands the LLM the vision tower's [CLS] (a merged token at no patch): an empty answer after it is
    explained; an answer, or an empty answer without that token, gets no note."""
    tr = make_trace()
    tr.method, tr.answer = "visionzip", ""
    assert render.empty_answer_note(tr) == ""  # no [CLS] token in this trace's stages
    tr.stages[0].merged.insert(0, MergedToken(center=-1, members=[]))
    note = render.empty_answer_note(tr)
    assert "VisionZip answered with an empty string" in note and "[CLS]" in note and "out of distribution" in note
    tr.answer = "red"
    assert render.empty_answer_note(tr) == ""


def test_patch_fate_follows_one_patch_through_every_stage():
    tr = make_trace()  # after layer 2: kept 0..295, clusters of 6 from 296 on; after 6: kept 0..196; after 15: 0..107
    stage0 = tr.stages[0]
    fate = render.patch_fate(tr, 300)
    assert [r["after_layer"] for r in fate] == [2, 6, 15]
    first = fate[0]
    assert first["fate"] == "merged" and first["cluster"] == 0 and first["center"] == 296
    assert first["with_patches"] == [296, 297, 298, 299, 301]
    assert first["score"] == stage0.scores[300] and first["entering"] == LV
    assert first["rank"] == 1 + sum(s > stage0.scores[300] for s in stage0.scores)
    assert fate[1]["fate"] == "gone" and fate[1]["score"] is None
    assert [r["fate"] for r in render.patch_fate(tr, 0)] == ["kept", "kept", "kept"]
    assert [r["fate"] for r in render.patch_fate(tr, 150)] == ["kept", "kept", "deleted"]
    assert [r["fate"] for r in render.patch_fate(tr, 500)] == ["deleted", "gone", "gone"]
    page = render.patch_fate_html(tr, 300)
    assert "Patch 300</b> (row 12, column 12 of the 24×24 grid)" in page
    assert "merged into cluster 0 (center patch 296) with 5 other patches: 296, 297, 298, 299, 301" in page
    assert "after layer 15" in page and "already gone" in page
    # the click: a pixel of the displayed picture -> its patch (the cropped margin is no patch)
    size = render.display_size(tr.image_size)
    x0, y0, x1, y1 = render.patch_box(tr, 300, size)
    assert render.patch_at(tr, (x0 + x1) / 2, (y0 + y1) / 2, size) == 300
    assert render.patch_at(tr, 2, 2, size) is None


def test_token_attention_shows_a_raters_own_row_at_every_stage():
    tr = make_trace()  # raters: "colour" (index 1) and "circle" (index 4)
    for st in tr.stages:
        n = len(st.input_patches)
        colour = [1.0 if p == 5 else 0.0 for p in st.input_patches]  # "colour" looks at patch 5 only
        circle = [1.0 / n] * n
        st.extras = {"rater_tokens": [1, 4], "rater_attention": [colour, circle]}
    per_stage = render.token_attention(tr, 1)
    assert [st.after_layer for st, _ in per_stage] == [2, 6, 15]
    first = per_stage[0][1]
    assert first[5] == 1.0 and first[6] == 0.0 and np.isfinite(first).all()  # every patch entered the first step
    later = per_stage[2][1]
    assert later[5] == 1.0 and np.isnan(later[400])  # patch 400 no longer entered the last step
    assert all(v is None for _, v in render.token_attention(tr, 0))  # "what" is no rater
    views = render.token_attention_views(white(), tr, 1)
    assert len(views) == 3 and "after layer 2" in views[0][1] and views[0][0].size == render.display_size((640, 480),
                                                                                                          320)
    px = np.asarray(views[0][0].convert("RGB"), dtype=int)
    size = views[0][0].size
    x0, y0, x1, y1 = render.patch_box(tr, 5, size)
    hot = px[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    x0, y0, x1, y1 = render.patch_box(tr, 6, size)
    cold = px[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    assert hot.sum() > cold.sum() + 200  # the attended patch is bright, its neighbour dark
    assert "is a text rater" in render.token_attention_note(tr, 1)
    assert "is not a text rater" in render.token_attention_note(tr, 0)
    tr.stages[0].extras = tr.stages[1].extras = tr.stages[2].extras = {}
    assert "records no per-word attention rows" in render.token_attention_note(tr, 1)


@pytest.mark.parametrize("name", ["trace-flat-config-sparsevlm.json", "trace-flat-config-fastv.json"])
def test_traces_written_with_flat_configs_render(name, tmp_path):
    """Traces (and /run records) written when a method's settings were flat config keys render in every view,
    from the file and from a browser tab's session; SparseVLM's count mode and recycling are read from them."""
    from pathlib import Path

    from app.handlers import Handlers

    text = (Path(__file__).parent / "data" / name).read_text()
    tr = PruneTrace.from_json(text)
    assert "options" not in tr.config
    img = Image.new("RGB", tuple(tr.image_size), (200, 200, 200))
    layer = render.default_layer(tr)
    assert render.render_view(img, tr, layer).size == render.display_size(img.size)
    assert render.render_view(img, tr, layer, "heatmap").size == render.display_size(img.size)
    assert "visual tokens" in render.layer_caption(tr, layer)
    render.counts_figure(tr, budget=64)
    md = render.formulas_markdown(tr)
    if tr.method == "sparsevlm":  # written with count_mode paper, lam 0.5, no recycling
        assert "Adaptive (paper eq. 8)" in md and "Recycling" not in md
        assert render.count_kind(tr) == "adaptive: rank(P)"
    else:
        assert render.count_kind(tr) == "fixed schedule"
    assert render.latency_rows(tr, None) and render.compare_rows([(tr.method, tr, "")])
    assert len(render.animation_frames(img, tr, max_side=96)) == render.num_layers(tr)
    path = tmp_path / "upload.png"
    img.save(path)
    session = {"image": str(path), "record": {"trace": json.loads(text), "dense_trace": None}}
    handlers = object.__new__(Handlers)  # the layer view reads the session alone
    overlay, caption = handlers.show_layer(session, layer, "tokens")
    assert overlay.size == render.display_size(img.size) and f"layer {layer}" in caption
    assert handlers.show_attention(session, layer) == (handlers.show_attention(None, 0))
