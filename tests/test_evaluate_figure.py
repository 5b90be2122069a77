"""The benchmark figure's curves: one per method and accounting, fixed budgets only."""

from sparsevlm.evaluation.figure import curves
from sparsevlm.evaluation.png import png


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
    by_setting = curves(RESULT)
    assert set(by_setting) == {("dense", ""), ("sparsevlm", "paper"), ("sparsevlm", "flops")}
    assert [r["setting"] for r in by_setting[("sparsevlm", "paper")]] == ["sparsevlm-64-paper", "sparsevlm-192-paper"]
    png(RESULT, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_intervals_and_the_ordering_on_known_hits():
    """Accuracy half-widths, paired differences and the ordering at 64 tokens, on hit vectors with known
    answers: identical answers differ by exactly 0 ± 0, a setting right where another is wrong is outside the
    noise only when that happens often enough."""
    import pytest

    from sparsevlm.evaluation.stats import half_width, ordering, paired_difference
    from sparsevlm.evaluation.table import markdown

    assert half_width([1, 0] * 50) == pytest.approx(1.96 * 0.05)
    assert half_width([1] * 100) == 0.0 and half_width([1]) is None
    same = [1, 0, 1, 1] * 25
    assert paired_difference(same, same) == (0.0, 0.0)
    better = [1] * 100
    worse = [1] * 60 + [0] * 40
    d, hw = paired_difference(better, worse)
    assert d == pytest.approx(0.4) and 0 < hw < 0.4
    slight = [1] * 98 + [0] * 2
    d2, hw2 = paired_difference(better, slight)
    assert d2 == pytest.approx(0.02) and hw2 > d2  # two questions in a hundred: inside the noise

    def row(method, hits):
        acc = sum(hits) / len(hits)
        return {"setting": f"{method}-64-paper", "method": method, "budget": 64, "accounting": "paper",
                "accuracy": acc, "accuracy_half_width": half_width(hits), "hits": hits, "equal_tokens": 64.0,
                "equal_tokens_output": 64.0, "per_family": {}, "evidence_recall_last": None,
                "evidence_recall_direct": None, "evidence_recall_layers": None}

    result = {"rows": [row("a", worse), row("b", better), row("c", slight)], "questions": 100, "seed": 1, "world": "v2",
              "seconds": 1.0, "model": {"name": "m", "architecture": "x", "decoder_layers": 2, "visual_tokens": 576,
                                        "device": "cpu"}}
    order = ordering(result, 64, "paper")
    assert [o["method"] for o in order] == ["b", "c", "a"]
    assert order[0]["vs_next"]["outside_noise"] is False  # b vs c: 2 points on 100 questions
    assert order[1]["vs_next"]["outside_noise"] is True  # c vs a: 38 points
    assert "vs_next" not in order[2]
    md = markdown(result)
    assert "b 100.0 ≈ (+2.0 ± " in md and "c 98.0 > (+38.0 ± " in md


def test_the_command_module_keeps_the_names_imported_from_it():
    """`sparsevlm.evaluate` is the `eval` command; the names code imported from it before the benchmark was split
    into modules still resolve, to the one definition each."""
    from sparsevlm import evaluate
    from sparsevlm.evaluation import figure, png, recall, runner, stats, table

    assert evaluate.evaluate is runner.evaluate and evaluate.settings is runner.settings
    assert evaluate.evidence_recall is recall.evidence_recall
    assert evaluate.evidence_recall_per_stage is recall.evidence_recall_per_stage
    assert (evaluate.half_width, evaluate.paired_difference, evaluate.ordering) == (
        stats.half_width, stats.paired_difference, stats.ordering)
    assert evaluate.markdown is table.markdown and evaluate.png is png.png and evaluate.figure is figure.figure
    assert callable(evaluate.main)
