"""The parts of scripts/gpu-check.sh written in Python: the page answering on the device, and the report.

    python scripts/gpu_check.py page --device cuda --width 7b --out page.json
        serves the app in this process on a LLaVA-1.5-7B-shaped model with random weights (sparsevlm.bench.build),
        then drives it through its API as a user's program would: /explain on the bundled examples, then
        /compare_view (every method). Writes what it measured.
    python scripts/gpu_check.py report --tests junit.xml --bench bench.json --bench-next bench-next.json \
            --page page.json --out docs/bench-gpu
        writes docs/bench-gpu.md and docs/bench-gpu.json from the four steps' outputs (the CUDA tests, the LLaVA-1.5
        benchmark, the LLaVA-NeXT benchmark, the page).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page(device: str, width: str, requests: int) -> dict:
    """The page on `device` with the benchmark's model of `width`: timings measured on the client, per request."""
    import torch
    from gradio_client import Client, handle_file

    from app.handlers import load_examples
    from app.layout import build_app, launch_kwargs
    from sparsevlm.bench import build
    from sparsevlm.loading import ModelCache

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    lm = build(width, device, dtype)
    build_s = time.perf_counter() - t0
    models = ModelCache(max_bytes=2**50, device=device, dtype=str(dtype).replace("torch.", ""))
    models.put(lm.name, lm)
    examples = load_examples()
    if not examples:
        raise SystemExit("assets/examples/examples.json has no examples to ask")
    demo = build_app(models, lm.name, examples=examples)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                **launch_kwargs())
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        runs = []
        for i in range(requests + 1):  # the first is the warm-up
            ex = examples[i % len(examples)]
            t = time.perf_counter()
            out = client.predict(image=handle_file(ex["image"]), question=ex["question"], method="sparsevlm",
                                 budget=64, max_new_tokens=8, api_name="/explain")
            ms = (time.perf_counter() - t) * 1e3
            record = out[-1]
            trace, dense = record["trace"], record["dense_trace"]
            runs.append({"question": ex["question"], "answer": record["answer"], "dense_answer": record["dense_answer"],
                         "request_ms": round(ms, 1), "device": trace["model"]["device"],
                         "ttft_ms": trace["timings_ms"]["prefill"], "dense_ttft_ms": dense["timings_ms"]["prefill"],
                         "peak_gpu_bytes": trace["memory"]["peak_gpu_bytes"]})
        ex = examples[0]
        t = time.perf_counter()
        _, _, compare = client.predict(image=handle_file(ex["image"]), question=ex["question"], budget=64,
                                       max_new_tokens=8, api_name="/compare_view")
        compare_ms = (time.perf_counter() - t) * 1e3
    finally:
        demo.close()
    timed = runs[1:]
    return {
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "model_build_s": round(build_s, 1),
        "warmup_request_ms": runs[0]["request_ms"],
        "request_ms_p50": round(statistics.median(r["request_ms"] for r in timed), 1),
        "requests": runs,
        "compare_ms": round(compare_ms, 1),
        "compare": [{"method": r["method"], "available": r["available"], "answer": r.get("answer"),
                     "error": r.get("error")} for r in compare],
        "answered_on_device": all(r["device"].startswith(device.split(":")[0]) for r in runs),
        "measured": "request_ms: wall clock on the client, upload to every view returned (SparseVLM at 64 and the "
                    "dense run); ttft_ms: the trace's time to first token; random weights, so answers are noise",
    }


def _tests(junit: Path | None) -> dict:
    if junit is None or not junit.is_file():
        return {"ran": False}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name')}")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    return {"ran": True, "tests": total, "failed": len(failed), "skipped": skipped,
            "passed": total - len(failed) - skipped, "failures": failed, "seconds": float(suite.get("time", 0))}


