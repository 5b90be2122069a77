"""End-to-end speed of a running app: request -> every view returned, through the public API.

    python -m app.speed --url http://127.0.0.1:7860 --n 20

Drives /explain with gradio_client exactly as a user of the API would (upload, SparseVLM at budget 64, the dense
run for comparison, all renderers) and prints p50/p95 of the wall-clock time per request, then the same as JSON.
Time is measured here, on the client; the first request (warm-up) is reported separately and left out.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.speed", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--n", type=int, default=20, help="timed requests (after one warm-up)")
    p.add_argument("--image", help="image file (default: the first bundled example)")
    p.add_argument("--question", help="question (default: the example's)")
    p.add_argument("--method", default="sparsevlm")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", dest="json_out", help="also write the result JSON here")
    args = p.parse_args(argv)

    from gradio_client import Client, handle_file

    image, question = (args.image, args.question) if args.image else default_example()
    question = args.question or question
    client = Client(args.url, verbose=False)

    def once() -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = client.predict(image=handle_file(image), question=question, method=args.method, budget=args.budget,
                             max_new_tokens=args.max_new_tokens, api_name="/explain")
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
        "max_new_tokens": args.max_new_tokens,
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
