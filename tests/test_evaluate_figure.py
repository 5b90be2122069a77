"""The benchmark figure's curves: one per method and accounting, fixed budgets only."""

from sparsevlm.evaluate import _curves, png


def _row(setting, method, budget, accounting, eq, acc):
    return {"setting": setting, "method": method, "budget": budget, "accounting": accounting,
            "equal_tokens": eq, "accuracy": acc}


RESULT = {"rows": [
    _row("dense", "dense", 64, "paper", 576.0, 0.99),
    _row("sparsevlm-192-paper", "sparsevlm", 192, "paper", 206.5, 0.74),
    _row("sparsevlm-64-paper", "sparsevlm", 64, "paper", 82.2, 0.61),
    _row("sparsevlm-64-flops", "sparsevlm", 64, "flops", 64.0, 0.60),
    # adaptive settings carry the config's default budget and accounting but are not on a budget curve
    _row("sparsevlm-paper-l1", "sparsevlm", 64, "paper", 59.7, 0.57),
    _row("sparsevlm-code-9/6", "sparsevlm", 64, "paper", 85.9, 0.67),
]}


def test_curves_hold_only_fixed_budget_settings_sorted_by_tokens(tmp_path):
    curves = _curves(RESULT)
    assert set(curves) == {("dense", ""), ("sparsevlm", "paper"), ("sparsevlm", "flops")}
    assert [r["setting"] for r in curves[("sparsevlm", "paper")]] == ["sparsevlm-64-paper", "sparsevlm-192-paper"]
    png(RESULT, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
