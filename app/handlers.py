"""What the page's events do: inputs -> engine runs (pruned and dense) -> renderers -> values for the views.

Every handler takes its state as arguments and returns it: the browser session's state is plain data (the image's
path, the /run record, the evidence patches), never a model, a tensor or a picture object. The one piece of process
state is the model cache, handed over once at start (`serve_models`): the GPU function takes its model from there,
so on a ZeroGPU Space only plain data crosses into the GPU worker.
"""

from __future__ import annotations

import hashlib
import html
import inspect
import json
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import gradio as gr
from PIL import Image

from sparsevlm.config import PruneConfig, budgets_for
from sparsevlm.errors import InputError, SparseVLMError
from sparsevlm.evaluation.recall import evidence_recall, evidence_recall_per_stage, evidence_tokens
from sparsevlm.gpu import gpu
from sparsevlm.images import load_image
from sparsevlm.loading import LoadedModel, ModelCache, available_local_models, estimate_bytes, model_bytes, resolve
from sparsevlm.methods import METHODS, get_method, registered
from sparsevlm.methods.sparsevlm import sparsevlm_layers
from sparsevlm.options import Option
from sparsevlm.pipeline import Decoding, RunResult, check_question, run, run_shared
from sparsevlm.presets import LIKENESS_FILE, NEXT_PRESET, PRESETS
from sparsevlm.scenes.world import FAMILIES, GRID  # the studio draws scenes (the app may; the engine never does)
from sparsevlm.scenes.worlds import (
    ALL_WORLDS,
    DEFAULT_WORLD,
    WORLD_LABELS,
    WorldError,
    studio_item,
    world_of_model,
    worlds_for,
)
from sparsevlm.schedule import min_equal_tokens
from sparsevlm.trace import PruneTrace
from sparsevlm.vocab import unknown_words

from . import model_note, profile_view, render
from .mainthread import on_main_thread

log = logging.getLogger("sparsevlm.app")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
NEXT_EXAMPLES_DIR = ROOT / "assets" / "examples-next"  # high-resolution examples, run on scenes-llava-next

# Defaults come from the engine; the app only labels them.
DEFAULTS = PruneConfig()
COMPARE_METHODS = ("dense", *(m for m in METHODS if m != "dense"))
# The views /explain returns, in order (the layout puts a component at each name). The attention views (a method
# that decides attention per layer, ZipVL) come before the notice and the record, which stay last.
VIEW_NAMES = ("answer", "raters", "rater_note", "raters_fig", "overlay", "layer", "caption", "counts", "formulas",
              "latency", "latency_fig", "count_compare", "mass_curve", "probes", "notice", "record")
# Runs beside an attention-deciding method on the same request, for the chart of per-layer counts: a rank-derived
# adaptive count (SparseVLM) and two fixed schedules (FastV, PyramidDrop).
COUNT_REFERENCES = ("sparsevlm", "fastv", "pyramiddrop")
DEFAULT_NEW_TOKENS = int(inspect.signature(run).parameters["max_new_tokens"].default)


class Session(TypedDict, total=False):
    """A browser session's state after a run: plain data only."""

    image: str  # path of the picture the run saw
    record: dict  # what /run returned (both traces as JSON data)
    evidence: list[int] | None  # patches the answer depends on, in the trace's grid


@dataclass
class RunOutput:
    """One request's runs: the pruned trace, the dense one for comparison (the same object for dense)."""

    image: Image.Image
    pruned: PruneTrace
    dense: PruneTrace | None
    budget: int
    evidence: list[int] | None = None  # patches the answer depends on, in the trace's grid (generated scenes)
    unknown: list[tuple[str, str | None]] | None = None  # question words the tokenizer reads as <unk>
    truth: dict | None = None  # a studio scene's ground truth (answer, family, seed, evidence in the trace's grid)
    references: list[PruneTrace] | None = None  # other methods on the same request (the counts chart beside)
    world: str | None = None  # the picture world the model was trained on (scenes models), None for others


# --- input checks ----------------------------------------------------------------------------------------------
def user_error(exc: BaseException) -> gr.Error:
    """The message a user sees for a failure: ours verbatim, anything else without a stack trace."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, SparseVLMError):
        return gr.Error(str(exc), title="Cannot run this")
    log.error("unexpected failure:\n%s", traceback.format_exc())
    return gr.Error(f"Something went wrong inside the engine ({type(exc).__name__}: {exc}). The app is still up; "
                    "try another image or setting.", title="Internal error")


def whole(value: Any, what: str) -> int:
    try:
        f = float(value)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what} must be a whole number, not {value!r}") from None


# --- the methods' own settings, generated from their declarations -----------------------------------------------
# The API's parameters before each method declared its options: SparseVLM's settings keep these slots (between
# accounting and max_new_tokens), so callers by position keep working; every other method's options come after
# the page's own inputs, with defaults.
LEGACY_PARAMS = ("count_mode", "lam", "scale", "bias", "recycle")


@dataclass(frozen=True)
class PageOption:
    """One of a method's declared options as the page shows it: its method, the declaration, the API name."""

    method: str
    option: Option

    @property
    def param(self) -> str:
        return self.option.param or f"{self.method.replace('-', '_')}_{self.option.name}"


