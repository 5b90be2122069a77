"""Every decision the engine makes, dumped as JSON, to prove that a refactor changes none of them.

    python scripts/dump_decisions.py --out before.json     # on the code before the change
    python scripts/dump_decisions.py --out after.json      # after it
    python scripts/dump_decisions.py --compare before.json after.json

Runs every registered method at several budgets, in both accountings, with both position modes where a method
has them, on the embedded model (two example pictures) and on tiny random-weight LLaVAs of each decoder family
at two grid sizes, and keeps everything decided or computed, not measured: the answer,
every stage (kept and merged patches, scores, ranks, raters), ZipVL's attended sets, the counts, the FLOPs / KV
figures, the attention profile. Measured times are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIMED = ("overhead_ms", "ms")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not k.endswith("_ms") and k not in TIMED}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x


def decided(trace) -> dict:
    d = trace.to_dict()
    keep = {k: d.get(k) for k in ("method", "config", "answer", "generated_tokens", "prefix_tokens", "visual_tokens",
                                  "text_tokens", "raters", "stages", "layers", "attention", "attention_profile",
                                  "notes", "grid", "input_region", "image_size")}
    keep["cost"] = d.get("cost")
    keep["memory"] = {k: v for k, v in (d.get("memory") or {}).items() if k.startswith("kv_")}
    return _strip(keep)


def configs(grid_tokens: int):
    from sparsevlm.config import PruneConfig
    from sparsevlm.methods import METHODS

    budgets = [b for b in (16, 64, 128, 192) if b < grid_tokens] or [grid_tokens // 2]
    for method in METHODS:
        if method == "dense":
            yield PruneConfig(method="dense")
            continue
        for accounting in ("paper", "flops"):
            for budget in budgets:
                yield PruneConfig(method=method, budget=budget, accounting=accounting)
        if method in ("sparsevlm", "fastv"):
            yield PruneConfig(method=method, budget=budgets[-1], positions="compact")
    yield PruneConfig(method="zipvl", tau=0.9, selection="per-head")
    yield PruneConfig(method="zipvl", tau=0.95, probes="both")
    yield PruneConfig(method="zipvl", budget=budgets[1 % len(budgets)], fit="budget")
    for mode in ("paper", "code"):
        yield PruneConfig(method="sparsevlm", budget=budgets[0], count_mode=mode)
    yield PruneConfig(method="sparsevlm", budget=budgets[0], recycle=False)
    yield PruneConfig(method="fastv", budget=budgets[0], fastv_k=3)


def models():
    from PIL import Image

    from sparsevlm.loading import from_objects, load_model
    from sparsevlm.testing import tiny_llava

    examples = json.loads((ROOT / "assets/examples/examples.json").read_text())
    pics = [(Image.open(ROOT / "assets/examples" / e["image"]).convert("RGB"), e["question"]) for e in examples[:2]]
    yield "embedded", load_model(str(ROOT / "assets/models/scenes-llava")), pics
    from PIL import ImageDraw

    img = Image.new("RGB", (200, 150), (235, 238, 242))
    dr = ImageDraw.Draw(img)
    dr.ellipse((20, 30, 80, 90), fill=(220, 40, 40))
    dr.rectangle((110, 70, 180, 140), fill=(40, 80, 220))
    for arch, size in (("llama", 112), ("qwen2", 112), ("llama", 224)):
        model, processor = tiny_llava(arch, image_size=size)
        name = f"tiny-{arch}-{size}"
        yield name, from_objects(model.eval(), processor, name), [(img, "what colour is the circle ?")]


def dump(out: Path) -> None:
    import torch

    from sparsevlm.errors import ConfigError
    from sparsevlm.pipeline import Decoding, run_shared

    torch.manual_seed(0)
    result: dict = {}
    for name, lm, pics in models():
        cfgs = list(configs(lm.visual_tokens))
        for p, (img, question) in enumerate(pics):
            runs = run_shared(lm, img, question, cfgs, Decoding(6))
            for cfg, r in zip(cfgs, runs):
                key = f"{name}/{p}/{json.dumps(cfg.to_dict(), sort_keys=True)}"
                result[key] = str(r) if isinstance(r, ConfigError) else decided(r.trace)
        print(f"{name}: {len(cfgs)} configs x {len(pics)} pictures", file=sys.stderr)
    out.write_text(json.dumps(result, indent=0, sort_keys=True))
    print(f"{len(result)} runs -> {out}", file=sys.stderr)


def compare(a: Path, b: Path) -> int:
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    missing = sorted(set(da) ^ set(db))
    differ = [k for k in sorted(set(da) & set(db)) if da[k] != db[k]]
    for k in missing[:10]:
        print("only in one:", k)
    for k in differ[:10]:
        fields = [f for f in set(da[k]) | set(db[k]) if da[k].get(f) != db[k].get(f)] if isinstance(da[k], dict) \
            else ["error"]
        print("differs:", k, "fields:", sorted(fields))
    print(f"{len(set(da) & set(db))} runs in both; {len(differ)} differ; {len(missing)} in one only")
    return 1 if differ or missing else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", nargs=2, type=Path)
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out or --compare")
    dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
