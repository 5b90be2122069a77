"""Write the app's one-click examples: generated scenes (one per question family) and examples.json.

    python -m sparsevlm.scenes.examples --out assets/examples

Scenes come from their own seed range (neither training nor the held-out set) and are busy: 9-12 objects, so
a 64-token budget cannot keep every object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .generator import FAMILIES, ask, make_scene, render

EXAMPLES_SEED = 20_000_000


def write_examples(out: Path, seed: int = EXAMPLES_SEED) -> list[dict]:
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
        items.append({"image": name, **sample.to_dict(), "seed": s})
    (out / "examples.json").write_text(json.dumps(items, indent=1) + "\n")
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/examples")
    args = p.parse_args()
    for it in write_examples(Path(args.out)):
        print(f"{it['image']}: {it['question']} -> {it['answer']}")


if __name__ == "__main__":
    main()
