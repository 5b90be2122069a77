"""scripts/gpu-check.sh, the one command for a GPU, as a dry run on this CPU at a tiny width: the same four steps
(tests/test_cuda.py on the CPU in half precision, a subset; the benchmark of every method in both accountings; the
LLaVA-NeXT benchmark, every method at 320 on 2,928 visual tokens; the page answering through its API) and the same
report. It checks the script, not the GPU: its timings mean nothing.

The dry run is marked slow (a few minutes of CPU: 32-layer benchmark runs and a Gradio server); `-m "not slow"`
leaves it out. The script's --limits parsing and the report's sections are checked fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsevlm.config import ACCOUNTINGS
from sparsevlm.methods import METHODS, get_method

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_the_report(tmp_path):
    out = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--width", "tiny", "--out", str(tmp_path), "--runs", "1",
         "--warmup", "0", "--requests", "1", "--tests-k", "llama-float16", "--limits", "1800,1800,1800,1800"],
        cwd=ROOT, capture_output=True, text=True, timeout=4 * 1800 + 300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "0 of 4 steps failed" in log
    report = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["tests", "bench", "bench-next", "page"]
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
    nxt = report["bench_next"]
    assert nxt["device"] == "cpu" and "LLaVA-NeXT" in nxt["model"] and nxt["visual_tokens"] == 2928
    assert not nxt["unavailable"]
    assert {(r["method"], r["accounting"]) for r in nxt["rows"]} == covered  # every method, both accountings
    for r in nxt["rows"]:
        assert r["budget"] == (320 if r["method"] in budgeted else None)
        assert r["ttft_ms_median"] >= r["prefill_ms_median"] > 0 and r["peak_gpu_mib"] is None
    page = report["page"]
    assert page["answered_on_device"] and page["device"] == "cpu" and len(page["requests"]) == 2
    assert {r["method"] for r in page["compare"]} == set(METHODS)
    md = (tmp_path / "bench-gpu.md").read_text()
    assert "Dry run off CUDA" in md and "## tests/test_cuda.py" in md and "| sparsevlm | 64 | flops |" in md
    assert "/explain: p50" in md and "TTFT ms (median)" in md
    section = md.split("## LLaVA-NeXT prefill benchmark (2,928 visual tokens, every method at 320)\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert "LLaVA-NeXT" in section and "| dense | - | - |" in section
    for m in budgeted:
        for a in ACCOUNTINGS:
            assert f"| {m} | 320 | {a} |" in section, (m, a)


@pytest.mark.parametrize("limits, said", [
    ("5,6,7,8", "tests 5 s, bench 6 s, bench-next 7 s, page 8 s"),
    ("5,6,8", "tests 5 s, bench 6 s, bench-next 6 s, page 8 s"),  # the older TESTS,BENCH,PAGE form
])
def test_gpu_check_runs_four_steps_under_their_limits(tmp_path, limits, said):
    """With `false` for Python every step fails at once: the script still runs the four in order, each under its
    limit, and fails when the report cannot be written."""
    out = subprocess.run(["bash", "scripts/gpu-check.sh", "--device", "cpu", "--width", "tiny", "--out", str(tmp_path),
                          "--limits", limits], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHON": "false", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    log = out.stdout + out.stderr
    assert f"limits: {said}" in log
    ran = [line.split("] ", 1)[1].split(":", 1)[0] for line in log.splitlines() if " exit 1 after " in line]
    assert ran == ["tests", "bench", "bench-next", "page"]
    assert "bench-next: false -m sparsevlm bench --width tiny --visual next --device cpu" in log


@pytest.mark.parametrize("limits", ["900,900", "1,2,3,4,5", "900,x,900,900", "0,1,2,3"])
def test_gpu_check_refuses_bad_limits(limits):
    out = subprocess.run(["bash", "scripts/gpu-check.sh", "--device", "cpu", "--limits", limits], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--limits" in out.stderr and "gpu-check: [" not in out.stdout


def test_the_report_has_a_llava_next_section(tmp_path):
    """scripts/gpu_check.py report: the LLaVA-NeXT benchmark's table under its own heading and in the JSON as
    bench_next; a step that wrote nothing is "did not run"."""
    row = {"method": "dense", "setting": "dense-2928-paper", "options": {}, "budget": None, "accounting": None,
           "equal_tokens": 2928, "equal_tokens_output": 2928, "prefill_ms_median": 100.0, "prefill_ms_runs": [100.0],
           "time_ratio": 1.0, "flops_ratio": 1.0, "time_over_flops": 1.0, "kv_ratio": 1.0, "attended_share": None,
           "overhead_ms": 0.0, "overhead_share_of_dense": 0.0, "ttft_ms_median": 110.0, "ttft_ratio": 1.0,
           "peak_gpu_mib": 20000.0}
    result = {"model": "random LLaVA-NeXT-7B (full shape, 7,063,431,168 parameters)", "visual_tokens": 2928,
              "device": "cuda:0", "dtype": "float16", "threads": 1, "runs": 5, "warmup": 2, "measured": "median",
              "rows": [row], "unavailable": {}, "targets": {}}
    (tmp_path / "next.json").write_text(json.dumps(result))
    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps({"step": s, "seconds": 1, "rc": rc, "limit_s": 90}) + "\n"
                             for s, rc in [("tests", 1), ("bench", 124), ("bench-next", 0), ("page", 1)]))
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "report", "--bench", str(tmp_path / "absent.json"),
                          "--bench-next", str(tmp_path / "next.json"), "--steps", str(steps), "--out",
                          str(tmp_path / "bench-gpu")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert data["bench_next"] == result and data["bench"] is None and data["page"] is None
    md = (tmp_path / "bench-gpu.md").read_text()
    assert "device `cuda:0`" in md and "| bench-next | 1 (90) | ok |" in md and "| bench | 1 (90) | ran out" in md
    one, rest = md.split("## Prefill benchmark (`python -m sparsevlm bench`)\n", 1)
    one, rest = rest.split("## LLaVA-NeXT prefill benchmark (2,928 visual tokens, every method at 320)\n", 1)
    assert "did not run" in one
    nxt = rest.split("\n## ", 1)[0]
    assert "random LLaVA-NeXT-7B (full shape, 7,063,431,168 parameters)" in nxt
    assert "| dense | - | - | 2928 | 2928 | 100.0 |" in nxt and "20,000" in nxt