def page_options(method: str | None = None) -> list[PageOption]:
    """Every option the registered methods show on the page (`ui=True`), in registry order; or one method's."""
    names = [method] if method is not None else list(METHODS)
    out = [PageOption(m, o) for m in names if registered(m) is not None for o in get_method(m).options if o.ui]
    seen: dict[str, PageOption] = {}
    for po in out:
        if po.param in seen:
            raise ValueError(f"{po.method} option {po.option.name} and {seen[po.param].method} option "
                             f"{seen[po.param].option.name} both take the page parameter {po.param!r}")
        seen[po.param] = po
    return out


def option_groups() -> dict[str, list[PageOption]]:
    """method -> its page options, for each method that has any (the page's settings groups)."""
    groups: dict[str, list[PageOption]] = {}
    for po in page_options():
        groups.setdefault(po.method, []).append(po)
    return groups


def option_params() -> tuple[list[str], list[str]]:
    """The options' API parameter names: those at the slots they had before (LEGACY_PARAMS), then the rest."""
    params = [po.param for po in page_options()]
    early = [p for p in LEGACY_PARAMS if p in params]
    return early, [p for p in params if p not in early]


def run_params() -> list[str]:
    """/run's parameters, in order (the session's model and scene last: page state, not API parameters)."""
    early, later = option_params()
    return ["image", "question", "method", "budget", "accounting", *early, "max_new_tokens", *later, "model",
            "scene"]


def explain_params() -> list[str]:
    """/explain's parameters: /run's, with the overlay's view after max_new_tokens (where it always was)."""
    early, later = option_params()
    return ["image", "question", "method", "budget", "accounting", *early, "max_new_tokens", "view", *later,
            "model", "scene"]


def with_parameters(fn: Any, params: list[str], doc: str) -> Any:
    """A handler that takes `params` by name, as Gradio reads them (inspect.signature), and Gradio's progress
    tracker last; it calls fn(values by name, progress)."""

    def handler(*args: Any) -> Any:
        progress = args[len(params)] if len(args) > len(params) else None
        return fn(dict(zip(params, args)), progress)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p, kind) for p in params]
        + [inspect.Parameter("progress", kind, default=gr.Progress())])
    handler.__doc__ = doc
    handler.__name__ = getattr(fn, "__name__", "handler").lstrip("_")
    return handler


def build_config(method: Any, budget: Any, accounting: Any = None, params: dict[str, Any] | None = None,
                 **more: Any) -> PruneConfig:
    """A PruneConfig from the page's (or an API caller's) values: the chosen method's options, read from their
    page parameters (`params`, or keywords); options of other methods are ignored; what is left out or empty
    takes the method's declared default. A value outside an option's range is a ConfigError naming it."""
    values = {**(params or {}), **more}
    method = method or DEFAULTS.method
    options = {}
    for po in page_options(method) if registered(method) is not None else []:
        value = values.get(po.param)
        if value is None or (isinstance(value, str) and not value.strip() and po.option.kind != "choice"):
            continue
        options[po.option.name] = value
    kw: dict[str, Any] = {"method": method,
                          "budget": DEFAULTS.budget if budget in (None, "") else whole(budget, "the budget"),
                          "options": options}
    if accounting:
        kw["accounting"] = accounting
    return PruneConfig(**kw).validate()


def page_sparsevlm_options(values: dict) -> dict | None:
    """SparseVLM's options as the page sets them (None when they are out of range: the reference run then takes
    its defaults)."""
    if "sparsevlm" not in METHODS:
        return None
    try:
        return build_config("sparsevlm", None, None, values).options
    except SparseVLMError:
        return None


def reference_config(method: str, config: PruneConfig, sparsevlm_options: dict | None = None) -> PruneConfig:
    """A reference run beside an attention-deciding method, at its budget and accounting: SparseVLM with an
    adaptive, rank-derived count (the page's adaptive mode when one is chosen, else the reference code's rule),
    the others as declared (their fixed schedules)."""
    options: dict[str, Any] = {}
    if method == "sparsevlm":
        options = dict(sparsevlm_options or {})
        if options.get("count_mode") not in ("paper", "code"):
            options["count_mode"] = "code"
    return PruneConfig(method=method, budget=config.budget, accounting=config.accounting, options=options)


# --- records the API returns -------------------------------------------------------------------------------------
def trace_data(trace: PruneTrace) -> dict:
    """The trace as JSON data: the very text `python -m sparsevlm run --trace-out` writes, parsed."""
    return json.loads(trace.to_json())


def run_record(out: RunOutput) -> dict:
    """What /run returns: both answers and both traces as plain JSON data."""
    dense = out.dense
    truth = None
    if out.truth is not None:
        truth = {**out.truth, "evidence_recall": evidence_recall(out.pruned, out.truth["evidence"]),
                 "evidence_recall_per_stage": evidence_recall_per_stage(out.pruned, out.truth["evidence"])}
    return {
        "answer": out.pruned.answer,
        "dense_answer": dense.answer if dense is not None else None,
        "agrees_with_dense": render.answers_agree(out.pruned, dense) if dense is not None else None,
        "trace": trace_data(out.pruned),
        "dense_trace": trace_data(dense) if dense is not None else None,
        "unknown_words": [[w, s] for w, s in out.unknown or ()],
        "ground_truth": truth,
    }


