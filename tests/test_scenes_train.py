"""The trainer's shared pieces (training/parts.py) on real training batches of the v2 world: background-token
dropping, growing the decoder, the auxiliary heads on the decoder and on the projector, the schedules."""

from __future__ import annotations

import pytest
import torch

from sparsevlm.scenes import world
from sparsevlm.scenes.world import FAMILIES
from training.model import ModelSize, build_model
from training.parts import (
    N_VISUAL,
    GridHeads,
    WhereHead,
    background_keep_at,
    decoder_logits,
    grow_decoder,
    grown_positions,
    kept_rows,
)
from training.train_llava import Conversations, ReferentProbe, family_weights, parser, prepared_step, v2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return v2_tokenizer()


@pytest.fixture(scope="module")
def small(tok):
    return build_model(ModelSize(layers=2, hidden=64, intermediate=128, vision_layers=2), tok, seed=3).eval()


def batch(tok, seed: int, size: int, background_keep: float = 1.0, weights: str = "") -> dict:
    """One instruction-tuning step as the trainer draws it (`prepared_step`): 12 objects at most, 6 turns."""
    args = parser().parse_args(["--out", "unused", "--phase", "instruct", "--seed", str(seed), "--batch", str(size),
                                "--turns", "6", "--curriculum-start", "12", "--background-keep-start",
                                str(background_keep), "--background-full-at", "1000"])
    step = prepared_step(args, Conversations(tok), 0, family_weights(weights))
    ids, _, labels, fams, _, _, _, ref_mask, where = step["batch"]
    return {"ids": ids, "px": step["pixels"], "labels": labels, "fams": fams, "keep": step["keep"],
            "scenes": step["scenes"], "ref_mask": ref_mask, "where": where, "pad": tok.pad_token_id}


def forward(model, b: dict, keep=None):
    return decoder_logits(model, b["ids"], b["px"], b["keep"] if keep is None else keep, b["labels"], b["fams"],
                          b["pad"])


def test_keeping_every_visual_token_is_the_plain_llava_forward(tok, small):
    b = batch(tok, 1, 2)
    assert b["keep"].all()
    with torch.no_grad():
        ref = small(input_ids=b["ids"], pixel_values=b["px"]).logits
        got, lab, fam = forward(small, b)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(lab, b["labels"]) and torch.equal(fam, b["fams"])


def test_dropping_keeps_every_object_token_and_every_answer(tok, small):
    b = batch(tok, 2, 3, background_keep=0.1)
    for row, scene in zip(b["keep"], b["scenes"], strict=True):
        fg = world.covered_patches(scene, world.items(scene))
        assert row[fg].all()  # every token an object or the label touches stays
        assert row.sum() < len(fg) + 0.3 * (N_VISUAL - len(fg))  # most background goes
    with torch.no_grad():
        logits, lab, fam = forward(small, b)
    assert logits.shape[1] < b["ids"].shape[1]
    # The supervised answers survive in order: the same answer tokens, the same families (a language-modelling
    # target at a dropped visual token's position goes with it; answers sit in the text).
    labels, fams = b["labels"], b["fams"]
    for k in range(len(b["scenes"])):
        assert (fams[k] != -1).sum() > 0
        assert lab[k][fam[k] != -1].tolist() == labels[k][fams[k] != -1].tolist()
        assert fam[k][fam[k] != -1].tolist() == fams[k][fams[k] != -1].tolist()


def test_dropped_tokens_change_what_the_answer_sees(tok, small):
    """Dropping tokens is a real change of the input (the test above is not vacuous)."""
    b = batch(tok, 3, 1, background_keep=0.0)
    with torch.no_grad():
        full, _, fam_f = forward(small, b, torch.ones_like(b["keep"]))
        part, _, fam_p = forward(small, b)
    a_full = full[0][fam_f[0] != -1]  # the logits that predict answer tokens (targets at the same index)
    a_part = part[0][fam_p[0] != -1]
    assert a_full.shape == a_part.shape
    assert not torch.allclose(a_full, a_part, atol=1e-4)


