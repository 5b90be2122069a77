"""The v2 world (world.py) and the independent renderer (independent.py): sizes, positions, backgrounds,
paraphrases, exact evidence, descriptions, vocabulary, determinism; and the v2 training sequences."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sparsevlm.scenes import world
from sparsevlm.scenes.independent import PALETTE, independent_sample, make_independent_scene, render_independent
from sparsevlm.scenes.world import COLOURS, FAMILIES, GRID, PATCH, answer_words
from sparsevlm.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(world.vocabulary())


@pytest.fixture(scope="module")
def heldout():
    return [world.heldout_sample(i) for i in range(350)]


def _cells(img: np.ndarray, j: int) -> np.ndarray:
    r, c = divmod(j, GRID)
    return img[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].reshape(-1, 3).astype(int)


def test_deterministic_from_the_seed():
    a, qa = world.training_scene(77, 8, 12)
    b, qb = world.training_scene(77, 8, 12)
    assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(b)))
    assert [q.to_dict() for q in qa] == [q.to_dict() for q in qb]
    assert not np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(world.training_scene(78, 8, 12)[0])))


def test_sizes_from_two_to_eight_patches_anywhere():
    sides, xs, counts = [], [], Counter()
    for seed in range(300):
        scene = world.make_scene(seed, 1 + seed % 12, with_label=seed % 2 == 0)
        counts[len(scene.objects)] += 1
        for o in scene.objects:
            sides.append(o.side)
            xs.append(o.x0)
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and x1 < world.IMAGE_SIZE and 0 <= y0 and y1 < world.IMAGE_SIZE
        boxes = [o.box for o in scene.objects] + ([scene.label_box] if scene.label else [])
        for i, a in enumerate(boxes):  # nothing overlaps
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
    assert min(sides) <= 2 * PATCH + 2 and max(sides) >= 8 * PATCH - 2
    assert {world.Object2("circle", "red", s, 0, 0, (0, 0, 0)).size for s in sides} == {"small", "medium", "big"}
    # not on a slot lattice: left edges take many values modulo the old 56 px slots
    assert len({x % 56 for x in xs}) > 40
    assert counts[12] > 0 and counts[1] > 0  # 12 objects fit


def test_backgrounds_plain_gradient_noise_texture_light_and_dark():
    seen = Counter()
    for seed in range(120):
        scene = world.make_scene(seed, 3, with_label=False)
        seen[(scene.background, scene.dark)] += 1
        img = np.asarray(world.render(scene)).astype(int)
        corner = img[:8, :8].mean()
        assert (corner < 110) == scene.dark, (seed, scene.background, corner)
        if scene.background in ("gradient", "texture", "noise"):
            bg = img[~np.any([world.object_mask(scene, i) for i in range(len(scene.objects))], axis=0)]
            assert bg.std() > 2.0
    assert {k for k, _ in seen} == set(world.BACKGROUNDS)
    assert {d for _, d in seen} == {True, False}


def test_paraphrases_and_surface_forms(heldout, tok):
    questions = [s.question for _, s in heldout]
    assert any("color" in q for q in questions) and any("colour" in q for q in questions)
    assert any("what is the colour of" in q.lower() or "what is the color of" in q.lower() for q in questions)
    assert any(q.endswith("?") and not q.endswith(" ?") for q in questions)
    assert any(q.endswith(" ?") for q in questions)
    assert any(q[0].isupper() for q in questions)
    unk = tok.unk_token_id
    for q in questions:
        assert unk not in tok(q, add_special_tokens=False)["input_ids"], q


def test_every_family_balanced_answers_in_the_vocabulary(heldout, tok):
    assert Counter(s.family for _, s in heldout) == {f: 50 for f in FAMILIES}
    for family in ("exist", "relation"):
        yes = sum(s.answer == "yes" for _, s in heldout if s.family == family)
        assert 15 <= yes <= 35, family
    for _, s in heldout:
        assert s.answer in answer_words()
        assert len(tok(s.answer, add_special_tokens=False)["input_ids"]) == 1


def test_evidence_cells_show_the_answer(heldout):
    """Colour questions: every evidence cell holds pixels near the answer colour (jitter and brightness
    allowed), and the cells outside it show none of the object (masks are exact)."""
    checked = 0
    for scene, s in heldout:
        if s.family != "colour":
            continue
        img = np.asarray(world.render(scene))
        obj = next(o for o in scene.objects if o.colour == s.answer and o.shape in s.question.lower())
        i = scene.objects.index(obj)
        assert s.evidence == world.covered_patches(scene, [i])
        for j in s.evidence:
            near = np.abs(_cells(img, j) - np.array(obj.fill)).max(axis=1) <= 10
            assert near.sum() >= 5, (s, j)
        mask = world.object_mask(scene, i)
        outside = [j for j in range(GRID * GRID) if j not in set(s.evidence)]
        frac = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
        assert (frac[outside] < 0.05).all()
        checked += 1
    assert checked >= 40


def test_position_and_relation_answers_follow_the_geometry(heldout):
    for scene, s in heldout:
        q = s.question.lower().replace("?", " ?")
        if s.family == "position":
            obj = next(o for o in scene.objects if f" {o.name} " in q + " ")
            assert obj.clear_position()
            assert s.answer == (world.ROWS[obj.row] if "row" in q else world.COLUMNS[obj.col])
        if s.family == "relation":
            named = sorted((q.index(o.name), o) for o in scene.objects if o.name in q)
            a, b = named[0][1], named[1][1]
            if "left of" in q:
                truth = a.box[2] < b.box[0]
            elif "right of" in q:
                truth = a.box[0] > b.box[2]
            elif "above" in q:
                truth = a.box[3] < b.box[1]
            else:
                truth = a.box[1] > b.box[3]
            assert s.answer == ("yes" if truth else "no"), s


def test_description_names_every_item_in_reading_order(tok):
    scene = world.make_scene(5, 6, with_label=True)
    text = world.describe(scene)
    for o in scene.objects:
        assert f"{o.size} {o.colour} {o.shape} at the {world.ROWS[o.row]} {world.COLUMNS[o.col]}" in text
    assert f"a label with {scene.label.lower()}" in text
    firsts = [world.covered_patches(scene, [i])[0] for i in world.reading_order(scene)]
    assert firsts == sorted(firsts)
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_vocabulary_gives_the_embedded_models_token_ids():
    """The world's words, in their order, are the embedded model's vocabulary: every token id as its tokenizer has
    it (moving a word would change the ids the installed weights were trained on)."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "assets" / "models" / "scenes-llava"
    installed = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert build_tokenizer(world.vocabulary()).get_vocab() == installed


