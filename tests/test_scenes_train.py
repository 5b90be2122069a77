"""The training script's pieces: background-token dropping, growing the decoder, the auxiliary heads, the schedules."""

from __future__ import annotations

import pytest
import torch

from sparsevlm.scenes.generator import FAMILIES, Sample, covered_patches, make_scene, training_scene
from training.model import ModelSize, build_model, scenes_tokenizer
from training.parts import (
    N_VISUAL,
    REFERENT_WORDS,
    Batcher,
    GridHeads,
    ReferentHead,
    WhereHead,
    background_keep_at,
    decoder_logits,
    grow_decoder,
    grown_positions,
    kept_rows,
    learning_rate,
    max_objects_at,
    referent_vector,
    where_targets,
)

WEIGHTS = {f: 1.0 for f in FAMILIES}


@pytest.fixture(scope="module")
def tok():
    return scenes_tokenizer()


@pytest.fixture(scope="module")
def small(tok):
    return build_model(ModelSize(layers=2, hidden=64, intermediate=128, vision_layers=2), tok, seed=3).eval()


def test_keeping_every_visual_token_is_the_plain_llava_forward(tok, small):
    b = Batcher(tok, 3)
    ids, _, px, labels, fams, _, keep = b.batch([11, 12], 6, WEIGHTS, background_keep=1.0)
    assert keep.all()
    with torch.no_grad():
        ref = small(input_ids=ids, pixel_values=px).logits
        got, lab, fam = decoder_logits(small, ids, px, keep, labels, fams, b.pad)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(lab, labels) and torch.equal(fam, fams)


def test_dropping_keeps_every_object_token_and_every_answer(tok, small):
    b = Batcher(tok, 4)
    seeds = [21, 22, 23]
    ids, _, px, labels, fams, _, keep = b.batch(seeds, 12, WEIGHTS, background_keep=0.1)
    for row, seed in zip(keep, seeds):
        scene, _ = training_scene(seed, 4, 12, WEIGHTS)
        items = list(range(len(scene.objects))) + ([-1] if scene.label is not None else [])
        fg = covered_patches(scene, items)
        assert row[fg].all()  # every token an object touches stays
        assert row.sum() < len(fg) + 0.3 * (N_VISUAL - len(fg))  # most background goes
    with torch.no_grad():
        logits, lab, fam = decoder_logits(small, ids, px, keep, labels, fams, b.pad)
    assert logits.shape[1] < ids.shape[1]
    # The supervised answers survive in order; the same answers, same families.
    for b_ in range(len(seeds)):
        assert lab[b_][lab[b_] != -100].tolist() == labels[b_][labels[b_] != -100].tolist()
        assert fam[b_][fam[b_] != -1].tolist() == fams[b_][fams[b_] != -1].tolist()


def test_dropped_tokens_change_what_the_answer_sees(tok, small):
    """Dropping tokens is a real change of the input (the test above is not vacuous)."""
    b = Batcher(tok, 2)
    ids, _, px, labels, fams, _, keep = b.batch([31], 12, WEIGHTS, background_keep=0.0)
    with torch.no_grad():
        full, lab_f, _ = decoder_logits(small, ids, px, torch.ones_like(keep), labels, fams, b.pad)
        part, lab_p, _ = decoder_logits(small, ids, px, keep, labels, fams, b.pad)
    a_full = full[0, :-1][lab_f[0, 1:] != -100]
    a_part = part[0, :-1][lab_p[0, 1:] != -100]
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
    b = Batcher(tok, 2)
    ids, _, px, *_ = b.batch([41], 4, WEIGHTS)
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


def test_learning_rate_warms_up_then_decays_over_the_invocation():
    assert learning_rate(0, 1e-3, 10) == pytest.approx(1e-4)
    assert learning_rate(500, 1e-3, 10) == pytest.approx(1e-3)
    # resumed at step 100 for 11 steps, decaying to 1e-4: full rate at 100, end rate at 110
    assert learning_rate(100, 1e-3, 10, start=100, steps=11, end=1e-4) == pytest.approx(1e-3)
    assert learning_rate(105, 1e-3, 10, start=100, steps=11, end=1e-4) == pytest.approx(5.5e-4)
    assert learning_rate(110, 1e-3, 10, start=100, steps=11, end=1e-4) == pytest.approx(1e-4)


