"""The vision tower's contrastive (CLIP) training and its measurements, on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from sparsevlm.scenes import world
from training import clip_tower as ct
from training.train_llava import v2_tokenizer


def test_info_nce_is_lowest_on_matching_pairs():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(16, 32, generator=g)
    txt = img + 0.1 * torch.randn(16, 32, generator=g)  # each caption near its own picture
    matched = ct.info_nce(img, txt, 20.0)
    shuffled = ct.info_nce(img, txt[torch.randperm(16, generator=g)], 20.0)
    assert matched < 0.1 < math.log(16) < shuffled
    # symmetric: swapping the two sides gives the same loss
    assert torch.isclose(ct.info_nce(txt, img, 20.0), matched)


def test_temperature_is_learned(tokenizer):
    head = ct.ClipHead(tokenizer, vision_hidden=16)
    assert math.isclose(float(head.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-5)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(8, 32, generator=g)
    txt = img + 0.3 * torch.randn(8, 32, generator=g)  # separable: a sharper softmax lowers the loss
    opt = torch.optim.Adam([head.logit_scale], lr=0.05)
    before = float(head.logit_scale.detach())
    for _ in range(5):
        opt.zero_grad()
        ct.info_nce(img, txt, head.logit_scale.exp()).backward()
        opt.step()
    assert float(head.logit_scale.detach()) > before + 0.05


@pytest.fixture(scope="module")
def tokenizer():
    return v2_tokenizer()


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_alt_text_names_every_object_and_the_label(seed, tokenizer):
    for s in range(seed, seed + 4):
        _check_alt_text(s, tokenizer)


def _check_alt_text(seed, tokenizer):
    scene, _ = world.training_scene(seed, 0, world.MAX_OBJECTS)
    text = ct.alt_text(scene, np.random.default_rng(seed))
    phrases = [p.strip() for p in text.rstrip(" .").replace(" and ", " , ").split(" , ")]
    assert len(phrases) == len(scene.objects) + (scene.label is not None)
    for obj in scene.objects:
        hit = [p for p in phrases if f" {obj.colour} {obj.shape} " in f" {p} "
               and any(w in p.split() for w in ct.SIZE_WORDS[obj.size])]
        assert hit, (obj, text)
        row, col = world.ROWS[obj.row], world.COLUMNS[obj.col]
        assert any(f"{row} {col}" in p or ((row, col) == ("middle", "middle") and "center" in p) for p in hit)
    if scene.label is not None:
        assert any(f" {scene.label.lower()} " in f" {p} " and ("label" in p or "card" in p) for p in phrases)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # every caption word is in the model's vocabulary


def test_alt_text_varies():
    scene, _ = world.training_scene(3, 0, world.MAX_OBJECTS)
    assert len({ct.alt_text(scene, np.random.default_rng(s)) for s in range(20)}) > 10


def _tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=128),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=4)
    cfg.vision_config._attn_implementation = "eager"
    return LlavaForConditionalGeneration(cfg).eval()


def test_cls_rows_match_the_towers_own_attention():
    model = _tiny_llava()
    px = torch.randn(2, 3, 336, 336)
    rows = ct.cls_attention_rows(model, px)
    out = model.model.vision_tower(pixel_values=px, output_attentions=True)
    layer = ct.feature_layer_index(model)
    assert layer == 1  # 3 layers: hidden_states[-2] is the output of layer 1
    want = out.attentions[layer].mean(1)[:, 0, 1:]
    torch.testing.assert_close(rows, want, atol=1e-5, rtol=1e-4)


def test_object_ratio_and_recall_on_rows_with_known_answers():
    n = 576
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(2)]
    masks[0][:64] = True  # objects cover 1/9 of the picture
    masks[1][100:164] = True
    uniform = torch.full((2, n), 1.0 / n)
    assert ct.object_attention_ratio(uniform, masks) == pytest.approx(1.0)
    on_objects = torch.stack([m.float() for m in masks])  # all mass on the objects: 9x their area share
    assert ct.object_attention_ratio(on_objects, masks) == pytest.approx(9.0)
    away = torch.stack([(~m).float() for m in masks])
    assert ct.object_attention_ratio(away, masks) == 0.0
    evidence = [list(range(10)), list(range(100, 110))]
    assert ct.topk_recall(on_objects + 1e-3 * torch.rand(2, n), evidence, k=64) == 1.0
    assert ct.topk_recall(away + 1e-3 * torch.rand(2, n), evidence, k=64) == 0.0


def test_retrieval_top1_on_constructed_embeddings():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(10, 16, generator=g)
    assert ct.image_to_text_top1(img, 3 * img) == 1.0  # cosine: the scale does not matter
    swapped = img.clone()
    swapped[[0, 1]] = img[[1, 0]]
    assert ct.image_to_text_top1(img, swapped) == pytest.approx(0.8)


def test_clip_loss_reaches_the_cls_path_and_the_temperature(tokenizer):
    """One contrastive step on a tiny tower: the loss reads the pooled [CLS] (post-layernorm, class embedding)
    and the temperature, and reaches the layers whose patch outputs LLaVA reads."""
    torch.manual_seed(0)
    model = _tiny_llava()
    head = ct.ClipHead(tokenizer, vision_hidden=32)
    px, caps = ct.contrastive_batch(0, 4, seed=5, max_objects=3, label_fonts=False, stroke_labels=0.0,
                                       tinted=0.0)
    assert len(caps) == 4 and px.shape == (4, 3, 336, 336)
    loss, top1 = head.loss(model.model.vision_tower, px, caps)
    assert 0.0 <= top1 <= 1.0 and float(loss.detach()) > 0
    loss.backward()
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    for p in (vm.post_layernorm.weight, vm.embeddings.class_embedding, vm.encoder.layers[0].self_attn.q_proj.weight,
              head.logit_scale, head.visual_projection.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _tiny_checkpoint(tmp_path, tokenizer):
    from training.model import ModelSize, build_model

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, kv_heads=1,
                     intermediate=64)
    model = build_model(size, tokenizer, seed=3)
    path = tmp_path / "start.pt"
    torch.save({"model": model.state_dict(), "size": size.to_dict(), "step": 0, "train_seconds": 0.0, "args": {},
                "phase": "instruct"}, path)
    return path, model.state_dict()


def _clip_phase(tmp_path, tokenizer, steps: int = 2):
    from training.train_llava import parser, train

    start, before = _tiny_checkpoint(tmp_path, tokenizer)
    out = tmp_path / "clip"
    train(parser().parse_args(["--phase", "clip", "--out", str(out), "--init-from", str(start), "--until",
                               str(steps), "--lr", "1e-3", "--warmup", "1", "--tower-lr-scale", "0.5",
                               "--clip-batch", "4", "--log-every", "1", "--seed", "4"]))
    return out / "checkpoint.pt", before


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tokenizer):
    """One short `--phase clip` run, shared by the tests that read its checkpoint."""
    return _clip_phase(tmp_path_factory.mktemp("clip-run"), tokenizer)


def test_clip_phase_trains_the_tower_alone(clip_run):
    """`train_llava --phase clip`: the tower and the contrastive head learn; the decoder, embeddings, LM head
    and projector come out bit for bit as they went in."""
    path, before = clip_run
    ck = torch.load(path, map_location="cpu", weights_only=False)
    assert ck["phase"] == "clip" and ck["step"] == 2 and ck["clip_head"]
    after = ck["model"]
    tower = [k for k in before if "vision_tower." in k]
    rest = [k for k in before if "vision_tower." not in k]
    assert tower and rest
    assert any(not torch.equal(before[k], after[k]) for k in tower)
    for k in rest:
        assert torch.equal(before[k], after[k]), k


def test_retrieval_head_is_found_only_for_the_tower_it_trained(tmp_path, clip_run):
    """An export whose last phase continued from a clip checkpoint with the tower frozen gets that head back
    (and its retrieval is measured); once the tower changed, no head, and the reason says so."""
    from training.train_llava import export

    clip_ckpt, _ = clip_run
    ck = torch.load(clip_ckpt, map_location="cpu", weights_only=False)

    def exported(name, state):
        d = tmp_path / name
        d.mkdir()
        torch.save({"model": state, "size": ck["size"], "step": 3, "train_seconds": 1.0, "phase": "instruct",
                    "args": {"init_from": str(clip_ckpt)}}, d / "checkpoint.pt")
        export(d, tmp_path / f"{name}-export")
        return tmp_path / f"{name}-export", LlavaForConditionalGeneration.from_pretrained(tmp_path / f"{name}-export")

    folder, model = exported("frozen", ck["model"])
    import json

    record = json.loads((folder / "training_state.json").read_text())["tower"]
    assert record["contrastive"] is True and record["in"] == str(clip_ckpt) and record["step"] == 2
    head, where = ct.head_for(folder, model.model.vision_tower)
    assert head is not None and where == str(clip_ckpt)
    torch.testing.assert_close(head.logit_scale.detach(), ck["clip_head"]["logit_scale"])
    moved = dict(ck["model"])
    key = next(k for k in moved if "vision_tower." in k and k.endswith("q_proj.weight"))
    moved[key] = moved[key] + 0.01
    folder, model = exported("moved", moved)
    head, why = ct.head_for(folder, model.model.vision_tower)
    assert head is None and "tower changed" in why
    assert json.loads((folder / "training_state.json").read_text())["tower"] == {"contrastive": False}
    assert ct.head_for(tmp_path, model.model.vision_tower) == (None, "no training_state.json")


def test_a_joint_phase_continues_the_clip_head_and_records_the_towers_history(tmp_path, clip_run):
    """Instruction tuning with the tower trainable and the contrastive term on (`--clip-weight`) starts from the
    clip phase's head when `--clip-head-from` names it (checked at rate 0, where nothing moves: a fresh head has
    other weights); the export records both contrastive phases, and finds the head in the phase's own checkpoint."""
    import json

    from training.train_llava import export, parser, train

    clip_ckpt, _ = clip_run
    out = tmp_path / "joint"
    train(parser().parse_args(["--phase", "instruct", "--out", str(out), "--init-from", str(clip_ckpt),
                               "--until", "1", "--lr", "0", "--warmup", "1", "--batch", "2", "--turns", "2",
                               "--grid-weight", "0", "--tower-lr-scale", "0.5", "--clip-weight", "1",
                               "--clip-batch", "4", "--clip-head-from", str(clip_ckpt), "--seed", "5"]))
    source = torch.load(clip_ckpt, map_location="cpu", weights_only=False)["clip_head"]
    joint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["clip_head"]
    assert joint.keys() == source.keys()
    for k in source:
        assert torch.equal(joint[k], source[k]), k
    export(out, tmp_path / "joint-export")
    record = json.loads((tmp_path / "joint-export" / "training_state.json").read_text())["tower"]
    assert record["in"] == "this phase" and record["args"]["clip_head_from"] == str(clip_ckpt)
    assert record["before"] == {"contrastive": True, "in": "this phase"}
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "joint-export")
    head, where = ct.head_for(tmp_path / "joint-export", model.model.vision_tower)
    assert head is not None and where == str(out / "checkpoint.pt")


