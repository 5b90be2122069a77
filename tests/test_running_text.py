"""Running-text documents for the decoder's language training (train_llava --running-scenes, --text-docs)."""

from __future__ import annotations

import torch

from sparsevlm.scenes import world
from training.model import ModelSize, build_model, v2_tokenizer
from training.train_llava import Conversations, parser, running_document, train


def test_a_document_is_consecutive_text_with_every_token_a_target():
    tok = v2_tokenizer()
    conv = Conversations(tok)
    parts = running_document(11, 3, 2, 8)
    ids, pos, labels, fams, weights, groups = conv.running(parts, lm_weight=0.5)
    assert pos == list(range(len(ids)))  # consecutive positions from 0: no picture span
    assert tok.convert_tokens_to_ids("<image>") not in ids
    assert labels[:-1] == ids[1:] and labels[-1] == -100  # every next token is a target

    def at(sub, start=0):
        return next(i for i in range(start, len(ids)) if ids[i:i + len(sub)] == sub)

    cursor = 0
    for scene, turns in parts:  # each scene's description, then its own questions, in order
        cursor = at(conv.ids(world.describe(scene)), cursor)
        for q, a, _ in turns:
            cursor = at(conv.ids(f"{q} ASSISTANT: {a}"), cursor)
    answers = [i for i, f in enumerate(fams) if f >= 0]
    assert len(answers) == sum(len(a.split()) + 1 for _, turns in parts for _, a, _ in turns)
    assert all(weights[i] == 1.0 for i in answers)
    assert {weights[i] for i in range(len(ids) - 1) if fams[i] < 0} == {0.5}
    assert all(len(g) == 1 for g in groups) and conv.last_refs == {} and conv.last_where == {}
    again = running_document(11, 3, 2, 8)  # a pure function of its seed
    assert [(world.describe(sc), t) for sc, t in again] == [(world.describe(sc), t) for sc, t in parts]


def _start(tmp_path):
    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=4, heads=2, kv_heads=1,
                     intermediate=64)
    before = build_model(size, v2_tokenizer(), seed=3).state_dict()
    start = tmp_path / "start.pt"
    torch.save({"model": before, "size": size.to_dict(), "step": 0, "train_seconds": 0.0, "args": {},
                "phase": "instruct"}, start)
    return before, start


def test_the_text_phase_learns_on_running_documents(tmp_path):
    before, start = _start(tmp_path)
    out = tmp_path / "text"
    train(parser().parse_args(["--phase", "text", "--out", str(out), "--init-from", str(start), "--until", "2",
                               "--batch", "2", "--running-scenes", "2", "--running-turns", "2", "--lm-weight", "1",
                               "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--seed", "5"]))
    after = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    lm = [k for k in before if "language_model.layers.0." in k]
    assert any(not torch.equal(before[k], after[k]) for k in lm)
    proj = [k for k in before if "multi_modal_projector" in k]
    assert proj and all(torch.equal(before[k], after[k]) for k in proj)  # a text phase: no projector


def test_instruction_tuning_takes_running_documents_beside_the_pictures(tmp_path):
    import json

    _, start = _start(tmp_path)
    out = tmp_path / "mix"
    train(parser().parse_args(["--phase", "instruct", "--out", str(out), "--init-from", str(start), "--until", "1",
                               "--batch", "1", "--turns", "2", "--text-docs", "1", "--running-scenes", "2",
                               "--lr", "1e-3", "--warmup", "1", "--grid-weight", "0", "--log-every", "1",
                               "--seed", "5"]))
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert any(k.startswith("text_") for k in rec["train_acc"])  # the documents' answers were scored
    assert any(not k.startswith("text_") for k in rec["train_acc"])  # and the pictures' too
