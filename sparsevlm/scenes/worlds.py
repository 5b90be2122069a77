"""The picture worlds behind one interface: held-out items, studio items and the objects behind the evidence.

    from sparsevlm.scenes.worlds import heldout_item, studio_item, world_of_model
    item = heldout_item(0, world="v2")     # .image, .sample (question, answer, family, evidence), .target()
    item = studio_item(7, "count", "independent")
    item = heldout_item(0, world="hires")  # a LLaVA-NeXT-sized picture; item.grid: its 14-px grid (rows, cols)

The 336 px worlds (`WORLDS`, LLaVA-1.5's one view):

- "v2": `world.py`, the world the embedded model is trained on;
- "independent": `independent.py`, pictures drawn by separate code that no model trains on.

The high-resolution worlds (`HIRES_WORLDS`, at LLaVA-NeXT's anyres sizes 672x672, 1008x336, 336x1008, 672x336,
336x672):

- "hires": `hires.py`, the world the high-resolution embedded model (scenes-llava-next) is trained on;
- "independent-hires": `independent_hires.py`, the independent renderer at those sizes, measurement only.

Evidence is the cells of the 14-px grid over the whole picture at full resolution (row * (width // 14) + col)
covered >= 5% by the masks of the objects the answer depends on: the 24x24 grid of a 336 px picture, 48x48 of a
672x672 one (`WorldItem.grid`). Held-out items of the 336 px worlds are one question a picture (families
round-robin); a high-resolution held-out picture k carries one question of each family it allows and item i is
the i-th question of pictures 0, 1, 2, ... in that order, the questions `training/evaluate_next.py` asks. Nothing
here draws or asks: each world's own functions do; this module only picks them and names what they return the
same way.
"""

from __future__ import annotations

import bisect
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from . import hires, independent, independent_hires
from . import world as world_v2
from .world import COVER_FRACTION, FAMILIES, GRID, IMAGE_SIZE, MAX_OBJECTS, PATCH, Sample

WORLDS = ("v2", "independent")  # the 336 px worlds: one 24x24 grid, what a LLaVA-1.5 model and its studio draw
HIRES_WORLDS = ("hires", "independent-hires")  # LLaVA-NeXT's sizes: what a model of the "hires" world draws
ALL_WORLDS = WORLDS + HIRES_WORLDS
WORLD_LABELS = {
    "v2": "v2: the embedded model's world (any size and place, paraphrases)",
    "independent": "independent renderer: pictures no model was trained on",
    "hires": "hires: the high-resolution model's world (LLaVA-NeXT sizes, small objects)",
    "independent-hires": "independent renderer at LLaVA-NeXT sizes: pictures no model was trained on",
}
DEFAULT_WORLD = "v2"  # the embedded model's: drawn for a model whose folder records no world of these
DEFAULT_SEEDS = {"v2": world_v2.HELDOUT_SEED, "independent": independent.INDEPENDENT_SEED,
                 "hires": hires.HIRES_HELDOUT_SEED, "independent-hires": independent_hires.INDEPENDENT_HIRES_SEED}
# (width, height) of every picture a world draws
SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "v2": ((IMAGE_SIZE, IMAGE_SIZE),), "independent": ((independent.SIZE, independent.SIZE),),
    "hires": hires.SIZES, "independent-hires": independent_hires.SIZES}
assert GRID * PATCH == IMAGE_SIZE == independent.SIZE and independent.CELL == PATCH  # one grid for the 336 worlds
assert all(w % PATCH == 0 and h % PATCH == 0 for sizes in SIZES.values() for w, h in sizes)  # whole 14-px cells


class WorldError(ValueError):
    """An unknown world name (the app and the CLIs turn it into their own clear message)."""


def check_world(world: str) -> str:
    if world not in ALL_WORLDS:
        raise WorldError(f"unknown world {world!r}: choose one of {', '.join(ALL_WORLDS)}")
    return world


