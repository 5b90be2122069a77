"""Write the app's one-click examples: generated scenes (one per question family) and examples.json.

    python -m training.examples --out assets/examples    # the installed model's world (scripts/ship_v2.sh)
    python -m training.examples --world hires --out assets/examples-next   # scenes-llava-next's high-resolution

Scenes come from their own seed range (neither training nor the held-out set) and are busy: 9-12 objects, so
a 64-token budget cannot keep every object. They are drawn from the world the embedded model was trained on
(`worlds.world_of_model`): the examples show what the model was trained to answer.

The high-resolution examples (`--world hires`) are pictures of the high-resolution world, one per question family,
at LLaVA-NeXT's pinpoint sizes in turn (672x672, 1008x336, 336x1008, 672x336, 336x672) with as many objects as
the size allows and a label card, for the embedded high-resolution model `scenes-llava-next`: each item names it
(`"model"`), and its evidence is given as cells of the whole picture's full-resolution 14-px grid
(`"evidence_cells"`, with the picture's `"size"`), not as patches of one 24x24 grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparsevlm.scenes import hires
from sparsevlm.scenes import world as world_v2
from sparsevlm.scenes.world import FAMILIES

EXAMPLES_SEED = 20_000_000
NEXT_EXAMPLES_SEED = 21_000_000  # high-resolution examples: apart from hires training (7M) and held-out (50M) seeds
NEXT_MODEL = "scenes-llava-next"  # the preset the high-resolution examples run on
EXAMPLE_WORLDS = ("v2", "hires")  # the embedded models' worlds (the independent renderers are test sets only)
_MAKERS = {"v2": (world_v2.make_scene, world_v2.ask, world_v2.render)}


def write_examples(out: Path, seed: int = EXAMPLES_SEED, world: str = "v2") -> list[dict]:
    if world == "hires":
        return write_next_examples(out, NEXT_EXAMPLES_SEED if seed == EXAMPLES_SEED else seed)
    if world not in _MAKERS:
        raise ValueError(f"unknown example world {world!r}: choose one of {', '.join(EXAMPLE_WORLDS)}")
    make_scene, ask, render = _MAKERS[world]
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for k, family in enumerate(FAMILIES):
        s = seed + 1000 * k
        while True:
            rng = np.random.default_rng([s, 5])
            scene = make_scene(s, int(rng.integers(9, 13)), with_label=True)
            sample = ask(scene, family, rng)
            if sample is not None:
                break
            s += 1
        name = f"{k + 1:02d}-{family}.png"
        render(scene).save(out / name)
        items.append({"image": name, **sample.to_dict(), "seed": s, "world": world})
    (out / "examples.json").write_text(json.dumps(items, indent=1) + "\n")
    return items


def write_next_examples(out: Path, seed: int = NEXT_EXAMPLES_SEED) -> list[dict]:
    """One high-resolution picture per question family for scenes-llava-next (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for k, family in enumerate(FAMILIES):
        size = hires.SIZES[k % len(hires.SIZES)]
        s = seed + 1000 * k
        while True:
            rng = np.random.default_rng([s, 5])
            scene = hires.make_scene(s, size, hires.max_objects(*size), with_label=True)
            sample = hires.ask(scene, family, rng)
            if sample is not None:
                break
            s += 1
        name = f"next-{k + 1:02d}-{family}.png"
        hires.render(scene).save(out / name)
        d = sample.to_dict()
        items.append({"image": name, "question": d["question"], "answer": d["answer"], "family": d["family"],
                      "evidence_cells": d["evidence"], "size": list(size), "seed": s, "world": "hires",
                      "model": NEXT_MODEL})
    (out / "examples.json").write_text(json.dumps(items, indent=1) + "\n")
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/examples")
    p.add_argument("--world", default="v2", choices=EXAMPLE_WORLDS,
                   help="whose scenes: the embedded model's own world")
    args = p.parse_args()
    for it in write_examples(Path(args.out), world=args.world):
        print(f"{it['image']}: {it['question']} -> {it['answer']}")


if __name__ == "__main__":
    main()
