"""Unit tests of the pure algorithm functions, the schedule and the accounting, on constructed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevlm import algorithm as A
from sparsevlm import cost as C
from sparsevlm import schedule as S
from sparsevlm.config import REFERENCE_FIXED_COUNTS, PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.methods.fastv import fastv_k
from sparsevlm.methods.sparsevlm import sparsevlm_fixed, totals_with_clusters


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


@pytest.mark.parametrize("accounting", ["paper", "flops"])
@pytest.mark.parametrize("budget", [192, 128, 96, 64])
@pytest.mark.parametrize("depth,visual", [(32, 576), (32, 256), (40, 576)])
def test_fixed_budgets_hit_their_accountings_figure(budget, depth, visual, accounting):
    if budget > visual:
        pytest.skip("budget above this grid")
    cfg = PruneConfig(budget=budget, accounting=accounting)
    c = sparsevlm_fixed(cfg, visual, depth)
    assert c.budget_counting == {"paper": "output", "flops": "input"}[accounting]
    figure = c.equal_tokens_output if accounting == "paper" else c.equal_tokens_input
    assert c.budget_met and abs(figure - budget) <= S.BUDGET_TOLERANCE
    assert c.equal_tokens_input > c.equal_tokens_output  # a pruning layer counts more at its input
    assert all(b < a for a, b in zip(c.direct, c.direct[1:]))  # never grows back
    # recycled clusters come on top of the directly kept counts
    assert list(c.totals) == totals_with_clusters(visual, list(c.direct), True, 0.3, 0.1)
    assert all(t > d for t, d in zip(c.totals, c.direct))


@pytest.mark.parametrize("budget,output_figure", [(192, 192.0), (128, 128.6), (96, 96.9), (64, 64.8)])
def test_paper_accounting_runs_the_v15_lists_verbatim_as_directly_kept_counts(budget, output_figure):
    c = sparsevlm_fixed(PruneConfig(budget=budget), 576, 32)
    assert c.layers == (2, 6, 15) and c.direct == REFERENCE_FIXED_COUNTS[budget]
    assert round(c.equal_tokens_output, 1) == output_figure  # docs/engine.md: the reference's own figure
    if budget == 64:
        assert c.totals == (82, 32, 18)  # 66 + 16 clusters, 30 + 2, 17 + 1
        assert c.equal_tokens_input == (3 * 576 + 4 * 82 + 9 * 32 + 16 * 18) / 32  # ~82 by input counting


def test_unreachable_budget_flops_is_an_error_paper_runs_smallest():
    with pytest.raises(ConfigError, match=r"at least 1\d\d.\d equal tokens"):
        sparsevlm_fixed(PruneConfig(budget=64, accounting="flops"), 576, 8)
    c = sparsevlm_fixed(PruneConfig(budget=64), 576, 8)
    assert not c.budget_met and c.direct == (1, 1, 1) and "below what" in c.note
    assert S.single_stage_keep(64, 576, 1, 32) == 30  # FastV K=2 at 64, flops: (64*32 - 2*576) / 30
    assert S.single_stage_keep(64, 576, -1, 32) == 64  # before the LLM: every layer sees k
    with pytest.raises(ConfigError, match="below what pruning after layer 1"):
        S.single_stage(PruneConfig(method="fastv", budget=8, accounting="flops"), 576, 1, 32, "FastV")
    paper = S.single_stage(PruneConfig(method="fastv", budget=8), 576, 1, 32, "FastV")
    assert paper.direct == (8,) and paper.budget_counting == "kept" and paper.budget_met


def test_fastv_k_default_and_scaling():
    assert fastv_k(PruneConfig(method="fastv"), 32) == 2  # prune after layer K-1 = 1
    assert fastv_k(PruneConfig(method="fastv"), 16) == 1
    assert fastv_k(PruneConfig(method="fastv", fastv_k=3), 8) == 3
    with pytest.raises(ConfigError):
        fastv_k(PruneConfig(method="fastv", fastv_k=8), 8)


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