def _studio_size(seed: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """A studio picture's size, drawn from its scene seed: each of the world's sizes as often."""
    return sizes[int(np.random.default_rng([seed, 22]).integers(len(sizes)))]


def _independent_hires_scene(seed: int, n: int, card: bool):
    size = _studio_size(seed, independent_hires.SIZES)
    most = min(10, 3 * size[0] * size[1] // (336 * 336))  # as its held-out pictures: 3 per tile of area, <= 10
    return independent_hires.make_scene(seed, size, min(n, most), card)


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
    "hires": SimpleNamespace(  # make_scene keeps a picture's objects to 3 per tile of area, at most 12
        make=lambda seed, n, label: hires.make_scene(seed, _studio_size(seed, hires.SIZES), n, label),
        ask=hires.ask, render=hires.render, objects=lambda s: s.objects, mask=hires.object_mask,
        max_objects=12),
    "independent-hires": SimpleNamespace(
        make=_independent_hires_scene, ask=independent_hires.ask, render=independent.render_independent,
        objects=lambda s: s.things, mask=independent_hires.mask, max_objects=10),
}
# 336 px worlds: held-out item i is one picture and its question
_HELDOUT: dict[str, Callable[[int, int], tuple[object, Sample]]] = {
    "v2": world_v2.heldout_sample,
    "independent": independent.independent_scene_sample,
}
# high-resolution worlds: held-out picture k and one question of each family it allows
_HELDOUT_PICTURES: dict[str, Callable[[int, int], tuple[object, list[Sample]]]] = {
    "hires": hires.heldout_picture,
    "independent-hires": independent_hires.heldout_picture,
}


@dataclass(frozen=True)
class EvidenceObject:
    """One drawn object as the likeness measurement needs it: its words and its pixels."""

    index: int
    colour: str
    shape: str
    mask: np.ndarray  # (height, width) bool: (336, 336) in the 336 px worlds

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the picture's 14-px grid: 24x24 for a 336 px picture, 24x48 for a 672x336 one."""
        h, w = self.mask.shape
        return h // PATCH, w // PATCH

    def cover(self) -> np.ndarray:
        """(rows * cols,) fraction of each cell of the picture's 14-px grid the object covers (core patches:
        >= 0.5); 576 cells on a 336 px picture."""
        rows, cols = self.grid
        return self.mask[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH).mean(axis=(1, 3)).reshape(-1)

    def patches(self) -> list[int]:
        """Grid cells (row * cols + col) the object covers >= 5%: the rule every world's evidence uses."""
        return [int(j) for j in np.flatnonzero(self.cover() >= COVER_FRACTION)]


@dataclass
class WorldItem:
    """A picture and one question about it, with the scene kept to answer 'which objects are the evidence'."""

    world: str
    image: Image.Image
    sample: Sample  # question, answer, family, evidence (cells of the picture's 14-px grid, `grid`)
    scene: object
    picture: int | None = None  # a high-resolution held-out item's picture index (its questions share it)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the 14-px grid the evidence is on: (24, 24) in the 336 px worlds, the whole picture
        at full resolution in the high-resolution ones (48x48 for 672x672, 24x72 for 1008x336)."""
        w, h = self.image.size
        return h // PATCH, w // PATCH

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
    """Item `index` of a world's fixed held-out set (seed: the world's own by default). In a high-resolution
    world, the index-th question of held-out pictures 0, 1, 2, ... (each with one question of each family it
    allows, in family order): items 0..n-1 are the n questions `training.evaluate_next --n n` asks."""
    check_world(world)
    seed = DEFAULT_SEEDS[world] if seed is None else seed
    if world in _HELDOUT:
        scene, sample = _HELDOUT[world](index, seed)
        return WorldItem(world, _API[world].render(scene), sample, scene)
    k, j = _question_place(world, seed, index)
    scene, samples = _heldout_picture(world, seed, k)
    return WorldItem(world, _rendered(world, seed, k).copy(), samples[j], scene, k)


# Finding item i needs the question counts of the pictures before its own: asking them draws their scenes and
# masks but renders nothing. The counts are kept per (world, seed), the last few pictures and renders too.
@functools.lru_cache(maxsize=4)
def _heldout_picture(world: str, seed: int, k: int) -> tuple[object, list[Sample]]:
    scene, samples = _HELDOUT_PICTURES[world](k, seed)
    if isinstance(getattr(scene, "_masks", None), dict):
        scene._masks.clear()  # noqa: SLF001 - the asking's mask cache (several MB a picture); redrawn on demand
    return scene, samples


@functools.lru_cache(maxsize=2)
def _rendered(world: str, seed: int, k: int) -> Image.Image:
    return _API[world].render(_heldout_picture(world, seed, k)[0])


class _Counts:
    """Questions per held-out picture of one (world, seed), and where each picture's questions start."""

    def __init__(self, world: str, seed: int):
        self.world, self.seed = world, seed
        self.per_picture: list[int] = []
        self.starts: list[int] = []  # item index of each picture's first question
        self.lock = threading.Lock()

    def _add_one(self) -> None:
        k = len(self.per_picture)
        n = len(_heldout_picture(self.world, self.seed, k)[1])
        self.starts.append(self.starts[-1] + self.per_picture[-1] if k else 0)
        self.per_picture.append(n)

    def extend_to_item(self, index: int) -> None:
        while not self.per_picture or self.starts[-1] + self.per_picture[-1] <= index:
            self._add_one()


