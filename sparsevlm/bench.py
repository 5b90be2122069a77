"""Prefill latency benchmark: every method measured side by side in one run on one random-weight model.

A random-weight LLaVA with LLaVA-1.5-7B's depth (32 layers) and grid (576 visual tokens), at a width that runs
on the machine at hand (or, with `--width 7b` on a GPU, LLaVA-1.5-7B's full published shape). Weights do not
matter for timing; shapes do. `--visual next` builds a LLaVA-NeXT instead (anyres, 336 px tiles, LLaVA-v1.6's
pinpoints; with `--width 7b`, LLaVA-NeXT-7B's full published shape, llava-hf/llava-v1.6-vicuna-7b-hf) and times a
672 x 672 picture: 2,928 visual tokens (576 base + 4 x 576 tiles + 48 newlines), every method at the papers' 320.
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
from .methods import METHODS, get_method
from .options import setting_label
from .pipeline import layout_for, run
from .testing import preset_llava, tiny_llava, tiny_llava_next

QUESTION = "is there a red circle left of the blue square in the image ? answer with one word ."

WIDTHS = {
    # name: (hidden, heads, kv_heads, intermediate)
    "cpu": (512, 8, 8, 1376),
    "tiny": (64, 4, 4, 128),  # a dry run of the code path (about a minute of one CPU core); its timings mean little
}
TTFT_GOAL_7B = 0.40  # SparseVLM at 64 tokens: time to first token at most this share of dense, on the 7B shape

# (method, budget): dense, SparseVLM at three budgets, every other registered method at 64.
BUDGETS = {"sparsevlm": (192, 128, 64)}


# Grid sides: LLaVA-1.5's 24 x 24 = 576 visual tokens, and a long sequence of 54 x 54 = 2,916 (one square grid
# standing in for LLaVA-NeXT's five 24 x 24 views and their newlines, about 2,900 tokens); "next": LLaVA-NeXT
# itself (its base view's 24 x 24 grid; the picture below gives 2,928 tokens).
GRID_SIDES = {"576": 24, "long": 54, "next": 24}
NEXT_PICTURE = (672, 672)  # (width, height): LLaVA-v1.6's 2 x 2 pinpoint, no unpadding
NEXT_BUDGETS = (320,)  # the papers' LLaVA-NeXT budgets are 640 / 320 / 160 of up to 2,880


def cases(accountings: tuple[str, ...] = ACCOUNTINGS, methods: tuple[str, ...] | None = None,
          visual: int = 576, budgets: tuple[int, ...] | None = None) -> list[tuple[str, int, str, dict]]:
    """(method, budget, accounting, options): dense; every budgeted method at its budgets in each accounting; a
    method whose own rule sets the counts (ZipVL) once per benchmark setting, with no budget."""
    out = [("dense", visual, "paper", {})]
    for method in METHODS:
        if method == "dense" or (methods is not None and method not in methods):
            continue
        m = get_method(method)
        if not m.budgeted:
            out += [(method, visual, "paper", dict(o)) for o in m.benchmark_options]
            continue
        for accounting in accountings:
            out += [(method, b, accounting, {}) for b in (budgets or BUDGETS.get(method, (64,)))]
    return out


def case_label(case: tuple[str, int, str, dict]) -> str:
    method, budget, accounting, options = case
    if options:
        return setting_label(method, options)
    return f"{method}-{budget}-{accounting}"


# --width 7b: the full published shape of each family's 7B preset, random weights.
PRESET_7B = {False: ("llava-hf/llava-1.5-7b-hf", "LLaVA-1.5-7B"),
             True: ("llava-hf/llava-v1.6-vicuna-7b-hf", "LLaVA-NeXT-7B")}


def build(width: str, device: str, dtype: torch.dtype, side: int = 24, anyres: bool = False):
    if width == "7b":
        if side != 24:
            raise ConfigError("--visual long runs at the cpu and tiny widths (the 7B preset has its 24 x 24 grid)")
        # The preset's full published shape (LLaVA-1.5-7B, or LLaVA-NeXT-7B with its anyres processor and
        # pinpoints; Vicuna-7B decoder, CLIP-L/336 tower), random weights made directly on `device` in `dtype`.
        preset, label = PRESET_7B[anyres]
        model, processor = preset_llava(preset, reduce=False, dtype=dtype, device=device)
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        return from_objects(model, processor, name=f"random {label} (full shape, {params:,} parameters)")
    if anyres:
        hidden, heads, kv, inter = WIDTHS[width]
        model, processor = tiny_llava_next(
            "llama", image_size=336, patch_size=14, hidden=hidden, layers=32, heads=heads, kv_heads=kv,
            intermediate=inter, vision_hidden=64, vision_layers=2, dtype=dtype, context=4096,
        )
        return from_objects(model.to(device), processor,
                            name=f"random LLaVA-NeXT 32 layers x {hidden} ({width}), anyres 336 px tiles")
    hidden, heads, kv, inter = WIDTHS[width]
    model, processor = tiny_llava(
        "llama", image_size=side * 14, patch_size=14, hidden=hidden, layers=32, heads=heads, kv_heads=kv,
        intermediate=inter, vision_hidden=64, vision_layers=2, dtype=dtype, context=max(2048, 2 * side * side),
    )
    model = model.to(device)
    return from_objects(model, processor, name=f"random LLaVA 32 layers x {hidden} ({width}), {side * side} visual "
                                                  "tokens")


def bench(width: str = "cpu", runs: int = 5, warmup: int = 2, device: str | None = None,
          accountings: tuple[str, ...] = ACCOUNTINGS, methods: tuple[str, ...] | None = None,
          visual: str = "576") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if width == "7b" and not str(device).startswith("cuda"):
        raise ConfigError(f"--width 7b builds {PRESET_7B[visual == 'next'][1]}'s full shape (13.2 GiB in fp16) and "
                          "needs a CUDA GPU; on a CPU use --width cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    if visual not in GRID_SIDES:
        raise ConfigError(f"--visual must be one of {', '.join(GRID_SIDES)}, not {visual!r}")
    side = GRID_SIDES[visual]
    anyres = visual == "next"
    lm = build(width, device, dtype, side, anyres)
    shape = (NEXT_PICTURE[1], NEXT_PICTURE[0], 3) if anyres else (side * 14, side * 18, 3)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, shape, dtype=np.uint8))
    tokens = layout_for(lm, image.size).total  # the picture's visual tokens (LLaVA-NeXT: base + tiles + newlines)
    configs, unavailable = {}, {}
    for case in cases(accountings, methods, tokens, NEXT_BUDGETS if anyres else None):
        method, budget, accounting, options = case
        cfg = PruneConfig(method=method, budget=budget if method != "dense" else 64, accounting=accounting,
                          options=options)
        try:
            cfg.validate(tokens)
            run(lm, image, QUESTION, cfg, max_new_tokens=1)  # also the first warm-up round
            configs[case_label(case)] = (case, cfg)
        except ConfigError as e:  # e.g. [CLS]-based selection on a tower without [CLS]: reported, not hidden
            unavailable[case_label(case)] = str(e)
    samples: dict[str, list] = {label: [] for label in configs}
    for _ in range(max(0, warmup - 1)):
        for _, cfg in configs.values():
            run(lm, image, QUESTION, cfg, max_new_tokens=1)
    # Interleave the methods so drift in machine load hits them all alike.
    for _ in range(runs):
        for label, (_, cfg) in configs.items():
            samples[label].append(run(lm, image, QUESTION, cfg, max_new_tokens=1).trace)
    rows = []
    dense_case = case_label(("dense", tokens, "paper", {}))
    dense_ms = statistics.median(t.timings_ms.llm_prefill for t in samples[dense_case])
    dense_ttft = statistics.median(t.timings_ms.prefill for t in samples[dense_case])
    dense_flops = samples[dense_case][0].cost.prefill_flops
    for label, traces in samples.items():
        (method, budget, accounting, options), _ = configs[label]
        ms = statistics.median(t.timings_ms.llm_prefill for t in traces)
        overhead = statistics.median(t.timings_ms.prune_overhead for t in traces)
        ttft = statistics.median(t.timings_ms.prefill for t in traces)
        peaks = [t.memory.peak_gpu_bytes for t in traces if t.memory.peak_gpu_bytes is not None]
        t0 = traces[0]
        time_ratio = ms / dense_ms
        flops_ratio = t0.cost.prefill_flops / dense_flops
        budgeted = method != "dense" and get_method(method).budgeted
        rows.append({
            "method": method,
            "setting": label,
            "options": options,
            "budget": budget if budgeted else None,
            "accounting": accounting if budgeted else None,
            "equal_tokens": round(t0.cost.equal_tokens, 2),
            "equal_tokens_output": round(t0.cost.equal_tokens_reference, 2),
            "prefill_ms_median": round(ms, 2),
            "prefill_ms_runs": [round(t.timings_ms.llm_prefill, 2) for t in traces],
            "time_ratio": round(time_ratio, 4),
            "flops_ratio": round(flops_ratio, 4),
            "time_over_flops": round(time_ratio / flops_ratio, 3),
            "kv_ratio": round(t0.cost.kv_bytes / t0.cost.kv_bytes_dense, 4),
            "attended_share": round(statistics.median(t.cost.attended_share for t in traces), 4)
            if t0.cost.attended_share is not None else None,
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
    if anyres:  # random has no overhead: its time / FLOPs is this machine's floor; each method within 1.10x of it
        floor = {r["accounting"]: r["time_over_flops"] for r in rows if r["method"] == "random"}
        for r in rows:
            if r["budget"] is not None and r["method"] != "random" and r["accounting"] in floor:
                targets[f"{r['setting']}_time_over_flops_within_1.10x_random"] = \
                    r["time_over_flops"] <= 1.10 * floor[r["accounting"]]
    return {
        "model": lm.name,
        "visual_tokens": tokens,
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


def _options_text(options: dict | None) -> str:
    return " (" + ", ".join(f"{k} {v}" for k, v in options.items()) + ")" if options else ""


def format_table(result: dict) -> str:
    lines = [
        f"model: {result['model']}  device: {result['device']} {result['dtype']}  threads: {result['threads']}  "
        f"runs: {result['runs']} (after {result['warmup']} warm-up)",
        f"measured: {result['measured']}",
        "",
        "| method | budget | accounting | equal tokens (in) | equal tokens (out) | prefill ms (median) | time ratio | "
        "FLOPs ratio | time/FLOPs | KV ratio | attended share | overhead ms | overhead / dense | TTFT ms (median) | "
        "TTFT ratio | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = r.get("peak_gpu_mib")
        lines.append(
            f"| {r['method']}{_options_text(r.get('options'))} | {r['budget'] or '-'} | {r['accounting'] or '-'} | "
            f"{r['equal_tokens']} | {r['equal_tokens_output']} | {r['prefill_ms_median']:.1f} | "
            f"{r['time_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['time_over_flops']:.2f} | "
            f"{r.get('kv_ratio', float('nan')):.3f} | "
            f"{'-' if r.get('attended_share') is None else format(r['attended_share'], '.3f')} | "
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