# ------------------------------------------------------------------------------------ independent renderer


def test_independent_renderer_is_its_own_drawing():
    scene = make_independent_scene(3, 6, with_card=True)
    img = np.asarray(render_independent(scene)).astype(int)
    for t in scene.things:  # the centre pixel has the object's own colour, from its own palette
        assert np.abs(img[int(t.cy), int(t.cx)] - np.array(t.rgb)).max() <= 2
        assert np.abs(np.array(t.rgb) - np.array(PALETTE[t.colour])).max() <= 18
    assert PALETTE != COLOURS
    sizes = {round(2 * t.r) for s in range(60) for t in make_independent_scene(s, 1 + s % 10, False).things}
    assert min(sizes) < 2 * PATCH + 6 and max(sizes) > 6 * PATCH and len(sizes) > 30  # continuous sizes


def test_independent_set_every_family_with_true_answers():
    items = [independent_sample(i) for i in range(70)]
    assert Counter(s.family for _, s in items) == {f: 10 for f in FAMILIES}
    for img, s in items:
        assert img.size == (336, 336)
        assert s.answer in answer_words()
        if s.family != "count" or s.answer != "zero":
            assert s.evidence or (s.family == "exist" and s.answer == "no")
    a, sa = independent_sample(5)
    b, sb = independent_sample(5)
    assert sa == sb and np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------- training sequences