def compare_record(results: list[tuple[str, PruneTrace | None, str]],
                   evidence: list[int] | None = None) -> list[dict]:
    """What /compare returns: per method, its answer, agreement with dense and the CLI's --json summary; with
    a generated scene's evidence (trace grid), its evidence recall too."""
    dense = next((t for m, t, _ in results if m == "dense" and t is not None), None)
    rows = []
    for method, tr, err in results:
        row: dict[str, Any] = {"method": method, "label": render.method_label(method), "available": tr is not None,
                               "error": err or None}
        if tr is not None:
            row.update(answer=tr.answer,
                       agrees_with_dense=render.answers_agree(tr, dense) if dense is not None else None,
                       summary=tr.summary(),
                       evidence_recall=evidence_recall(tr, evidence) if evidence is not None else None)
        rows.append(row)
    return rows


# --- views -------------------------------------------------------------------------------------------------------
def rater_note(tr: PruneTrace) -> str:
    if tr.raters:
        return (f"{sum(r.rater for r in tr.raters)} of {len(tr.raters)} tokens after the image are raters (red): "
                "their relevance score R is above the mean. Purple tokens are below it.")
    return f"{render.method_label(tr.method)} does not use text raters; switch the method to SparseVLM to see them."


def draw_views(out: RunOutput, view: str) -> dict[str, Any]:
    """Every view of one run, keyed by view name (the layout maps names to components)."""
    tr, dense = out.pruned, out.dense
    layer = render.default_layer(tr)
    n_layers = render.num_layers(tr)
    return {
        "notice": render.unknown_words_html(out.unknown or [])
        + model_note.upload_notice_html(out.world, out.truth is not None or out.evidence is not None),
        "answer": render.answer_markdown(tr, dense) + render.truth_html(out.truth, tr) + render.empty_answer_note(tr),
        "raters": render.rater_highlights(tr),
        "rater_note": rater_note(tr),
        "raters_fig": render.raters_figure(tr),
        "overlay": render.render_view(out.image, tr, layer, view, evidence=out.evidence),
        "layer": gr.Slider(minimum=0, maximum=max(0, n_layers - 1), value=layer, step=1,
                           interactive=n_layers > 1),
        "caption": render.layer_caption(tr, layer),
        "counts": render.counts_figure(tr, budget=out.budget if tr.method != "dense" else None),
        "formulas": render.formulas_markdown(tr),
        "latency": render.latency_table_html(render.latency_rows(tr, dense)),
        "latency_fig": render.latency_figure(tr, dense),
        **attention_views(tr, layer, out.references),
        "record": run_record(out),
    }


def attention_views(tr: PruneTrace, layer: int, references: list[PruneTrace] | None = None) -> dict[str, Any]:
    """The views of a method that decides attention per layer (ZipVL), shown only for such a run: each layer's
    count beside other methods', the attention-mass curve at `layer` and its probe rows."""
    shown = bool(tr.attention)
    return {
        "count_compare": gr.Plot(value=render.count_comparison_figure(tr, references or []) if shown else None,
                                 visible=shown),
        "mass_curve": gr.Plot(value=render.mass_curve_figure(tr, layer) if shown else None, visible=shown),
        "probes": gr.HTML(value=render.probes_html(tr, layer) if shown else "", visible=shown),
    }


