"""The benchmark on the high-resolution worlds (`python -m sparsevlm eval --world hires`): the worlds' held-out
order is training/evaluate_next.py's, their evidence is on the whole picture's 14-px grid, evidence is read as a
request's visual tokens through its layout, and a LLaVA-NeXT model is measured at its own budgets."""

import json
import random

import numpy as np
import pytest

from sparsevlm import layout as LY
from sparsevlm.config import ACCOUNTINGS, NEXT_BUDGETS, PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.evaluation.recall import evidence_recall, evidence_tokens
from sparsevlm.evaluation.runner import BUDGETS, MAX_NEW_TOKENS, check_labels, evaluate, settings
from sparsevlm.loading import from_objects
from sparsevlm.pipeline import run
from sparsevlm.scenes import hires, independent_hires, worlds
from sparsevlm.scenes.world import COVER_FRACTION, FAMILIES, PATCH
from sparsevlm.scenes.worlds import (
    ALL_WORLDS,
    DEFAULT_SEEDS,
    HIRES_WORLDS,
    WORLDS,
    check_world,
    heldout_item,
    studio_item,
    world_of_model,
    world_order,
    worlds_for,
)
from sparsevlm.testing import tiny_llava_next

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-v1.6's, (height, width)


# --- the worlds ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ours", "theirs"), [("hires", "own"), ("independent-hires", "independent")])
def test_heldout_items_are_the_questions_evaluate_next_asks_in_its_order(ours, theirs):
    from training.evaluate_next import heldout_questions

    n = 16  # three pictures and part of a fourth
    asked = heldout_questions(n, theirs)
    flat = [(k, image, s) for k, image, samples in asked for s in samples]
    assert len(flat) == n and len(asked) >= 3
    for i, (k, image, sample) in enumerate(flat):
        item = heldout_item(i, world=ours)
        assert item.sample == sample and item.picture == k and item.world == ours
        assert item.image.size == image.size and np.array_equal(np.asarray(item.image), np.asarray(image))
    # a larger n extends a smaller one, and item i does not depend on what was asked before
    assert heldout_item(n - 1, DEFAULT_SEEDS[ours], ours).sample == flat[-1][2]


def test_finding_a_late_item_renders_only_its_own_picture(monkeypatch):
    rendered = []
    render = worlds._API["hires"].render  # noqa: SLF001
    monkeypatch.setattr(worlds._API["hires"], "render", lambda scene: rendered.append(scene.seed) or render(scene))
    seed = DEFAULT_SEEDS["hires"] + 1_000  # a seed no other test asked, so nothing is cached
    item = heldout_item(40, seed, "hires")
    assert rendered == [seed + item.picture] and item.picture >= 5
    pictures = [hires.heldout_picture(k, seed)[1] for k in range(item.picture + 1)]
    before = sum(len(s) for s in pictures[:-1])
    assert item.sample == pictures[-1][40 - before]


