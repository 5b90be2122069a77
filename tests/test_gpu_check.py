"""scripts/gpu-check.sh, the one command for a GPU, as a dry run on this CPU at a tiny width: the same three steps
(tests/test_cuda.py on the CPU in half precision, a subset; the benchmark of every method in both accountings; the
page answering through its API) and the same report. It checks the script, not the GPU: its timings mean nothing.

Marked slow (a few minutes of CPU: 32-layer benchmark runs and a Gradio server); `-m "not slow"` leaves it out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sparsevlm.config import ACCOUNTINGS
from sparsevlm.methods import METHODS, get_method

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_the_report(tmp_path):
    out = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--width", "tiny", "--out", str(tmp_path), "--runs", "1",
         "--warmup", "0", "--requests", "1", "--tests-k", "llama-float16", "--limits", "1800,1800,1800"],
        cwd=ROOT, capture_output=True, text=True, timeout=3 * 1800 + 300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "0 of 3 steps failed" in log
    report = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["tests", "bench", "page"]
    assert all(s["rc"] == 0 for s in report["steps"])
    tests = report["tests"]
    assert tests["ran"] and tests["failed"] == 0 and tests["passed"] >= 10
    bench = report["bench"]
    assert bench["device"] == "cpu" and "32 layers x 64" in bench["model"]
    covered = {(r["method"], r["accounting"]) for r in bench["rows"]}
    budgeted = {m for m in METHODS if m != "dense" and get_method(m).budgeted}
    assert covered == {("dense", None)} | {(m, a) for m in budgeted for a in ACCOUNTINGS} | \
        {(m, None) for m in METHODS if m != "dense" and m not in budgeted}
    for r in bench["rows"]:
        assert r["ttft_ms_median"] >= r["prefill_ms_median"] > 0  # TTFT includes the vision tower
        assert r["time_ratio"] > 0 and r["flops_ratio"] > 0 and r["ttft_ratio"] > 0 and r["overhead_ms"] >= 0
        assert r["peak_gpu_mib"] is None  # measured on CUDA only
    page = report["page"]
    assert page["answered_on_device"] and page["device"] == "cpu" and len(page["requests"]) == 2
    assert {r["method"] for r in page["compare"]} == set(METHODS)
    md = (tmp_path / "bench-gpu.md").read_text()
    assert "Dry run off CUDA" in md and "## tests/test_cuda.py" in md and "| sparsevlm | 64 | flops |" in md
    assert "/explain: p50" in md and "TTFT ms (median)" in md
