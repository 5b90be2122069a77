"""The Gradio layout: inputs -> engine run (pruned and dense) -> renderers -> views.

The model is loaded once and passed in; everything a request produces lives in that request's return values
and in the browser session's gr.State, never in module globals, so concurrent users cannot see each other.
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
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from sparsevlm.config import ACCOUNTINGS, COUNT_MODES, FIXED_BUDGETS, PruneConfig
from sparsevlm.errors import InputError, SparseVLMError
from sparsevlm.gpu import gpu
from sparsevlm.images import load_image
from sparsevlm.loading import LoadedModel, ModelCache, available_local_models, model_bytes
from sparsevlm.methods import METHODS, get_method
from sparsevlm.pipeline import Decoding, RunResult, check_question, run, run_shared
from sparsevlm.presets import PRESETS
from sparsevlm.scenes import generator  # the studio draws scenes with it (the app may; the engine never does)
from sparsevlm.scenes.worlds import WORLD_LABELS, WORLDS, WorldError, studio_item, world_of_model, world_order
from sparsevlm.schedule import min_equal_tokens, sparsevlm_layers
from sparsevlm.trace import PruneTrace
from sparsevlm.vocab import unknown_words

from . import render

log = logging.getLogger("sparsevlm.app")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"

# Defaults and choices come from the engine; the app only labels them.
DEFAULTS = PruneConfig()
METHOD_CHOICES = [(render.method_label(m, long=True), m) for m in METHODS]
COMPARE_METHODS = ("dense", *(m for m in METHODS if m != "dense"))
COUNT_LABELS = {"fixed": "Fixed budget (equal tokens)", "paper": "Adaptive - paper eq. 8 (λ)",
                "code": "Adaptive - reference code (scale, bias)"}
COUNT_CHOICES = [(COUNT_LABELS.get(m, m), m) for m in COUNT_MODES]
DEFAULT_NEW_TOKENS = int(inspect.signature(run).parameters["max_new_tokens"].default)
MAX_NEW_TOKENS_UI = 64  # the page's slider; the engine's own limit applies to API calls


INTRO = """
<div class="sv-hero">
<h1>SparseVLM Explorer</h1>
<p>A vision-language model turns a picture into hundreds of <b>visual tokens</b> (one per image patch) and
processes all of them in every decoder layer. <b>SparseVLM</b> drops most of them, guided by the question:
<b>①</b> the words of the question that attend most to the image become <b>text raters</b>;
<b>②</b> at a few layers, the raters' attention scores every visual token and the least-looked-at are deleted -
how many is tied to <b>rank(P)</b>, the rank of the raters' attention matrix;
<b>③</b> the best of the deleted tokens are <b>recycled</b>: clustered and merged into a few tokens.
Pick an example below: you see which patches survive each layer, why, and what it saves.</p>
</div>
"""

CSS = """
.gradio-container {max-width: 1320px !important; margin: auto}
.sv-hero h1 {font-size: 1.9rem; margin: 0 0 .3rem 0}
.sv-hero p {font-size: .98rem; line-height: 1.45; color: var(--body-text-color-subdued); margin: 0}
.sv-answers {display: flex; gap: .75rem; flex-wrap: wrap}
.sv-answer {flex: 1 1 220px; border: 1px solid var(--border-color-primary); border-radius: 10px;
  padding: .6rem .8rem; background: var(--background-fill-secondary)}
.sv-answer .sv-k {font-size: .8rem; text-transform: uppercase; letter-spacing: .04em;
  color: var(--body-text-color-subdued)}
.sv-answer .sv-v {font-size: 1.35rem; font-weight: 650; margin-top: .15rem}
.sv-dense .sv-v {color: var(--body-text-color-subdued)}
.sv-badge {display: inline-block; margin-top: .55rem; padding: .2rem .65rem; border-radius: 999px;
  font-weight: 600; font-size: .9rem}