def test_per_patch_heads_start_from_a_checkpoints_heads_when_asked(tmp_path, tokenizer):
    """`--patch-weight` with `--patch-heads-from`: the per-patch heads start as the named checkpoint's (at rate 0
    nothing moves, so the saved heads are exactly those), not fresh ones; a checkpoint without heads is refused."""
    from training.model import ModelSize, build_model
    from training.parts import PatchHeads
    from training.train_llava import parser, train

    start, _ = _tiny_checkpoint(tmp_path, tokenizer)
    ck = torch.load(start, map_location="cpu", weights_only=False)
    heads = PatchHeads(build_model(ModelSize(**ck["size"]), tokenizer, seed=3), ck["size"]["vision_hidden"],
                       balanced=True)
    torch.manual_seed(8)
    for p in heads.parameters():
        p.data.normal_()
    source = tmp_path / "with-heads.pt"
    torch.save(ck | {"patch_heads": heads.state_dict()}, source)

    def run(out, heads_from):
        train(parser().parse_args(["--phase", "instruct", "--out", str(out), "--init-from", str(start), "--until",
                                   "1", "--lr", "0", "--warmup", "1", "--batch", "2", "--turns", "2", "--grid-weight",
                                   "0", "--tower-lr-scale", "0.5", "--patch-weight", "0.5", "--patch-heads-from",
                                   str(heads_from), "--seed", "5"]))
        return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["patch_heads"]

    saved = run(tmp_path / "run", source)
    for k, v in heads.state_dict().items():
        assert torch.equal(saved[k], v), k
    with pytest.raises(SystemExit, match="holds no patch_heads"):
        run(tmp_path / "refused", start)


def test_likeness_tower_rows_say_n_a_for_a_summary_without_them():
    from training.likeness import TOWER_ROWS, tower_rows

    assert tower_rows({}) == [(m, "n/a") for m in TOWER_ROWS]
    s = {"tower": {"cls": {"cls_object_attention_vs_area": 1.25, "cls_top64_evidence_recall": 0.2,
                           "random_top64_evidence_recall": 0.111},
                   "decoder": {"layer1": {"positional_shift_spearman": 0.1, "top1pct_share": 0.03},
                               "layer2": {"positional_shift_spearman": -0.2, "top1pct_share": 0.2}},
                   "retrieval": {"unavailable": "no training_state.json"}}}
    vals = [v for _, v in tower_rows(s)]
    assert vals[0].startswith("1.25") and "random 0.111" in vals[1] and "no training_state.json" in vals[2]
    assert vals[3] == "+0.10 / 0.030" and vals[4] == "-0.20 / 0.200"
