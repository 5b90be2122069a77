"""Unit tests of the pure algorithm functions, the schedule and the accounting, on constructed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevlm import algorithm as A
from sparsevlm import cost as C
from sparsevlm import schedule as S
from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError


def test_text_relevance_is_mean_of_row_softmax_without_scaling():
    hv = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    logits = hv @ hq.T  # no 1/sqrt(D)
    expected = torch.softmax(logits, dim=-1).mean(0)
    assert torch.allclose(A.text_relevance(hv, hq), expected)
    assert math.isclose(float(A.text_relevance(hv, hq).sum()), 1.0, rel_tol=1e-6)


def test_select_raters_gt_ge_and_never_empty():
    r = torch.tensor([0.1, 0.3, 0.3, 0.3])  # mean 0.25
    assert A.select_raters(r, "gt").tolist() == [1, 2, 3]
    flat = torch.full((4,), 0.25)
    assert A.select_raters(flat, "gt").tolist() == [0, 1, 2, 3]  # all equal: every text token rates
    assert A.select_raters(flat, "ge").tolist() == [0, 1, 2, 3]


def test_rows_attention_matches_full_causal_softmax_with_gqa():
    torch.manual_seed(0)
    h, hkv, n, hd = 4, 2, 7, 8
    q = torch.randn(h, n, hd)
    k = torch.randn(hkv, n, hd)
    full = torch.einsum("hnd,hmd->hnm", q, k.repeat_interleave(h // hkv, dim=0)) / math.sqrt(hd)
    full = full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1).mean(0)
    rows = torch.tensor([2, 5, 6])
    got = A.rows_attention(q[:, rows], k, rows, 1 / math.sqrt(hd))
    assert torch.allclose(got, full[rows], atol=1e-6)


def test_rank_of_constructed_matrices():
    p = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 0.0]])
    assert A.attention_rank(p) == 2
    assert A.attention_rank(torch.eye(5)[:3]) == 3


def test_paper_count_mode_eq8():
    assert A.paper_deleted_count(576, 4, 1.0) == 572
    assert A.paper_deleted_count(576, 4, 0.5) == 286  # floor(0.5 * 572)
    assert A.paper_deleted_count(10, 10, 1.0) == 0  # full rank: N = 0, the layer is skipped
    p = torch.zeros(3, 20)
    p[0, 0] = p[1, 1] = 1.0  # rank 2
    assert A.paper_deleted_count(20, A.attention_rank(p), 0.7) == math.floor(0.7 * 18)


def test_code_count_mode_scale_bias():
    assert A.code_kept_count(576, 4, 13.5, 0) == 54
    assert A.code_kept_count(576, 4, 9, 6) == 42
    assert A.code_kept_count(30, 4, 13.5, 0) == 29  # capped at Lv - 1
    assert A.code_kept_count(576, 0, 0.8, 0) == 1


def test_recycle_sizes_and_totals_include_clusters():
    assert A.recycle_sizes(550, 0.3, 0.1) == (166, 17)  # int(550*0.3)+1, int(166*0.1)+1
    assert A.recycle_sizes(0, 0.3, 0.1) == (0, 0)
    d = A.direct_keep_for_total(576, 25, True, 0.3, 0.1)
    assert d + A.recycle_sizes(576 - d, 0.3, 0.1)[1] == 25
    assert A.direct_keep_for_total(576, 25, False, 0.3, 0.1) == 25


def _blobs(centers, per, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts, labels = [], []
    for i, c in enumerate(centers):
        pts.append(torch.tensor(c) + spread * torch.randn(per, len(c), generator=g))
        labels += [i] * per
    return torch.cat(pts), torch.tensor(labels)


@pytest.mark.parametrize("assign", ["euclidean", "cosine"])
def test_density_peak_clustering_finds_separated_blobs(assign):
    centers = [[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]]
    x, truth = _blobs(centers, per=12, spread=0.3)
    ctr, labels = A.density_peak_clusters(x, 3, assign, torch.Generator().manual_seed(0))
    assert len(set(truth[ctr].tolist())) == 3  # one center per blob
    for blob in range(3):  # every blob maps to exactly one cluster
        assert len(set(labels[truth == blob].tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_merge_mean_and_sum_are_exact():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 0])
    assert torch.equal(A.merge_clusters(x, labels, 2, "sum"), torch.tensor([[9.0, 11.0], [10.0, 20.0]]))
    assert torch.equal(A.merge_clusters(x, labels, 2, "mean"), torch.tensor([[3.0, 11.0 / 3], [10.0, 20.0]]))


def test_schedule_scales_with_depth():
    assert S.scaled_layers((2, 6, 15), 32) == (2, 6, 15)
    assert S.scaled_layers((2, 6, 15), 16) == (1, 3, 8)
    assert S.scaled_layers((2, 6, 15), 8) == (1, 2, 4)


@pytest.mark.parametrize("budget", [192, 128, 96, 64])
@pytest.mark.parametrize("depth,visual", [(32, 576), (32, 256), (40, 576)])
def test_fixed_budgets_hit_their_equal_token_figure(budget, depth, visual):
    if budget > visual:
        pytest.skip("budget above this grid")
    layers, counts, _ = S.fixed_counts(PruneConfig(budget=budget), visual, depth)
    per_layer = S.per_layer_inputs(visual, layers, counts, depth)
    assert abs(S.equal_tokens(per_layer) - budget) <= 0.5
    assert all(b <= a for a, b in zip(counts, counts[1:]))  # never grows back


def test_reference_counts_verbatim_and_their_figures():
    layers, counts, _ = S.fixed_counts(PruneConfig(budget=192, fixed_schedule="reference"), 576, 32)
    assert counts == [300, 200, 110] and layers == (2, 6, 15)
    per_layer = S.per_layer_inputs(576, layers, counts, 32)
    assert S.equal_tokens(per_layer) == (3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32
    assert S.equal_tokens_reference(576, layers, counts, 32) == (2 * 576 + 4 * 300 + 9 * 200 + 17 * 110) / 32
    with pytest.raises(ConfigError):
        S.fixed_counts(PruneConfig(budget=192, fixed_schedule="reference"), 576, 8)


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"at least 144.8 equal tokens"):
        S.fixed_counts(PruneConfig(budget=64), 576, 8)
    assert S.single_stage_keep(64, 576, 2, 32) == 11  # FastV at 64: (64*32 - 3*576) / 29
    assert S.single_stage_keep(64, 576, -1, 32) == 64  # before the LLM: every layer sees k


def test_accounting_anchors_llava_7b():
    s = C.PRESETS["llava-1.5-7b"]
    assert C.kv_bytes([576] * 32, s, 2) == 288 * 2**20
    assert C.kv_bytes([192] * 32, s, 2) == 96 * 2**20
    assert abs(C.prefill_flops([610] * 32, s) / 8.0e12 - 1) < 0.05


def test_shape_from_config_json(tmp_path):
    from sparsevlm.testing import tiny_llava

    model, _ = tiny_llava("qwen2")
    model.config.save_pretrained(tmp_path)
    s = C.resolve_shape(str(tmp_path))
    assert (s.layers, s.hidden, s.kv_heads) == (8, 64, 2)
    with pytest.raises(ConfigError):
        C.resolve_shape("no-such-preset")
