"""The picture worlds behind one interface: held-out items, studio items and the objects behind the evidence.

    from sparsevlm.scenes.worlds import heldout_item, studio_item, world_of_model
    item = heldout_item(0, world="v2")     # .image, .sample (question, answer, family, evidence), .target()
    item = studio_item(7, "count", "independent")

- "v2": `world.py`, the world the embedded model is trained on;
- "independent": `independent.py`, pictures drawn by separate code that no model trains on.

Every world draws 336 px pictures and gives evidence patches on the same 24x24 grid (cells covered >= 5% by the
masks of the objects the answer depends on). Nothing here draws or asks: each world's own functions do; this
module only picks them and names what they return the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from . import independent
from . import world as world_v2
from .world import COVER_FRACTION, FAMILIES, GRID, IMAGE_SIZE, MAX_OBJECTS, PATCH, Sample

WORLDS = ("v2", "independent")
WORLD_LABELS = {
    "v2": "v2: the embedded model's world (any size and place, paraphrases)",
    "independent": "independent renderer: pictures no model was trained on",
}
DEFAULT_WORLD = "v2"  # the embedded model's: drawn for a model whose folder records no world of these
DEFAULT_SEEDS = {"v2": world_v2.HELDOUT_SEED, "independent": independent.INDEPENDENT_SEED}
assert GRID * PATCH == IMAGE_SIZE == independent.SIZE and independent.CELL == PATCH  # one grid for all worlds


class WorldError(ValueError):
    """An unknown world name (the app and the CLIs turn it into their own clear message)."""


def check_world(world: str) -> str:
    if world not in WORLDS:
        raise WorldError(f"unknown world {world!r}: choose one of {', '.join(WORLDS)}")
    return world


# Per world: its own scene maker, question asker, renderer, object list, mask of one object, and the object count
# range the studio draws from. Lambdas only adapt names; every one calls the world's own code.
_API: dict[str, SimpleNamespace] = {
    "v2": SimpleNamespace(
        make=lambda seed, n, label: world_v2.make_scene(seed, n, with_label=label),
        ask=world_v2.ask, render=world_v2.render, objects=lambda s: s.objects,
        mask=world_v2.object_mask, max_objects=MAX_OBJECTS),
    "independent": SimpleNamespace(
        make=lambda seed, n, label: independent.make_independent_scene(seed, n, with_card=label),
        ask=independent.ask_independent, render=independent.render_independent, objects=lambda s: s.things,
        mask=independent._mask, max_objects=10),  # noqa: SLF001 - the renderer's own mask of one thing
}
_HELDOUT: dict[str, Callable[[int, int], tuple[object, Sample]]] = {
    "v2": world_v2.heldout_sample,
    "independent": independent.independent_scene_sample,
}


@dataclass(frozen=True)
class EvidenceObject:
    """One drawn object as the likeness measurement needs it: its words and its pixels."""

    index: int
    colour: str
    shape: str
    mask: np.ndarray  # (336, 336) bool

    def patches(self) -> list[int]:
        """Grid cells (row * 24 + col) the object covers >= 5%: the rule every world's evidence uses."""
        frac = self.mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
        return [int(j) for j in np.flatnonzero(frac >= COVER_FRACTION)]

    def cover(self) -> np.ndarray:
        """(576,) fraction of each grid cell the object covers (core patches: >= 0.5)."""
        return self.mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)


@dataclass
class WorldItem:
    """A picture and one question about it, with the scene kept to answer 'which objects are the evidence'."""

    world: str
    image: Image.Image
    sample: Sample  # question, answer, family, evidence (24x24 grid)
    scene: object

    def objects(self) -> list[EvidenceObject]:
        """Every drawn object (the label card excluded), with its colour and shape words and its mask."""
        api = _API[self.world]
        return [EvidenceObject(i, o.colour, o.shape, np.asarray(api.mask(self.scene, i), dtype=bool))
                for i, o in enumerate(api.objects(self.scene))]

    def target(self) -> EvidenceObject | None:
        """The one object whose covered patches are exactly the evidence (what colour and shape questions ask
        about), None when the evidence is not one object's (counts, relations, the label, no evidence)."""
        if not self.sample.evidence:
            return None
        for o in self.objects():
            if o.patches() == list(self.sample.evidence):
                return o
        return None


def heldout_item(index: int, seed: int | None = None, world: str = DEFAULT_WORLD) -> WorldItem:
    """Item `index` of a world's fixed held-out set (seed: the world's own by default)."""
    check_world(world)
    scene, sample = _HELDOUT[world](index, DEFAULT_SEEDS[world] if seed is None else seed)
    return WorldItem(world, _API[world].render(scene), sample, scene)


def studio_item(seed: int, family: str, world: str = DEFAULT_WORLD) -> WorldItem:
    """A scene of `world` with a question of `family`, deterministic from (seed, family, world): the app's scene
    studio. Object counts 1..the world's maximum, a label card 30% of the time (always for reading)."""
    check_world(world)
    if family not in FAMILIES:
        raise WorldError(f"unknown question family {family!r}: choose one of {', '.join(FAMILIES)}")
    api = _API[world]
    for k in range(1000):  # a scene may not allow the family (no label to read): the next draw of the same seed
        rng = np.random.default_rng([seed, 20, k])
        scene = api.make(int(rng.integers(2**31)), int(rng.integers(1, api.max_objects + 1)),
                         family == "read" or bool(rng.random() < 0.3))
        sample = api.ask(scene, family, rng)
        if sample is not None:
            return WorldItem(world, api.render(scene), sample, scene)
    raise WorldError(f"no {family} question found for seed {seed} in world {world}")


def world_of_model(model_dir: str | Path | None) -> str | None:
    """The world a scenes model was trained on: its folder's `training_state.json` key "world", when that names one
    of `WORLDS`. None when the folder records none (a hub checkpoint has no such file: it was trained on none of
    these worlds) or one this package no longer draws; callers then draw `DEFAULT_WORLD` and do not call it the
    model's own."""
    if model_dir is None:
        return None
    try:
        world = json.loads((Path(model_dir) / "training_state.json").read_text()).get("world")
    except (OSError, ValueError, AttributeError):
        return None
    return world if world in WORLDS else None


def world_order(own: str | None) -> list[str]:
    """The worlds with the model's own in front (`DEFAULT_WORLD` when it has none), the others in their usual
    order."""
    first = own if own in WORLDS else DEFAULT_WORLD
    return [first, *(w for w in WORLDS if w != first)]