def test_text_phase_sequences_put_the_question_where_it_sits_after_a_picture(tok):
    from training.train_llava import QUESTION_POS, Conversations, scene_turns

    conv = Conversations(tok)
    scene, turns = scene_turns(9, 3, 4, 1.0)
    ids, pos, labels, fams, weights, groups = conv.build(scene, turns, visual=False, lm_weight=0.1)
    first_q = ids.index(conv.ids(turns[0][0])[0], 2)
    assert pos[first_q] == QUESTION_POS  # as after USER: + 576 visual tokens
    assert all(2 <= p < QUESTION_POS for p in pos[2:first_q])
    # answers (and their end token) are the weight-1 targets, predicted from the position before them
    answers = [t for t, w in zip(labels, weights, strict=True) if w == 1.0]
    expected = []
    for _, a, _ in turns:
        expected += [*conv.ids(a), conv.eos]
    assert answers == expected
    vis = conv.build(scene, turns, visual=True)
    assert vis[0].count(conv.image_id) == 576 and vis[1][: 2 + 576] == list(range(578))
    assert [t for t, w in zip(vis[2], vis[4], strict=True) if w == 1.0] == expected


def test_pooled_context_is_one_vector_per_item_at_its_patches(tok):
    from training.train_llava import Conversations, scene_turns, text_forward

    conv = Conversations(tok)
    scene, turns = scene_turns(11, 2, 3, 0.0)
    seq = conv.build(scene, turns, visual=False, lm_weight=0.1, fused=4)
    ids, pos, labels, _, _, groups = seq
    pooled = [(p, g) for p, g in zip(pos, groups, strict=True) if len(g) > 1]
    assert pooled
    for p, g in pooled:
        i = next(i for i in world.items(scene) if tuple(conv.ids(" ".join(world.item_words(scene, i)))) == g)
        assert p - 2 in world.covered_patches(scene, [i])
    # never a target
    assert all(labels[k - 1] == -100 for k, g in enumerate(groups) if len(g) > 1)
    # the decoder input at a pooled position is the mean of the words' embeddings
    from training.model import ModelSize, build_model

    model = build_model(ModelSize(layers=1, hidden=32, intermediate=64, vision_layers=1, vision_hidden=32), tok)
    batch = conv.collate([seq])
    seen = []
    model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    text_forward(model, batch[5], batch[1])
    k = next(k for k, g in enumerate(groups) if len(g) > 1)
    emb = model.get_input_embeddings().weight[list(groups[k])].mean(0)
    assert torch.allclose(seen[0][0, k], emb, atol=1e-6)
    assert torch.allclose(seen[0][0, 0], model.get_input_embeddings().weight[ids[0]], atol=1e-6)


def test_each_phase_trains_what_llava_trains(tok):
    from training.model import ModelSize, build_model
    from training.train_llava import trainable

    model = build_model(ModelSize(layers=2, hidden=32, intermediate=64, vision_layers=2, vision_hidden=32), tok)

    def learning(phase):
        trainable(model, phase)
        parts = set()
        for name, p in model.named_parameters():
            if p.requires_grad:
                parts.add("projector" if "multi_modal_projector" in name else "vision" if "vision_tower" in name
                          else "embeddings" if "embed_tokens" in name else "head" if "lm_head" in name else "decoder")
        return parts

    assert learning("text") == {"decoder", "embeddings", "head"}
    assert learning("vision") == {"vision"}
    assert learning("align") == {"projector"}  # stage 1: decoder and embeddings frozen
    assert learning("instruct") == {"decoder", "embeddings", "head", "projector"}  # stage 2: CLIP stays frozen
    assert learning("clip") == {"vision"}  # CLIP pretraining of the tower: nothing of the LLaVA side learns


def test_evaluation_reads_each_world_with_its_own_held_out_seed():
    from training.evaluate import DEFAULT_SEEDS, WORLDS, heldout_item, question_kind

    assert len(set(DEFAULT_SEEDS.values())) == len(WORLDS)
    for w in WORLDS:
        items = [heldout_item(i, DEFAULT_SEEDS[w], w) for i in range(7)]
        assert [s.family for _, s in items] == list(FAMILIES)
        assert all(img.size == (336, 336) for img, _ in items)
    kinds = {question_kind(s.question, s.family) for i in range(5, 400, 7)
             for _, s in [world.heldout_sample(i)]}
    assert kinds == {"left of", "right of", "above", "below", "under"}


