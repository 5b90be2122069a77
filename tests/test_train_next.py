"""scenes-llava-next: built from scenes-llava as plain transformers LLaVA-NeXT, its processor, its trainer (the
conversation encoding, resuming, the export) and its evaluation (the shared-prefix answers against `generate`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from sparsevlm.scenes import hires
from sparsevlm.tokenizer import prompt_for
from training import evaluate_next, train_next
from training.model import ModelSize, build_model, v2_tokenizer
from training.model import build_processor as build_llava_processor
from training.next_model import PINPOINTS, SHIPPED, build_from, build_processor


@pytest.fixture(scope="module")
def tok():
    return v2_tokenizer()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory, tok):
    """A tiny scenes-llava-shaped LLaVA folder (2 decoder layers x 64) to build and train from quickly."""
    d = tmp_path_factory.mktemp("tiny-llava")
    model = build_model(ModelSize(layers=2, hidden=64, intermediate=128, vision_layers=2), tok, seed=1)
    model.save_pretrained(str(d))
    build_llava_processor(tok).save_pretrained(str(d))
    return d


def picture(size=(672, 336), seed=3):
    scene = hires.make_scene(seed, size, 5, with_label=True)
    return hires.render(scene)


def test_built_from_scenes_llava_keeps_every_weight_and_adds_the_newline():
    old = LlavaForConditionalGeneration.from_pretrained(str(SHIPPED), local_files_only=True)
    new = build_from(SHIPPED)
    new_state = new.state_dict()
    for k, v in old.state_dict().items():
        assert torch.equal(new_state[k], v), k
    assert set(new_state) - set(old.state_dict()) == {"model.image_newline"}
    assert new.config.image_grid_pinpoints == PINPOINTS
    assert new.config.vision_feature_select_strategy == "default"
    assert new.config.text_config.max_position_embeddings >= 576 + 4 * 576 + 48 + 64


@pytest.mark.parametrize("size", [(672, 336), (336, 1008)])
def test_plain_transformers_runs_it_on_a_high_resolution_picture(tok, size):
    """Forward and generate with the processor's own output; the image tokens the processor inserted are exactly
    the features the model packs (base view + unpadded tiles + newlines)."""
    model = build_from(SHIPPED)
    processor = build_processor(tok)
    enc = processor(images=[picture(size)], text=[prompt_for("how many objects are there ?")], return_tensors="pt")
    n_tokens = int((enc["input_ids"] == model.config.image_token_index).sum())
    w, h = size
    tiles = (w // 336) * (h // 336)
    assert enc["pixel_values"].shape[1] == 1 + tiles
    assert n_tokens == 576 + tiles * 576 + (h // 14)  # no padding to cut at a pinpoint size; one newline a row
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        assert sum(f.shape[0] for f in feats) == n_tokens
        out = model(**enc)
        assert out.logits.shape[1] == enc["input_ids"].shape[1]
        gen = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_encode_matches_the_chat_template_and_supervises_only_answers(tok):
    processor = build_processor(tok)
    image, turns = train_next.conversation(hires.HIRES_TRAIN_SEED + 5, 4, 0.0, train_next.family_weights(""))
    ids, pixels, sizes, labels, fams = train_next.encode(processor, image, turns)
    messages = []
    for q, a, _ in turns:
        content = [{"type": "text", "text": q}]
        if not messages:
            content.insert(0, {"type": "image"})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text",
                                                                                               "text": a}]}]
    text = processor.apply_chat_template(messages)
    ref = processor(images=[image], text=[text], return_tensors="pt")
    assert ids.tolist() == ref["input_ids"].tolist()
    assert torch.equal(pixels, ref["pixel_values"])
    # every answer token and its </s> is a label at the position before it, nothing else is
    want = []
    for _, a, _ in turns:
        want += [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    sup = labels[labels != -100].tolist()
    assert sup == want
    pos = (labels != -100).nonzero().flatten()
    assert torch.equal(ids[0, pos + 1], labels[pos])
    assert set(fams[labels != -100].tolist()) <= set(range(len(train_next.STAT_NAMES)))


def test_lr_schedule_warms_up_then_decays():
    args = train_next.parser().parse_args(["--lr", "1e-4", "--lr-end", "1e-5", "--warmup", "10",
                                           "--total-steps", "110"])
    assert train_next.lr_at(0, args) == pytest.approx(1e-5)
    assert train_next.lr_at(9, args) == pytest.approx(1e-4)
    assert train_next.lr_at(60, args) == pytest.approx(5.5e-5)
    assert train_next.lr_at(500, args) == pytest.approx(1e-5)


def test_tower_learns_at_a_tenth_and_nothing_is_frozen(tiny_llava):
    model = build_from(tiny_llava)
    args = train_next.parser().parse_args([])
    groups = train_next.param_groups(model, args)
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_training_resumes_where_it_stopped_and_exports_a_plain_model(tmp_path, tiny_llava, tok):
    out = tmp_path / "run"
    base = ["--out", str(out), "--init-from", str(tiny_llava), "--pictures", "1", "--turns", "3", "--log-every",
            "1", "--total-steps", "4", "--threads", "1"]
    train_next.train(train_next.parser().parse_args([*base, "--until", "1"]))
    first = torch.load(out / "checkpoint.pt", weights_only=False)
    assert first["step"] == 1
    train_next.train(train_next.parser().parse_args([*base, "--until", "2"]))
    second = torch.load(out / "checkpoint.pt", weights_only=False)
    assert second["step"] == 2
    assert not torch.equal(first["model"]["model.image_newline"], second["model"]["model.image_newline"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    # a run already at --until does nothing
    train_next.train(train_next.parser().parse_args([*base, "--until", "2"]))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    dest = tmp_path / "export"
    train_next.export(out, dest, tiny_llava)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(dest), local_files_only=True)
    assert torch.equal(model.model.image_newline, second["model"]["model.image_newline"])
    processor = AutoProcessor.from_pretrained(str(dest), local_files_only=True)
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert json.loads((dest / "training_state.json").read_text())["step"] == 2


def test_shared_prefix_answers_equal_generate(tiny_llava, tok):
    """The evaluation's cached answers are plain generate's, for LLaVA-NeXT and for the squeezed LLaVA-1.5 view."""
    questions = ["how many objects are there ?", "is there a red circle ?", "what is written on the label ?"]
    image = picture((336, 672), seed=9)
    llava = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava), local_files_only=True).eval()
    for model, processor, is_next in ((build_from(tiny_llava), build_processor(tok), True),
                                      (llava, AutoProcessor.from_pretrained(str(tiny_llava)), False)):
        view = evaluate_next.view_for(image, is_next)
        assert view.size == ((336, 672) if is_next else (336, 336))
        cached = evaluate_next.answer_picture(model, processor, view, questions, max_new_tokens=3)
        plain = [evaluate_next.answer_generate(model, processor, view, q, max_new_tokens=3) for q in questions]
        assert cached == plain


def test_intervals():
    lo, hi = evaluate_next.wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    # independent questions (one a picture): the cluster variance is the binomial one (with k / (k - 1))
    values = [[1.0]] * 80 + [[0.0]] * 20
    mean, lo, hi = evaluate_next.cluster_interval(values)
    half = 1.959964 * math.sqrt(100 / 99 * 0.8 * 0.2 / 100)
    assert mean == 0.8 and hi - mean == pytest.approx(half)
    # the same answers grouped into pictures that are all right or all wrong: a wider interval
    grouped = [[1.0] * 4] * 20 + [[0.0] * 4] * 5
    assert evaluate_next.cluster_interval(grouped)[2] - 0.8 > half


def test_heldout_questions_extend_each_other():
    a = evaluate_next.heldout_questions(10, "own")
    b = evaluate_next.heldout_questions(20, "independent")
    c = evaluate_next.heldout_questions(20, "own")
    assert sum(len(s) for _, _, s in a) == 10 and sum(len(s) for _, _, s in c) == 20
    flat = [x.question for _, _, s in c for x in s]
    assert [x.question for _, _, s in a for x in s] == flat[:10]
    assert flat != [x.question for _, _, s in b for x in s]


def test_rater_counts_use_every_visual_token_of_the_sequence(tiny_llava, tok):
    """The raters read as many visual rows as the sequence has image tokens (base, tiles, newlines), and a
    question's content-word raters are among its raters."""
    model = build_from(tiny_llava)
    processor = build_processor(tok)
    counts = evaluate_next.rater_counts(model, processor, picture((672, 336)), ["is there a red circle ?",
                                                                              "what is written on the label ?"])
    text = tok("is there a red circle ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert 1 <= counts[0][0] <= len(text) and 0 <= counts[0][1] <= counts[0][0]


def test_evaluate_pairs_two_models_on_the_same_questions(tiny_llava, tok):
    models = {"model": (build_from(tiny_llava), build_processor(tok), True),
              "baseline": (LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval(),
                           AutoProcessor.from_pretrained(str(tiny_llava)), False)}
    result = evaluate_next.evaluate(models, 9, "independent", check=3, log_every=0, raters=True)
    assert result["n"] == 9 and result["checked_against_generate"] == {"model": 3, "baseline": 3}
    records = result["records"]
    for name in models:
        s = result["models"][name]
        assert s["overall"]["correct"] == sum(r[name] for r in records) == sum(
            r[f"{name}_pred"] == r["answer"] for r in records)
        assert sum(f["total"] for k, f in s.items() if k in evaluate_next.FAMILIES) == 9
        assert sum(v["total"] for v in s["by_size"].values()) == 9
        assert 0 <= s["content_raters"]["share"] <= 1
    diff = result["difference"]["model - baseline"]["difference"]
    assert diff == pytest.approx((sum(r["model"] for r in records) - sum(r["baseline"] for r in records)) / 9)