def _load(path: Path | None) -> dict | None:
    """A step's JSON; None when the step wrote none (it failed or ran out of time)."""
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def report(tests: Path | None, bench: Path | None, page_json: Path | None, out: Path, steps: Path | None,
           device: str = "unknown", bench_next: Path | None = None) -> dict:
    from sparsevlm.bench import format_table

    data = {"tests": _tests(tests), "bench": _load(bench), "bench_next": _load(bench_next), "page": _load(page_json),
            "steps": [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
            if steps is not None and steps.is_file() else [], "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    b, bn, p, t = data["bench"], data["bench_next"], data["page"], data["tests"]
    device = (b or bn or p or {}).get("device", device)
    lines = ["# GPU check", "", f"`scripts/gpu-check.sh`, {data['when']}, device `{device}`."]
    if not str(device).startswith("cuda"):
        lines += ["", "**Dry run off CUDA: this checks the script, its timings say nothing about a GPU.**"]
    lines += ["", "| step | seconds (limit) | result |", "|---|---|---|"]
    for s in data["steps"]:
        result = "ok" if s["rc"] == 0 else "ran out of time" if s["rc"] in (124, 137) else f"FAILED (exit {s['rc']})"
        lines.append(f"| {s['step']} | {s['seconds']} ({s['limit_s']}) | {result} |")
    lines += ["", "## tests/test_cuda.py", ""]
    if t["ran"]:
        lines.append(f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped ({t['seconds']:.0f} s).")
        lines += [f"- FAILED {f}" for f in t["failures"]]
    else:
        lines.append("did not run")
    lines += ["", "## Prefill benchmark (`python -m sparsevlm bench`)", ""]
    lines.append(format_table(b) if b else "did not run")
    lines += ["", "## LLaVA-NeXT prefill benchmark (2,928 visual tokens, every method at 320)", "",
              "`python -m sparsevlm bench --visual next`: a 672 x 672 picture, its base view, 2 x 2 tiles and their "
              "newline tokens.", ""]
    lines.append(format_table(bn) if bn else "did not run")
    lines += ["", "## The page answering (`scripts/gpu_check.py page`)", ""]
    if p:
        lines.append(f"model: {p['model']} on {p['device']} {p['dtype']} (built in {p['model_build_s']} s); "
                     f"answered on the device: {'yes' if p['answered_on_device'] else 'NO'}")
        lines.append(f"/explain: p50 {p['request_ms_p50']:.0f} ms over {len(p['requests']) - 1} requests after a "
                     f"{p['warmup_request_ms']:.0f} ms warm-up (measured on the client); /compare_view (every "
                     f"method): {p['compare_ms']:.0f} ms")
        lines += ["", "| question | SparseVLM-64 answer | dense answer | request ms | TTFT ms | dense TTFT ms | "
                  "peak GPU MiB |", "|---|---|---|---|---|---|---|"]
        for r in p["requests"]:
            peak = "n/a" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**20:,.0f}"
            lines.append(f"| {r['question']} | {r['answer']!r} | {r['dense_answer']!r} | {r['request_ms']:.0f} | "
                         f"{r['ttft_ms']:.1f} | {r['dense_ttft_ms']:.1f} | {peak} |")
        lines += ["", p["measured"]]
    else:
        lines.append("did not run")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pg = sub.add_parser("page")
    pg.add_argument("--device", default="cuda")
    pg.add_argument("--width", default="7b")
    pg.add_argument("--requests", type=int, default=5, help="timed /explain requests after one warm-up")
    pg.add_argument("--out", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("--tests", type=Path)
    rp.add_argument("--bench", type=Path)
    rp.add_argument("--bench-next", type=Path, help="the LLaVA-NeXT benchmark's JSON (bench --visual next)")
    rp.add_argument("--page", type=Path)
    rp.add_argument("--steps", type=Path, help="one JSON line per step: step, seconds, rc, limit_s")
    rp.add_argument("--out", type=Path, required=True, help="path without suffix: .md and .json are written")
    rp.add_argument("--device", default="unknown", help="the device asked for (shown when no step reports one)")
    a = p.parse_args(argv)
    if a.command == "page":
        result = page(a.device, a.width, a.requests)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"gpu-check: the page answered on {result['device']}: /explain p50 {result['request_ms_p50']} ms, "
              f"/compare_view {result['compare_ms']} ms")
        return 0 if result["answered_on_device"] else 1
    report(a.tests, a.bench, a.page, a.out, a.steps, a.device, a.bench_next)
    print(f"gpu-check: wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