def test_grown_decoder_computes_exactly_what_the_shallow_one_did(tok):
    shallow = build_model(ModelSize(layers=4, hidden=64, intermediate=128, vision_layers=2), tok, seed=4).eval()
    state = shallow.state_dict()
    size = ModelSize(layers=32, hidden=64, intermediate=128, vision_layers=2)
    fresh = build_model(size, tok, seed=9).state_dict()
    grown_state = grow_decoder(state, 4, 32, fresh)
    grown = build_model(size, tok).eval()
    grown.load_state_dict(grown_state)  # strict: every key present, no extra
    b = batch(tok, 4, 1)
    ids, px = b["ids"], b["px"]
    with torch.no_grad():
        a = shallow(input_ids=ids, pixel_values=px).logits
        g = grown(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(a, g, atol=1e-5)
    # ... and the new layers are real layers: fresh attention, zero output only on the residual branch.
    p = "model.language_model.layers."
    new = [j for j in range(32) if j not in grown_positions(4, 32)]
    q = f"{p}{new[0]}.self_attn.q_proj.weight"
    assert torch.equal(grown_state[q], fresh[q])
    assert not grown_state[f"{p}{new[0]}.self_attn.o_proj.weight"].any()


def test_grown_positions_hold_the_layers_pruning_reads():
    pos = grown_positions(8, 32)
    assert len(pos) == 8 and pos == sorted(set(pos)) and pos[0] == 0 and pos[-1] < 32
    assert {2, 6, 15} <= set(pos)
    with pytest.raises(ValueError):
        grown_positions(2, 32)  # too few to cover layers 0, 2, 6 and 15


def test_schedules():
    assert background_keep_at(0, 0.05, 100) == pytest.approx(0.05)
    assert background_keep_at(50, 0.05, 100) == pytest.approx(0.525)
    assert background_keep_at(100, 0.05, 100) == 1.0
    assert background_keep_at(10_000, 0.05, 100) == 1.0
    assert background_keep_at(0, 1.0, 100) == 1.0


def test_referent_probe_reads_the_position_that_predicts_the_answer(tok, small):
    """Through background dropping, the probe reads the hidden state of the token right before each answer."""
    b = batch(tok, 5, 2, background_keep=0.1)
    ids, labels, ref_mask = b["ids"], b["labels"], b["ref_mask"]
    rows = kept_rows(ids, b["keep"], small.config.image_token_id)
    probe = ReferentProbe(small, 64, layer=1)
    with torch.no_grad():
        forward(small, b)
    assert probe.hidden is not None and ref_mask.any()
    for bi, t in zip(*ref_mask.nonzero(as_tuple=True), strict=True):
        assert labels[bi, t] != -100 and FAMILIES[int(b["fams"][bi, t])]  # this position predicts an answer word
        short = int(torch.searchsorted(rows[bi], t))
        assert rows[bi][short] == t and ids[bi, rows[bi][short]] == ids[bi, t]


def test_where_head_supervises_only_position_and_relation_answers(tok, small):
    b = batch(tok, 6, 3, background_keep=0.2, weights="position=3,relation=3")
    where, ref_mask, fams = b["where"][..., :4], b["ref_mask"], b["fams"]
    marked = where[..., 0] != -100
    assert marked.any() and (marked <= ref_mask).all()  # only at positions that predict an answer
    for bi, t in zip(*marked.nonzero(as_tuple=True), strict=True):
        assert FAMILIES[int(fams[bi, t])] in ("position", "relation")
        assert ((where[bi, t] >= 0) & (where[bi, t] < 6) | (where[bi, t] == -100)).all()
    head = WhereHead(small, 64, layer=1)
    with torch.no_grad():
        forward(small, b)
    loss = head.loss(where, kept_rows(b["ids"], b["keep"], small.config.image_token_id))
    assert torch.isfinite(loss) and loss > 0


def test_grid_heads_read_the_visual_tokens_the_decoder_gets_with_their_own_cells(tok, small):
    b = batch(tok, 7, 2)
    px = b["px"]
    heads = GridHeads(small, 64)
    with torch.no_grad():
        forward(small, b)
        feats = heads.features
        expected = small.model.get_image_features(
            pixel_values=px,
            vision_feature_layer=small.config.vision_feature_layer,
            vision_feature_select_strategy=small.config.vision_feature_select_strategy,
        ).pooler_output
        assert torch.equal(feats, torch.stack(list(expected)))
        # a head that reads a token's own cell perfectly gets (near) zero loss: the targets are the cells
        heads.features = torch.eye(N_VISUAL)[None].repeat(2, 1, 1) * 50
        for k, head in enumerate(heads.heads):
            head.weight = torch.nn.Parameter(torch.zeros(24, N_VISUAL))
            head.bias = torch.nn.Parameter(torch.zeros(24))
            cell = torch.arange(N_VISUAL)
            head.weight[(cell // 24) if k == 0 else (cell % 24), cell] = 1.0
        assert heads.loss() < 1e-6


def test_the_first_phase_takes_its_tower_from_the_installed_model_by_default():
    """`--vision-from`'s default names a folder that exists (the installed embedded model), wherever the trainer
    module lives in the tree."""
    from pathlib import Path

    args = parser().parse_args(["--out", "unused"])
    assert (Path(args.vision_from) / "model.safetensors").is_file()
    assert Path(args.vision_from) == Path(__file__).resolve().parents[1] / "assets" / "models" / "scenes-llava"
