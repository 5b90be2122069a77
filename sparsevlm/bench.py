"""Prefill latency benchmark: every method measured side by side in one run on one random-weight model.

A random-weight LLaVA with LLaVA-1.5-7B's depth (32 layers) and grid (576 visual tokens), at a width that runs
on the machine at hand (or the full 7B width on a GPU). Weights do not matter for timing; shapes do.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from .config import ACCOUNTINGS, PruneConfig
from .errors import ConfigError
from .loading import from_objects
from .methods import METHODS
from .pipeline import run
from .testing import preset_llava, tiny_llava

QUESTION = "is there a red circle left of the blue square in the image ? answer with one word ."

WIDTHS = {
    # name: (hidden, heads, kv_heads, intermediate)
    "cpu": (512, 8, 8, 1376),
    "tiny": (64, 4, 4, 128),  # a dry run of the code path (about a minute of one CPU core); its timings mean little
}
TTFT_GOAL_7B = 0.40  # SparseVLM at 64 tokens: time to first token at most this share of dense, on the 7B shape

# (method, budget): dense, SparseVLM at three budgets, every other registered method at 64.
BUDGETS = {"sparsevlm": (192, 128, 64)}


def cases(accountings: tuple[str, ...] = ACCOUNTINGS) -> list[tuple[str, int, str]]:
    out = [("dense", 576, "paper")]
    for accounting in accountings:
        for method in METHODS:
            if method != "dense":
                out += [(method, b, accounting) for b in BUDGETS.get(method, (64,))]
    return out


def build(width: str, device: str, dtype: torch.dtype):
    if width == "7b":
        # LLaVA-1.5-7B's full published shape (CLIP-L/336 tower, 7.06B parameters), random weights made on `device`.
        model, processor = preset_llava("llava-hf/llava-1.5-7b-hf", reduce=False, dtype=dtype, device=device)
        return from_objects(model, processor, name="random LLaVA-1.5-7B (full shape, 7.06B parameters)")
    hidden, heads, kv, inter = WIDTHS[width]
    model, processor = tiny_llava(
        "llama", image_size=336, patch_size=14, hidden=hidden, layers=32, heads=heads, kv_heads=kv,
        intermediate=inter, vision_hidden=64, vision_layers=2, dtype=dtype,
    )
    model = model.to(device)
    return from_objects(model, processor, name=f"random LLaVA 32 layers x {hidden} ({width})")


def bench(width: str = "cpu", runs: int = 5, warmup: int = 2, device: str | None = None,
          accountings: tuple[str, ...] = ACCOUNTINGS) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if width == "7b" and not str(device).startswith("cuda"):
        raise ConfigError("--width 7b builds LLaVA-1.5-7B's full shape (13.2 GiB in fp16) and needs a CUDA GPU; "
                          "on a CPU use --width cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    lm = build(width, device, dtype)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (336, 448, 3), dtype=np.uint8))
    configs, unavailable = {}, {}
    for method, budget, accounting in cases(accountings):
        cfg = PruneConfig(method=method, budget=budget, accounting=accounting)
        try:
            cfg.validate(lm.visual_tokens)
            run(lm, image, QUESTION, cfg, max_new_tokens=1)  # also the first warm-up round
            configs[(method, budget, accounting)] = cfg
        except ConfigError as e:  # e.g. [CLS]-based selection on a tower without [CLS]: reported, not hidden
            unavailable[f"{method}-{budget}-{accounting}"] = str(e)
    samples: dict[tuple[str, int, str], list] = {case: [] for case in configs}
    for _ in range(max(0, warmup - 1)):
        for cfg in configs.values():
            run(lm, image, QUESTION, cfg, max_new_tokens=1)
    # Interleave the methods so drift in machine load hits them all alike.
    for _ in range(runs):
        for case, cfg in configs.items():
            samples[case].append(run(lm, image, QUESTION, cfg, max_new_tokens=1).trace)
    rows = []
    dense_case = ("dense", 576, "paper")
    dense_ms = statistics.median(t.timings_ms.llm_prefill for t in samples[dense_case])
    dense_ttft = statistics.median(t.timings_ms.prefill for t in samples[dense_case])
    dense_flops = samples[dense_case][0].cost.prefill_flops
    for (method, budget, accounting), traces in samples.items():
        ms = statistics.median(t.timings_ms.llm_prefill for t in traces)
        overhead = statistics.median(t.timings_ms.prune_overhead for t in traces)
        ttft = statistics.median(t.timings_ms.prefill for t in traces)
        peaks = [t.memory.peak_gpu_bytes for t in traces if t.memory.peak_gpu_bytes is not None]
        t0 = traces[0]
        time_ratio = ms / dense_ms
        flops_ratio = t0.cost.prefill_flops / dense_flops
        rows.append({
            "method": method,
            "budget": budget if method != "dense" else None,
            "accounting": accounting if method != "dense" else None,
            "equal_tokens": round(t0.cost.equal_tokens, 2),
            "equal_tokens_output": round(t0.cost.equal_tokens_reference, 2),
            "prefill_ms_median": round(ms, 2),
            "prefill_ms_runs": [round(t.timings_ms.llm_prefill, 2) for t in traces],
            "time_ratio": round(time_ratio, 4),
            "flops_ratio": round(flops_ratio, 4),
            "time_over_flops": round(time_ratio / flops_ratio, 3),
            "overhead_ms": round(overhead, 3),
            "overhead_share_of_dense": round(overhead / dense_ms, 5),
            "ttft_ms_median": round(ttft, 2),  # vision + LLM prefill + pruning: time to the first token
            "ttft_ratio": round(ttft / dense_ttft, 4),
            "peak_gpu_mib": round(max(peaks) / 2**20, 1) if peaks else None,  # max over the runs; None off CUDA
        })
    targets = {}
    for r in rows:
        if r["method"] == "sparsevlm" and r["budget"] == 64:
            targets[f"sparsevlm64_{r['accounting']}_time_ratio_within_1.25x_flops_ratio"] = r["time_over_flops"] <= 1.25
            targets[f"sparsevlm64_{r['accounting']}_overhead_le_5pct_dense"] = r["overhead_share_of_dense"] <= 0.05
            if width == "7b":
                targets[f"sparsevlm64_{r['accounting']}_ttft_le_{TTFT_GOAL_7B:.2f}x_dense"] = \
                    r["ttft_ratio"] <= TTFT_GOAL_7B
    return {
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "measured": "median LLM prefill (first forward, pruning included, vision excluded), wall clock"
        + (", CUDA-synchronized" if device == "cuda" else "")
        + "; TTFT: median time to the first token (vision + LLM prefill + pruning); peak GPU memory: the most "
        "allocated during a run, max over the runs",
        "rows": rows,
        "unavailable": unavailable,
        "targets": targets,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_table(result: dict) -> str:
    lines = [
        f"model: {result['model']}  device: {result['device']} {result['dtype']}  threads: {result['threads']}  "
        f"runs: {result['runs']} (after {result['warmup']} warm-up)",
        f"measured: {result['measured']}",
        "",
        "| method | budget | accounting | equal tokens (in) | equal tokens (out) | prefill ms (median) | time ratio | "
        "FLOPs ratio | time/FLOPs | overhead ms | overhead / dense | TTFT ms (median) | TTFT ratio | "
        "peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = r.get("peak_gpu_mib")
        lines.append(
            f"| {r['method']} | {r['budget'] or '-'} | {r['accounting'] or '-'} | {r['equal_tokens']} | "
            f"{r['equal_tokens_output']} | {r['prefill_ms_median']:.1f} | "
            f"{r['time_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['time_over_flops']:.2f} | "
            f"{r['overhead_ms']:.2f} | {100 * r['overhead_share_of_dense']:.2f}% | "
            f"{r.get('ttft_ms_median', float('nan')):.1f} | {r.get('ttft_ratio', float('nan')):.3f} | "
            f"{'n/a (not CUDA)' if peak is None else f'{peak:,.0f}'} |"
        )
    lines.append("")
    for k, v in result.get("unavailable", {}).items():
        lines.append(f"not run: {k}: {v}")
    for k, v in result["targets"].items():
        lines.append(f"target {k}: {'met' if v else 'NOT met'}")
    return "\n".join(lines)
