"""End-to-end speed of a running app: request -> every view returned, through the public API.

    python -m app.speed --url http://127.0.0.1:7860 --n 20
    python -m app.speed --compare --n 5          # "Compare all methods", in this process, before / after

Drives /explain with gradio_client exactly as a user of the API would (upload, SparseVLM at budget 64, the dense
run for comparison, all renderers) and prints p50/p95 of the wall-clock time per request, then the same as JSON.
Time is measured here, on the client; the first request (warm-up) is reported separately and left out.

--compare times "Compare all methods" on a model loaded here (default: the embedded one), two ways side by side,
interleaved so machine load hits both alike: every method run alone (`pipeline.run` once per method: the image
processed and encoded once per method) and one request (`pipeline.run_shared`: processor, vision tower +
projector and shared raters once). Both add the page's compare renderers (last-layer picture per method, table,
trace summaries); the decisions of both are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def default_example() -> tuple[str, str]:
    index = ROOT / "assets" / "examples" / "examples.json"
    if index.is_file():
        items = json.loads(index.read_text())
        if items:
            img = Path(items[0]["image"])
            img = img if img.is_absolute() else index.parent / img
            return str(img), items[0]["question"]
    raise SystemExit("no --image given and assets/examples/examples.json is missing")


def compare_bench(model: str | None, image_path: str, question: str, budget: int, n: int,
                  max_new_tokens: int) -> dict:
    """Wall-clock ms of "Compare all methods" done method by method and as one shared request (see --compare)."""
    import torch
    from PIL import Image

    from sparsevlm.config import PruneConfig
    from sparsevlm.errors import ConfigError
    from sparsevlm.loading import DEFAULT_MODEL, load_model
    from sparsevlm.methods import METHODS
    from sparsevlm.pipeline import Decoding, RunResult, run, run_shared

    from . import render

    lm = load_model(model or DEFAULT_MODEL)
    image = Image.open(image_path).convert("RGB")
    configs = [PruneConfig(method=m, budget=budget) for m in ("dense", *(m for m in METHODS if m != "dense"))]

    def alone() -> list:
        out = []
        for cfg in configs:
            try:
                out.append(run(lm, image, question, cfg, max_new_tokens=max_new_tokens))
            except ConfigError as exc:
                out.append(exc)
        return out

    def shared() -> list:
        return run_shared(lm, image, question, configs, Decoding(max_new_tokens))

    def views(results: list) -> None:  # what the page draws from the traces after the model work
        rows = [(c.method, r.trace, "") if isinstance(r, RunResult) else (c.method, None, str(r))
                for c, r in zip(configs, results)]
        for _, tr, _ in rows:
            if tr is not None:
                render.render_layer(image, tr, render.final_layer(tr), max_side=384)
                tr.summary()
        render.compare_table_html(render.compare_rows(rows))

    def decisions(results: list) -> list:
        return [[(s.kept, [(m.center, m.members) for m in s.merged]) for s in r.trace.stages] + [r.answer]
                if isinstance(r, RunResult) else str(r) for r in results]

    ways = {"each method alone": alone, "one shared request": shared}
    samples: dict[str, dict[str, list[float]]] = {w: {"model": [], "views": [], "cpu": []} for w in ways}
    with torch.inference_mode():
        first = {w: f() for w, f in ways.items()}  # warm-up, and the decisions to compare
        for _ in range(n):
            for w, f in ways.items():
                c0, t0 = time.process_time(), time.perf_counter()
                results = f()
                t1 = time.perf_counter()
                views(results)
                t2, c2 = time.perf_counter(), time.process_time()
                samples[w]["model"].append((t1 - t0) * 1e3)
                samples[w]["views"].append((t2 - t1) * 1e3)
                samples[w]["cpu"].append((c2 - c0) * 1e3)
    rows = {}
    for w, s in samples.items():
        request = [a + b for a, b in zip(s["model"], s["views"])]
        rows[w] = {"model_ms_p50": round(percentile(s["model"], 0.5), 1),
                   "views_ms_p50": round(percentile(s["views"], 0.5), 1),
                   "request_ms_p50": round(percentile(request, 0.5), 1),
                   "request_ms_min": round(min(request), 1) if request else None,
                   # CPU time of this process over the request: other programs' load does not inflate it (with
                   # several threads it may exceed the wall-clock time)
                   "request_cpu_ms_p50": round(percentile(s["cpu"], 0.5), 1)}
    before, after = rows["each method alone"], rows["one shared request"]
    return {
        "model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(), "image": image_path,
        "question": question, "budget": budget, "max_new_tokens": max_new_tokens, "n": n,
        "methods": [c.method for c in configs], "ways": rows,
        "speedup_p50": round(before["request_ms_p50"] / after["request_ms_p50"], 2),
        "cpu_speedup_p50": round(before["request_cpu_ms_p50"] / after["request_cpu_ms_p50"], 2),
        "decisions_identical": decisions(first["each method alone"]) == decisions(first["one shared request"]),
        "includes": "model work (processor, vision tower + projector, every method's generate) + the page's compare "
                    "renderers; in-process wall-clock, no network or Gradio queue",
    }


def print_compare(result: dict) -> None:
    print(f"Compare all methods ({len(result['methods'])} runs) on {result['model']}, {result['device']}, "
          f"{result['threads']} threads, n={result['n']}, measured wall-clock ms")
    print(f"{'way':<22}{'model p50':>11}{'views p50':>11}{'request p50':>13}{'request min':>13}{'CPU ms p50':>12}")
    for way, r in result["ways"].items():
        print(f"{way:<22}{r['model_ms_p50']:>11.1f}{r['views_ms_p50']:>11.1f}{r['request_ms_p50']:>13.1f}"
              f"{r['request_ms_min']:>13.1f}{r['request_cpu_ms_p50']:>12.1f}")
    print(f"speed-up (p50): {result['speedup_p50']}x wall-clock, {result['cpu_speedup_p50']}x CPU time; "
          f"decisions identical: {result['decisions_identical']}")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.speed", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--n", type=int, default=20, help="timed requests (after one warm-up)")
    p.add_argument("--image", help="image file (default: the first bundled example)")
    p.add_argument("--question", help="question (default: the example's)")
    p.add_argument("--method", default="sparsevlm")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 (API), 16 with --compare (the page's)")
    p.add_argument("--json", dest="json_out", help="also write the result JSON here")
    p.add_argument("--compare", action="store_true",
                   help="time Compare all methods in this process, method by method and as one shared request")
    p.add_argument("--model", default=None, help="with --compare: model to load (default: the embedded model)")
    p.add_argument("--threads", type=int, default=None, help="with --compare: torch threads (default: torch's)")
    args = p.parse_args(argv)

    if args.compare:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        image, question = (args.image, args.question) if args.image else default_example()
        result = compare_bench(args.model, image, args.question or question, args.budget, args.n,
                               16 if args.max_new_tokens is None else args.max_new_tokens)
        print_compare(result)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))
        return 0 if result["decisions_identical"] else 1

    from gradio_client import Client, handle_file

    max_new = 8 if args.max_new_tokens is None else args.max_new_tokens

    image, question = (args.image, args.question) if args.image else default_example()
    question = args.question or question
    client = Client(args.url, verbose=False)

    def once() -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = client.predict(image=handle_file(image), question=question, method=args.method, budget=args.budget,
                             max_new_tokens=max_new, api_name="/explain")
        return (time.perf_counter() - t0) * 1e3, out[-1]  # the /run record: both traces

    warm_ms, summary = once()
    times, prefill_pruned, prefill_dense = [], [], []
    for _ in range(args.n):
        ms, summary = once()
        times.append(ms)
        prefill_pruned.append(summary["trace"]["timings_ms"]["prefill"])
        if summary.get("dense_trace"):
            prefill_dense.append(summary["dense_trace"]["timings_ms"]["prefill"])
    result = {
        "url": args.url,
        "model": summary["trace"]["model"].get("name"),
        "device": summary["trace"]["model"].get("device"),
        "method": args.method,
        "budget": args.budget,
        "max_new_tokens": max_new,
        "n": args.n,
        "warmup_ms": round(warm_ms, 1),
        "p50_ms": round(percentile(times, 0.5), 1),
        "p95_ms": round(percentile(times, 0.95), 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "server_prefill_ms_p50": {"pruned": round(percentile(prefill_pruned, 0.5), 1),
                                  "dense": round(percentile(prefill_dense, 0.5), 1) if prefill_dense else None},
        "includes": "upload + pruned run + dense run + all renderers + transfer (client wall-clock)",
    }
    print(f"{'model':<28}{'method':<11}{'budget':>7}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'warm-up ms':>12}")
    print(f"{result['model']!s:<28}{args.method:<11}{args.budget:>7}{args.n:>5}{result['p50_ms']:>10.1f}"
          f"{result['p95_ms']:>10.1f}{result['warmup_ms']:>12.1f}")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
