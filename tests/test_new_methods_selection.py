"""Selection rules and count policies of the five newer methods, on constructed tensors whose right
answer is known by construction, plus the published count tables and budget scaling."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevlm.errors import ConfigError
from sparsevlm.methods import dart, divprune, pyramiddrop, sparsevlm_v2, visionzip
from sparsevlm.schedule import layer_counts, measure, scaled_layers

METHOD_MODULES = (sparsevlm_v2, visionzip, divprune, pyramiddrop, dart)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# --- DivPrune ---------------------------------------------------------------------------------------------------
def test_divprune_farthest_first_order_on_known_angles():
    # Directions at 0, 10, 90, 180, 185, 270 degrees (scaled: cosine ignores magnitude).
    # Nearest-neighbour angles: 10, 10, 80, 5, 5, 85 -> start at 270 (index 5); then 90 (180 away);
    # then 0 and 180 tie at 90 degrees -> first index (0); then 180 (90 from 270 and 90).
    pts = torch.tensor([[1.0, 0.0], unit(10), [0.0, 3.0], [-2.0, 0.0], unit(185), [0.0, -0.5]])
    sel = divprune.select(pts, 4)
    assert sel.extras["order"] == [5, 2, 0, 3]
    assert sel.kept.tolist() == [0, 2, 3, 5]
    assert sel.extras["gap"][1] == pytest.approx(2.0, abs=1e-6)  # 1 - cos(180)
    assert sel.extras["gap"][2] == pytest.approx(1.0, abs=1e-6)
    nn = sel.scores
    assert nn[5] == pytest.approx(1 - math.cos(math.radians(85)), abs=1e-5)
    assert nn[3] == pytest.approx(1 - math.cos(math.radians(5)), abs=1e-5)


def brute_force_maxmin(x: torch.Tensor, n: int) -> list[int]:
    xn = x / x.norm(dim=-1, keepdim=True)
    d = [[1.0 - float(xn[i] @ xn[j]) for j in range(len(x))] for i in range(len(x))]
    nearest = [sorted(d[i][j] for i in range(len(x)))[1] for j in range(len(x))]
    order = [max(range(len(x)), key=lambda j: (nearest[j], -j))]
    while len(order) < n:
        rest = [j for j in range(len(x)) if j not in order]
        order.append(max(rest, key=lambda j: (min(d[u][j] for u in order), -j)))
    return order


def test_divprune_matches_brute_force_greedy_on_random_features():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64).float()
    sel = divprune.select(x, 12)
    assert sel.extras["order"] == brute_force_maxmin(x.double(), 12)
    gaps = sel.extras["gap"][1:]
    assert all(a >= b - 1e-6 for a, b in zip(gaps, gaps[1:]))  # the max-min distance only shrinks


def test_divprune_counts():
    assert divprune.count_for_ratio(divprune.DEFAULT_RATIO) == 56
    for b in (192, 128, 96, 64):
        p = divprune.plan(b)
        assert p.layers == (-1,) and p.totals == (b,)
        assert p.equal_tokens_input == p.equal_tokens_output == b


# --- VisionZip --------------------------------------------------------------------------------------------------
def test_visionzip_dominant_by_cls_attention_sum_and_contextual_merge():
    n, heads = 12, 2
    cls_row = torch.full((heads, n + 1), 0.01)
    cls_row[0, 1 + 3] = 0.5  # patch 3: strong in one head
    cls_row[1, 1 + 7] = 0.3
    cls_row[0, 1 + 7] = 0.3  # patch 7: 0.6 summed over heads, 0.3 at most in any head
    cls_row[1, 1 + 9] = 0.55  # patch 9: 0.56 summed
    scores = visionzip.cls_attention(cls_row)
    assert torch.allclose(scores, cls_row[:, 1:].sum(0))
    # Remaining tokens after [CLS] + 2 dominant (7, 9 -> tokens 8, 10): tokens 1..7, 9, 11, 12 (10 of them);
    # C = 2 -> step 5 -> targets Rm[0] = token 1 (patch 0) and Rm[5] = token 6 (patch 5).
    metric = torch.zeros(n + 1, 3)
    metric[0] = torch.tensor([0.0, 0.0, 1.0])
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    near_e1 = {1, 2, 4, 9}  # tokens whose keys are near-duplicates of target token 1
    for t in range(1, n + 1):
        metric[t] = e1 + 0.05 * e2 if t in near_e1 else e2 + 0.05 * e1
    metric[1], metric[6] = e1 * 2.0, e2 * 0.5  # targets (magnitudes differ: cosine)
    hidden = torch.arange((n + 1) * 4, dtype=torch.float32).reshape(n + 1, 4) ** 1.5
    res = visionzip.select(scores, metric, hidden, dominant=3, contextual=2)
    sel = res.selection
    assert sel.kept.tolist() == [7, 9]
    groups = dict(sel.groups)
    assert groups == {0: [1, 3, 8], 5: [2, 4, 6, 10, 11]}
    assert res.features.shape == (5, 4)
    assert torch.equal(res.features[0], hidden[0])  # [CLS] first
    assert torch.equal(res.features[1:3], hidden[[8, 10]])  # dominant patches in raster order
    # contextual token = target + mean(members), not a mean that includes the target
    assert torch.allclose(res.features[3], hidden[1] + hidden[[2, 4, 9]].mean(0))
    assert torch.allclose(res.features[4], hidden[6] + hidden[[3, 5, 7, 11, 12]].mean(0))
    assert sel.extras["slot_patches"][0] == [-1] and sel.extras["slot_patches"][3] == [0, 1, 3, 8]


def test_visionzip_target_without_members_is_the_target_and_head_mean_keys():
    n = 6
    scores = torch.arange(n, dtype=torch.float32)
    hidden = torch.randn(n + 1, 3)
    metric = torch.eye(n + 1)
    res = visionzip.select(scores, metric, hidden, dominant=1, contextual=n)  # [CLS] only; every patch a target
    assert res.selection.kept.numel() == 0
    assert torch.allclose(res.features[1:], hidden[1:])
    keys = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)
    assert torch.allclose(visionzip.head_mean_keys(keys, 3), keys.reshape(2, 3, 2).mean(1))


def test_visionzip_counts_and_cls_requirement():
    assert [visionzip.split(b) for b in (64, 128, 192, 96)] == [(54, 10), (108, 20), (162, 30), (81, 15)]
    for b in (192, 128, 96, 64, 7):
        d, c = visionzip.split(b)
        assert d + c == b and d >= 1
        p = visionzip.plan(b, visual=729, depth=22)
        assert p.equal_tokens_input == p.equal_tokens_output == b
    with pytest.raises(ConfigError, match="no \\[CLS\\]"):
        visionzip.require_cls(False, "SigLIP")


# --- PyramidDrop ------------------------------------------------------------------------------------------------
def test_pyramiddrop_ranks_by_last_token_row_head_mean():
    s, v, text = 2, 8, 3
    n = s + v + text
    planted = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.0, 3.0, 0.2, 1.0])  # per visual token logit
    hd, scaling = 2, 0.5
    keys = torch.zeros(1, n, hd)  # one KV head shared by two query heads (GQA)
    keys[0, s:s + v, 0] = planted / scaling
    keys[0, s:s + v, 1] = -planted / scaling  # the second head sees the reversed ranking
    q = torch.tensor([[1.0, 0.0], [0.0, 0.25]])  # head 1 weighs the reversed logits 4x less
    scores = pyramiddrop.last_token_scores(q, keys, s, v, scaling)
    logits = torch.stack([keys[0, :, 0] * scaling, keys[0, :, 1] * scaling * 0.25])
    expected = torch.softmax(logits, dim=-1).mean(0)[s:s + v]  # softmax over ALL keys, then visual columns
    assert torch.allclose(scores, expected, atol=1e-6)
    sel = pyramiddrop.select(scores, 3)
    assert sel.kept.tolist() == [1, 3, 5]


def test_pyramiddrop_published_tables():
    off = pyramiddrop.official_plan()
    assert off.layers == (7, 15, 23) and off.totals == (288, 144, 72) and off.equal_tokens_input == 270
    table = {64: (110, 21, 4), 128: (242, 102, 42), 192: (322, 180, 101)}  # derived, not shipped
    for b, counts in table.items():
        p = pyramiddrop.plan(b)
        assert p.layers == (1, 7, 15) and p.totals == counts
        assert p.equal_tokens_input == (2 * 576 + 6 * counts[0] + 8 * counts[1] + 16 * counts[2]) / 32
        assert b - 1 < p.equal_tokens_input <= b


# --- DART -------------------------------------------------------------------------------------------------------
def test_dart_pivots_drop_their_duplicates():
    s, v, text = 3, 8, 4
    n = s + v + text
    e = torch.eye(5)
    hidden = torch.zeros(n, 5)
    hidden[:s] = e[4]
    img = [e[0], e[0] * 2 + 0.01 * e[1], e[0] + 0.02 * e[2], e[0] * 0.5 + 0.01 * e[3],  # pivot + 3 duplicates
           -e[0], e[1] - 0.1 * e[0], e[2] - 0.05 * e[0], e[1] + e[2]]
    for j, h in enumerate(img):
        hidden[s + j] = h
    hidden[s + v:] = e[3]
    hidden[s + v + 2] = e[0] * 3  # the text pivot is a duplicate of the image pivot too
    norms = torch.ones(n)
    norms[s + 0] = 10.0  # image pivot: local 0
    norms[s + v + 2] = 9.0  # text pivot
    sel = dart.select(norms, hidden, s, v, picks=4, pivot_image=1, pivot_text=1)
    assert sel.extras["image_pivots"] == [s] and sel.extras["text_pivots"] == [s + v + 2]
    assert sel.extras["order"] == list({s, s + v + 2})
    # each pivot claims its 2 LEAST similar tokens, greedily: (-e0, e1-0.1e0), then (e2-0.05e0, e1+e2)
    assert sel.kept.tolist() == [0, 4, 5, 6, 7]
    claims = sel.extras["claims"]
    first, second = sel.extras["order"]  # greedy: whichever pivot comes first takes the two least similar
    assert sorted(claims[first]) == [4, 5] and sorted(claims[second]) == [6, 7]
    assert sel.groups == [(0, claims[s])]


def test_dart_key_norm_and_counts():
    keys = torch.tensor([[[1.0, -2.0], [0.5, 0.5]], [[-3.0, 0.0], [0.0, 1.0]]])  # (Hkv=2, n=2, hd=2)
    assert dart.key_norms(keys).tolist() == [6.0, 2.0]
    table = {192: 196, 128: 132, 96: 100, 64: 68}  # 4 image pivots + 8 * (B // 8)
    for b, kept in table.items():
        p = dart.plan(b)
        assert p.layers == (1,) and p.totals == (kept,) and p.budget_counting == "retained"
        assert p.equal_tokens_input == (2 * 576 + 30 * kept) / 32
    assert dart.token_topk(100) == 12


def test_dart_uneven_picks_spread_over_pivots():
    torch.manual_seed(0)
    s, v = 1, 30
    hidden = torch.randn(s + v + 6, 8)
    norms = torch.rand(s + v + 6)
    sel = dart.select(norms, hidden, s, v, picks=11)  # 8 pivots: 3 take 2, 5 take 1
    sizes = [len(sel.extras["claims"][p]) for p in sel.extras["order"]]
    assert sizes == [2, 2, 2, 1, 1, 1, 1, 1]
    assert sel.kept.numel() == 4 + 11 and sel.kept.unique().numel() == 15


# --- SparseVLM v2 -----------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def test_gravity_prior_equals_rotated_ones_dot_product():
    hd, base = 16, 10000.0
    pos = torch.tensor([0, 3, 7, 40, 41, 300], dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = pos[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    ones = torch.ones(len(pos), hd, dtype=torch.float64)
    rot = ones * emb.cos() + rotate_half(ones) * emb.sin()  # HF apply_rotary_pos_emb on all-ones q/k
    expected = rot @ rot.T / math.sqrt(hd)
    assert torch.allclose(sparsevlm_v2.gravity_prior(pos, pos, hd, base).double(), expected, atol=1e-4)
    g = sparsevlm_v2.gravity_prior(torch.tensor([0.0]), torch.arange(0, 1707.0), 128)[0]
    assert g[0] == pytest.approx(math.sqrt(128), rel=1e-5)  # 11.31
    assert bool((g > 0).all()) and int(g[:701].argmin()) == 625
    assert float(g[:701].min()) == pytest.approx(1.19, abs=0.01)


def test_sparsevlm_v2_gravity_correction_and_priority_heads():
    # Raw attention = prior x planted weight: the correction must recover the planted ranking, while the raw
    # scores favour the visual tokens nearest the raters (RoPE's decay).
    heads, s, v, hd = 4, 2, 10, 128
    # v2 keeps original position ids: after an earlier prune the survivors are far apart (2..6, then 390..394)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 390, 391, 392, 393, 394, 398, 399], dtype=torch.float32)
    rows = pos[12:]
    prior = sparsevlm_v2.gravity_prior(rows, pos, hd)
    assert float(prior[0, 2]) < 0.5 * float(prior[0, 11])  # far from the raters: a much smaller prior
    w_a = torch.tensor([2.0, 1.8, 1, 1, 1, 1, 1, 1, 1, 1])  # heads 0, 1: the far tokens 0 and 1 matter most
    w_b = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 3.0, 3.0])
    attn = torch.full((heads, 2, len(pos)), 0.01)
    for h, (w, scale) in enumerate([(w_a, 1.0), (w_a, 0.9), (w_b, 0.2), (w_b, 0.1)]):
        attn[h, :, s:s + v] = prior[:, s:s + v] * w * scale
    sel = sparsevlm_v2.select(attn, rows, pos, s, v, keep=2, head_dim=hd, n_heads=2)
    assert sorted(sel.extras["heads"].tolist()) == [0, 1]
    assert sel.kept.tolist() == [0, 1]
    assert torch.allclose(sel.scores, w_a * 0.95, atol=1e-5)
    raw_top = torch.topk(sel.extras["raw_scores"], 2).indices.sort().values.tolist()
    assert raw_top != [0, 1]  # without the correction the near tokens win
    assert sparsevlm_v2.select(attn, rows, pos, s, v, keep=50, head_dim=hd).kept.numel() == v - 1


def test_sparsevlm_v2_attention_rows_per_head_matches_full_softmax():
    torch.manual_seed(1)
    h, hkv, n, hd = 4, 2, 9, 8
    q, k = torch.randn(h, n, hd), torch.randn(hkv, n, hd)
    full = torch.einsum("hnd,hmd->hnm", q, k.repeat_interleave(2, dim=0)) / math.sqrt(hd)
    full = full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    rows = torch.tensor([3, 8])
    got = sparsevlm_v2.attention_rows_per_head(q[:, rows], k, rows, 1 / math.sqrt(hd))
    assert torch.allclose(got, full[:, rows], atol=1e-6)


def test_sparsevlm_v2_raters_and_head_count():
    hv = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ht = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    t, m = sparsevlm_v2.raters(hv, ht)
    assert torch.allclose(m, torch.softmax(hv @ ht.T, dim=-1).mean(0)) and t.tolist() == [0, 1]
    assert [sparsevlm_v2.priority_head_count(h) for h in (32, 16, 4, 1, 28)] == [14, 7, 2, 1, 12]


def test_sparsevlm_v2_published_lists():
    k1 = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}
    for b, (a, c, d) in k1.items():
        p = sparsevlm_v2.plan(b)
        assert p.layers == (2, 6, 15) and p.totals == (a, c, d) and p.budget_counting == "output"
        assert p.equal_tokens_input == (3 * 576 + 4 * a + 9 * c + 16 * d) / 32  # 206.75 / 144.1 / 113.9 / 81.8
        assert p.equal_tokens_output == (2 * 576 + 4 * a + 9 * c + 17 * d) / 32
    assert sparsevlm_v2.plan(128).equal_tokens_output == 128.0


# --- scaling to other depths and grids --------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [8, 22, 24, 32, 40])
@pytest.mark.parametrize("visual", [576, 729])
def test_scaling_hits_the_budget_in_the_stated_counting(depth, visual):
    for module in (sparsevlm_v2, pyramiddrop, dart, visionzip, divprune):
        for accounting in ("paper", "flops"):
            for budget in (192, 128, 96, 64):
                try:
                    p = module.plan(budget, visual=visual, depth=depth, accounting=accounting)
                except ConfigError:
                    assert accounting == "flops", (module.NAME, budget)
                    continue
                per_layer = layer_counts(visual, p.layers, list(p.totals), depth)
                assert len(per_layer) == depth and max(per_layer) <= visual
                assert list(p.totals) == sorted(p.totals, reverse=True)
                if p.budget_counting == "retained":
                    assert p.totals[0] - 4 == budget  # DART: MAX_NUM_TRUNCTION as the scripts pass it
                    continue
                fig = p.equal_tokens_input if p.budget_counting == "input" else p.equal_tokens_output
                if accounting == "flops":
                    assert p.budget_counting == "input"
                floor = measure(p.budget_counting, visual, p.layers, depth)([1] * len(p.totals))
                if floor <= budget:
                    assert abs(fig - budget) <= 1.0, (module.NAME, accounting, budget, p.totals, fig)
                else:  # paper accounting below what the depth can reach: everything at its minimum
                    assert accounting == "paper" and fig == pytest.approx(floor, abs=1.0)


def test_scaled_stage_layers():
    assert sparsevlm_v2.plan(128, depth=40).layers == scaled_layers((2, 6, 15), 40) == (3, 8, 19)
    assert pyramiddrop.plan(128, depth=40).layers == (2, 9, 19)  # before 3/10/20
    assert dart.plan(128, depth=40).layers == (2,) and dart.plan(128, depth=8).layers == (0,)


def test_unreachable_budget_is_an_error_only_in_flops_accounting():
    # 8 layers: v2 prunes after layer 1 at the earliest, so two layers see all 576 tokens: >= 144.9 tokens
    with pytest.raises(ConfigError, match="below what it can reach"):
        sparsevlm_v2.plan(64, depth=8, accounting="flops")
    p = sparsevlm_v2.plan(64, depth=8, accounting="paper")
    assert p.totals[-1] >= 1 and p.equal_tokens_output > 64
    with pytest.raises(ConfigError, match="below what it can reach"):
        dart.plan(64, depth=8, accounting="flops")  # after layer 0 of 8: >= (576 + 7) / 8 = 72.9
    assert dart.plan(64, depth=8, accounting="paper").totals == (68,)
    with pytest.raises(ConfigError, match="accounting"):
        divprune.plan(64, accounting="speed")
    with pytest.raises(ConfigError, match="budget"):
        visionzip.plan(700)


def test_every_module_has_a_formula_and_name():
    for m in METHOD_MODULES:
        assert isinstance(m.FORMULA, str) and len(m.FORMULA) > 20 and m.NAME


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0}])
def test_gravity_prior_matches_transformers_llama_rotary_on_all_ones(rope_scaling):
    # The reference's construction (modelling L241-251) with the installed transformers' own Llama RoPE.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    kwargs = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})}}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, **kwargs)
    rotary = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 2, 5, 90, 91, 400]])
    ones = torch.ones(1, 2, pos.shape[1], 32)
    cos, sin = rotary(ones, pos)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    expected = (q @ k.transpose(-1, -2))[0, 0] / math.sqrt(32)
    got = sparsevlm_v2.gravity_prior(pos[0].float(), pos[0].float(), 32, inv_freq=rotary.inv_freq,
                                     attention_scaling=rotary.attention_scaling)
    assert torch.allclose(got, expected, atol=1e-4)
    if rope_scaling is None:
        assert torch.allclose(sparsevlm_v2.gravity_prior(pos[0].float(), pos[0].float(), 32), expected, atol=1e-4)
    else:
        assert not torch.allclose(sparsevlm_v2.gravity_prior(pos[0].float(), pos[0].float(), 32), expected, atol=1e-2)


def test_selection_record_is_plain_json():
    import json

    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    sel = divprune.select(x, 3)
    rec = json.loads(json.dumps(sel.as_record()))
    assert rec["kept"] == sel.kept.tolist() and rec["extras"]["order"] == sel.extras["order"]
    res = visionzip.select(torch.rand(8), torch.randn(9, 3), torch.randn(9, 5), 3, 2)
    assert json.loads(json.dumps(res.selection.as_record()))["groups"] == [[t, m] for t, m in res.selection.groups]