def test_schedules():
    assert background_keep_at(0, 0.05, 100) == pytest.approx(0.05)
    assert background_keep_at(50, 0.05, 100) == pytest.approx(0.525)
    assert background_keep_at(100, 0.05, 100) == 1.0
    assert background_keep_at(10_000, 0.05, 100) == 1.0
    assert background_keep_at(0, 1.0, 100) == 1.0
    assert max_objects_at(0, 1, 40) == 1
    assert max_objects_at(10_000, 1, 40) == 12


def test_referent_words_come_from_the_question_text():
    v = dict(zip(REFERENT_WORDS, referent_vector("is the small red circle left of the blue square ?"), strict=True))
    assert {w for w, x in v.items() if x} == {"small", "red", "circle", "blue", "square"}
    v = dict(zip(REFERENT_WORDS, referent_vector("how many crosses are there ?"), strict=True))
    assert {w for w, x in v.items() if x} == {"crosses"}


def test_referent_head_reads_the_position_that_predicts_the_answer(tok, small):
    """Through background dropping, the head reads the hidden state of the token right before each answer."""
    b = Batcher(tok, 3)
    ids, _, px, labels, fams, _, keep = b.batch([51, 52], 12, WEIGHTS, background_keep=0.1)
    refs, ref_mask = b.last_refs
    rows = kept_rows(ids, keep, small.config.image_token_id)
    head = ReferentHead(small, 64, layer=1)
    with torch.no_grad():
        decoder_logits(small, ids, px, keep, labels, fams, b.pad)
    assert head.hidden is not None
    loss = head.loss(refs, ref_mask, rows)
    assert torch.isfinite(loss)
    for bi, t in zip(*ref_mask.nonzero(as_tuple=True), strict=True):
        assert labels[bi, t + 1] != -100 and labels[bi, t] == -100  # the next token is the answer word
        short = int(torch.searchsorted(rows[bi], t))
        assert rows[bi][short] == t and ids[bi, rows[bi][short]] == ids[bi, t]


def test_where_targets_are_the_named_objects_slots_in_question_order():
    scene = make_scene(7, 6, with_label=False)
    a, b = scene.objects[0], scene.objects[3]
    rel = Sample(f"is the {b.name} above the {a.name} ?", "no", "relation", [])
    assert where_targets(scene, rel) == [b.slot_row, b.slot_col, a.slot_row, a.slot_col]
    pos = Sample(f"which column is the {a.name} in ?", "left", "position", [])
    assert where_targets(scene, pos) == [a.slot_row, a.slot_col, -100, -100]
    assert where_targets(scene, Sample(f"is there a {a.name} ?", "yes", "exist", [])) == [-100] * 4


def test_where_head_supervises_only_position_and_relation_answers(tok, small):
    b = Batcher(tok, 6)
    weights = {**WEIGHTS, "position": 3.0, "relation": 3.0}
    ids, _, px, labels, fams, _, keep = b.batch([61, 62, 63], 12, weights, background_keep=0.2)
    where, (_, ref_mask) = b.last_where, b.last_refs
    marked = where[..., 0] != -100
    assert marked.any() and (marked <= ref_mask).all()  # only at positions that predict an answer
    for bi, t in zip(*marked.nonzero(as_tuple=True), strict=True):
        assert FAMILIES[int(fams[bi, t + 1])] in ("position", "relation")
        assert ((where[bi, t] >= 0) & (where[bi, t] < 6) | (where[bi, t] == -100)).all()
    rel = fams == FAMILIES.index("relation")
    for bi, t in zip(*ref_mask.nonzero(as_tuple=True), strict=True):
        assert bool(rel[bi, t + 1]) == bool(where[bi, t, 2] != -100)  # a second object exactly for relation
    head = WhereHead(small, 64, layer=1)
    with torch.no_grad():
        decoder_logits(small, ids, px, keep, labels, fams, b.pad)
    loss = head.loss(where, kept_rows(ids, keep, small.config.image_token_id))
    assert torch.isfinite(loss) and loss > 0


def test_grid_heads_read_the_visual_tokens_the_decoder_gets_with_their_own_cells(tok, small):
    b = Batcher(tok, 2)
    ids, _, px, labels, fams, _, keep = b.batch([71, 72], 12, WEIGHTS)
    heads = GridHeads(small, 64)
    with torch.no_grad():
        decoder_logits(small, ids, px, keep, labels, fams, b.pad)
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