_COUNTS: dict[tuple[str, int], _Counts] = {}
_COUNTS_LOCK = threading.Lock()


def _counts(world: str, seed: int) -> _Counts:
    with _COUNTS_LOCK:
        return _COUNTS.setdefault((world, seed), _Counts(world, seed))


def _question_place(world: str, seed: int, index: int) -> tuple[int, int]:
    """(picture, question within it) of held-out item `index` of a high-resolution world."""
    if index < 0:
        raise WorldError(f"a held-out item's index is 0 or more, not {index}")
    counts = _counts(world, seed)
    with counts.lock:
        counts.extend_to_item(index)
        k = bisect.bisect_right(counts.starts, index) - 1
        return k, index - counts.starts[k]


def studio_item(seed: int, family: str, world: str = DEFAULT_WORLD) -> WorldItem:
    """A scene of `world` with a question of `family`, deterministic from (seed, family, world): the app's scene
    studio. Object counts 1..the world's maximum, a label card 30% of the time (always for reading); in a
    high-resolution world a picture of one of its sizes (each as often), its object count kept to what that
    size holds."""
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
    of `ALL_WORLDS` ("hires" for scenes-llava-next). None when the folder records none (a hub checkpoint has no
    such file: it was trained on none of these worlds) or one this package no longer draws; callers then draw
    `DEFAULT_WORLD` and do not call it the model's own."""
    if model_dir is None:
        return None
    try:
        world = json.loads((Path(model_dir) / "training_state.json").read_text()).get("world")
    except (OSError, ValueError, AttributeError):
        return None
    return world if world in ALL_WORLDS else None


def world_order(own: str | None) -> list[str]:
    """The 336 px worlds with the model's own in front (`DEFAULT_WORLD` when it has none or its own is a
    high-resolution world), the others in their usual order."""
    first = own if own in WORLDS else DEFAULT_WORLD
    return [first, *(w for w in WORLDS if w != first)]


def worlds_for(own: str | None) -> list[str]:
    """The worlds that suit a model, its own first: the high-resolution worlds for a model whose own world is
    one of them (a LLaVA-NeXT model trained on "hires"), else the 336 px worlds (`world_order`)."""
    if own in HIRES_WORLDS:
        return [own, *(w for w in HIRES_WORLDS if w != own)]
    return world_order(own)


def picture_sizes(world: str) -> tuple[tuple[int, int], ...]:
    """(width, height) of every picture `world` draws."""
    return SIZES[check_world(world)]