@pytest.mark.parametrize("name", HIRES_WORLDS)
def test_hires_evidence_is_on_the_whole_pictures_grid_and_objects_match_it(name):
    sizes = {tuple(s) for s in worlds.picture_sizes(name)}
    for i in range(14):
        item = heldout_item(i, world=name)
        w, h = item.image.size
        assert (w, h) in sizes and item.grid == (h // PATCH, w // PATCH)
        assert all(0 <= j < item.grid[0] * item.grid[1] for j in item.sample.evidence)
        objs = item.objects()
        assert objs and all(o.mask.shape == (h, w) and o.grid == item.grid for o in objs)
        assert all(o.cover().shape == (item.grid[0] * item.grid[1],) for o in objs)
        if item.sample.family in ("colour", "shape"):
            t = item.target()
            assert t is not None and t.patches() == list(item.sample.evidence)
            assert item.sample.answer == (t.colour if item.sample.family == "colour" else t.shape)


def test_evidence_object_patches_follow_the_masks_grid():
    mask = np.zeros((336, 672), bool)  # a 672x336 picture: 24 rows of 48 cells
    mask[14:28, 588:602] = True  # exactly cell (1, 42)
    o = worlds.EvidenceObject(0, "red", "square", mask)
    assert o.grid == (24, 48) and o.patches() == [1 * 48 + 42]
    mask[0, 0] = True  # 1 pixel of cell 0: 1/196 < 5%
    assert worlds.EvidenceObject(0, "red", "square", mask).patches() == [90]
    mask[0:3, 0:4] = True  # 12 pixels: >= 5%
    assert worlds.EvidenceObject(0, "red", "square", mask).patches() == [0, 90]


@pytest.mark.parametrize("name", HIRES_WORLDS)
def test_studio_items_of_the_hires_worlds_draw_their_sizes_for_every_family(name):
    seen = set()
    for seed in range(3):
        for family in FAMILIES:
            a, b = studio_item(seed, family, name), studio_item(seed, family, name)
            assert a.sample == b.sample and a.sample.family == family
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
            assert a.image.size in worlds.picture_sizes(name)
            seen.add(a.image.size)
            if family in ("colour", "shape"):
                assert a.target() is not None and a.target().patches() == list(a.sample.evidence)
    assert len(seen) >= 2


def test_world_names_and_what_suits_a_model(tmp_path):
    assert WORLDS == ("v2", "independent") and HIRES_WORLDS == ("hires", "independent-hires")
    assert ALL_WORLDS == WORLDS + HIRES_WORLDS and set(DEFAULT_SEEDS) == set(ALL_WORLDS)
    assert len(set(DEFAULT_SEEDS.values())) == len(ALL_WORLDS)
    assert DEFAULT_SEEDS["hires"] == hires.HIRES_HELDOUT_SEED
    assert DEFAULT_SEEDS["independent-hires"] == independent_hires.INDEPENDENT_HIRES_SEED
    assert all(check_world(w) == w for w in ALL_WORLDS)
    (tmp_path / "training_state.json").write_text(json.dumps({"world": "hires", "step": 442}))
    assert world_of_model(tmp_path) == "hires"
    assert worlds_for("hires") == ["hires", "independent-hires"]
    assert worlds_for("independent-hires") == ["independent-hires", "hires"]
    assert worlds_for(None) == world_order(None) == ["v2", "independent"]
    assert worlds_for("independent") == world_order("independent") == ["independent", "v2"]
    assert world_order("hires") == ["v2", "independent"]  # the 336 px studio's order is unchanged
    from sparsevlm.cli import EVAL_WORLDS

    assert EVAL_WORLDS == ALL_WORLDS


# --- evidence as visual tokens -----------------------------------------------------------------------------------
def _brute_force(evidence, layout, picture_size):
    """Each token box's covered share from `token_boxes()`, every evidence cell against every box."""
    w, h = picture_size
    sx, sy = w / layout.image_size[0], h / layout.image_size[1]
    cols = w // PATCH
    out = []
    for t, box in enumerate(layout.token_boxes()):
        if box is None:
            continue
        x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
        area = 0.0
        for e in evidence:
            r, c = divmod(e, cols)
            ox = min(x1, (c + 1) * PATCH) - max(x0, c * PATCH)
            oy = min(y1, (r + 1) * PATCH) - max(y0, r * PATCH)
            area += max(ox, 0) * max(oy, 0)
        if area > 1e-9 and area >= COVER_FRACTION * (x1 - x0) * (y1 - y0) * (1 - 1e-9):
            out.append(t)
    return out


def test_llava_15s_one_view_of_a_336_picture_gives_the_evidence_back_unchanged():
    layout = LY.single((24, 24), (0.0, 0.0, 336.0, 336.0), (336, 336))
    rng = random.Random(0)
    for _ in range(20):
        ev = sorted(rng.sample(range(576), rng.randint(1, 60)))
        assert evidence_tokens(ev, layout) == ev
    assert evidence_tokens(list(range(576)), layout) == list(range(576))
    assert evidence_tokens([], layout) == []
    for i in range(7):  # the v2 world's own held-out evidence
        ev = list(heldout_item(i, world="v2").sample.evidence)
        assert evidence_tokens(ev, layout, (336, 336)) == ev


def test_a_tile_token_is_evidence_iff_its_cell_is_and_a_base_token_when_covered_enough():
    layout = LY.anyres((672, 672), PINPOINTS, 336, 24)  # 48x48 cells; tiles at full resolution, 2,928 tokens
    assert layout.total == 2928
    cell = 30 * 48 + 40  # row 30, column 40: tile 1,1
    # the base view's token (15, 20) spans cells rows 30-31, columns 40-41; the tiles' map row 30 has 48 + 1 tokens
    assert evidence_tokens([cell], layout) == [15 * 24 + 20, 576 + 30 * 49 + 40]
    tiles = [v for v in layout.views if v.name != "base"]
    for v in tiles:
        for k, t in enumerate(v.tokens[:: 37]):
            x0, y0, _, _ = v.cell_box(k * 37)
            c = round(y0 / PATCH) * 48 + round(x0 / PATCH)
            assert t in evidence_tokens([c], layout)  # its own cell makes it evidence
            assert t not in evidence_tokens([c + 1 if (c + 1) % 48 else c - 1], layout)  # a neighbour does not
    every = evidence_tokens(list(range(48 * 48)), layout)
    assert every == sorted(t for v in layout.views for t in v.tokens) and not set(every) & set(layout.newlines)


def test_the_five_percent_rule_on_a_hand_built_view():
    layout = LY.single((1, 1), (0.0, 0.0, 70.0, 70.0), (70, 70))  # one token over 5x5 cells of 14 px
    assert evidence_tokens([0], layout) == []  # 4% of its box
    assert evidence_tokens([0, 12], layout) == [0]  # 8%
    assert evidence_tokens([0], layout, fraction=0.04) == [0]
    with pytest.raises(ValueError, match="5x5 grid"):
        evidence_tokens([25], layout)


def test_a_squeezed_picture_maps_its_full_resolution_cells_onto_the_one_view():
    layout = LY.single((24, 24), (0.0, 0.0, 336.0, 336.0), (336, 336))  # a 672x336 picture squeezed to 336x336
    assert evidence_tokens([0], layout, (672, 336)) == [0]
    assert evidence_tokens([1], layout, (672, 336)) == [0]
    assert evidence_tokens([2], layout, (672, 336)) == [1]
    assert evidence_tokens([48 + 47], layout, (672, 336)) == [24 + 23]


@pytest.mark.parametrize("size", [(672, 672), (1008, 336), (336, 1008), (672, 336), (336, 672)])
@pytest.mark.parametrize("tile", [336, 112])
def test_the_mapping_agrees_with_every_token_box(size, tile):
    """Against `token_boxes()` one by one, at full-resolution tiles (336) and at a tiny model's (112 px tiles: the
    picture is resized into the pinpoint, boxes fall between cells)."""
    pins = [[h * tile // 336, w * tile // 336] for h, w in PINPOINTS]
    layout = LY.anyres(size, pins, tile, tile // PATCH)
    rng = random.Random(size[0] + tile)
    n = (size[0] // PATCH) * (size[1] // PATCH)
    for _ in range(3):
        ev = sorted(rng.sample(range(n), 40))
        assert evidence_tokens(ev, layout) == _brute_force(ev, layout, size)


# --- the benchmark on a LLaVA-NeXT model ---------------------------------------------------------------------------
LABELS = ["dense", "sparsevlm-160-paper", "fastv-160-flops", "visionzip-160-paper", "random-160-flops",
          "sparsevlm-640-paper"]


@pytest.fixture(scope="module")
def next_lm():
    # 112 px tiles of 8x8 patches: 200 (672x336) to 336 (672x672) visual tokens a hires picture, so 160 fits
    model, processor = tiny_llava_next(image_size=112, layers=4)
    return from_objects(model, processor, "tiny-next")


def test_the_budgets_are_the_model_familys():
    assert {s.config.budget for s in settings(budgets=NEXT_BUDGETS) if s.method not in ("dense", "zipvl")
            and s.label.rsplit("-", 2)[1].isdigit()} == {640, 320, 160}
    assert "sparsevlm-160-paper" in {s.label for s in settings(budgets=NEXT_BUDGETS)}
    assert [s.label for s in settings()] == [s.label for s in settings(ACCOUNTINGS, BUDGETS)]  # LLaVA-1.5's
    check_labels(["dense", "sparsevlm-160-paper", "fastv-640-flops"], ACCOUNTINGS, NEXT_BUDGETS)
    with pytest.raises(ConfigError, match=r"sparsevlm-64-paper: .*this model's budgets 640, 320, 160; LLaVA-1\.5 "
                                          r"models are benchmarked at 192, 128, 96, 64"):
        check_labels(["sparsevlm-64-paper"], ACCOUNTINGS, NEXT_BUDGETS)
    with pytest.raises(ConfigError, match=r"sparsevlm-160-paper: .*budgets 192, 128, 96, 64\)"):
        check_labels(["sparsevlm-160-paper"], ACCOUNTINGS, BUDGETS)


def test_a_llava_next_model_on_the_hires_world(next_lm):
    n = 3
    result = evaluate(next_lm, n, None, LABELS, log=None, world="hires")
    assert result["world"] == "hires" and result["seed"] == DEFAULT_SEEDS["hires"] and result["questions"] == n
    assert result["budgets"] == [640, 320, 160] and "visual tokens" in result["measured"]
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == [s.label for s in settings(budgets=(*NEXT_BUDGETS, *BUDGETS)) if s.label in LABELS]
    # 640 is more than the 200 tokens of a 672x336 picture: refused before any question, the size named
    assert set(rows["sparsevlm-640-paper"]) == {"setting", "unavailable"}
    assert rows["sparsevlm-640-paper"]["unavailable"].startswith(
        "budget 640 is larger than the image grid of a 672x336 picture (200 visual tokens")
    for label in LABELS[:-1]:
        r = rows[label]
        assert r["questions"] == n and len(r["hits"]) == n
        assert label == "dense" or (r["budget"] == 160 and label == f"{r['method']}-160-{r['accounting']}")
        for key in ("evidence_recall_last", "evidence_recall_direct", "evidence_recall_layers"):
            assert r[key] is not None and 0.0 <= r[key] <= 1.0, (label, key)
        assert r["evidence_recall_direct"] <= r["evidence_recall_last"] + 1e-12
    assert rows["dense"]["evidence_recall_last"] == 1.0  # dense keeps every token
    assert rows["sparsevlm-160-paper"]["equal_tokens"] < rows["dense"]["equal_tokens"]
    # the runner's recall is the trace's, with the evidence read through each request's layout
    label, config = "fastv-160-flops", PruneConfig(method="fastv", budget=160, accounting="flops")
    alone = []
    for i in range(n):
        item = heldout_item(i, world="hires")
        trace = run(next_lm, item.image, item.sample.question, config, max_new_tokens=MAX_NEW_TOKENS).trace
        tokens = evidence_tokens(item.sample.evidence, trace.visual_layout(), item.image.size)
        assert tokens and max(tokens) < trace.visual_layout().total
        alone.append(evidence_recall(trace, tokens, next_lm.num_layers)["represented"])
    assert rows[label]["evidence_recall_last"] == pytest.approx(sum(alone) / n)


def test_the_command_measures_a_next_folder_on_its_own_world_at_its_budgets(tmp_path, next_lm, capsys):
    from sparsevlm.cli import main

    folder = tmp_path / "next"
    next_lm.model.save_pretrained(folder)
    next_lm.processor.save_pretrained(folder)
    (folder / "training_state.json").write_text(json.dumps({"world": "hires"}))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(folder), "--n", "2", "--methods", "dense,random-160-paper,fastv-160-paper",
                 "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["world"] == "hires" and result["seed"] == DEFAULT_SEEDS["hires"]
    assert [r["setting"] for r in result["rows"]] == ["dense", "fastv-160-paper", "random-160-paper"]
    report = (out / "benchmark.md").read_text()
    assert "Ordering at 160 tokens, paper accounting" in report and "Budgets 640 / 320 / 160." in report
    assert "up to 336 visual tokens a picture" in report and (out / "benchmark.png").stat().st_size > 0
    assert main(["eval", "--model", str(folder), "--n", "1", "--methods", "random-64-paper", "--json"]) == 2
    assert "this model's budgets 640, 320, 160" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--n", "1", "--methods", "dense", "--world", "independent-hires",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["world"] == "independent-hires" and result["seed"] == DEFAULT_SEEDS["independent-hires"]