def test_referent_probe_targets_what_the_question_names_at_the_answer_position(tok):
    from training.train_llava import REFERENT_WORDS, Conversations, referent_vector

    v = referent_vector("How many red crosses are in the image?", FAMILIES.index("count"))
    named = {w for w, x in zip(REFERENT_WORDS, v, strict=False) if x}
    assert named == {"red", "cross"} and v[len(REFERENT_WORDS) + FAMILIES.index("count")] == 1.0
    assert {w for w, x in zip(REFERENT_WORDS, referent_vector("what is on the card?", 6), strict=False) if x} == {
        "label"}
    conv = Conversations(tok)
    scene = world.make_scene(4, 3, with_label=True)
    turns = [("what is written on the label?", scene.label.lower(), FAMILIES.index("read")),
             (f"what colour is the {scene.objects[0].shape}?", scene.objects[0].colour, 0)]
    ids, _, labels, _, _, _ = conv.build(scene, turns, visual=True)
    at = sorted(conv.last_refs)
    assert [labels[t] for t in at] == [conv.ids(a)[0] for _, a, _ in turns]  # they predict the answer words
    assert [tok.convert_ids_to_tokens(ids[t]) for t in at] == [":", ":"]
    batch = conv.collate([(ids, *conv.build(scene, turns, visual=True)[1:])], [conv.last_refs])
    assert batch[-1].sum() == 2


