"""Dense accuracy of a scenes model on the fixed held-out set, per question family.

    python -m training.evaluate --model assets/models/scenes-llava --n 3000
    python -m training.evaluate --model DIR --world v2 --n 3000           # the embedded model's world
    python -m training.evaluate --model DIR --world independent --n 700   # the independent renderer

`--world` (default: the model's own, `worlds.world_of_model`; the embedded model's for a folder that records none):
v2 (`world.py`, the embedded model's world) or independent (`independent.py`: a second held-out set, drawn by
separately written code). The quality bars (`model_card.py`): own world >= 97% overall and >= 90% in every family;
independent >= 90% overall.

Plain greedy `model.generate` on the single-turn LLaVA prompt, batched with left padding; an answer counts when
the generated text (special tokens dropped) equals the one-word answer exactly. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sparsevlm.scenes import worlds
from sparsevlm.scenes.world import FAMILIES
from sparsevlm.scenes.worlds import DEFAULT_WORLD, WORLDS, world_of_model
from sparsevlm.tokenizer import prompt_for

# the 336 px worlds' held-out seeds: this evaluation's (the high-resolution worlds' is training/evaluate_next.py)
DEFAULT_SEEDS = {w: worlds.DEFAULT_SEEDS[w] for w in WORLDS}

__all__ = ["DEFAULT_SEEDS", "WORLDS", "answer", "evaluate", "heldout_item", "load", "question_kind"]


def heldout_item(index: int, seed: int, world: str = DEFAULT_WORLD):
    """(picture, Sample) number `index` of a world's held-out set (`worlds.heldout_item`, kept for callers)."""
    item = worlds.heldout_item(index, seed, world)
    return item.image, item.sample


def load(model_dir: str | Path) -> tuple[LlavaForConditionalGeneration, object]:
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor


@torch.no_grad()
def answer(model, processor, images, questions: list[str], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers to single-turn questions (one picture each), batched with left padding."""
    enc = processor(images=images, text=[prompt_for(q) for q in questions], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def question_kind(question: str, family: str) -> str | None:
    """The sub-kind of a position or relation question (row / column, left of / above), None otherwise."""
    q = f" {question.lower().replace('?', ' ?')} "
    if family == "position":
        return "row" if " row " in q else "column"
    if family == "relation":
        return next(k for k in ("left of", "right of", "above", "below", "under") if f" {k} " in q)
    return None


def evaluate(model, processor, n: int, seed: int | None = None, batch_size: int = 16, log_every: int = 0,
             world: str = DEFAULT_WORLD) -> dict:
    seed = DEFAULT_SEEDS[world] if seed is None else seed
    correct = {f: 0 for f in FAMILIES}
    total = {f: 0 for f in FAMILIES}
    detail: dict[str, list[int]] = {}
    t0 = time.time()
    for start in range(0, n, batch_size):
        items = [heldout_item(i, seed, world) for i in range(start, min(n, start + batch_size))]
        preds = answer(model, processor, [im for im, _ in items], [s.question for _, s in items])
        for (_, s), p in zip(items, preds, strict=True):
            correct[s.family] += int(p == s.answer)
            total[s.family] += 1
            if kind := question_kind(s.question, s.family):
                d = detail.setdefault(f"{s.family}: {kind}", [0, 0])
                d[0] += int(p == s.answer)
                d[1] += 1
        if log_every and (start // batch_size) % log_every == 0:
            done = sum(total.values())
            print(f"  {done}/{n}  acc {sum(correct.values()) / done:.3f}  {time.time() - t0:.0f}s", flush=True)
    result = {
        f: {"correct": correct[f], "total": total[f], "accuracy": correct[f] / total[f]} for f in FAMILIES if total[f]
    }
    result["overall"] = {
        "correct": sum(correct.values()),
        "total": sum(total.values()),
        "accuracy": sum(correct.values()) / max(1, sum(total.values())),
    }
    result["detail"] = {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(detail.items())}
    result["seconds"] = round(time.time() - t0, 1)
    result["world"] = world
    result["seed"] = seed
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/models/scenes-llava")
    p.add_argument("--n", type=int, default=3000, help="held-out questions (families round-robin)")
    p.add_argument("--world", default=None, choices=WORLDS,
                   help="whose held-out set (default: the model's own world, training_state.json 'world'; "
                        f"{DEFAULT_WORLD} for a folder that records none)")
    p.add_argument("--seed", type=int, default=None, help="held-out seed (default: the world's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = args.world or world_of_model(args.model)
    if world is None:
        world = DEFAULT_WORLD
        print(f"{args.model} records no world of its own (training_state.json 'world'): evaluating on {world}")
    if world not in WORLDS:
        raise SystemExit(f"{args.model} is a model of the {world} world: evaluate it with training.evaluate_next")
    model, processor = load(args.model)
    result = evaluate(model, processor, args.n, args.seed, args.batch_size, log_every=10, world=world)
    result["model"] = args.model
    print(f"{'family':<10} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for name in (*FAMILIES, "overall"):
        if name in result:
            r = result[name]
            print(f"{name:<10} {r['correct']:>8} {r['total']:>6} {r['accuracy']:>9.3f}")
    for name, r in result["detail"].items():
        print(f"  {name:<18} {r['correct']:>6} {r['total']:>6} {r['accuracy']:>9.3f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
