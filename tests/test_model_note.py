"""What the loaded model knows and how its decoder attends beside LLaVA-1.5's (app/model_note.py): pure renderers
on hand-built data, and where the page puts them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app import model_note as M

ROOT = Path(__file__).resolve().parent.parent


def text(h: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", h).split())


def profile(lowers: list[float], tops: list[float], cls=(0.5, 0.8)) -> dict:
    return {"all": {"n": 12, "cls": {"lower_half_share": [cls[0], 0.01], "top20_share": [cls[1], 0.01]},
                    "decoder": [{"layer": i + 1, "read_by": ["fastv"], "last": {"lower_half_share": [lo, 0.01],
                                                                                 "top20_share": [t, 0.01]}}
                                for i, (lo, t) in enumerate(zip(lowers, tops))]}}


def test_no_shift_is_said_and_each_family_is_explained():
    h = text(M.attention_likeness_html("m", profile([0.50, 0.48], [0.35, 0.78])))
    assert "no attention shift" in h and "measured on 12 pictures" in h
    assert "0.50" in h and "0.78" in h
    for family in ("FastV, SparseVLM, PyramidDrop", "FasterVLM, VisionZip", "DivPrune"):
        assert family in h
    assert "rank better here than the papers find" in h


def test_a_shifted_decoder_is_not_called_unshifted():
    h = text(M.attention_likeness_html("m", profile([0.50, 0.66], [0.6, 0.6])))
    assert "no attention shift" not in h and "shift at some layer" in h


def test_a_cls_leaning_to_the_lower_half_is_said_only_when_it_does():
    assert "lean toward the lower half" in text(M.attention_likeness_html("m", profile([0.5], [0.5], (0.79, 0.75))))
    assert "lean toward" not in text(M.attention_likeness_html("m", profile([0.5], [0.5], (0.52, 0.75))))


def with_blank(summary: dict, lowers: list[float]) -> dict:
    decoder = [{"layer": d["layer"], "read_by": d["read_by"],
                "last": {"lower_half_share": [lo, 0.01], "top20_share": [0.3, 0.01]}}
               for d, lo in zip(summary["all"]["decoder"], lowers, strict=True)]
    return {**summary, "blank": {"n": 6, "cls": summary["all"]["cls"], "decoder": decoder}}


def test_the_blank_pictures_show_a_positional_habit_the_content_hides():
    # no shift where there is something to see, a lean to the lower half on blank pictures at layer 2
    h = text(M.attention_likeness_html("m", with_blank(profile([0.50, 0.49], [0.35, 0.78]), [0.51, 0.59])))
    assert "no attention shift" in h
    assert "blank pictures" in h and "6 blank pictures" in h
    assert "layer 2 (0.59)" in h and "layer 1 (0.51)" not in h
    assert "hidden by the content" in h
    assert h.count("0.59") == 2  # in the sentence and in the table's blank column
    # no lean on blank pictures either: said so, no habit claimed
    h = text(M.attention_likeness_html("m", with_blank(profile([0.50, 0.49], [0.35, 0.78]), [0.51, 0.50])))
    assert "blank pictures" in h and "hidden by the content" not in h and "no lean" in h
    # a summary without blank pictures has no blank column
    h = M.attention_likeness_html("m", profile([0.50, 0.49], [0.35, 0.78]))
    assert "blank" not in h


def test_an_unmeasured_model_gets_no_figures():
    for summary in (None, {}, {"all": {"decoder": []}}):
        h = text(M.attention_likeness_html("llava-hf/llava-1.5-7b-hf", summary))
        assert "not measured for this model" in h and "Attention profile" in h
        assert not re.search(r"\d\.\d\d", h)


def test_what_a_scenes_model_knows_and_the_upload_notice():
    assert M.knows_html(None) == "" and M.upload_notice_html(None, False) == ""
    k = text(M.knows_html("v2"))
    assert "generated scenes" in k and "llava-hf/llava-1.5-7b-hf" in k and "photo" in k
    assert M.upload_notice_html("v2", from_page=True) == ""
    assert "uploaded" in text(M.upload_notice_html("v2", from_page=False))


def test_the_embedded_models_line_and_compare_note_come_from_its_folder():
    from app.handlers import compare_note, likeness_profile, model_line
    from sparsevlm.loading import load_model

    lm = load_model(str(ROOT / "assets/models/scenes-llava"))
    assert "generated scenes" in text(model_line(lm))
    summary = json.loads((ROOT / "assets/models/scenes-llava/likeness_1050.json").read_text())["summary"]
    assert likeness_profile(lm) == summary["attention_profile"]
    note = text(compare_note(lm))
    n = summary["attention_profile"]["all"]["n"]
    assert f"measured on {n} pictures" in note
    first = summary["attention_profile"]["all"]["decoder"][0]["last"]["top20_share"][0]
    assert f"{first:.2f}" in note


def test_the_run_notice_says_when_an_upload_meets_a_scenes_model():
    from PIL import Image

    from app.handlers import RunOutput, draw_views
    from sparsevlm.trace import PruneTrace

    tr = PruneTrace.from_json((ROOT / "tests/data/trace-flat-config-fastv.json").read_text())
    img = Image.new("RGB", tuple(tr.image_size), (200, 200, 200))
    upload = draw_views(RunOutput(img, tr, tr, 64, world="v2"), "kept")
    example = draw_views(RunOutput(img, tr, tr, 64, evidence=[1, 2], world="v2"), "kept")
    other_model = draw_views(RunOutput(img, tr, tr, 64, world=None), "kept")
    assert "uploaded" in text(upload["notice"])
    assert "uploaded" not in text(example["notice"]) and "uploaded" not in text(other_model["notice"])