def test_v2_export_loads_with_its_own_vocabulary_and_phase(tmp_path):
    """train_llava.export (`parts.export` with the world's tokenizer) writes a model plain transformers loads."""
    import json

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from training.model import ModelSize, build_model
    from training.train_llava import export, v2_tokenizer

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, kv_heads=1,
                     intermediate=64)
    tok = v2_tokenizer()
    model = build_model(size, tok)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "size": size.to_dict(), "step": 7, "train_seconds": 1.0, "args": {},
                "phase": "align"}, ckpt / "checkpoint.pt")
    export(ckpt, tmp_path / "out")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    assert len(proc.tokenizer) == len(tok) == loaded.config.text_config.vocab_size
    state = json.loads((tmp_path / "out" / "training_state.json").read_text())
    assert state["phase"] == "align"
    assert state["world"] == "v2"  # the app and the likeness script read it (worlds.world_of_model)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_balanced_patch_heads_do_not_drown_the_few_object_patches():
    """The vision phase's per-patch heads: with plain per-patch cross-entropy a tower that gets every background
    patch right and every object/label patch wrong scores a small loss (576 patches, a dozen on the label), so
    shape and the label character stayed near chance on v2 pictures (measured: 32% and 8% per patch). Balanced
    heads average background and foreground separately, and report per-head foreground accuracy."""
    from training.model import ModelSize, build_model
    from training.parts import PatchHeads
    from training.train_llava import v2_tokenizer

    torch.manual_seed(0)
    size = ModelSize(vision_hidden=32, vision_layers=2, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    model = build_model(size, v2_tokenizer())
    targets = torch.zeros((1, 4, 576), dtype=torch.long)
    targets[0, :3, :12] = 2  # 12 foreground patches for colour, shape and character; the rest background
    feats = torch.zeros((1, 577, 32))

    def loss_with(heads, targets):
        for head in heads.heads:  # every patch predicted "background" (class 0), confidently
            head.weight.data.zero_()
            head.bias.data.zero_()
            head.bias.data[0] = 10.0
        heads.features = feats
        value = float(heads.loss(targets))
        heads.features = feats
        return value, heads.foreground_accuracy(targets)

    def cost_of_the_object_errors(balanced):
        """How much the loss rises when the 12 object patches are wrong (the other heads' loss cancels)."""
        wrong, acc = loss_with(PatchHeads(model, 32, balanced=balanced), targets)
        right, _ = loss_with(PatchHeads(model, 32, balanced=balanced), torch.zeros_like(targets))
        return wrong - right, acc

    plain, _ = cost_of_the_object_errors(False)
    balanced, acc = cost_of_the_object_errors(True)
    assert balanced > 10 * plain  # 12 of 576 patches: plain weighs them 2%, balanced half
    assert acc == {"colour": 0.0, "shape": 0.0, "char": 0.0}


def test_reinit_rows_separates_collapsed_words_and_leaves_the_rest(tok):
    """--reinit-words: the text phase left the label characters' LM-head rows near-identical (mean cosine 0.96,
    so no hidden state can pick one) - new random rows for the named words in the input embeddings and the LM
    head, every other weight untouched; unknown words are a clear error."""
    from training.model import ModelSize, build_model
    from training.train_llava import reinit_rows

    model = build_model(ModelSize(layers=2, hidden=32, intermediate=64, vision_layers=2, vision_hidden=32), tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    emb_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    words = list("23456789ehkx")
    ids = tok.convert_tokens_to_ids(words)
    for key in (emb_key, "lm_head.weight"):
        state[key][ids] = state[key][ids[0]].clone()  # collapsed: every row the same
    before = {k: v.clone() for k, v in state.items()}
    out = reinit_rows(state, tok, words, seed=3)
    for key in (emb_key, "lm_head.weight"):
        v = torch.nn.functional.normalize(out[key][ids], dim=-1)
        off = (v @ v.T)[~torch.eye(len(ids), dtype=torch.bool)]
        assert off.abs().max() < 0.9, key
        assert 0.5 < out[key][ids].std() / before[key].std() < 2.0  # the matrix's own scale
        others = [i for i in range(len(tok)) if i not in ids]
        assert torch.equal(out[key][others], before[key][others])
    for k in state:
        if k not in (emb_key, "lm_head.weight"):
            assert torch.equal(out[k], before[k]), k
    with pytest.raises(SystemExit, match="colour-ish"):
        reinit_rows(state, tok, ["colour-ish"], seed=3)


def test_where_targets_are_the_named_objects_cells_at_the_answer_position(tok):
    """--where-weight: at the position that predicts a position / relation answer, the named objects' centres
    (6x6 cells of the picture, in the order the question names them); nothing for other families. Targets come
    from the scene's geometry - never from attention or patches a method scores."""
    from training.train_llava import WHERE_BINS, Conversations, where_vector

    scene = world.make_scene(11, 4, with_label=True)
    a, b = scene.objects[0], scene.objects[1]

    def cell(o):
        return [min(WHERE_BINS - 1, int(o.centre[1] * WHERE_BINS // world.IMAGE_SIZE)),
                min(WHERE_BINS - 1, int(o.centre[0] * WHERE_BINS // world.IMAGE_SIZE))]

    def order(o1, o2):  # --order-weight: o1 entirely before (0) / after (1) o2, or neither (2); x then y
        return [0 if o1.box[2 + k] < o2.box[k] else 1 if o2.box[2 + k] < o1.box[k] else 2 for k in (0, 1)]

    rel = FAMILIES.index("relation")
    assert where_vector(scene, f"Is the {b.name} left of the {a.name}?", rel) == cell(b) + cell(a) + order(b, a)
    assert where_vector(scene, f"which column is the {a.name} in ?", FAMILIES.index("position")) == cell(a) + [
        -100] * 4
    assert where_vector(scene, f"what colour is the {a.shape} ?", 0) is None
    conv = Conversations(tok)
    turns = [(f"which row is the {a.name} in ?", "top", FAMILIES.index("position")),
             (f"what shape is the {a.colour} one ?", a.shape, 1),
             (f"is the {a.name} above the {b.name} ?", "yes", rel)]
    ids, _, labels, _, _, _ = conv.build(scene, turns, visual=True)
    answers = sorted(conv.last_refs)  # the three answer positions; the shape turn (the second) has no where target
    assert sorted(conv.last_where) == [answers[0], answers[2]]
    batch = conv.collate([(ids, *conv.build(scene, turns, visual=True)[1:])], [conv.last_refs], [conv.last_where])
    where = batch[-1]
    assert where.shape == (1, len(ids), 6)
    at = sorted(conv.last_where)
    assert where[0, at[0]].tolist() == cell(a) + [-100] * 4
    assert where[0, at[1]].tolist() == cell(a) + cell(b) + order(a, b)
    assert (where[0, [t for t in range(len(ids)) if t not in at]] == -100).all()


def test_instruct_phase_trains_and_resumes_with_the_where_head(tmp_path):
    """Two tiny instruction-tuning runs: a new phase with --where-weight trains, saves the head, and resumes."""
    import json
    import math
    import subprocess
    import sys

    from training.model import ModelSize, build_model
    from training.train_llava import v2_tokenizer

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, kv_heads=1,
                     intermediate=64)
    start = tmp_path / "start"
    start.mkdir()
    torch.save({"model": build_model(size, v2_tokenizer()).state_dict(), "size": size.to_dict(), "step": 0,
                "train_seconds": 0.0}, start / "checkpoint.pt")
    cmd = [sys.executable, "-m", "training.train_llava", "--phase", "instruct", "--out",
           str(tmp_path / "run"), "--init-from", str(start / "checkpoint.pt"), "--batch", "2", "--turns", "4",
           "--background-keep-start", "0.05", "--referent-weight", "1", "--referent-layer", "0",
           "--where-weight", "1", "--where-layer", "1", "--order-weight", "1", "--order-layer", "1",
           "--family-weights", "relation=20", "--log-every", "1", "--ckpt-minutes", "0"]
    for until, extra in (("2", []), ("3", ["--workers", "2"])):
        r = subprocess.run([*cmd, "--until", until, *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 3 and saved["where_head"] is not None and saved["order_head"] is not None
    assert "resumed instruct at step 2" in r.stdout
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if line]
    assert len(logs) == 3 and all(math.isfinite(rec["where_loss"]) for rec in logs)
    assert all(rec["order_loss"] > 0 for rec in logs)  # relation turns in every batch: the head is trained


def test_worker_feed_draws_the_same_batches_as_the_training_process():
    """--workers: batches drawn ahead by forked processes are the ones the process itself would draw - labels in
    varied typefaces and strokes, tinted backgrounds and the per-patch targets of --patch-weight included. The
    arguments come from the command line's own parser, so every flag has the default a run has."""
    import argparse

    from training.train_llava import Conversations, family_weights, parser, step_feed, v2_tokenizer

    args = parser().parse_args(["--out", "unused", "--seed", "3", "--batch", "2", "--phase", "instruct",
                                "--caption-p", "0.2", "--turns", "3", "--curriculum-start", "2",
                                "--curriculum-every", "1", "--background-keep-start", "0.2",
                                "--background-full-at", "4", "--until", "4", "--label-fonts", "--patch-weight", "0.5",
                                "--stroke-labels", "0.3", "--tinted-backgrounds", "0.5"])
    conv, weights = Conversations(v2_tokenizer()), family_weights("")
    here = list(step_feed(args, conv, 1, weights)[0])
    grey = list(step_feed(argparse.Namespace(**{**vars(args), "tinted_backgrounds": 0.0}), conv, 1, weights)[0])
    assert any(not torch.equal(a["pixels"], g["pixels"]) for a, g in zip(here, grey, strict=True))
    ahead, pool = step_feed(argparse.Namespace(**{**vars(args), "workers": 2}), conv, 1, weights)
    try:
        for a, b in zip(here, ahead, strict=True):
            assert a["max_obj"] == b["max_obj"]
            assert all(torch.equal(x, y) for x, y in zip(a["batch"], b["batch"], strict=True))
            assert torch.equal(a["keep"], b["keep"]) and torch.equal(a["pixels"], b["pixels"])
            assert torch.equal(a["patch_targets"], b["patch_targets"])
    finally:
        pool.terminate()


def test_a_finished_phase_with_weights_only_is_left_alone(tmp_path):
    """A phase trained on a lent GPU comes back as weights without optimizer state (the device's file limit):
    rerunning the chain must see the phase is done, not fail looking for the optimizer."""
    import subprocess
    import sys

    from training.model import ModelSize, build_model
    from training.train_llava import v2_tokenizer

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, kv_heads=1,
                     intermediate=64)
    (tmp_path / "run").mkdir()
    torch.save({"model": build_model(size, v2_tokenizer()).state_dict(), "size": size.to_dict(), "step": 7,
                "train_seconds": 1.0}, tmp_path / "run" / "checkpoint.pt")
    r = subprocess.run([sys.executable, "-m", "training.train_llava", "--phase", "instruct", "--out",
                        str(tmp_path / "run"), "--until", "7"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already at step 7" in r.stdout


def _labelled_and_varied(seeds, **vary):
    """For each seed whose training scene has a label: (varied scene, plain picture, varied picture, outside-card
    mask), after checking that `vary_label(**vary)` kept the scene's questions."""
    for seed in seeds:
        plain, qa = world.training_scene(seed, 6, 6)
        if plain.label is None:
            continue
        varied, qb = world.training_scene(seed, 6, 6)
        world.vary_label(varied, seed, **vary)
        assert [q.to_dict() for q in qa] == [q.to_dict() for q in qb]
        a, b = np.asarray(world.render(plain)).astype(int), np.asarray(world.render(varied)).astype(int)
        x0, y0, x1, y1 = varied.label_box
        outside = np.ones(a.shape[:2], bool)
        outside[y0 : y1 + 1, x0 : x1 + 1] = False
        yield seed, varied, a, b, outside


def test_varied_labels_change_only_the_card_and_keep_the_questions():
    """`world.vary_label` (training pictures, --label-fonts): another typeface on the card, nothing else changed;
    held-out pictures keep the one face (label_style None)."""
    lettered = 0
    for seed, varied, a, b, outside in _labelled_and_varied(range(40)):
        if varied.label_style is None:  # the default share: exactly the held-out look
            assert np.array_equal(a, b)
            continue
        lettered += 1
        x0, y0, x1, y1 = varied.label_box
        assert np.array_equal(a[outside], b[outside])
        card = b[y0 + 3 : y1 - 2, x0 + 3 : x1 - 2]
        assert (card.max(-1) < 100).mean() > 0.03  # ink on the card: the character is drawn
        again = world.vary_label(world.training_scene(seed, 6, 6)[0], seed)
        assert again.label_style == varied.label_style  # a function of the seed
    assert lettered >= 5
    assert world.heldout_sample(6)[0].label_style is None
    assert None in world.label_fonts()  # Pillow's own face is always one of them


def test_stroke_labels_letter_every_character_on_the_card_only():
    """`vary_label(..., stroke_share=1)`: the card lettered in the project's own stroke hand (strokes.py), every
    label character has a glyph, the rest of the picture is untouched, and the characters stay apart."""
    from sparsevlm.scenes.strokes import GLYPHS
    from sparsevlm.scenes.world import LABEL_CHARS

    assert set(LABEL_CHARS) <= set(GLYPHS)
    lettered = 0
    for _, varied, a, b, outside in _labelled_and_varied(range(30), default_share=0.0, stroke_share=1.0):
        assert varied.label_style.strokes
        x0, y0, x1, y1 = varied.label_box
        assert np.array_equal(a[outside], b[outside])
        assert (b[y0 + 3 : y1 - 2, x0 + 3 : x1 - 2].max(-1) < 120).mean() > 0.01  # ink: the character is drawn
        lettered += 1
    assert lettered >= 5
    # one card, one hand (same seed): each character's ink differs from every other's
    scene = next(s for s in (world.training_scene(k, 2, 2)[0] for k in range(50)) if s.label is not None)
    inks = {}
    for ch in LABEL_CHARS:
        scene.label = ch
        world.vary_label(scene, 3, default_share=0.0, stroke_share=1.0)
        x0, y0, x1, y1 = scene.label_box
        inks[ch] = np.asarray(world.render(scene).convert("L"))[y0:y1, x0:x1] < 120
    for i, p in enumerate(LABEL_CHARS):
        for q in LABEL_CHARS[i + 1 :]:
            assert (inks[p] != inks[q]).mean() > 0.02, (p, q)


def test_instruct_from_an_exported_folder_trains_the_tower_with_its_patch_heads(tmp_path):
    """--init-from an exported model folder (the shipped model, say), with --tower-lr-scale, --patch-weight and
    --label-fonts: the tower learns beside the decoder and the per-patch heads log their loss."""
    import json
    import subprocess
    import sys

    from training.model import ModelSize, build_model
    from training.train_llava import export, trainable, v2_tokenizer

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, kv_heads=1,
                     intermediate=64)
    model = build_model(size, v2_tokenizer())
    with pytest.raises(ValueError):
        trainable(model, "align", tower=True)
    trainable(model, "instruct", tower=True)
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "size": size.to_dict(), "step": 3, "train_seconds": 60.0, "args": {},
                "phase": "instruct"}, ckpt / "checkpoint.pt")
    export(ckpt, tmp_path / "exported")
    r = subprocess.run([sys.executable, "-m", "training.train_llava", "--phase", "instruct", "--out",
                        str(tmp_path / "run"), "--init-from", str(tmp_path / "exported"), "--until", "2",
                        "--batch", "2", "--turns", "3", "--tower-lr-scale", "0.5", "--patch-weight", "1",
                        "--label-fonts", "--lr", "1e-2", "--warmup", "1", "--log-every", "1", "--ckpt-minutes", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2 and saved["patch_heads"] is not None
    assert saved["prior_seconds"] == 60.0  # the exported model's training time carries over
    start = model.state_dict()
    tower = [k for k in start if "vision_tower" in k and k.endswith("weight") and start[k].dim() == 2]
    assert any(not torch.equal(saved["model"][k], start[k]) for k in tower)  # the tower learned
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if line]
    assert all(rec["patch_loss"] > 0 for rec in logs)
    assert len(saved["optim"]["param_groups"]) == 3  # decoder + heads, projector, tower (its own lr share)
    assert saved["optim"]["param_groups"][2]["lr_scale"] == 0.5


def test_tinted_backgrounds_change_only_the_background_and_keep_the_questions():
    """`world.vary_background(scene, seed, share)` (training pictures, train_llava --tinted-backgrounds): `share` of
    the scenes get a hued base colour - pastel on light scenes, deep on dark ones - where every held-out scene is
    grey within +-10 per channel. Objects, card and questions stay; no tint comes near an object colour."""
    from sparsevlm.scenes.world import COLOURS

    for seed in range(40):
        plain, qa = world.training_scene(seed, 6, 6)
        same, _ = world.training_scene(seed, 6, 6)
        assert world.vary_background(same, seed, 0.0).base == plain.base  # share 0: exactly the held-out look
        varied, qb = world.training_scene(seed, 6, 6)
        world.vary_background(varied, seed, 1.0)
        assert [q.to_dict() for q in qa] == [q.to_dict() for q in qb]
        base = np.array(varied.base)
        assert base.max() - base.min() > 20  # a hue, not a grey
        assert (base.mean() < 100) == varied.dark  # light stays light, dark stays dark
        assert min(np.linalg.norm(base - np.array(c)) for c in COLOURS.values()) > 70
        a, b = np.asarray(world.render(plain)).astype(int), np.asarray(world.render(varied)).astype(int)
        things = np.logical_or.reduce([world.object_mask(plain, i) for i in world.items(plain)])
        assert np.array_equal(a[things], b[things])
        shift = np.array(varied.base) - np.array(plain.base)  # the whole background moves by the new base
        assert np.abs((b - a)[~things].mean(0) - shift).max() < 3 and np.abs(shift).max() > 0
        assert world.vary_background(world.training_scene(seed, 6, 6)[0], seed, 1.0).base == varied.base
    held_out = np.array([world.heldout_sample(i)[0].base for i in range(20)])
    assert (held_out.max(1) - held_out.min(1)).max() <= 20