# --- the scene studio --------------------------------------------------------------------------------------------
def image_key(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


def studio_scene(seed: Any, family: Any, world: Any) -> tuple[Image.Image, dict]:
    """A generated scene of `world` (v2: the embedded model's world, independent: pictures no model trained on;
    hires, independent-hires: the same at LLaVA-NeXT's picture sizes) and a question of `family` about it,
    deterministic from `seed`; returns the picture and its ground truth (question, answer, evidence cells on the
    14-px grid of the whole picture: the 24x24 grid of a 336 px one)."""
    seed = whole(seed if seed not in (None, "") else 0, "the seed")
    if not 0 <= seed < 2**31:
        raise InputError(f"the seed must be between 0 and {2**31 - 1}, not {seed}")
    if family not in FAMILIES:
        raise InputError(f"the question family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if world not in ALL_WORLDS:
        raise InputError(f"the world must be one of {', '.join(ALL_WORLDS)}, not {world!r}")
    try:
        item = studio_item(seed, family, world)
    except WorldError as exc:  # no question of this family in 1000 draws: not reached for the worlds' families
        raise InputError(str(exc)) from None
    return item.image, {"seed": seed, "family": family, "world": world, "question": item.sample.question,
                        "answer": item.sample.answer, "evidence": list(item.sample.evidence),
                        "grid": list(item.grid), "size": list(item.image.size)}


def model_world(lm: LoadedModel) -> str | None:
    """The world a loaded model was trained on (its folder's training_state.json); None when it records none."""
    return world_of_model(getattr(lm.model, "name_or_path", None) or None)


def studio_world(lm: LoadedModel) -> str:
    """The world the studio draws from for a model: its own, else the embedded model's (`DEFAULT_WORLD`)."""
    return model_world(lm) or DEFAULT_WORLD


def world_choices(own: str | None) -> list[tuple[str, str]]:
    """The studio's world picker: the model's own world first and marked as such, then the others that suit it
    (the high-resolution worlds for a model trained on one); for a model that records no world, the embedded
    model's world first, unmarked."""
    return [(WORLD_LABELS[w] + (" · this model's world" if w == own else ""), w) for w in worlds_for(own)]


def evidence_on(trace: PruneTrace, cells: list[int], grid: tuple[int, int], size: tuple[int, int] | None) -> list[int]:
    """A generated picture's evidence (cells of its 14-px grid, `grid` rows x cols, picture `size`) as the visual
    tokens of this run: on one view of a square 336 px picture, the cells regridded onto the model's grid; on
    LLaVA-NeXT's views, or a picture of another size, the tokens whose box the cells cover by 5% (the
    benchmark's rule, `evaluation.recall.evidence_tokens`)."""
    layout = trace.visual_layout()
    square = size is None or tuple(size) == (GRID * 14, GRID * 14)
    if layout.single and square and tuple(grid) == (GRID, GRID):
        return render.regrid_patches(cells, tuple(grid), tuple(trace.grid))
    return evidence_tokens(cells, layout, tuple(size) if size else None)


def scene_truth(scene: dict | None, image: Image.Image, question: str, trace: PruneTrace) -> dict | None:
    """The studio scene's ground truth when this request is still that scene (same pixels, same question), with
    the evidence mapped onto the run's visual tokens (`evidence_on`); None for uploads and edited questions."""
    if not scene or scene.get("key") != image_key(image) or scene.get("question", "").strip() != question.strip():
        return None
    truth = {k: scene[k] for k in ("seed", "family", "answer") if k in scene}
    truth["world"] = scene["world"]
    truth["evidence"] = evidence_on(trace, scene["evidence"], tuple(scene.get("grid") or (GRID, GRID)),
                                    scene.get("size"))
    truth["grid"] = list(trace.grid)  # the model's
    return truth


def example_evidence(examples: list[dict]) -> dict[tuple[str, str], dict]:
    """(image pixels hash, question) -> the evidence of the bundled generated scenes that record it: {"cells",
    "grid", "size"}, read through `evidence_on` for each run (a 336 px example's 24x24 patches, a high-resolution
    example's `evidence_cells` on its full-size 14-px grid)."""
    table = {}
    for e in examples:
        cells = e.get("evidence") or e.get("evidence_cells")
        if not cells:
            continue
        try:
            image = load_image(e["image"])
            key = (image_key(image), check_question(e["question"]))
        except SparseVLMError:
            continue
        w, h = image.size
        table[key] = {"cells": list(cells), "grid": (h // 14, w // 14) if "evidence_cells" in e else (GRID, GRID),
                      "size": (w, h) if "evidence_cells" in e else None}
    return table


def next_examples(models: ModelCache) -> list[dict]:
    """The high-resolution one-click examples, when the embedded high-resolution model is installed and the server
    offers it and has room for it (its examples run on it); none otherwise."""
    if NEXT_PRESET not in PRESETS:
        return []
    try:
        need = estimate_bytes(resolve(NEXT_PRESET, models.access), models.dtype)
    except SparseVLMError:
        return []
    if need is not None and need > models.max_bytes:
        return []
    return [e for e in load_examples(NEXT_EXAMPLES_DIR / "examples.json") if e.get("model") == NEXT_PRESET]


def load_examples(index: Path = EXAMPLES_DIR / "examples.json") -> list[dict]:
    """[{image, question, answer, family}] from an examples.json; image paths relative to its folder."""
    index = Path(index)
    folder = index.parent
    if not index.is_file():
        return []
    try:
        items = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("could not read %s", index)
        return []
    out = []
    for it in items:
        p = Path(it.get("image", ""))
        if not p.is_absolute():
            p = folder / p if (folder / p).is_file() else ROOT / p
        if p.is_file() and it.get("question"):
            out.append({**it, "image": str(p)})
    return out


# --- the model: the process's cache and the GPU function ---------------------------------------------------------
def new_tokens(max_new_tokens: Any) -> int:
    """The max-new-tokens box: the default when empty, else a whole number (a clear message otherwise)."""
    return DEFAULT_NEW_TOKENS if max_new_tokens in (None, "") else whole(max_new_tokens, "max new tokens")


_PROCESS: dict[str, ModelCache] = {}  # the one model cache of this process, handed over at start


def serve_models(models: ModelCache) -> None:
    """Make `models` the process's model cache: the one the GPU function takes its model from."""
    _PROCESS["models"] = models


def process_models() -> ModelCache:
    if "models" not in _PROCESS:
        raise RuntimeError("no model cache: call serve_models(models) before serving requests")
    return _PROCESS["models"]


@on_main_thread  # on the main thread where `python -m app` serves model work there (app/mainthread.py)
@gpu(duration=120)  # ZeroGPU lends the GPU only while this runs; a no-op without the `spaces` package
def model_runs(model: str, image: Image.Image, question: str, config: dict, max_new_tokens: int,
               with_dense: bool) -> tuple[dict, dict | None]:
    """All the model (GPU) work of one request: the pruned run, and the dense run to compare with (the same
    trace when the method is dense). Plain data in and out - the model's name, the picture, the question, the
    config as a dict; the traces as dicts - because ZeroGPU pickles both onto a queue to its GPU worker: the
    model itself is taken from the process's cache, already there."""
    lm, _ = process_models().get(model)
    cfg = PruneConfig.from_dict(config)
    if cfg.method == "dense" or not with_dense:
        pruned = run(lm, image, question, cfg, max_new_tokens=max_new_tokens).trace.to_dict()
        return pruned, (pruned if cfg.method == "dense" else None)
    # the pruned and the dense run share one encoding of the image (vision tower + projector measured once)
    both = run_shared(lm, image, question, [cfg, PruneConfig(method="dense")], Decoding(max_new_tokens),
                      raise_errors=True)
    return both[0].trace.to_dict(), both[1].trace.to_dict()


@on_main_thread
@gpu(duration=120)
def model_runs_beside(model: str, image: Image.Image, question: str, config: dict, max_new_tokens: int,
                      references: list[dict]) -> tuple[dict, dict, list[dict | None]]:
    """model_runs (the pruned and the dense run), and beside them other methods' runs on the same encoding of the
    image (the counts chart of an attention-deciding method); a reference that cannot run on this model is None.
    Plain data in and out, as model_runs."""
    lm, _ = process_models().get(model)
    cfg = PruneConfig.from_dict(config)
    refs = [PruneConfig.from_dict(c) for c in references]
    results = run_shared(lm, image, question, [cfg, PruneConfig(method="dense"), *refs], Decoding(max_new_tokens))
    first = results[0]
    if not isinstance(first, RunResult):
        raise first
    dense = results[1].trace.to_dict() if isinstance(results[1], RunResult) else None
    return (first.trace.to_dict(), dense,
            [r.trace.to_dict() if isinstance(r, RunResult) else None for r in results[2:]])


@on_main_thread
@gpu(duration=120)
def compare_model_runs(model: str, image: Image.Image, question: str, configs: list[dict],
                       max_new_tokens: int) -> list[tuple[str, dict | None, str]]:
    """All the model work of "Compare all methods": every config on one encoding of the image; per method its
    trace as a dict, or None and why it cannot run on this model (e.g. [CLS] attention on a tower without [CLS]).
    Plain data in and out, as model_runs."""
    lm, _ = process_models().get(model)
    cfgs = [PruneConfig.from_dict(c) for c in configs]
    results = run_shared(lm, image, question, cfgs, Decoding(max_new_tokens))
    return [(c.method, r.trace.to_dict(), "") if isinstance(r, RunResult) else (c.method, None, str(r))
            for c, r in zip(cfgs, results, strict=True)]


# --- the model picker --------------------------------------------------------------------------------------------
def reachable_budget(lm: Any) -> float | None:
    """The smallest input-counted budget SparseVLM's default schedule can reach on this model (flops accounting;
    paper accounting runs every budget). None if unknown."""
    depth = lm.num_layers
    try:
        return min_equal_tokens(lm.visual_tokens, sparsevlm_layers(PruneConfig(), depth)[0], depth)
    except SparseVLMError:  # too shallow for the schedule: no SparseVLM layer to prune after
        return None


def budget_choice(lm: LoadedModel, **layout: Any) -> gr.Radio:
    """The budget radio for a model: the papers' budgets for its family (LLaVA-1.5: 192 / 128 / 96 / 64, 64 first;
    LLaVA-NeXT: 640 / 320 / 160, 320 first); paper accounting, the default, runs every budget."""
    budgets = list(budgets_for(lm.anyres))
    reachable = reachable_budget(lm)
    dense = f"up to {lm.visual_tokens}, by the picture" if lm.anyres else str(lm.visual_tokens)
    info = f"mean visual tokens per decoder layer (dense = {dense})"
    if reachable is not None and reachable > min(budgets):
        info += f"; flops accounting cannot go below {reachable:.0f} on this model's depth"
    return gr.Radio(budgets, value=320 if lm.anyres else 64,
                    info=info + "; adaptive modes under SparseVLM options", **layout)


def model_line(lm: LoadedModel, note: str = "") -> str:
    rows, cols = lm.grid
    weights = render.format_bytes(model_bytes(lm.model))
    cls_only = ", ".join(render.method_label(m) for m in METHODS if get_method(m).needs_cls)
    grid = (f"anyres: a {rows}×{cols} base view + tiles, up to {lm.visual_tokens} visual tokens (each picture's own "
            "count: its views and newline tokens)" if lm.anyres else
            f"grid {rows}×{cols} = {lm.visual_tokens} visual tokens")
    line = (f"Model: <b>{html.escape(lm.name)}</b> · {lm.arch} · {lm.num_layers} decoder layers · {grid}"
            f"{'' if lm.has_cls else f' (no [CLS]: {cls_only} cannot run)'} · "
            f"{lm.device} / {str(lm.dtype).replace('torch.', '')} · weights {weights} (measured from the loaded "
            "tensors)")
    return f"<div class='sv-model'>{line}{note}{model_note.knows_html(model_world(lm))}</div>"


def likeness_profile(lm: LoadedModel) -> dict | None:
    """The attention profile block of the model folder's measured likeness summary (training.likeness), if any."""
    folder = getattr(lm.model, "name_or_path", None)
    if not folder:
        return None
    try:
        return json.loads((Path(folder) / LIKENESS_FILE).read_text())["summary"].get("attention_profile")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def compare_note(lm: LoadedModel) -> str:
    """The compare tab's note on how this model's decoder attends beside LLaVA-1.5's (model_note)."""
    return model_note.attention_likeness_html(lm.name, likeness_profile(lm))


def model_choices(default: str) -> list[str]:
    """The picker's list: the presets, then models that load without a network; any other id can be typed."""
    names = [default, *PRESETS]
    try:
        names += available_local_models()
    except Exception:  # noqa: BLE001 - an unreadable cache folder must not stop the page
        log.warning("could not list the local models", exc_info=True)
    return list(dict.fromkeys(names))


# --- the handlers --------------------------------------------------------------------------------------------------
def _progress(progress: gr.Progress | None):
    return (lambda f, msg: progress(f, desc=msg)) if progress is not None else None


class Handlers:
    """The page's event handlers over one model cache; each browser session names its model (a cache key)."""

    def __init__(self, models: ModelCache, default_model: str, examples: list[dict],
                 high_res: list[dict] | None = None):
        self.models, self.default_model = models, default_model
        self.evidence_of = example_evidence([*examples, *(high_res or [])])  # both lists' scenes know their evidence
        serve_models(models)
        # /run and /explain take every method's page options by their API names (generated from the methods'
        # declarations, sparsevlm/options.py), so the handlers are built here with an explicit signature.
        self.run_json = with_parameters(self._run_json, run_params(), "Answer with pruning and dense; return both "
                                        "answers and both traces as JSON.")
        self.explain = with_parameters(self._explain, explain_params(), "Every view of one run (in VIEW_NAMES "
                                       "order), then the session's new state.")

    # --- running the model ---------------------------------------------------------------------------------------
    def use_model(self, name: Any, progress: gr.Progress | None = None) -> tuple[str, LoadedModel]:
        """The session's model: loaded once, re-loaded only if memory pressure unloaded it meanwhile."""
        key = str(name or self.default_model)
        lm, unloaded = self.models.get(key, progress=_progress(progress))
        if unloaded:
            gr.Info(f"Unloaded {', '.join(unloaded)} to make room for {lm.name}.")
        return key, lm

    def execute(self, model: Any, image_src: Any, question: Any, config: PruneConfig, max_new_tokens: Any,
                with_dense: bool, progress: gr.Progress | None = None, scene: dict | None = None,
                with_references: bool = False, sparsevlm_options: dict | None = None) -> RunOutput:
        """One request's runs. with_references: a method that decides attention (ZipVL) also gets other methods'
        runs at the same budget (COUNT_REFERENCES; SparseVLM adaptive: `sparsevlm_options` when they choose an
        adaptive count, else the reference code's rule), for the chart of per-layer counts."""
        key, lm = self.use_model(model, progress)
        q = check_question(question)
        image = image_src if isinstance(image_src, Image.Image) else load_image(image_src)
        unknown = unknown_words(q, lm.processor.tokenizer)  # shown with the results; the run still happens
        n_new = new_tokens(max_new_tokens)
        if progress is not None:
            progress(0.1, desc=f"running {render.method_label(config.method)}"
                     + (" and dense for comparison" if with_dense and config.method != "dense" else ""))
        references = None
        if with_references and with_dense and get_method(config.method).changes_attention:
            refs = [reference_config(m, config, sparsevlm_options).to_dict() for m in COUNT_REFERENCES
                    if m in METHODS]
            pruned_d, dense_d, ref_d = model_runs_beside(key, image, q, config.to_dict(), n_new, refs)
            references = [PruneTrace.from_dict(t) for t in ref_d if t is not None]
        else:
            pruned_d, dense_d = model_runs(key, image, q, config.to_dict(), n_new, with_dense)
        pruned = PruneTrace.from_dict(pruned_d)
        dense = pruned if config.method == "dense" else (PruneTrace.from_dict(dense_d) if dense_d else None)
        truth = scene_truth(scene, image, q, pruned)
        return RunOutput(image=image, pruned=pruned, dense=dense, budget=config.budget,
                         evidence=truth["evidence"] if truth else self.example_evidence(pruned, image, q),
                         unknown=unknown, truth=truth, references=references, world=model_world(lm))

    def example_evidence(self, trace: PruneTrace, image: Image.Image, question: str) -> list[int] | None:
        """A bundled example's evidence as this run's visual tokens; None for any other picture."""
        ev = self.evidence_of.get((image_key(image), question))
        return None if ev is None else evidence_on(trace, ev["cells"], ev["grid"], ev["size"])

    def _run_json(self, v: dict, progress: gr.Progress | None = None) -> dict:
        try:
            cfg = build_config(v["method"], v["budget"], v["accounting"], v)
            return run_record(self.execute(v["model"], v["image"], v["question"], cfg, v["max_new_tokens"], True,
                                           progress, v["scene"]))
        except Exception as exc:
            raise user_error(exc) from exc

    def _explain(self, v: dict, progress: gr.Progress | None = None) -> tuple:
        try:
            cfg = build_config(v["method"], v["budget"], v["accounting"], v)
            out = self.execute(v["model"], v["image"], v["question"], cfg, v["max_new_tokens"], True, progress,
                               v["scene"], with_references=True, sparsevlm_options=page_sparsevlm_options(v))
            if progress is not None:
                progress(0.9, desc="drawing")
            drawn = draw_views(out, v["view"])
        except Exception as exc:
            raise user_error(exc) from exc
        image = v["image"]
        path = image if isinstance(image, str) else _save_png(out.image, "sparsevlm-run-")
        return (*(drawn[k] for k in VIEW_NAMES), Session(image=path, record=drawn["record"], evidence=out.evidence))

    # --- the layer slider and export (from the session alone) ----------------------------------------------------
    @staticmethod
    def session_trace(st: Any) -> PruneTrace:
        if not st or not st.get("record"):
            raise gr.Error("Run the model first: pick an example or upload an image and press Run.")
        return PruneTrace.from_dict(st["record"]["trace"])

    def show_layer(self, st, layer, view):
        tr = self.session_trace(st)
        layer = int(max(0, min(int(layer or 0), render.num_layers(tr) - 1)))
        return (render.render_view(load_image(st["image"]), tr, layer, view, evidence=st.get("evidence")),
                render.layer_caption(tr, layer))

    def show_attention(self, st, layer):
        """The attention-mass curve and probe rows at the slider's layer, for a run that decided attention."""
        if not st or not st.get("record") or not st["record"]["trace"].get("attention"):
            return gr.skip(), gr.skip()
        tr = self.session_trace(st)
        layer = int(max(0, min(int(layer or 0), render.num_layers(tr) - 1)))
        return render.mass_curve_figure(tr, layer), render.probes_html(tr, layer)

    def show_profile(self, st, layer=None):
        """FasterVLM's view of this browser tab's run (app/profile_view.py) at one profile layer (the first, FastV's,
        after a run): the layer picker, attention against token index, the sorted cumulative curves, and the two
        statistics beside the published ones with what they mean for the methods."""
        if not st or not st.get("record"):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        tr = self.session_trace(st)
        dense = st["record"].get("dense_trace")
        dense_tr = PruneTrace.from_dict(dense) if dense and tr.method != "dense" else None
        chosen = profile_view.pick_layer(tr, layer)
        return (gr.Dropdown(choices=profile_view.layer_choices(tr), value=chosen, interactive=chosen is not None),
                profile_view.index_figure(tr, chosen), profile_view.cdf_figure(tr, chosen),
                profile_view.profile_html(tr, chosen, dense_tr))

    def patch_info(self, st, evt: gr.SelectData):
        """A click on the picture: the clicked patch's score, rank and fate at every pruning step."""
        tr = self.session_trace(st)
        size = render.canvas_size(tr)
        x, y = (evt.index if isinstance(evt.index, (list, tuple)) else (-1, -1))[:2]
        return render.patch_fate_html(tr, render.patch_at(tr, float(x), float(y), size))

    def token_view(self, st, evt: gr.SelectData):
        """A click on a token after the image: its own attention over the patches at each pruning step."""
        tr = self.session_trace(st)
        i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(i, int) or not 0 <= i < len(tr.raters):
            return "Click one of the tokens above.", []
        token = tr.raters[i].index
        return (render.token_attention_note(tr, token),
                render.token_attention_views(load_image(st["image"]), tr, token))

    def step_layer(self, st, layer, view):
        if not st or not st.get("record"):
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        tr = PruneTrace.from_dict(st["record"]["trace"])
        nxt = int(layer or 0) + 1
        if nxt >= render.num_layers(tr):
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        picture = render.render_view(load_image(st["image"]), tr, nxt, view, evidence=st.get("evidence"))
        return gr.Timer(active=True), nxt, picture, render.layer_caption(tr, nxt)

    def export(self, st):
        tr = self.session_trace(st)
        image = load_image(st["image"])
        folder = Path(tempfile.mkdtemp(prefix="sparsevlm-export-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        trace_path = folder / f"trace-{tr.method}-{stamp}.json"
        trace_path.write_text(tr.to_json(indent=1))
        gif_path = folder / f"pruning-{tr.method}-{stamp}.gif"
        gif_path.write_bytes(render.pruning_animation(image, tr, evidence=st.get("evidence")))
        mp4_path = folder / f"pruning-{tr.method}-{stamp}.mp4"
        render.pruning_video(image, tr, str(mp4_path), evidence=st.get("evidence"))
        files = [str(trace_path), str(gif_path), str(mp4_path)]
        dense = st["record"].get("dense_trace")
        if dense and tr.method != "dense":
            dense_path = folder / f"trace-dense-{stamp}.json"
            dense_path.write_text(PruneTrace.from_dict(dense).to_json(indent=1))
            files.append(str(dense_path))
        return files, str(gif_path), str(mp4_path)

    # --- compare -------------------------------------------------------------------------------------------------
    def compare_runs(self, image_src, question, budget, max_new_tokens, model, scene, progress):
        key, lm = self.use_model(model, progress)
        q = check_question(question)
        image = load_image(image_src)
        n_new = new_tokens(max_new_tokens)
        configs = [build_config(method, budget).to_dict() for method in COMPARE_METHODS]
        progress(0.1, desc=f"running {len(configs)} methods on one encoding of the image")
        results = [(m, PruneTrace.from_dict(t) if t is not None else None, why)
                   for m, t, why in compare_model_runs(key, image, q, configs, n_new)]
        ran = next((tr for _, tr, _ in results if tr is not None), None)
        truth = scene_truth(scene, image, q, ran) if ran is not None else None
        return image, results, (truth["evidence"] if truth else None)

    def compare_json(self, image, question, budget, max_new_tokens, model, scene,
                     progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        """Every method at one budget: per method its answer, agreement with dense and trace summary."""
        try:
            _, results, evidence = self.compare_runs(image, question, budget, max_new_tokens, model, scene, progress)
            return compare_record(results, evidence)
        except Exception as exc:
            raise user_error(exc) from exc

    def compare_view(self, image, question, budget, max_new_tokens, model, scene,
                     progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        try:
            img, results, evidence = self.compare_runs(image, question, budget, max_new_tokens, model, scene,
                                                       progress)
            gallery = render.compare_pictures(img, results, evidence)
            table = render.compare_table_html(render.compare_rows(results, evidence))
            return gallery, table, compare_record(results, evidence)
        except Exception as exc:
            raise user_error(exc) from exc

    # --- the model picker and the studio -------------------------------------------------------------------------
    def load_model(self, name, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        """Switch this session to a model (a preset, a hub id or a local folder), loading it if needed."""
        return self._switch(name, progress)

    def _switch(self, name, progress=None):
        try:
            key = str(name or "").strip()
            already = key in self.models.loaded()
            t0 = time.perf_counter()
            lm, unloaded = self.models.get(key, progress=_progress(progress))
        except Exception as exc:
            raise user_error(exc) from exc
        took = "already in memory" if already else f"loaded in {time.perf_counter() - t0:.1f} s (measured)"
        note = f"<br>{html.escape(lm.name)}: {took}"
        if unloaded:
            note += f"; unloaded {html.escape(', '.join(unloaded))} to stay within the model memory budget"
            gr.Info(f"Unloaded {', '.join(unloaded)} to make room for {lm.name}.")
        return key, model_line(lm, note), budget_choice(lm)

    def example_model(self, model, wanted):
        """Before an example runs: switch the session to the model its examples are made for (`wanted`), loading
        it if needed; no change when the session already uses it or `wanted` is None. Outputs: the session's model,
        the model line, the budget radio (the new model's budgets) and the picker."""
        current = str(model or self.default_model)
        if not wanted or current == wanted:
            return current, gr.HTML(), gr.Radio(), gr.Dropdown()
        key, line, budgets = self._switch(wanted)
        return key, line, budgets, gr.Dropdown(value=key, allow_custom_value=True)

    def next_example_model(self, model):
        """A high-resolution example runs on scenes-llava-next, whatever model the session had."""
        return self.example_model(model, NEXT_PRESET)

    def plain_example_model(self, model):
        """An example of the server's own list runs on the session's model, except after a high-resolution example:
        the session then goes back to the server's model, the one those examples are made for."""
        current = str(model or self.default_model)
        return self.example_model(model, self.default_model if current == NEXT_PRESET else None)

    def new_scene(self, seed, family, world=None, model=None):
        """The studio: a generated scene and question into the inputs, its ground truth into the session. Without
        a world, the session model's own (`studio_world`)."""
        try:
            if world in (None, ""):
                world = studio_world(self.use_model(model)[1])
            image, truth = studio_scene(seed, family, world)
        except Exception as exc:
            raise user_error(exc) from exc
        path = _save_png(image, "sparsevlm-scene-", f"scene-{truth['world']}-{truth['seed']}-{truth['family']}")
        return (path, truth["question"], truth, (truth["seed"] + 1) % 2**31, {**truth, "key": image_key(image)},
                render.truth_html(truth))

    def compare_note(self, model):
        """The compare tab's note for the session's model, after a model switch."""
        name = str(model or self.default_model)
        if name not in self.models.loaded():
            return gr.HTML()
        return compare_note(self.models.get(name)[0])

    def world_picker(self, model):
        """The studio's world choice for the session's model (its own world first), after a model switch."""
        name = str(model or self.default_model)
        if name not in self.models.loaded():
            return gr.Dropdown()
        lm = self.models.get(name)[0]
        return gr.Dropdown(choices=world_choices(model_world(lm)), value=studio_world(lm))

    @staticmethod
    def forget_scene():
        """An upload, an edited question or an example is no longer the generated scene: drop its ground truth."""
        return None, ""

    def word_notice(self, question, model):
        """The vocabulary hint as the question changes (before any run)."""
        if not question or not str(question).strip():
            return ""
        try:
            name = str(model or self.default_model)
            if name not in self.models.loaded():  # never load a model on a keystroke; the run shows the notice too
                return ""
            lm, _ = self.models.get(name)
            return render.unknown_words_html(unknown_words(str(question), lm.processor.tokenizer))
        except Exception:  # noqa: BLE001 - a hint must never get in the way of typing; the run reports errors
            log.warning("word notice failed", exc_info=True)
            return ""


def _save_png(image: Image.Image, prefix: str, stem: str = "image") -> str:
    """A PNG in a fresh temporary folder: the pixels come back unchanged, so a run can recognise a studio scene."""
    path = Path(tempfile.mkdtemp(prefix=prefix)) / f"{stem}.png"
    image.save(path)
    return str(path)
