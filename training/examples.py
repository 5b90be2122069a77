"""Write the app's one-click examples: generated scenes (one per question family) and examples.json.

    python -m training.examples --out assets/examples    # the installed model's world (scripts/ship_v2.sh)

Scenes come from their own seed range (neither training nor the held-out set) and are busy: 9-12 objects, so
a 64-token budget cannot keep every object. They are drawn from the world the embedded model was trained on
(`worlds.world_of_model`): the examples show what the model was trained to answer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparsevlm.scenes import world as world_v2
from sparsevlm.scenes.world import FAMILIES

EXAMPLES_SEED = 20_000_000
EXAMPLE_WORLDS = ("v2",)  # the world the embedded model is trained on (the independent renderer is a test set only)
_MAKERS = {"v2": (world_v2.make_scene, world_v2.ask, world_v2.render)}


def write_examples(out: Path, seed: int = EXAMPLES_SEED, world: str = "v2") -> list[dict]:
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