.sv-agree {background: #dcfce7; color: #166534}
.sv-differ {background: #fee2e2; color: #991b1b}
.sv-legend {display: flex; flex-wrap: wrap; gap: .35rem 1rem; font-size: .85rem; margin-top: .25rem}
.sv-swatch i {display: inline-block; width: 14px; height: 14px; border-radius: 3px; margin-right: .35rem;
  vertical-align: -2px}
.sv-unknown {border-left: 4px solid #d97706; background: #fef3c7; color: #78350f; padding: .45rem .7rem;
  border-radius: 6px; margin-bottom: .4rem}
.sv-truth {border-left: 4px solid #4f46e5; padding: .35rem .7rem; margin-top: .4rem; font-size: .92rem}
.sv-model {font-size: .85rem; color: var(--body-text-color-subdued)}
.sv-help {font-size: .9rem; color: var(--body-text-color-subdued)}
#sv-overlay img {object-fit: contain}
"""


def raw_image_input(**kw: Any) -> gr.Image:
    """An image input that hands the function the uploaded file untouched.

    gr.Image opens and re-encodes uploads itself, so a corrupt file or a decompression bomb would fail inside
    Gradio with a generic message; this passes the path to sparsevlm.images.load_image, which explains. (An
    instance override rather than a subclass: Gradio writes a .pyi file next to every component subclass.)
    """
    comp = gr.Image(type="filepath", **kw)
    default = comp.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        if getattr(payload, "url", None) and str(payload.url).startswith("data:"):
            return default(payload)
        return payload.path

    comp.preprocess = preprocess  # type: ignore[method-assign]
    return comp


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


def _user_error(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, SparseVLMError):
        return gr.Error(str(exc), title="Cannot run this")
    log.error("unexpected failure:\n%s", traceback.format_exc())
    return gr.Error(f"Something went wrong inside the engine ({type(exc).__name__}: {exc}). The app is still up; "
                    "try another image or setting.", title="Internal error")


def _whole(value: Any, what: str) -> int:
    try:
        f = float(value)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what} must be a whole number, not {value!r}") from None


def _number(value: Any, default: float, what: str) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, not {value!r}") from None


def build_config(method: Any, budget: Any, accounting: Any = None, count_mode: Any = None, lam: Any = None,
                 scale: Any = None, bias: Any = None, recycle: Any = None) -> PruneConfig:
    """A PruneConfig from the page's (or an API caller's) values; what is left out takes the engine's default."""
    kw: dict[str, Any] = {
        "method": method or DEFAULTS.method,
        "budget": DEFAULTS.budget if budget in (None, "") else _whole(budget, "the budget"),
        "count_mode": count_mode or DEFAULTS.count_mode,
        "lam": _number(lam, DEFAULTS.lam, "λ"),
        "scale": _number(scale, DEFAULTS.scale, "scale"),
        "bias": _number(bias, DEFAULTS.bias, "bias"),
        "recycle": DEFAULTS.recycle if recycle is None else bool(recycle),
    }
    if accounting:
        kw["accounting"] = accounting
    return PruneConfig(**kw).validate()


def trace_data(trace: PruneTrace) -> dict:
    """The trace as JSON data: the very text `python -m sparsevlm run --trace-out` writes, parsed."""
    return json.loads(trace.to_json())


def run_record(out: RunOutput) -> dict:
    """What /run returns: both answers and both traces as plain JSON data."""
    dense = out.dense
    return {
        "answer": out.pruned.answer,
        "dense_answer": dense.answer if dense is not None else None,
        "agrees_with_dense": render.answers_agree(out.pruned, dense) if dense is not None else None,
        "trace": trace_data(out.pruned),
        "dense_trace": trace_data(dense) if dense is not None else None,
        "unknown_words": [[w, s] for w, s in out.unknown or ()],
        "ground_truth": None if out.truth is None else
        {**out.truth, "evidence_recall": render.evidence_recall(out.pruned, out.truth["evidence"]),
         "evidence_recall_per_stage": render.evidence_recall_per_stage(out.pruned, out.truth["evidence"])},
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
                       evidence_recall=render.evidence_recall(tr, evidence) if evidence is not None else None)
        rows.append(row)
    return rows


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
        "notice": render.unknown_words_html(out.unknown or []),
        "answer": render.answer_markdown(tr, dense) + render.truth_html(out.truth, tr),
        "raters": render.rater_highlights(tr),
        "rater_note": rater_note(tr),
        "raters_fig": render.raters_figure(tr),
        "overlay": render.render_view(out.image, tr, layer, view, evidence=out.evidence),
        "layer": gr.Slider(minimum=0, maximum=max(0, n_layers - 1), value=layer, step=1,
                           interactive=n_layers > 1),
        "caption": render.layer_caption(tr, layer),
        "counts": render.counts_figure(tr, budget=out.budget if tr.method != "dense" else None),
        "formulas": render.formulas_markdown(tr),
        "latency": pd.DataFrame(render.latency_rows(tr, dense), columns=render.LATENCY_HEADERS),
        "latency_fig": render.latency_figure(tr, dense),
        "record": run_record(out),
    }


def image_key(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


def studio_scene(seed: Any, family: Any, world: Any = "v1") -> tuple[Image.Image, dict]:
    """A generated scene of `world` (v1: the shipped model's generator, v2: model v2's wider world, independent:
    pictures no model trained on) and a question of `family` about it, deterministic from `seed`; returns the
    picture and its ground truth (question, answer, evidence patches on the world's 24x24 grid)."""
    seed = _whole(seed if seed not in (None, "") else 0, "the seed")
    if not 0 <= seed < 2**31:
        raise InputError(f"the seed must be between 0 and {2**31 - 1}, not {seed}")
    if family not in generator.FAMILIES:
        raise InputError(f"the question family must be one of {', '.join(generator.FAMILIES)}, not {family!r}")
    world = "v1" if world in (None, "") else world
    if world not in WORLDS:
        raise InputError(f"the world must be one of {', '.join(WORLDS)}, not {world!r}")
    try:
        item = studio_item(seed, family, world)
    except WorldError as exc:  # no question of this family in 1000 draws: not reached for the worlds' families
        raise InputError(str(exc)) from None
    grid = (generator.GRID, generator.GRID)
    return item.image, {"seed": seed, "family": family, "world": world, "question": item.sample.question,
                        "answer": item.sample.answer, "evidence": list(item.sample.evidence), "grid": list(grid)}


def model_world(lm: LoadedModel) -> str:
    """The world a loaded model was trained on (its folder's training_state.json; v1 when it records none)."""
    return world_of_model(getattr(lm.model, "name_or_path", None) or None)


def world_choices(own: str) -> list[tuple[str, str]]:
    """The studio's world picker: the model's own world first and marked, then the others."""
    return [(WORLD_LABELS[w] + (" · this model's world" if w == own else ""), w) for w in world_order(own)]


def scene_truth(scene: dict | None, image: Image.Image, question: str, grid: tuple[int, int]) -> dict | None:
    """The studio scene's ground truth when this request is still that scene (same pixels, same question), with
    the evidence mapped onto the model's grid; None for uploads and edited questions."""
    if not scene or scene.get("key") != image_key(image) or scene.get("question", "").strip() != question.strip():
        return None
    truth = {k: scene[k] for k in ("seed", "family", "answer") if k in scene}
    truth["world"] = scene.get("world", "v1")
    truth["evidence"] = render.regrid_patches(scene["evidence"], tuple(scene["grid"]), tuple(grid))
    truth["grid"] = list(grid)  # the model's
    return truth


def example_evidence(examples: list[dict]) -> dict[tuple[str, str], list[int]]:
    """(image pixels hash, question) -> evidence patches of the bundled generated scenes that record them."""
    table = {}
    for e in examples:
        if e.get("evidence"):
            try:
                table[(image_key(load_image(e["image"])), check_question(e["question"]))] = list(e["evidence"])
            except SparseVLMError:
                continue
    return table


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


def reachable_budget(lm: Any) -> float | None:
    """The smallest input-counted budget SparseVLM's default schedule can reach on this model (flops accounting;
    paper accounting runs every budget). None if unknown."""
    depth = lm.num_layers
    try:
        return min_equal_tokens(lm.visual_tokens, sparsevlm_layers(PruneConfig(), depth)[0], depth)
    except SparseVLMError:  # too shallow for the schedule: no SparseVLM layer to prune after
        return None


@gpu(duration=120)  # ZeroGPU lends the GPU only while this runs; a no-op without the `spaces` package
def model_runs(lm: LoadedModel, image: Image.Image, question: str, config: PruneConfig, max_new_tokens: int,
               with_dense: bool) -> tuple[PruneTrace, PruneTrace | None]:
    """All the model (GPU) work of one request: the pruned run, and the dense run to compare with (the same
    trace when the method is dense), on one encoding of the image. Plain data in and out, so ZeroGPU can run it
    in its worker."""
    if config.method == "dense" or not with_dense:
        pruned = run(lm, image, question, config, max_new_tokens=max_new_tokens).trace
        return pruned, (pruned if config.method == "dense" else None)
    pruned, dense = run_shared(lm, image, question, [config, PruneConfig(method="dense")],
                               Decoding(max_new_tokens), raise_errors=True)
    return pruned.trace, dense.trace


@gpu(duration=120)
def compare_model_runs(lm: LoadedModel, image: Image.Image, question: str, configs: list[PruneConfig],
                       max_new_tokens: int) -> list[tuple[str, PruneTrace | None, str]]:
    """All the model work of "Compare all methods": every config on one encoding of the image; per method its
    trace, or None and why it cannot run on this model (e.g. [CLS] attention on a tower without [CLS])."""
    results = run_shared(lm, image, question, configs, Decoding(max_new_tokens))
    return [(c.method, r.trace, "") if isinstance(r, RunResult) else (c.method, None, str(r))
            for c, r in zip(configs, results)]


def budget_choice(lm: LoadedModel, **layout: Any) -> gr.Radio:
    """The budget radio for a model: the papers' 64 (paper accounting, the default, runs every budget)."""
    budgets = list(FIXED_BUDGETS)
    reachable = reachable_budget(lm)
    value = 64
    info = f"mean visual tokens per decoder layer (dense = {lm.visual_tokens})"
    if reachable is not None and reachable > min(budgets):
        info += f"; flops accounting cannot go below {reachable:.0f} on this model's depth"
    return gr.Radio(budgets, value=value, info=info + "; adaptive modes under SparseVLM options", **layout)


def model_line(lm: LoadedModel, note: str = "") -> str:
    rows, cols = lm.grid
    weights = render.format_bytes(model_bytes(lm.model))
    cls_only = ", ".join(render.method_label(m) for m in METHODS if get_method(m).needs_cls)
    line = (f"Model: <b>{html.escape(lm.name)}</b> · {lm.arch} · {lm.num_layers} decoder layers · grid {rows}×{cols} "
            f"= {lm.visual_tokens} visual tokens{'' if lm.has_cls else f' (no [CLS]: {cls_only} cannot run)'} · "
            f"{lm.device} / {str(lm.dtype).replace('torch.', '')} · weights {weights} (measured from the loaded "
            "tensors)")
    return f"<div class='sv-model'>{line}{note}</div>"


def model_choices(default: str) -> list[str]:
    """The picker's list: the presets, then models that load without a network; any other id can be typed."""
    names = [default, *PRESETS]
    try:
        names += available_local_models()
    except Exception:  # noqa: BLE001 - an unreadable cache folder must not stop the page
        log.warning("could not list the local models", exc_info=True)
    return list(dict.fromkeys(names))


def build_app(models: ModelCache, default_model: str, examples: list[dict] | None = None) -> gr.Blocks:
    """The whole UI. `models` holds the loaded models; each browser session picks one (default_model first)."""
    examples = load_examples() if examples is None else examples
    evidence_of = example_evidence(examples)
    first, _ = models.get(default_model)

    def use_model(name: Any, progress: gr.Progress | None = None) -> LoadedModel:
        """The session's model: loaded once, re-loaded only if memory pressure unloaded it meanwhile."""
        report = (lambda f, msg: progress(f, desc=msg)) if progress is not None else None
        lm, unloaded = models.get(str(name or default_model), progress=report)
        if unloaded:
            gr.Info(f"Unloaded {', '.join(unloaded)} to make room for {lm.name}.")
        return lm

    def execute(model: Any, image_src: Any, question: Any, config: PruneConfig, max_new_tokens: Any,
                with_dense: bool, progress: gr.Progress | None = None, scene: dict | None = None) -> RunOutput:
        lm = use_model(model, progress)
        q = check_question(question)
        image = image_src if isinstance(image_src, Image.Image) else load_image(image_src)
        unknown = unknown_words(q, lm.processor.tokenizer)  # shown with the results; the run still happens
        n_new = DEFAULT_NEW_TOKENS if max_new_tokens in (None, "") else _whole(max_new_tokens, "max new tokens")
        if progress is not None:
            progress(0.1, desc=f"running {render.method_label(config.method)}"
                     + (" and dense for comparison" if with_dense and config.method != "dense" else ""))
        pruned, dense = model_runs(lm, image, q, config, n_new, with_dense)
        truth = scene_truth(scene, image, q, tuple(pruned.grid))
        return RunOutput(image=image, pruned=pruned, dense=dense, budget=config.budget,
                         evidence=truth["evidence"] if truth else evidence_of.get((image_key(image), q)),
                         unknown=unknown, truth=truth)

    # --- event handlers (all state arrives as arguments and leaves as return values) -------------------------
    def run_json(image, question, method, budget, accounting, count_mode, lam, scale, bias, recycle,
                 max_new_tokens, model, scene, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        """Answer with pruning and dense; return both answers and both traces as JSON."""
        try:
            cfg = build_config(method, budget, accounting, count_mode, lam, scale, bias, recycle)
            return run_record(execute(model, image, question, cfg, max_new_tokens, True, progress, scene))
        except Exception as exc:
            raise _user_error(exc) from exc

    def explain(image, question, method, budget, accounting, count_mode, lam, scale, bias, recycle,
                max_new_tokens, view, model, scene, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        try:
            cfg = build_config(method, budget, accounting, count_mode, lam, scale, bias, recycle)
            out = execute(model, image, question, cfg, max_new_tokens, True, progress, scene)
            progress(0.9, desc="drawing")
            drawn = draw_views(out, view)
        except Exception as exc:
            raise _user_error(exc) from exc
        return {**{views[k]: v for k, v in drawn.items()}, state: {"image": out.image, "record": drawn["record"],
                                                                "evidence": out.evidence}}

    def session_trace(st: Any) -> PruneTrace:
        if not st or not st.get("record"):
            raise gr.Error("Run the model first: pick an example or upload an image and press Run.")
        return PruneTrace.from_dict(st["record"]["trace"])

    def show_layer(st, layer, view):
        tr = session_trace(st)
        layer = int(max(0, min(int(layer or 0), render.num_layers(tr) - 1)))
        return (render.render_view(st["image"], tr, layer, view, evidence=st.get("evidence")),
                render.layer_caption(tr, layer))

    def step_layer(st, layer, view):
        if not st or not st.get("record"):
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        tr = PruneTrace.from_dict(st["record"]["trace"])
        nxt = int(layer or 0) + 1
        if nxt >= render.num_layers(tr):
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        return (gr.Timer(active=True), nxt, render.render_view(st["image"], tr, nxt, view, evidence=st.get("evidence")),
                render.layer_caption(tr, nxt))

    def compare_runs(image_src, question, budget, max_new_tokens, model, scene, progress):
        lm = use_model(model, progress)
        q = check_question(question)
        image = load_image(image_src)
        truth = scene_truth(scene, image, q, tuple(lm.grid))
        n_new = DEFAULT_NEW_TOKENS if max_new_tokens in (None, "") else _whole(max_new_tokens, "max new tokens")
        configs = [build_config(method, budget) for method in COMPARE_METHODS]
        progress(0.1, desc=f"running {len(configs)} methods on one encoding of the image")
        results = compare_model_runs(lm, image, q, configs, n_new)
        return image, results, (truth["evidence"] if truth else None)

    def compare_json(image, question, budget, max_new_tokens, model, scene, progress=gr.Progress()):  # noqa: B008
        """Every method at one budget: per method its answer, agreement with dense and trace summary."""
        try:
            _, results, evidence = compare_runs(image, question, budget, max_new_tokens, model, scene, progress)
            return compare_record(results, evidence)
        except Exception as exc:
            raise _user_error(exc) from exc

    def compare_view(image, question, budget, max_new_tokens, model, scene, progress=gr.Progress()):  # noqa: B008
        try:
            img, results, evidence = compare_runs(image, question, budget, max_new_tokens, model, scene, progress)
            gallery = [(render.render_layer(img, tr, render.final_layer(tr), max_side=384, evidence=evidence),
                        render.compare_caption(m, tr)) for m, tr, _ in results if tr is not None]
            table = pd.DataFrame(render.compare_rows(results, evidence), columns=render.COMPARE_HEADERS)
            return gallery, table, compare_record(results, evidence)
        except Exception as exc:
            raise _user_error(exc) from exc

    def load_model(name, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        """Switch this session to a model (a preset, a hub id or a local folder), loading it if needed."""
        try:
            key = str(name or "").strip()
            already = key in models.loaded()
            t0 = time.perf_counter()
            report = lambda f, msg: progress(f, desc=msg)  # noqa: E731
            lm, unloaded = models.get(key, progress=report)
        except Exception as exc:
            raise _user_error(exc) from exc
        took = "already in memory" if already else f"loaded in {time.perf_counter() - t0:.1f} s (measured)"
        note = f"<br>{html.escape(lm.name)}: {took}"
        if unloaded:
            note += f"; unloaded {html.escape(', '.join(unloaded))} to stay within the model memory budget"
            gr.Info(f"Unloaded {', '.join(unloaded)} to make room for {lm.name}.")
        return key, model_line(lm, note), budget_choice(lm)

    def export(st):
        tr = session_trace(st)
        folder = Path(tempfile.mkdtemp(prefix="sparsevlm-export-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        trace_path = folder / f"trace-{tr.method}-{stamp}.json"
        trace_path.write_text(tr.to_json(indent=1))
        gif_path = folder / f"pruning-{tr.method}-{stamp}.gif"
        gif_path.write_bytes(render.pruning_animation(st["image"], tr, evidence=st.get("evidence")))
        mp4_path = folder / f"pruning-{tr.method}-{stamp}.mp4"
        render.pruning_video(st["image"], tr, str(mp4_path), evidence=st.get("evidence"))
        files = [str(trace_path), str(gif_path), str(mp4_path)]
        dense = st["record"].get("dense_trace")
        if dense and tr.method != "dense":
            dense_path = folder / f"trace-dense-{stamp}.json"
            dense_path.write_text(PruneTrace.from_dict(dense).to_json(indent=1))
            files.append(str(dense_path))
        return files, str(gif_path), str(mp4_path)

    def new_scene(seed, family, world=None):
        """The studio: a generated scene and question into the inputs, its ground truth into the session."""
        try:
            image, truth = studio_scene(seed, family, world)
        except Exception as exc:
            raise _user_error(exc) from exc
        path = (Path(tempfile.mkdtemp(prefix="sparsevlm-scene-"))
                / f"scene-{truth['world']}-{truth['seed']}-{truth['family']}.png")
        image.save(path)  # PNG: the pixels come back unchanged, so the run can recognise the scene by them
        return (str(path), truth["question"], truth, (truth["seed"] + 1) % 2**31, {**truth, "key": image_key(image)},
                render.truth_html(truth))

    def world_picker(model):
        """The studio's world choice for the session's model (its own world first), after a model switch."""
        name = str(model or default_model)
        if name not in models.loaded():
            return gr.Dropdown()
        own = model_world(models.get(name)[0])
        return gr.Dropdown(choices=world_choices(own), value=own)

    def forget_scene():
        """An upload, an edited question or an example is no longer the generated scene: drop its ground truth."""
        return None, ""

    def word_notice(question, model):
        """The vocabulary hint as the question changes (before any run)."""
        if not question or not str(question).strip():
            return ""
        try:
            name = str(model or default_model)
            if name not in models.loaded():  # never load a model on a keystroke; the run shows the notice too
                return ""
            lm, _ = models.get(name)
            return render.unknown_words_html(unknown_words(str(question), lm.processor.tokenizer))
        except Exception:  # noqa: BLE001 - a hint must never get in the way of typing; the run reports errors
            log.warning("word notice failed", exc_info=True)
            return ""

    # --- layout --------------------------------------------------------------------------------------------
    with gr.Blocks(title="SparseVLM Explorer") as demo:
        state = gr.State(None)
        model_state = gr.State(default_model)  # the session's model (a key of `models`)
        scene_state = gr.State(None)  # the studio scene's ground truth while the inputs still show it
        gr.HTML(INTRO)
        with gr.Row(equal_height=True):
            public = bool(models.access and models.access.public)  # no hub ids beyond the presets and the cache
            model_in = gr.Dropdown(model_choices(default_model), value=default_model, allow_custom_value=True,
                                   label="Model: a preset or a local model" if public else
                                   "Model: a preset, a Hugging Face hub id or a local folder", scale=5,
                                   elem_id="sv-model-picker")
            load_btn = gr.Button("Load model", scale=1, min_width=120, elem_id="sv-load")
        model_out = gr.HTML(model_line(first), label="Model", elem_id="sv-model")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image_in = raw_image_input(label="Image", height=300, elem_id="sv-image",
                                    sources=["upload", "clipboard"])
                question_in = gr.Textbox(label="Question", placeholder="e.g. What colour is the circle?",
                                         lines=1, max_lines=4, elem_id="sv-question")
                run_btn = gr.Button("Run: prune and explain", variant="primary", elem_id="sv-run")
                with gr.Accordion("Scene studio: a generated scene whose ground truth is known", open=True):
                    with gr.Row(equal_height=True):
                        seed_in = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed",
                                            elem_id="sv-seed", min_width=90)
                        family_in = gr.Dropdown(list(generator.FAMILIES), value=generator.FAMILIES[0],
                                                label="Question family", elem_id="sv-family", min_width=120)
                        own_world = model_world(first)
                        world_in = gr.Dropdown(world_choices(own_world), value=own_world, label="World",
                                               elem_id="sv-world", min_width=160,
                                               info="whose pictures: the model's own first")
                        scene_btn = gr.Button("New random scene", elem_id="sv-new-scene", min_width=140)
                    truth_out = gr.HTML("", elem_id="sv-truth")
                if examples:
                    ex = gr.Examples([[e["image"], e["question"]] for e in examples], inputs=[image_in, question_in],
                                     label="Examples - one click runs it", examples_per_page=6,
                                     elem_id="sv-examples")
                else:
                    ex = None
                    gr.Markdown("_No examples found in assets/examples/examples.json._")
                method_in = gr.Radio(METHOD_CHOICES, value=DEFAULTS.method, label="Pruning method",
                                     elem_id="sv-method")
                budget_in = budget_choice(first, label="Budget: equal tokens", elem_id="sv-budget")
                accounting_in = gr.Radio(list(ACCOUNTINGS), value=DEFAULTS.accounting,
                                         label="Accounting: how a budget is counted",
                                         info="paper: the published settings (a pruning layer counts at its "
                                              "output); flops: every method at the same input-counted cost",
                                         elem_id="sv-accounting")
                with gr.Accordion("SparseVLM options", open=False):
                    count_in = gr.Radio(COUNT_CHOICES, value=DEFAULTS.count_mode, label="How many tokens to drop")
                    lam_in = gr.Slider(0.0, 1.0, value=DEFAULTS.lam, step=0.05, label="λ (paper eq. 8)",
                                       info="deleted = ⌊λ·(tokens − rank(P))⌋")
                    with gr.Row():
                        scale_in = gr.Number(value=DEFAULTS.scale, label="scale (reference code)",
                                             info="kept = rank(P)·scale + bias")
                        bias_in = gr.Number(value=DEFAULTS.bias, label="bias")
                    recycle_in = gr.Checkbox(value=DEFAULTS.recycle, label="Recycle deleted tokens (cluster + merge)")
                max_new_in = gr.Slider(1, MAX_NEW_TOKENS_UI, value=8, step=1, label="Max new tokens")
            with gr.Column(scale=6, min_width=420):
                notice_out = gr.HTML("", elem_id="sv-notice")
                answer_out = gr.HTML("<div class='sv-help'>The answer appears here - with pruning, and from the "
                                     "dense model for comparison.</div>", label="Answer", elem_id="sv-answer")
                overlay_out = gr.Image(label="What the decoder still sees", type="pil", format="png",
                                       elem_id="sv-overlay", height=420, interactive=False,
                                       buttons=["download", "fullscreen"])
                with gr.Row():
                    layer_in = gr.Slider(0, 1, value=0, step=1, label="Decoder layer", elem_id="sv-layer",
                                         scale=5)
                    play_btn = gr.Button("▶ Play", scale=1, min_width=80, elem_id="sv-play")
                view_in = gr.Radio([("Kept / pruned / recycled tokens", "tokens"),
                                    ("Significance heatmap", "heatmap")], value="tokens", show_label=False,
                                   label="View", elem_id="sv-view")
                caption_out = gr.Markdown(label="Layer caption", elem_id="sv-caption")
                gr.HTML(render.legend_html())
        with gr.Tabs():
            with gr.Tab("① Text raters", id="raters"):
                gr.Markdown("Every token after the image (question + answer prompt) gets a relevance score R: how "
                            "much the visual tokens, on average, point at it. Tokens above the mean become **text "
                            "raters**; only their attention decides which visual tokens survive.",
                            elem_classes="sv-help")
                raters_out = gr.HighlightedText(label="Text raters (red = rater, stronger = higher R)",
                                                show_legend=True, elem_id="sv-raters")
                raters_note = gr.Markdown(label="Rater note")
                raters_fig = gr.Plot(label="R per token (computed)", elem_id="sv-raters-fig")
            with gr.Tab("② Token counts", id="counts"):
                counts_fig = gr.Plot(label="Visual tokens per layer (computed)", elem_id="sv-counts")
                formulas_out = gr.Markdown(label="Count rules", elem_id="sv-formulas")
            with gr.Tab("③ Latency & cost", id="latency"):
                gr.Markdown("**Measured**: wall-clock on this machine for this request. **Computed**: analytic "
                            "FLOPs and KV-cache bytes from the model shape and the token counts.",
                            elem_classes="sv-help")
                latency_out = gr.Dataframe(headers=render.LATENCY_HEADERS, label="Pruned vs dense",
                                           interactive=False, elem_id="sv-latency", wrap=True)
                latency_fig = gr.Plot(label="Latency (measured) and cost (computed)", elem_id="sv-latency-fig")
            with gr.Tab("④ Compare methods", id="compare"):
                gr.Markdown("Same image and question, every method at the selected budget: which patches survive "
                            "to the last layer, what each answers, what it costs.", elem_classes="sv-help")
                compare_btn = gr.Button("Compare all methods", elem_id="sv-compare")
                compare_gallery = gr.Gallery(label="Last-layer tokens per method", columns=5, height=300,
                                             elem_id="sv-compare-gallery", object_fit="contain")
                compare_table = gr.Dataframe(headers=render.COMPARE_HEADERS, interactive=False, wrap=True,
                                             label="Per method",
                                             elem_id="sv-compare-table")
            with gr.Tab("⑤ Export", id="export"):
                export_btn = gr.Button("Export trace JSON + pruning animation (GIF, MP4)", elem_id="sv-export")
                with gr.Row():
                    export_files = gr.File(label="Downloads", file_count="multiple", elem_id="sv-export-files")
                    export_gif = gr.Image(label="Pruning through the layers (GIF)", type="filepath",
                                          interactive=False, elem_id="sv-export-gif")
                    export_mp4 = gr.Video(label="Pruning through the layers (MP4, H.264)", interactive=False,
                                          elem_id="sv-export-mp4", loop=True)
            with gr.Tab("Raw trace", id="raw"):
                gr.Markdown("What the `/run` endpoint returns for this request: both answers and both traces "
                            "(`trace` is what `python -m sparsevlm run --trace-out` writes).", elem_classes="sv-help")
                record_out = gr.JSON(label="/run result", elem_id="sv-record")
                compare_out = gr.JSON(label="/compare result (after Compare all methods)", elem_id="sv-compare-json")
                scene_out = gr.JSON(label="/new_scene result: the studio scene's ground truth (evidence patches on "
                                    "the world's 24x24 grid)", elem_id="sv-scene-json")

        views = {"answer": answer_out, "raters": raters_out, "rater_note": raters_note, "raters_fig": raters_fig,
                 "overlay": overlay_out, "layer": layer_in, "caption": caption_out, "counts": counts_fig,
                 "formulas": formulas_out, "latency": latency_out, "latency_fig": latency_fig, "notice": notice_out,
                 "record": record_out}
        run_inputs = [image_in, question_in, method_in, budget_in, accounting_in, count_in, lam_in, scale_in, bias_in,
                      recycle_in, max_new_in]
        explain_inputs = [*run_inputs, view_in, model_state, scene_state]
        explain_outputs = [*views.values(), state]
        run_btn.click(explain, explain_inputs, explain_outputs, api_name="explain", concurrency_id="model")
        question_in.submit(explain, explain_inputs, explain_outputs, api_visibility="private",
                           concurrency_id="model")
        if ex is not None:
            ex.load_input_event.then(forget_scene, None, [scene_state, truth_out], api_visibility="private",
                                     queue=False)
            ex.load_input_event.then(explain, explain_inputs, explain_outputs, api_visibility="private",
                                     concurrency_id="model")
        load_btn.click(load_model, [model_in], [model_state, model_out, budget_in], api_name="load_model",
                       concurrency_id="model").success(
            world_picker, [model_state], [world_in], api_visibility="private", queue=False)
        # The data endpoints for programs: no button on the page runs them (the page draws its views from the
        # same record via /explain), so hidden triggers carry them.
        run_api = gr.Button(visible=False)
        run_api.click(run_json, [*run_inputs, model_state, scene_state], [record_out], api_name="run",
                      concurrency_id="model")
        compare_api = gr.Button(visible=False)
        compare_inputs = [image_in, question_in, budget_in, max_new_in, model_state, scene_state]
        compare_api.click(compare_json, compare_inputs, [compare_out], api_name="compare", concurrency_id="model")
        layer_in.input(show_layer, [state, layer_in, view_in], [overlay_out, caption_out], api_name="layer_view",
                       show_progress="hidden", concurrency_limit=4)
        view_in.change(show_layer, [state, layer_in, view_in], [overlay_out, caption_out],
                       api_visibility="private", show_progress="hidden", concurrency_limit=4)
        timer = gr.Timer(0.8, active=False)
        play_btn.click(lambda: (gr.Timer(active=True), 0), None, [timer, layer_in], api_visibility="private",
                       queue=False).then(show_layer, [state, layer_in, view_in], [overlay_out, caption_out],
                                         api_visibility="private", show_progress="hidden")
        timer.tick(step_layer, [state, layer_in, view_in], [timer, layer_in, overlay_out, caption_out],
                   api_visibility="private", show_progress="hidden", concurrency_limit=4)
        compare_btn.click(compare_view, compare_inputs, [compare_gallery, compare_table, compare_out],
                          api_name="compare_view", concurrency_id="model")
        scene_btn.click(new_scene, [seed_in, family_in, world_in],
                        [image_in, question_in, scene_out, seed_in, scene_state, truth_out], api_name="new_scene",
                        concurrency_limit=4)
        image_in.upload(forget_scene, None, [scene_state, truth_out], api_visibility="private", queue=False)
        question_in.input(forget_scene, None, [scene_state, truth_out], api_visibility="private", queue=False)
        question_in.change(word_notice, [question_in, model_state], [notice_out], api_visibility="private",
                           show_progress="hidden", trigger_mode="always_last", concurrency_limit=4)
        export_btn.click(export, [state], [export_files, export_gif, export_mp4], api_name="export",
                         concurrency_limit=2)
    return demo


def launch_kwargs() -> dict:
    return {"css": CSS, "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")}
